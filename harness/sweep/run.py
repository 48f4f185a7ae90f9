"""Running a sweep (`run_sweep`: run or resume it; `check_stores` first): one Optuna study per
strategy, every trial a full fine-tune tracked in MLflow.

Layout in MLflow: experiment = study name; one parent run per strategy (reopened on
resume); one nested child run per trial. In Optuna: study `<name>/<strategy>`; each trial
keeps its complete recipe (user attr `recipe`), so the best one can be exported and replayed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harness.engine.train import check_inputs
from harness.sweep import connections, launch, ray_engine
from harness.sweep import storage as st
from harness.sweep.optuna_studies import count_trials
from harness.sweep.ray_engine import RayLaunch
from harness.sweep.study import Selection, Study
from harness.sweep.worker import Worker
from harness.tracking import Tracking
from harness.workspace import Stores


def check_stores(study: Study, stores: Stores, selection: Selection, workers: int = 1, probe: bool = True) -> None:
    """Everything checked before any store is written: the data and weights (the same for
    every trial), the Optuna store reachable, the tracking store writable (`probe`, which
    writes the study's experiment: last)."""
    first = selection.strategies[0]
    check_inputs(study.recipe_for(first, study.baseline(first)), stores.workspace)
    st.check(stores.storage, workers)
    if probe:
        Tracking(stores.tracking_uri, stores.workspace).probe(study.name)


def run_sweep(study: Study, stores: Stores, selection: Selection,
              workers: launch.Launch | RayLaunch = launch.Launch(),
              centre: dict[str, dict[str, Any]] | None = None, echo: Callable[[str], None] = print) -> None:
    """Run (or resume) the sweep: per strategy, add only the trials still missing, in this
    process (one worker), in `workers.workers` worker processes, or as Ray tasks (RayLaunch).

    `centre` optionally replaces a strategy's first trial (e.g. from lr-find)."""
    if isinstance(workers, RayLaunch):
        _run_on_ray(study, stores, selection, workers, centre, echo)
        return
    envs = launch.worker_envs(study, workers)
    check_stores(study, stores, selection, len(envs))
    connections.warn_if_short(stores.storage, len(envs), stores.tracking_uri)
    worker = _prepared(study, stores, selection, centre, echo)
    if len(envs) == 1:
        worker.run()
        return
    echo(f"starting {len(envs)} workers on {launch.describe(envs)}")
    launch.supervise(launch.worker_argv(study, stores, selection), envs, stores.env(), echo)


def _prepared(study: Study, stores: Stores, selection: Selection, centre: dict[str, dict[str, Any]] | None,
              echo: Callable[[str], None]) -> Worker:
    """The studies and parent runs made (or reopened), and what each strategy still needs said."""
    worker = Worker(study, stores, selection, echo=echo)
    worker.prepare(centre)
    n = selection.trials
    for s in selection.strategies:
        done = count_trials(worker.ostudies[s]).done
        echo(f"[{s}] {done} trials done, running {n - done} more ({study.config.budget.epochs} epochs each)"
             if done < n else f"[{s}] already has {done} trials; nothing to add")
    return worker


def _run_on_ray(study: Study, stores: Stores, selection: Selection, options: RayLaunch,
                centre: dict[str, dict[str, Any]] | None, echo: Callable[[str], None]) -> None:
    """The workers as Ray tasks (harness/sweep/ray_engine.py); this process only prepares the
    studies and waits."""
    ray_engine.import_ray()
    ray_engine.check_address(options, stores.storage, stores.tracking_uri)
    check_stores(study, stores, selection, workers=2, probe=False)
    with ray_engine.connected(options, stores.storage, stores.tracking_uri) as cluster:
        gpus, cpus = ray_engine.worker_size(cluster, options, str(study.base.get("device", "auto")))
        Tracking(stores.tracking_uri, stores.workspace).probe(study.name)
        worker = _prepared(study, stores, selection, centre, echo)
        missing = sum(max(0, selection.trials - count_trials(worker.ostudies[s]).done) for s in selection.strategies)
        if missing == 0:
            worker.run()   # closes the parent runs
            return
        k = options.workers or max(1, min(cluster.capacity(gpus, cpus), missing))
        connections.warn_if_short(stores.storage, k, stores.tracking_uri)
        echo(f"starting {k} Ray worker(s) ({gpus:g} GPU, {cpus:g} CPU each) on {len(cluster.nodes)} node(s)"
             + ("" if cluster.started_here else f" of the cluster at {options.address}"))
        spec = ray_engine.TaskSpec(str(Path(study.source).resolve()), str(stores.workspace.resolve()),
                                   ray_engine.without_password(stores.storage),
                                   ray_engine.without_password(stores.tracking_uri), stores.heartbeat,
                                   tuple(selection.strategies), selection.trials)
        try:
            ran = ray_engine.run_workers(cluster, spec, k, gpus, cpus, echo)
        except BaseException as e:   # a worker cancelled before it began leaves its trial to this
            worker.abandon(e)
            raise
    # after the disconnect, which flushes the workers' last lines
    echo(f"Ray workers done: {sum(ran.values())} trial(s) run by {len(ran)} worker(s)")
