#!/usr/bin/env python
"""Where the harness's per-step host time goes, piece by piece, in µs (thread CPU time, best of
5 repeats): the pieces of `_Loop.run_epoch` / `train_step` that a bare loop does not have, the
metric hand-over, and the batch assembly of `train_batches`.

    python bench/bench_step_costs.py [--batch-size 8] [--image-size 32]

bench_step_overhead.py measures the whole step against a bare loop; at a 15-40 ms CPU step
the few µs of each piece here are far below its noise, and cProfile's own cost per call is
larger than most of them, so they are timed here one at a time instead.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

import torch  # noqa: E402

from harness import interrupts  # noqa: E402
from harness.engine.data.augment import crop_flip  # noqa: E402
from harness.engine.data.batches import normalize, raw_images, train_batches  # noqa: E402
from harness.engine.data.splits import Split  # noqa: E402
from harness.engine.input_stats import InputStats  # noqa: E402
from harness.engine.recipe import Recipe  # noqa: E402
from harness.engine.run_types import Result  # noqa: E402
from harness.engine.step import Hyper, autocast  # noqa: E402
from harness.engine.train import _log_steps, _NoBar, epoch_hypers  # noqa: E402
from harness.tracking import Tracking  # noqa: E402

N_ITER = 150   # steps per epoch, as in bench_step_overhead's default


def per_call_us(stmt: str, number: int, **names) -> float:
    times = timeit.repeat(stmt, number=number, repeat=5, timer=time.thread_time, globals={**globals(), **names})
    return min(times) / number * 1e6


def loop_pieces(n_groups: int = 3) -> dict[str, float]:
    stage = Recipe.from_dict({"stages": [{"epochs": 2, "train": "all", "lr": {"max": 2e-3}}]}).stages[0]
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2 * n_groups)]
    opt = torch.optim.AdamW([{"params": [p], "layer_group": i % n_groups} for i, p in enumerate(params)])
    hyper, x, lrs, moms = Hyper([1e-3] * n_groups, 0.9, 0.99), torch.zeros(8, 10), [], []
    return {
        "schedule (epoch_hypers, per step)": per_call_us(
            "epoch_hypers(stage, 0.99, n, N_ITER, 0)", 50, epoch_hypers=epoch_hypers, stage=stage,
            n=n_groups) / N_ITER,
        "LR/betas into 6 param groups (the bare loop too)": per_call_us('''
lrs_, betas = hyper.lrs, (hyper.beta1, hyper.sqr_mom)
for pg in opt.param_groups:
    pg["lr"] = lrs_[pg["layer_group"]]
    pg["betas"] = betas''', 20000, opt=opt, hyper=hyper),
        "autocast (CPU)": per_call_us("with autocast(x.device):\n    pass", 20000, autocast=autocast, x=x),
        "loss.float() + detach (the bare loop: detach)": per_call_us("x.float().detach()", 20000, x=x),
        "LR/momentum history": per_call_us("lrs.append(list(hyper.lrs)); moms.append(hyper.beta1)", 20000,
                                           hyper=hyper, lrs=lrs, moms=moms),
        "interrupts.checkpoint": per_call_us("interrupts.checkpoint()", 20000, interrupts=interrupts),
        "progress bar off (_NoBar.update)": per_call_us("bar.update(1)", 20000, bar=_NoBar()),
    }


def logging_piece(n_groups: int = 3) -> float:
    """µs per step on the training thread of handing one epoch's curves to a real MlflowTracker."""
    with tempfile.TemporaryDirectory() as tmp:
        tracking = Tracking(f"sqlite:///{Path(tmp) / 'mlflow.db'}", tmp)
        tracker = tracking.tracker(tracking.start("bench-step-costs", "log"))
        result = Result(group_names=[f"group_{g}" for g in range(n_groups)])
        result.lrs, result.moms = [[1e-3] * n_groups] * (20 * N_ITER), [0.9] * (20 * N_ITER)
        losses, times = torch.rand(N_ITER), []
        for e in range(20):
            c = time.thread_time()
            _log_steps(tracker, result, e * N_ITER, losses)
            times.append(time.thread_time() - c)
        tracker.close()
    return min(times) / N_ITER * 1e6


def data_pieces(batch_size: int, size: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N_ITER * batch_size, 1, 28, 28), dtype=torch.uint8, generator=g)
    split, stats = Split(x, torch.zeros(len(x), dtype=torch.long), size), InputStats()
    idx = torch.randperm(len(x), generator=g)[:batch_size]
    raw = raw_images(split, idx)
    normed = normalize(raw, stats)
    return {
        "gather + resize 28 px -> size (raw_images)": per_call_us("raw_images(split, idx)", 300, split=split, idx=idx),
        "normalize": per_call_us("normalize(raw, stats)", 300, raw=raw, stats=stats),
        "crop_flip on the normalised float batch": per_call_us("crop_flip(normed, g)", 300, crop_flip=crop_flip,
                                                               normed=normed, g=g),
        "crop_flip on the uint8 batch before normalize (the same pixels: see same_pixels)": per_call_us(
            "crop_flip(raw, g)", 300, crop_flip=crop_flip, raw=raw, g=g),
        "train_batches, whole (per step)": per_call_us(
            "for _ in train_batches(split, bs, g, 'flip', stats): pass", 3, train_batches=train_batches,
            split=split, bs=batch_size, g=g, stats=stats) / N_ITER,
    }


def same_pixels(batch_size: int, size: int) -> bool:
    """Cropping and flipping the uint8 batch, then normalising, gives exactly the batch that
    train_batches makes (normalise, then crop and flip): both are per-pixel maps and moves."""
    x = torch.randint(0, 256, (batch_size, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    raw = raw_images(Split(x, torch.zeros(batch_size, dtype=torch.long), size), slice(None))
    a = crop_flip(normalize(raw), torch.Generator().manual_seed(2))
    return torch.equal(a, normalize(crop_flip(raw, torch.Generator().manual_seed(2))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    loop = loop_pieces()
    loop["metric hand-over (_log_steps + MlflowTracker.log_steps)"] = logging_piece()
    rows = [("loop", k, v) for k, v in loop.items()]
    rows += [("data", k, v) for k, v in data_pieces(args.batch_size, args.image_size).items()]
    print(f"per step, µs (thread CPU time, best of 5; batch {args.batch_size}, {args.image_size} px, 1 thread)")
    for kind, name, us in rows:
        print(f"  {kind}  {us:8.2f}  {name}")
    print(f"  loop total {sum(loop.values()):.1f} us per step; uint8 crop_flip then normalize gives the same "
          f"batch: {same_pixels(args.batch_size, args.image_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
