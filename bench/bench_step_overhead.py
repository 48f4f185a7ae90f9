#!/usr/bin/env python
"""The harness's fixed cost per training step: a harness trial against a bare PyTorch loop
over the same batches, with identical per-step losses (parity 0), timed side by side.

    python bench/bench_step_overhead.py [--quick] [--repeats 4] [--batch-size 8]
        [--per-class 120] [--epochs 2] [--threads 1] [--profile] [--json OUT]

harness  `fine_tune(recipe, tracker)` with the real MlflowTracker (`harness train`'s and the
         sweeps'), logging into a SQLite store in a temp dir: timm/test_resnet, Fashion-MNIST
         at 32 px, augment flip, weights none, one one-cycle stage.
bare     `prepare(recipe)` (the same seed, data, model init and generator), the same epochs'
         batches drawn beforehand from `train_batches` with that generator (same images, order
         and augmentation draws), then only what any loop must do: the one-cycle LR / beta1
         table built once, per step the values written into the param groups, forward,
         cross-entropy, backward, AdamW step (`make_optimizer`'s), zero_grad.
bare+data the bare loop drawing its batches from `train_batches` inside its clock, as the
         harness does: (bare+data - bare) is the batch assembly, (harness - bare+data) the
         harness loop's own cost (schedule, LR writes, history, logging, progress bar).
per step the training phase only. Harness: from the end of `prepare` (wrapped by the bench)
         or of the previous epoch's `report` call to the return of the epoch's `log_steps`:
         the steps, the batch assembly, the per-epoch loss read and the metric batch handed
         to the logging thread; each epoch's evaluation of the (tiny) val split is left out.
         Bare: from the optimizer's creation to its last step. Setup (data load, model build,
         the MLflow run) is outside both.
trial    the whole `fine_tune` call + `tracker.flush()` against the bare side's `prepare`, batch
         drawing and loop: a trial's extra cost (evaluation, logging) on top of the steps.
Details and results: bench/README.md, bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

import torch  # noqa: E402
from torch import nn  # noqa: E402

import harness.engine.train as train_mod  # noqa: E402

from harness.engine import data as data_mod  # noqa: E402
from harness.engine.groups import set_trainable  # noqa: E402
from harness.engine.recipe import Recipe  # noqa: E402
from harness.engine.schedule import one_cycle_lr, one_cycle_mom  # noqa: E402
from harness.engine.stages import StagePlan  # noqa: E402
from harness.engine.train import fine_tune, make_optimizer, prepare  # noqa: E402
from harness.tracking import MlflowTracker, Tracking  # noqa: E402

TARGET = 0.97
EXPERIMENT = "bench-step-overhead"
SIDES = ["bare", "bare+data", "harness"]
PROFILED = ("harness", "tracking", "tqdm", "mlflow", "autocast_mode", "optimizer.py")


def make_recipe(args) -> Recipe:
    return Recipe.from_dict({
        "seed": 0, "device": "cpu",
        "data": {"dataset": "fashion-mnist", "root": args.root, "train_per_class": args.per_class,
                 "val_fraction": 0.02, "test_per_class": 1, "image_size": 32,
                 "batch_size": args.batch_size, "augment": "flip"},
        "model": {"arch": "timm/test_resnet", "weights": "none", "head": "fastai", "train_bn": True},
        "stages": [{"epochs": args.epochs, "train": "all", "lr": {"max": 2e-3}}],
    })


def clocks() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread): with one torch thread the whole step runs on
    this thread, so its CPU time is the work done, whatever other processes take of the cores."""
    return time.perf_counter(), time.thread_time()


class TimedTracker(MlflowTracker):
    """The real tracker, noting when each epoch's steps were handed over (and their losses)."""

    def __init__(self, client, run_id: str):
        super().__init__(client, run_id)
        self.steps_logged: list[tuple[float, float]] = []
        self.losses: list[float] = []

    def log_steps(self, first_step: int, series: dict[str, list[float]]) -> None:
        super().log_steps(first_step, series)
        self.steps_logged.append(clocks())
        self.losses += series["train/loss"]


def harness_run(recipe: Recipe, workspace: Path, tracking: Tracking, name: str) -> dict:
    """One harness trial: {'steps'/'cpu': training-phase seconds, 'trial': whole call + flush, ...}.
    An epoch's training phase runs from the end of `prepare` (the first) or of the previous
    epoch's `report` to the return of its `log_steps`."""
    tracker = TimedTracker(tracking.client, tracking.start(EXPERIMENT, name))
    starts: list[tuple[float, float]] = []

    def timed_prepare(*a, **kw):
        run = prepare(*a, **kw)
        starts.append(clocks())
        return run
    t0 = time.perf_counter()
    train_mod.prepare = timed_prepare
    try:
        result = fine_tune(recipe, tracker, workspace, plan=StagePlan(test=False),
                           report=lambda epoch, acc: starts.append(clocks()))
    finally:
        train_mod.prepare = prepare
    t_return = time.perf_counter()
    tracker.flush()
    trial = time.perf_counter() - t0
    tracker.close()
    tracking.finish(tracker.run_id)
    if not result.ok:
        raise SystemExit(f"harness run failed: {result.status}")
    phases = list(zip(starts, tracker.steps_logged))
    return {"steps": sum(e[0] - s[0] for s, e in phases), "cpu": sum(e[1] - s[1] for s, e in phases),
            "trial": trial, "flush": trial - (t_return - t0), "losses": tracker.losses,
            "n_steps": len(result.lrs), "run_id": tracker.run_id, "groups": result.group_names}


def bare_run(recipe: Recipe, workspace: Path, inline_data: bool = False) -> dict:
    """The bare loop over the harness's batches: drawn first, outside its clock, or with
    `inline_data` drawn from `train_batches` inside it, as the harness does (the difference
    between the two is the cost of the harness's batch assembly)."""
    t0 = time.perf_counter()
    run = prepare(recipe, workspace)
    stage, model, bs = recipe.stages[0], run.model, recipe.data.batch_size

    def draw():
        return data_mod.train_batches(run.train, bs, run.generator, recipe.data.augment, model.input_stats)
    epochs = [draw if inline_data else list(draw()) for _ in range(stage.epochs)]
    set_trainable(model, model.n_groups, recipe.model.train_bn)   # train: all (a no-op on a fresh model)
    sqr_mom, losses = recipe.optimizer.sqr_mom, []
    t_loop, c_loop = clocks()
    opt = make_optimizer(model, stage, recipe, run.device)
    total, peaks = stage.epochs * run.n_iter, stage.peak_lrs(model.n_groups)
    lrs = [[one_cycle_lr(s, total, p, stage.div, stage.div_final, stage.pct_start) for p in peaks]
           for s in range(total)]
    betas = [(one_cycle_mom(s, total, stage.pct_start, stage.moms), sqr_mom) for s in range(total)]
    groups = [(pg, pg["layer_group"]) for pg in opt.param_groups]
    s = 0
    for batches in epochs:
        for x, y in (batches() if inline_data else batches):
            for pg, g in groups:
                pg["lr"], pg["betas"] = lrs[s][g], betas[s]
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            s += 1
    end, c_end = clocks()
    return {"steps": end - t_loop, "cpu": c_end - c_loop, "trial": end - t0,
            "losses": torch.stack(losses).tolist(), "n_steps": s}


def check_logged(tracking: Tracking, h: dict) -> None:
    """Every step's loss, LR and momentum is in the store, at its step, with its value."""
    client, n = tracking.client, h["n_steps"]
    for key in ["train/loss"] + [f"{kind}/{g}" for g in h["groups"] for kind in ("lr", "momentum")]:
        hist = sorted(client.get_metric_history(h["run_id"], key), key=lambda m: m.step)
        if [m.step for m in hist] != list(range(n)):
            raise SystemExit(f"MLflow: {key} has {len(hist)} steps logged, expected {n}")
        if key == "train/loss" and [m.value for m in hist] != h["losses"]:
            raise SystemExit("MLflow: logged train/loss differs from the losses fine_tune handed over")


def profile_harness(recipe: Recipe, workspace: Path, tracking: Tracking, n_steps: int, top: int) -> str:
    """cProfile of one harness trial: the harness-side functions by own time, µs per step."""
    # CPU time of this thread, not wall time: on a shared machine the time the process waits
    # for a core would otherwise land on whichever function was running
    prof, run_stage = cProfile.Profile(time.thread_time), train_mod._Loop.run_stage

    def profiled(loop, k):   # the stage alone: not prepare (data, model build) nor the test split
        prof.enable()
        try:
            return run_stage(loop, k)
        finally:
            prof.disable()
    train_mod._Loop.run_stage = profiled
    try:
        harness_run(recipe, workspace, tracking, "profile")
    finally:
        train_mod._Loop.run_stage = run_stage
    stats = pstats.Stats(prof)
    rows = [(tt, nc, f"{Path(file).parent.name}/{Path(file).name}:{line}({fn})" if file != "~" else fn)
            for (file, line, fn), (_, nc, tt, _, _) in stats.stats.items()
            if any(p in file for p in PROFILED) or fn == "<method 'append' of 'list' objects>"]
    rows.sort(reverse=True)
    out = io.StringIO()
    out.write(f"profile (cProfile, thread CPU time, one harness stage, {n_steps} steps): "
              "own time of the harness-side functions (profiler overhead included)\n")
    out.write(f"  {'us/step':>8}  {'calls':>7}  function\n")
    for tt, nc, where in rows[:top]:
        out.write(f"  {tt / n_steps * 1e6:8.1f}  {nc:7d}  {where}\n")
    return out.getvalue()


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 10 steps, batch 4, one round, no warm-up")
    p.add_argument("--repeats", type=int, default=4, help="measured rounds, after one warm-up round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--per-class", type=int, default=120, help="train images per class (10 classes)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, both sides")
    p.add_argument("--root", default=str(data_mod.SYSTEM_FASHION_DIR))
    p.add_argument("--workspace", help="the decoded dataset's cache (default: a temp dir)")
    p.add_argument("--tracking-uri", help="an existing SQLite store (default: a new one in a temp dir)")
    p.add_argument("--profile", action="store_true", help="also cProfile one harness trial")
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.per_class, args.batch_size, args.epochs = 1, 2, 4, 2
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(args.workspace or tmp)
        tracking = Tracking(args.tracking_uri or f"sqlite:///{Path(tmp) / 'mlflow.db'}", tmp)
        tracking.experiment_id(EXPERIMENT)   # schema made before any clock runs
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        recipe = make_recipe(args)
        rounds = [] if args.quick else [("warm-up", None)]
        rounds += [(f"round {i + 1}", i) for i in range(args.repeats)]
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for label, i in rounds:
            k = (i or 0) % len(SIDES)
            for side in SIDES[k:] + SIDES[:k]:   # the order rotates every round
                got = (harness_run(recipe, workspace, tracking, label) if side == "harness"
                       else bare_run(recipe, workspace, inline_data=side == "bare+data"))
                if i is not None:
                    runs[side].append(got)
        report = summarize(args, runs)
        check_logged(tracking, runs["harness"][0])
        print(report["text"])
        if args.profile:
            print(profile_harness(recipe, workspace, tracking, report["steps"], 25))
    if args.json:
        Path(args.json).write_text(json.dumps({**{k: v for k, v in report.items() if k != "text"},
                                               "runs": {side: [{k: v for k, v in r.items() if k != "losses"}
                                                               for r in rs] for side, rs in runs.items()}}, indent=1))
    return 0 if report["parity"] == 0.0 else 1


def summarize(args, runs: dict[str, list[dict]]) -> dict:
    """Medians per side; ratios and µs per step against the bare loop (and against the bare
    loop with the harness's batch assembly inline: the loop's own overhead)."""
    n = runs["harness"][0]["n_steps"]
    parity = max(_max_diff(h["losses"], r["losses"]) for side in SIDES[:2]
                 for h, r in zip(runs["harness"], runs[side]))
    med = {side: {key: statistics.median(r[key] for r in rs) for key in ("steps", "cpu", "trial")}
           for side, rs in runs.items()}
    h, b, bd = med["harness"], med["bare"], med["bare+data"]
    ratio = b["steps"] / h["steps"]
    per_round = [r["steps"] / hr["steps"] for hr, r in zip(runs["harness"], runs["bare"])]
    overhead_us = (h["steps"] - b["steps"]) / n * 1e6
    flush = statistics.median(r["flush"] for r in runs["harness"])

    def us(a, b_, key="steps"):
        return f"{(a[key] - b_[key]) / n * 1e6:.0f} us"
    lines = [
        f"timm/test_resnet @ 32 px, batch {args.batch_size}, {n} steps per run, {len(runs['harness'])} rounds, "
        f"{args.threads} torch thread(s), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}",
        f"parity (max abs diff of per-step losses, harness vs both bare loops, every round): {parity}",
        f"bare loop step time: {b['steps'] / n * 1e3:.2f} ms",
        "steps/s: " + "  ".join(f"{side} {n / med[side]['steps']:.1f}" for side in SIDES),
        f"ratio harness/bare (per step): {ratio:.3f}  (target >= {TARGET}: {'PASS' if ratio >= TARGET else 'FAIL'})",
        f"per-round ratios: {' '.join(f'{r:.3f}' for r in per_round)}  (median {statistics.median(per_round):.3f})",
        f"overhead per step: {overhead_us:.0f} us = batch assembly {us(bd, b)} (bare+data - bare) "
        f"+ the harness loop {us(h, bd)} (harness - bare+data); ratio harness/(bare+data) {bd['steps'] / h['steps']:.3f}",
        f"main-thread CPU, same split: {us(h, b, 'cpu')} = {us(bd, b, 'cpu')} + {us(h, bd, 'cpu')}; "
        f"ratio harness/bare {b['cpu'] / h['cpu']:.3f}",
        f"full trial: harness {h['trial']:.2f} s (flush wait {flush * 1e3:.0f} ms), "
        f"bare {b['trial']:.2f} s, ratio {b['trial'] / h['trial']:.3f}",
    ]
    return {"parity": parity, "ratio": ratio, "per_round": per_round, "overhead_us": overhead_us,
            "steps": n, "medians": med, "flush": flush, "text": "\n".join(lines)}


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")


if __name__ == "__main__":
    sys.exit(main())
