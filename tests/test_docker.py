"""docker/compose.yaml without a Docker engine: its structure, and its commands run verbatim.

There is no Docker engine here, so the services' own argv (exec form, ${VAR:-default}
substituted by tests/services.py) run on this machine: the `mlflow` command is the
mlflow_server fixture, `prepare` pretrains a tiny body into a workspace, and two `worker`
processes, like two replicas sharing the workspace volume, fine-tune from it against
PostgreSQL and that server.
"""
from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import needs_fashion
from harness.sweep import storage as st
from harness.engine.models import read_checkpoint
from services import COMPOSE, compose_service, harness_argv, interpolate
from shipped import resolve_study, shrink

COMPOSE_WORKERS = COMPOSE.parent / "compose.workers.yaml"
SERVICES = {"postgres", "mlflow", "prepare", "worker"}


def services(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())["services"]


# --- structure -----------------------------------------------------------------------------------

def test_compose_has_its_services_with_exec_form_commands():
    svcs = services()
    assert set(svcs) == SERVICES
    for name in SERVICES - {"postgres"}:
        command = svcs[name]["command"]
        assert isinstance(command, list) and all(isinstance(a, str) for a in command), name
        for arg in command:   # every variable part has a default: the argv runs with none set
            assert "${" not in interpolate(arg, {}), (name, arg)
    for name, svc in svcs.items():
        if "healthcheck" in svc:
            assert isinstance(svc["healthcheck"]["test"], list) and svc["healthcheck"]["test"][0] == "CMD", name
    assert svcs["mlflow"]["command"][:2] == ["mlflow", "server"]
    assert svcs["prepare"]["command"][:2] == ["harness", "pretrain"]
    assert svcs["worker"]["command"][:2] == ["harness", "worker"]


def test_no_password_in_any_command():
    for path in (COMPOSE, COMPOSE_WORKERS):
        for name, svc in services(path).items():
            for arg in svc.get("command") or []:
                assert "POSTGRES_PASSWORD" not in arg and "password" not in arg.lower(), (path.name, name, arg)
                assert not re.search(r"://[^/@\s]*:[^/@\s]*@", arg), (path.name, name, arg)   # user:pw@
    # the password reaches the containers as environment variables only
    svcs = services()
    assert "${POSTGRES_PASSWORD}" in svcs["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "${POSTGRES_PASSWORD}" in svcs["worker"]["environment"]["HARNESS_STORAGE"]
    assert "POSTGRES_PASSWORD" not in str(svcs["prepare"].get("environment"))


def test_published_ports_are_host_local_by_default():
    published = 0
    for name, svc in services().items():
        for port in svc.get("ports") or []:
            assert isinstance(port, str) and port.startswith("${PUBLISH_ADDR:-127.0.0.1}:"), (name, port)
            assert interpolate(port, {}).startswith("127.0.0.1:"), (name, port)
            published += 1
    assert published == 2   # PostgreSQL and MLflow; the workers publish nothing
    assert interpolate(services()["postgres"]["ports"][0], {}) == "127.0.0.1:5432:5432"
    assert interpolate(services()["mlflow"]["ports"][0], {}) == "127.0.0.1:5000:5000"


def test_worker_stops_like_ctrl_c_and_uses_plain_postgresql_urls():
    svcs = services()
    assert svcs["worker"]["stop_signal"] == "SIGINT"
    _, worker_env = compose_service("worker", {"POSTGRES_PASSWORD": "pw"})
    _, mlflow_env = compose_service("mlflow", {"POSTGRES_PASSWORD": "pw"})
    _, prepare_env = compose_service("prepare", {})
    assert worker_env["HARNESS_STORAGE"] == "postgresql://harness:pw@postgres:5432/optuna"
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://harness:pw@postgres:5432/mlflow"
    assert worker_env["MLFLOW_TRACKING_URI"] == prepare_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker_env["HARNESS_HEARTBEAT"] == "30"
    assert st.kind(worker_env["HARNESS_STORAGE"]) == "postgresql"


def test_compose_workers_file_runs_the_same_commands():
    main, workers = services(), services(COMPOSE_WORKERS)
    for name in ("prepare", "worker"):
        assert workers[name]["command"] == main[name]["command"], name
    assert workers["worker"]["stop_signal"] == "SIGINT"


# --- the commands, run ---------------------------------------------------------------------------

def tiny_source_recipe(path: Path) -> Path:
    """Pretraining in a few seconds: 2 source classes x 16 images at 16 px, 1 epoch."""
    path.write_text(yaml.safe_dump({
        "seed": 0, "device": "cpu",
        "data": {"dataset": "fashion-mnist", "classes": ["T-shirt/top", "Trouser"], "train_per_class": 16,
                 "val_fraction": 0.25, "image_size": 16, "batch_size": 8, "augment": False},
        "model": {"arch": "resnet18", "weights": "none", "head": "linear"},
        "stages": [{"epochs": 1, "train": "all", "lr": 1e-3}],
    }, sort_keys=False))
    return path


def tiny_study(path: Path, name: str, weights: Path, trials: int) -> Path:
    """studies/pretrain-quickstart.yaml (a fine-tune of a `harness pretrain` body) shrunk by
    tests/shipped.py to a tiny naive-only study from the body at `weights`, written to `path`:
    2 classes x 8 images at 16 px, batch 8, 1 epoch, `trials` random trials, no pruner,
    compare at its default 3 seeds."""
    shrunk = shrink(resolve_study("pretrain-quickstart"), path.parent / "shrunk", name=name,
                    recipe={"seed": 0, "device": "cpu",
                            "data": {"dataset": "fashion-mnist", "classes": ["Sandal", "Bag"], "train_per_class": 8,
                                     "val_fraction": 0.25, "image_size": 16, "batch_size": 8, "augment": False},
                            "model": {"arch": "resnet18", "weights": str(weights), "head": "linear"}},
                    budget={"epochs": 1}, metric="val/accuracy", trials=trials, sampler="random",
                    pruner="none", strategies={"naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
                    compare={"seeds": 3})
    assert not shrunk.pretrain     # its own body, not the study's: nothing of shipped's to pretrain
    shrunk.path.replace(path)      # self-contained (its recipe inline): it may move
    return path


def run_service(name: str, variables: dict[str, str], overrides: dict[str, str], cwd: Path,
                log: Path) -> subprocess.Popen:
    """The service's argv and environment from the compose file, the server URLs replaced
    by the local ones (the compose file's name the hosts `postgres` and `mlflow`)."""
    argv, env = compose_service(name, variables)
    assert set(overrides) <= set(env), (name, overrides, env)
    out = open(log, "w")
    try:
        return subprocess.Popen(harness_argv(argv), env={**os.environ, "OMP_NUM_THREADS": "1", **env, **overrides},
                                cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()


def finish(p: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"{p.args[2:4]} did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
    return log.read_text()


@needs_fashion
@pytest.mark.slow
def test_prepare_then_two_worker_replicas_run_verbatim(tmp_path, pg_url, mlflow_server):
    from mlflow.tracking import MlflowClient

    # the server the fixture started is the compose file's `mlflow` command
    mlflow_argv, _ = compose_service("mlflow", {"POSTGRES_PASSWORD": "unused"})
    assert mlflow_argv[:2] == ["mlflow", "server"]
    client = MlflowClient(tracking_uri=mlflow_server)

    ws = tmp_path / "workspace"            # the shared `workspace` volume
    recipe = tiny_source_recipe(tmp_path / "tiny-source.yaml")
    prepare_vars = {"SOURCE_RECIPE": str(recipe), "WORKSPACE": str(ws)}
    tracking = {"MLFLOW_TRACKING_URI": mlflow_server}
    out = finish(run_service("prepare", prepare_vars, tracking, tmp_path, tmp_path / "prepare.log"),
                 tmp_path / "prepare.log")
    checkpoint = ws / "checkpoints" / "tiny-source.pt"
    assert "saved" in out and checkpoint.is_file(), out[-3000:]
    meta = read_checkpoint(checkpoint)["meta"]
    assert client.get_run(meta["mlflow_run_id"]).info.status == "FINISHED"   # logged to the server

    # two replicas of `worker`, same study, same workspace, at once
    name = f"docker-{uuid.uuid4().hex[:8]}"
    trials = 4
    study = tiny_study(tmp_path / "study.yaml", name, checkpoint.resolve(), trials)
    worker_vars = {"STUDY": str(study), "WORKSPACE": str(ws), "POSTGRES_PASSWORD": "unused"}
    _, worker_env = compose_service("worker", worker_vars)
    overrides = {"HARNESS_STORAGE": pg_url, **tracking}
    logs = [tmp_path / f"worker{i}.log" for i in (1, 2)]
    procs = [run_service("worker", worker_vars, overrides, tmp_path, log) for log in logs]
    outs = [finish(p, log) for p, log in zip(procs, logs)]
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-3000:]
        assert f"every strategy has its {trials} trials" in text
        assert "Traceback" not in text
    assert worker_env["HARNESS_HEARTBEAT"] == "30"

    ostudy = optuna.load_study(study_name=f"{name}/naive", storage=st.open_storage(pg_url))
    got = ostudy.get_trials()
    assert sorted(t.number for t in got) == list(range(trials))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in got), [t.state for t in got]
    for t in got:   # every trial fine-tuned the body `prepare` made
        assert yaml.safe_load(t.user_attrs["recipe"])["model"]["weights"] == str(checkpoint.resolve())

    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("harness.kind") == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.tags["strategy"] == "naive"
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) == trials == len(runs) - 1
    for t in got:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_number"] == str(t.number)

    # the next `up`: prepare finds the checkpoint its recipe made and reuses it
    again = finish(run_service("prepare", prepare_vars, tracking, tmp_path, tmp_path / "prepare2.log"),
                   tmp_path / "prepare2.log")
    assert "reused" in again and "saved" not in again, again[-3000:]
    assert read_checkpoint(checkpoint)["meta"]["mlflow_run_id"] == meta["mlflow_run_id"]
