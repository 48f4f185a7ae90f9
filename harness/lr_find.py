"""fastai's LR range test (`Learner.lr_find`) for a recipe's first stage.

A fresh model, built and frozen exactly as `fine_tune` builds it for stage 0, trains for
up to `num_it` steps while the LR of every param group grows exponentially from
`start_lr` to `end_lr`. The smoothed loss per step gives the curve, and three suggestions
are read off it: valley (fastai's default), steep and minimum.

How this follows fastai 2.x, and where it had to choose:
- LR at step i (0-based) is `start_lr * (end_lr / start_lr) ** (i / num_it)` (SchedExp at
  pos = i / num_it), the same for every param group: lr_find ignores the stage's slice.
- beta1 is held constant. fastai builds a fresh Learner's optimizer with its Adam default
  `mom=0.9` and lr_find schedules only the LR, so the default here is `FASTAI_LR_FIND_MOM`
  (0.9), not the stage's one-cycle `moms[0]`; pass `mom=` to use another value. sqr_mom,
  eps and weight decay come from the recipe (`harness.train.make_optimizer`).
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

import torch
from torch import nn

from harness import data as data_mod
from harness.errors import HarnessError
from harness.models import set_trainable
from harness.recipe import Recipe
from harness.train import _autocast, _memory_format, make_optimizer, prepare

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


# --- the schedule and the smoothing (pure) ---------------------------------------------

def exp_lr(i: int, num_it: int, start_lr: float, end_lr: float) -> float:
    """fastai SchedExp at pos = i / num_it."""
    return start_lr * (end_lr / start_lr) ** (i / num_it)


def smooth_losses(raw: Sequence[float], beta: float = SMOOTH_BETA) -> list[float]:
    """Debiased exponential moving average of `raw`, one value per step."""
    out, avg = [], 0.0
    for i, loss in enumerate(raw):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


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

def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float(), y)


def _check_args(start_lr: float, end_lr: float, num_it: int) -> None:
    if not (start_lr > 0 and math.isfinite(start_lr)):
        raise HarnessError(f"lr_find: start_lr must be a positive number, got {start_lr}")
    if not (end_lr > start_lr and math.isfinite(end_lr)):
        raise HarnessError(f"lr_find: end_lr must be larger than start_lr ({start_lr:g}), got {end_lr}")
    if isinstance(num_it, bool) or not isinstance(num_it, int) or num_it < 1:
        raise HarnessError(f"lr_find: num_it must be a positive integer, got {num_it!r}")


def lr_find(recipe: Recipe, workspace: str | Path = "workspace", start_lr: float = 1e-7,
            end_lr: float = 10.0, num_it: int = 100, stop_div: bool = True,
            tracker: Any = None, device: str | None = None,
            mom: float | None = None) -> LRFindResult:
    """Run fastai's LR range test on the recipe's first stage (see the module docstring).

    `tracker` (an MlflowTracker or anything with log_steps / log_params / log_figure) gets
    the curves "lr_find/lr", "lr_find/loss" (smoothed) and "lr_find/raw_loss" per step,
    the params "suggestion.<name>", and the plot as "lr_find.png".
    """
    _check_args(start_lr, end_lr, num_it)
    beta1 = FASTAI_LR_FIND_MOM if mom is None else mom
    if not 0 <= beta1 < 1:
        raise HarnessError(f"lr_find: mom must be in [0, 1), got {beta1}")
    t_start = time.perf_counter()
    run = prepare(recipe, workspace, device)
    dev, train_split, model, gen = run.device, run.train, run.model, run.generator
    bs, n_iter = recipe.data.batch_size, run.n_iter
    stage = recipe.stages[0]
    set_trainable(model, stage.trainable_groups(model.n_groups), recipe.model.train_bn)
    opt = make_optimizer(model, stage, recipe, dev)
    sqr_mom = recipe.optimizer.sqr_mom

    sched_it = max(num_it, MIN_ITERATIONS)                   # the schedule's length (fastai)
    max_steps = min(sched_it, (num_it // n_iter + 1) * n_iter)  # fastai fits this many epochs at most
    lrs: list[float] = []
    raw: list[float] = []
    smooth: list[float] = []
    avg, best = 0.0, math.inf
    stopped_early = False

    def batches():
        while True:
            yield from data_mod.train_batches(train_split, bs, gen, recipe.data.augment, model.input_stats)

    for i, (x, y) in zip(range(max_steps), batches()):
        lr = exp_lr(i, sched_it, start_lr, end_lr)
        for pg in opt.param_groups:
            pg["lr"] = lr
            pg["betas"] = (beta1, sqr_mom)
        with _autocast(dev):
            out = model(_memory_format(x, dev))
        loss = _loss(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

        value = float(loss.detach())           # the per-step host read an LR finder needs
        avg = SMOOTH_BETA * avg + (1 - SMOOTH_BETA) * value
        smoothed = avg / (1 - SMOOTH_BETA ** (i + 1))
        lrs.append(lr)
        raw.append(value)
        smooth.append(smoothed)
        if not math.isfinite(value):
            stopped_early = i + 1 < sched_it
            break
        best = min(best, smoothed)
        if stop_div and smoothed > DIVERGENCE_FACTOR * best:
            stopped_early = i + 1 < sched_it
            break

    suggestions, points = suggest(lrs, smooth, num_it)
    result = LRFindResult(lrs=lrs, losses=smooth, raw_losses=raw, suggestions=suggestions,
                          stopped_early=stopped_early, points=points, num_it=num_it,
                          seconds=time.perf_counter() - t_start)
    if tracker is not None:
        _log(tracker, result)
    return result


def _log(tracker: Any, result: LRFindResult) -> None:
    # only the finite prefix: a metric store need not accept NaN or inf
    n = next((k for k, v in enumerate(result.losses) if not math.isfinite(v)), len(result.losses))
    tracker.log_steps(0, {"lr_find/lr": result.lrs[:n], "lr_find/loss": result.losses[:n],
                          "lr_find/raw_loss": result.raw_losses[:n]})
    params: dict[str, Any] = {f"suggestion.{k}": v for k, v in result.suggestions.items()}
    params["lr_find.stopped_early"] = result.stopped_early
    tracker.log_params(params)
    import matplotlib.pyplot as plt
    fig = lr_find_figure(result)
    try:
        tracker.log_figure(fig, "lr_find.png")
    finally:
        plt.close(fig)


# --- the picture -------------------------------------------------------------------------

def lr_find_figure(result: LRFindResult, title: str = ""):
    """Smoothed loss against LR (log x), the last 5 points left out as fastai's plot does
    (when more than 10 were recorded); each suggestion a labelled point on the curve."""
    from harness.report import plt  # sets the Agg backend

    n = len(result.lrs)
    keep = n - SKIP_END if n > 2 * SKIP_END else n
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs[:keep], result.losses[:keep], color="C0")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    colors = {"valley": "C1", "steep": "C2", "minimum": "C3"}
    for name in SUGGESTION_NAMES:
        if name not in result.points:
            continue
        x, y = result.points[name]
        value = result.suggestions[name]
        label = (f"minimum: {value:.2e} (lowest loss at {x:.2e})" if name == "minimum"
                 else f"{name}: {value:.2e}")
        ax.plot([x], [y], "o", color=colors[name], label=label, zorder=3)
    if result.points:
        ax.legend(loc="best")
    suffix = ", stopped early: the loss diverged" if result.stopped_early else ""
    ax.set_title(title or f"LR finder: {n} steps{suffix}")
    fig.tight_layout()
    return fig


def run_lr_find(recipe: Recipe, workspace: str | Path, plot_path: str | Path,
                tracking_uri: str | None = None, experiment: str = "harness-lr-find") -> LRFindResult:
    """`harness lr-find`: the range test logged as one MLflow run, with the plot saved."""
    import matplotlib.pyplot as plt

    from harness.tracking import default_tracking_uri, mlflow_run

    from harness.train import check_inputs
    check_inputs(recipe, workspace)
    uri = default_tracking_uri(workspace, tracking_uri)
    with mlflow_run(uri, experiment, "lr-find", workspace, tags={"harness.kind": "lr-find"}) as tracker:
        tracker.log_text(recipe.to_yaml(), "recipe.yaml")
        result = lr_find(recipe, workspace, tracker=tracker)
    plot_path = Path(plot_path)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    fig = lr_find_figure(result)
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)
    return result


# which hyperparameters the valley suggestion sets, per strategy (fastai's advice: the
# valley LR is the LR of the stage the test ran on)
def _centred(strategy: str, valley: float) -> dict[str, float]:
    if strategy == "two_phase":       # stage 1 trains the head at 2 * lr_high
        return {"lr_high": valley / 2, "lr_low": valley / 2 / 100}
    if strategy == "discriminative":
        return {"lr_high": valley, "lr_low": valley / 100}
    if strategy == "lp_ft":
        return {"lr_probe": valley}
    return {"lr": valley}


def centred_first_trials(study, workspace: str | Path, strategies: list[str] | None = None,
                         echo=print) -> dict[str, dict[str, Any]]:
    """Per strategy, its default first trial with the LRs moved to the LR finder's valley
    (on that strategy's own first stage), clipped into the study's ranges."""
    from harness.space import enforce_order

    out = {}
    for strategy in strategies or study.strategies:
        first = study.baseline(strategy)
        recipe = study.recipe_for(strategy, first)
        result = lr_find(recipe, workspace)
        valley = result.suggestions.get("valley")
        if valley is None:
            echo(f"[{strategy}] lr-find found no valley; the first trial keeps the defaults")
            out[strategy] = first
            continue
        space = study.spaces[strategy]
        for name, value in _centred(strategy, valley).items():
            if name in space and space[name].kind != "fixed":
                first[name] = space[name].clip(value)
        first = enforce_order(first, space)
        echo(f"[{strategy}] lr-find valley {valley:.3g}: first trial "
             + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in first.items()))
        out[strategy] = first
    return out
