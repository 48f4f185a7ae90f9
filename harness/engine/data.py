"""Datasets as uint8 tensors (Fashion-MNIST, image folders), seeded splits, and batches for the training loop."""

from __future__ import annotations

import functools

import gzip
import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from harness.engine.files import torch_save_atomic
from harness.engine.input_stats import InputStats
from harness.errors import HarnessError

CLASS_NAMES_FASHION = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_CACHE_VERSION = 2  # bump when the cached dict's layout changes, so old files are ignored
_TEST_SPLIT_SEED = 0  # a test split carved from train is the same for every run seed
_RESIZE_CHUNK = 2048  # images per interpolate call: bounds the float copy's memory

# Prepared full datasets by cache key, so a second load in the same process skips the disk too.
_MEMORY_CACHE: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W], C = 1 or 3
    y: torch.Tensor  # int64 [N], labels 0..n_classes-1
    size: int | None = None   # batches come out at size x size (resized per batch); None: as stored


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    class_names: list[str]


# ---------------------------------------------------------------- loading


def load_dataset(cfg: Any, workspace: Path, seed: int) -> Dataset:
    """Load cfg.dataset, pick the class subset and seeded train/val split; CPU uint8 tensors.

    Per class of the chosen subset, after a shuffle seeded by `seed`:
    - val gets round(n * val_fraction) images (at least 1 when val_fraction > 0 and n >= 2,
      and never all of them); train gets the rest.
    - with train_per_class = k, train gets min(k, n - n_val) images and val gets
      min(that count, round(k * val_fraction / (1 - val_fraction))), so val keeps the same
      ratio to the capped train part.
    - an imagefolder with its own val/ keeps it as val (train is then only capped).
    - an imagefolder without test/ gets its test split carved off the train pool first, per
      class with the same fraction rule and a fixed seed (the same for every run seed).
    Fashion-MNIST's official train set feeds train + val; its t10k set is test. It is held
    at its native 28 px and every batch is resized on the device (`Split.size`): 60,000
    images at 224 px would be 9 GB of uint8.
    """
    workspace = Path(workspace)   # cfg: a validated recipe.DataConfig (the schema holds its rules)
    prepared = _prepared_dataset(cfg, workspace)
    names: list[str] = list(prepared["class_names"])
    chosen = _resolve_classes(cfg.classes, names)
    remap = torch.full((len(names),), -1, dtype=torch.int64)
    remap[torch.tensor(chosen, dtype=torch.int64)] = torch.arange(len(chosen))
    pool_x, pool_y = prepared["train_x"], prepared["train_y"]

    if "test_x" in prepared:
        test = _subset(prepared["test_x"], prepared["test_y"], remap)
    else:
        test_idx, rest_idx = _carve_test(pool_y, len(names), cfg.val_fraction)
        test = _subset(pool_x[test_idx], pool_y[test_idx], remap)
        pool_x, pool_y = pool_x[rest_idx], pool_y[rest_idx]

    has_val = "val_x" in prepared
    train_idx, val_idx = _split_indices(
        pool_y, chosen, cfg.train_per_class, 0.0 if has_val else cfg.val_fraction, seed
    )
    train = Split(pool_x[train_idx], remap[pool_y[train_idx]])
    if has_val:
        val = _subset(prepared["val_x"], prepared["val_y"], remap)
    else:
        val = Split(pool_x[val_idx], remap[pool_y[val_idx]])
    size = cfg.image_size
    return Dataset(train=Split(train.x, train.y, size), val=Split(val.x, val.y, size),
                   test=Split(test.x, test.y, size), class_names=[names[c] for c in chosen])


def class_names(cfg: Any) -> list[str]:
    """The recipe's class names in label order, found without decoding an image or writing
    a cache (a check made before anything is written)."""
    names = CLASS_NAMES_FASHION if cfg.dataset == "fashion-mnist" else _scan_imagefolder(cfg.root)[1]
    return [names[c] for c in _resolve_classes(cfg.classes, names)]


def folder_name(class_name: str) -> str:
    """The folder a class's images sit in: its name, a '/' (Fashion-MNIST's T-shirt/top) as '_'."""
    return class_name.replace("/", "_")


def load_folder(root: str | Path, class_names: list[str], image_size: int, field: str) -> Split:
    """An image folder with one subfolder per training class (`folder_name`), as a labelled
    split at `image_size`; its classes must be exactly the training classes. Errors name `field`."""
    base = Path(root)
    if not base.is_dir():
        raise HarnessError(f"{field}: {base} is not a directory")
    wanted = {folder_name(n): i for i, n in enumerate(class_names)}
    try:
        found = {d.name: d for d in _class_dirs(base)}
    except HarnessError as e:
        raise HarnessError(f"{field}{str(e).removeprefix('data.root')}") from None
    if set(found) != set(wanted):
        extra, missing = sorted(set(found) - set(wanted)), sorted(set(wanted) - set(found))
        said = "; ".join(part for part in (f"not training classes: {', '.join(extra)}" if extra else "",
                                           f"missing: {', '.join(missing)}" if missing else "") if part)
        raise HarnessError(f"{field}: the class folders of {base} differ from the training classes ({said})")
    images, labels = [], []
    for name, label in sorted(wanted.items(), key=lambda kv: kv[1]):
        files = sorted(p for p in found[name].iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise HarnessError(f"{field}: class folder {found[name]} has no images")
        for path in files:
            try:
                images.append(_decode_image(path, image_size))
            except HarnessError as e:
                raise HarnessError(f"{field}{str(e).removeprefix('data.root')}") from None
            labels.append(label)
    if any(t.shape[0] == 3 for t in images):
        images = [t.expand(3, -1, -1) for t in images]
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64), image_size)


def _resolve_classes(classes: list[str | int] | None, names: list[str]) -> list[int]:
    """Turn cfg.classes (names or indices, or None for all) into dataset class indices, in the given order."""
    if classes is None:
        return list(range(len(names)))
    if len(classes) == 0:
        raise HarnessError("data.classes: is empty (leave it unset for all classes)")
    chosen: list[int] = []
    for item in classes:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise HarnessError(f"data.classes: {item!r} is neither a class name nor an index")
        if isinstance(item, int):
            if not 0 <= item < len(names):
                raise HarnessError(f"data.classes: class index {item} out of range (0..{len(names) - 1})")
            index = item
        elif item in names:
            index = names.index(item)
        else:
            known = ", ".join(repr(n) for n in names)
            raise HarnessError(f"data.classes: unknown class {item!r} (known: {known})")
        if index in chosen:
            raise HarnessError(f"data.classes: duplicate class {names[index]!r}")
        chosen.append(index)
    return chosen


def _subset(x: torch.Tensor, y: torch.Tensor, remap: torch.Tensor) -> Split:
    """Keep the examples of the chosen classes (remap >= 0) with their new labels."""
    keep = (remap[y] >= 0).nonzero().flatten()
    return Split(x[keep], remap[y[keep]])


def _holdout_count(n: int, fraction: float) -> int:
    """How many of a class's n examples go to a held-out split: at least 1, never all."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def _carve_test(y: torch.Tensor, n_classes: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split pool indices into (test, rest), stratified over all classes with a fixed seed."""
    generator = torch.Generator().manual_seed(_TEST_SPLIT_SEED)
    test_parts, rest_parts = [], []
    for c in range(n_classes):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = _holdout_count(len(idx), fraction)
        test_parts.append(idx[:n_test])
        rest_parts.append(idx[n_test:])
    return _sorted_cat(test_parts), _sorted_cat(rest_parts)


def _split_indices(
    y: torch.Tensor, chosen: list[int], cap: int | None, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool indices for (train, val): per chosen class, seeded shuffle, train first (capped), then val."""
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for c in chosen:
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = _holdout_count(len(idx), val_fraction)
        if cap is not None and n_val > 0:
            # Val keeps the train:val ratio of val_fraction relative to the capped train part.
            n_val = min(n_val, max(1, round(cap * val_fraction / (1 - val_fraction))))
        n_train = len(idx) - n_val if cap is None else min(cap, len(idx) - n_val)
        train_parts.append(idx[:n_train])
        val_parts.append(idx[n_train:n_train + n_val])
    return _sorted_cat(train_parts), _sorted_cat(val_parts)


def _sorted_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate index tensors and keep the dataset's own order (no grouping by class)."""
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(parts).sort().values


# ---------------------------------------------------------------- cache


def _prepared_dataset(cfg: Any, workspace: Path) -> dict[str, Any]:
    """The full decoded dataset at cfg.image_size, from memory, the disk cache, or decoding."""
    if cfg.dataset == "fashion-mnist":
        files_dir = _find_fashion(cfg.root, workspace)
        identity = f"{files_dir.resolve()}"
        decode = partial(_decode_fashion, files_dir)
        size_key = "native"
    else:
        layout, names = _scan_imagefolder(cfg.root)
        identity = f"{Path(cfg.root).resolve()}|{_fingerprint(layout)}"
        decode = partial(_decode_imagefolder, layout, names, cfg.image_size)
        size_key = f"{cfg.image_size}px"   # images of many sizes: decoded once to one size

    digest = hashlib.sha256(f"{_CACHE_VERSION}|{cfg.dataset}|{size_key}|{identity}".encode()).hexdigest()
    key = f"{cfg.dataset}-{size_key}-{digest[:16]}"
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = workspace / "cache" / f"{key}.pt"
    prepared = _read_cache(path)
    if prepared is None:
        prepared = decode()
        _write_cache(path, prepared)
    _MEMORY_CACHE[key] = prepared
    return prepared


def _read_cache(path: Path) -> dict[str, Any] | None:
    """Load a cache file, or None when it is missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # a damaged cache is only a miss: decoding again repairs it
        return None


def _write_cache(path: Path, prepared: dict[str, Any]) -> None:
    """Save atomically: write a temp file in the same folder, then rename over the target."""
    try:
        torch_save_atomic(prepared, path, mode=0o644)  # a cache is as readable as the data
    except OSError as exc:  # the data is already in memory; a missing cache only costs time
        warnings.warn(f"could not write dataset cache {path}: {exc}", stacklevel=2)


# ---------------------------------------------------------------- fashion-mnist


def _find_fashion(root: str | None, workspace: Path) -> Path:
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


def _decode_fashion(files_dir: Path) -> dict[str, Any]:
    """Read the four idx files into uint8 [N,1,28,28] images and int64 labels."""
    prepared: dict[str, Any] = {"class_names": list(CLASS_NAMES_FASHION)}
    for part in ("train", "test"):
        images = _read_idx(files_dir / FASHION_FILES[f"{part}_x"])
        labels = _read_idx(files_dir / FASHION_FILES[f"{part}_y"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise HarnessError(f"data.root: idx files for {part} in {files_dir} do not match")
        prepared[f"{part}_x"] = torch.from_numpy(images).unsqueeze(1)
        prepared[f"{part}_y"] = torch.from_numpy(labels).to(torch.int64)
    return prepared


# ---------------------------------------------------------------- imagefolder


Layout = dict[str, list[tuple[Path, int]]]  # split name -> [(image file, class index)]


def _scan_imagefolder(root: str | None) -> tuple[Layout, list[str]]:
    """Find the class folders (flat, or under train/ val/ test/) and their image files."""
    if root is None:
        raise HarnessError("data.root: required for dataset 'imagefolder'")
    base = Path(root)
    if not base.exists():
        raise HarnessError(f"data.root: {base} does not exist")
    if not base.is_dir():
        raise HarnessError(f"data.root: {base} is not a directory")
    train_dir = base / "train"
    split_layout = train_dir.is_dir() and bool(_class_dirs(train_dir))
    names = [d.name for d in _class_dirs(train_dir if split_layout else base)]
    if not names:
        raise HarnessError(f"data.root: no class folders in {base}")
    if not split_layout:
        return {"train": _scan_split(base, names, must_have_all=True)}, names
    layout = {"train": _scan_split(train_dir, names, must_have_all=True)}
    for part in ("val", "test"):
        if (base / part).is_dir():
            layout[part] = _scan_split(base / part, names, must_have_all=False)
    return layout, names


def _class_dirs(folder: Path) -> list[Path]:
    """Visible subfolders, sorted by name (their names are the class names)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    for p in entries:
        if p.is_symlink() and not p.exists():   # may be a class folder: never leave one out silently
            raise HarnessError(f"data.root: {p} is a broken symbolic link")
    return sorted(p for p in entries if p.is_dir())


def _scan_split(folder: Path, names: list[str], must_have_all: bool) -> list[tuple[Path, int]]:
    """Image files of every class folder in `folder`; val/ and test/ may lack some classes."""
    items: list[tuple[Path, int]] = []
    for class_dir in _class_dirs(folder):
        if class_dir.name not in names:
            raise HarnessError(f"data.root: class folder {class_dir} has no counterpart in the train classes")
        # Hidden files are skipped: macOS '._x.jpg' companions are not images.
        files = sorted(
            p for p in class_dir.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            and (p.is_file() or (p.is_symlink() and not p.exists()))   # a broken link: refused below
        )
        for p in files:
            if not p.exists():
                raise HarnessError(f"data.root: cannot read image {p}: a broken symbolic link")
        if not files:
            raise HarnessError(f"data.root: class folder {class_dir} has no images")
        items += [(p, names.index(class_dir.name)) for p in files]
    if must_have_all and not items:
        raise HarnessError(f"data.root: no images in {folder}")
    return items


def _fingerprint(layout: Layout) -> str:
    """Hash of every file's path, size and mtime: any edit to the folder changes it."""
    digest = hashlib.sha256()
    for part in sorted(layout):
        for path, label in layout[part]:
            stat = path.stat()
            digest.update(f"{part}|{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode_image(path: Path, image_size: int) -> torch.Tensor:
    """One image file as uint8 [C,S,S], C = 1 for grayscale modes, else 3."""
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise HarnessError(f"data.root: cannot read image {path}: {reason}") from None
    array = np.array(img, dtype=np.uint8)  # a writable copy, so torch can own it
    tensor = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return _resize(tensor.unsqueeze(0), image_size)[0]


def _decode_imagefolder(layout: Layout, names: list[str], image_size: int) -> dict[str, Any]:
    """Decode every image; all stay 1-channel only if every image of the dataset is grayscale."""
    decoded = {part: [_decode_image(path, image_size) for path, _ in items] for part, items in layout.items()}
    any_color = any(t.shape[0] == 3 for images in decoded.values() for t in images)
    prepared: dict[str, Any] = {"class_names": list(names)}
    for part, images in decoded.items():
        if any_color:
            images = [t.expand(3, -1, -1) for t in images]
        prepared[f"{part}_x"] = torch.stack(images)
        prepared[f"{part}_y"] = torch.tensor([label for _, label in layout[part]], dtype=torch.int64)
    return prepared


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
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


# ---------------------------------------------------------------- batches


def to_device(split: Split, device: torch.device) -> Split:
    """The same split with x (still uint8) and y on `device`."""
    return Split(split.x.to(device), split.y.to(device), split.size)


def normalize(x: torch.Tensor, stats: InputStats | None = None) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32 [B,3,H,W]: scaled to [0,1], then the weights' mean/std
    per channel (ImageNet's by default); grey is replicated to three channels."""
    x = x.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    stats = stats or InputStats()
    mean, std = _mean_std(x.device, tuple(stats.mean), tuple(stats.std))
    return (x - mean) / std


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: a host->device copy per batch would synchronise every CUDA step
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))


def raw_images(split: Split, idx) -> torch.Tensor:
    """Images `idx` of a split, resized to split.size on their device, still uint8."""
    x = split.x[idx]
    if split.size is not None and x.shape[-2:] != (split.size, split.size):
        x = _resize(x, split.size)
    return x


def _batch(split: Split, idx, stats: InputStats | None) -> torch.Tensor:
    """Images `idx` of a split, resized to split.size on their device, normalised."""
    return normalize(raw_images(split, idx), stats)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full batches in one epoch (the last partial batch is dropped)."""
    _check_batch_size(batch_size)
    return n_train // batch_size


def train_batches(
    split: Split, batch_size: int, generator: torch.Generator, augment: bool,
    stats: InputStats | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch of full batches: (normalised float32 [B,3,H,W], int64 labels)."""
    _check_batch_size(batch_size)
    n = len(split.y)
    order = torch.randperm(n, generator=generator, device=split.x.device)
    for step in range(n // batch_size):
        idx = order[step * batch_size:(step + 1) * batch_size]
        images = _batch(split, idx, stats)
        if augment:
            images = _augment(images, generator)
        yield images, split.y[idx]


def eval_batches(split: Split, batch_size: int,
                 stats: InputStats | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in order, the last batch possibly partial; no augmentation."""
    _check_batch_size(batch_size)
    for start in range(0, len(split.y), batch_size):
        rows = slice(start, start + batch_size)
        yield _batch(split, rows, stats), split.y[rows]


def _check_batch_size(batch_size: int) -> None:
    """A batch size below 1 would loop forever or divide by zero."""
    if batch_size < 1:
        raise HarnessError(f"data.batch_size: must be >= 1, got {batch_size}")


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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
