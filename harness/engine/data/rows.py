"""Where decoded images go, a block at a time and in order: an .npy file (`RowFile`, the
decoded-data cache's format; never more than a block in memory) or memory (`RowArray`).

Both take uint8 blocks [n, C, S, S], C = 1 or 3, and keep one channel count for the whole
dataset: 1 while every image so far is grey, 3 from the first colour one on (the grey rows
already there are widened, the same value in every channel), the rule of the decode before.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from harness.engine.data.decode import widen

_COPY_ROWS = 1024   # rows per read when a file is widened: bounds that copy's memory


def _check(block: np.ndarray, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The (C, S, S) of a uint8 block, which must match `shape` but for its channels."""
    if block.dtype != np.uint8 or block.ndim != 4 or block.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 [n, 1|3, H, W] images, got {block.dtype} {tuple(block.shape)}")
    if shape is not None and block.shape[2:] != shape[1:]:
        raise ValueError(f"images of {tuple(block.shape[2:])} px after images of {shape[1:]} px")
    return tuple(block.shape[1:])


class RowFile:
    """uint8 images [n, C, S, S] appended in blocks to a temporary .npy file beside `path`
    (named `<stem>.<random>.tmp`, so two writers never share one); `commit()` renames it to
    `path`, readable by all, once all n rows are there. Used as a context manager, a write
    that stops before its commit (an error, a full disk) leaves no file behind."""

    def __init__(self, path: str | Path, n: int):
        self.path, self.n, self.written = Path(path), n, 0
        self.shape: tuple[int, ...] | None = None   # (C, S, S), from the first block
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file, self._tmp = self._new_temp()
        self._data_offset = 0

    def __enter__(self) -> "RowFile":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def _new_temp(self):
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.stem}.", suffix=".tmp")
        return os.fdopen(fd, "wb", buffering=1 << 20), Path(tmp)

    def _start(self, shape: tuple[int, ...]) -> None:
        """Write the .npy header for all n rows of `shape`; the rows follow it."""
        self.shape = shape
        header = {"descr": "|u1", "fortran_order": False, "shape": (self.n, *shape)}
        np.lib.format.write_array_header_1_0(self._file, header)
        self._data_offset = self._file.tell()

    def append(self, block: np.ndarray) -> None:
        """The next rows, in order."""
        shape = _check(block, self.shape)
        if self.written + len(block) > self.n:
            raise ValueError(f"more than the {self.n} images announced")
        if self.shape is None:
            self._start(shape)
        elif shape[0] > self.shape[0]:
            self._widen()
        self._file.write(np.ascontiguousarray(widen(block) if shape[0] < self.shape[0] else block).data)
        self.written += len(block)

    def _widen(self) -> None:
        """The grey rows written so far, rewritten to a new temporary file with 3 channels."""
        old_file, old_tmp = self._file, self._tmp
        old_file.flush()
        grey = np.memmap(old_tmp, dtype=np.uint8, mode="r", offset=self._data_offset,
                         shape=(self.written, *self.shape))
        self._file, self._tmp = self._new_temp()
        try:
            self._start((3, *self.shape[1:]))
            for start in range(0, self.written, _COPY_ROWS):
                self._file.write(widen(np.asarray(grey[start:start + _COPY_ROWS])).data)
        finally:
            del grey
            old_file.close()
            old_tmp.unlink()

    def commit(self) -> np.ndarray:
        """Rename the complete file to `path` (mode 0o644: a cache is as readable as the data);
        returns its rows, memory-mapped copy-on-write (mapped before the rename, so whatever
        later happens to the name, these are the rows written)."""
        if self.written != self.n:
            raise ValueError(f"{self.written} images written of the {self.n} announced")
        self._file.close()
        os.chmod(self._tmp, 0o644)
        images = np.load(self._tmp, mmap_mode="c", allow_pickle=False)
        os.replace(self._tmp, self.path)
        return images

    def discard(self) -> None:
        """Remove the temporary file (nothing, once committed)."""
        self._file.close()
        if self._tmp.exists():
            self._tmp.unlink()


class RowArray:
    """The same appends, kept in memory: for a decode that is not cached (a shift folder) or
    whose cache cannot be written."""

    def __init__(self, n: int):
        self.n, self.blocks = n, []
        self.shape: tuple[int, ...] | None = None

    def append(self, block: np.ndarray) -> None:
        shape = _check(block, self.shape)
        self.shape = self.shape or shape
        self.blocks.append(block)

    def array(self) -> np.ndarray:
        """All rows as one uint8 [n, C, S, S] array, C = 3 if any image is in colour."""
        if sum(len(b) for b in self.blocks) != self.n:
            raise ValueError(f"{sum(len(b) for b in self.blocks)} images written of the {self.n} announced")
        if any(b.shape[1] == 3 for b in self.blocks):
            self.blocks = [widen(b) for b in self.blocks]
        return np.concatenate(self.blocks)
