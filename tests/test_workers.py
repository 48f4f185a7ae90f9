"""Workers: the plan of GPUs and threads, the study lock, dead workers, and crashes for real.

The crash tests run `harness` in subprocesses, SIGKILL or Ctrl-C them in the middle of a
trial, and check both stores afterwards: the journal file (one machine) and PostgreSQL with
heartbeats and a real `mlflow server` (many machines).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import needs_fashion
from harness.workspace import Stores, optuna_spec
from harness.sweep import storage as st
from harness.errors import HarnessError
from harness.sweep.launch import plan
from harness.sweep.optuna_studies import RETRIES, enqueued_params, requeue
from harness.sweep.worker import alive, worker_id
from shipped import REPO, resolve_study, shrink

S = optuna.trial.TrialState
optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- the plan: which worker gets which GPU and how many threads ------------------------------

@pytest.mark.parametrize("workers, gpus, per_gpu, cpus, expected", [
    (None, [], 1, 2, [{"OMP_NUM_THREADS": "2"}]),                                   # CPU: one worker
    (2, [], 1, 2, [{"OMP_NUM_THREADS": "1"}] * 2),                                  # cores shared
    (4, [], 1, 2, [{"OMP_NUM_THREADS": "1"}] * 4),
    (None, ["0", "1"], 1, 16, [{"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "8"},
                               {"CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "8"}]),  # one per GPU
    (None, ["2", "5"], 2, 16, [{"CUDA_VISIBLE_DEVICES": d, "OMP_NUM_THREADS": "4"} for d in "2525"]),
    (3, ["0", "1"], 2, 12, [{"CUDA_VISIBLE_DEVICES": d, "OMP_NUM_THREADS": "4"} for d in "010"]),
])
def test_plan_spreads_workers_over_gpus_and_cores(workers, gpus, per_gpu, cpus, expected):
    assert plan(workers, gpus, per_gpu, cpus) == expected


def test_plan_refuses_more_workers_than_gpu_slots():
    with pytest.raises(HarnessError, match=r"--workers: 3 workers do not fit on 1 GPU\(s\) at 2 per GPU"):
        plan(3, ["0"], 2, 8)


# --- storage specs -------------------------------------------------------------------------------

def test_storage_resolves_option_then_env_then_workspace_journal(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_STORAGE", raising=False)
    assert optuna_spec(tmp_path) == str(tmp_path.resolve() / "optuna.journal")
    (tmp_path / "optuna.db").touch()                 # an older sweep's SQLite file is still used
    assert optuna_spec(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
    (tmp_path / "optuna.journal").touch()
    assert optuna_spec(tmp_path) == str(tmp_path.resolve() / "optuna.journal")
    monkeypatch.setenv("HARNESS_STORAGE", "postgresql://u@h/db")
    assert optuna_spec(tmp_path) == "postgresql://u@h/db"
    assert optuna_spec(tmp_path, "rel.journal") == str(Path("rel.journal").resolve())


@pytest.mark.parametrize("spec, kind", [("/x/y.journal", "journal"), ("sqlite:////x.db", "sqlite"),
                                        ("postgresql://u@h/d", "postgresql"), ("postgres://u@h/d", "postgresql"),
                                        ("postgresql+psycopg://u@h/d", "postgresql")])
def test_storage_kinds(spec, kind):
    assert st.kind(spec) == kind


def test_storage_check_refuses_what_cannot_work_and_writes_nothing(tmp_path):
    with pytest.raises(HarnessError, match="--storage: unsupported scheme 'mysql'"):
        st.kind("mysql://root:pw@h/db")
    with pytest.raises(HarnessError, match="SQLite is not safe for 2 workers"):
        st.check(f"sqlite:///{tmp_path}/o.db", workers=2)
    with pytest.raises(HarnessError, match="folder .*nope does not exist"):
        st.check(str(tmp_path / "nope" / "o.journal"))
    with pytest.raises(HarnessError) as e:
        st.check("postgresql://postgres:hunter2@127.0.0.1:1/db")
    assert str(e.value).startswith("--storage: cannot reach postgresql://postgres:***@127.0.0.1:1/db (")
    assert "hunter2" not in str(e.value)
    st.check(str(tmp_path / "o.journal"), workers=4)
    assert list(tmp_path.iterdir()) == []


def test_storage_check_reaches_postgres(pg_url):
    st.check(pg_url, workers=8)
    with pytest.raises(HarnessError, match='database "no_such_db_here" does not exist'):
        st.check(pg_url.rsplit("/", 1)[0] + "/no_such_db_here")


# --- the study lock ------------------------------------------------------------------------------

def _assert_exclusive(make_lock) -> None:
    """A second holder waits until the first releases."""
    first = make_lock().acquire()
    got = threading.Event()

    def second():
        with make_lock():
            got.set()

    t = threading.Thread(target=second, daemon=True)
    t.start()
    assert not got.wait(0.5), "the lock was taken twice"
    first.release()
    assert got.wait(10), "the lock was not handed over"
    t.join(5)


def test_a_heartbeat_thread_that_loses_its_store_says_so_in_one_line(capfd, monkeypatch):
    import psycopg
    import sqlalchemy.exc
    from harness import cli
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)   # restored afterwards
    cli._one_line_thread_errors()

    def lose():
        raise sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, psycopg.OperationalError("connection refused"))
    for name in ("optuna-heartbeat", "Thread-9"):
        t = threading.Thread(target=lose, name=name)
        t.start()
        t.join()
    err = capfd.readouterr().err.splitlines()
    assert err == ["warning: the trial heartbeat stopped (OperationalError: connection refused)",
                   "warning: Thread-9 stopped (OperationalError: connection refused)"], err


def test_lost_store_names_a_store_that_stopped_answering_and_nothing_else():
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from harness.errors import lost_store

    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException:
                raise outer
        except BaseException as e:
            return e
    db = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    assert lost_store(chained(optuna.exceptions.StorageInternalError("commit failed"), db)) \
        == "Exception: server closed the connection unexpectedly"
    rest = MlflowException("API request to http://u:pw@h:5000/api/2.0/mlflow/runs/get failed with exception boom")
    assert lost_store(chained(rest, requests.exceptions.ConnectionError("refused"))) \
        == "MlflowException: API request to http://u:***@h:5000/api/2.0/mlflow/runs/get failed with exception boom"
    assert lost_store(requests.exceptions.ConnectionError("refused")) == "ConnectionError: refused"
    assert lost_store(MlflowException("Run 'abc' not found")) is None
    assert lost_store(chained(ValueError("bad"), KeyError("x"))) is None


@pytest.mark.timeout(300)
def test_study_lock_on_a_journal_file_is_exclusive(tmp_path):
    _assert_exclusive(lambda: st.StudyLock(str(tmp_path / "o.journal"), "s/naive"))


@pytest.mark.timeout(300)
def test_study_lock_on_postgres_is_exclusive_per_study(pg_url):
    _assert_exclusive(lambda: st.StudyLock(pg_url, "s/naive"))
    with st.StudyLock(pg_url, "s/naive"), st.StudyLock(pg_url, "s/head_only"):
        pass   # another study's lock is independent


@pytest.mark.timeout(300)
def test_a_hung_study_lock_fails_its_test_instead_of_hanging(tmp_path):
    """What the timeout marks on the tests that wait on locks and workers buy (pytest-timeout):
    a test stuck on a lock another process holds fails at its timeout, and the run goes on."""
    spec = str(tmp_path / "o.journal")
    hold = (f"from harness.sweep.storage import StudyLock; import time; StudyLock({spec!r}, 's/x').acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        (tmp_path / "test_hung.py").write_text(
            "import pytest\nfrom harness.sweep.storage import StudyLock\n\n\n"
            f"@pytest.mark.timeout(2)\ndef test_waits_for_the_lock():\n    StudyLock({spec!r}, 's/x').acquire()\n\n\n"
            "def test_after_it():\n    pass\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hung.py"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Timeout (>2.0s) from pytest-timeout" in res.stdout and "1 failed, 1 passed" in res.stdout, res.stdout


@pytest.mark.timeout(300)
def test_a_dead_processs_lock_is_released(tmp_path):
    spec = str(tmp_path / "o.journal")
    code = (f"from harness.sweep.storage import StudyLock; import os; StudyLock({spec!r}, 's/x').acquire(); "
            "os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code], timeout=60)
    lock = st.StudyLock(spec, "s/x")
    done = threading.Event()
    threading.Thread(target=lambda: (lock.acquire(), done.set()), daemon=True).start()
    assert done.wait(5)
    lock.release()


# --- who is alive, and re-queuing --------------------------------------------------------------

def test_alive_knows_this_hosts_processes():
    assert alive(worker_id()) is True
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    host, _, _ = worker_id().rsplit(":", 2)
    assert alive(f"{host}:{p.pid}:-") is False
    me = worker_id()
    assert alive(me.rsplit(":", 1)[0] + ":12345") is False          # a reused pid: other start time
    assert alive("some-other-host:1:1") is None                       # can't tell: left alone


def test_requeue_copies_params_and_gives_up_after_retries():
    ostudy = optuna.create_study()
    ostudy.enqueue_trial({"x": 0.25})
    ostudy.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    failed = ostudy.trials[0]
    for i in range(RETRIES):
        assert requeue(ostudy, failed)
        ostudy.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
        failed = ostudy.trials[-1]
        assert failed.params == {"x": 0.25}
        assert failed.user_attrs["retry_of"] == 0
        assert failed.user_attrs["retry_history"] == list(range(i + 1))
    assert not requeue(ostudy, failed)
    assert len(ostudy.trials) == RETRIES + 1


def test_a_trial_lost_before_drawing_its_params_is_queued_with_the_ones_it_was_queued_with():
    ostudy = optuna.create_study()
    ostudy.enqueue_trial({"x": 0.25})
    lost = ostudy.ask()                              # claimed, then lost before any suggest
    ostudy.tell(lost, state=S.FAIL)
    assert ostudy.trials[0].params == {} and requeue(ostudy, ostudy.trials[0])
    retry = ostudy.trials[1]
    assert retry.state == S.WAITING and enqueued_params(retry) == {"x": 0.25}
    assert retry.user_attrs == {"retry_of": 0, "retry_history": [0]}


def test_enqueued_params_reads_optunas_private_record_for_this_optuna_version():
    """Optuna has no public reader for a queued trial's params: `enqueued_params` reads its
    system attr "fixed_params". Written against optuna 5.0.0: on an upgrade, check that
    Study.enqueue_trial still records them there, then move this pin."""
    assert optuna.__version__ == "5.0.0", "optuna changed: re-check harness.sweep.optuna_studies.enqueued_params"
    ostudy = optuna.create_study()
    ostudy.enqueue_trial({"x": 0.5, "n": 3}, user_attrs={"note": "queued"})
    (queued,) = ostudy.trials
    assert enqueued_params(queued) == {"x": 0.5, "n": 3} and queued.user_attrs == {"note": "queued"}
    ostudy.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("n", 1, 5), n_trials=2)
    assert enqueued_params(ostudy.trials[0]) == {"x": 0.5, "n": 3}    # kept once it ran
    assert enqueued_params(ostudy.trials[1]) == {}                      # sampled, not queued


@pytest.mark.parametrize("run_status, expected", [
    ("RUNNING", "FAILED"),     # killed in the middle of the trial
    ("FINISHED", "FAILED"),    # killed after closing the run, before Optuna had the value
    ("KILLED", "KILLED"),      # already closed for another reason: left as it is
])
@pytest.mark.timeout(300)
def test_a_lost_trials_run_is_failed_and_its_params_queued_again(tmp_path, run_status, expected):
    """The worker's recovery, step by step on a journal: a RUNNING trial whose worker is dead
    ends FAIL, its MLflow run ends FAILED with the reason (even one its worker had already
    closed FINISHED: the study never got that value), and its params are queued again."""
    from harness.sweep.study import load_study
    from harness.sweep.worker import Worker
    ws = tmp_path / "ws"
    spec, uri = local_stores(ws)
    lines: list[str] = []
    study = load_study(tiny_study(tmp_path / "study.yaml", "lost", trials=2))
    w = Worker(study, Stores(ws, spec, uri).ready(), study.select(["naive"], 2), echo=lines.append)
    w.prepare()
    ostudy = w.ostudies["naive"]
    trial = ostudy.ask()                                     # the first (queued) trial, claimed
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("worker", f"{worker_id().rsplit(':', 2)[0]}:{dead.pid}:-")
    exp = w.tracking.client.get_experiment_by_name("lost").experiment_id
    run_id = w.tracking.client.create_run(exp, tags={"mlflow.parentRunId": w.parents["naive"]}).info.run_id
    if run_status != "RUNNING":
        w.tracking.client.set_terminated(run_id, status=run_status)
    trial.set_user_attr("mlflow_run_id", run_id)

    w._recover(ostudy)

    trials = ostudy.get_trials()
    assert trials[0].state == S.FAIL
    assert [(t.state, t.user_attrs.get("retry_of"), enqueued_params(t)) for t in trials[1:]] \
        == [(S.WAITING, 0, trials[0].params)]
    run = w.tracking.client.get_run(run_id)
    assert run.info.status == expected
    assert (run.data.tags.get("harness.reason", "").startswith("lost: its worker")) == (expected == "FAILED")
    assert lines == [f"[naive] trial 0 was lost (its worker ({trials[0].user_attrs['worker']}) died); queued again"]


@pytest.mark.parametrize("deferring", [False, True])
def test_a_first_ctrl_c_while_trials_run_waits_for_a_checkpoint(deferring):
    """Outside trials the first Ctrl-C raises at once; while they run it only marks the
    request, and the next checkpoint (between batches or trials) raises it: a store call
    in flight is never cut."""
    from harness import interrupts
    said: list[str] = []
    interrupts.install(said.append)
    try:
        with interrupts.deferred() if deferring else contextlib.nullcontext():
            with pytest.raises(KeyboardInterrupt) if not deferring else contextlib.nullcontext():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)                       # the handler runs here
            assert said == ["interrupted: stopping the running trial and closing the stores "
                            "(Ctrl-C again to quit at once)"]
            with pytest.raises(KeyboardInterrupt):
                interrupts.checkpoint()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


FIRST_CTRL_C = "interrupted: stopping the running trial and closing the stores (Ctrl-C again to quit at once)"
SECOND_CTRL_C = "interrupted again: exiting now"

_WAITS_FOR_A_STORE = """
import sys, time
from harness import interrupts
interrupts.install(lambda s: print(s, file=sys.stderr, flush=True))
interrupts.on_second.append(lambda: print("hook: forwarded to the workers", file=sys.stderr, flush=True))
with interrupts.deferred():
    try:
        print("ready", flush=True)
        while True:          # a store call in flight: no checkpoint comes
            time.sleep(0.01)
    finally:
        print("closed the stores", file=sys.stderr, flush=True)
"""


@pytest.mark.timeout(300)
def test_a_second_ctrl_c_runs_the_hooks_says_so_and_exits_130_at_once():
    """The first Ctrl-C waits for a checkpoint that does not come; the second runs the
    on_second hooks (the supervisor forwards it to its workers), prints its own line and
    exits 130 there and then: not even a `finally` runs (no clean stop)."""
    p = subprocess.Popen([sys.executable, "-c", _WAITS_FOR_A_STORE], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGINT)
        assert p.stderr.readline() == FIRST_CTRL_C + "\n"   # printed once the second handler is in place
        assert p.poll() is None                              # the first only asked
        p.send_signal(signal.SIGINT)
        rest = p.stderr.read()
        assert p.wait() == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rest == "hook: forwarded to the workers\n" + SECOND_CTRL_C + "\n"


# --- crashes, for real ---------------------------------------------------------------------------

def tiny_study(path: Path, name: str, trials: int, epochs: int = 2, per_class: int = 24) -> Path:
    """studies/quickstart.yaml shrunk (tests/shipped.py) to a tiny naive-only study, written
    to `path`: resnet18 from scratch on 2 classes x `per_class` images at 16 px, batch 8,
    `epochs` epochs, `trials` random trials, no pruner, compare at its default 3 seeds."""
    shrunk = shrink(resolve_study("quickstart"), path.parent, name=name,
                    recipe={"seed": 0, "device": "cpu",
                            "data": {"dataset": "fashion-mnist", "classes": ["Sandal", "Bag"],
                                     "train_per_class": per_class, "val_fraction": 0.25, "image_size": 16,
                                     "batch_size": 8, "augment": False},
                            "model": {"arch": "resnet18", "weights": "none", "head": "fastai"}},
                    budget={"epochs": epochs}, metric="val/accuracy", trials=trials, sampler="random",
                    pruner="none", strategies={"naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
                    compare={"seeds": 3})
    assert not shrunk.pretrain
    shrunk.path.replace(path)      # self-contained (its recipe inline): it may move
    return path


class Proc:
    """`python -m harness ...` in its own process group, output kept in a file."""

    def __init__(self, args: list, log: Path, env: dict | None = None):
        self.log = log
        self.out = open(log, "w")
        self.p = subprocess.Popen([sys.executable, "-m", "harness", *map(str, args)], stdout=self.out,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.p.wait(timeout)
        finally:
            self.out.close()

    @property
    def text(self) -> str:
        return self.log.read_text()


def local_stores(ws: Path) -> tuple[str, str]:
    """A workspace's default Optuna storage and MLflow tracking URI."""
    return str(ws.resolve() / "optuna.journal"), f"sqlite:///{ws.resolve() / 'mlflow.db'}"


def load(spec: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=st.open_storage(spec))


def wait_until(predicate, timeout: float, what: str, proc: Proc | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.p.poll() is not None:
            pytest.fail(f"{what}: the process ended first ({proc.p.returncode}):\n{proc.text[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def running_trial_of(spec: str, name: str, pid: int | None = None, after_complete: int = 0):
    """A RUNNING trial (of process `pid`) once `after_complete` trials are complete, caught
    in its first epoch (no value reported yet), so a signal sent now lands inside the trial
    and not after it has ended."""
    def find():
        try:
            trials = load(spec, name).get_trials(deepcopy=False)
        except (KeyError, HarnessError):
            return None
        if sum(t.state == S.COMPLETE for t in trials) < after_complete:
            return None
        for t in trials:
            wid = t.user_attrs.get("worker", "")
            if (t.state == S.RUNNING and "mlflow_run_id" in t.user_attrs and not t.intermediate_values
                    and (pid is None or f":{pid}:" in wid)):
                return t
        return None
    return find


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=5000)


def check_recovered(spec: str, uri: str, study: str, n: int, killed: optuna.trial.FrozenTrial,
                    completed_before: dict[int, float], reason: str) -> None:
    """After the crash: the killed trial FAIL and re-run with its params, its MLflow run
    FAILED, nothing completed lost, the study at its count, every run closed."""
    trials = load(spec, f"{study}/naive").get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[killed.number].state == S.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].state == S.COMPLETE
    assert retry[0].params == killed.params
    for number, value in completed_before.items():
        assert by_number[number].state == S.COMPLETE and by_number[number].value == value
    assert sum(t.state == S.COMPLETE for t in trials) == n
    assert len({t.number for t in trials}) == len(trials)
    runs = {r.info.run_id: r for r in mlflow_runs(uri, study)}
    lost = runs[killed.user_attrs["mlflow_run_id"]]
    assert lost.info.status == "FAILED"
    assert lost.data.tags["harness.reason"].startswith("lost: ") and reason in lost.data.tags["harness.reason"]
    assert all(r.info.status != "RUNNING" for r in runs.values()), \
        [(r.info.run_name, r.info.status) for r in runs.values()]
    parents = [r for r in runs.values() if r.data.tags.get("harness.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(kids) == len(trials)


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_mid_trial_on_the_journal_then_restart(tmp_path):
    """One machine: a worker is SIGKILLed in a trial; the restarted worker fails it (its
    process is gone), runs it again and completes the study."""
    study = tiny_study(tmp_path / "study.yaml", "kill-journal", trials=3)
    ws = tmp_path / "ws"
    spec, uri = local_stores(ws)
    first = Proc(["worker", study, "--workspace", ws], tmp_path / "w1.log")
    victim = wait_until(running_trial_of(spec, "kill-journal/naive", first.p.pid, after_complete=1), 240,
                        "a running trial after a complete one", first)
    completed = {t.number: t.value for t in load(spec, "kill-journal/naive").get_trials() if t.state == S.COMPLETE}
    first.p.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    assert load(spec, "kill-journal/naive").trials[victim.number].state == S.RUNNING   # nobody closed it

    again = Proc(["worker", study, "--workspace", ws], tmp_path / "w2.log")
    assert again.wait() == 0, again.text
    assert f"trial {victim.number} was lost (its worker" in again.text
    check_recovered(spec, uri, "kill-journal", 3, victim, completed, "died")


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sweep_with_two_workers_survives_one_killed(tmp_path):
    """`harness sweep --workers 2`: one worker is SIGKILLed mid-trial; the other notices,
    re-runs its trial and finishes the study; the sweep reports the death and exits 1."""
    study = tiny_study(tmp_path / "study.yaml", "kill-two", trials=4)
    ws = tmp_path / "ws"
    spec, uri = local_stores(ws)
    sweep = Proc(["sweep", study, "--workspace", ws, "--workers", "2"], tmp_path / "sweep.log")
    victim = wait_until(running_trial_of(spec, "kill-two/naive", after_complete=1), 240,
                        "a running trial after a complete one", sweep)
    completed = {t.number: t.value for t in load(spec, "kill-two/naive").get_trials() if t.state == S.COMPLETE}
    pid = int(victim.user_attrs["worker"].rsplit(":", 2)[1])
    os.kill(pid, signal.SIGKILL)
    assert sweep.wait() == 1, sweep.text
    assert "was killed by SIGKILL" in sweep.text
    check_recovered(spec, uri, "kill-two", 4, victim, completed, "died")
    workers = {r.data.tags.get("harness.worker") for r in mlflow_runs(uri, "kill-two")
               if "optuna.trial_number" in r.data.tags}
    assert workers == {"w1", "w2"}


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_on_postgres_is_caught_by_heartbeat(tmp_path, pg_url, mlflow_server):
    """Many machines: two workers on PostgreSQL and an MLflow server; one is SIGKILLed in a
    trial. The other sees its heartbeat stop, fails the trial, re-runs it and completes the
    study; the killed worker, started again, finds nothing left to do. The database
    password never shows in output, params or tags."""
    password = "s3cret-pw-123"         # trust auth: any password is accepted
    spec = pg_url.replace("postgres@", f"postgres:{password}@")
    env = {"HARNESS_STORAGE": spec, "MLFLOW_TRACKING_URI": mlflow_server, "HARNESS_HEARTBEAT": "1"}
    # 6 trials: worker a gets two or three, so the poll (a new storage per look, slow on a busy
    # machine) has more than one trial's first epoch to catch it in (4 trials missed it once)
    study = tiny_study(tmp_path / "study.yaml", f"kill-pg-{tmp_path.name[-12:]}", trials=6)
    name = yaml.safe_load(study.read_text())["name"]
    a = Proc(["worker", study, "--workspace", tmp_path / "a", "--name", "a"], tmp_path / "a.log", env)
    b = Proc(["worker", study, "--workspace", tmp_path / "b", "--name", "b"], tmp_path / "b.log", env)
    victim = wait_until(running_trial_of(spec, f"{name}/naive", a.p.pid, after_complete=1), 300,
                        "worker a running a trial after a complete one", a)
    completed = {t.number: t.value for t in load(spec, f"{name}/naive").get_trials() if t.state == S.COMPLETE}
    a.p.send_signal(signal.SIGKILL)
    assert a.wait(30) == -signal.SIGKILL
    assert b.wait() == 0, b.text
    assert f"trial {victim.number} was lost (its worker stopped sending heartbeats); queued again" in b.text
    a2 = Proc(["worker", study, "--workspace", tmp_path / "a", "--name", "a"], tmp_path / "a2.log", env)
    assert a2.wait(120) == 0, a2.text
    check_recovered(spec, mlflow_server, name, 6, victim, completed, "heartbeat")

    # kept models are artifacts of their trials' runs on the server: any node's compare reads them
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_server)
    kept = {r.data.tags["optuna.trial_number"]: [f.path for f in client.list_artifacts(r.info.run_id, "kept")]
            for r in mlflow_runs(mlflow_server, name) if "optuna.trial_number" in r.data.tags}
    assert any(kept.values()) and all(paths in ([], [f"kept/trial-{n}.pt"]) for n, paths in kept.items()), kept

    for log in (a.text, b.text, a2.text):
        assert password not in log
    for r in mlflow_runs(mlflow_server, name):
        assert not any(password in v for v in [*r.data.params.values(), *r.data.tags.values()])


def check_lost_store_then_resume(proc: Proc, study: Path, spec: str, victim: optuna.trial.FrozenTrial,
                                 n: int, env: dict | None = None) -> None:
    """A worker whose store stopped answering mid-trial ended with one line, exit 2; the
    same sweep, run again once the store is back, re-runs the trial and completes."""
    errors = [line for line in proc.text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped answering in the middle of the run" in errors[0], proc.text
    assert "Traceback" not in proc.text and "Exception in thread" not in proc.text, proc.text
    resumed = Proc(["sweep", study, "--workspace", study.parent / "ws"], study.parent / "resume.log", env)
    assert resumed.wait() == 0, resumed.text
    name = yaml.safe_load(study.read_text())["name"] + "/naive"
    trials = load(spec, name).get_trials()
    assert trials[victim.number].state == S.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state == S.COMPLETE and retry[0].params == victim.params
    assert sum(t.state == S.COMPLETE for t in trials) == n


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_tracking_server_lost_mid_trial_is_one_line_and_the_sweep_resumes(tmp_path):
    """The MLflow server stops in the middle of a trial: the worker ends with one line (no
    traceback) and exit 2; the sweep, run again (here on the local store), completes."""
    from services import compose_mlflow_server, stop_group
    study = tiny_study(tmp_path / "study.yaml", "lost-server", trials=2)
    spec, _ = local_stores(tmp_path / "ws")
    started: list = []
    with compose_mlflow_server(tmp_path / "mlartifacts", started) as uri:
        w = Proc(["worker", study, "--workspace", tmp_path / "ws", "--tracking-uri", uri], tmp_path / "w.log",
                 {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        victim = wait_until(running_trial_of(spec, "lost-server/naive", w.p.pid), 240, "a running trial", w)
        stop_group(started[0])
        assert w.wait(180) == 2, w.text
    check_lost_store_then_resume(w, study, spec, victim, 2)


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_database_lost_mid_trial_is_one_line_and_the_sweep_resumes(tmp_path, pg_url):
    """PostgreSQL refuses connections in the middle of a trial (the open ones cut): the
    worker ends with one line and exit 2; once the database is back, the sweep completes."""
    from services import pg_outage
    study = tiny_study(tmp_path / "study.yaml", "lost-db", trials=2)
    env = {"HARNESS_STORAGE": pg_url, "HARNESS_HEARTBEAT": "1"}
    w = Proc(["worker", study, "--workspace", tmp_path / "ws"], tmp_path / "w.log", env)
    victim = wait_until(running_trial_of(pg_url, "lost-db/naive", w.p.pid), 240, "a running trial", w)
    pg_outage(pg_url, True)
    try:
        assert w.wait(180) == 2, w.text
    finally:
        pg_outage(pg_url, False)
    # the heartbeat thread and the trial race to the lost database: when the thread loses it
    # first, it says so in one warning line (the line itself is pinned, without the race, by
    # test_a_heartbeat_thread_that_loses_its_store_says_so_in_one_line)
    beats = [line for line in w.text.splitlines() if "heartbeat" in line]
    assert all(line.startswith("warning: the trial heartbeat stopped (OperationalError") for line in beats), w.text
    assert "ExperimentalWarning" not in w.text
    check_lost_store_then_resume(w, study, pg_url, victim, 2, env)


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ctrl_c_stops_the_trial_cleanly_and_the_sweep_resumes(tmp_path):
    study = tiny_study(tmp_path / "study.yaml", "ctrl-c", trials=3)
    ws = tmp_path / "ws"
    spec, uri = local_stores(ws)
    sweep = Proc(["sweep", study, "--workspace", ws], tmp_path / "sweep.log")
    victim = wait_until(running_trial_of(spec, "ctrl-c/naive", sweep.p.pid, after_complete=1), 240,
                        "a running trial", sweep)
    sweep.p.send_signal(signal.SIGINT)
    assert sweep.wait(60) == 130, sweep.text
    assert "interrupted: stopping the running trial" in sweep.text and "Traceback" not in sweep.text
    t = load(spec, "ctrl-c/naive").trials[victim.number]
    assert t.state == S.FAIL and t.user_attrs["interrupted"] is True
    runs = {r.info.run_id: r for r in mlflow_runs(uri, "ctrl-c")}
    assert runs[victim.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    (parent,) = [r for r in runs.values() if r.data.tags.get("harness.kind") == "sweep"]
    assert parent.info.status == "KILLED"

    resumed = Proc(["sweep", study, "--workspace", ws], tmp_path / "resume.log")
    assert resumed.wait() == 0, resumed.text
    trials = load(spec, "ctrl-c/naive").get_trials()
    retry = [x for x in trials if x.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state == S.COMPLETE and retry[0].params == victim.params
    assert sum(x.state == S.COMPLETE for x in trials) == 3
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(uri, "ctrl-c"))


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """A sweep is caught where the first Ctrl-C can only wait: between trials, waiting for
    the study lock that this test holds. The second Ctrl-C exits 130 while the lock is still
    held, with its own line and none of the clean stop's (the parent run is not closed); the
    next run finishes the study."""
    study = tiny_study(tmp_path / "study.yaml", "ctrl-c2", trials=2)
    ws = tmp_path / "ws"
    spec, uri = local_stores(ws)
    sweep = Proc(["sweep", study, "--workspace", ws], tmp_path / "sweep.log")
    wait_until(running_trial_of(spec, "ctrl-c2/naive", sweep.p.pid), 240, "a running trial", sweep)
    with st.StudyLock(spec, "ctrl-c2/naive"):
        waiting = waits_for_lock(sweep.p.pid, spec)
        wait_until(waiting, 300, "the sweep waiting for the study lock", sweep)
        sweep.p.send_signal(signal.SIGINT)
        wait_until(lambda: FIRST_CTRL_C in sweep.text, 120, "the first Ctrl-C's line", sweep)
        assert waiting() and sweep.p.poll() is None           # the first Ctrl-C only asked
        sweep.p.send_signal(signal.SIGINT)
        assert sweep.wait(300) == 130, sweep.text             # out with the lock still held here
    lines = sweep.text.strip().splitlines()
    assert lines[-1] == SECOND_CTRL_C and "Traceback" not in sweep.text, sweep.text
    assert "interrupted" not in lines                         # the clean stop's last line
    (parent,) = [r for r in mlflow_runs(uri, "ctrl-c2") if r.data.tags.get("harness.kind") == "sweep"]
    assert parent.info.status == "RUNNING"                    # a clean stop would have closed it KILLED
    resumed = Proc(["sweep", study, "--workspace", ws], tmp_path / "resume.log")
    assert resumed.wait() == 0, resumed.text
    assert sum(x.state == S.COMPLETE for x in load(spec, "ctrl-c2/naive").get_trials()) == 2
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(uri, "ctrl-c2"))


def waits_for_lock(pid: int, spec: str):
    """Is process `pid` blocked on the study lock file beside `spec` (a waiter in /proc/locks)?"""
    inode = str(os.stat(f"{st.local_file(spec)}.harness-lock").st_ino)

    def waiting() -> bool:
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if "->" in parts:
                kind, owner, where = parts[parts.index("->") + 1], parts[-4], parts[-3]
                if kind == "FLOCK" and owner == str(pid) and where.rsplit(":", 1)[-1] == inode:
                    return True
        return False
    return waiting
