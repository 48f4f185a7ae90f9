"""Running a sweep (`run_sweep`: run or resume it; `check_stores` first): one Optuna study per
strategy, every trial a full fine-tune tracked in MLflow.

Layout in MLflow: experiment = study name; one parent run per strategy (reopened on
resume); one nested child run per trial. In Optuna: study `<name>/<strategy>`; each trial
keeps its complete recipe (user attr `recipe`), so the best one can be exported and replayed.
"""
from __future__ import annotations

from typing import Any, Callable

from harness.engine.train import check_inputs
from harness.sweep import connections, launch
from harness.sweep import storage as st
from harness.sweep.optuna_studies import count_trials
from harness.sweep.study import Selection, Study
from harness.sweep.worker import Worker
from harness.tracking import Tracking
from harness.workspace import Stores


def check_stores(study: Study, stores: Stores, selection: Selection, workers: int = 1) -> None:
    """Everything checked before any store is written: the data and weights (the same for
    every trial), the Optuna store reachable, the tracking store writable."""
    first = selection.strategies[0]
    check_inputs(study.recipe_for(first, study.baseline(first)), stores.workspace)
    st.check(stores.storage, workers)
    Tracking(stores.tracking_uri, stores.workspace).probe(study.name)


def run_sweep(study: Study, stores: Stores, selection: Selection, workers: launch.Launch = launch.Launch(),
              centre: dict[str, dict[str, Any]] | None = None, echo: Callable[[str], None] = print) -> None:
    """Run (or resume) the sweep: per strategy, add only the trials still missing, in this
    process (one worker) or in `workers.workers` worker processes.

    `centre` optionally replaces a strategy's first trial (e.g. from lr-find)."""
    envs = launch.worker_envs(study, workers)
    check_stores(study, stores, selection, len(envs))
    connections.warn_if_short(stores.storage, len(envs), stores.tracking_uri)
    worker = Worker(study, stores, selection, echo=echo)
    worker.prepare(centre)
    n = selection.trials
    for s in selection.strategies:
        done = count_trials(worker.ostudies[s]).done
        echo(f"[{s}] {done} trials done, running {n - done} more ({study.config.budget.epochs} epochs each)"
             if done < n else f"[{s}] already has {done} trials; nothing to add")
    if len(envs) == 1:
        worker.run()
        return
    echo(f"starting {len(envs)} workers on {launch.describe(envs)}")
    launch.supervise(launch.worker_argv(study, stores, selection), envs, stores.env(), echo)
