"""One trial: a strategy's hyperparameters sampled, its recipe made, a tracked fine-tune
as a child run of the strategy's parent; the line printed per finished trial; the parent
run's summary once the study has its trials."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import optuna

from harness import jobs
from harness.engine.stages import StagePlan
from harness.engine.wise_ft import HeadAfter, head_stage
from harness.errors import HarnessError
from harness.sweep.keep import keep_if_best, share
from harness.sweep.optuna_studies import best_trial, count_trials
from harness.sweep.space import suggest
from harness.sweep.study import RECIPE_FIELDS, Study
from harness.tracking import MlflowTracker, Tracking
from harness.workspace import Stores


def objective(study: Study, strategy: str, stores: Stores, parent_id: str,
              on_start: Callable[[optuna.Trial], None] = lambda trial: None,
              worker: str = "") -> Callable[[optuna.Trial], float]:
    """Optuna's objective for one strategy: `on_start(trial)` once the trial is claimed,
    then the trial as a child run of `parent_id`, named after `worker` when given."""
    tracking = Tracking(stores.tracking_uri, stores.workspace)

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
        with tracking.run(study.name, f"{strategy}-trial-{trial.number}", parent_id,
                          tags=_trial_tags(strategy, trial, worker)) as tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            # a searched recipe field is logged with the recipe's params, as the recipe holds it
            tracker.log_params({k: v for k, v in params.items() if k not in RECIPE_FIELDS})
            at = head_stage(recipe)   # WiSE-FT's start head, kept with the model
            head = HeadAfter(at) if at is not None else None
            result = jobs.tracked_fine_tune(recipe, tracker, stores.workspace, report=_pruning(trial, tracker, recipe, stores.workspace),
                                            plan=StagePlan(on_stage=head, test=False),   # tuning never looks at the test split
                                            metric=study.config.metric)
        trial.set_user_attr("seconds", time.perf_counter() - started)
        if not result.ok:
            trial.set_user_attr("failure", result.status)
            return math.nan   # optuna records FAILED and the sweep goes on
        value = result.val_metric(study.config.metric)
        if value is None:
            raise HarnessError("recipe.data.val_fraction: a sweep needs a validation split (> 0)")
        kept = keep_if_best(trial, value, result, recipe, stores.kept_models(study.name, strategy),
                            head.head(result.model) if head is not None else None)
        if kept is not None:   # where every node reads it, on an MLflow server
            share(tracking, tracker.run_id, kept)
        return value

    return objective


def _pruning(trial: optuna.Trial, tracker: MlflowTracker, recipe=None,
             workspace: str | Path | None = None) -> Callable[[int, float | None], None]:
    """fine_tune's per-epoch report: the value to Optuna; a pruned trial ends its run KILLED.
    With `recipe`, the trial first records what the layout pruner reads (harness/sweep/
    pruning.py): its stage layout now, the number of val images (and per class) at its first report."""
    from harness.sweep.pruning import CLASS_COUNTS_ATTR, LAYOUT_ATTR, N_ATTR, recipe_layout
    counted = recipe is None
    if recipe is not None:
        trial.set_user_attr(LAYOUT_ATTR, [list(s) for s in recipe_layout(recipe)])

    def report(epoch: int, value: float | None) -> None:
        nonlocal counted
        if value is None:
            return
        if not counted:   # the data is in memory by now: fine_tune has loaded it
            from harness.engine.data import load_dataset
            val = load_dataset(recipe.data, Path(workspace or "workspace"), recipe.seed).val
            trial.set_user_attr(N_ATTR, len(val.y))
            trial.set_user_attr(CLASS_COUNTS_ATTR, [int(c) for c in val.y.bincount() if c])
            counted = True
        trial.report(value, epoch)
        if trial.should_prune():
            tracker.end_as("KILLED", f"pruned at epoch {epoch}")
            tracker.set_tags({"harness.pruned": "true"})
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
    return report


def _trial_tags(strategy: str, trial: optuna.Trial, worker: str) -> dict[str, Any]:
    tags = {"strategy": strategy, "optuna.trial_number": trial.number}
    if worker:
        tags["harness.worker"] = worker
    if "retry_of" in trial.user_attrs:   # a re-run of a lost or interrupted trial
        tags["optuna.retry_of"] = trial.user_attrs["retry_of"]
    return tags


class Progress:
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
