"""Fashion-MNIST: finding its four IDX files (an explicit root, the workspace, the system copy,
or a torchvision download) and reading them."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import HarnessError

CLASS_NAMES_FASHION = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def find_fashion(root: str | None, workspace: Path) -> Path:
    """The first folder holding the four idx .gz files; tries a torchvision download last."""
    if root is not None:  # an explicit root is a promise: never fall back to another copy
        for folder in (Path(root), Path(root) / "FashionMNIST" / "raw"):
            if all((folder / name).is_file() for name in FASHION_FILES.values()):
                return folder
        raise HarnessError(f"data.root: {root} does not hold the four Fashion-MNIST idx .gz files "
                           f"({', '.join(FASHION_FILES.values())})")
    candidates = []
    workspace_dir = workspace / "data" / "fashion-mnist"
    download_dir = workspace / "data" / "FashionMNIST" / "raw"
    candidates += [workspace_dir, download_dir, SYSTEM_FASHION_DIR]
    for folder in candidates:
        if all((folder / name).is_file() for name in FASHION_FILES.values()):
            return folder
    try:
        _download_fashion(workspace / "data")
    except Exception:  # offline machines are normal here; the error below says what to do
        pass
    if all((download_dir / name).is_file() for name in FASHION_FILES.values()):
        return download_dir
    raise HarnessError(
        f"data.root: Fashion-MNIST not found (looked in {', '.join(str(c) for c in candidates)}) "
        f"and the download failed; apt-get install dataset-fashion-mnist, "
        f"or put the four idx .gz files in {workspace_dir}"
    )


def _download_fashion(dest: Path) -> None:
    """Let torchvision fetch the raw files into dest/FashionMNIST/raw (needs internet)."""
    from torchvision.datasets import FashionMNIST

    FashionMNIST(root=str(dest), train=True, download=True)


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzip idx file (uint8 payload) into an array of its declared shape."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise HarnessError(f"data.root: cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise HarnessError(f"data.root: {path} is not a uint8 idx file")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise HarnessError(f"data.root: {path} is truncated (header says {dims})")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


def count_images(files_dir: Path) -> tuple[int, int]:
    """(images, pixels per side) that the train and t10k image files declare, from their idx
    headers alone (what a memory plan needs before anything is decoded)."""
    total, side = 0, 0
    for part in ("train", "test"):
        path = files_dir / FASHION_FILES[f"{part}_x"]
        try:
            with gzip.open(path, "rb") as f:
                header = f.read(16)
        except (OSError, EOFError) as exc:
            raise HarnessError(f"data.root: cannot read {path}: {exc}") from None
        if len(header) < 16 or header[:4] != bytes([0, 0, 0x08, 3]):
            raise HarnessError(f"data.root: {path} is not a uint8 idx file of images")
        n, height, width = (int(d) for d in np.frombuffer(header, dtype=">i4", count=3, offset=4))
        total, side = total + n, max(side, height, width)
    return total, side


def decode_fashion(files_dir: Path, rows: Any) -> dict[str, Any]:
    """Read the four idx files: the uint8 [N,1,28,28] images into `rows` (rows.py), train then
    test; returns {"class_names", "train_y", "test_y"}, int64 labels."""
    prepared: dict[str, Any] = {"class_names": list(CLASS_NAMES_FASHION)}
    for part in ("train", "test"):
        images = _read_idx(files_dir / FASHION_FILES[f"{part}_x"])
        labels = _read_idx(files_dir / FASHION_FILES[f"{part}_y"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise HarnessError(f"data.root: idx files for {part} in {files_dir} do not match")
        rows.append(images[:, None])
        prepared[f"{part}_y"] = torch.from_numpy(labels).to(torch.int64)
    return prepared
