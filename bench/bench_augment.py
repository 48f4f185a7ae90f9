"""What each `data.augment` costs: seconds to make one training batch (`train_batches`, the
images already on the device as uint8), against `none` (the evaluation transform alone) and
against one training step of the model on that batch (forward, backward, AdamW).

Runs, in one process, for each augment in turn (order rotated every round, `--repeats`
rounds): `--batches` batches of `--batch` random uint8 images stored at `--stored` px,
output `--size` px. Ratios are of medians measured in this one run.

    .venv/bin/python bench/bench_augment.py                              # 32 px from 28 (Fashion-MNIST)
    .venv/bin/python bench/bench_augment.py --size 224 --stored 256 --batch 32 --batches 3
    .venv/bin/python bench/bench_augment.py --size 224 --stored 256 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.engine import data as data_mod  # noqa: E402
from harness.engine.models import build_model  # noqa: E402

AUGMENTS = ("none", "flip", "fastai", "randaugment")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_batches(split: data_mod.Split, augment: str, args, device: torch.device) -> float:
    """Seconds per batch for `args.batches` batches of one augment."""
    n = args.batch * args.batches
    sub = data_mod.Split(split.x[:n], split.y[:n], split.size, split.stored)
    gen = torch.Generator(device=device).manual_seed(0)
    _sync(device)
    start = time.perf_counter()
    for images, _ in data_mod.train_batches(sub, args.batch, gen, augment):
        pass
    _sync(device)
    return (time.perf_counter() - start) / args.batches


def time_step(args, device: torch.device) -> float:
    """Seconds of one training step of resnet18 on a batch (median of `args.batches`)."""
    model = build_model("resnet18", 10, "none", "fastai", 3, args.size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    times = []
    for _ in range(args.batches + 1):
        _sync(device)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])   # the first one warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--stored", type=int, default=28)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.batch * args.batches
    x = torch.randint(0, 256, (n, 3, args.stored, args.stored), dtype=torch.uint8, device=device)
    # images stored smaller than the output (Fashion-MNIST's 28 px) are resized to it, uncropped
    split = data_mod.Split(x, torch.zeros(n, dtype=torch.int64, device=device), args.size, max(args.stored, args.size))
    seconds: dict[str, list[float]] = {a: [] for a in AUGMENTS}
    for a in AUGMENTS:   # warm-up: first calls allocate
        time_batches(split, a, args, device)
    for r in range(args.repeats):
        order = AUGMENTS[r % len(AUGMENTS):] + AUGMENTS[:r % len(AUGMENTS)]
        for a in order:
            seconds[a].append(time_batches(split, a, args, device))
    step = time_step(args, device)
    base = statistics.median(seconds["none"])
    print(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}; batch {args.batch}, "
          f"stored {args.stored} px -> {args.size} px; {args.repeats} rounds of {args.batches} batches")
    print(f"resnet18 training step: {step * 1000:.1f} ms")
    print("| augment | ms / batch (median) | / none | / training step |")
    print("|---|---:|---:|---:|")
    for a in AUGMENTS:
        med = statistics.median(seconds[a])
        print(f"| {a} | {med * 1000:.1f} | {med / base:.2f} | {med / step:.3f} |")


if __name__ == "__main__":
    main()
