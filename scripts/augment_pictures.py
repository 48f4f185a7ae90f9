"""The README's pictures of `data.augment`: one training batch per choice, docs/img/augment-<name>.png.

The batch: 8 Fashion-MNIST test images and 4 generated colour test cards (a grid, a disc and a
colour ramp show geometry and colour changes that grey clothes hide), at 64 px with crop_pct
0.875 (stored at 73 px) so `none` shows the evaluation crop; drawn by `train_batches` from one
seeded generator, as a run draws them.

    .venv/bin/python scripts/augment_pictures.py            # writes docs/img/augment-*.png
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.engine import data as data_mod  # noqa: E402
from harness.engine.data.fashion import SYSTEM_FASHION_DIR, decode_fashion  # noqa: E402
from harness.engine.data.resize import resize  # noqa: E402

SIZE, STORED, SEED = 64, 73, 0
AUGMENTS = ("none", "flip", "fastai", "randaugment")


def test_card(k: int, px: int = STORED) -> torch.Tensor:
    """uint8 [3,px,px]: a colour ramp, a black grid every px/6, a white disc off centre."""
    line = torch.linspace(0, 1, px)
    yy, xx = torch.meshgrid(line, line, indexing="ij")
    hue = (k * 0.25 + 0.5 * xx) % 1.0
    img = torch.stack([0.5 + 0.5 * torch.cos(2 * torch.pi * (hue - s)) for s in (0, 1 / 3, 2 / 3)]) * (0.4 + 0.6 * (1 - yy))
    grid = ((torch.arange(px) % (px // 6)) < 2)
    img[:, grid, :] = 0
    img[:, :, grid] = 0
    disc = (xx - 0.62) ** 2 + (yy - 0.38) ** 2 < 0.04
    img[:, disc] = 1
    return (img * 255).round().to(torch.uint8)


def batch_images() -> torch.Tensor:
    fashion = decode_fashion(SYSTEM_FASHION_DIR)["test_x"][:8]
    fashion = resize(fashion, STORED).expand(-1, 3, -1, -1)
    cards = torch.stack([test_card(k) for k in range(4)])
    return torch.cat([fashion, cards])


def picture(images: torch.Tensor, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stats = data_mod.InputStats()
    mean, std = torch.tensor(stats.mean).view(1, 3, 1, 1), torch.tensor(stats.std).view(1, 3, 1, 1)
    pixels = (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(2, 6, figsize=(9, 3.4))
    for ax, img in zip(axes.flat, pixels):
        ax.imshow(img, interpolation="nearest")
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    x = batch_images()
    split = data_mod.Split(x, torch.arange(len(x)), SIZE, STORED)
    out = ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    for augment in AUGMENTS:
        gen = torch.Generator().manual_seed(SEED)
        order = next(data_mod.train_indices(len(x), len(x), torch.Generator().manual_seed(SEED), x.device))
        images, _ = next(data_mod.train_batches(split, len(x), gen, augment))
        images = images[order.argsort()]   # back in the source order, so the pictures line up
        title = f"data.augment: {augment}  (64 px, crop_pct 0.875: stored at {STORED} px)"
        picture(images, title, out / f"augment-{augment}.png")
        print(out / f"augment-{augment}.png")


if __name__ == "__main__":
    main()
