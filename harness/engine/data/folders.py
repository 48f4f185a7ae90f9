"""Image folders: scanning the class folders (flat, or under train/ val/ test/), their
fingerprint, decoding every image once to one size (decode.py, in parallel, into the cache's
file: rows.py), and `load_folder` (a second test folder, e.g. for accuracy under shift)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from harness.engine.data.decode import CHUNK_SIZE, decode_rows
from harness.engine.data.rows import RowArray, RowFile
from harness.engine.data.splits import Split
from harness.errors import HarnessError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

Layout = dict[str, list[tuple[Path, int]]]  # split name -> [(image file, class index)]
ImageRows = RowFile | RowArray              # where decoded images are written


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
    found = {d.name: d for d in _class_dirs(base, field)}
    if set(found) != set(wanted):
        extra, missing = sorted(set(found) - set(wanted)), sorted(set(wanted) - set(found))
        said = "; ".join(part for part in (f"not training classes: {', '.join(extra)}" if extra else "",
                                           f"missing: {', '.join(missing)}" if missing else "") if part)
        raise HarnessError(f"{field}: the class folders of {base} differ from the training classes ({said})")
    paths, labels = [], []
    for name, label in sorted(wanted.items(), key=lambda kv: kv[1]):
        files = sorted(p for p in found[name].iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise HarnessError(f"{field}: class folder {found[name]} has no images")
        paths += files
        labels += [label] * len(files)
    rows = RowArray(len(paths))   # a test-time folder: held in memory, not cached
    for block in decode_rows(paths, image_size, field):
        rows.append(block)
    return Split(torch.from_numpy(rows.array()), torch.tensor(labels, dtype=torch.int64), image_size)


def scan_imagefolder(root: str | None) -> tuple[Layout, list[str]]:
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


def _class_dirs(folder: Path, field: str = "data.root") -> list[Path]:
    """Visible subfolders, sorted by name (their names are the class names). Errors name `field`."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    for p in entries:
        if p.is_symlink() and not p.exists():   # may be a class folder: never leave one out silently
            raise HarnessError(f"{field}: {p} is a broken symbolic link")
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


def fingerprint(layout: Layout) -> str:
    """Hash of every file's path, size and mtime: any edit to the folder changes it."""
    digest = hashlib.sha256()
    for part in sorted(layout):
        for path, label in layout[part]:
            stat = path.stat()
            digest.update(f"{part}|{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decode_imagefolder(layout: Layout, names: list[str], image_size: int, rows: ImageRows, *,
                       workers: int | None = None, chunk_size: int = CHUNK_SIZE) -> dict[str, Any]:
    """Decode every image of `layout` at `image_size` into `rows` (harness/engine/data/rows.py),
    part by part in the layout's order, in parallel (harness/engine/data/decode.py); returns
    {"class_names", "<part>_y"...}, the labels in that same order. All images stay 1-channel
    only if every image of the dataset is grayscale (the rows' rule)."""
    paths = [path for items in layout.values() for path, _ in items]
    for block in decode_rows(paths, image_size, "data.root", workers, chunk_size):
        rows.append(block)
    prepared: dict[str, Any] = {"class_names": list(names)}
    for part, items in layout.items():
        prepared[f"{part}_y"] = torch.tensor([label for _, label in items], dtype=torch.int64)
    return prepared
