"""fine_tune(recipe) -> Result: one readable loop over the recipe's stages.

Each stage is one fastai one-cycle fit: freeze to the stage's trainable groups, a fresh
AdamW (optimizer state reset), and LR / beta1 written into every param group at every
step from the pure functions in schedule.py. No host synchronisation inside the step
loop: losses and accuracies stay on the device and are read once per epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from harness.engine import data as data_mod
from harness import interrupts
from harness.errors import HarnessError
from harness.engine.models import TIMM_PREFIX, LayerGroups, build_model, param_groups, set_trainable
from harness.engine.recipe import Recipe, Stage
from harness.engine.schedule import one_cycle_lr, one_cycle_mom
from harness.engine.stages import StagePlan, capture, check_prefix, restore


class Tracker(Protocol):
    """Where a run's numbers go (MLflow, or nowhere)."""

    def log_steps(self, first_step: int, series: dict[str, list[float]]) -> None: ...
    def log_epoch(self, epoch: int, values: dict[str, float]) -> None: ...


class NullTracker:
    def log_steps(self, first_step: int, series: dict[str, list[float]]) -> None:
        pass

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        pass


@dataclass
class EpochStats:
    epoch: int                  # 1-based, one axis across all stages
    stage: int                  # 0-based
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float


@dataclass
class Result:
    """What a fine-tune produced: per-epoch stats, test accuracy, the LR history."""
    status: str                                 # "ok" or "diverged at step k"
    group_names: list[str]
    epochs: list[EpochStats] = field(default_factory=list)
    test_accuracy: float | None = None
    lrs: list[list[float]] = field(default_factory=list)     # [step][group], as the optimizer held them
    moms: list[float] = field(default_factory=list)          # [step]
    stage_starts: list[int] = field(default_factory=list)    # global step where each stage began
    n_train: int = 0
    class_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model: LayerGroups | None = field(default=None, repr=False)
    input_stats: data_mod.InputStats | None = None            # the mean/std the inputs were normalised with

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def history(self) -> dict:
        """What a stage checkpoint keeps of the run so far (a continued run picks it up)."""
        return {"epochs": [asdict(e) for e in self.epochs], "stage_starts": list(self.stage_starts),
                "lrs": torch.tensor(self.lrs, dtype=torch.float64), "moms": torch.tensor(self.moms, dtype=torch.float64)}

    def resume(self, history: dict) -> None:
        """Continue from a stage checkpoint's history (floats kept exactly: float64 tensors)."""
        self.epochs = [EpochStats(**e) for e in history["epochs"]]
        self.stage_starts = list(history["stage_starts"])
        self.lrs, self.moms = history["lrs"].tolist(), history["moms"].tolist()

    @property
    def val_accuracy(self) -> float | None:
        """Val accuracy after the last epoch (the model that is kept)."""
        return self.epochs[-1].val_accuracy if self.epochs else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError("device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def make_optimizer(model: LayerGroups, stage: Stage, recipe: Recipe, device: torch.device):
    """A fresh AdamW for one stage: fastai's Adam with decoupled weight decay."""
    opt_cfg = recipe.optimizer
    groups = param_groups(model, opt_cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=stage.peak_lrs(model.n_groups)[-1],
                             betas=(stage.moms[0], opt_cfg.sqr_mom), eps=opt_cfg.eps,
                             fused=device.type == "cuda")


@torch.inference_mode()
def evaluate(model: nn.Module, split: data_mod.Split, batch_size: int, device: torch.device):
    """(mean loss, accuracy) on a split, read from the device once; (None, None) if empty.
    Inputs are normalised with the model's own `input_stats`."""
    n = len(split.y)
    if n == 0:
        return None, None
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in data_mod.eval_batches(split, batch_size, getattr(model, "input_stats", None)):
        with _autocast(device):
            out = model(_memory_format(x, device))
        loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    model.train()
    return loss_sum.item() / n, correct.item() / n


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _memory_format(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


@dataclass
class Prepared:
    """Everything a loop over training batches needs, built the same way for every user."""
    device: torch.device
    dataset: data_mod.Dataset
    train: data_mod.Split            # on the device
    n_iter: int                      # optimizer steps per epoch
    model: LayerGroups               # on the device, in train mode
    generator: torch.Generator       # seeded, on the device: shuffling and augmentation


def prepare(recipe: Recipe, workspace: str | Path = "workspace", device: str | None = None) -> Prepared:
    """Seed, pick the device, load the data and build the model as the recipe says."""
    dev = resolve_device(device or recipe.device)
    torch.manual_seed(recipe.seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ds = data_mod.load_dataset(recipe.data, Path(workspace), recipe.seed)
    train_split = data_mod.to_device(ds.train, dev)
    bs = recipe.data.batch_size
    n_iter = data_mod.steps_per_epoch(len(train_split.y), bs)
    if n_iter == 0:
        raise HarnessError(f"data.batch_size: {bs} is larger than the training set "
                           f"({len(train_split.y)} images)")
    model = _build(recipe, len(ds.class_names))
    model = model.to(dev, memory_format=torch.channels_last if dev.type == "cuda" else torch.contiguous_format)
    model.train()
    gen = torch.Generator(device=dev).manual_seed(recipe.seed)
    return Prepared(dev, ds, train_split, n_iter, model, gen)


def check_inputs(recipe: Recipe, workspace: str | Path = "workspace") -> None:
    """Fail before anything is recorded: the device exists, the data loads (and is then
    cached in memory for the run), the weights are there and fit the arch."""
    resolve_device(recipe.device)
    ds = data_mod.load_dataset(recipe.data, Path(workspace), recipe.seed)
    if len(ds.class_names) < 2:   # an image folder with a single class folder
        where = f"data.root: {recipe.data.root}" if recipe.data.dataset == "imagefolder" else "data.classes:"
        raise HarnessError(f"{where} has only one class ({ds.class_names[0]}); a classifier needs at least 2")
    n_train, bs = len(ds.train.y), recipe.data.batch_size
    if data_mod.steps_per_epoch(n_train, bs) == 0:   # as prepare() would find, after a run was opened
        raise HarnessError(f"data.batch_size: {bs} is larger than the training set ({n_train} images)")
    if recipe.model.weights != "none" or recipe.model.arch.startswith(TIMM_PREFIX):
        _build(recipe, len(ds.class_names))   # weights found and fitting; a timm model's groups and input size


def _build(recipe: Recipe, n_classes: int, weights: str | None = None) -> LayerGroups:
    m = recipe.model
    return build_model(m.arch, n_classes, weights or m.weights, m.head, m.groups, recipe.data.image_size)


def layer_groups(recipe: Recipe, workspace: str | Path = "workspace") -> LayerGroups:
    """The recipe's model as it would be cut into layer groups (random init: the structure
    alone), with a head for the recipe's classes."""
    ds = data_mod.load_dataset(recipe.data, Path(workspace), recipe.seed)
    return _build(recipe, len(ds.class_names), weights="none")


def fine_tune(recipe: Recipe, tracker: Tracker | None = None,
              report: Callable[[int, float | None], None] | None = None,
              workspace: str | Path = "workspace", progress: bool = False,
              device: str | None = None, evaluate_test: bool = True, *,
              plan: StagePlan | None = None) -> Result:
    """Run the recipe's stages; log to `tracker`; call `report(epoch, val_accuracy)` after
    every epoch (a pruner may raise from it). Returns the Result with the trained model.
    Sweeps pass `evaluate_test=False`: the test split is never looked at while tuning.
    `plan` continues from a stage checkpoint, stops after a stage, or keeps every stage's
    checkpoint (harness/stages.py); a stopped run looks at no test split."""
    tracker, plan = tracker or NullTracker(), plan or StagePlan()
    run = prepare(recipe, workspace, device)
    dev, ds, train_split, model, gen = run.device, run.dataset, run.train, run.model, run.generator
    n_iter = run.n_iter
    val_split = data_mod.to_device(ds.val, dev)
    bs = recipe.data.batch_size
    n_groups, input_stats = model.n_groups, model.input_stats
    result = Result(status="ok", group_names=model.group_names, n_train=len(train_split.y),
                    class_names=list(ds.class_names), model=model, input_stats=input_stats)
    first, stop, step, epoch = _stage_range(recipe, plan, run, result)
    bar = _progress_bar(n_iter * sum(s.epochs for s in recipe.stages[first:stop]), progress)
    start = time.perf_counter()

    try:
        for stage_idx in range(first, stop):
            stage = recipe.stages[stage_idx]
            set_trainable(model, stage.trainable_groups(n_groups), recipe.model.train_bn)
            opt = make_optimizer(model, stage, recipe, dev)
            heads = [next(pg for pg in opt.param_groups if pg["layer_group"] == g) for g in range(n_groups)]
            peaks = stage.peak_lrs(n_groups)
            T = stage.epochs * n_iter
            result.stage_starts.append(step)
            for _ in range(stage.epochs):
                t0, first_step, losses = time.perf_counter(), step, []
                for i, (x, y) in enumerate(data_mod.train_batches(train_split, bs, gen, recipe.data.augment,
                                                                          input_stats)):
                    interrupts.checkpoint()
                    s = step - result.stage_starts[-1]
                    mom = one_cycle_mom(s, T, stage.pct_start, stage.moms)
                    for pg in opt.param_groups:
                        pg["lr"] = one_cycle_lr(s, T, peaks[pg["layer_group"]], stage.div, stage.div_final,
                                                stage.pct_start)
                        pg["betas"] = (mom, recipe.optimizer.sqr_mom)
                    result.lrs.append([pg["lr"] for pg in heads])
                    result.moms.append(heads[0]["betas"][0])
                    with _autocast(dev):
                        loss = nn.functional.cross_entropy(model(_memory_format(x, dev)).float(), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.detach())
                    step += 1
                    bar.update(1)
                epoch += 1
                step_losses = torch.stack(losses).float().cpu()   # the one read per epoch
                _log_steps(tracker, result, first_step, step_losses)
                bad = (~torch.isfinite(step_losses)).nonzero()
                if len(bad):
                    result.status = f"diverged at step {first_step + int(bad[0])}"
                    break
                val_loss, val_acc = evaluate(model, val_split, 2 * bs, dev)
                if val_loss is not None and not math.isfinite(val_loss):
                    # the weights blew up even if the last training losses were still finite
                    result.status = f"diverged at step {step - 1} (validation loss is {val_loss})"
                    break
                stats = EpochStats(epoch, stage_idx, float(step_losses.mean()), val_loss, val_acc,
                                   time.perf_counter() - t0)
                result.epochs.append(stats)
                tracker.log_epoch(epoch, {k: v for k, v in (("train/loss_epoch", stats.train_loss),
                                                             ("val/loss", val_loss),
                                                             ("val/accuracy", val_acc)) if v is not None})
                bar.set_postfix_str(f"epoch {epoch} val_acc {val_acc if val_acc is None else round(val_acc, 4)}")
                if report is not None:
                    report(epoch, val_acc)
            if not result.ok:
                break
            if plan.on_stage is not None:
                plan.on_stage(capture(recipe, stage_idx + 1, run, (step, epoch), result.history()))
        if result.ok and evaluate_test and stop == len(recipe.stages):
            _, result.test_accuracy = evaluate(model, data_mod.to_device(ds.test, dev), 2 * bs, dev)
            if result.test_accuracy is not None:
                tracker.log_epoch(epoch, {"test/accuracy": result.test_accuracy})
    except Exception as e:
        if not _out_of_memory(e):
            raise
        # a property of the trial (its batch size, its model), not of the machine: a failed
        # result, and a sweep goes on with the next trial
        result.status = f"out of memory at batch size {bs}"
    finally:
        bar.close()
    if result.status.startswith("out of memory"):
        _release_memory(dev)   # here, where the failed step's frames are gone
    result.seconds = time.perf_counter() - start
    return result


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


def _log_steps(tracker: Tracker, result: Result, first_step: int, losses: torch.Tensor) -> None:
    n = len(losses)
    lrs, moms = result.lrs[first_step:first_step + n], result.moms[first_step:first_step + n]
    series = {"train/loss": losses.tolist()}
    for g, name in enumerate(result.group_names):
        series[f"lr/{name}"] = [row[g] for row in lrs]
        series[f"momentum/{name}"] = moms
    tracker.log_steps(first_step, series)


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
