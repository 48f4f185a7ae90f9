"""Files written whole or not at all: a temporary file in the target's folder, then a rename.

Each write gets its own temporary name (two writers never share one), and a write that
fails midway removes it: the target keeps its previous content, or stays absent.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable

PRIVATE = 0o600   # the owner alone (mkstemp's mode)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None], mode: int | None = PRIVATE) -> None:
    """Call `write` on a new temporary file beside `path` (folders made), then rename it over
    `path`. `mode`: the file's permissions; None makes it as open() does (0666 less the
    umask). An exception propagates; no temporary file is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Path.write_bytes, atomically; by default with the mode Path.write_bytes gives."""
    write_atomic(path, lambda f: f.write(data), mode)


def write_text_atomic(path: str | Path, text: str, mode: int | None = None, encoding: str = "utf-8") -> None:
    """Path.write_text, atomically; by default with the mode Path.write_text gives."""
    write_bytes_atomic(path, text.encode(encoding), mode)


def torch_save_atomic(obj: Any, path: str | Path, mode: int | None = PRIVATE) -> None:
    """torch.save `obj` to `path` atomically; private by default (None: as open() makes it).
    A failed write raises its OSError (a full disk: ENOSPC), not torch's RuntimeError."""
    import torch

    def save(f: IO[bytes]) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as e:   # torch's writer hides a failed write (a full disk) behind its own error
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    write_atomic(path, save, mode)


def _create_beside(path: Path) -> tuple[int, str]:
    """A new, exclusively created file in `path`'s folder, named after it and ending in .tmp,
    made with mode 0666 less the umask (as open() makes a file)."""
    for _ in range(100):
        tmp = str(path.with_name(f"{path.stem}.{secrets.token_hex(6)}.tmp"))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")
