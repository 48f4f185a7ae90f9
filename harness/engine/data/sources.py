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
    """A dataset's input, before decoding: what the decoded-data cache is keyed by, and how to
    decode it. `decode()` returns the full dataset as uint8 tensors: {"class_names", "train_x",
    "train_y"} and, when the input has them, "val_x"/"val_y" and "test_x"/"test_y"."""
    dataset: str                          # the recipe's data.dataset
    identity: str                         # which files: their path (and an image folder's fingerprint)
    size_key: str                         # "native", or "<N>px" when decoded to one size
    decode: Callable[[], dict[str, Any]]


def open_source(cfg: Any, workspace: Path) -> Source:
    """The recipe's input (cfg: a validated recipe.DataConfig), found but not decoded; a missing
    one is a one-line error."""
    if cfg.dataset == "fashion-mnist":
        files_dir = fashion.find_fashion(cfg.root, workspace)
        return Source(cfg.dataset, f"{files_dir.resolve()}", "native", partial(fashion.decode_fashion, files_dir))
    if cfg.dataset == "csv":   # a CSV of image paths and labels: decoded as an image folder is
        layout, names = csvfile.scan_csv(cfg)
        return Source(cfg.dataset, csvfile.csv_identity(cfg.csv, layout), f"{stored_size(cfg)}px",
                      partial(csvfile.decode_csv, layout, names, stored_size(cfg)))
    layout, names = folders.scan_imagefolder(cfg.root)
    identity = f"{Path(cfg.root).resolve()}|{folders.fingerprint(layout)}"
    # images of many sizes: decoded once to one size
    return Source(cfg.dataset, identity, f"{stored_size(cfg)}px",
                  partial(folders.decode_imagefolder, layout, names, stored_size(cfg)))


def all_class_names(cfg: Any) -> list[str]:
    """Every class of the recipe's input in label order, found without decoding an image."""
    if cfg.dataset == "fashion-mnist":
        return fashion.CLASS_NAMES_FASHION
    if cfg.dataset == "csv":
        return csvfile.scan_csv(cfg)[1]
    return folders.scan_imagefolder(cfg.root)[1]
