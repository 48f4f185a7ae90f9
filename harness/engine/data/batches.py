"""Batches for the training loop, on the split's device: shuffled full batches with
augmentation (`train_batches`), every example in order (`eval_batches`: resized to the split's
stored size, centre-cropped to its size); each normalised with the weights' statistics."""
from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from harness.engine.data.augment import crop_flip, random_crop_flip
from harness.engine.data.fastai_aug import fastai_augment
from harness.engine.data.randaugment import rand_augment
from harness.engine.data.resize import centre_crop, resize
from harness.engine.data.host_rows import Prefetcher, HostRows
from harness.engine.data.splits import Split
from harness.engine.input_stats import InputStats
from harness.errors import HarnessError


def to_device(split: Split, device: torch.device) -> Split:
    """The same split with x (still uint8) and y on `device`; host-resident images (a
    `HostRows`, data.residency host) stay where they are and travel a batch at a time."""
    x = split.x if isinstance(split.x, HostRows) else split.x.to(device)
    return Split(x, split.y.to(device), split.size, split.stored)


def _read(split: Split, idx) -> torch.Tensor:
    """Images `idx` as stored, on the labels' device: indexed there, or read from the host."""
    if isinstance(split.x, HostRows):
        return split.x[idx.cpu() if isinstance(idx, torch.Tensor) else idx].to(split.y.device)
    return split.x[idx]


def _read_ahead(split: Split, batches: Iterator) -> Iterator[tuple[object, torch.Tensor]]:
    """(idx, images as stored on the labels' device) for each idx of `batches`. Host-resident
    images are read one batch ahead on a thread (into pinned memory for a GPU), so reading
    overlaps the step; the copy to a GPU is asynchronous."""
    if not isinstance(split.x, HostRows):
        for idx in batches:
            yield idx, split.x[idx]
        return
    device = split.y.device
    batches = list(batches)
    on_host = _host_indices(batches)
    prefetch = Prefetcher(split.x, pin=device.type == "cuda")
    try:
        pending = None
        for idx, host_idx in zip(batches, on_host):
            future = prefetch.submit(host_idx)
            if pending is not None:
                yield pending[0], pending[1].result().to(device, non_blocking=True)
            pending = (idx, future)
        if pending is not None:
            yield pending[0], pending[1].result().to(device, non_blocking=True)
    finally:
        prefetch.close()


def _host_indices(batches: list) -> list:
    """The batches' indices on the CPU, read from a GPU once (one synchronisation per epoch,
    not one per step); slices stay slices."""
    tensors = [b for b in batches if isinstance(b, torch.Tensor)]
    if not tensors:
        return batches
    flat = torch.cat(tensors).cpu().split([len(b) for b in tensors])
    it = iter(flat)
    return [next(it) if isinstance(b, torch.Tensor) else b for b in batches]


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
    """Images `idx` of a split as evaluation sees them, on their device, still uint8: resized
    to split.stored, then centre-cropped to split.size (stored == size: resized only)."""
    return _eval_view(split, _stored_images(split, idx))


def _eval_view(split: Split, stored: torch.Tensor) -> torch.Tensor:
    return stored if split.size is None else centre_crop(stored, split.size)


def _stored_images(split: Split, idx, x: torch.Tensor | None = None) -> torch.Tensor:
    """Images `idx` (`x`, when already read) resized to split.stored (or split.size when unset), still uint8."""
    x = _read(split, idx) if x is None else x
    stored = split.stored or split.size
    if stored is not None and x.shape[-2:] != (stored, stored):
        x = resize(x, stored)
    return x


def _batch(split: Split, idx, stats: InputStats | None, x: torch.Tensor | None = None) -> torch.Tensor:
    """Images `idx` of a split (`x`, when already read) as evaluation sees them, normalised."""
    return normalize(_eval_view(split, _stored_images(split, idx, x)), stats)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full batches in one epoch (the last partial batch is dropped)."""
    _check_batch_size(batch_size)
    return n_train // batch_size


def train_indices(n: int, batch_size: int, generator: torch.Generator,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """The indices of every full batch of one shuffled epoch of `n` examples: one randperm drawn
    from `generator` on `device`, cut into `batch_size` slices (the last partial one dropped).
    The one order of an epoch, for its images (`train_batches`) as for a probe's cached
    features (harness/engine/probe.py): the generator's stream is the same by construction."""
    _check_batch_size(batch_size)
    order = torch.randperm(n, generator=generator, device=device)
    for step in range(n // batch_size):
        yield order[step * batch_size:(step + 1) * batch_size]


def train_batches(
    split: Split, batch_size: int, generator: torch.Generator, augment: str,
    stats: InputStats | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch of full batches: (normalised float32 [B,3,H,W], int64 labels),
    augmented as `augment` says (none | flip | fastai | randaugment, see augment.py)."""
    if augment not in AUGMENTS:
        raise HarnessError(f"data.augment: unknown {augment!r} (known: {', '.join(AUGMENTS)})")
    for idx, x in _read_ahead(split, train_indices(len(split.y), batch_size, generator, split.y.device)):
        yield _train_batch(split, idx, x, generator, augment, stats), split.y[idx]


AUGMENTS = ("none", "flip", "fastai", "randaugment")


def _train_batch(split: Split, idx, x: torch.Tensor, generator: torch.Generator, augment: str,
                 stats: InputStats | None) -> torch.Tensor:
    """Images `idx`, augmented from `generator` and normalised. `none` is the evaluation
    transform; `flip` crops before normalising (the same batch either way) and, when nothing is cropped
    for evaluation, its exact stream of draws; fastai and randaugment sample the stored image."""
    size = split.size or split.x.shape[-1]
    if augment == "none":
        return _batch(split, idx, stats)
    if augment == "flip":
        stored = _stored_images(split, idx)
        # crop and flip only move pixels: on the uint8 (maybe 1-channel) images they give the
        # same batch as on the normalised one, for a third of the work
        if stored.shape[-1] == size:
            return normalize(crop_flip(stored, generator), stats)
        return normalize(random_crop_flip(stored, size, generator), stats)
    if augment == "fastai":
        return normalize(fastai_augment(x, size, generator), stats)
    stats = stats or InputStats()
    fill = tuple(round(255 * m) for m in stats.mean) if split.x.shape[1] == 3 else (round(255 * sum(stats.mean) / 3),)
    return normalize(rand_augment(x, size, generator, fill), stats)


def eval_batches(split: Split, batch_size: int,
                 stats: InputStats | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in order, the last batch possibly partial; no augmentation."""
    _check_batch_size(batch_size)
    rows = (slice(start, start + batch_size) for start in range(0, len(split.y), batch_size))
    for idx, x in _read_ahead(split, rows):
        yield _batch(split, idx, stats, x), split.y[idx]


def _check_batch_size(batch_size: int) -> None:
    """A batch size below 1 would loop forever or divide by zero."""
    if batch_size < 1:
        raise HarnessError(f"data.batch_size: must be >= 1, got {batch_size}")
