"""Where the Optuna studies live, and the lock that serialises workers on one study.

- a journal file (the default, WORKSPACE/optuna.journal): safe for several processes on
  one machine; a dead worker's trial is found by its process id (no heartbeat there);
- SQLite (`sqlite:///FILE`): one process only;
- PostgreSQL (`postgresql://...`): many machines; trials keep a heartbeat and a trial
  whose worker went silent is failed after the grace period and run again.

A spec is a URL, or a journal file's path (anything without "://"); harness/workspace.py
works out which one a command uses.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import optuna

from harness.errors import HarnessError, reason, redact

def kind(spec: str) -> str:
    """'journal', 'sqlite' or 'postgresql'."""
    if "://" not in spec:
        return "journal"
    scheme = spec.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    raise HarnessError(f"--storage: unsupported scheme '{scheme}' in {redact(spec)} "
                       "(use a journal file path, sqlite:///FILE or postgresql://USER@HOST/DB)")


def local_file(spec: str) -> Path | None:
    """The file behind a journal or SQLite spec; None for a database server."""
    k = kind(spec)
    if k == "journal":
        return Path(spec)
    if k == "sqlite":
        return Path(spec.removeprefix("sqlite:///").split("?", 1)[0])
    return None


def exists(spec: str) -> bool:
    """False when nothing was ever written there (looking must not create a store)."""
    path = local_file(spec)
    return path is None or path.exists()


def check(spec: str, workers: int = 1) -> None:
    """Is the store usable? Reads only: a bad --storage must leave nothing behind."""
    k = kind(spec)
    if k == "sqlite" and workers > 1:
        raise HarnessError(f"--storage: SQLite is not safe for {workers} workers writing at once "
                           "(use a journal file, the default, or postgresql://...)")
    path = local_file(spec)
    if path is not None:
        if path.is_dir():
            raise HarnessError(f"--storage: {path} is a folder, not a file")
        if not path.parent.is_dir():
            raise HarnessError(f"--storage: folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise HarnessError(f"--storage: {path} is not writable")
        return
    try:
        with _engine(spec).connect() as con:
            con.exec_driver_sql("SELECT 1")
    except HarnessError:
        raise
    except Exception as e:
        raise HarnessError(f"--storage: cannot reach {redact(spec)} ({reason(e)})") from None


def open_storage(spec: str, heartbeat: int | None = None,
                 on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None
                 ) -> optuna.storages.BaseStorage:
    """The Optuna storage for `spec`. On PostgreSQL, `heartbeat` seconds turns on Optuna's
    heartbeat: a trial silent for 2 x heartbeat is failed and handed to `on_stale`.
    Without a heartbeat the storage is shared in this process: every RDB storage holds a
    pool of connections, and a database server's connection slots are few."""
    if heartbeat is None and spec in _STORAGES:
        return _STORAGES[spec]
    storage = _open_storage(spec, heartbeat, on_stale)
    if heartbeat is None:
        _STORAGES[spec] = storage
    return storage


_STORAGES: dict[str, optuna.storages.BaseStorage] = {}


def _open_storage(spec: str, heartbeat: int | None, on_stale) -> optuna.storages.BaseStorage:
    k = kind(spec)
    try:
        if k == "journal":
            from optuna.storages.journal import JournalFileBackend, JournalStorage
            return JournalStorage(JournalFileBackend(spec))
        extra = {}
        if k == "postgresql":
            extra = {"engine_kwargs": {"pool_pre_ping": True}}
            if heartbeat:
                extra.update(heartbeat_interval=int(heartbeat), grace_period=2 * int(heartbeat),
                             heartbeat_stale_trial_callback=on_stale)
        if k == "sqlite":
            return optuna.storages.RDBStorage(_driver(spec), **extra)
        # the first opening creates Optuna's schema: workers starting together on an empty
        # database would race to create the same tables
        with StudyLock(spec, "harness:optuna-schema"), warnings.catch_warnings():
            # the heartbeat is "experimental" to Optuna, and relied on here: no warning per worker
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(_driver(spec), **extra)
    except Exception as e:
        raise HarnessError(f"--storage: cannot open {redact(spec)} ({reason(e)})") from None


class StudyLock:
    """An exclusive lock on one study across processes and machines: an advisory lock on
    PostgreSQL, an flock beside a journal or SQLite file. The holder's death releases it."""

    def __init__(self, spec: str, name: str):
        self.spec, self.name = spec, name
        self._fd: int | None = None
        self._con = None

    def acquire(self) -> "StudyLock":
        path = local_file(self.spec)
        if path is not None:
            self._fd = os.open(f"{path}.harness-lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        else:
            self._con = _engine(self.spec).connect()
            self._con.exec_driver_sql(f"SELECT pg_advisory_lock({_key(self.name)})")
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if self._con is not None:
            con, self._con = self._con, None
            try:
                con.exec_driver_sql(f"SELECT pg_advisory_unlock({_key(self.name)})")
            finally:
                con.close()

    def __enter__(self) -> "StudyLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def connect(spec: str):
    """A connection of its own to the PostgreSQL server of `spec` (closed when the `with`
    block ends), for the few queries that are not Optuna's."""
    return _engine(spec).connect()


_ENGINES: dict = {}


def _engine(spec: str):
    if spec not in _ENGINES:
        import sqlalchemy
        from sqlalchemy.pool import NullPool
        _ENGINES[spec] = sqlalchemy.create_engine(_driver(spec), poolclass=NullPool, isolation_level="AUTOCOMMIT",
                                                  connect_args={"connect_timeout": 10})
    return _ENGINES[spec]


def _driver(spec: str) -> str:
    """A bare postgresql:// means psycopg 3 (installed with the package) whatever the
    SQLAlchemy version; an explicit driver (postgresql+psycopg2://) is kept."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", spec)


def _key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_lock."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
