"""A dataset as the training loop sees it (`Split`, `Dataset`), and how the pool is cut into
splits: the class subset (`resolve_classes`, `subset`), the seeded per-class train/val split
(`split_indices`), a test split carved off with a fixed seed (`carve_test`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.engine.data.host_rows import HostRows
from harness.errors import HarnessError

_TEST_SPLIT_SEED = 0  # a test split carved from train is the same for every run seed


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W], C = 1 or 3
    y: torch.Tensor  # int64 [N], labels 0..n_classes-1
    size: int | None = None   # batches come out at size x size (resized per batch); None: as stored
    stored: int | None = None  # resized to this first, then centre-cropped to size (eval); None: size


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    class_names: list[str]


def resolve_classes(classes: list[str | int] | None, names: list[str]) -> list[int]:
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


@dataclass(frozen=True)
class TensorRows:
    """Rows of an image tensor not yet copied out (a memory-mapped cache's: indexing copies),
    so a chain of subsets copies only the rows that end in a split (`materialize`)."""
    x: torch.Tensor
    rows: torch.Tensor

    def take(self, idx) -> "TensorRows":
        return TensorRows(self.x, self.rows[idx])

    def materialize(self) -> torch.Tensor:
        return self.x[self.rows]


def take(x, idx):
    """Rows `idx` of a split's images: indexed (a tensor), or a lazy subset (`TensorRows`, or
    host-resident `HostRows`: nothing read until a batch needs it)."""
    return x.take(idx) if isinstance(x, (HostRows, TensorRows)) else x[idx]


def subset(x: torch.Tensor, y: torch.Tensor, remap: torch.Tensor) -> Split:
    """Keep the examples of the chosen classes (remap >= 0) with their new labels."""
    keep = (remap[y] >= 0).nonzero().flatten()
    return Split(take(x, keep), remap[y[keep]])


def _holdout_count(n: int, fraction: float) -> int:
    """How many of a class's n examples go to a held-out split: at least 1, never all."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def carve_test(y: torch.Tensor, n_classes: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def split_indices(
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


def cap_test(split: Split, n_classes: int, cap: int) -> Split:
    """At most `cap` examples of each of the n_classes, drawn with the test split's fixed seed
    (the same for every run seed), in the split's own order."""
    keep, _ = split_indices(split.y, list(range(n_classes)), cap, 0.0, _TEST_SPLIT_SEED)
    return Split(take(split.x, keep), split.y[keep], split.size, split.stored)
