"""Where a dataset comes from: the recipe's `data.dataset` as a `Source`, what the decoded-data
cache (harness/engine/data/cache.py) keys and decodes. A new kind of input is one module beside
fashion.py, folders.py and csvfile.py, and one branch in `open_source` and `all_class_names`."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from harness.engine.data import csvfile, fashion, folders
from harness.engine.data.resize import stored_size


@dataclass(frozen=True)
class Source:
    """A dataset's input, before decoding: what the decoded-data cache is keyed by, how to
    decode it, and how big it will be (for a memory plan made before decoding: at most
    n_images * channels * stored_size**2 bytes of uint8).

    `decode(rows)` writes every image, part by part (train, then val / test where the input
    has them), into `rows` (rows.py: the cache's .npy file, or memory) and returns
    {"class_names", "train_y"} and "val_y" / "test_y", the labels in the order written."""
    dataset: str                          # the recipe's data.dataset
    identity: str                         # which files: their path (and an image folder's fingerprint)
    size_key: str                         # "native", or "<N>px" when decoded to one size
    decode: Callable[[Any], dict[str, Any]]
    n_images: int                         # how many images decode() writes
    stored_size: int | None               # pixels per side as stored (None: not known before decoding)
    channels: int                         # an upper bound: 3, or 1 for a source known to be grey


def open_source(cfg: Any, workspace: Path) -> Source:
    """The recipe's input (cfg: a validated recipe.DataConfig), found but not decoded; a missing
    one is a one-line error."""
    if cfg.dataset == "fashion-mnist":
        files_dir = fashion.find_fashion(cfg.root, workspace)
        n_images, side = fashion.count_images(files_dir)
        return Source(cfg.dataset, f"{files_dir.resolve()}", "native", partial(fashion.decode_fashion, files_dir),
                      n_images=n_images, stored_size=side, channels=1)
    if cfg.dataset == "csv":   # a CSV of image paths and labels: decoded as an image folder is
        layout, names = csvfile.scan_csv(cfg)
        return layout_source(cfg.dataset, csvfile.csv_identity(cfg.csv, layout), layout, names, stored_size(cfg),
                             decode=csvfile.decode_csv)
    layout, names = folders.scan_imagefolder(cfg.root)
    identity = f"{Path(cfg.root).resolve()}|{folders.fingerprint(layout)}"
    return layout_source(cfg.dataset, identity, layout, names, stored_size(cfg))


def layout_source(dataset: str, identity: str, layout: folders.Layout, names: list[str], image_size: int,
                  decode: Callable[..., dict[str, Any]] | None = None) -> Source:
    """Image files of many sizes (a folder's, a CSV's), decoded once to `image_size` (the
    stored size: image_size / crop_pct)."""
    decode = decode or folders.decode_imagefolder   # looked up at call time
    return Source(dataset, identity, f"{image_size}px", partial(decode, layout, names, image_size),
                  n_images=sum(len(items) for items in layout.values()), stored_size=image_size, channels=3)


def all_class_names(cfg: Any) -> list[str]:
    """Every class of the recipe's input in label order, found without decoding an image."""
    if cfg.dataset == "fashion-mnist":
        return fashion.CLASS_NAMES_FASHION
    if cfg.dataset == "csv":
        return csvfile.scan_csv(cfg)[1]
    return folders.scan_imagefolder(cfg.root)[1]
