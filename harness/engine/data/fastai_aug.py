"""`data.augment: fastai`: fastai's `aug_transforms()` defaults on the batch, after its
`RandomResizedCrop(size, min_scale=0.35)` (the fastbook recipe), every draw from the run's
generator on the batch's device.

fastai's semantics, per image (fastai/vision/augment.py):
- a random resized crop: area U(0.35, 1) of the image, aspect ratio log-U(3/4, 4/3);
- one affine map of the output coordinates (align_corners=True convention), flip @ rotate @
  zoom: flip x with p 0.5; rotate U(-10, 10) degrees with p 0.75; zoom U(1, 1.1) about a
  centre U(0, 1) of each axis with p 0.75;
- then a perspective warp: the corners moved by x_t, y_t ~ U(-0.2, 0.2), each with p 0.75
  (fastai's `_WarpCoord`: the homography taking the moved corners to the corners);
- sampled bilinearly with reflection padding;
- lighting in logit space: + logit(U(0.4, 0.6)) (brightness) then * exp(U(log 0.8, -log 0.8))
  (contrast), each with p 0.75.

One difference: fastai resizes the crop to the output size first (on the item), then samples
the affine map from that; here the crop, the affine map, the warp and the reflection are
composed into one grid, sampled once from the stored image (one interpolation, not two).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from harness.engine.data.augment import Boxes, crop_grid, resized_crop_boxes, sample

MIN_SCALE = 0.35
MAX_ROTATE = 10.0      # degrees
MAX_ZOOM = 1.1
MAX_WARP = 0.2
MAX_LIGHTING = 0.2
P_AFFINE = 0.75
P_LIGHTING = 0.75
_LOGIT_EPS = 1e-7      # fastai's logit clamp


@dataclass(frozen=True)
class FastaiDraw:
    """One batch's random parameters ([B] unless said), neutral where a transform is not applied."""
    boxes: Boxes
    flip: torch.Tensor        # bool
    degrees: torch.Tensor     # 0 when not applied
    zoom: torch.Tensor        # >= 1, 1 when not applied
    centre: torch.Tensor      # [B,2] the zoom's centre, fractions of x and y
    warp: torch.Tensor        # [B,2] (x_t, y_t), 0 when not applied
    brightness: torch.Tensor  # 0.5 when not applied
    contrast: torch.Tensor    # 1 when not applied


def draw_fastai(b: int, generator: torch.Generator, device: torch.device) -> FastaiDraw:
    """The batch's parameters: the crop boxes, then one [B,15] uniform draw for the rest."""
    boxes = resized_crop_boxes(b, generator, device, MIN_SCALE)
    u = torch.rand(b, 15, generator=generator, device=device)
    on = torch.cat([u[:, 8:12] < P_AFFINE, u[:, 12:14] < P_LIGHTING, u[:, 14:15] < 0.5], 1)
    warp = (2 * u[:, 0:2] - 1) * MAX_WARP * on[:, 0:2]
    degrees = (2 * u[:, 2] - 1) * MAX_ROTATE * on[:, 2]
    zoom = torch.where(on[:, 3], 1 + (MAX_ZOOM - 1) * u[:, 3], 1.0)
    brightness = torch.where(on[:, 4], 0.5 * (1 - MAX_LIGHTING) + MAX_LIGHTING * u[:, 6], 0.5)
    log_c = math.log(1 - MAX_LIGHTING)
    contrast = torch.where(on[:, 5], torch.exp(log_c - 2 * log_c * u[:, 7]), 1.0)
    return FastaiDraw(boxes, on[:, 6], degrees, zoom, u[:, 4:6], warp, brightness, contrast)


def affine_matrices(d: FastaiDraw) -> torch.Tensor:
    """[B,3,3] flip @ rotate @ zoom, acting on output coordinates (fastai's composition)."""
    b, device = len(d.flip), d.flip.device
    theta = d.degrees * (math.pi / 180)
    cos, sin = theta.cos(), theta.sin()
    s = 1 / d.zoom
    shift = (1 - s)[:, None] * (2 * d.centre - 1)
    flip = torch.eye(3, device=device).repeat(b, 1, 1)
    flip[:, 0, 0] = torch.where(d.flip, -1.0, 1.0)
    rotate = torch.eye(3, device=device).repeat(b, 1, 1)
    rotate[:, 0, 0], rotate[:, 0, 1], rotate[:, 1, 0], rotate[:, 1, 1] = cos, sin, -sin, cos
    zoom = torch.eye(3, device=device).repeat(b, 1, 1)
    zoom[:, 0, 0], zoom[:, 1, 1], zoom[:, 0, 2], zoom[:, 1, 2] = s, s, shift[:, 0], shift[:, 1]
    return flip @ rotate @ zoom


def warp_homographies(warp: torch.Tensor) -> torch.Tensor:
    """[B,3,3] the homography taking fastai's moved corners to the corners (-1,-1) ... (1,1)."""
    x_t, y_t = warp[:, 0], warp[:, 1]
    corners = _corners(warp.device)
    moved = torch.stack([torch.stack([-1 - y_t, -1 - x_t], 1), torch.stack([-1 + y_t, 1 + x_t], 1),
                         torch.stack([1 + y_t, -1 + x_t], 1), torch.stack([1 - y_t, 1 - x_t], 1)], 1)
    rows = []
    zero, one = torch.zeros_like(x_t), torch.ones_like(x_t)
    for i in range(4):   # p' = (a p + b q + c) / (g p + h q + 1), two equations per corner
        p, q = moved[:, i, 0], moved[:, i, 1]
        tx, ty = corners[i, 0], corners[i, 1]
        rows.append(torch.stack([p, q, one, zero, zero, zero, -tx * p, -tx * q], 1))
        rows.append(torch.stack([zero, zero, zero, p, q, one, -ty * p, -ty * q], 1))
    a = torch.stack(rows, 1)
    rhs = corners.reshape(1, 8).expand(len(warp), 8)
    coeffs = torch.linalg.solve_ex(a, rhs).result   # solve_ex: no error check, no CUDA sync
    return torch.cat([coeffs, one[:, None]], 1).view(-1, 3, 3)


@functools.lru_cache(maxsize=None)
def _corners(device: torch.device) -> torch.Tensor:
    # made once per device: a host->device copy per batch would synchronise every CUDA step
    return torch.tensor([[-1., -1.], [-1., 1.], [1., -1.], [1., 1.]], device=device)


def _reflect(c: torch.Tensor) -> torch.Tensor:
    """Coordinates folded into [-1, 1] by reflection about -1 and 1 (fastai's padding with
    align_corners=True: mirrored about the outermost pixel centres)."""
    y = torch.remainder(c + 1, 4)
    return torch.where(y > 2, 4 - y, y) - 1


def fastai_grid(d: FastaiDraw, size: int) -> torch.Tensor:
    """[B,size,size,2] where each output pixel samples the stored image (align_corners=False)."""
    b, device = len(d.flip), d.flip.device
    line = torch.linspace(-1, 1, size, device=device)
    ys, xs = torch.meshgrid(line, line, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)
    coords = points @ affine_matrices(d).transpose(1, 2)              # [B,N,3], last = 1
    coords = coords @ warp_homographies(d.warp).transpose(1, 2)
    coords = _reflect(coords[..., :2] / coords[..., 2:])
    # the crop resized to size x size: pixel centre k at -1 + (2k + 1) / size (align_corners=False)
    coords = (coords + 1) * (size - 1) / size + 1 / size - 1
    return crop_grid(d.boxes, coords.view(b, size, size, 2))


def lighting(x: torch.Tensor, d: FastaiDraw) -> torch.Tensor:
    """fastai's brightness then contrast, in logit space, on float [B,C,H,W] in 0..255."""
    logit = torch.logit(x / 255, eps=_LOGIT_EPS)
    logit = (logit + torch.logit(d.brightness)[:, None, None, None]) * d.contrast[:, None, None, None]
    return torch.sigmoid(logit) * 255


def fastai_augment(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Stored uint8 [B,C,H,W] (square) -> augmented float [B,C,size,size] in 0..255."""
    d = draw_fastai(len(x), generator, x.device)
    return lighting(sample(x, fastai_grid(d, size)), d)
