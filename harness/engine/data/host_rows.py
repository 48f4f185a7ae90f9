"""Images that stay on the host: rows of a decoded-data cache file (.npy), read per batch.

`HostRows` stands where a split's uint8 [N,C,H,W] tensor stands when `data.residency` is
`host`: `take(idx)` is a lazy subset (no read), `[idx]` reads those rows into memory with
pread (the page cache serves a second epoch; the process's own memory holds one batch, where
a memory map would count every page it ever touched), `gather_async` reads the next batch on
a background thread while the current one trains. Reads happen in row order for the disk and
come back in the asked order.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class _OpenFile:
    """A file held open for reading while any view of it lives: a cache file replaced or
    removed meanwhile (a new decode renames over it) still reads as it was."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


@dataclass(frozen=True)
class HostRows:
    path: Path
    offset: int                  # where row 0 starts in the file (after the .npy header)
    row_shape: tuple[int, ...]   # one image: (C, H, W), uint8
    rows: torch.Tensor           # int64 rows of the file, in this split's order
    file: _OpenFile = field(repr=False, compare=False)   # shared by every view of the file

    @classmethod
    def open(cls, path: str | Path) -> "HostRows":
        """Every row of a C-ordered uint8 .npy file of shape [N, C, H, W]."""
        path = Path(path)
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if fortran or dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"{path}: not a C-ordered uint8 [N,C,H,W] array")
        return cls(path, offset, tuple(shape[1:]), torch.arange(shape[0]), _OpenFile(path))

    # --- what a split's x needs ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.row_shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: torch.Tensor | slice) -> "HostRows":
        """The rows `idx` of this one, unread."""
        return HostRows(self.path, self.offset, self.row_shape, self.rows[idx], self.file)

    def __getitem__(self, idx: torch.Tensor | slice | int) -> torch.Tensor:
        """Rows `idx`, read now: uint8 [len(idx), C, H, W] (an int gives one row's batch of 1)."""
        rows = self.rows[idx].reshape(-1)
        return self.read(rows)

    def read(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """File rows `rows` into `out` (made if None), in the asked order."""
        out = torch.empty((len(rows), *self.row_shape), dtype=torch.uint8) if out is None else out
        nbytes = int(np.prod(self.row_shape))
        flat = out.view(len(rows), nbytes).numpy()
        order = np.argsort(rows.numpy(), kind="stable")   # ascending offsets: friendlier to the disk
        for i in order:
            got = os.preadv(self.file.fd, [memoryview(flat[i])], self.offset + int(rows[i]) * nbytes)
            if got != nbytes:
                raise OSError(f"{self.path}: short read at row {int(rows[i])} (damaged cache?)")
        return out

    def materialize(self) -> torch.Tensor:
        """All rows of this split in memory (for `device` residency, or a small split)."""
        return self[:]


class Prefetcher:
    """Reads batch k+1's rows on one background thread while batch k trains. `pin` puts the
    buffers in page-locked memory, so the copy to a GPU can overlap compute (non_blocking)."""

    def __init__(self, store: HostRows, pin: bool):
        self.store, self.pin = store, pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-rows")

    def submit(self, idx: torch.Tensor | slice) -> Future:
        """Start reading rows `idx` (CPU indices, or a slice) of the store; the future's result
        is the uint8 batch."""
        rows = self.store.rows[idx].reshape(-1)
        out = torch.empty((len(rows), *self.store.row_shape), dtype=torch.uint8, pin_memory=self.pin)
        return self.pool.submit(self.store.read, rows, out)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
