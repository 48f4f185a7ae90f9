#!/usr/bin/env python
"""Harness overhead, as two ratios against references that do the same work.

(a) images/s of one harness training stage (harness.train.fine_tune) / images/s of a
    bare PyTorch loop: same model, batch, dtype, memory format, optimizer and param
    groups, same steps, same device-resident synthetic uint8 data.   target >= 0.97
(b) seconds of fine_tune logging to a real MlflowTracker (SQLite store in a temp dir)
    / seconds of the same fine_tune with the NullTracker.              target <= 1.02

    python bench/bench_train.py [--device cpu|cuda|auto] [--arch resnet18] [--image-size 32]
        [--batch-size 64] [--steps-per-epoch 20] [--epochs 3] [--repeats 3] [--json OUT]

How and why it is measured this way: bench/README.md. Only harness's public functions
are used; the one patch is harness.data.load_dataset, swapped for the synthetic data
while a fine_tune runs and restored afterwards.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

import torch  # noqa: E402
from torch import nn  # noqa: E402

from harness import data as data_mod  # noqa: E402
from harness.models import build_model, param_groups, set_trainable  # noqa: E402
from harness.recipe import Recipe  # noqa: E402
from harness.train import NullTracker, fine_tune, resolve_device  # noqa: E402

N_CLASSES = 10
LR = 1e-3                  # plain LR, one stage `train: all`: the work matches the bare loop
TARGET_A, TARGET_B = 0.97, 1.02


# ------------------------------------------------------------------ data and recipe

def synthetic_dataset(n_train: int, n_eval: int, size: int, device: torch.device,
                      seed: int = 0) -> data_mod.Dataset:
    """uint8 [N,3,S,S] images and random labels, already on `device` (to_device is then a no-op)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> data_mod.Split:
        x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        y = torch.randint(0, N_CLASSES, (n,), generator=g)
        return data_mod.Split(x.to(device), y.to(device))

    return data_mod.Dataset(train=split(n_train), val=split(n_eval), test=split(n_eval),
                            class_names=[f"c{i}" for i in range(N_CLASSES)])


@contextlib.contextmanager
def serving(ds: data_mod.Dataset):
    """fine_tune loads `ds` instead of reading a dataset (harness.train calls data_mod.load_dataset)."""
    original = data_mod.load_dataset
    data_mod.load_dataset = lambda cfg, workspace, seed: ds
    try:
        yield
    finally:
        data_mod.load_dataset = original


def make_recipe(args, device: torch.device, epochs: int) -> Recipe:
    return Recipe.from_dict({
        "seed": 0,
        "device": device.type,
        # the data section only sizes the batch here (load_dataset is patched); no augmentation,
        # so both sides do the same data work: randperm per epoch, gather, normalize
        "data": {"dataset": "fashion-mnist", "image_size": args.image_size,
                 "batch_size": args.batch_size, "augment": False},
        "model": {"arch": args.arch, "weights": "none", "head": "fastai", "train_bn": True},
        "stages": [{"epochs": epochs, "train": "all", "lr": LR}],
    })


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ the two sides of (a)

def bare_loop(split: data_mod.Split, recipe: Recipe, device: torch.device, epochs: int) -> float:
    """Seconds for `epochs` epochs of a plain PyTorch loop; the model is built before the clock."""
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(recipe.seed)
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = build_model(recipe.model.arch, N_CLASSES).to(device, memory_format=fmt)
    model.train()
    set_trainable(model, len(model), recipe.model.train_bn)   # train: all (a no-op, as in the harness)
    gen = torch.Generator(device=device).manual_seed(recipe.seed)
    bs, n = recipe.data.batch_size, len(split.y)
    opt_cfg = recipe.optimizer
    sync(device)
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(param_groups(model, opt_cfg.weight_decay), lr=LR,
                            betas=(recipe.stages[0].moms[0], opt_cfg.sqr_mom), eps=opt_cfg.eps,
                            fused=cuda)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen, device=device)
        for step in range(n // bs):
            idx = order[step * bs:(step + 1) * bs]
            x, y = data_mod.normalize(split.x[idx]), split.y[idx]
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = model(x)
            loss = nn.functional.cross_entropy(out.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def harness_stage(ds: data_mod.Dataset, recipe: Recipe, workspace: Path, progress: bool,
                  tracker=None) -> tuple[float, float, int]:
    """(the harness's own clock of its stages = Result.seconds, wall time of the call, steps)."""
    with serving(ds):
        t0 = time.perf_counter()
        result = fine_tune(recipe, tracker or NullTracker(), workspace=workspace, progress=progress)
        wall = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(f"harness run failed: {result.status}")
    return result.seconds, wall, len(result.lrs)


# ------------------------------------------------------------------ (b): MLflow on / off

def mlflow_store(tmp: Path) -> str:
    """A fresh SQLite store; created (schema migrations) before any clock runs."""
    from harness.tracking import get_experiment_id, make_client
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    get_experiment_id(make_client(uri), "bench", tmp / "artifacts")
    return uri


def with_mlflow(ds, recipe, uri: str, workspace: Path, name: str) -> float:
    """fine_tune logging to a live run; the clock stops once every metric is in the store
    (tracker.flush). Run creation and closing are outside the clock (see end_to_end)."""
    from harness.tracking import mlflow_run
    with mlflow_run(uri, "bench", name, workspace) as tracker, serving(ds):
        t0 = time.perf_counter()
        result = fine_tune(recipe, tracker, workspace=workspace)
        tracker.flush()
        seconds = time.perf_counter() - t0
    assert result.ok, result.status
    return seconds


def without_mlflow(ds, recipe, workspace: Path) -> float:
    with serving(ds):
        t0 = time.perf_counter()
        result = fine_tune(recipe, NullTracker(), workspace=workspace)
        seconds = time.perf_counter() - t0
    assert result.ok, result.status
    return seconds


def end_to_end(ds, recipe, uri: str, workspace: Path, name: str) -> float:
    """What `harness train` does: open the run, tracked_fine_tune (params, recipe YAML, per-step
    curves, LR plot), close the run. Informational: includes fixed per-run costs."""
    from harness.tracking import mlflow_run, tracked_fine_tune
    t0 = time.perf_counter()
    with mlflow_run(uri, "bench", name, workspace) as tracker, serving(ds):
        result = tracked_fine_tune(recipe, tracker, workspace=workspace)
    seconds = time.perf_counter() - t0
    assert result.ok, result.status
    return seconds


# ------------------------------------------------------------------ reporting

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU, {torch.get_num_threads()} threads ({model})"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps each side runs before any clock")
    p.add_argument("--progress", action="store_true",
                   help="harness side of (a) with its tqdm bar on, as `harness train` runs it")
    p.add_argument("--skip-mlflow", action="store_true", help="measure (a) only")
    p.add_argument("--json", metavar="OUT", help="also write every measurement to this file")
    return p.parse_args(argv)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    torch.set_num_threads(cores())   # one setting, in force for both sides of every ratio
    device = resolve_device(args.device)
    bs, spe, epochs = args.batch_size, args.steps_per_epoch, args.epochs
    steps = spe * epochs
    images = steps * bs

    print(f"device  {device_name(device)}")
    print(f"torch   {torch.__version__}   threads {torch.get_num_threads()}   python {platform.python_version()}")
    print(f"work    {args.arch} @ {args.image_size}px, batch {bs}, {spe} steps x {epochs} epochs "
          f"= {steps} steps, {'bf16 autocast, channels_last, fused AdamW' if device.type == 'cuda' else 'fp32, AdamW'}, "
          f"{args.repeats} repeats", flush=True)

    # (a): no val/test images, so fine_tune's evaluations return at once and Result.seconds
    # covers exactly the stage: set_trainable, optimizer, steps, per-epoch loss read and log.
    ds_a = synthetic_dataset(spe * bs, 0, args.image_size, device)
    # (b): a realistic run with small val/test splits (2 batches each) evaluated every epoch.
    ds_b = synthetic_dataset(spe * bs, 2 * bs, args.image_size, device, seed=1)
    ds_warm = synthetic_dataset(args.warmup_steps * bs, 2 * bs, args.image_size, device, seed=2)
    recipe = make_recipe(args, device, epochs)
    warm_recipe = make_recipe(args, device, 1)
    out: dict = {"device": device_name(device), "torch": torch.__version__, "config": vars(args),
                 "images_per_run": images}

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        # warm-up: cudnn autotuning, the caching allocator, lazy imports, first-call costs
        t0 = time.perf_counter()
        bare_loop(ds_warm.train, warm_recipe, device, 1)
        harness_stage(ds_warm, warm_recipe, tmp, args.progress)
        uri = None
        if not args.skip_mlflow:
            uri = mlflow_store(tmp)
            end_to_end(ds_warm, warm_recipe, uri, tmp, "warmup")
        print(f"warm-up {time.perf_counter() - t0:.1f} s", flush=True)

        # (a) alternate the order (bare first, harness first, ...) so drift hits both sides
        bare_s, harness_s, harness_wall = [], [], []
        for r in range(args.repeats):
            for side in (("bare", "harness") if r % 2 == 0 else ("harness", "bare")):
                if side == "bare":
                    bare_s.append(bare_loop(ds_a.train, recipe, device, epochs))
                else:
                    sec, wall, n_steps = harness_stage(ds_a, recipe, tmp, args.progress)
                    assert n_steps == steps, (n_steps, steps)
                    harness_s.append(sec)
                    harness_wall.append(wall)
            print(f"  (a) repeat {r + 1}: bare {images / bare_s[-1]:.1f} img/s, "
                  f"harness {images / harness_s[-1]:.1f} img/s", flush=True)
        ips_bare, ips_harness = images / median(bare_s), images / median(harness_s)
        ratio_a = ips_harness / ips_bare
        out["a"] = {"bare_seconds": bare_s, "harness_seconds": harness_s,
                    "harness_wall_seconds_incl_model_build": harness_wall,
                    "images_per_s_bare": ips_bare, "images_per_s_harness": ips_harness,
                    "paired_ratios": [b / h for b, h in zip(bare_s, harness_s)],
                    "ratio": ratio_a, "target": TARGET_A, "pass": ratio_a >= TARGET_A}

        # (b) rotate the order of the three variants per repeat
        if not args.skip_mlflow:
            runs: dict[str, list[float]] = {"null": [], "mlflow": [], "end_to_end": []}
            order = ["null", "mlflow", "end_to_end"]
            for r in range(args.repeats):
                for kind in order[r % 3:] + order[:r % 3]:
                    if kind == "null":
                        runs[kind].append(without_mlflow(ds_b, recipe, tmp))
                    elif kind == "mlflow":
                        runs[kind].append(with_mlflow(ds_b, recipe, uri, tmp, f"loop-{r}"))
                    else:
                        runs[kind].append(end_to_end(ds_b, recipe, uri, tmp, f"e2e-{r}"))
                print(f"  (b) repeat {r + 1}: null {runs['null'][-1]:.2f} s, mlflow {runs['mlflow'][-1]:.2f} s, "
                      f"end-to-end {runs['end_to_end'][-1]:.2f} s", flush=True)
            s_null, s_mlflow, s_e2e = (median(runs[k]) for k in order)
            ratio_b = s_mlflow / s_null
            out["b"] = {"null_seconds": runs["null"], "mlflow_seconds": runs["mlflow"],
                        "end_to_end_seconds": runs["end_to_end"], "ratio": ratio_b,
                        "end_to_end_ratio": s_e2e / s_null, "target": TARGET_B,
                        "pass": ratio_b <= TARGET_B}

    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    a = out["a"]
    print()
    print(f"{'measure':<44}{'value':>12}  target")
    print(f"{'(a) images/s, bare PyTorch loop':<44}{a['images_per_s_bare']:>12.1f}")
    print(f"{'(a) images/s, harness fine_tune stage':<44}{a['images_per_s_harness']:>12.1f}")
    print(f"{'(a) ratio harness / bare':<44}{a['ratio']:>12.3f}  >= {TARGET_A}  {verdict(a['pass'])}")
    print(f"{'    paired ratios per repeat':<44}{'  '.join(f'{x:.3f}' for x in a['paired_ratios']):>12}")
    if "b" in out:
        b = out["b"]
        print(f"{'(b) seconds, fine_tune with NullTracker':<44}{median(b['null_seconds']):>12.2f}")
        print(f"{'(b) seconds, fine_tune with MlflowTracker':<44}{median(b['mlflow_seconds']):>12.2f}")
        print(f"{'(b) ratio with / without MLflow':<44}{b['ratio']:>12.3f}  <= {TARGET_B}  {verdict(b['pass'])}")
        print(f"{'    end-to-end tracked run (info)':<44}{median(b['end_to_end_seconds']):>12.2f}"
              f"  = {b['end_to_end_ratio']:.3f} x null (run open/close, params, LR plot)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
