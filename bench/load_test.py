#!/usr/bin/env python
"""Load test: K `harness worker` processes share one study on PostgreSQL and an MLflow server.

    python bench/load_test.py [--workers 4] [--trials-per-worker 50] [--engine local|ray] [--storage postgresql://...]
        [--tracking-uri http://...] [--heartbeat 30] [--timeout 1800] [--out RESULT.json]

The study is the shortest real fine-tune (Fashion-MNIST, 2 classes x 8 images at 16 px,
1 epoch, linear head, CPU) with one strategy and workers x trials-per-worker trials. The
workers run `python -m harness worker` as docker/compose.yaml's `worker` service does:
the stores come from HARNESS_STORAGE and MLFLOW_TRACKING_URI, one torch thread each.

Checked afterwards (exit 1 if any fails): every worker exited 0; the Optuna study has
exactly N trials, numbered 0..N-1, all COMPLETE (none FAIL, RUNNING, WAITING, PRUNED); no
lock, deadlock or other error lines in the workers' output; in MLflow one parent run
(FINISHED), exactly N child runs under it, each trial's `mlflow_run_id` among them,
FINISHED, tagged with the trial's number; no run left RUNNING.

Without --storage, a PostgreSQL database of its own is created and dropped afterwards (the
server of HARNESS_TEST_PG, default postgresql://postgres@127.0.0.1:5432/test). Without
--tracking-uri, docker/compose.yaml's own `mlflow server` command runs on loopback against
another such database. Both come from tests/services.py, as in the test suite.
How to read the result: bench/README.md, "Load test".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))             # run from anywhere, installed or not
sys.path.insert(0, str(ROOT / "tests"))   # services.py: PostgreSQL databases, the compose mlflow server

import yaml  # noqa: E402

STRATEGY = "naive"
# what a lock or database problem, or any crash, prints (case-insensitive; "errors" alone is
# the status line's "binomial standard errors", not a problem)
ERROR_PATTERN = re.compile(r"traceback|deadlock|could not obtain lock|database is locked|error\b", re.IGNORECASE)


def study_dict(name: str, trials: int) -> dict:
    """One strategy, random sampler, no pruner; a trial is ~1-2 s of CPU."""
    return {
        "name": name,
        "recipe": {"seed": 0, "device": "cpu",
                   "data": {"dataset": "fashion-mnist", "classes": ["Sandal", "Bag"], "train_per_class": 8,
                            "val_fraction": 0.25, "image_size": 16, "batch_size": 8, "augment": False},
                   "model": {"arch": "resnet18", "weights": "none", "head": "linear"}},
        "budget": {"epochs": 1}, "metric": "val/accuracy", "trials": trials,
        "sampler": "random", "pruner": "none",
        "strategies": {STRATEGY: {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
    }


def machine() -> dict:
    import torch
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"cpu_count": os.cpu_count(), "cpu": cpu, "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_at_start": list(os.getloadavg())}


def versions(storage: str) -> dict:
    import mlflow
    import optuna
    import torch
    out = {"torch": torch.__version__, "optuna": optuna.__version__, "mlflow": mlflow.__version__}
    if storage.startswith(("postgresql://", "postgres://")):
        with contextlib.suppress(Exception):
            import psycopg
            with psycopg.connect(storage, connect_timeout=10) as con:
                out["postgresql"] = con.execute("SHOW server_version").fetchone()[0]
    return out


# --- the run -------------------------------------------------------------------------------------

def run_load_test(storage: str, tracking_uri: str, workdir: str | Path, workers: int = 4,
                  trials_per_worker: int = 50, heartbeat: int = 30, timeout: float = 1800,
                  echo: Callable[[str], None] = print, engine: str = "local") -> dict:
    """Run the workers to the end, check both stores; the result (result['ok'], result['failures']).
    engine "ray": one `harness sweep --engine ray --workers K` on a local two-node Ray cluster
    (tests/services.py RayNodes) instead of K `harness worker` processes."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n = workers * trials_per_worker
    name = f"load-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    study_path = workdir / "study.yaml"
    study_path.write_text(yaml.safe_dump(study_dict(name, n), sort_keys=False))

    env = {**os.environ, "HARNESS_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking_uri,
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("HARNESS_HEARTBEAT", None)
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    echo(f"{workers} workers x {trials_per_worker} trials = {n} trials of study {name}"
         + (" (Ray tasks on a local two-node cluster)" if engine == "ray" else ""))
    with contextlib.ExitStack() as stack:
        if engine == "ray":
            from services import NO_RAY_AUTH, RayNodes
            cluster = stack.enter_context(RayNodes(2, cpus=(workers + 1) // 2))
            env.update(NO_RAY_AUTH)
            commands = {"driver": ["sweep", str(study_path), "--engine", "ray", "--address", cluster.address,
                                   "--workers", str(workers), "--workspace", str(workdir / "ws")]}
        else:
            commands = {f"w{i + 1}": ["worker", str(study_path), "--workspace", str(workdir / f"ws-w{i + 1}"),
                                      "--name", f"w{i + 1}"] for i in range(workers)}
        started = time.monotonic()
        started_utc = datetime.now(timezone.utc)
        try:
            for wname, argv in commands.items():
                logs[wname] = workdir / f"{wname}.log"
                with open(logs[wname], "w") as log:
                    procs[wname] = subprocess.Popen(
                        [sys.executable, "-m", "harness", *argv, "--heartbeat", str(heartbeat)],
                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True)
            timed_out = _wait(procs, started + timeout, lambda: _progress(storage, f"{name}/{STRATEGY}", n), echo)
        finally:
            for p in procs.values():     # only on an error or a timeout: normally all have exited
                if p.poll() is None:
                    _stop(p)
        wall = time.monotonic() - started
    result = check(storage, tracking_uri, name, n, procs, logs)
    result.update({
        "engine": engine, "study": name, "workers": workers, "trials_per_worker": trials_per_worker, "trials": n,
        "heartbeat_s": heartbeat, "started_utc": started_utc.isoformat(timespec="seconds"),
        "wall_s": round(wall, 1), "trials_per_min": round(result["complete"] / wall * 60, 1),
        "timed_out": timed_out, "logs": str(workdir),
    })
    if timed_out:
        result["failures"].insert(0, f"timed out after {timeout:.0f} s: workers stopped")
        result["ok"] = False
    return result


def _wait(procs: dict[str, subprocess.Popen], deadline: float, progress: Callable[[], str],
          echo: Callable[[str], None], every: float = 30) -> bool:
    """Wait for every worker; True when the deadline came first."""
    next_report = time.monotonic() + every
    while any(p.poll() is None for p in procs.values()):
        if time.monotonic() > deadline:
            return True
        if time.monotonic() > next_report:
            next_report += every
            echo(progress())
        time.sleep(1)
    return False


def _progress(storage: str, study_name: str, n: int) -> str:
    import optuna
    from harness.sweep import storage as st
    try:
        states = Counter(t.state.name for t in optuna.load_study(
            study_name=study_name, storage=st.open_storage(storage)).get_trials(deepcopy=False))
    except Exception as e:   # not created yet, or a hiccup: only a progress line
        return f"  progress: ({e.__class__.__name__})"
    return f"  progress: {states.get('COMPLETE', 0)}/{n} complete, {states.get('RUNNING', 0)} running"


def _stop(p: subprocess.Popen) -> None:
    """Ctrl-C as `docker compose stop` does, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the checks ----------------------------------------------------------------------------------

def check(storage: str, tracking_uri: str, name: str, n: int, procs: dict[str, subprocess.Popen],
          logs: dict[str, Path]) -> dict:
    import optuna
    from mlflow.tracking import MlflowClient

    from harness.sweep import storage as st

    failures: list[str] = []
    r: dict = {"exit_codes": {w: p.returncode for w, p in procs.items()}}
    for w, rc in r["exit_codes"].items():
        if rc != 0:
            failures.append(f"worker {w} exited with {rc}")

    # Optuna
    try:
        trials = optuna.load_study(study_name=f"{name}/{STRATEGY}", storage=st.open_storage(storage)).get_trials()
    except KeyError:
        trials = []
    states = Counter(t.state.name for t in trials)
    numbers = [t.number for t in trials]
    pid_to_worker = {p.pid: w for w, p in procs.items()}
    ray = set(procs) == {"driver"}   # Ray workers: known by their tokens
    by_worker = Counter(f"ray-{t.user_attrs.get('worker', '?')[:6]}" if ray else
                        pid_to_worker.get(_pid(t.user_attrs.get("worker", "")), "?") for t in trials
                        if t.state.name == "COMPLETE")
    seconds = [t.user_attrs["seconds"] for t in trials if "seconds" in t.user_attrs]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    r.update({
        "optuna_trials": len(trials), "complete": states.get("COMPLETE", 0),
        "fail": states.get("FAIL", 0), "running": states.get("RUNNING", 0),
        "waiting": states.get("WAITING", 0), "pruned": states.get("PRUNED", 0),
        "numbers_unique": len(set(numbers)) == len(numbers),
        "numbers_are_0_to_n_minus_1": sorted(numbers) == list(range(n)),
        "trials_per_worker_done": dict(sorted(by_worker.items())),
        "trial_seconds_median": round(statistics.median(seconds), 2) if seconds else None,
        "trial_seconds_max": round(max(seconds), 2) if seconds else None,
        # first trial start -> last trial end: throughput without the workers' start-up
        "steady_trials_per_min": (round(len(ends) / (max(ends) - min(starts)).total_seconds() * 60, 1)
                                  if ends and starts and max(ends) > min(starts) else None),
    })
    if len(trials) != n:
        failures.append(f"Optuna has {len(trials)} trials, expected {n}")
    if not r["numbers_unique"]:
        dup = [k for k, c in Counter(numbers).items() if c > 1]
        failures.append(f"trial numbers repeated: {dup[:10]}")
    if not r["numbers_are_0_to_n_minus_1"]:
        missing = sorted(set(range(n)) - set(numbers))
        failures.append(f"trial numbers are not 0..{n - 1} (missing {missing[:10]}, "
                        f"extra {sorted(set(numbers) - set(range(n)))[:10]})")
    for state in ("FAIL", "RUNNING", "WAITING", "PRUNED"):
        if states.get(state):
            failures.append(f"{states[state]} trial(s) {state}")
    if states.get("COMPLETE", 0) != n:
        failures.append(f"{states.get('COMPLETE', 0)} of {n} trials COMPLETE")
    if "?" in by_worker:
        failures.append(f"{by_worker['?']} complete trial(s) name no worker of this run")

    # the workers' output
    error_lines = []
    for w, path in logs.items():
        for line in path.read_text(errors="replace").splitlines():
            if ERROR_PATTERN.search(line):
                error_lines.append(f"{w}: {line.strip()[:300]}")
    r["error_lines"] = len(error_lines)
    r["error_lines_sample"] = error_lines[:20]
    if error_lines:
        failures.append(f"{len(error_lines)} error line(s) in the workers' output, e.g. {error_lines[0]}")

    # MLflow
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    runs = _all_runs(client, exp.experiment_id) if exp else []
    by_id = {run.info.run_id: run for run in runs}
    parents = [run for run in runs if run.data.tags.get("harness.kind") == "sweep"]
    parent = parents[0] if len(parents) == 1 else None
    children = [run for run in runs if parent and run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    still_running = [run.info.run_name for run in runs if run.info.status == "RUNNING"]
    bad_runs = []
    for t in trials:
        rid = t.user_attrs.get("mlflow_run_id")
        run = by_id.get(rid)
        if run is None:
            bad_runs.append(f"trial {t.number}: run {rid} missing")
        elif parent is None or run.data.tags.get("mlflow.parentRunId") != parent.info.run_id:
            bad_runs.append(f"trial {t.number}: run {rid} not under the parent")
        elif run.info.status != "FINISHED":
            bad_runs.append(f"trial {t.number}: run {rid} is {run.info.status}")
        elif run.data.tags.get("optuna.trial_number") != str(t.number):
            bad_runs.append(f"trial {t.number}: run {rid} tagged {run.data.tags.get('optuna.trial_number')}")
    r.update({
        "mlflow_runs": len(runs), "mlflow_parent_runs": len(parents),
        "mlflow_parent_status": parent.info.status if parent else None,
        "mlflow_child_runs": len(children),
        "mlflow_child_runs_per_worker": dict(sorted(Counter(c.data.tags.get("harness.worker", "?")
                                                            for c in children).items())),
        "mlflow_runs_running": len(still_running), "mlflow_trial_run_problems": len(bad_runs),
    })
    if len(parents) != 1:
        failures.append(f"{len(parents)} parent (harness.kind=sweep) runs, expected 1")
    elif parent.info.status != "FINISHED":
        failures.append(f"the parent run is {parent.info.status}")
    if len(children) != n:
        failures.append(f"{len(children)} child runs under the parent, expected {n}")
    if len(runs) != n + 1:
        failures.append(f"{len(runs)} runs in the experiment, expected {n + 1}")
    if still_running:
        failures.append(f"{len(still_running)} run(s) still RUNNING: {still_running[:5]}")
    if bad_runs:
        failures.append(f"{len(bad_runs)} trial(s) without a good MLflow run, e.g. {bad_runs[0]}")
    r["ok"], r["failures"] = not failures, failures
    return r


def _pid(worker_id: str) -> int | None:
    try:
        return int(worker_id.rsplit(":", 2)[1])
    except (IndexError, ValueError):
        return None


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# --- the command line ----------------------------------------------------------------------------

def table(r: dict) -> str:
    def yes(ok: bool) -> str:
        return "ok" if ok else "FAIL"
    n = r["trials"]
    rows = [
        ("workers x trials", f"{r['workers']} x {r['trials_per_worker']} = {n}", ""),
        ("wall seconds", f"{r['wall_s']:.1f}", ""),
        ("trials per minute (wall)", f"{r['trials_per_min']:.1f}", ""),
        ("trials per minute (first start -> last end)", f"{r['steady_trials_per_min']}", ""),
        ("trial seconds, median / max", f"{r['trial_seconds_median']} / {r['trial_seconds_max']}", ""),
        ("complete trials per worker", ", ".join(f"{k} {v}" for k, v in r["trials_per_worker_done"].items()), ""),
        ("worker exit codes", ", ".join(f"{k} {v}" for k, v in r["exit_codes"].items()),
         yes(all(v == 0 for v in r["exit_codes"].values()))),
        ("Optuna trials / COMPLETE", f"{r['optuna_trials']} / {r['complete']}",
         yes(r["optuna_trials"] == n == r["complete"])),
        ("trial numbers unique, 0..N-1", f"{r['numbers_unique']}, {r['numbers_are_0_to_n_minus_1']}",
         yes(r["numbers_unique"] and r["numbers_are_0_to_n_minus_1"])),
        ("FAIL / RUNNING / WAITING / PRUNED", f"{r['fail']} / {r['running']} / {r['waiting']} / {r['pruned']}",
         yes(not (r["fail"] or r["running"] or r["waiting"] or r["pruned"]))),
        ("error lines in worker output", str(r["error_lines"]), yes(r["error_lines"] == 0)),
        ("MLflow parent runs (status)", f"{r['mlflow_parent_runs']} ({r['mlflow_parent_status']})",
         yes(r["mlflow_parent_runs"] == 1 and r["mlflow_parent_status"] == "FINISHED")),
        ("MLflow child runs under the parent", str(r["mlflow_child_runs"]), yes(r["mlflow_child_runs"] == n)),
        ("trials whose run is missing/misplaced/not FINISHED", str(r["mlflow_trial_run_problems"]),
         yes(r["mlflow_trial_run_problems"] == 0)),
        ("MLflow runs still RUNNING", str(r["mlflow_runs_running"]), yes(r["mlflow_runs_running"] == 0)),
    ]
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    lines.append("RESULT: " + ("PASS" if r["ok"] else "FAIL\n  " + "\n  ".join(r["failures"])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="ray: the workers as Ray tasks (harness sweep --engine ray) on a local two-node cluster")
    ap.add_argument("--trials-per-worker", type=int, default=50)
    ap.add_argument("--storage", default=None,
                    help="postgresql://... for Optuna (default: a database of its own, dropped afterwards)")
    ap.add_argument("--tracking-uri", default=None,
                    help="http://... of an MLflow server (default: docker/compose.yaml's `mlflow server` "
                         "on loopback, with a PostgreSQL database of its own)")
    ap.add_argument("--heartbeat", type=int, default=30, help="the workers' --heartbeat (seconds)")
    ap.add_argument("--timeout", type=float, default=1800, help="stop the workers after this many seconds")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (study, worker logs, workspaces)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)

    from harness.errors import redact

    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="harness-load-")) if args.keep else \
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="harness-load-")))
        storage, tracking = args.storage, args.tracking_uri
        if storage is None:
            from services import pg_database
            storage = stack.enter_context(pg_database())
        if tracking is None:
            from services import compose_mlflow_server
            (work / "mlartifacts").mkdir()
            print("starting docker/compose.yaml's mlflow server on loopback ...", flush=True)
            tracking = stack.enter_context(compose_mlflow_server(work / "mlartifacts"))
        info = {"date": datetime.now().date().isoformat(), "machine": machine(), "versions": versions(storage),
                "storage": redact(storage) if args.storage else "postgresql (a database of its own)",
                "tracking": tracking if args.tracking_uri else "docker/compose.yaml mlflow server on loopback "
                                                              "(PostgreSQL backend)"}
        result = run_load_test(storage, tracking, work, args.workers, args.trials_per_worker, args.heartbeat,
                               args.timeout, echo=lambda s: print(s, flush=True), engine=args.engine)
        if not args.keep:
            result.pop("logs")
        result = {**info, **result}
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
