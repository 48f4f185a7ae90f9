"""Ctrl-C and SIGTERM in sweeps and workers: the first stops the running trial cleanly, the
second exits at once.

SIGTERM is what Kubernetes, Slurm, Ray and spot preemption send before a SIGKILL (30 s
later by Kubernetes' default grace period), so it is handled exactly like the first Ctrl-C:
the running trial is marked interrupted, its MLflow run ends KILLED, and it is queued again
for another worker (harness/sweep/worker.py). The process then exits 128 + the signal's
number (130 for Ctrl-C, 143 for SIGTERM), as a shell would report it.

A KeyboardInterrupt raised wherever the signal lands can land inside a database driver's
call and leave that store's connection broken (SQLite then answers "database is locked" to
the commit that would have closed the run). So while trials run (`deferred()`), the first
signal only marks the request, and it is raised at safe points (`checkpoint()`): between
training batches and between trials. Outside that, at start-up, it is raised at once.
"""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from typing import Callable, Iterator

on_second: list[Callable[[], None]] = []   # run before a second signal exits (forward it to workers)
_state = {"pending": False, "deferring": 0, "signal": None}
HANDLED = (signal.SIGINT, signal.SIGTERM)


def install(echo: Callable[[str], None]) -> None:
    def second(signum, frame):
        for hook in on_second:
            try:
                hook()
            except Exception:
                pass
        os.write(2, b"interrupted again: exiting now\n")
        os._exit(128 + signum)

    def first(signum, frame):
        for sig in HANDLED:
            signal.signal(sig, second)
        if signum == signal.SIGINT:
            echo("interrupted: stopping the running trial and closing the stores (Ctrl-C again to quit at once)")
        else:
            echo(f"interrupted by {signal.Signals(signum).name}: stopping the running trial and closing the "
                 "stores (a second signal quits at once)")
        _state.update(pending=True, signal=signum)
        if not _state["deferring"]:
            raise KeyboardInterrupt

    on_second.clear()
    _state.update(pending=False, deferring=0, signal=None)
    for sig in HANDLED:
        signal.signal(sig, first)


def reset() -> None:
    """Python's own handlers back (SIGINT raises KeyboardInterrupt, SIGTERM ends the process)
    and no stop pending: for a process that runs commands in turn (a test session)."""
    on_second.clear()
    _state.update(pending=False, deferring=0, signal=None)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def received() -> int | None:
    """The signal that asked this process to stop (SIGINT, SIGTERM), or None."""
    return _state["signal"]


@contextmanager
def deferred() -> Iterator[None]:
    """Within this block the first signal waits for the next checkpoint()."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1


def checkpoint() -> None:
    """Raise KeyboardInterrupt here if a stop was asked: a point where no store is written."""
    if _state["pending"]:
        raise KeyboardInterrupt


def sleep(seconds: float) -> None:
    """time.sleep, cut short by a stop request (then raised here): an idle worker waiting
    between polls leaves within a fraction of a second, not at the end of its wait."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        checkpoint()
        time.sleep(min(left, 0.1))
    checkpoint()
