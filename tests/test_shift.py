"""The corruptions are ImageNet-C's (Hendrycks & Dietterich 2019, imagenet_c/corruptions.py):
each one on a tiny RGB image against the published formula computed here with numpy and
scipy.ndimage on an HxWxC image in [0, 1], as the reference code holds it."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from harness.engine.shift import BLUR_MIN_SIZE, Corruption


def _rgb(size=16, seed=0) -> torch.Tensor:
    """Two images, [2,3,H,W] uint8, whose channels have clearly different means."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
    x[:, 0] = x[:, 0] // 4            # a dark red channel ...
    x[:, 2] = 255 - x[:, 2] // 4      # ... and a bright blue one
    x[:, :, 4:9, 4:9] = 250           # an edge for the blur and the JPEG to smear
    return x


def _hwc(x: torch.Tensor) -> np.ndarray:
    """One image [C,H,W] uint8 -> HxWxC float64 in [0, 1], as the reference reads it."""
    return x.permute(1, 2, 0).numpy().astype(np.float64) / 255.0


def _to_uint8(ref_hwc: np.ndarray) -> torch.Tensor:
    """The reference's np.clip(x, 0, 1) * 255, rounded to 8 bits as shift.py keeps it."""
    return torch.from_numpy(np.round(np.clip(ref_hwc, 0, 1) * 255).astype(np.uint8)).permute(2, 0, 1)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal but for a float32-vs-float64 rounding tie now and then (one grey level)."""
    diff = (out.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, diff


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_is_the_reference_formula(severity):
    x, c = _rgb(), Corruption("gaussian_noise", severity).value
    out = Corruption("gaussian_noise", severity).apply(x, torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double().numpy()
    for i in range(len(x)):
        ref = _hwc(x[i]) + c * noise[i].transpose(1, 2, 0)      # x + N(0, c^2) per pixel
        _close(out[i], _to_uint8(ref))


@pytest.mark.parametrize("severity", [1, 3, 5])
@pytest.mark.parametrize("size", [16, 100])
def test_gaussian_blur_is_scipys_gaussian_filter_per_channel(severity, size):
    """skimage.filters.gaussian(x, sigma, multichannel=True): scipy.ndimage.gaussian_filter
    with sigma 0 across channels, truncate=4.0, mode='nearest'."""
    x = _rgb(size)
    out = Corruption("gaussian_blur", severity).apply(x, torch.Generator())
    sigma = Corruption("gaussian_blur", severity).value * max(size, BLUR_MIN_SIZE) / 224
    for i in range(len(x)):
        ref = ndimage.gaussian_filter(_hwc(x[i]), sigma=(sigma, sigma, 0), truncate=4.0, mode="nearest")
        _close(out[i], _to_uint8(ref))


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_contrast_pulls_every_channel_towards_its_own_mean(severity):
    x, c = _rgb(), Corruption("contrast", severity).value
    out = Corruption("contrast", severity).apply(x, torch.Generator())
    for i in range(len(x)):
        img = _hwc(x[i])
        means = np.mean(img, axis=(0, 1), keepdims=True)         # the reference: one per channel
        _close(out[i], _to_uint8((img - means) * c + means))


def test_contrast_on_grey_images_is_unchanged():
    """One channel: its mean is the image's mean, as before the per-channel fix."""
    x = _rgb()[:, :1]
    out = Corruption("contrast", 2).apply(x, torch.Generator())
    f = x.double() / 255
    m = f.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(out, ((f - m) * 0.3 + m).clamp(0, 1).mul(255).round().to(torch.uint8))


@pytest.mark.parametrize("severity", [1, 5])
@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_is_pils_jpeg_at_the_reference_quality(severity, channels):
    """The reference saves with PIL at quality c and reads it back."""
    x = _rgb()[:, :channels]
    out = Corruption("jpeg", severity).apply(x, torch.Generator())
    for i in range(len(x)):
        buf = io.BytesIO()
        arr = x[i].permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if channels == 1 else arr).save(buf, "JPEG", quality=Corruption("jpeg", severity).value)
        ref = np.array(Image.open(buf))
        ref = torch.from_numpy(ref[None] if channels == 1 else ref.transpose(2, 0, 1))
        assert torch.equal(out[i], ref)
