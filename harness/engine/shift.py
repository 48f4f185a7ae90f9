"""Accuracy under shift: ImageNet-C style corruptions of the test split, made on the device.

Hendrycks & Dietterich (2019) corrupt ImageNet's validation images at five severities and
save them as 8-bit images. The same four, with their severity tables:
- gaussian_noise: add N(0, c^2) per pixel, images in [0, 1];
- gaussian_blur: a Gaussian of sigma c px at 224 px, scaled to the image size, so a
  severity blurs the same fraction of the image; below 96 px it is scaled as at 96 px (at
  32 px a pure scaling would leave severity 1 at 0.14 px, no blur at all; CIFAR-10-C blurs
  its 32 px images by 0.4-1 px). The kernel is the reference's (skimage.filters.gaussian,
  i.e. scipy.ndimage.gaussian_filter over H and W): cut at 4 sigma, edges extended ('nearest');
- contrast: pull every pixel towards its channel's mean over the image, x' = (x - m) * c + m
  (the reference takes `np.mean(x, axis=(0, 1))` of an HxWxC image: one mean per channel);
- jpeg: JPEG-compress at quality c (on the CPU: torchvision's encoder).
Each corrupted image is rounded to 8 bits, as the published sets are. The noise comes from
one generator seeded per corruption and severity, in fixed chunks of images, so every
strategy and every seed is scored on the very same corrupted images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from harness.engine import data as data_mod
from harness.engine.data.splits import take
from harness.engine.step import score

SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "jpeg": (25, 18, 15, 10, 7),
}
CORRUPTIONS = tuple(SEVERITIES)
SHIFT_SEED = 20190328    # ImageNet-C's publication date: any fixed number would do
BLUR_MIN_SIZE = 96
CHUNK = 256              # images corrupted together: the noise does not depend on a batch size


@dataclass(frozen=True)
class Corruption:
    name: str
    severity: int        # 1..5

    @property
    def label(self) -> str:
        return f"{self.name}-{self.severity}"

    @property
    def value(self) -> float:
        return SEVERITIES[self.name][self.severity - 1]

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 [B,C,H,W] -> the corrupted images, uint8, on the same device."""
        if self.name == "jpeg":
            return _jpeg(x, int(self.value))
        f = x.float().div_(255.0)
        c = self.value
        if self.name == "gaussian_noise":
            f = f + c * torch.randn(f.shape, generator=generator, device=f.device)
        elif self.name == "gaussian_blur":
            f = _blur(f, c * max(f.shape[-1], BLUR_MIN_SIZE) / 224)
        elif self.name == "contrast":
            m = f.mean(dim=(2, 3), keepdim=True)   # per image and channel
            f = (f - m) * c + m
        return f.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def per_class(split: data_mod.Split, n: int | None) -> data_mod.Split:
    """The first `n` images of every class, in their order (all of them when n is None)."""
    if n is None:
        return split
    keep = torch.zeros(len(split.y), dtype=torch.bool, device=split.y.device)
    for c in split.y.unique():
        keep[(split.y == c).nonzero().flatten()[:n]] = True
    return data_mod.Split(take(split.x, keep), split.y[keep], split.size, split.stored)


def corruptions(spec: dict[str, list[int]]) -> list[Corruption]:
    """The study's `compare.corruptions` ({name: [severity, ...]}), in the study's order."""
    return [Corruption(name, s) for name, severities in spec.items() for s in severities]


def _blur(f: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(f, sigma, truncate=4.0, mode='nearest') over H and W of
    float [B,C,H,W] (what skimage.filters.gaussian does): the same kernel, radius
    int(truncate * sigma + 0.5), the edge pixels repeated beyond the image."""
    import torch.nn.functional as F
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=f.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(f.dtype)
    c = f.shape[1]
    out = F.pad(f, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)   # along W
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # along H


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    import warnings

    from torchvision.io import decode_jpeg, encode_jpeg
    cpu = x.cpu()
    with warnings.catch_warnings():   # torchvision 0.29 deprecates its codecs for torchcodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        out = [decode_jpeg(encode_jpeg(img, quality=quality)) for img in cpu]
    return torch.stack(out).to(x.device)


def corrupted_batches(split: data_mod.Split, corruption: Corruption, stats: data_mod.InputStats | None,
                      batch_size: int = CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split's images at split.size, corrupted CHUNK at a time (so the noise does not
    depend on `batch_size`), normalised, in order, in batches of at most `batch_size`."""
    gen = torch.Generator(device=split.x.device).manual_seed(SHIFT_SEED)
    for start in range(0, len(split.y), CHUNK):
        rows = slice(start, start + CHUNK)
        images = corruption.apply(data_mod.raw_images(split, rows), gen)
        labels = split.y[rows]
        for b in range(0, len(labels), batch_size):
            yield data_mod.normalize(images[b:b + batch_size], stats), labels[b:b + batch_size]


def accuracy(model: torch.nn.Module, batches, device: torch.device) -> float | None:
    """The model's accuracy over (inputs, labels) batches (step.score); None when there are none."""
    s = score(model, batches, device)
    return None if s is None else s.accuracy
