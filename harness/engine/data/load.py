"""`load_dataset`: the recipe's data as seeded train/val/test splits of CPU uint8 tensors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.engine.data.cache import prepared_dataset
from harness.engine.data.host_rows import HostRows
from harness.engine.data.resize import stored_size
from harness.engine.data.sources import all_class_names
from harness.engine.data.splits import (Dataset, Split, cap_test, carve_test, resolve_classes, split_indices,
                                        TensorRows, subset, take)


def load_dataset(cfg: Any, workspace: Path, seed: int, residency: str = "device") -> Dataset:
    """Load cfg.dataset, pick the class subset and seeded train/val split; CPU uint8 tensors,
    or with `residency` "host" (plan.py) rows of the cache file, read a batch at a time.

    Per class of the chosen subset, after a shuffle seeded by `seed`:
    - val gets round(n * val_fraction) images (at least 1 when val_fraction > 0 and n >= 2,
      and never all of them); train gets the rest.
    - with train_per_class = k, train gets min(k, n - n_val) images and val gets
      min(that count, round(k * val_fraction / (1 - val_fraction))), so val keeps the same
      ratio to the capped train part.
    - an imagefolder with its own val/ keeps it as val (train is then only capped).
    - an imagefolder without test/ gets its test split carved off the train pool first, per
      class with the same fraction rule and a fixed seed (the same for every run seed).
    - a CSV dataset splits as an image folder does, its valid and test rows as val/ and test/.
    - with test_per_class = k, test keeps min(k, n) images of each class, drawn with that fixed
      seed too, so every run seed is scored on the same images.
    Fashion-MNIST's official train set feeds train + val; its t10k set is test. It is held
    at its native 28 px and every batch is resized on the device (`Split.size`): 60,000
    images at 224 px would be 9 GB of uint8.
    """
    workspace = Path(workspace)   # cfg: a validated recipe.DataConfig (the schema holds its rules)
    prepared = prepared_dataset(cfg, workspace)
    names: list[str] = list(prepared["class_names"])
    chosen = resolve_classes(cfg.classes, names)
    remap = torch.full((len(names),), -1, dtype=torch.int64)
    remap[torch.tensor(chosen, dtype=torch.int64)] = torch.arange(len(chosen))
    # rows of the cache file, read when a split is made (device) or per batch (host); without
    # a file (a read-only disk), rows of the tensor in memory
    images = prepared.get("host", {})
    x = {part: images.get(part, _lazy(prepared[f"{part}_x"])) for part in ("train", "val", "test")
         if f"{part}_x" in prepared}
    pool_x, pool_y = x["train"], prepared["train_y"]

    if "test" in x:
        test = subset(x["test"], prepared["test_y"], remap)
    else:
        test_idx, rest_idx = carve_test(pool_y, len(names), cfg.val_fraction)
        test = subset(take(pool_x, test_idx), pool_y[test_idx], remap)
        pool_x, pool_y = take(pool_x, rest_idx), pool_y[rest_idx]
    if cfg.test_per_class is not None:
        test = cap_test(test, len(chosen), cfg.test_per_class)

    has_val = "val" in x
    train_idx, val_idx = split_indices(
        pool_y, chosen, cfg.train_per_class, 0.0 if has_val else cfg.val_fraction, seed
    )
    train = Split(take(pool_x, train_idx), remap[pool_y[train_idx]])
    if has_val:
        val = subset(x["val"], prepared["val_y"], remap)
    else:
        val = Split(take(pool_x, val_idx), remap[pool_y[val_idx]])
    size, stored = cfg.image_size, stored_size(cfg)   # batches: resized to `stored`, cropped to `size`
    return Dataset(train=_final(train, size, stored, residency), val=_final(val, size, stored, residency),
                   test=_final(test, size, stored, residency), class_names=[names[c] for c in chosen])


def _lazy(x: torch.Tensor) -> TensorRows:
    return TensorRows(x, torch.arange(len(x)))


def _final(split: Split, size: int, stored: int, residency: str) -> Split:
    """The split as batches read it: its rows read or copied out once (only these), or left in
    the cache file for `host` residency. Reading rows (pread) rather than indexing the memory
    map keeps the file's pages out of the process (a map's read-ahead counts in its memory)."""
    x = split.x
    if isinstance(x, TensorRows) or (isinstance(x, HostRows) and residency != "host"):
        x = x.materialize()
    return Split(x, split.y, size, stored)


def class_names(cfg: Any) -> list[str]:
    """The recipe's class names in label order, found without decoding an image or writing
    a cache (a check made before anything is written)."""
    names = all_class_names(cfg)
    return [names[c] for c in resolve_classes(cfg.classes, names)]
