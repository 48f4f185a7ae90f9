"""`data.augment: randaugment`: timm's `rand-m9-mstd0.5` (RandAugment) on the batch, after
timm's training crop (`RandomResizedCrop`, scale (0.08, 1), ratio (3/4, 4/3)) and a horizontal
flip with p 0.5, every draw from the run's generator on the batch's device.

As timm: 2 layers; each picks one of its 15 ops uniformly (with replacement), applies it with
p 0.5, at a magnitude drawn per op from N(9, 0.5) clipped to [0, 10]; Rotate, Shear and
Translate take a random sign. The arguments at magnitude m (timm's `_LEVEL_TO_ARG`):
AutoContrast, Equalize, Invert (none); Rotate 3m degrees; Posterize int(0.4m) bits;
Solarize threshold int(25.6m); SolarizeAdd int(11m) below 128; Color, Contrast, Brightness,
Sharpness factor 0.18m + 0.1; ShearX/Y 0.03m; TranslateX/YRel 0.045m of the image.
Geometric ops fill with the weights' mean colour (timm's `img_mean`).

Differences from timm's PIL ops: every image stays float with integer values 0..255 (rounded
after each op, as PIL's uint8 images are, where PIL truncates in places); geometric ops and
the crop are bilinear (timm picks bilinear or bicubic at random); the crop and flip are one
grid sample from the stored image. Each op is computed for the whole batch and kept where it
was drawn (`torch.where`): a fixed cost, no host synchronisation.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from harness.engine.data.augment import crop_grid, output_coords, resized_crop_boxes, sample

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
LAYERS = 2
MAGNITUDE, MAGNITUDE_STD, MAGNITUDE_MAX = 9.0, 0.5, 10.0
PROB = 0.5
MIN_SCALE = 0.08
_KIND = {name: k for k, name in enumerate(OPS)}
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")
_LUMA = (0.299, 0.587, 0.114)   # PIL's convert("L")


def rand_augment(x: torch.Tensor, size: int, generator: torch.Generator, fill: tuple[float, ...]) -> torch.Tensor:
    """Stored uint8 [B,C,H,W] (square) -> augmented float [B,C,size,size], integers 0..255.
    `fill`: the colour (0..255 per channel, or one value) geometric ops leave uncovered."""
    b, device = len(x), x.device
    boxes = resized_crop_boxes(b, generator, device, MIN_SCALE)
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    coords = output_coords(b, size, device).clone()
    coords[..., 0] = torch.where(flip[:, None, None], -coords[..., 0], coords[..., 0])
    out = sample(x, crop_grid(boxes, coords)).round_().clamp_(0, 255)
    fill_t = _per_channel(fill, device)
    for _ in range(LAYERS):
        op = torch.randint(0, len(OPS), (b,), generator=generator, device=device)
        u = torch.rand(b, 2, generator=generator, device=device)
        magnitude = (MAGNITUDE + MAGNITUDE_STD * torch.randn(b, generator=generator, device=device))
        kind = torch.where(u[:, 0] < PROB, op, -1)   # -1: this layer leaves the image alone
        sign = torch.where(u[:, 1] < 0.5, -1.0, 1.0)
        out = apply_layer(out, kind, magnitude.clamp(0, MAGNITUDE_MAX), sign, fill_t)
    return out


def apply_layer(x: torch.Tensor, kind: torch.Tensor, m: torch.Tensor, sign: torch.Tensor,
                fill: torch.Tensor) -> torch.Tensor:
    """One RandAugment layer: image i gets op OPS[kind[i]] at magnitude m[i] (kind -1: none)."""
    candidates = [
        (("AutoContrast",), lambda: autocontrast(x)),
        (("Equalize",), lambda: equalize(x)),
        (("Invert",), lambda: 255 - x),
        (("Posterize",), lambda: posterize(x, m)),
        (("Solarize",), lambda: solarize(x, torch.floor(m / 10 * 256))),
        (("SolarizeAdd",), lambda: solarize_add(x, torch.floor(m / 10 * 110))),
        (_ENHANCE, lambda: enhance(x, kind, m / 10 * 1.8 + 0.1)),
        (_GEOMETRIC, lambda: geometric(x, kind, m, sign, fill)),
    ]
    out = x
    for names, compute in candidates:
        chosen = functools.reduce(torch.logical_or, [kind == _KIND[n] for n in names])
        out = torch.where(chosen[:, None, None, None], compute(), out)
    return out


@functools.lru_cache(maxsize=None)
def _per_channel(fill: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Per-channel values as [1,C,1,1] on the device. Made once per device: a host->device
    copy per batch would synchronise every CUDA step."""
    return torch.tensor(fill, device=device, dtype=torch.float32).view(1, -1, 1, 1)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Per channel, stretch [min, max] to [0, 255] (PIL: truncated); a flat channel unchanged."""
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    scale = 255 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, torch.floor(((x - lo) * scale).clamp(0, 255)), x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Per channel histogram equalisation, PIL's: step = (pixels - count of the top value) // 255,
    lut[v] = (pixels below v + step // 2) // step; step 0 leaves the channel unchanged."""
    b, c, h, w = x.shape
    values = x.reshape(b * c, h * w).long()
    counts = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, values, torch.ones_like(values, dtype=torch.float32))
    top = torch.where(counts > 0, torch.arange(256, device=x.device), -1).amax(1, keepdim=True)
    step = torch.floor((h * w - counts.gather(1, top)) / 255)
    below = counts.cumsum(1) - counts
    lut = torch.floor((below + torch.floor(step / 2)) / step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device, dtype=torch.float32))
    return lut.gather(1, values).view(b, c, h, w)


def posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Keep the int(0.4 m) highest bits (0 bits: black, as timm's `Posterize`)."""
    step = _per_image(torch.pow(2.0, 8 - torch.floor(m / 10 * 4)))
    return torch.floor(x / step) * step


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert every value at or above the image's threshold."""
    return torch.where(x >= _per_image(threshold), 255 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """Add to every value below 128, capped at 255."""
    return torch.where(x < 128, (x + _per_image(add)).clamp(max=255), x)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's "L": [B,1,H,W], rounded; a one-channel image is its own grey."""
    if x.shape[1] == 1:
        return x
    luma = _per_channel(_LUMA, x.device)
    return (x * luma).sum(1, keepdim=True).round()


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, the rest 1, / 13), rounded; the border kept."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    inner = F.conv2d(x, kernel, groups=c).round()
    return torch.cat([x[..., :1, :], torch.cat([x[..., 1:-1, :1], inner, x[..., 1:-1, -1:]], -1), x[..., -1:, :]], -2)


def enhance(x: torch.Tensor, kind: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate); the degenerate image is
    black (Brightness), grey (Color), the grey mean (Contrast), smoothed (Sharpness)."""
    grey = _grey(x)
    degenerate = torch.zeros_like(x)
    degenerate = torch.where(_per_image(kind == _KIND["Color"]), grey.expand_as(x), degenerate)
    mean = torch.floor(grey.mean(dim=(1, 2, 3)) + 0.5)
    degenerate = torch.where(_per_image(kind == _KIND["Contrast"]), _per_image(mean).expand_as(x), degenerate)
    degenerate = torch.where(_per_image(kind == _KIND["Sharpness"]), _smooth(x), degenerate)
    return (degenerate + _per_image(factor) * (x - degenerate)).round().clamp(0, 255)


def geometric(x: torch.Tensor, kind: torch.Tensor, m: torch.Tensor, sign: torch.Tensor,
              fill: torch.Tensor) -> torch.Tensor:
    """Rotate / ShearX / ShearY / TranslateXRel / TranslateYRel as one affine grid sample per
    batch (coordinates -1..1 over the image: a shear keeps the top row or left column, as
    PIL's transform does), uncovered pixels `fill`."""
    b = len(x)
    theta = sign * m * (30 / 10) * (math.pi / 180)
    shear, shift = sign * m * (0.3 / 10), sign * m * (0.45 / 10) * 2
    a = torch.zeros(b, 2, 3, device=x.device)
    a[:, 0, 0] = a[:, 1, 1] = 1.0
    rot = kind == _KIND["Rotate"]
    a[:, 0, 0] = torch.where(rot, theta.cos(), a[:, 0, 0])
    a[:, 1, 1] = torch.where(rot, theta.cos(), a[:, 1, 1])
    a[:, 0, 1] = torch.where(rot, theta.sin(), 0.0)
    a[:, 1, 0] = torch.where(rot, -theta.sin(), 0.0)
    shear_x, shear_y = kind == _KIND["ShearX"], kind == _KIND["ShearY"]
    a[:, 0, 1] = torch.where(shear_x, shear, a[:, 0, 1])   # x_in = x + k (y + 1)
    a[:, 0, 2] = torch.where(shear_x, shear, 0.0)
    a[:, 1, 0] = torch.where(shear_y, shear, a[:, 1, 0])   # y_in = y + k (x + 1)
    a[:, 1, 2] = torch.where(shear_y, shear, 0.0)
    a[:, 0, 2] = torch.where(kind == _KIND["TranslateXRel"], shift, a[:, 0, 2])
    a[:, 1, 2] = torch.where(kind == _KIND["TranslateYRel"], shift, a[:, 1, 2])
    grid = F.affine_grid(a, list(x.shape), align_corners=False)
    moved = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return moved.round().clamp(0, 255)
