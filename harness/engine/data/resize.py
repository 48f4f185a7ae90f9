"""Resizing uint8 images: shorter side to the size (bilinear, antialiased), then a centre crop.
Used when image folders are decoded and on the device for every batch."""
from __future__ import annotations

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
