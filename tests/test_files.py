"""Files written whole or not at all (harness/engine/files.py), for every writer that uses it:
a write that fails midway leaves the previous file as it was and no temporary file, two
writers never share a temporary name, and each file keeps the mode it had before."""
from __future__ import annotations

import os
import resource
import signal
import stat
import types
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from harness import results
from harness.engine.files import torch_save_atomic, write_atomic, write_bytes_atomic, write_text_atomic
from harness.engine.models import build_model, read_checkpoint, save_checkpoint
from harness.engine.recipe import Recipe
from harness.engine.stages import StageCheckpoint, save_stage
from shipped import REPO


@contextmanager
def file_size_limit(nbytes: int):
    """Writes that would grow a file past `nbytes` fail (EFBIG): a disk that fills up
    in the middle of a write, for this process alone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the error, not the signal's exit
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask_mode() -> int:
    """What open() gives a new file here: 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fails_midway_and_keeps_the_old_file(path: Path, write_again) -> None:
    before = path.read_bytes()
    with pytest.raises(OSError), file_size_limit(len(before) // 2):
        write_again()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]     # no partial, no temporary


# --- the helpers --------------------------------------------------------------------------------

def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    write_text_atomic(path, "first\n")
    assert path.read_text() == "first\n"

    def broken(f):
        f.write(b"half of the sec")
        raise RuntimeError("the writer failed")
    with pytest.raises(RuntimeError, match="the writer failed"):
        write_atomic(path, broken)
    assert path.read_text() == "first\n" and [p.name for p in path.parent.iterdir()] == ["a.txt"]
    write_bytes_atomic(path, b"x" * 10_000)
    _fails_midway_and_keeps_the_old_file(path, lambda: write_bytes_atomic(path, b"y" * 20_000))
    _fails_midway_and_keeps_the_old_file(path, lambda: torch_save_atomic(torch.zeros(10_000), path))


def test_two_writers_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "a.bin"
    names = []

    def outer(f):
        f.write(b"outer")
        names.append(sorted(p.name for p in tmp_path.iterdir()))
        write_bytes_atomic(path, b"inner")        # a second writer while the first is open
        f.write(b" done")
    write_atomic(path, outer)
    assert path.read_bytes() == b"outer done" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    (tmp,) = names[0]
    assert tmp.startswith("a.") and tmp.endswith(".tmp")


def test_modes_private_explicit_or_as_open_makes_them(tmp_path):
    torch_save_atomic({"x": 1}, tmp_path / "private.pt")
    torch_save_atomic({"x": 1}, tmp_path / "shared.pt", mode=0o644)
    write_text_atomic(tmp_path / "plain.txt", "x")
    assert _mode(tmp_path / "private.pt") == 0o600
    assert _mode(tmp_path / "shared.pt") == 0o644
    assert _mode(tmp_path / "plain.txt") == _umask_mode()


# --- the writers that had a fixed-name .tmp: stage checkpoints, body checkpoints, exports ------

def _stage(size: int) -> StageCheckpoint:
    return StageCheckpoint(1, "prefix", {"w": torch.arange(size, dtype=torch.float32)}, torch.zeros(8, dtype=torch.uint8),
                           {"cpu": torch.zeros(8, dtype=torch.uint8)}, "cpu", 10, 1)


def test_a_stage_checkpoint_written_midway_keeps_the_previous_one(tmp_path):
    path = tmp_path / "stages" / "k-stage1.pt"
    save_stage(_stage(1000), path)
    assert _mode(path) == _umask_mode()
    _fails_midway_and_keeps_the_old_file(path, lambda: save_stage(_stage(100_000), path))


def test_a_body_checkpoint_written_midway_keeps_the_previous_one(tmp_path):
    path = tmp_path / "body.pt"
    model = build_model("resnet18", 2, weights="none", head="linear")
    save_checkpoint(model, path, {"note": "first"})
    assert _mode(path) == _umask_mode()
    _fails_midway_and_keeps_the_old_file(path, lambda: save_checkpoint(model, path, {"note": "second"}))
    assert read_checkpoint(path)["meta"] == {"note": "first"}


def test_an_export_written_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    recipe = Recipe.from_dict(yaml.safe_load((REPO / "studies" / "recipes" / "quickstart-train.yaml").read_text()))
    trial = optuna.trial.create_trial(value=0.5, params={}, distributions={},
                                      user_attrs={"recipe": recipe.to_yaml()})
    monkeypatch.setattr(results, "best_of", lambda study, stores, strategy=None: ("naive", trial))
    study = types.SimpleNamespace(name="s", config=types.SimpleNamespace(metric="val/accuracy"))
    path = tmp_path / "best.yaml"
    results.export_best(study, None, output=path)
    assert path.read_text().startswith("# Best recipe of study 's'") and _mode(path) == _umask_mode()
    path.write_text(path.read_text() + "# a note a person added\n")      # what the failed export must keep
    _fails_midway_and_keeps_the_old_file(path, lambda: results.export_best(study, None, output=path))
