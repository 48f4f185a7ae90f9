"""Security defaults: YAML cannot run code, worker command lines carry no password."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.sweep.launch import worker_argv
from harness.sweep.study import load_study


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_yaml_cannot_construct_python_objects(tmp_path, command):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    res = CliRunner().invoke(main, [command, str(path), "--workspace", str(tmp_path / "ws")])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and str(path) in res.stderr
    assert not marker.exists()


def test_worker_command_lines_carry_no_store_url(tmp_path, monkeypatch):
    """`ps` shows command lines to every user: the stores go to workers in their environment."""
    from test_workers import tiny_study
    from harness.workspace import Stores
    study = load_study(tiny_study(tmp_path / "s.yaml", "sec", trials=1))
    stores = Stores.resolve(tmp_path / "ws", "postgresql://u:secret@h/db", "http://u:secret@mlflow:5000")
    argv = worker_argv(study, stores, study.select(["naive"], 1))
    assert not any("://" in a or "journal" in a for a in argv), argv
