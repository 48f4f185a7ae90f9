"""Real services for the tests: PostgreSQL databases of their own, docker/compose.yaml's
commands run on this machine (no Docker engine here), and processes to watch and kill."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
PG_ADMIN = os.environ.get("HARNESS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def pg_database() -> Iterator[str]:
    import psycopg
    name = f"harness_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_outage(url: str, on: bool) -> None:
    """Cut database `url` off (no new connections, the open ones ended) or let it back."""
    import psycopg
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as con:
        con.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if on else "true"}')
        if on:
            con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR} and ${VAR:-default}, from `variables` only."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        if name in variables:
            return variables[name]
        if default is None:
            raise KeyError(f"compose variable {name} has no value in the test")
        return default
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def compose_service(name: str, variables: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A compose service's command (argv) and environment, its variables substituted."""
    svc = yaml.safe_load(COMPOSE.read_text())["services"][name]
    argv = [interpolate(a, variables) for a in svc["command"]]
    env = {k: interpolate(str(v), variables) for k, v in (svc.get("environment") or {}).items()}
    return argv, env


def harness_argv(argv: list[str]) -> list[str]:
    """`harness ...` from the compose file, run with this venv's interpreter."""
    assert argv[0] == "harness", argv
    return [sys.executable, "-m", "harness", *argv[1:]]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


@contextmanager
def compose_mlflow_server(artifacts: Path, started: list | None = None) -> Iterator[str]:
    """docker/compose.yaml's `mlflow server` on loopback: its URI. Its process is appended to
    `started` (to stop it early)."""
    port = free_port()
    with pg_database() as db:
        argv, env = compose_service("mlflow", {"MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
                                              "MLFLOW_ARTIFACTS": str(artifacts), "POSTGRES_PASSWORD": "unused",
                                              "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{port},localhost:{port}"})
        env["MLFLOW_BACKEND_STORE_URI"] = db    # the compose file's URL names the host `postgres`
        # the CI machine's one PostgreSQL (100 connection slots) also serves the tests' workers:
        # a small pool per server process (MLflow's default is 5 + 10 overflow, times its workers)
        env.update(MLFLOW_SQLALCHEMYSTORE_POOL_SIZE="2", MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW="3")
        log = open(artifacts.parent / "mlflow-server.log", "w")
        bin_dir = str(Path(sys.executable).parent)
        proc = subprocess.Popen(argv, env={**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if started is not None:
            started.append(proc)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 180, proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_group(proc)
            log.close()


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process and what it started (its own session), SIGKILL if it lingers."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue
