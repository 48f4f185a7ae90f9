"""Optuna's side of a sweep: one study per strategy (`<study>/<strategy>`), its sampler and
pruner, the trial counts, the best trial, and a lost trial's parameters queued again."""
from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from harness.errors import HarnessError, redact
from harness.sweep import storage
from harness.sweep.study import Study

PARENT_ATTR = "mlflow_parent_run_id"   # study user attr: the strategy's MLflow parent run
METRIC_ATTR = "metric"                 # study user attr: the metric its trials' values are (val/accuracy if absent)
RETRIES = 3                            # a lost trial is queued again at most this many times


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


def make_pruner(name: str, epochs: int, metric: str = "val/accuracy") -> optuna.pruners.BasePruner:
    """`layout`: harness.sweep.pruning.LayoutPruner (compares only end-of-stage values of
    trials with the same stages so far, beyond the noise of `metric` on the val set; see
    README "Pruning"). `median` and `hyperband` are Optuna's, comparing every epoch across all trials."""
    if name == "layout":
        from harness.sweep.pruning import LayoutPruner
        return LayoutPruner(metric=metric)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def load_ostudy(study: Study, strategy: str, spec: str) -> optuna.Study | None:
    """The strategy's Optuna study, or None when it was never started."""
    if not storage.exists(spec):
        return None  # nothing swept yet; looking must not create a store
    try:
        ostudy = optuna.load_study(study_name=f"{study.name}/{strategy}", storage=storage.open_storage(spec))
    except KeyError:
        return None
    except HarnessError:
        raise
    except Exception as e:
        raise HarnessError(f"--storage: cannot open {redact(spec)} ({e.__class__.__name__})") from None
    check_metric(study, ostudy)
    return ostudy


def check_metric(study: Study, ostudy: optuna.Study) -> None:
    """Refuse a stored study swept on another metric: its values (and its direction, which
    Optuna keeps from creation) are not this study file's metric."""
    stored = ostudy.user_attrs.get(METRIC_ATTR, "val/accuracy")
    if stored != study.config.metric:
        raise HarnessError(f"{study.source}: metric: {study.config.metric}, but the stored study "
                           f"{ostudy.study_name} was swept on {stored}; give the study a new name "
                           f"or set metric back to {stored}")


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
        if t.state == TrialState.COMPLETE:
            c.complete += 1
        elif t.state == TrialState.PRUNED:
            c.pruned += 1
        elif t.state == TrialState.FAIL:
            if "failure" in t.user_attrs:
                c.failed += 1
            else:
                c.errored += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
    return c


def best_trial(ostudy: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return ostudy.best_trial
    except ValueError:  # no completed trial yet
        return None


def requeue(ostudy: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue `trial`'s parameters again (a WAITING trial); False after RETRIES retries."""
    history = list(trial.user_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > RETRIES:
        return False
    params = dict(trial.params) or enqueued_params(trial)   # lost before it drew them: what it was queued with
    ostudy.enqueue_trial(params, user_attrs={"retry_of": history[0], "retry_history": history})
    return True


def enqueued_params(trial: optuna.trial.FrozenTrial) -> dict:
    """The params `Study.enqueue_trial` queued `trial` with ({} if none). Optuna has no public
    reader: they are its system attr "fixed_params" (as of optuna 5.0; a test pins the version)."""
    return dict(trial.system_attrs.get("fixed_params", {}))
