"""Augmentation of a batch on the device, every random draw from the run's generator (so a
run's stream is the same every time, bitwise on the CPU). `data.augment`:

- `flip`: `crop_flip` (reflect-pad size // 8, random crop, random horizontal flip) when the
  images are stored at the output size; `random_crop_flip` from the larger stored image
  otherwise (torchvision's classic Resize(256) / RandomCrop(224) / flip);
- `fastai`: harness/engine/data/fastai_aug.py; `randaugment`: harness/engine/data/randaugment.py.

Both of those start from a random resized crop (`resized_crop_boxes`), taken straight from the
stored image by `crop_grid` + grid_sample: one interpolation per image, whatever follows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CROP_TRIES = 10   # as torchvision / fastai / timm: after 10 misses, the whole image


def crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: random crop from a reflect-padded copy (pad = size // 8) and a random horizontal flip."""
    h, w = x.shape[-2:]
    pad = min(h, w) // 8
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad > 0 else x
    return random_crop_flip(padded, h, generator)


def random_crop_flip(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Per image: a random size x size crop of [B,C,H,W] and a random horizontal flip. Draws,
    in order: top (B), left (B), flip (B)."""
    b, _, h, w = x.shape
    device = x.device
    top = torch.randint(0, h - size + 1, (b,), generator=generator, device=device)
    left = torch.randint(0, w - size + 1, (b,), generator=generator, device=device)
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    rows = top[:, None] + torch.arange(size, device=device)
    cols_fwd = torch.arange(size, device=device)
    # A flip is just reading the crop's columns right to left, so crop and flip are one gather.
    cols = left[:, None] + torch.where(flip[:, None], cols_fwd.flip(0), cols_fwd)
    batch = torch.arange(b, device=device)[:, None, None]
    out = x[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced dims first: [B,H,W,C]
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Boxes:
    """One crop per image, as fractions of a square image: left, top, width, height ([B] each)."""
    left: torch.Tensor
    top: torch.Tensor
    width: torch.Tensor
    height: torch.Tensor


def resized_crop_boxes(b: int, generator: torch.Generator, device: torch.device, min_scale: float,
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Boxes:
    """RandomResizedCrop's boxes on square images: area a fraction U(min_scale, 1) of the
    image, aspect ratio log-uniform in `ratio`; the first of CROP_TRIES draws that fits,
    else the whole image (torchvision's fallback on a square image). All tries are drawn at
    once, so the number of draws never depends on their values: [B, 2 * CROP_TRIES + 2]."""
    u = torch.rand(b, 2 * CROP_TRIES + 2, generator=generator, device=device)
    area = min_scale + (1 - min_scale) * u[:, :CROP_TRIES]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, CROP_TRIES:2 * CROP_TRIES])
    width, height = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (width <= 1) & (height <= 1)
    found, first = fits.any(1), fits.float().argmax(1)   # argmax: the first True (0 when none)
    width = torch.where(found, width.gather(1, first[:, None])[:, 0], 1.0)
    height = torch.where(found, height.gather(1, first[:, None])[:, 0], 1.0)
    left = (1 - width) * u[:, -2]
    top = (1 - height) * u[:, -1]
    return Boxes(left, top, width, height)


def crop_grid(boxes: Boxes, coords: torch.Tensor) -> torch.Tensor:
    """Map [B,H,W,2] (x, y) coordinates of the crop (grid_sample's align_corners=False
    convention: -1 and 1 are the crop's outer edges) to the same convention on the whole image."""
    scale = torch.stack([boxes.width, boxes.height], dim=1)[:, None, None, :]
    start = torch.stack([boxes.left, boxes.top], dim=1)[:, None, None, :]
    return 2 * start - 1 + (coords + 1) * scale


def output_coords(b: int, size: int, device: torch.device) -> torch.Tensor:
    """[B,size,size,2] (x, y) centres of the output pixels, align_corners=False convention."""
    line = (2 * torch.arange(size, device=device, dtype=torch.float32) + 1) / size - 1
    ys, xs = torch.meshgrid(line, line, indexing="ij")
    return torch.stack([xs, ys], dim=-1).expand(b, size, size, 2)


def sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of uint8 or float [B,C,H,W] at `grid` (whole-image coordinates,
    align_corners=False), as float in the images' 0..255 scale; edges repeated."""
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
