"""What any cluster needs (Kubernetes, Slurm, Ray): SIGTERM handled like the first Ctrl-C,
worker identities and seeds that do not rest on the pid, idle polling with backoff, the
PostgreSQL connection budget, kept models on the MLflow server, and the Kubernetes Job
manifest of docs/k8s/, validated offline."""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from conftest import needs_fashion, template_store, tiny_recipe_dict
from harness import interrupts
from harness.engine.input_stats import InputStats
from harness.engine.models import build_model
from harness.engine.recipe import Recipe
from harness.engine.run_types import Result
from harness.sweep import connections
from harness.sweep.keep import fetch, keep_if_best, load_kept, path_for, share
from harness.sweep.optuna_studies import make_sampler
from harness.sweep.space import suggest
from harness.sweep.study import load_study
from harness.sweep.worker import Backoff, Worker, alive
from harness.tracking import Tracking
from harness.workspace import Stores
from shipped import REPO, resolve_study, shrink

S = optuna.trial.TrialState
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in interrupts.HANDLED}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# --- SIGTERM ---------------------------------------------------------------------------------

def test_sigterm_is_the_first_ctrl_c_and_says_so(restore_handlers):
    """While trials run, SIGTERM only marks the stop (raised at the next checkpoint), its
    line names the signal, and the exit code will be 128 + 15."""
    said: list[str] = []
    interrupts.install(said.append)
    with interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)                       # the handler runs here, and does not raise
        assert said == ["interrupted by SIGTERM: stopping the running trial and closing the stores "
                        "(a second signal quits at once)"]
        assert interrupts.received() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            interrupts.checkpoint()
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM)   # the second: out at once


def test_an_idle_workers_wait_ends_at_once_on_sigterm(restore_handlers):
    """An idle worker sleeps up to 30 s between polls: a stop cuts the sleep short."""
    interrupts.install(lambda s: None)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    started = time.monotonic()
    timer.start()
    with interrupts.deferred(), pytest.raises(KeyboardInterrupt):
        interrupts.sleep(30)
    assert time.monotonic() - started < 3


# --- identity and seeds ------------------------------------------------------------------------

def _random_study(tmp_path: Path):
    """The shipped quickstart study (three strategies) with the random sampler."""
    return load_study(shrink(resolve_study("quickstart"), tmp_path, sampler="random").path)


def test_eight_workers_with_the_same_pid_draw_no_duplicate_parameters(tmp_path, monkeypatch):
    """Replicas of a container all run as the same pid: their workers still get distinct
    identities and sampler seeds (none given: from a random token). The pid-based seed of
    before draws the same parameters eight times."""
    study = _random_study(tmp_path)
    stores = Stores.resolve(tmp_path / "ws").ready()
    selection = study.select((), None)
    monkeypatch.setattr(os, "getpid", lambda: 1)
    workers = [Worker(study, stores, selection, seed_offset=None, echo=lambda s: None) for _ in range(8)]
    old_default = [Worker(study, stores, selection, seed_offset=os.getpid(), echo=lambda s: None) for _ in range(8)]
    monkeypatch.undo()
    assert len({w.id for w in workers}) == 8 and all(":1:" in w.id for w in workers)

    def draws(ws: list[Worker], per_worker: int = 3) -> list[tuple]:
        out = []
        for strategy in study.spaces:
            for w in ws:   # each joins a study of 4 trials, as the 4th to 11th worker would
                ostudy = optuna.create_study(sampler=make_sampler(study.config.sampler, w.sampler_seed(strategy, 4)))
                for _ in range(per_worker):
                    trial = ostudy.ask()
                    out.append((strategy, tuple(sorted(suggest(trial, study.spaces[strategy]).items()))))
                    ostudy.tell(trial, 0.0)
        return out

    new = draws(workers)
    assert len(new) == 8 * 3 * len(study.spaces) and len(set(new)) == len(new)
    old = draws(old_default)
    assert len(set(old)) == len(old) // 8       # every worker drew what the first drew


def test_a_given_seed_offset_seeds_as_before(tmp_path):
    """--seed-offset (the local launcher's 0..N-1): the study's seed + trial count + offset."""
    study = _random_study(tmp_path)
    w = Worker(study, Stores.resolve(tmp_path / "ws").ready(), study.select((), None), seed_offset=3)
    assert w.sampler_seed("naive", 5) == int(study.base.get("seed", 0)) + 5 + 3


def test_a_worker_id_with_a_token_is_still_checked_by_its_process():
    import subprocess
    import sys
    from harness.sweep.worker import worker_id
    assert alive(worker_id("0123456789abcdef")) is True
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    host = worker_id().rsplit(":", 2)[0]
    assert alive(f"0123456789abcdef@{host}:{p.pid}:-") is False


# --- idle polling --------------------------------------------------------------------------------

def test_idle_polls_back_off_exponentially_with_jitter_and_reset():
    b = Backoff(first=0.5, most=30.0, jitter=0.25, rng=random.Random(0))
    waits = [b.next() for _ in range(12)]
    for k, w in enumerate(waits):
        base = min(30.0, 0.5 * 2 ** k)
        assert 0.75 * base <= w <= 1.25 * base
    assert max(waits) <= 37.5 and waits[-1] >= 22.5       # capped at 30 s +- 25 %
    assert len({round(w / min(30.0, 0.5 * 2 ** k), 6) for k, w in enumerate(waits)}) > 1   # jittered
    b.reset()
    assert 0.375 <= b.next() <= 0.625


# --- the connection budget ----------------------------------------------------------------------

def test_connection_budget_warns_with_the_numbers(pg_url, tmp_path):
    import psycopg
    with psycopg.connect(pg_url) as con:
        most = int(con.execute("SHOW max_connections").fetchone()[0])
        reserved = int(con.execute("SHOW superuser_reserved_connections").fetchone()[0])
    assert connections.shortfall(pg_url, 1, f"sqlite:///{tmp_path}/mlflow.db") is None
    line = connections.shortfall(pg_url, most, "http://mlflow:5000")
    need = most * connections.PER_WORKER + connections.MLFLOW_SERVER
    assert line.startswith(f"warning: PostgreSQL at {pg_url} may run out of connections: {most} worker(s) x "
                           f"{connections.PER_WORKER} + {connections.MLFLOW_SERVER} for the MLflow server = {need}, "
                           f"but ")
    assert f"(max_connections {most} - {reserved} reserved - " in line and "PgBouncer" in line
    assert connections.shortfall(str(tmp_path / "optuna.journal"), 10_000, "http://x") is None   # one machine


# --- kept models on the MLflow server -----------------------------------------------------------

def _small_recipe() -> Recipe:
    """The tiny recipe on a 0.6 M-parameter timm model: a kept file of 2 MB, not resnet18's 45."""
    return Recipe.from_dict(tiny_recipe_dict(model={"arch": "timm/mobilenetv3_small_050"}))


def _kept_file(folder: Path, recipe: Recipe) -> tuple[Path, dict]:
    """A kept model as a trial saves it (keep_if_best), and its weights."""
    model = build_model(recipe.model.arch, 2, "none", recipe.model.head, recipe.model.groups, recipe.data.image_size)
    result = Result(group_names=["body", "head"], class_names=["Sandal", "Bag"], model=model,
                    input_stats=InputStats((0.5,) * 3, (0.25,) * 3))
    trial = optuna.create_study(direction="maximize").ask()
    path = keep_if_best(trial, 0.75, result, recipe, folder)
    return path, model.state_dict()


@pytest.mark.slow          # starts the session's MLflow server (about 30 s here), as the other server tests
@pytest.mark.timeout(600)
def test_a_kept_model_reaches_another_node_through_the_mlflow_server(tmp_path, mlflow_server):
    """Logged on the trial's run; another node's compare downloads it into its own
    workspace and loads the same weights. Without the artifact: False, nothing left."""
    recipe = _small_recipe()
    here = Tracking(mlflow_server, tmp_path / "node-a")
    run_id = here.start(f"kept-{tmp_path.name[-10:]}", "trial-0")
    path, weights = _kept_file(tmp_path / "node-a" / "models", recipe)
    share(here, run_id, path)
    assert [f.path for f in here.client.list_artifacts(run_id, "kept")] == [f"kept/{path.name}"]

    there = Tracking(mlflow_server, tmp_path / "node-b")
    folder = tmp_path / "node-b" / "models"
    assert fetch(there, run_id, folder, 0) is True
    kept = load_kept(folder, 0, recipe)
    assert kept is not None and kept.result.class_names == ["Sandal", "Bag"]
    assert all(torch.equal(kept.model.state_dict()[k], v) for k, v in weights.items())
    assert fetch(there, run_id, folder, 1) is False               # trial 1 kept nothing
    assert sorted(p.name for p in folder.iterdir()) == [path_for(folder, 0).name]


def test_a_local_tracking_store_keeps_the_model_in_the_workspace_only(tmp_path, tmp_path_factory):
    import shutil
    recipe = _small_recipe()
    shutil.copyfile(template_store(tmp_path_factory), tmp_path / "mlflow.db")
    tracking = Tracking(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    run_id = tracking.start("kept-local", "trial-0")
    path, _ = _kept_file(tmp_path / "models", recipe)
    share(tracking, run_id, path)
    assert tracking.client.list_artifacts(run_id) == []
    assert fetch(tracking, run_id, tmp_path / "elsewhere", 0) is False


def test_a_failed_upload_is_one_warning_not_a_failed_trial(tmp_path, monkeypatch, capfd):
    from services import free_port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    path = tmp_path / "trial-3.pt"
    path.write_bytes(b"model")
    share(Tracking(f"http://127.0.0.1:{free_port()}", tmp_path), "0123abcd", path)   # nobody listens
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: trial-3.pt not uploaded to the MLflow server ("), err


# --- the Kubernetes Job ---------------------------------------------------------------------------

K8S_JOB = REPO / "docs" / "k8s" / "worker-job.yaml"


def test_the_kubernetes_job_validates_and_retries_all_but_bad_input():
    """docs/k8s/worker-job.yaml against Kubernetes' own schemas (strict: no unknown field),
    an Indexed Job whose exit code 2 fails the Job and whose disruptions are not counted,
    running a real `harness worker` command line."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed "
                                                           "(pip install -e '.[dev]')")
    (job,) = list(yaml.safe_load_all(K8S_JOB.read_text()))
    for version in ("1.31.0", "1.37.0"):
        kv.validate(job, version, strict=True)
    broken = {**job, "spec": {**job["spec"], "completionMod": "Indexed"}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.37.0", strict=True)

    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] > 0
    rules = {r["action"]: r for r in spec["podFailurePolicy"]["rules"]}
    assert rules["FailJob"]["onExitCodes"] == {"containerName": "worker", "operator": "In", "values": [2]}
    assert rules["Ignore"]["onPodConditions"][0]["type"] == "DisruptionTarget"
    (container,) = pod["containers"]
    argv = container["command"]
    assert container["name"] == "worker" and argv[:2] == ["harness", "worker"]
    assert (REPO / argv[2]).is_file()
    from harness.cli import main
    ctx = main.commands["worker"].make_context("worker", list(argv[2:]))   # real options only
    assert ctx.params["seed_offset"] is None
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["HARNESS_STORAGE"]["valueFrom"]           # the password in a Secret
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")          # a server: kept models shared


# --- for real: SIGTERM to a worker in the middle of a trial, on PostgreSQL ------------------------

@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_mid_trial_queues_it_again_within_the_grace_period(tmp_path, pg_url):
    """A worker on PostgreSQL (heartbeat on) gets SIGTERM in a trial, as a pod does when
    Kubernetes stops it: within 30 s it exits 143, the trial FAIL (interrupted) and queued
    again with its parameters, its MLflow run KILLED, no connection left open. Meanwhile the
    worker's connections are counted: never more than connections.PER_WORKER."""
    import psycopg
    from services import PG_ADMIN
    from test_workers import Proc, load, mlflow_runs, running_trial_of, tiny_study, wait_until
    from harness.sweep.optuna_studies import enqueued_params

    study = tiny_study(tmp_path / "study.yaml", "sigterm", trials=3)
    ws = tmp_path / "ws"
    uri = f"sqlite:///{ws.resolve() / 'mlflow.db'}"
    db, app = pg_url.rsplit("/", 1)[1], f"worker-{tmp_path.name[-12:]}"
    w = Proc(["worker", study, "--workspace", ws], tmp_path / "w.log",   # libpq names its connections PGAPPNAME
             {"HARNESS_STORAGE": pg_url, "HARNESS_HEARTBEAT": "1", "PGAPPNAME": app})
    counts: list[int] = []
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        def held() -> int:
            return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                                 (db, app)).fetchone()[0]

        find = running_trial_of(pg_url, "sigterm/naive", w.p.pid)

        def counted():
            counts.append(held())
            return find()
        victim = wait_until(counted, 300, "a running trial", w)
        for _ in range(20):      # the trial's first epoch: the pool, the heartbeat thread
            counts.append(held())
            time.sleep(0.05)
        stopped = time.monotonic()
        w.p.send_signal(signal.SIGTERM)
        assert w.wait(30) == 128 + signal.SIGTERM, w.text
        took = time.monotonic() - stopped
        print(f"exited {took:.1f} s after SIGTERM; connections held: at most {max(counts)}")
        assert took < 30
        assert held() == 0

    assert 2 <= max(counts) <= connections.PER_WORKER, counts
    assert "interrupted by SIGTERM" in w.text and "Traceback" not in w.text, w.text
    assert f"[naive] trial {victim.number} was interrupted; queued again" in w.text
    trials = load(pg_url, "sigterm/naive").get_trials()
    assert trials[victim.number].state == S.FAIL and trials[victim.number].user_attrs["interrupted"] is True
    (again,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert again.state == S.WAITING and enqueued_params(again) == victim.params
    runs = {r.info.run_id: r for r in mlflow_runs(uri, "sigterm")}
    assert runs[victim.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in runs.values())
