"""Ctrl-C in sweeps and workers: the first stops the running trial cleanly, the second exits
at once.

A KeyboardInterrupt raised wherever the signal lands can land inside a database driver's
call and leave that store's connection broken (SQLite then answers "database is locked" to
the commit that would have closed the run). So while trials run (`deferred()`), the first
Ctrl-C only marks the request, and it is raised at safe points (`checkpoint()`): between
training batches and between trials. Outside that, at start-up, it is raised at once.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Callable, Iterator

on_second: list[Callable[[], None]] = []   # run before a second Ctrl-C exits (forward it to workers)
_state = {"pending": False, "deferring": 0}


def install(echo: Callable[[str], None]) -> None:
    def second(signum, frame):
        for hook in on_second:
            try:
                hook()
            except Exception:
                pass
        os.write(2, b"interrupted again: exiting now\n")
        os._exit(130)

    def first(signum, frame):
        signal.signal(signal.SIGINT, second)
        echo("interrupted: stopping the running trial and closing the stores (Ctrl-C again to quit at once)")
        _state["pending"] = True
        if not _state["deferring"]:
            raise KeyboardInterrupt

    on_second.clear()
    _state.update(pending=False, deferring=0)
    signal.signal(signal.SIGINT, first)


@contextmanager
def deferred() -> Iterator[None]:
    """Within this block the first Ctrl-C waits for the next checkpoint()."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1


def checkpoint() -> None:
    """Raise KeyboardInterrupt here if Ctrl-C was pressed: a point where no store is written."""
    if _state["pending"]:
        raise KeyboardInterrupt
