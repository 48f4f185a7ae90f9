"""PostgreSQL's connection budget: will the database server take this many workers?

Each worker holds up to PER_WORKER connections to PostgreSQL: Optuna's pooled one (the
main thread's), the heartbeat thread's (the same pool, at the same time), and the study
lock's while it claims a trial. PER_WORKER is measured, not guessed: tests/test_cluster.py
counts a running worker's connections in pg_stat_activity and holds it to this number.
An MLflow server whose store is on the same PostgreSQL takes its own pool on top (MLflow's
defaults: 5 + 10 overflow per server process). PostgreSQL's default max_connections is
100, so a default server tops out at a few dozen workers: at the start of a sweep or a
worker the budget is checked, and a shortfall is one warning line with the numbers (a
warning, not an error: the MLflow store may live elsewhere, other clients may leave).
"""
from __future__ import annotations

import sys

from harness.errors import redact
from harness.sweep import storage as st

PER_WORKER = 3          # measured: pool + heartbeat + study lock (tests/test_cluster.py)
MLFLOW_SERVER = 15      # an MLflow server's SQLAlchemy pool at MLflow's defaults (5 + 10 overflow)


def shortfall(spec: str, workers: int, tracking_uri: str) -> str | None:
    """The warning line when `workers` more workers (and an MLflow server, for an http(s)
    tracking URI) would not fit in the server's free connection slots; None when they fit,
    for a store that is not PostgreSQL, or when the server cannot be asked."""
    if st.kind(spec) != "postgresql":
        return None
    mlflow = MLFLOW_SERVER if tracking_uri.startswith(("http://", "https://")) else 0
    try:
        with st.connect(spec) as con:
            most = int(con.exec_driver_sql("SHOW max_connections").scalar())
            reserved = int(con.exec_driver_sql("SHOW superuser_reserved_connections").scalar())
            used = int(con.exec_driver_sql("SELECT count(*) FROM pg_stat_activity "
                                           "WHERE backend_type = 'client backend'").scalar()) - 1   # not this one
    except Exception:
        return None   # advisory only: st.check has already said whether the store is reachable
    need = workers * PER_WORKER + mlflow
    free = most - reserved - used
    if need <= free:
        return None
    server = f" + {mlflow} for the MLflow server" if mlflow else ""
    return (f"warning: PostgreSQL at {redact(spec)} may run out of connections: {workers} worker(s) x {PER_WORKER}"
            f"{server} = {need}, but {free} are free (max_connections {most} - {reserved} reserved - {used} "
            "in use); raise max_connections, run fewer workers, or put PgBouncer in front (docs/scale-out.md)")


def warn_if_short(spec: str, workers: int, tracking_uri: str) -> None:
    """`shortfall`'s line, if any, on stderr."""
    if line := shortfall(spec, workers, tracking_uri):
        print(line, file=sys.stderr, flush=True)
