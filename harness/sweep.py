"""Sweeps: one Optuna study per strategy, every trial a full fine-tune tracked in MLflow.

Layout in MLflow: experiment = study name; one parent run per strategy (reopened on
resume); one nested child run per trial. In Optuna: study `<name>/<strategy>`; each trial
keeps its complete recipe (user attr `recipe`), so the best one can be exported and replayed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna

from harness.errors import HarnessError
from harness.space import suggest
from harness.study import Study

PARENT_ATTR = "mlflow_parent_run_id"


def storage_url(workspace: str | Path, explicit: str | None = None) -> str:
    """--storage, else HARNESS_STORAGE, else the workspace's optuna.db."""
    from harness.tracking import store_url
    return store_url(workspace, explicit, "HARNESS_STORAGE", "optuna.db")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    # group=True: lr_low's range depends on lr_high, a conditional space (experimental in
    # optuna, and says so at every study; the warning is noise to our users)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=4)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def load_ostudy(study: Study, strategy: str, storage: str) -> optuna.Study | None:
    """The strategy's Optuna study, or None when it was never started."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        return None  # nothing swept yet; looking must not create a database
    try:
        return optuna.load_study(study_name=f"{study.name}/{strategy}", storage=storage)
    except KeyError:
        return None
    except Exception as e:
        raise HarnessError(f"--storage: cannot open {_redact(storage)} ({e.__class__.__name__})") from None


def open_study(study: Study, strategy: str, storage: str, seed: int = 0) -> optuna.Study:
    """The strategy's Optuna study (created if new). The sampler's seed is offset by the
    trials already there, so a resumed sweep does not replay the same random draws."""
    existing = load_ostudy(study, strategy, storage)
    n = len(existing.get_trials(deepcopy=False)) if existing else 0
    return optuna.create_study(study_name=f"{study.name}/{strategy}", storage=storage, load_if_exists=True,
                               direction=study.direction,
                               sampler=make_sampler(study.config.sampler, seed + n),
                               pruner=make_pruner(study.config.pruner, study.config.budget.epochs))


def _redact(url: str) -> str:
    # never print a database password
    import re
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0      # a result: the fine-tune diverged (user attr `failure` says how)
    errored: int = 0     # not a result: crashed or interrupted; its trial is run again
    running: int = 0

    @property
    def done(self) -> int:
        return self.complete + self.pruned + self.failed


def count_trials(ostudy: optuna.Study) -> Counts:
    c = Counts()
    for t in ostudy.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE:
            c.complete += 1
        elif t.state == optuna.trial.TrialState.PRUNED:
            c.pruned += 1
        elif t.state == optuna.trial.TrialState.FAIL:
            if "failure" in t.user_attrs:
                c.failed += 1
            else:
                c.errored += 1
        elif t.state == optuna.trial.TrialState.RUNNING:
            c.running += 1
    return c


def best_trial(ostudy: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return ostudy.best_trial
    except ValueError:  # no completed trial yet
        return None


def run_sweep(study: Study, workspace: str | Path, strategies: list[str] | None = None,
              trials: int | None = None, storage: str | None = None, tracking_uri: str | None = None,
              centre: dict[str, dict[str, Any]] | None = None,
              echo: Callable[[str], None] = print) -> dict[str, optuna.Study]:
    """Run (or resume) the sweep: per strategy, add only the trials still missing.

    `centre` optionally replaces a strategy's first trial (e.g. from lr-find)."""
    from harness.tracking import default_tracking_uri, make_client, mlflow_run
    from harness.train import check_inputs

    strategies = strategies or study.strategies
    unknown = [s for s in strategies if s not in study.spaces]
    if unknown:
        raise HarnessError(f"--strategy: '{unknown[0]}' is not in the study "
                           f"(it has: {', '.join(study.strategies)})")
    n_trials = trials or study.config.trials
    # the data and weights are the same for every trial: check them before any store is touched
    check_inputs(study.recipe_for(strategies[0], study.baseline(strategies[0])), workspace)
    storage = storage_url(workspace, storage)
    uri = default_tracking_uri(workspace, tracking_uri)
    seed = int(study.base.get("seed", 0))
    out = {}
    for strategy in strategies:
        ostudy = open_study(study, strategy, storage, seed)
        out[strategy] = ostudy
        counts = count_trials(ostudy)
        missing = n_trials - counts.done
        if missing <= 0:
            echo(f"[{strategy}] already has {counts.done} trials; nothing to add")
            continue
        first = (centre or {}).get(strategy) or study.baseline(strategy)
        if first and _first_trial_missing(ostudy):
            ostudy.enqueue_trial(first)
        parent_id = _existing_parent(make_client(uri), ostudy.user_attrs.get(PARENT_ATTR))
        echo(f"[{strategy}] {counts.done} trials done, running {missing} more "
             f"({study.config.budget.epochs} epochs each)")
        with mlflow_run(uri, study.name, strategy, workspace, resume_run_id=parent_id,
                        tags={"strategy": strategy, "harness.kind": "sweep",
                              "optuna.study": ostudy.study_name}) as parent:
            if parent_id is None:
                ostudy.set_user_attr(PARENT_ATTR, parent.run_id)
                parent.log_params({"strategy": strategy, "budget.epochs": study.config.budget.epochs,
                                   "sampler": study.config.sampler, "pruner": study.config.pruner,
                                   "metric": study.config.metric})
            objective = _objective(study, strategy, uri, workspace, parent.run_id)
            progress = _Progress(strategy, n_trials, echo)
            ostudy.optimize(objective, n_trials=missing, callbacks=[progress], gc_after_trial=True)
            summarize_parent(study, strategy, ostudy, parent)
    return out


def _first_trial_missing(ostudy: optuna.Study) -> bool:
    """True for a new study, and when every enqueued first trial so far crashed (FAIL with
    no recorded divergence) and none is waiting: the baseline must still run."""
    enqueued = [t for t in ostudy.get_trials(deepcopy=False) if "fixed_params" in t.system_attrs]
    if not ostudy.get_trials(deepcopy=False):
        return True
    return bool(enqueued) and all(t.state == optuna.trial.TrialState.FAIL and "failure" not in t.user_attrs
                                  for t in enqueued)


def _existing_parent(client, run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        client.get_run(run_id)
        return run_id
    except Exception:  # the tracking store was reset: start a new parent
        return None


def _objective(study: Study, strategy: str, uri: str, workspace, parent_id: str):
    from harness.tracking import mlflow_run, tracked_fine_tune

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, study.spaces[strategy])
        recipe = study.recipe_for(strategy, params)
        trial.set_user_attr("recipe", recipe.to_yaml())
        started = time.perf_counter()
        with mlflow_run(uri, study.name, f"{strategy}-trial-{trial.number}", workspace,
                        parent_run_id=parent_id,
                        tags={"strategy": strategy, "optuna.trial_number": trial.number}) as tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)

            def report(epoch: int, val_accuracy: float | None) -> None:
                if val_accuracy is None:
                    return
                trial.report(val_accuracy, epoch)
                if trial.should_prune():
                    tracker.status, tracker.reason = "KILLED", f"pruned at epoch {epoch}"
                    tracker.set_tags({"harness.pruned": "true"})
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

            result = tracked_fine_tune(recipe, tracker, workspace, report=report,
                                       extra_params=params, evaluate_test=False)
        trial.set_user_attr("seconds", time.perf_counter() - started)
        if not result.ok:
            trial.set_user_attr("failure", result.status)
            return math.nan   # optuna records FAILED and the sweep goes on
        if result.val_accuracy is None:
            raise HarnessError("recipe.data.val_fraction: a sweep needs a validation split (> 0)")
        return result.val_accuracy

    return objective


class _Progress:
    """One line per finished trial: counts, this trial's value, best so far."""

    def __init__(self, strategy: str, total: int, echo: Callable[[str], None]):
        self.strategy, self.total, self.echo = strategy, total, echo

    def __call__(self, ostudy: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        c = count_trials(ostudy)
        best = best_trial(ostudy)
        state = trial.state.name.lower()
        value = f"{trial.value:.4f}" if trial.value is not None else trial.user_attrs.get("failure", state)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        self.echo(f"[{self.strategy}] trial {trial.number} {state:8s} {value}  ({params})  | "
                  f"{c.done}/{self.total} done, {c.pruned} pruned, {c.failed} failed, best "
                  f"{'-' if best is None else f'{best.value:.4f}'}")


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summarize_parent(study: Study, strategy: str, ostudy: optuna.Study, parent) -> None:
    """Best value and params, best recipe YAML, the trials table and Optuna's plots on the parent run."""
    import tempfile

    from harness.report import optuna_figures

    best = best_trial(ostudy)
    if best is not None:
        metrics = {f"best/{study.config.metric.split('/')[-1]}": best.value}
        metrics.update({f"best/{k}": float(v) for k, v in best.params.items() if isinstance(v, (int, float))})
        parent.log_epoch(len(ostudy.trials), metrics)
        parent.set_tags({"best.trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}})
        parent.log_text(best.user_attrs["recipe"], "best_recipe.yaml")
    df = ostudy.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
    df = df.drop(columns=[c for c in df.columns if c == "user_attrs_recipe"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        df.to_csv(path, index=False)
        parent.log_file(path)
    import matplotlib.pyplot as plt
    for name, fig in optuna_figures(ostudy):
        parent.log_figure(fig, f"{name}.png")
        plt.close(fig)
