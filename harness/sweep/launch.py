"""`harness sweep --workers K`: K `harness worker` processes on this machine.

Each worker gets its own GPU (CUDA_VISIBLE_DEVICES), or a share of one with
--workers-per-gpu, or on a CPU an equal share of the cores (OMP_NUM_THREADS). The workers
run in their own process groups: a Ctrl-C reaches them once, through this process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from harness.errors import HarnessError
from harness.sweep.study import Selection, Study
from harness.workspace import Stores


class WorkersFailed(HarnessError):
    """Some workers did not finish; the sweep resumes when run again."""
    exit_code = 1


def visible_gpus(device: str) -> list[str]:
    """The GPUs a worker may take: CUDA_VISIBLE_DEVICES's list, else every CUDA device."""
    if device == "cpu":
        return []
    import torch
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def plan(workers: int | None, gpus: list[str], per_gpu: int = 1, cpus: int | None = None) -> list[dict[str, str]]:
    """Each worker's environment. With GPUs: one worker per GPU by default, at most
    `per_gpu` on each, spread round-robin. On a CPU: one worker by default."""
    cpus = cpus or os.cpu_count() or 1
    if gpus:
        capacity = len(gpus) * per_gpu
        k = workers or capacity
        if k > capacity:
            raise HarnessError(f"--workers: {k} workers do not fit on {len(gpus)} GPU(s) at {per_gpu} per GPU "
                               "(raise --workers-per-gpu, or lower --workers)")
        threads = str(max(1, cpus // k))
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)], "OMP_NUM_THREADS": threads} for i in range(k)]
    k = workers or 1
    return [{"OMP_NUM_THREADS": str(max(1, cpus // k))} for _ in range(k)]


@dataclass(frozen=True)
class Launch:
    """--workers (default: one per GPU, or 1 on a CPU) and --workers-per-gpu."""
    workers: int | None = None
    per_gpu: int = 1


def worker_envs(study: Study, launch: Launch) -> list[dict[str, str]]:
    device = str(study.base.get("device", "auto"))
    return plan(launch.workers, visible_gpus(device), launch.per_gpu)


def describe(envs: list[dict[str, str]]) -> str:
    gpus = [e["CUDA_VISIBLE_DEVICES"] for e in envs if "CUDA_VISIBLE_DEVICES" in e]
    if gpus:
        return f"GPU(s) {', '.join(sorted(set(gpus)))}"
    return f"the CPU, {envs[0]['OMP_NUM_THREADS']} thread(s) each"


def worker_argv(study: Study, stores: Stores, selection: Selection) -> list[str]:
    """A worker's command line; the store URLs go in its environment (`Stores.env`)."""
    argv = [sys.executable, "-m", "harness", "worker", study.source, "--workspace", str(stores.workspace),
            "--trials", str(selection.trials), "--heartbeat", str(stores.heartbeat)]
    for s in selection.strategies:
        argv += ["--strategy", s]
    return argv


def supervise(argv: list[str], envs: list[dict[str, str]], shared_env: dict[str, str],
              echo: Callable[[str], None]) -> None:
    """Start one worker per environment and wait for them all. The stores are passed in
    the environment, never on a command line (`ps` would show a password)."""
    from harness import interrupts

    procs: dict[str, subprocess.Popen] = {}
    for i, env in enumerate(envs):
        name = f"w{i + 1}"
        procs[name] = subprocess.Popen(argv + ["--name", name, "--seed-offset", str(i)],
                                       env={**os.environ, **shared_env, **env}, start_new_session=True)

    def forward(sig: int) -> None:
        for p in procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    interrupts.on_second.append(lambda: forward(signal.SIGINT))   # their second Ctrl-C: out at once
    failed: dict[str, int] = {}
    try:
        while any(p.poll() is None for p in procs.values()) or len(failed) < _count_failed(procs):
            for name, p in procs.items():
                rc = p.poll()
                if rc not in (None, 0) and name not in failed:
                    failed[name] = rc
                    echo(f"worker {name} {_how(rc)}; its trial is run again by another worker "
                         "or by the next run")
            time.sleep(0.5)
    except KeyboardInterrupt:
        forward(interrupts.received() or signal.SIGINT)   # a SIGTERM reaches them as one
        for p in procs.values():
            p.wait()
        raise
    if failed:
        raise WorkersFailed(f"{len(failed)} of {len(procs)} workers did not finish "
                            f"({', '.join(f'{n} {_how(rc)}' for n, rc in failed.items())}); "
                            "run the same command again to resume")


def _count_failed(procs: dict[str, subprocess.Popen]) -> int:
    return sum(1 for p in procs.values() if p.poll() not in (None, 0))


def _how(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"
