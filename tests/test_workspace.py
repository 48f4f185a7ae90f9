"""harness.workspace: one command's workspace and stores, resolved once from options, then the
environment, then the workspace; every command takes the same store options."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.errors import HarnessError
from harness.workspace import Stores

STORE_OPTIONS = ("--workspace", "--storage", "--tracking-uri")


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_takes_the_same_store_options(command):
    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0, res.output
    for option in STORE_OPTIONS:
        assert option in res.output, f"harness {command} has no {option}"


def test_status_and_export_accept_a_tracking_uri_they_do_not_use(tmp_path):
    """They read only Optuna; the option is taken (and ignored) like everywhere else."""
    study = tmp_path / "s.yaml"
    study.write_text((Path(__file__).parent.parent / "studies" / "quickstart.yaml").read_text())
    for command in ("status", "export"):
        res = CliRunner().invoke(main, [command, str(study), "--workspace", str(tmp_path / "ws"),
                                        "--tracking-uri", "http://nowhere.invalid:5000"])
        assert "no such option" not in res.output.lower(), res.output
    assert not (tmp_path / "ws").exists()          # looking creates nothing


def test_resolve_takes_options_then_environment_then_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = tmp_path / "ws"
    s = Stores.resolve(ws)
    assert (s.storage, s.tracking_uri) == (str(ws.resolve() / "optuna.journal"), f"sqlite:///{ws.resolve() / 'mlflow.db'}")
    monkeypatch.setenv("HARNESS_STORAGE", "postgresql://u@h/db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    s = Stores.resolve(ws)
    assert (s.storage, s.tracking_uri) == ("postgresql://u@h/db", "http://env:5000")
    s = Stores.resolve(ws, "sqlite:///x.db", "http://opt:5000", heartbeat=7)
    assert (s.storage, s.tracking_uri, s.heartbeat) == ("sqlite:///x.db", "http://opt:5000", 7)
    assert not ws.exists()                         # resolving writes nothing


def test_default_output_paths(tmp_path):
    s = Stores.resolve(tmp_path)
    assert s.checkpoint("src") == tmp_path / "checkpoints" / "src.pt"
    assert s.export("study", "naive") == tmp_path / "exports" / "study-naive.yaml"
    assert s.reports("study") == tmp_path / "reports" / "study"
    assert [s.lr_find_plot("r", k).name for k in (1, 2, "all")] == ["lr_find-r.png", "lr_find-r-stage2.png",
                                                                   "lr_find-r-stages.png"]


def test_child_processes_get_the_stores_in_their_environment(tmp_path):
    s = Stores.resolve(tmp_path, "postgresql://u:secret@h/db", "http://u:secret@mlflow:5000")
    assert s.env() == {"HARNESS_STORAGE": "postgresql://u:secret@h/db",
                       "MLFLOW_TRACKING_URI": "http://u:secret@mlflow:5000"}


def test_ready_makes_the_workspace_or_names_it(tmp_path):
    assert Stores.resolve(tmp_path / "a" / "b").ready().workspace.is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HarnessError, match=r"^--workspace: cannot write to .*file"):
        Stores.resolve(blocker / "ws").ready()


def test_workers_sharing_a_workspace_check_it_at_once(tmp_path):
    """Ray tasks and Kubernetes replicas start together on one workspace: one worker's write
    probe must not be another's (a shared name failed a load-test worker with ENOENT)."""
    import threading
    stores, errors = Stores.resolve(tmp_path / "ws"), []

    def check():
        try:
            for _ in range(300):
                stores.ready()
        except HarnessError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list((tmp_path / "ws").iterdir()) == []      # no probe left behind
