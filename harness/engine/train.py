"""fine_tune(recipe) -> Result: one readable loop over the recipe's stages.

Each stage is one fastai one-cycle fit: freeze to the stage's trainable groups, a fresh
AdamW (optimizer state reset), and LR / beta1 written into every param group at every
step from the pure functions in schedule.py. No host synchronisation inside the step
loop: losses and accuracies stay on the device and are read once per epoch.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from harness.engine import data as data_mod
from harness.engine import l2sp, layer_decay
from harness.engine import probe as probe_mod
from harness import interrupts
from harness.errors import HarnessError
from harness.engine.archs import TIMM_PREFIX
from harness.engine.ema import WeightEma
from harness.engine.groups import LayerGroups, param_groups, set_trainable
from harness.engine.models import build_model
from harness.engine.recipe import Recipe, Stage
from harness.engine.run_types import EpochStats, Outcome, Prepared, Result
from harness.engine.schedule import one_cycle_table
from harness.engine.stages import StagePlan, capture, check_prefix, restore
from harness.engine.step import Hyper, Score, score, train_step


class Tracker(Protocol):
    """Where a run's numbers go (MLflow, or nowhere)."""

    def log_steps(self, first_step: int, series: dict[str, list[float]]) -> None: ...
    def log_epoch(self, epoch: int, values: dict[str, float]) -> None: ...


class NullTracker:
    def log_steps(self, first_step: int, series: dict[str, list[float]]) -> None:
        pass

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError("device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def make_optimizer(model: LayerGroups, stage: Stage, recipe: Recipe, device: torch.device,
                   start: dict[str, torch.Tensor] | None = None):
    """A fresh AdamW for one stage: fastai's Adam with decoupled weight decay; each parameter
    at its block's share of the LR under `stage.layer_decay`, and under `stage.l2sp` the body
    pulled toward `start` (theta_0; the weights as they are now when not given)."""
    opt_cfg = recipe.optimizer
    scales = None if stage.layer_decay is None else layer_decay.lr_scales(model, stage.layer_decay)
    groups = param_groups(model, opt_cfg.weight_decay, scales)
    optimizer = torch.optim.AdamW
    if stage.l2sp is not None:
        groups = l2sp.l2sp_groups(groups, model, stage.l2sp, start or l2sp.start_weights(model))
        optimizer = l2sp.AdamWSP
    return optimizer(groups, lr=stage.peak_lrs(model.n_groups)[-1], betas=(stage.moms[0], opt_cfg.sqr_mom),
                     eps=opt_cfg.eps, fused=device.type == "cuda")


def start_weights(recipe: Recipe, model: LayerGroups) -> dict[str, torch.Tensor] | None:
    """theta_0 of an L2-SP stage (the model as built, before any stage); None without one."""
    return l2sp.start_weights(model) if any(s.l2sp is not None for s in recipe.stages) else None


def lr_spread(opt: torch.optim.Optimizer, n_groups: int) -> list[tuple[float, float]]:
    """Per layer group, the (lowest, highest) `lr_scale` of its param groups: (1, 1) but
    under layer-wise LR decay."""
    spread = [(1.0, 1.0)] * n_groups
    for g in range(n_groups):
        scales = [pg["lr_scale"] for pg in opt.param_groups if pg["layer_group"] == g]
        if scales:
            spread[g] = (min(scales), max(scales))
    return spread


def evaluate(model: nn.Module, split: data_mod.Split, batch_size: int, device: torch.device):
    """(mean loss, accuracy) on a split, read from the device once; (None, None) if empty.
    Inputs are normalised with the model's own `input_stats`; the model keeps its mode."""
    s = evaluate_split(model, split, batch_size, device)
    return (None, None) if s is None else (s.loss, s.accuracy)


def evaluate_split(model: nn.Module, split: data_mod.Split, batch_size: int, device: torch.device) -> Score | None:
    """evaluate's Score, with the confusion matrix; None if the split is empty."""
    return score(model, data_mod.eval_batches(split, batch_size, getattr(model, "input_stats", None)), device)


def prepare(recipe: Recipe, workspace: str | Path = "workspace", device: str | None = None,
            memory: data_mod.MemoryPlan | None = None) -> Prepared:
    """Seed, pick the device, plan where the images live, load the data and build the model
    as the recipe says."""
    dev = resolve_device(device or recipe.device)
    torch.manual_seed(recipe.seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory = memory or data_mod.plan_for(recipe.data, Path(workspace), dev)
    ds = data_mod.load_dataset(recipe.data, Path(workspace), recipe.seed, memory.residency)
    train_split = data_mod.to_device(ds.train, dev)
    n_iter = _steps_per_epoch(len(train_split.y), recipe.data.batch_size)
    model = _build(recipe, len(ds.class_names))
    model = model.to(dev, memory_format=torch.channels_last if dev.type == "cuda" else torch.contiguous_format)
    model.train()
    gen = torch.Generator(device=dev).manual_seed(recipe.seed)
    return Prepared(dev, ds, train_split, n_iter, model, gen, Path(workspace))


def check_inputs(recipe: Recipe, workspace: str | Path = "workspace") -> None:
    """Fail before anything is recorded: the device exists, the data loads (and is then
    cached in memory for the run), the weights are there and fit the arch."""
    dev = resolve_device(recipe.device)
    probe_mod.cache_mode()   # a bad HARNESS_FEATURE_CACHE fails here, not mid-run
    memory = data_mod.plan_for(recipe.data, Path(workspace), dev)   # refused before anything is decoded
    ds = data_mod.load_dataset(recipe.data, Path(workspace), recipe.seed, memory.residency)
    if len(ds.class_names) < 2:   # an image folder with a single class folder
        where = f"data.root: {recipe.data.root}" if recipe.data.dataset == "imagefolder" else "data.classes:"
        raise HarnessError(f"{where} has only one class ({ds.class_names[0]}); a classifier needs at least 2")
    _steps_per_epoch(len(ds.train.y), recipe.data.batch_size)   # as prepare() will, before a run is opened
    if recipe.model.weights != "none" or recipe.model.arch.startswith(TIMM_PREFIX):
        _build(recipe, len(ds.class_names))   # weights found and fitting; a timm model's groups and input size


def _steps_per_epoch(n_train: int, batch_size: int) -> int:
    n_iter = data_mod.steps_per_epoch(n_train, batch_size)
    if n_iter == 0:
        raise HarnessError(f"data.batch_size: {batch_size} is larger than the training set ({n_train} images)")
    return n_iter


def _build(recipe: Recipe, n_classes: int, weights: str | None = None) -> LayerGroups:
    m = recipe.model
    return build_model(m.arch, n_classes, weights or m.weights, m.head, m.groups, recipe.data.image_size)


def layer_groups(recipe: Recipe, workspace: str | Path = "workspace") -> LayerGroups:
    """The recipe's model as it would be cut into layer groups (random init: the structure
    alone), with a head for the recipe's classes."""
    ds = data_mod.load_dataset(recipe.data, Path(workspace), recipe.seed)
    return _build(recipe, len(ds.class_names), weights="none")


def fine_tune(recipe: Recipe, tracker: Tracker | None = None, workspace: str | Path = "workspace", *,
              report: Callable[[int, float | None], None] | None = None, progress: bool = False,
              plan: StagePlan | None = None, memory: data_mod.MemoryPlan | None = None,
              metric: str = "val/accuracy") -> Result:
    """Run the recipe's stages; log to `tracker`; call `report(epoch, value)` after every
    epoch with the value of `metric` (a study's: "val/accuracy", "val/macro_f1", ...; a
    pruner may raise from it). Returns the Result with the trained model.
    `plan` continues from a stage checkpoint, stops after a stage, keeps every stage's
    checkpoint (harness/engine/stages.py), or leaves the test split alone (`test=False`:
    sweeps never look at it while tuning); a stopped run looks at no test split. `memory`:
    where the images live (data/plan.py), planned here when not given."""
    plan = plan or StagePlan()
    run = prepare(recipe, workspace, memory=memory)
    result = Result(group_names=run.model.group_names, n_train=len(run.train.y),
                    class_names=list(run.dataset.class_names), model=run.model, input_stats=run.model.input_stats)
    theta_0 = start_weights(recipe, run.model)   # before a checkpoint is restored: the model as built
    first, stop, step, epoch = _stage_range(recipe, plan, run, result)
    loop = _Loop(recipe, run, result, tracker or NullTracker(), report, (step, epoch), theta_0, metric,
                 _ema(recipe, run, plan))
    loop.bar = _progress_bar(run.n_iter * sum(s.epochs for s in recipe.stages[first:stop]), progress)
    start = time.perf_counter()
    try:
        for k in range(first, stop):
            if not loop.run_stage(k):
                break
            if plan.on_stage is not None:
                plan.on_stage(capture(recipe, k + 1, run, (loop.step, loop.epoch), result.history(),
                                      None if loop.ema is None else loop.ema.state_dict()))
        if loop.ema is not None and result.ok and stop == len(recipe.stages):
            run.model.load_state_dict(loop.ema.module.state_dict())   # the run's model is the average
        if result.ok and plan.test and stop == len(recipe.stages):
            loop.test()
    except Exception as e:
        if not _out_of_memory(e):
            raise
        # a property of the trial (its batch size, its model), not of the machine: a failed
        # result, and a sweep goes on with the next trial
        result.outcome = Outcome("out_of_memory", batch_size=recipe.data.batch_size)
    finally:
        loop.bar.close()
    if result.outcome.kind == "out_of_memory":
        _release_memory(run.device)   # here, where the failed step's frames are gone
    result.seconds = time.perf_counter() - start
    return result


def _ema(recipe: Recipe, run: Prepared, plan: StagePlan) -> WeightEma | None:
    """The recipe's weight EMA (None without `optimizer.ema`), continued from the plan's checkpoint."""
    cfg = recipe.optimizer.ema
    if cfg is None:
        return None
    start = plan.start
    return WeightEma(run.model, cfg.decay, cfg.warmup, 0 if start is None else start.step,
                     None if start is None else start.ema)


class _Loop:
    """fine_tune's state across its stages: the step and epoch counters, where the numbers go.
    No host synchronisation inside an epoch: its losses are read once, at its end. A stage
    that trains the head alone on a truly frozen body without augmentation trains it on the
    body's cached features (`probe`, harness/engine/probe.py): the same steps and numbers.
    With a weight EMA (`ema`), every step updates it and every score is the EMA's."""

    def __init__(self, recipe: Recipe, run: Prepared, result: Result, tracker: Tracker,
                 report: Callable[[int, float | None], None] | None, counters: tuple[int, int],
                 start: dict[str, torch.Tensor] | None = None, metric: str = "val/accuracy",
                 ema: WeightEma | None = None):
        self.recipe, self.run, self.result, self.tracker, self.report = recipe, run, result, tracker, report
        self.metric = metric
        self.step, self.epoch = counters
        self.start = start                          # theta_0 of L2-SP stages
        self.spread: list[tuple[float, float]] = []  # the stage's lr_scale range per layer group
        self.ema = ema
        self.val = data_mod.to_device(run.dataset.val, run.device)
        self.bar = _NoBar()
        self.probe: probe_mod.Probe | None = None   # the current stage's, when it qualifies
        self.digests: dict[str, str] = {}           # split name -> content digest, for the probe

    def run_stage(self, k: int) -> bool:
        """Stage k (0-based): one one-cycle fit from a fresh optimizer; False when it diverged."""
        stage, model = self.recipe.stages[k], self.run.model
        set_trainable(model, stage.trained_groups(model.n_groups), self.recipe.model.train_bn)
        self.probe = self.stage_probe(stage)
        opt = make_optimizer(model, stage, self.recipe, self.run.device, self.start)
        self.spread = lr_spread(opt, model.n_groups)
        self.result.stage_starts.append(self.step)
        return all(self.run_epoch(k, opt) for _ in range(stage.epochs))

    def run_epoch(self, k: int, opt: torch.optim.Optimizer) -> bool:
        recipe, run, result = self.recipe, self.run, self.result
        step_fn = probe_mod.head_step if self.probe else train_step
        if self.ema is not None:
            step_fn = self.ema.after(step_fn)
        # the epoch's schedule made before its steps: the step loop only reads it
        hypers = epoch_hypers(recipe.stages[k], recipe.optimizer.sqr_mom, run.model.n_groups, run.n_iter,
                              self.step - result.stage_starts[-1])
        tops = None if all(hi == 1.0 for _, hi in self.spread) else [hi for _, hi in self.spread]
        t0, first_step, losses = time.perf_counter(), self.step, []
        for (x, y), hyper in zip(self.train_batches(), hypers):
            interrupts.checkpoint()
            # a group's LR as its fastest param group holds it (its top block under layer decay)
            result.lrs.append(list(hyper.lrs) if tops is None else [lr * hi for lr, hi in zip(hyper.lrs, tops)])
            result.moms.append(hyper.beta1)
            losses.append(step_fn(run.model, opt, x, y, hyper))
            self.step += 1
            self.bar.update(1)
        self.epoch += 1
        step_losses = torch.stack(losses).float().cpu()   # the one read per epoch
        _log_steps(self.tracker, result, first_step, step_losses, self.lowest_lrs(hypers[:len(losses)]))
        bad = (~torch.isfinite(step_losses)).nonzero()
        if len(bad):
            result.outcome = Outcome("diverged", step=first_step + int(bad[0]))
            return False
        val = self.evaluate("val", self.val)
        if val is not None and not math.isfinite(val.loss):
            # the weights blew up even if the last training losses were still finite
            result.outcome = Outcome("diverged", step=self.step - 1, detail=f"validation loss is {val.loss}")
            return False
        val_loss, val_acc, m = (val.loss, val.accuracy, val.metrics()) if val is not None else (None, None, {})
        stats = EpochStats(self.epoch, k, float(step_losses.mean()), val_loss, val_acc, time.perf_counter() - t0,
                           m.get("balanced_accuracy"), m.get("macro_f1"))
        result.epochs.append(stats)
        self.tracker.log_epoch(self.epoch, {"train/loss_epoch": stats.train_loss,
                                            **({"val/loss": val_loss} if val is not None else {}),
                                            **{f"val/{name}": v for name, v in m.items()}})
        self.bar.set_postfix_str(f"epoch {self.epoch} val_acc {val_acc if val_acc is None else round(val_acc, 4)}")
        if self.report is not None:
            self.report(self.epoch, stats.value(self.metric))
        return True

    def lowest_lrs(self, hypers: list[Hyper]) -> dict[str, list[float]]:
        """`lr/<group>/min` per step: each layer group's slowest block, for the groups whose
        blocks train at several LRs (layer decay); readable beside `lr/<group>` (the fastest)."""
        return {f"lr/{name}/min": [h.lrs[g] * lo for h in hypers]
                for g, (name, (lo, hi)) in enumerate(zip(self.result.group_names, self.spread)) if lo != hi}

    def stage_probe(self, stage: Stage) -> probe_mod.Probe | None:
        """The stage's feature cache when it qualifies and its features fit the cache."""
        run = self.run
        if not probe_mod.qualifies(self.recipe, stage, run.model.n_groups):
            return None
        probe = probe_mod.Probe(run.model, run.device, run.workspace, self.digests)
        n_images = len(run.train.y) + len(self.val.y) + len(run.dataset.test.y)
        return probe if probe.fits(run.train, n_images) else None

    def train_batches(self):
        """One epoch of (inputs, labels): images, or the cached features of a probe stage."""
        run, bs = self.run, self.recipe.data.batch_size
        if self.probe is not None:
            return self.probe.train_batches(run.train, run.generator, bs)
        return data_mod.train_batches(run.train, bs, run.generator, self.recipe.data.augment, run.model.input_stats)

    def evaluate(self, name: str, split: data_mod.Split) -> Score | None:
        bs, run = 2 * self.recipe.data.batch_size, self.run
        model = run.model if self.ema is None else self.ema.module
        if self.probe is not None:   # the last stage run was a probe: the features of the scored body
            probe = self.probe if self.ema is None else probe_mod.Probe(model, run.device, run.workspace, self.digests)
            return probe.score(name, split, bs)
        return evaluate_split(model, split, bs, run.device)

    def test(self) -> None:
        s = self.evaluate("test", data_mod.to_device(self.run.dataset.test, self.run.device))
        self.result.test_score = s
        self.result.test_accuracy = None if s is None else s.accuracy
        if s is not None:
            self.tracker.log_epoch(self.epoch, {f"test/{name}": v for name, v in s.metrics().items()})


def epoch_hypers(stage: Stage, sqr_mom: float, n_groups: int, n_iter: int, first: int) -> list[Hyper]:
    """The Hyper of each step of one epoch of `stage` (stage steps first .. first + n_iter - 1):
    the one-cycle LR per group and beta1 of schedule.py, computed in one go."""
    steps = range(first, first + n_iter)
    lrs, moms = one_cycle_table(steps, stage.epochs * n_iter, stage.peak_lrs(n_groups), stage.div,
                                stage.div_final, stage.pct_start, stage.moms)
    return [Hyper(group_lrs, mom, sqr_mom) for group_lrs, mom in zip(lrs, moms)]


def _stage_range(recipe: Recipe, plan: StagePlan, run: Prepared, result: Result) -> tuple[int, int, int, int]:
    """(first stage, end stage, global step, epoch): the whole recipe, or from the plan's
    checkpoint (restored into `run` and `result`) up to its stop."""
    ckpt, n = plan.start, len(recipe.stages)
    stop = n if plan.stop is None else plan.stop
    done = 0 if ckpt is None else ckpt.stages_done
    if not done <= stop <= n:
        raise HarnessError(f"stages: cannot run from stage {done + 1} up to stage {stop} of a {n}-stage recipe")
    if ckpt is None:
        return 0, stop, 0, 0
    check_prefix(ckpt, recipe)
    restore(ckpt, run)
    result.resume(ckpt.history)
    return ckpt.stages_done, stop, ckpt.step, ckpt.epoch


def _out_of_memory(e: Exception) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _release_memory(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _log_steps(tracker: Tracker, result: Result, first_step: int, losses: torch.Tensor,
               extra: dict[str, list[float]] | None = None) -> None:
    n = len(losses)
    lrs, moms = result.lrs[first_step:first_step + n], result.moms[first_step:first_step + n]
    series = {"train/loss": losses.tolist()}
    for g, name in enumerate(result.group_names):
        series[f"lr/{name}"] = [row[g] for row in lrs]
        series[f"momentum/{name}"] = moms
    tracker.log_steps(first_step, {**series, **(extra or {})})


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    import sys
    # in logs (no terminal) a redraw every 30 s is progress enough
    return tqdm(total=total, unit="step", dynamic_ncols=True, leave=False,
                mininterval=0.2 if sys.stderr.isatty() else 30)
