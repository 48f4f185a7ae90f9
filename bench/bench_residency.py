#!/usr/bin/env python
"""Where a big image folder's decoded images live: peak memory and speed of a sweep trial with
`data.residency: host` against `device`, on a generated folder (default 50,000 JPEGs).

    python bench/bench_residency.py [--n 50000] [--folder DIR] [--image-size 224]
        [--arch timm/test_resnet] [--train-per-class 100] [--batch-size 32] [--epochs 1]
        [--rounds 2] [--json OUT] [--quick]

1. The folder: `--n` JPEGs of 320x240 (smooth random colour fields, quality 85) in 10 class
   folders, made once (in parallel) and reused.
2. Decode: one child process plans the memory (harness.engine.data.plan_for) and decodes
   the folder into the workspace's cache (.npy, memory-mapped later); its images/s and
   peak RSS.
3. Trials: child processes, `host` and `device` residency taken in turn `--rounds` times,
   each a sweep trial's work (`jobs.tracked_fine_tune` into a fresh MLflow SQLite store) on
   the cached folder: train_per_class images per class (val and test capped alike), the
   recipe's default augmentation at that size. Each child first builds the same model and
   takes two training steps on a random batch: its peak RSS then is "the model's own
   memory" (weights, optimizer, activations, torch itself); the peak is reset
   (/proc/self/clear_refs) and the trial runs; its peak RSS beyond the model's is reported.
   Speed: training images per second over the trial's epochs (validation included).

Device residency on the CPU copies the splits' rows into RAM; host residency reads each
batch's rows from the cache file a batch ahead. The decoded folder would be n x 3 x S x S
bytes in RAM (50,000 at 224 px: 7.5 GB), which is what the old design held.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

CLASSES = 10


def _one_image(args: tuple[Path, int]) -> None:
    import numpy as np
    from PIL import Image
    path, seed = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)   # a smooth field once upscaled
    img = Image.fromarray(small).resize((320, 240), Image.BICUBIC)
    noise = rng.integers(-12, 13, (240, 320, 3))
    Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)).save(path, quality=85)


def make_folder(folder: Path, n: int) -> None:
    """n JPEGs in CLASSES class folders, unless the folder is complete already."""
    from concurrent.futures import ProcessPoolExecutor
    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return
    jobs = []
    for i in range(n):
        d = folder / f"class{i % CLASSES}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d / f"{i:06d}.jpg", i))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_one_image, jobs, chunksize=256))
    done.write_text(str(n))
    print(f"made {n:,} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)


def recipe_dict(args, residency: str) -> dict:
    return {"seed": 0, "device": "cpu",
            "data": {"dataset": "imagefolder", "root": str(args.folder), "image_size": args.image_size,
                     "train_per_class": args.train_per_class, "test_per_class": max(1, args.train_per_class // 10),
                     "val_fraction": 0.1, "batch_size": args.batch_size, "residency": residency},
            "model": {"arch": args.arch, "weights": "none"},
            "stages": [{"epochs": args.epochs, "train": "all", "lr": 1e-3}]}


def _peak_rss() -> int:
    """VmHWM of this process, bytes (reset by writing 5 to /proc/self/clear_refs)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_decode(args) -> dict:
    import torch
    from harness.engine.data import plan_for
    from harness.engine.data.cache import prepared_dataset
    from harness.engine.recipe import Recipe
    recipe = Recipe.from_dict(recipe_dict(args, "auto"))
    plan = plan_for(recipe.data, args.workspace, torch.device("cpu"))
    t0 = time.perf_counter()
    prepared = prepared_dataset(recipe.data, args.workspace)
    seconds = time.perf_counter() - t0
    n = sum(len(v) for k, v in prepared.items() if k.endswith("_y"))
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds if seconds else None,
            "peak_rss": _peak_rss(), "plan": plan.params()}


def child_trial(args, residency: str) -> dict:
    import torch
    from torch import nn
    from harness import jobs
    from harness.engine.models import build_model
    from harness.engine.recipe import Recipe
    from harness.tracking import MlflowTracker, Tracking

    torch.set_num_threads(args.threads)
    recipe = Recipe.from_dict(recipe_dict(args, residency))
    model = build_model(recipe.model.arch, CLASSES, "none", recipe.model.head, recipe.model.groups, args.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, CLASSES, (args.batch_size,))
    for _ in range(2):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    model_peak = _peak_rss()
    del model, opt, x, y
    Path("/proc/self/clear_refs").write_text("5")
    store = Path(tempfile.mkdtemp(prefix="bench-residency-mlflow-"))
    tracking = Tracking(f"sqlite:///{store}/mlflow.db", args.workspace)
    run_id = tracking.start("bench-residency", f"trial-{residency}")
    result = jobs.tracked_fine_tune(recipe, MlflowTracker(tracking.client, run_id), args.workspace)
    trial_peak = _peak_rss()
    seconds = sum(e.seconds for e in result.epochs)
    params = tracking.client.get_run(run_id).data.params
    return {"residency": residency, "residency_used": params.get("data.residency_used"), "ok": result.ok,
            "train_images": result.n_train * recipe.epochs, "seconds": seconds,
            "images_per_s": result.n_train * recipe.epochs / seconds, "model_peak_rss": model_peak,
            "trial_peak_rss": trial_peak, "beyond_model": trial_peak - model_peak}


def run_child(args, *what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *what, "--folder", str(args.folder), "--workspace", str(args.workspace),
           "--image-size", str(args.image_size), "--arch", args.arch, "--train-per-class", str(args.train_per_class),
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"child {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--folder", type=Path)
    p.add_argument("--workspace", type=Path)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--arch", default="timm/test_resnet")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="200 images at 64 px, one round: a smoke run")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.n, args.image_size, args.train_per_class, args.batch_size, args.rounds = 200, 64, 8, 8, 1
    args.folder = args.folder or Path(tempfile.gettempdir()) / f"harness-bench-residency-{args.n}"
    args.workspace = args.workspace or args.folder.parent / f"{args.folder.name}-workspace-{args.image_size}"
    if args.child:
        out = child_decode(args) if args.child[0] == "decode" else child_trial(args, args.child[1])
        print(json.dumps(out))
        return

    make_folder(args.folder, args.n)
    decode = run_child(args, "decode")
    gib = 2**30
    print(f"decode: {decode['images']:,} images in {decode['seconds']:.0f} s ({decode['images_per_s']:.0f} images/s), "
          f"peak RSS {decode['peak_rss'] / gib:.2f} GiB; plan {decode['plan']}", flush=True)
    trials = []
    for r in range(args.rounds):
        for residency in (("host", "device") if r % 2 == 0 else ("device", "host")):
            t = run_child(args, "trial", residency)
            trials.append(t)
            print(f"round {r + 1} {residency:6s}: {t['images_per_s']:.1f} train images/s, peak RSS "
                  f"{t['trial_peak_rss'] / gib:.2f} GiB, model alone {t['model_peak_rss'] / gib:.2f} GiB, "
                  f"beyond the model {t['beyond_model'] / gib:.3f} GiB", flush=True)
    best = {res: max(t["images_per_s"] for t in trials if t["residency"] == res) for res in ("host", "device")}
    beyond = {res: max(t["beyond_model"] for t in trials if t["residency"] == res) for res in ("host", "device")}
    ratio = best["host"] / best["device"]
    decoded_bytes = args.n * 3 * args.image_size ** 2
    print(f"host / device images/s (best of {args.rounds} each): {ratio:.3f}")
    print(f"peak RSS beyond the model (worst round): host {beyond['host'] / gib:.3f} GiB, device "
          f"{beyond['device'] / gib:.3f} GiB; the decoded folder in RAM would be {decoded_bytes / gib:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.node(), "n": args.n, "image_size": args.image_size,
                                         "decode": decode, "trials": trials, "ratio_host_device": ratio}, indent=1))


if __name__ == "__main__":
    main()
