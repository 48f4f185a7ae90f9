"""Resizing uint8 images: shorter side to the size (bilinear, antialiased), then a centre crop.
Used when image folders are decoded and on the device for every batch. Evaluation follows the
weights (timm's `crop_pct`): images are kept at `stored_size` and centre-cropped to image_size."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

_RESIZE_CHUNK = 2048  # images per interpolate call: bounds the float copy's memory


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N,C,h,w] -> [N,C,size,size]: shorter side to `size` (bilinear, antialiased), then center crop."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    chunks = []
    for start in range(0, len(x), _RESIZE_CHUNK):
        chunk = x[start:start + _RESIZE_CHUNK].float()
        chunk = F.interpolate(chunk, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        chunks.append(chunk.round().clamp(0, 255).to(torch.uint8))
    out = torch.cat(chunks) if chunks else x.new_empty((0, x.shape[1], new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return out[..., top:top + size, left:left + size].contiguous()


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """[..., h, w] -> [..., size, size] from the middle; the offset rounded as torchvision's
    CenterCrop rounds it (timm's eval transform uses that one)."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def stored_size(cfg: Any) -> int:
    """The size images are resized to before the centre crop to cfg.image_size (cfg: a
    DataConfig): floor(image_size / crop_pct), timm's `scale_size` (224 / 0.875 = 256). An
    unset crop_pct (a DataConfig validated outside a Recipe) is 1.0: no crop. The 1e-6 only
    absorbs float noise such as 224 / (224 / 232) = 231.99999999999997."""
    crop_pct = getattr(cfg, "crop_pct", None) or 1.0
    return max(cfg.image_size, math.floor(cfg.image_size / crop_pct + 1e-6))


def eval_transform(cfg: Any) -> str:
    """The evaluation transform in words, as a run records it (`data.eval_transform`)."""
    size, stored = cfg.image_size, stored_size(cfg)
    crop_pct = getattr(cfg, "crop_pct", None) or 1.0
    if stored == size:
        return f"resize {size}, no crop (crop_pct {crop_pct:g})"
    return f"resize {stored}, centre crop {size} (crop_pct {crop_pct:g})"
