"""The MLflow UI on a tracking store: the argv that starts it, and starting it safely.

`mlflow server` (which `mlflow ui` is an alias of) serves the UI and the REST API. Runs that
`harness.tracking.mlflow_run` creates on a SQLite store keep their artifacts under
`<workspace>/artifacts/<experiment>` as `file://` URIs; the server reads those directly from
disk, so a run's PNGs and YAML show in the UI without any proxying. `--serve-artifacts` with
`--artifacts-destination <workspace>/artifacts` only matters for experiments created through
the UI itself (their root becomes `mlflow-artifacts:/`): without it MLflow would write them to
`./mlartifacts` in whatever folder the UI was started from.

Links: MLflow 3 opens its GenAI view (traces) at the root URL unless the browser chose
otherwise; `?workflowType=machine_learning` opens the "Model training" view instead, so
`harness ui` prints each experiment's runs table as
`http://HOST:PORT/#/experiments/<id>?workflowType=machine_learning` (checked in headless
Chromium, tests/test_ui.py).

Security: the server binds 127.0.0.1 unless the caller passes another host. MLflow 3's
host-header and CORS middleware stay on with their defaults, which accept
`http://127.0.0.1:PORT` and `http://localhost:PORT` (and private-network IPs); to reach the UI
under a DNS name, set MLFLOW_SERVER_ALLOWED_HOSTS / MLFLOW_SERVER_CORS_ALLOWED_ORIGINS, which
`mlflow server` reads from the environment.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from harness.errors import HarnessError, reason, redact

POLL_S = 0.5          # between health probes
PROBE_TIMEOUT_S = 2   # one health probe
STOP_WAIT_S = 10      # SIGTERM, then SIGKILL after this long


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (None for other stores or in-memory)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    path = unquote(urlparse(tracking_uri).path)
    # sqlite:///rel.db -> path "/rel.db" (relative); sqlite:////abs.db -> "//abs.db" (absolute)
    if path.startswith("/"):
        path = path[1:]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def ui_command(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The argv that starts the MLflow UI (+ REST API) on `tracking_uri`."""
    if not tracking_uri:
        raise HarnessError("tracking URI: empty")
    scheme = urlparse(tracking_uri).scheme
    if scheme in ("http", "https", "databricks"):
        raise HarnessError(f"tracking URI {tracking_uri} is already a tracking server: open it in a browser")
    if not (1 <= int(port) <= 65535):
        raise HarnessError(f"--port {port}: must be between 1 and 65535")
    argv = [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(int(port)),
            # one worker is plenty for one person browsing, and light on a small machine
            "--workers", "1"]
    db = _sqlite_path(tracking_uri)
    if db is not None:
        argv += ["--serve-artifacts", "--artifacts-destination", (db.parent / "artifacts").as_uri()]
    return argv


def _probe_host(host: str) -> str:
    """The address to reach a server bound to `host` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def ui_url(host: str, port: int) -> str:
    return f"http://{_probe_host(host)}:{int(port)}"


WORKFLOW = "workflowType=machine_learning"   # MLflow 3's "Model training" view, not GenAI's


def experiment_url(base: str, experiment_id: str) -> str:
    """The runs table of one experiment, in the "Model training" view."""
    return f"{base}/#/experiments/{experiment_id}?{WORKFLOW}"


def experiments_url(base: str) -> str:
    """The list of every experiment, in the "Model training" view."""
    return f"{base}/#/experiments?{WORKFLOW}"


def experiment_links(tracking_uri: str, base: str, study: str | None = None,
                     workspace: str | Path = ".") -> list[str]:
    """The lines `harness ui` prints after the root URL: the study's experiment URL (or one
    line saying it does not exist yet, with the root URL), else every harness experiment's
    URL (or the experiments list when there is none). Nothing is created in the store."""
    from harness.tracking import Tracking

    db = _sqlite_path(tracking_uri)
    try:
        tracking = Tracking(tracking_uri, workspace)
        if study is not None:
            exp_id = None if db is not None and not db.exists() else tracking.find_experiment(study)
            if exp_id is None:
                return [f"experiment {study}: not in this store yet (`harness sweep` makes it); open {base}"]
            return [f"experiment {study}: {experiment_url(base, exp_id)}"]
        exps = [] if db is not None and not db.exists() else tracking.harness_experiments()
    except Exception as e:
        return [f"experiments: cannot list them ({reason(e)}); open {experiments_url(base)}"]
    if not exps:
        return [f"no harness experiment in this store yet; experiments: {experiments_url(base)}"]
    return [f"experiment {name}: {experiment_url(base, exp_id)}" for exp_id, name in exps]


def _port_free(host: str, port: int) -> tuple[bool, str]:
    bind_host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(bind_host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return False, f"cannot resolve host {host!r} ({e.strerror})"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # like uvicorn: a port whose old connections sit in TIME_WAIT is free to listen on
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return False, f"port {port} on {host} is taken ({e.strerror})"
    return True, ""


def _tail(path: str | None, n: int = 3, width: int = 400) -> str:
    if not path:
        return ""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    text = " | ".join(lines[-n:])
    if len(text) > width:   # the last line usually names the error: keep its start
        text = lines[-1][:width - 3] + "..." if len(lines[-1]) > width else lines[-1]
    return text


def stop_ui(proc: subprocess.Popen, timeout: float = STOP_WAIT_S) -> None:
    """Stop a server from start_ui: SIGTERM its process group (mlflow runs uvicorn and a job
    runner as children), then SIGKILL after `timeout`; remove its log file."""
    try:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout)
            except KeyboardInterrupt:   # a second Ctrl-C while stopping: stop now
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout)
                raise
        # children that outlived the parent (they share its group, which we own)
        _signal_group(proc, signal.SIGKILL)
    finally:
        log = getattr(proc, "log_path", None)
        if log:
            try:
                os.unlink(log)
            except OSError:
                pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)   # start_ui made the server its own group leader
    except (ProcessLookupError, PermissionError):
        pass


def start_ui(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000,
             wait_s: float = 60) -> subprocess.Popen:
    """Start the MLflow UI and return once GET /health answers 200.

    The server's output goes to a log file (`proc.log_path`); stop it with `stop_ui(proc)`.
    Raises HarnessError if the port is taken or the server does not come up in `wait_s`.
    """
    argv = ui_command(tracking_uri, host, port)
    ok, why = _port_free(host, port)
    if not ok:
        raise HarnessError(f"MLflow UI: {why}; pick another with --port")
    db = _sqlite_path(tracking_uri)
    if db is not None and not db.parent.is_dir():
        raise HarnessError(f"tracking URI {tracking_uri}: folder {db.parent} does not exist")

    env = dict(os.environ)
    # the UI only browses runs: no background job runner (GenAI evaluation jobs)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    fd, log_path = tempfile.mkstemp(prefix="mlflow-ui-", suffix=".log")
    try:
        with os.fdopen(fd, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
    except OSError as e:
        os.unlink(log_path)
        raise HarnessError(f"MLflow UI: cannot start {argv[0]} ({e.strerror})") from None
    proc.log_path = log_path
    proc.url = ui_url(host, port)

    health = f"{proc.url}/health"
    deadline = time.monotonic() + wait_s
    max_probes = int(wait_s / POLL_S) + 2
    try:
        for _ in range(max_probes):
            if proc.poll() is not None:
                tail = _tail(log_path)
                if "address already in use" in tail.lower():
                    raise HarnessError(f"MLflow UI: port {port} on {host} is taken; pick another with --port")
                raise HarnessError(f"MLflow UI exited with code {proc.returncode} before answering "
                                   f"{health}: {tail or '(no output)'}")
            try:
                with urllib.request.urlopen(health, timeout=PROBE_TIMEOUT_S) as r:
                    if r.status == 200:
                        return proc
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        raise HarnessError(f"MLflow UI did not answer {health} within {wait_s:g} s: "
                           f"{_tail(log_path) or '(no output)'}")
    except BaseException:
        stop_ui(proc)
        raise


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_ui(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000,
             study: str | None = None, workspace: str | Path = ".") -> None:
    """Run the MLflow UI in the foreground until Ctrl-C, SIGTERM or SIGHUP (or until it exits
    on its own), printing the URL of `study`'s experiment (or of every harness experiment).
    The server runs in its own session, so it is stopped here, never orphaned."""
    import threading
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _interrupt)
    try:
        _serve(tracking_uri, host, port, study, workspace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(tracking_uri: str, host: str, port: int, study: str | None = None,
           workspace: str | Path = ".") -> None:
    import threading
    # the look-up (importing mlflow, opening the store) takes about as long as the server's
    # start: run it meanwhile, in a daemon thread (a server that fails to start exits at once)
    links: list[str] = []
    lookup = threading.Thread(target=lambda: links.extend(experiment_links(
        tracking_uri, ui_url(host, port), study, workspace)), name="ui-links", daemon=True)
    lookup.start()
    proc = start_ui(tracking_uri, host, port)
    try:
        print(f"MLflow UI: {proc.url}  (tracking store {redact(tracking_uri)}; Ctrl-C to stop)", flush=True)
        lookup.join()
        for line in links:
            print(line, flush=True)
        if host in ("", "0.0.0.0", "::", "[::]"):
            print(f"listening on all interfaces ({host or '0.0.0.0'}): anyone on your network can reach it",
                  flush=True)
        while proc.poll() is None:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        tail = _tail(proc.log_path)
        raise HarnessError(f"MLflow UI exited with code {proc.returncode}: {tail or '(no output)'}")
    except KeyboardInterrupt:
        print("stopping the MLflow UI", flush=True)
    finally:
        stop_ui(proc)
