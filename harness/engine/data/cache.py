"""The decoded-data cache: a full decoded dataset is kept in memory for the process and in
WORKSPACE/cache/<dataset>-<size>-<digest>.pt (written atomically, readable by all, a damaged
file decoded again), keyed by its source."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch

from harness.engine.data.sources import open_source
from harness.engine.files import torch_save_atomic

_CACHE_VERSION = 2  # bump when the cached dict's layout changes, so old files are ignored

# Prepared full datasets by cache key, so a second load in the same process skips the disk too.
_MEMORY_CACHE: dict[str, dict[str, Any]] = {}


def prepared_dataset(cfg: Any, workspace: Path) -> dict[str, Any]:
    """The full decoded dataset at cfg.image_size, from memory, the disk cache, or decoding."""
    source = open_source(cfg, workspace)
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{source.dataset}|{source.size_key}|{source.identity}".encode()).hexdigest()
    key = f"{source.dataset}-{source.size_key}-{digest[:16]}"
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = workspace / "cache" / f"{key}.pt"
    prepared = _read_cache(path)
    if prepared is None:
        prepared = source.decode()
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
