"""fastai's LR range test (`Learner.lr_find`) on any stage of a recipe.

Stage 1: a fresh model, built and frozen exactly as `fine_tune` builds it for its first
stage. Stage K: the model as it stands after stages 1..K-1 (a stage checkpoint of the
workspace, else those stages trained as `harness train` trains them), with the shuffling
generator and the global RNG where stage K would find them, set trainable as stage K is:
fastai's `load('stage-1'); unfreeze(); lr_find()`. It trains for up to `num_it` steps
while the LR of every param group grows exponentially from `start_lr` to `end_lr`. The
smoothed loss per step gives the curve, and three suggestions are read off it: valley
(fastai's default), steep and minimum.

How this follows fastai 2.x, and where it had to choose:
- LR at step i (0-based) is `start_lr * (end_lr / start_lr) ** (i / num_it)` (SchedExp at
  pos = i / num_it), the same for every param group: lr_find ignores the stage's slice.
- beta1 is held constant. fastai builds a fresh Learner's optimizer with its Adam default
  `mom=0.9` and lr_find schedules only the LR, so the default here is `FASTAI_LR_FIND_MOM`
  (0.9), not the stage's one-cycle `moms[0]`; pass `mom=` to use another value. sqr_mom,
  eps and weight decay come from the recipe (`harness.engine.train.make_optimizer`). Stage K > 1
  keeps 0.9 too (fastai, in the session that ran stage K-1, would keep the last scheduled
  beta1, about 0.95): one setting for every stage, so their curves compare.
- `num_it` below 6 is raised to 6 (fastai's LRFinder does that), and fastai fits at most
  `num_it // steps_per_epoch + 1` epochs, so the run is capped there as well.
- Loss smoothing: `avg = beta * avg + (1 - beta) * loss` from avg = 0, and the recorded loss
  is `avg / (1 - beta ** (i + 1))` with beta = 0.98 (fastai's AvgSmoothLoss).
- Stopping: each step's LR and smoothed loss are recorded FIRST; then the best smoothed loss
  is updated, and the run stops if (stop_div and smoothed > 4 * best) or after num_it
  steps. So the step that triggered a stop is in the result, as in fastai's Recorder.
  Unlike fastai (which trains on through NaN), a non-finite raw loss also stops the run
  (always: nothing after it can be read); that step is recorded too.
- Suggestions use the points `[num_it // 10 : -5]` (fastai skips both ends), cut at the
  first non-finite loss. If fewer than 2 points are left, all recorded points up to the
  first non-finite one are used instead (fastai would raise on an empty window).
- valley: fastai's indexing is kept (the valley "starts" at end - length, one point before
  its first point when it is contiguous), except that a negative index is clamped to 0:
  fastai lets it wrap around to the LAST point (a 2-point valley from the first point).
- steep: as fastai's code does (not np.gradient): forward differences of the loss over
  log(lr); the lr at the left end of the steepest segment.
- minimum: lr at the minimum smoothed loss, divided by 10.
Each host read of the loss (one per step) is inherent to an LR finder: it decides when to stop.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from harness.engine import data as data_mod
from harness.engine.groups import set_trainable
from harness.engine.recipe import Recipe
from harness.engine.stages import (StageCheckpoint, StagePlan, StagesDidNotFinish, find_stage, restore,
                                   stage_path)
from harness.engine.step import Hyper, train_step
from harness.engine.train import fine_tune, make_optimizer, prepare, start_weights
from harness.errors import HarnessError

SMOOTH_BETA = 0.98          # fastai's AvgSmoothLoss
DIVERGENCE_FACTOR = 4.0     # stop when smoothed loss > 4 x the best so far
MIN_ITERATIONS = 6          # fastai's LRFinder runs at least 6 steps
SKIP_END = 5                # points left out at the end for suggestions and the plot
FASTAI_LR_FIND_MOM = 0.9    # fastai Adam's default beta1, in force during a fresh lr_find
SUGGESTION_NAMES = ("valley", "steep", "minimum")


@dataclass
class LRFindResult:
    lrs: list[float]                # LR of every param group at each step
    losses: list[float]             # smoothed (debiased) loss per step, as fastai records
    raw_losses: list[float]         # the batch loss per step
    suggestions: dict[str, float]   # valley, steep, minimum (= lr at min smoothed loss / 10)
    stopped_early: bool             # diverged (or non-finite) before num_it steps
    # where each suggestion sits on the curve, for the plot: name -> (lr, smoothed loss)
    points: dict[str, tuple[float, float]] = field(default_factory=dict)
    num_it: int = 0
    seconds: float = 0.0
    stage: int = 1                  # the recipe stage it ran on, counted from 1
    train: str = "head"             # what that stage trains: head, all, last N, groups i, j
    start: str = ""                 # stage > 1: the checkpoint it started from, or "trained" (no file)


# --- the schedule and the smoothing (pure) ---------------------------------------------

def exp_lr(i: int, num_it: int, start_lr: float, end_lr: float) -> float:
    """fastai SchedExp at pos = i / num_it."""
    return start_lr * (end_lr / start_lr) ** (i / num_it)


class Smoother:
    """fastai's AvgSmoothLoss: a debiased exponential moving average, one loss at a time."""

    def __init__(self, beta: float = SMOOTH_BETA):
        self.beta, self.avg, self.n = beta, 0.0, 0

    def add(self, loss: float) -> float:
        """The smoothed value after `loss`."""
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        self.n += 1
        return self.avg / (1 - self.beta ** self.n)


def smooth_losses(raw: Sequence[float], beta: float = SMOOTH_BETA) -> list[float]:
    """Debiased exponential moving average of `raw`, one value per step."""
    smoother = Smoother(beta)
    return [smoother.add(loss) for loss in raw]


# --- suggestions (pure; each returns (suggested lr, index of its point)) --------------

def valley(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, int]:
    """A bit past the start of the longest decreasing (not necessarily contiguous) run.

    For each point, the length of the longest strictly decreasing subsequence ending
    there (O(n^2)); the first point with the greatest length ends the valley, which
    fastai takes to start `length` points before it. The pick sits a third plus a sixth
    of the way in: start + int(length / 3) + int(length / 3 / 2).
    """
    n = len(losses)
    if n == 0:
        raise ValueError("valley: no points")
    longest = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[j] + 1 > longest[i]:
                longest[i] = longest[j] + 1
    end = max(range(n), key=lambda i: (longest[i], -i))    # first index of the max length
    length = longest[end]
    start = end - length
    third = length / 3
    idx = max(0, start + int(third) + int(third / 2))
    return float(lrs[idx]), idx


def steep(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, int]:
    """The lr where the loss falls fastest against log(lr): forward differences, argmin,
    the segment's left point. A single point suggests itself."""
    if len(losses) == 0:
        raise ValueError("steep: no points")
    if len(losses) == 1:
        return float(lrs[0]), 0
    slopes = [(losses[k + 1] - losses[k]) / (math.log(lrs[k + 1]) - math.log(lrs[k]))
              for k in range(len(losses) - 1)]
    idx = min(range(len(slopes)), key=lambda k: slopes[k])
    return float(lrs[idx]), idx


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, int]:
    """One tenth of the lr at the lowest loss; the index is that lowest point's."""
    if len(losses) == 0:
        raise ValueError("minimum: no points")
    idx = min(range(len(losses)), key=lambda k: losses[k])
    return float(lrs[idx]) / 10, idx


SUGGESTERS = {"valley": valley, "steep": steep, "minimum": minimum}


def suggestion_window(losses: Sequence[float], num_it: int, skip_end: int = SKIP_END) -> range:
    """Indices the suggestions read: fastai's `[num_it // 10 : -skip_end]`, cut at the first
    non-finite loss; all finite leading points when that leaves fewer than 2."""
    finite_end = next((k for k, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    window = range(num_it // 10, min(max(len(losses) - skip_end, 0), finite_end))
    if len(window) >= 2:
        return window
    return range(0, finite_end)


def suggest(lrs: Sequence[float], losses: Sequence[float],
            num_it: int) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """(suggestions, points on the curve) from a recorded run; empty when no loss is finite."""
    window = suggestion_window(losses, num_it)
    if len(window) == 0:
        return {}, {}
    w_lrs = [lrs[k] for k in window]
    w_losses = [losses[k] for k in window]
    values, points = {}, {}
    for name, fn in SUGGESTERS.items():
        value, idx = fn(w_lrs, w_losses)
        values[name] = value
        points[name] = (w_lrs[idx], w_losses[idx])
    return values, points


# --- the run -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RangeTest:
    """The range test's settings: fastai's lr_find arguments (mom None = fastai's 0.9)."""
    start_lr: float = 1e-7
    end_lr: float = 10.0
    num_it: int = 100
    stop_div: bool = True
    mom: float | None = None

    @property
    def beta1(self) -> float:
        return FASTAI_LR_FIND_MOM if self.mom is None else self.mom

    def check(self) -> None:
        start_lr, end_lr, num_it = self.start_lr, self.end_lr, self.num_it
        if not (start_lr > 0 and math.isfinite(start_lr)):
            raise HarnessError(f"lr_find: start_lr must be a positive number, got {start_lr}")
        if not (end_lr > start_lr and math.isfinite(end_lr)):
            raise HarnessError(f"lr_find: end_lr must be larger than start_lr ({start_lr:g}), got {end_lr}")
        if isinstance(num_it, bool) or not isinstance(num_it, int) or num_it < 1:
            raise HarnessError(f"lr_find: num_it must be a positive integer, got {num_it!r}")
        if not 0 <= self.beta1 < 1:
            raise HarnessError(f"lr_find: mom must be in [0, 1), got {self.beta1}")


def check_stage(recipe: Recipe, stage: Any, option: str = "stage") -> int:
    """A stage number of the recipe, counted from 1, or a one-line error naming `option`."""
    n = len(recipe.stages)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 1 <= stage <= n:
        raise HarnessError(f"{option}: {stage!r} is not a stage of the recipe (it has "
                           f"{'stage 1' if n == 1 else f'stages 1-{n}'}, counted from 1)")
    return stage


def lr_find(recipe: Recipe, workspace: str | Path = "workspace", test: RangeTest = RangeTest(), *,
            stage: int = 1, device: str | None = None) -> LRFindResult:
    """Run fastai's LR range test (settings `test`) on the recipe's stage `stage` (see the
    module docstring), with the model as it stands after the stages before it.
    harness/jobs.py logs a result to MLflow (curves, suggestions, the plot)."""
    test.check()
    check_stage(recipe, stage)
    before = states_after(recipe, [stage - 1], workspace, device)[stage - 1]
    return range_test(recipe, stage, before, test, workspace, device)


def range_test(recipe: Recipe, stage: int, before: StageCheckpoint | None, test: RangeTest,
               workspace: str | Path = "workspace", device: str | None = None) -> LRFindResult:
    """The range test on stage `stage` (from 1), starting from `before` (the run after the
    stages before it; None for stage 1: a fresh model, built as fine_tune builds it)."""
    t_start = time.perf_counter()
    run = prepare(recipe, workspace, device)
    start = start_weights(recipe, run.model)   # L2-SP's theta_0: the model as built
    if before is not None:
        restore(before, run)   # the model, and the generators as stage `stage` would find them
    cfg = recipe.stages[stage - 1]
    set_trainable(run.model, cfg.trained_groups(run.model.n_groups), recipe.model.train_bn)
    opt = make_optimizer(run.model, cfg, recipe, run.device, start)
    lrs, raw, smooth, stopped_early = _steps(run, opt, recipe, test)
    suggestions, points = suggest(lrs, smooth, test.num_it)
    return LRFindResult(lrs=lrs, losses=smooth, raw_losses=raw, suggestions=suggestions,
                        stopped_early=stopped_early, points=points, num_it=test.num_it,
                        seconds=time.perf_counter() - t_start, stage=stage, train=describe_train(cfg.train),
                        start="" if before is None else before.source or "trained")


def _steps(run, opt, recipe: Recipe, test: RangeTest) -> tuple[list[float], list[float], list[float], bool]:
    """The exponential sweep: (lrs, raw losses, smoothed losses, stopped early)."""
    model, bs = run.model, recipe.data.batch_size
    sched_it = max(test.num_it, MIN_ITERATIONS)                        # the schedule's length (fastai)
    max_steps = min(sched_it, (test.num_it // run.n_iter + 1) * run.n_iter)  # fastai fits this many epochs at most
    lrs: list[float] = []
    raw: list[float] = []
    smooth: list[float] = []
    smoother, best = Smoother(), math.inf

    def batches():
        while True:
            yield from data_mod.train_batches(run.train, bs, run.generator, recipe.data.augment, model.input_stats)

    for i, (x, y) in zip(range(max_steps), batches()):
        lr = exp_lr(i, sched_it, test.start_lr, test.end_lr)
        loss = train_step(model, opt, x, y, Hyper([lr] * model.n_groups, test.beta1, recipe.optimizer.sqr_mom))
        value = float(loss)                    # the per-step host read an LR finder needs
        smoothed = smoother.add(value)
        lrs.append(lr)
        raw.append(value)
        smooth.append(smoothed)
        if not math.isfinite(value):
            return lrs, raw, smooth, i + 1 < sched_it
        best = min(best, smoothed)
        if test.stop_div and smoothed > DIVERGENCE_FACTOR * best:
            return lrs, raw, smooth, i + 1 < sched_it
    return lrs, raw, smooth, False


def describe_train(train: Any) -> str:
    if isinstance(train, str):
        return train
    groups = getattr(train, "groups", None)
    return f"groups {', '.join(map(str, groups))}" if groups is not None else f"last {train.last}"


# --- `harness lr-find` -------------------------------------------------------------------

def chosen_stages(recipe: Recipe, stage: int | str) -> list[int]:
    """`--stage K` -> [K]; `--stage all` -> every stage of the recipe."""
    if stage == "all":
        return list(range(1, len(recipe.stages) + 1))
    try:
        k = int(stage)
    except (TypeError, ValueError):
        raise HarnessError(f"--stage: {stage!r} is neither a stage number nor 'all'") from None
    return [check_stage(recipe, k, "--stage")]


# --- a run brought to a stage ------------------------------------------------------------------

def states_after(recipe: Recipe, ks: list[int], workspace: str | Path = "workspace",
                 device: str | None = None) -> dict[int, StageCheckpoint | None]:
    """The run after each of its first k stages, for k in `ks` (0: None, a fresh model): the
    workspace's checkpoint where one was saved, else trained as `harness train` trains them
    (in one run, continuing from the latest saved stage before the first missing one)."""
    out: dict[int, StageCheckpoint | None] = {k: (find_stage(workspace, recipe, k) if k else None)
                                              for k in sorted(set(ks))}
    missing = [k for k in out if k and out[k] is None]
    if not missing:
        return out
    saved = [k for k in range(min(missing) - 1, 0, -1) if stage_path(workspace, recipe, k).is_file()]
    start = find_stage(workspace, recipe, saved[0]) if saved else None
    trained: dict[int, StageCheckpoint] = {}
    plan = StagePlan(start, max(missing), lambda c: trained.setdefault(c.stages_done, c), test=False)
    result = fine_tune(recipe.replace(device=device) if device else recipe, workspace=workspace, plan=plan)
    if not result.ok:
        which = f"stages 1-{max(missing)}" if max(missing) > 1 else "stage 1"
        raise StagesDidNotFinish(f"{which} of the recipe: {result.status} before the range test could run "
                                 f"(lower the learning rates there)")
    return {k: v if v is not None or not k else trained[k] for k, v in out.items()}
