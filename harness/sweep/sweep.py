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

from harness.errors import HarnessError, redact
from harness.sweep.space import suggest
from harness.sweep.study import Study

PARENT_ATTR = "mlflow_parent_run_id"


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


def load_ostudy(study: Study, strategy: str, spec: str) -> optuna.Study | None:
    """The strategy's Optuna study, or None when it was never started."""
    from harness.sweep import storage
    if not storage.exists(spec):
        return None  # nothing swept yet; looking must not create a store
    try:
        return optuna.load_study(study_name=f"{study.name}/{strategy}", storage=storage.open_storage(spec))
    except KeyError:
        return None
    except HarnessError:
        raise
    except Exception as e:
        raise HarnessError(f"--storage: cannot open {redact(spec)} ({e.__class__.__name__})") from None


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
              centre: dict[str, dict[str, Any]] | None = None, workers: int | None = None,
              workers_per_gpu: int = 1, heartbeat: int = 30,
              echo: Callable[[str], None] = print) -> None:
    """Run (or resume) the sweep: per strategy, add only the trials still missing, in this
    process (one worker) or in `workers` worker processes.

    `centre` optionally replaces a strategy's first trial (e.g. from lr-find)."""
    from harness.sweep import launch

    strategies, n_trials = _chosen(study, strategies, trials)
    envs = launch.worker_envs(study, workers, workers_per_gpu)
    worker = join(study, workspace, strategies, n_trials, storage, tracking_uri, heartbeat,
                  workers=len(envs), echo=echo)
    worker.prepare(centre)
    for s in strategies:
        done = count_trials(worker.ostudies[s]).done
        echo(f"[{s}] {done} trials done, running {n_trials - done} more ({study.config.budget.epochs} epochs each)"
             if done < n_trials else f"[{s}] already has {done} trials; nothing to add")
    if len(envs) == 1:
        worker.run()
        return
    echo(f"starting {len(envs)} workers on {launch.describe(envs)}")
    launch.supervise(launch.worker_argv(study, workspace, strategies, n_trials, heartbeat), envs,
                     {"HARNESS_STORAGE": worker.spec, "MLFLOW_TRACKING_URI": worker.uri}, echo)


def join(study: Study, workspace: str | Path, strategies: list[str], n_trials: int,
         storage: str | None, tracking_uri: str | None, heartbeat: int = 30, workers: int = 1,
         name: str = "", seed_offset: int = 0, echo: Callable[[str], None] = print):
    """Everything checked before any store is written (data and weights, the Optuna store
    reachable, the tracking store writable), then a Worker for this process."""
    from harness.sweep import storage as st
    from harness.tracking import default_tracking_uri, probe_tracking
    from harness.engine.train import check_inputs
    from harness.sweep.worker import Worker

    # the data and weights are the same for every trial
    check_inputs(study.recipe_for(strategies[0], study.baseline(strategies[0])), workspace)
    spec = st.resolve(workspace, storage)
    st.check(spec, workers)
    uri = default_tracking_uri(workspace, tracking_uri)
    probe_tracking(uri, study.name, workspace)
    return Worker(study, workspace, spec, uri, strategies, n_trials, heartbeat, name, seed_offset, echo)


def _chosen(study: Study, strategies: list[str] | None, trials: int | None) -> tuple[list[str], int]:
    strategies = strategies or study.strategies
    unknown = [s for s in strategies if s not in study.spaces]
    if unknown:
        raise HarnessError(f"--strategy: '{unknown[0]}' is not in the study "
                           f"(it has: {', '.join(study.strategies)})")
    return strategies, trials or study.config.trials


def _objective(study: Study, strategy: str, uri: str, workspace, parent_id: str,
               on_start: Callable[[optuna.Trial], None] = lambda trial: None, worker: str = ""):
    from harness.tracking import mlflow_run, tracked_fine_tune

    def objective(trial: optuna.Trial) -> float:
        on_start(trial)
        try:
            return run_trial(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)   # FAIL, not a result: run again on resume
            raise

    def run_trial(trial: optuna.Trial) -> float:
        params = suggest(trial, study.spaces[strategy])
        recipe = study.recipe_for(strategy, params)
        trial.set_user_attr("recipe", recipe.to_yaml())
        started = time.perf_counter()
        with mlflow_run(uri, study.name, f"{strategy}-trial-{trial.number}", workspace,
                        parent_run_id=parent_id,
                        tags=_trial_tags(strategy, trial, worker)) as tracker:
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


def _trial_tags(strategy: str, trial: optuna.Trial, worker: str) -> dict[str, Any]:
    tags = {"strategy": strategy, "optuna.trial_number": trial.number}
    if worker:
        tags["harness.worker"] = worker
    if "retry_of" in trial.user_attrs:   # a re-run of a lost or interrupted trial
        tags["optuna.retry_of"] = trial.user_attrs["retry_of"]
    return tags


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
