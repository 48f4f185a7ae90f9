"""`harness sweep --engine ray`: the sweep's workers as Ray tasks on a Ray cluster.

Ray only places the workers and keeps them alive; the search and the record stay where they
are. Each task runs today's `Worker` loop (harness/sweep/worker.py): it claims trials from the
Optuna storage, trains, reports to MLflow. Trial numbers, exact counts, the heartbeat and
lost-trial recovery stay the study's; Ray adds placement (`--gpus-per-trial`, fractions
pack several trials on a GPU; `--cpus-per-trial`) and the re-run of a task whose node died
(`max_retries`), so a preempted node costs its running trial's progress and nothing else.

- No `--address` (nor RAY_ADDRESS): a local Ray is started for the sweep and stopped after.
- With one, every node must reach the stores: a journal on a local disk, an SQLite file or
  a local MLflow store is refused when the cluster has another machine (or the address
  names one). Passwords never travel in a task's arguments: a node reads its own
  HARNESS_STORAGE / PGPASSWORD / ~/.pgpass (and MLFLOW_TRACKING_PASSWORD), as a worker does.
- Ctrl-C (or SIGTERM) on the driver cancels the tasks: each stops its running trial and
  queues it again (Ray delivers the cancel as a SIGINT, the worker's first Ctrl-C); a second
  Ctrl-C kills them.
- Every node needs the study file, the data and the workspace path; each caches its decoded
  data in its own WORKSPACE/cache.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from harness.errors import HarnessError, reason
from harness.sweep import storage as st
from harness.sweep.launch import WorkersFailed

MAX_RETRIES = 3            # a task whose node dies is run again elsewhere, at most this often
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "cephfs", "lustre", "gpfs", "glusterfs",
             "fuse.glusterfs", "beegfs", "fuse.sshfs", "fuse.juicefs", "fuse.gcsfuse", "fuse.s3fs",
             "fuse.mountpoint-s3", "virtiofs", "9p", "panfs", "wekafs")


@dataclass(frozen=True)
class RayLaunch:
    """--engine ray's options: --address (RAY_ADDRESS; None: a local Ray for this sweep),
    --workers (default: as many as the cluster holds at once), --gpus-per-trial (None:
    1 where the cluster has GPUs and the study may use them, else 0), --cpus-per-trial."""
    address: str | None = None
    workers: int | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float = 1.0


class RayMissing(HarnessError):
    """Ray is an optional extra."""


def import_ray():
    # read when Ray is imported: each worker's lines as they come, not "[repeated 3x]"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except ImportError:
        raise RayMissing("--engine ray: Ray is not installed "
                         "(pip install 'finetune-harness[ray]', or the ray package)") from None
    return ray


# --- where the stores are -----------------------------------------------------------------------

def without_password(url: str) -> str:
    """The URL with its password removed (a node supplies its own)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[1]}"))


def node_store(given: str, variable: str) -> str:
    """On a node: its own `variable` (with a password) when it names the same store as
    `given`, else `given` (libpq then reads PGPASSWORD or ~/.pgpass)."""
    own = os.environ.get(variable)
    return own if own and without_password(own) == given else given


def shared_filesystem(path: Path) -> bool:
    """Whether `path` lies on a filesystem other machines can mount (NFS, CephFS, ...)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return False
    path = path.resolve()
    best, fs = "", ""
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and len(point) >= len(best):
            best, fs = point, kind
    return fs in SHARED_FS


def refuse_local_stores(storage: str, tracking_uri: str, where: str) -> None:
    """One line when a store lives on this machine only and the workers may run elsewhere."""
    kind = st.kind(storage)
    if kind == "sqlite" or (kind == "journal" and not shared_filesystem(Path(storage).parent)):
        what = "an SQLite file" if kind == "sqlite" else f"a journal on this machine's disk ({storage})"
        raise HarnessError(f"--storage: {what} cannot be reached from {where}: use postgresql://... "
                           "(HARNESS_STORAGE), or a journal file on a filesystem every node mounts (NFS)")
    scheme = tracking_uri.split("://", 1)[0].lower() if "://" in tracking_uri else "file"
    if scheme in ("sqlite", "file"):
        raise HarnessError(f"--tracking-uri: {tracking_uri} is on this machine only and cannot be reached from "
                           f"{where}: use an MLflow server (http://..., MLFLOW_TRACKING_URI)")


# --- the cluster ----------------------------------------------------------------------------------

def _host_port(address: str) -> tuple[str, int] | None:
    """The host and port an address names; None for 'auto' (the cluster this machine runs)."""
    if address == "auto":
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise HarnessError(f"--address: '{address}' is not HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def _is_this_machine(host: str) -> bool:
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return False
    if ip.startswith("127.") or host in ("localhost", socket.gethostname()):
        return True
    try:
        return ip in socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return False


def _reachable(host: str, port: int, address: str) -> None:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise HarnessError(f"--address: no Ray cluster answers at {address} ({e.strerror or e.__class__.__name__}); "
                           "start one with `ray start --head`, or leave --address out for a local one") from None


@dataclass
class Cluster:
    """A connected Ray: its alive nodes' resources, and whether it was started for this sweep."""
    ray: Any
    nodes: list[dict[str, Any]]
    started_here: bool

    def most(self, resource: str) -> float:
        return max((n["Resources"].get(resource, 0.0) for n in self.nodes), default=0.0)

    def capacity(self, gpus: float, cpus: float) -> int:
        """How many workers of this size run at once."""
        total = 0
        for n in self.nodes:
            r = n["Resources"]
            fit = int(r.get("CPU", 0.0) // cpus) if cpus else 10 ** 6
            if gpus:
                fit = min(fit, int(round(r.get("GPU", 0.0) / gpus, 6)))
            total += fit
        return total


def _address(launch: RayLaunch) -> str | None:
    return launch.address if launch.address not in (None, "", "local") else None


def check_address(launch: RayLaunch, storage: str, tracking_uri: str) -> None:
    """Before anything is read or written: the address well-formed and answering, and the
    stores reachable from it when it names another machine."""
    address = _address(launch)
    target = _host_port(address) if address else None
    if target is None:
        return
    if not _is_this_machine(target[0]):
        refuse_local_stores(storage, tracking_uri, f"the Ray cluster at {address}")
    _reachable(*target, address)


@contextmanager
def connected(launch: RayLaunch, storage: str, tracking_uri: str) -> Iterator[Cluster]:
    """Connect to (or start) the Ray cluster, refusing in one line what it cannot run;
    disconnect after (a Ray started here is stopped)."""
    ray = import_ray()
    address = _address(launch)
    if not os.isatty(1):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")   # no colour codes in a log file
    try:
        ray.init(address=address or "local", logging_level=logging.ERROR, log_to_driver=True,
                 **({} if address else {"include_dashboard": False}))
    except ConnectionError as e:
        raise HarnessError(f"--address: {reason(e)}") from None
    cluster = Cluster(ray, [n for n in ray.nodes() if n.get("Alive")], started_here=address is None)
    try:
        here = ray.util.get_node_ip_address()
        others = sorted({n["NodeManagerAddress"] for n in cluster.nodes} - {here})
        if others:
            refuse_local_stores(storage, tracking_uri, f"the Ray cluster's node(s) at {', '.join(others)}")
        yield cluster
    finally:
        ray.shutdown()


def worker_size(cluster: Cluster, launch: RayLaunch, device: str) -> tuple[float, float]:
    """(GPUs, CPUs) per worker, checked against the largest node."""
    gpus = launch.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if device != "cpu" and cluster.most("GPU") >= 1 else 0.0
    if gpus > cluster.most("GPU"):
        raise HarnessError(f"--gpus-per-trial: {gpus:g} is more than any node of the cluster has "
                           f"(the most on one node: {cluster.most('GPU'):g})")
    if gpus > 1 and gpus != int(gpus):
        raise HarnessError(f"--gpus-per-trial: {gpus:g}: above 1, a worker takes whole GPUs")
    cpus = launch.cpus_per_trial
    if cpus > cluster.most("CPU"):
        raise HarnessError(f"--cpus-per-trial: {cpus:g} is more than any node of the cluster has "
                           f"(the most on one node: {cluster.most('CPU'):g})")
    return gpus, cpus


# --- the workers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    """What a worker task needs: paths and password-free store URLs only."""
    study_path: str
    workspace: str
    storage: str
    tracking_uri: str
    heartbeat: int
    strategies: tuple[str, ...]
    trials: int


def run_worker(spec: TaskSpec, index: int) -> int:
    """Inside a Ray task: today's worker loop; the number of trials it ran. Its sampler's
    seed offset is its index, as the local launcher's workers (a sweep run again draws the
    same). Ray's cancel arrives as a SIGINT: the worker's first Ctrl-C."""
    import matplotlib
    import optuna
    from harness import interrupts
    from harness.sweep.study import Selection, load_study
    from harness.sweep.worker import Worker
    from harness.workspace import Stores

    matplotlib.use("Agg")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    name = f"r{index + 1}"
    saved = {sig: signal.getsignal(sig) for sig in interrupts.HANDLED}
    interrupts.install(lambda s: print(f"[{name}] {s}", flush=True))
    try:
        stores = Stores(Path(spec.workspace), node_store(spec.storage, "HARNESS_STORAGE"),
                        node_store(spec.tracking_uri, "MLFLOW_TRACKING_URI"), spec.heartbeat).ready()
        w = Worker(load_study(spec.study_path), stores, Selection(spec.strategies, spec.trials),
                   name=name, seed_offset=index, echo=lambda s: print(s, flush=True))
        w.prepare()
        w.run()
        return w.trials_run
    finally:
        interrupts.on_second.clear()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_workers(cluster: Cluster, spec: TaskSpec, k: int, gpus: float, cpus: float,
                echo: Callable[[str], None] = print) -> dict[str, int]:
    """k worker tasks; wait for them all. Trials run per worker, or WorkersFailed."""
    from harness import interrupts
    ray = cluster.ray
    task = ray.remote(run_worker).options(num_cpus=cpus, num_gpus=gpus, max_retries=MAX_RETRIES,
                                          retry_exceptions=False, name="harness_worker")
    refs = {f"r{i + 1}": task.remote(spec, i) for i in range(k)}
    names = {ref: name for name, ref in refs.items()}
    pending = list(refs.values())
    ran: dict[str, int] = {}
    failed: dict[str, str] = {}
    interrupts.on_second.append(lambda: [ray.cancel(r, force=True) for r in refs.values()])
    try:
        with interrupts.deferred():
            while pending:
                done, pending = ray.wait(pending, timeout=0.5)
                for ref in done:
                    name = names[ref]
                    try:
                        ran[name] = ray.get(ref)
                    except Exception as e:
                        failed[name] = _why(ray, e)
                        echo(f"worker {name} {failed[name]}; its trial is run again by another worker "
                             "or by the next run")
                interrupts.checkpoint()
    except KeyboardInterrupt:
        echo(f"cancelling {len(pending)} Ray worker(s): each queues its running trial again")
        for ref in pending:
            ray.cancel(ref)
        ray.wait(pending, num_returns=len(pending), timeout=None)
        raise
    if failed:
        raise WorkersFailed(f"{len(failed)} of {k} workers did not finish "
                            f"({', '.join(f'{n}: {why}' for n, why in failed.items())}); "
                            "run the same command again to resume")
    return ran


def _why(ray, e: Exception) -> str:
    """A failed task in a few words: the worker's own one-line error, or how its node was lost."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause if e.cause is not None else e
        return f"failed: {cause}" if isinstance(cause, HarnessError) else f"failed: {reason(cause)}"
    if isinstance(e, (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError)):
        return f"was lost with its node or process, {MAX_RETRIES} retries spent ({e.__class__.__name__})"
    return f"failed: {reason(e)}"
