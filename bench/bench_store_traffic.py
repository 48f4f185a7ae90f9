#!/usr/bin/env python
"""What one trial asks of the shared stores: MLflow server requests and PostgreSQL statements.

    python bench/bench_store_traffic.py [--trials 4] [--out RESULT.json]

Runs the load test's study (bench/load_test.py: the shortest real fine-tune) in this process
as one worker, twice: with 1 and with 3 epochs per trial, against a PostgreSQL database of
its own and docker/compose.yaml's `mlflow server` on loopback (tests/services.py). Every
HTTP request of the MLflow client and every SQL statement of Optuna's storage and the study
lock is counted, and how long each hold of a study lock lasts (a claim is serialised per
study: with many workers and short trials, the lock is what a study waits on). The difference between the runs is what one more epoch costs; the rest is
the fixed cost of a trial (its run, params, tags, plots, the claim). docs/scale-out.md turns
these counts into a fleet's load: counts do not depend on the machine, only times do.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import yaml  # noqa: E402


class Counts:
    """MLflow requests by endpoint and SQL statements, counted while installed."""

    def __init__(self):
        self.http: Counter = Counter()
        self.sql = 0
        self.holds: list[float] = []   # seconds each study lock was held (claims, joins, closes)

    def install(self) -> None:
        import mlflow.utils.rest_utils as rest
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        real = rest.http_request

        def counted(host_creds, endpoint, method, *args, **kwargs):
            self.http[f"{method} {endpoint.split('/api/', 1)[-1]}"] += 1
            return real(host_creds, endpoint, method, *args, **kwargs)

        rest.http_request = counted
        # the tracking store's modules bound the name at import: patch them too
        for mod in list(sys.modules.values()):
            if getattr(mod, "http_request", None) is real and mod is not rest:
                mod.http_request = counted

        @event.listens_for(Engine, "before_cursor_execute")
        def _sql(*_args, **_kwargs):
            self.sql += 1

        from harness.sweep.storage import StudyLock
        acquire, release = StudyLock.acquire, StudyLock.release

        def timed_acquire(lock):
            out = acquire(lock)
            lock._held_since = time.perf_counter()
            return out

        def timed_release(lock):
            since = getattr(lock, "_held_since", None)
            release(lock)
            if since is not None:
                self.holds.append(time.perf_counter() - since)
                lock._held_since = None

        StudyLock.acquire, StudyLock.release = timed_acquire, timed_release

    def snapshot(self) -> tuple[int, int]:
        return sum(self.http.values()), self.sql


def sweep(study_path: Path, ws: Path, storage: str, tracking: str) -> None:
    from harness.sweep.run import run_sweep
    from harness.sweep.study import load_study
    from harness.workspace import Stores
    study = load_study(study_path)
    run_sweep(study, Stores.resolve(ws, storage, tracking), study.select(), echo=lambda s: None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")   # no link per run

    import matplotlib
    matplotlib.use("Agg")
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from load_test import study_dict
    from services import compose_mlflow_server, pg_database

    counts = Counts()
    rows = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="harness-traffic-") as work:
        work = Path(work)
        storage = stack.enter_context(pg_database())
        (work / "art").mkdir()
        tracking = stack.enter_context(compose_mlflow_server(work / "art"))
        import importlib
        for module in ("mlflow.utils.rest_utils", "harness.tracking"):   # loaded before counting starts
            importlib.import_module(module)
        counts.install()
        for epochs in (1, 3):
            spec = study_dict(f"traffic-{epochs}", args.trials)
            spec["budget"]["epochs"] = epochs
            path = work / f"study-{epochs}.yaml"
            path.write_text(yaml.safe_dump(spec))
            # warm-up: the data decoded, the experiment made, Optuna's schema created
            before_http, before_sql = counts.snapshot()
            before_by = Counter(counts.http)
            counts.holds.clear()
            started = time.monotonic()
            sweep(path, work / f"ws-{epochs}", storage, tracking)
            seconds = time.monotonic() - started
            http, sql = counts.snapshot()
            rows[epochs] = {"trials": args.trials, "epochs": epochs, "steps_per_epoch": 2,
                            "mlflow_requests": http - before_http, "sql_statements": sql - before_sql,
                            "seconds": round(seconds, 1),
                            "lock_holds": len(counts.holds),
                            "lock_hold_ms_median": round(1000 * statistics.median(counts.holds), 1),
                            "lock_hold_ms_max": round(1000 * max(counts.holds), 1),
                            "by_endpoint": dict((counts.http - before_by).most_common())}
    n = args.trials
    one, three = rows[1], rows[3]
    per_epoch_http = (three["mlflow_requests"] - one["mlflow_requests"]) / (2 * n)
    per_epoch_sql = (three["sql_statements"] - one["sql_statements"]) / (2 * n)
    result = {
        "date": date.today().isoformat(), "runs": rows,
        "mlflow_requests_per_trial_fixed": round(one["mlflow_requests"] / n - per_epoch_http, 1),
        "mlflow_requests_per_epoch": round(per_epoch_http, 2),
        "sql_statements_per_trial_fixed": round(one["sql_statements"] / n - per_epoch_sql, 1),
        "sql_statements_per_epoch": round(per_epoch_sql, 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
