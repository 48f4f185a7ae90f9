"""A full disk where the artifacts go: one clear line, exit 2, stores still consistent, and
the sweep resumes once there is space again. A real full file system: a 64 KiB tmpfs
mounted over the workspace's artifact folder (needs root, as on the CI machine)."""
from __future__ import annotations

import subprocess

import optuna
import pytest
import yaml
from click.testing import CliRunner

from conftest import needs_fashion
from harness.cli import main
from harness.sweep.storage import open_storage
from test_workers import local_stores, mlflow_runs, tiny_study

S = optuna.trial.TrialState


@pytest.fixture
def full_artifacts(tmp_path):
    folder = tmp_path / "ws" / "artifacts"
    folder.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    (folder / "filler").write_bytes(b"\0" * 60_000)      # what is left: less than one LR plot
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@needs_fashion
def test_a_full_disk_on_artifact_writes_is_one_line_and_the_sweep_resumes(tmp_path, full_artifacts):
    study = tiny_study(tmp_path / "study.yaml", "disk-full", trials=2, epochs=1)
    ws = tmp_path / "ws"
    spec, uri = local_stores(ws)
    res = CliRunner().invoke(main, ["sweep", str(study), "--workspace", str(ws)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: no space left on the device holding ") and "artifacts" in lines[-1]
    assert "Traceback" not in res.output + res.stderr
    ostudy = optuna.load_study(study_name="disk-full/naive", storage=open_storage(spec))
    (t,) = ostudy.get_trials()
    assert t.state == S.FAIL and "failure" not in t.user_attrs       # lost, not a result: re-run
    (run,) = [r for r in mlflow_runs(uri, "disk-full") if "optuna.trial_number" in r.data.tags]
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["harness.reason"]

    (full_artifacts / "filler").unlink()                             # space again
    subprocess.run(["mount", "-o", "remount,size=16m", str(full_artifacts)], check=True)
    res = CliRunner().invoke(main, ["sweep", str(study), "--workspace", str(ws)])
    assert res.exit_code == 0, res.output
    trials = optuna.load_study(study_name="disk-full/naive", storage=open_storage(spec)).get_trials()
    assert [x.state for x in trials] == [S.FAIL, S.COMPLETE, S.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == t.params
    assert yaml.safe_load(trials[1].user_attrs["recipe"])["seed"] == 0
