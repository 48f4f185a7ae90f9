"""Workers: processes, on one machine or many, that share a sweep's trials.

Every worker runs the same loop. Under the study's lock (storage.StudyLock) it fails the
trials of workers that died and queues them again, then claims one trial, or stops when the
study has its trials, or waits while the last ones run elsewhere. Claiming under the lock
keeps the count exact (a study never gets more trials than it asks for), and the first
trial, the retries and the MLflow parent run are made once, whatever the number of workers.

A dead worker is noticed by Optuna's heartbeat on PostgreSQL; on a journal or SQLite file
(one machine) by its process id. Its trial ends FAIL, its MLflow run FAILED, and the same
parameters are queued again (at most RETRIES times). A worker stopped by Ctrl-C or SIGTERM
queues its interrupted trial again itself before it exits, for the workers that remain.

A worker is known by a random token drawn at its start (its pid and host are added for
people reading logs): in containers every replica can have the same pid, so neither its
identity nor its sampler seed may rest on the pid. Idle workers (the last trials running
elsewhere) poll with exponential backoff and jitter, so a fleet does not hit the database
in step.
"""
from __future__ import annotations

import enum
import hashlib
import os
import random
import secrets
import socket
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from harness import interrupts
from harness.sweep import storage as st
from harness.sweep.optuna_studies import (METRIC_ATTR, PARENT_ATTR, RETRIES, check_metric, count_trials, make_pruner,
                                          make_sampler, requeue)
from harness.sweep.study import Selection, Study
from harness.sweep.trial import Progress, objective, summarize_parent
from harness.tracking import Tracking
from harness.workspace import Stores

WORKER_ATTR = "worker"


class Claim(enum.Enum):
    """What a worker found when it went to claim a strategy's next trial."""
    RAN = "ran"               # it claimed one and ran it
    BUSY = "busy"             # every missing trial is running elsewhere
    COMPLETE = "complete"     # the study has its trials


# --- who runs a trial, and is it still alive -----------------------------------------------
def _start_time(pid: int) -> str | None:
    try:  # field 22 of /proc/PID/stat: the start time, so a reused pid is not taken as alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_id(token: str = "") -> str:
    """`TOKEN@HOST:PID:START` (`HOST:PID:START` without a token): the token tells workers
    apart, the rest says where one runs and lets `alive` check a process of this host."""
    where = f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid()) or '-'}"
    return f"{token}@{where}" if token else where


def alive(wid: str) -> bool | None:
    """True/False for a worker of this host; None (unknown) for another host's."""
    try:
        host, pid, started = wid.rsplit(":", 2)
        host = host.rsplit("@", 1)[-1]
        pid_i = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid_i, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started == "-" or _start_time(pid_i) == started


class Backoff:
    """The waits of an idle worker: `first` seconds doubling up to `most`, each drawn within
    +-`jitter` of its value (workers that went idle together drift apart); `reset()` when
    work appears."""

    def __init__(self, first: float = 0.5, most: float = 30.0, jitter: float = 0.25,
                 rng: random.Random | None = None):
        self.first, self.most, self.jitter = first, most, jitter
        self.rng = rng or random.Random()
        self.tries = 0

    def next(self) -> float:
        base = min(self.most, self.first * 2 ** min(self.tries, 32))
        self.tries += 1
        return base * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self.tries = 0


class Worker:
    """One process's share of a sweep: `prepare()` joins the studies, `run()` works them off."""

    def __init__(self, study: Study, stores: Stores, selection: Selection, name: str = "",
                 seed_offset: int | None = 0, echo: Callable[[str], None] = print):
        """`seed_offset`: the sampler's seed is the study's seed + its trial count + this
        (the local launcher's workers: 0..N-1, reproducible); None derives it from this
        worker's random token instead (`sampler_seed`)."""
        self.study, self.stores, self.spec = study, stores, stores.storage
        self.strategies, self.n_trials, self.seed_offset = list(selection.strategies), selection.trials, seed_offset
        self.name = name
        self.echo = (lambda s: echo(f"[{name}] {s}")) if name else echo
        self.token = secrets.token_hex(8)   # 64 random bits: unique whatever the pid
        self.id = worker_id(self.token)
        self.trials_run = 0
        self.kind = st.kind(self.spec)
        self.tracking = Tracking(stores.tracking_uri, stores.workspace)
        self.storage = st.open_storage(self.spec, stores.heartbeat, self._on_stale)
        self.ostudies: dict[str, optuna.Study] = {}
        self.parents: dict[str, str] = {}

    def _lock(self, strategy: str) -> st.StudyLock:
        return st.StudyLock(self.spec, f"{self.study.name}/{strategy}")

    # --- joining ---------------------------------------------------------------------------
    def prepare(self, centre: dict[str, dict[str, Any]] | None = None) -> None:
        """Open (or create) each strategy's study and parent run; recover dead workers'
        trials; queue the first trial of a new study and the retries of crashed ones."""
        for s in self.strategies:
            with self._lock(s):
                name = f"{self.study.name}/{s}"
                try:
                    existing = optuna.load_study(study_name=name, storage=self.storage)
                    check_metric(self.study, existing)
                    n = len(existing.get_trials(deepcopy=False))
                except KeyError:
                    n = 0
                ostudy = optuna.create_study(
                    study_name=name, storage=self.storage, load_if_exists=True, direction=self.study.direction,
                    sampler=make_sampler(self.study.config.sampler, self.sampler_seed(s, n)),
                    pruner=make_pruner(self.study.config.pruner, self.study.config.budget.epochs,
                                       self.study.config.metric))
                ostudy.set_user_attr(METRIC_ATTR, self.study.config.metric)
                self.ostudies[s] = ostudy
                self._recover(ostudy)
                self._requeue_errored(ostudy)
                if n == 0:
                    first = (centre or {}).get(s) or self.study.baseline(s)
                    if first:
                        ostudy.enqueue_trial(first)
                self.parents[s] = self._parent(s, ostudy)

    def sampler_seed(self, strategy: str, n_trials: int) -> int:
        """The seed of this worker's sampler for `strategy`, joining a study of `n_trials`
        trials: the study's seed + n_trials + seed_offset when an offset is given, else a hash
        of (study seed, strategy, worker token, n_trials), so no two workers draw alike."""
        seed = int(self.study.base.get("seed", 0))
        if self.seed_offset is not None:
            return seed + n_trials + self.seed_offset
        key = f"{seed}/{strategy}/{self.token}/{n_trials}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")   # numpy takes 32 bits

    def _parent(self, strategy: str, ostudy: optuna.Study) -> str:
        """The strategy's parent run: made once (its id kept in the Optuna study), reopened
        when a resumed sweep has trials to add."""
        run_id = ostudy.user_attrs.get(PARENT_ATTR)
        status = self.tracking.status(run_id)
        if status is None:   # new, or the tracking store was reset
            cfg = self.study.config
            run_id = self.tracking.start(self.study.name, strategy, tags={
                "strategy": strategy, "harness.kind": "sweep", "optuna.study": ostudy.study_name})
            ostudy.set_user_attr(PARENT_ATTR, run_id)
            parent = self.tracking.tracker(run_id)
            try:
                parent.log_params({"strategy": strategy, "budget.epochs": cfg.budget.epochs, "sampler": cfg.sampler,
                                   "pruner": cfg.pruner, "metric": cfg.metric})
            finally:
                parent.close()
        elif status != "RUNNING" and count_trials(ostudy).done < self.n_trials:
            self.tracking.reopen(run_id)
        return run_id

    # --- working -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            with interrupts.deferred():   # Ctrl-C is raised between batches and trials
                waiting = [s for s in self.strategies if self._drain(s) is Claim.BUSY]
                told: set[str] = set()
                backoff = Backoff(rng=random.Random(self.token))
                while waiting:
                    ran = self.trials_run
                    for s in list(waiting):
                        if self._drain(s) is Claim.COMPLETE:
                            waiting.remove(s)
                        elif s not in told:
                            told.add(s)
                            self.echo(f"[{s}] waiting for the trials running in other workers "
                                      "(a lost one is run again here)")
                    if self.trials_run != ran:   # a lost trial came back: poll soon again
                        backoff.reset()
                    if waiting:
                        interrupts.sleep(backoff.next())
        except BaseException as e:
            self.abandon(e)
            raise

    def _drain(self, strategy: str) -> Claim:
        """Run this strategy's trials while there are some to claim: COMPLETE or BUSY."""
        while (state := self._claim(strategy)) is Claim.RAN:
            pass
        if state is Claim.COMPLETE:
            self._finish(strategy)
        return state

    def _claim(self, strategy: str) -> Claim:
        interrupts.checkpoint()
        ostudy = self.ostudies[strategy]
        with self._lock(strategy) as lock:
            self._recover(ostudy)
            c = count_trials(ostudy)
            if c.done >= self.n_trials:
                return Claim.COMPLETE
            if c.done + c.running >= self.n_trials:
                return Claim.BUSY

            def started(trial: optuna.Trial) -> None:
                # the claim is recorded: let the other workers claim theirs
                trial.set_user_attr(WORKER_ATTR, self.id)
                lock.release()

            run = objective(self.study, strategy, self.stores, self.parents[strategy],
                            on_start=started, worker=self.name or self.id)
            self.trials_run += 1
            ostudy.optimize(run, n_trials=1, gc_after_trial=True,
                            callbacks=[Progress(strategy, self.n_trials, self.echo)])
        return Claim.RAN

    def _finish(self, strategy: str) -> None:
        """The study has its trials: summarise them on the parent run and close it (once)."""
        run_id = self.parents[strategy]
        with self._lock(strategy):
            if self.tracking.status(run_id) == "FINISHED":
                return
            parent = self.tracking.tracker(run_id)
            try:
                summarize_parent(self.study, strategy, self.ostudies[strategy], parent)
            finally:
                parent.close()
            self.tracking.finish(run_id)

    def abandon(self, error: BaseException) -> None:
        """Leaving early: stopped by Ctrl-C or SIGTERM, the interrupted trial is queued again
        for the workers that go on; a parent run with no trial running anywhere ends KILLED
        (stopped) or FAILED, so the UI shows no sweep as running that is not."""
        interrupted = isinstance(error, KeyboardInterrupt)
        for s, ostudy in self.ostudies.items():
            try:
                if interrupted:
                    with self._lock(s):
                        for number in self._requeue_errored(ostudy):
                            self.echo(f"[{s}] trial {number} was interrupted; queued again")
            except Exception:
                pass   # the next worker to start queues it
            try:
                c = count_trials(ostudy)
                if c.done < self.n_trials and c.running == 0:
                    self.tracking.abandon(self.parents[s], interrupted, f"stopped at {c.done}/{self.n_trials} "
                                          f"trials ({'killed' if interrupted else 'failed'})")
            except Exception:
                pass   # the original error matters more

    # --- lost trials -------------------------------------------------------------------------
    def _recover(self, ostudy: optuna.Study) -> None:
        """Fail the trials whose worker is gone (caller holds the lock)."""
        if self.kind == "postgresql":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(ostudy)   # calls _on_stale for each
            return
        for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            wid = t.user_attrs.get(WORKER_ATTR)
            # under the lock, a claimed trial always names its worker: one without died claiming
            if wid is not None and alive(wid) is not False:
                continue
            try:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                    self.storage.get_study_id_from_name(ostudy.study_name), t.number)
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self._on_stale(ostudy, t, f"its worker ({wid or 'unknown'}) died")

    def _on_stale(self, ostudy: optuna.Study, trial: optuna.trial.FrozenTrial,
                  reason: str = "its worker stopped sending heartbeats") -> None:
        """A lost trial (already FAIL): its MLflow run ends FAILED, and it is queued again."""
        self.tracking.lose(trial.user_attrs.get("mlflow_run_id"), reason)
        again = requeue(ostudy, trial)
        strategy = ostudy.study_name.rsplit("/", 1)[-1]
        self.echo(f"[{strategy}] trial {trial.number} was lost ({reason}); "
                  + ("queued again" if again else f"not retried: lost {RETRIES + 1} times"))

    def _requeue_errored(self, ostudy: optuna.Study) -> list[int]:
        """Trials that crashed or were interrupted (caller holds the lock): queue them again
        once each; the numbers queued."""
        trials = ostudy.get_trials(deepcopy=False)
        retried = {n for t in trials for n in t.user_attrs.get("retry_history", [])}
        queued = []
        for t in trials:
            if (t.state == TrialState.FAIL and "failure" not in t.user_attrs
                    and t.number not in retried):
                if requeue(ostudy, t):
                    queued.append(t.number)
        return queued
