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


# --- a Ray cluster of several nodes on this machine --------------------------------------------

NO_RAY_AUTH = {"RAY_AUTH_MODE": "disabled"}   # the test cluster's nodes and drivers agree on no token


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_under(pid: int) -> list[int]:
    """Every descendant of process `pid` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


class RayNodes:
    """`ray start --head` and `nodes - 1` more `ray start` on this machine, `cpus` CPUs each,
    in a temp dir of their own (their processes are told apart from any other Ray here by
    it). `with RayNodes(2) as c:` ... `c.address`; `kill_node(i)` SIGKILLs node i's raylet
    and every process under it (its workers and agents), by PID."""

    def __init__(self, nodes: int = 2, cpus: int = 1):
        import tempfile
        self.temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # short: Ray's socket paths
        self.address = f"127.0.0.1:{free_port()}"
        self.env = {**os.environ, **NO_RAY_AUTH}
        ray_bin = str(Path(sys.executable).parent / "ray")
        common = [f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={self.temp}"]
        try:
            self._run([ray_bin, "start", "--head", f"--port={self.address.rsplit(':', 1)[1]}",
                       "--include-dashboard=false", *common])
            for _ in range(nodes - 1):
                self._run([ray_bin, "start", f"--address={self.address}", *common])
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> "RayNodes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, argv: list[str]) -> None:
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[1:3])} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")

    def raylet(self, i: int) -> int:
        """Node i's raylet (node 0 is the head; node i's plasma socket is `plasma_store.i`)."""
        suffix = f"plasma_store.{i} " if i else "plasma_store "
        [pid] = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()
                 and "/raylet/raylet " in (c := _cmdline(int(d.name))) and self.temp in c and suffix in c]
        return pid

    def kill_node(self, i: int) -> list[int]:
        raylet = self.raylet(i)
        pids = [raylet, *processes_under(raylet)]
        _kill(pids)
        return pids

    def stop(self) -> None:
        """Every process of this cluster, and only these (`ray stop` would stop any Ray here)."""
        mine = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and self.temp in _cmdline(int(d.name))]
        _kill([q for p in mine for q in processes_under(p)] + mine)
