"""Pruning that compares like with like: `LayoutPruner` (study files: `pruner: layout`), and
`replay`, which re-runs any pruner's decisions on recorded per-epoch values (bench/bench_pruning.py).

Why not Optuna's MedianPruner: a trial's val accuracy after epoch k means different things
in different trials. Each stage is a one-cycle fit, so mid-stage a trial's value depends on
how far its warm-up has got (pct_start), and a two_phase trial with freeze_epochs 3 is
still a frozen body at epoch 2, while one with freeze_epochs 1 has trained its body for an
epoch. Comparing them answers the question the sweep asks (how long to freeze) before it
is asked. So this pruner compares a value only

- at an **annealed point**: the last epoch of a stage that is not the trial's last stage,
  where that stage's one-cycle has brought the LR down to lr/div_final (mid-stage values
  and the final epoch are never judged: the last epoch saves nothing);
- against **peers with the same layout so far**: the trials whose stages up to that point
  have the same epochs and the same number of trainable groups;
- and prunes only when the trial is below the peers' quantile (median by default) by more
  than the metric's noise: val accuracy on n images has a binomial standard error
  sqrt(p(1-p)/n), so the margin is `z` of those (p: the peers' quantile; z 2 by default).

A single-stage strategy (naive, head_only, discriminative) has no annealed point before
its end, so this pruner never prunes it. `mid_stage_from` also judges mid-stage values,
among trials with the same stages up to and including the current one; `pruner: layout`
leaves it off, because measured on imagenet-transfer it pruned naive's 2nd and 3rd best
trials even at z 2 (bench/bench_pruning.py; README "Pruning").

What the trial gives the pruner (user attrs, set by harness.sweep.trial before the first
report): `stage_layout` [[epochs, trainable groups] per stage], `val_images` (n) and
`val_class_counts`. A trial without `stage_layout` has its layout read from its `recipe`
attr; one without `val_images` is judged with the pruner's `default_n`, or never pruned
when that is None. For the class-averaged metrics (balanced accuracy, macro F1) n is the
effective count of `noise_images`; val/loss has no binomial noise, and is never judged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import optuna
import yaml
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

LAYOUT_ATTR = "stage_layout"    # [[epochs, trainable groups], ...] of the trial's stages
N_ATTR = "val_images"           # the images its val accuracy is measured on
CLASS_COUNTS_ATTR = "val_class_counts"   # the val images of each class present
PROPORTIONS = ("val/accuracy", "val/balanced_accuracy", "val/macro_f1")   # metrics with a binomial noise
NOISE_Z = 2.0                   # the margin, in standard errors, of pruning and of `harness status`

Layout = tuple[tuple[int, int], ...]


def recipe_layout(recipe: Any) -> Layout:
    """(epochs, trainable groups) per stage of a Recipe, or of its YAML / dict form."""
    from harness.engine.recipe import Stage
    if isinstance(recipe, str):
        recipe = yaml.safe_load(recipe)
    if isinstance(recipe, dict):
        groups = int((recipe.get("model") or {}).get("groups", 3))
        stages = [Stage.model_validate(s) for s in recipe["stages"]]
    else:
        groups, stages = recipe.model.groups, recipe.stages
    return tuple((int(s.epochs), int(s.trainable_groups(groups))) for s in stages)


def trial_layout(trial: FrozenTrial) -> Layout | None:
    """The trial's stage layout from its user attrs (None when it has neither attr)."""
    attrs = trial.user_attrs
    if LAYOUT_ATTR in attrs:
        return tuple((int(e), int(g)) for e, g in attrs[LAYOUT_ATTR])
    if "recipe" in attrs:
        try:
            return recipe_layout(attrs["recipe"])
        except Exception:   # an unreadable recipe: no layout, never compared
            return None
    return None


def annealed_prefix(layout: Layout, step: int) -> Layout | None:
    """The stages up to and including the one that ends at epoch `step`, when that stage
    is not the last one; else None (mid-stage, or the trial's final epoch)."""
    end = 0
    for k, (epochs, _) in enumerate(layout[:-1]):
        end += epochs
        if end == step:
            return layout[:k + 1]
        if end > step:
            return None
    return None


def judged_prefix(layout: Layout, step: int, mid_stage_from: int | None = None) -> Layout | None:
    """The stages a value at epoch `step` is judged on (peers must have the same ones): at
    an annealed point, the stages up to it; mid-stage, from epoch `mid_stage_from` on, the
    stages up to and including the current one; otherwise (and at the final epoch) None."""
    prefix = annealed_prefix(layout, step)
    if prefix is not None or mid_stage_from is None or step < mid_stage_from:
        return prefix
    end = 0
    for k, (epochs, _) in enumerate(layout):
        end += epochs
        if step < end:
            return layout[:k + 1]
    return None


def noise_images(metric: str, n: int | None, class_counts: list[int] | None = None) -> float | None:
    """The image count a metric's binomial standard error is taken over: n for accuracy; for
    the class-averaged metrics C^2 / sum(1/n_c), under which balanced accuracy's standard
    error is exact when every class has the same recall (n itself when the classes are
    balanced; macro F1, which has no closed form, borrows it); None for val/loss or no n."""
    if metric not in PROPORTIONS or not n:
        return None
    if metric == "val/accuracy" or not class_counts:
        return float(n)
    return len(class_counts) ** 2 / sum(1.0 / c for c in class_counts)


def trial_noise_images(trial: FrozenTrial, metric: str, default_n: int | None = None) -> float | None:
    """noise_images of a trial, from its user attrs (`default_n` when it has no image count)."""
    attrs = trial.user_attrs
    return noise_images(metric, attrs.get(N_ATTR, default_n), attrs.get(CLASS_COUNTS_ATTR))


def binomial_margin(p: float, n: float, z: float) -> float:
    """z standard errors of an accuracy p measured on n images (p kept off 0 and 1)."""
    p = min(max(p, 1.0 / n), 1.0 - 1.0 / n) if n > 1 else 0.5
    return z * math.sqrt(p * (1.0 - p) / n)


class LayoutPruner(optuna.pruners.BasePruner):
    """Prune at annealed points only, among trials of the same layout so far, by more than
    the metric's noise. `min_peers`: trials with that layout and a value at that epoch
    needed before any comparison; `quantile`: the peers' quantile compared against (0.5 the
    median, as MedianPruner); `z`: the margin in binomial standard errors; `default_n`:
    the val images when a trial does not say (None: such a trial is never pruned);
    `mid_stage_from`: also judge mid-stage values from this epoch on, among trials with the
    same stages up to and including the current one (None: annealed points only); `metric`:
    the study's, whose noise sets the margin (`noise_images`)."""

    def __init__(self, min_peers: int = 3, quantile: float = 0.5, z: float = NOISE_Z, default_n: int | None = None,
                 mid_stage_from: int | None = None, metric: str = "val/accuracy"):
        if min_peers < 1:
            raise ValueError("min_peers must be >= 1")
        if not 0.0 < quantile < 1.0:
            raise ValueError("quantile must be in (0, 1)")
        if z < 0:
            raise ValueError("z must be >= 0")
        self.min_peers, self.quantile, self.z, self.default_n = min_peers, quantile, z, default_n
        self.mid_stage_from, self.metric = mid_stage_from, metric
        self._from_recipe: dict[str, Layout | None] = {}   # recipe YAML -> its layout (parsed once)

    def _layout(self, t: FrozenTrial) -> Layout | None:
        if LAYOUT_ATTR in t.user_attrs or not isinstance(t.user_attrs.get("recipe"), str):
            return trial_layout(t)
        text = t.user_attrs["recipe"]
        if text not in self._from_recipe:
            self._from_recipe[text] = trial_layout(t)
        return self._from_recipe[text]

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        layout = self._layout(trial)
        prefix = None if layout is None else judged_prefix(layout, step, self.mid_stage_from)
        if prefix is None:
            return False
        if math.isnan(value):
            return True
        n = trial_noise_images(trial, self.metric, self.default_n)
        if not n:
            return False
        peers = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)):
            if t.number == trial.number or step not in t.intermediate_values:
                continue
            other = self._layout(t)
            if other is not None and other[:len(prefix)] == prefix and not math.isnan(t.intermediate_values[step]):
                peers.append(t.intermediate_values[step])
        if len(peers) < self.min_peers:
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        ref = _quantile(peers, self.quantile if maximize else 1.0 - self.quantile)
        margin = binomial_margin(ref, n, self.z)
        return value < ref - margin if maximize else value > ref + margin


def _quantile(values: Sequence[float], q: float) -> float:
    """numpy's linear-interpolated quantile; q 0.5 is the median."""
    return float(np.quantile(values, q))


# --- replaying a pruner on recorded values ---------------------------------------------------

@dataclass
class Record:
    """One trial of an unpruned run: its per-epoch values (epoch -> value), final value
    (None when it failed), params and the user attrs a pruner may read."""
    number: int
    values: dict[int, float]
    final: float | None
    params: dict[str, Any] = field(default_factory=dict)
    user_attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replay:
    """What a pruner would have done: per trial number, the epoch it was pruned at (None:
    it ran to the end), and the epochs run against the epochs of the unpruned run."""
    pruned_at: dict[int, int | None]
    epochs_run: int
    epochs_total: int

    @property
    def saved(self) -> float:
        """The fraction of the unpruned run's epochs a pruned run would not have trained."""
        return 1.0 - self.epochs_run / self.epochs_total if self.epochs_total else 0.0

    @property
    def n_pruned(self) -> int:
        return sum(e is not None for e in self.pruned_at.values())


def replay(records: Iterable[Record], pruner: optuna.pruners.BasePruner, direction: str = "maximize",
           order: Sequence[int] | None = None, study_name: str = "replay") -> Replay:
    """Run `pruner` on `records` as if they were trained one after another (in `order`, a
    list of trial numbers; default: trial number order): each trial reports its values epoch
    by epoch, and stops at the first epoch the pruner says so. A failed record (final None)
    ends FAILED after its values. `study_name`: HyperbandPruner picks a trial's bracket from
    the study name and trial number, so the recorded study's name replays its brackets."""
    recs = {r.number: r for r in records}
    order = list(order) if order is not None else sorted(recs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, direction=direction, pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(0))
    pruned_at: dict[int, int | None] = {}
    run = total = 0
    for number in order:
        r = recs[number]
        t = study.ask()
        for k, v in r.user_attrs.items():
            t.set_user_attr(k, v)
        pruned_at[number] = None
        steps = sorted(r.values)
        total += len(steps)
        for step in steps:
            t.report(r.values[step], step)
            run += 1
            if t.should_prune():
                pruned_at[number] = step
                break
        if pruned_at[number] is not None:
            study.tell(t, state=TrialState.PRUNED)
        elif r.final is None:
            study.tell(t, state=TrialState.FAIL)
        else:
            study.tell(t, r.final)
    return Replay(pruned_at, run, total)


def records_of(ostudy: optuna.Study) -> list[Record]:
    """The finished trials of a stored study as records (a pruned one keeps the values it has)."""
    out = []
    for t in ostudy.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        if t.state == TrialState.FAIL and "failure" not in t.user_attrs:
            continue   # crashed or interrupted: not a result (run again on resume)
        attrs = {k: v for k, v in t.user_attrs.items() if k in (LAYOUT_ATTR, N_ATTR, CLASS_COUNTS_ATTR, "recipe")}
        if LAYOUT_ATTR not in attrs and "recipe" in attrs:
            layout = trial_layout(t)
            if layout is not None:
                attrs[LAYOUT_ATTR] = [list(s) for s in layout]
        attrs.pop("recipe", None)
        final = t.value if t.state == TrialState.COMPLETE else None
        out.append(Record(t.number, dict(t.intermediate_values), final, dict(t.params), attrs))
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy's: average ranks for ties); nan when either side is
    constant or there are fewer than 2 values."""
    import warnings

    from scipy import stats
    if len(xs) < 2:
        return math.nan
    with warnings.catch_warnings():   # a constant side: scipy warns, and answers nan
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(xs, ys).statistic)


PrunerFactory = Callable[[], optuna.pruners.BasePruner]
