"""Files written whole or not at all: a temporary file in the target's folder, then a rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def torch_save_atomic(obj: Any, path: Path, mode: int | None = None) -> None:
    """torch.save `obj` to `path` atomically (folders made); `mode` sets the file's permissions
    (mkstemp's default is private). An OSError propagates; no temporary file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
