"""Augmentation of a batch on the device, every random draw from the run's generator (so a
run's stream is the same every time): `crop_flip`, what `data.augment: true` does."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: random crop from a reflect-padded copy (pad = size // 8) and a random horizontal flip."""
    b, _, h, w = x.shape
    pad = min(h, w) // 8
    device = x.device
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad > 0 else x
    top = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    left = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    rows = top[:, None] + torch.arange(h, device=device)
    cols_fwd = torch.arange(w, device=device)
    # A flip is just reading the crop's columns right to left, so crop and flip are one gather.
    cols = left[:, None] + torch.where(flip[:, None], cols_fwd.flip(0), cols_fwd)
    batch = torch.arange(b, device=device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced dims first: [B,H,W,C]
    return out.permute(0, 3, 1, 2).contiguous()
