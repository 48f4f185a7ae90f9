"""The decoded-data cache: a full decoded dataset, kept in memory for the process and on disk
in WORKSPACE/cache/, keyed by its source's content (which files, their sizes and times).

On disk a dataset is two files, <dataset>-<size>-<digest>.npy and .json:
- .npy: every image of every part (train, then val / test), uint8 [N, C, S, S]; written by
  the decode itself, a block at a time (rows.py), to a temporary name renamed when complete;
  read back memory-mapped (copy-on-write), so a second run starts in seconds from the page
  cache and nothing is loaded whole;
- .json: the class names, each part's labels in file order, the image array's shape;
  written last, atomically: no .json, no cache.
Both are readable by all (0o644). A missing, truncated or garbled pair is only a miss:
decoding again repairs it.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.engine.data.host_rows import HostRows
from harness.engine.data.rows import RowArray, RowFile
from harness.engine.data.sources import Source, open_source
from harness.engine.files import write_text_atomic

_CACHE_VERSION = 3  # bump when the cached files' layout changes, so old files are ignored

# Prepared full datasets by cache key, so a second load in the same process skips the disk too.
_MEMORY_CACHE: dict[str, dict[str, Any]] = {}


def cache_base(source: Source, workspace: Path) -> Path:
    """WORKSPACE/cache/<dataset>-<size>-<digest>: the cache files' path without suffix."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{source.dataset}|{source.size_key}|{source.identity}".encode()).hexdigest()
    return Path(workspace) / "cache" / f"{source.dataset}-{source.size_key}-{digest[:16]}"


def is_cached(source: Source, workspace: Path) -> bool:
    """Is the source decoded already (in this process, or complete on disk)?"""
    base = cache_base(source, workspace)
    return base.name in _MEMORY_CACHE or base.with_suffix(".json").is_file()


def prepared_dataset(cfg: Any, workspace: Path) -> dict[str, Any]:
    """The full decoded dataset {"class_names", "train_x", "train_y", optional "val_x"/"val_y",
    "test_x"/"test_y"}: uint8 images [N, C, S, S] (backed by the cache file's memory map)
    and int64 labels; from memory, the disk cache, or decoding. When the images are in a
    file, "host" holds each part's rows of it as a `HostRows` (read per batch, never mapped:
    data.residency host)."""
    source = open_source(cfg, workspace)
    base = cache_base(source, workspace)
    key = base.name
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    prepared = _read_cache(base)
    if prepared is None:
        prepared = _decode_into_cache(source, base)
    _MEMORY_CACHE[key] = prepared
    return prepared


def _read_cache(base: Path) -> dict[str, Any] | None:
    """The cached dataset at `base`.npy/.json, memory-mapped; None when it is missing or damaged."""
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        if meta["version"] != _CACHE_VERSION:
            return None
        images = np.load(base.with_suffix(".npy"), mmap_mode="c", allow_pickle=False)
        labels = {part: np.asarray(values, dtype=np.int64) for part, values in meta["labels"].items()}
        if images.dtype != np.uint8 or list(images.shape) != meta["shape"] \
                or images.shape[0] != sum(len(y) for y in labels.values()):
            return None
        return _assemble(meta["class_names"], images, labels, base.with_suffix(".npy"))
    except Exception:  # a damaged cache is only a miss: decoding again repairs it
        return None


def _decode_into_cache(source: Source, base: Path) -> dict[str, Any]:
    """Decode straight into the cache's .npy (committed when complete), then write its .json.
    Where the images cannot be written (a read-only or full disk), decode into memory instead."""
    try:
        with RowFile(base.with_suffix(".npy"), source.n_images) as rows:
            decoded = source.decode(rows)
            images = rows.commit()
    except OSError as exc:   # only costs time: the next run decodes again
        warnings.warn(f"could not write dataset cache {base}.npy: {exc}", stacklevel=3)
        return _decode_in_memory(source)
    labels = _labels(decoded)
    meta = {"version": _CACHE_VERSION, "class_names": list(decoded["class_names"]), "shape": list(images.shape),
            "labels": {part: y.tolist() for part, y in labels.items()}}
    try:
        write_text_atomic(base.with_suffix(".json"), json.dumps(meta), mode=0o644)
    except OSError as exc:   # the images are decoded and mapped; the next run decodes again
        warnings.warn(f"could not write dataset cache {base}.json: {exc}", stacklevel=3)
    return _assemble(decoded["class_names"], images, labels, base.with_suffix(".npy"))


def _decode_in_memory(source: Source) -> dict[str, Any]:
    rows = RowArray(source.n_images)
    decoded = source.decode(rows)
    return _assemble(decoded["class_names"], rows.array(), _labels(decoded))


def _labels(decoded: dict[str, Any]) -> dict[str, np.ndarray]:
    """The decode's "<part>_y" labels by part, in the order the images were written."""
    return {key[:-2]: np.asarray(value, dtype=np.int64) for key, value in decoded.items() if key.endswith("_y")}


def _assemble(class_names: list[str], images: np.ndarray, labels: dict[str, np.ndarray],
              file: Path | None = None) -> dict[str, Any]:
    """The prepared dict: each part's images a view of `images` (no copy), its labels, and
    each part's rows of `file` (the .npy `images` maps) under "host"."""
    x = torch.from_numpy(images)
    prepared: dict[str, Any] = {"class_names": list(class_names)}
    in_file = HostRows.open(file) if file is not None else None
    start = 0
    for part, y in labels.items():
        prepared[f"{part}_x"] = x[start:start + len(y)]
        prepared[f"{part}_y"] = torch.from_numpy(y)
        if in_file is not None:
            prepared.setdefault("host", {})[part] = in_file.take(slice(start, start + len(y)))
        start += len(y)
    return prepared
