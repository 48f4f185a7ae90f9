"""Free probes: a 5-epoch head-only trial with and without the feature cache.

The trial is what a sweep runs for `head_only` with `model.train_bn: false` and
`data.augment: false` (harness/engine/probe.py): `fine_tune(recipe, plan=StagePlan(test=False))`,
timed whole (its data load from the in-process cache, the model build, the stage). Runs, in
one process:

1. uncached: HARNESS_FEATURE_CACHE=off, the body runs on every batch (`--repeats` times);
2. cold: the in-process cache emptied, the features computed once, then the head trained;
3. warm: the same trial again (`--repeats` times), features from the in-process cache, as
   the second trial of a sweep in the same process finds them;
4. disk: HARNESS_FEATURE_CACHE=disk into a fresh workspace (cold: computed and written), then
   the in-process cache emptied and the trial again (warm from disk: a new process's view).

Every run must match the uncached one: val accuracies per epoch equal, val logits of the
final model within 1e-5 relative (the largest difference is printed; exit status 1 if not). Ratios are of the
medians (and of the fastest runs, less disturbed by other work on a shared machine): cached
seconds / uncached seconds.

    .venv/bin/python bench/bench_probe.py                      # 64 px, 5 classes x 100 images
    .venv/bin/python bench/bench_probe.py --size 224 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.engine import data as data_mod  # noqa: E402
from harness.engine import probe  # noqa: E402
from harness.engine.recipe import Recipe  # noqa: E402
from harness.engine.stages import StagePlan  # noqa: E402
from harness.engine.train import fine_tune, resolve_device  # noqa: E402
from harness.sweep.strategies import head_only  # noqa: E402

CLASSES = ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]   # studies/quickstart.yaml's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="timm/tf_efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--head", default="fastai", choices=["fastai", "linear"])
    p.add_argument("--size", type=int, default=64, help="image size in px (224 for a GPU run)")
    p.add_argument("--per-class", type=int, default=100, help="train images per class")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="uncached and warm runs each (median)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workspace", default="workspace", help="where the decoded dataset cache is")
    p.add_argument("--json", default=None, help="write every measurement here")
    return p.parse_args(argv)


def make_recipe(args: argparse.Namespace) -> Recipe:
    stages = [s.model_dump(mode="json") for s in head_only(args.epochs)]
    return Recipe.from_dict({
        "seed": 0, "device": args.device,
        "data": {"dataset": "fashion-mnist", "classes": CLASSES, "train_per_class": args.per_class,
                 "val_fraction": 0.2, "image_size": args.size, "batch_size": args.batch_size, "augment": False},
        "model": {"arch": args.arch, "weights": args.weights, "head": args.head, "train_bn": False},
        "stages": stages})


def trial(recipe: Recipe, workspace: Path, mode: str) -> dict:
    """One timed trial under HARNESS_FEATURE_CACHE=mode: its seconds, val accuracies, val logits."""
    os.environ[probe.ENV] = mode
    computed = probe.CACHE.computed
    t0 = time.perf_counter()
    result = fine_tune(recipe, workspace=workspace, plan=StagePlan(test=False))
    if result.model is not None and next(result.model.parameters()).is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert result.ok, result.status
    return {"mode": mode, "seconds": seconds, "stage_seconds": result.seconds,
            "computed": probe.CACHE.computed - computed,
            "val_accuracy": [e.val_accuracy for e in result.epochs], "logits": val_logits(result, recipe, workspace)}


@torch.no_grad()
def val_logits(result, recipe: Recipe, workspace: Path) -> torch.Tensor:
    model, device = result.model.eval(), next(result.model.parameters()).device
    val = data_mod.to_device(data_mod.load_dataset(recipe.data, workspace, recipe.seed).val, device)
    return torch.cat([model(x).float().cpu() for x, _ in data_mod.eval_batches(val, 64, model.input_stats)])


def mismatch(run: dict, ref: dict) -> tuple[float, bool]:
    """(the logits' largest relative difference from the uncached run, whether the val
    accuracies per epoch differ)."""
    rel = float((run["logits"] - ref["logits"]).abs().max() / ref["logits"].abs().max())
    return rel, run["val_accuracy"] != ref["val_accuracy"]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe, workspace = make_recipe(args), Path(args.workspace)
    saved = os.environ.get(probe.ENV)
    try:
        runs = measure(recipe, workspace, args.repeats)
    finally:
        os.environ.pop(probe.ENV, None)
        if saved is not None:
            os.environ[probe.ENV] = saved
    report(args, recipe, runs)


def measure(recipe: Recipe, workspace: Path, repeats: int) -> dict[str, list[dict]]:
    trial(recipe, workspace, "off")              # warm-up: the dataset decoded and cached, imports done
    runs = {"uncached": [trial(recipe, workspace, "off") for _ in range(repeats)]}
    probe.CACHE.clear()
    runs["cold"] = [trial(recipe, workspace, "memory")]
    runs["warm"] = [trial(recipe, workspace, "memory") for _ in range(repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        disk_ws = Path(tmp)                      # the decoded dataset comes from the in-process cache
        probe.CACHE.clear()
        runs["disk_cold"] = [trial(recipe, disk_ws, "disk")]
        runs["disk_warm"] = []
        for _ in range(repeats):
            probe.CACHE.clear()                  # nothing in memory: read from the disk
            runs["disk_warm"].append(trial(recipe, disk_ws, "disk"))
    assert all(r["computed"] == 0 for r in runs["warm"] + runs["disk_warm"]), "a warm run computed features"
    return runs


def report(args: argparse.Namespace, recipe: Recipe, runs: dict[str, list[dict]]) -> None:
    ref = runs["uncached"][0]
    checks = [mismatch(r, ref) for rs in runs.values() for r in rs]
    rel, acc_differs = max(c[0] for c in checks), any(c[1] for c in checks)
    med = {k: statistics.median(r["seconds"] for r in rs) for k, rs in runs.items()}
    d = recipe.data
    print(f"{recipe.model.arch} ({recipe.model.weights}, {recipe.model.head} head, train_bn false), "
          f"Fashion-MNIST {len(d.classes)} classes x {d.train_per_class} train images "
          f"({len(ref['logits'])} val) at {d.image_size} px, batch {d.batch_size}, {args.epochs} epochs, "
          f"device {resolve_device(recipe.device)}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for k, rs in runs.items():
        each = ", ".join(f"{r['seconds']:.3f}" for r in rs)
        print(f"  {k:9s} {med[k]:8.3f} s (median of {len(rs)}: {each})")
    same = not acc_differs and rel <= 1e-5
    print(f"  every run = uncached: {'yes' if same else 'NO'} (val accuracies per epoch "
          f"{'differ' if acc_differs else 'equal'}, val logits max rel diff {rel:.1e}, required <= 1e-5)")
    best = {k: min(r["seconds"] for r in rs) for k, rs in runs.items()}
    print("  ratios of medians (of the fastest runs):")
    for k, label in (("cold", "cold"), ("warm", "warm"), ("disk_cold", "disk cold"), ("disk_warm", "disk warm")):
        target = "   (target <= 0.1)" if k == "warm" else ""
        print(f"  ratio {label:9s} / uncached  {med[k] / med['uncached']:.3f} ({best[k] / best['uncached']:.3f}){target}")
    if args.json:
        out = {k: [{f: v for f, v in r.items() if f != "logits"} for r in rs] for k, rs in runs.items()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": out, "median_s": med,
                                               "max_rel_logits": rel, "same": same}, indent=1))
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
