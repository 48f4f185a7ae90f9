#!/usr/bin/env python
"""Peak memory of a 224 px fine-tune on the FULL Fashion-MNIST train set, through the harness.

    python bench/bench_memory.py [--arch timm/tf_efficientnet_lite0] [--image-size 224]
        [--batch-size 32] [--steps 4] [--weights none] [--threads 1] [--json OUT]

The harness holds Fashion-MNIST at its native 28 px (uint8, 1 channel) and resizes every
batch on the device (harness.engine.data: `Split.size`); resized once up front, the 60,000 train
images at 224 px would need 60,000 x 3 x 224 x 224 bytes = 9.0 GB of uint8 (3.0 GB even
kept grey). This script runs what `fine_tune` runs, but only `--steps` optimizer steps:

1. `harness.engine.train.prepare(recipe)`: seed, load the dataset (all 10 classes, no
   train_per_class cap: 54,000 train + 6,000 val images, and the 10,000 test images),
   build the model, move it to the device;
2. the stage's `set_trainable` and `make_optimizer` (harness.engine.train), then `--steps` steps
   over `harness.engine.data.train_batches` (the per-batch resize to 224 px and the
   normalisation with the model's input_stats), with fine_tune's step body: forward,
   cross-entropy, backward, optimizer step, zero_grad.

It reports, per phase and overall, the peak resident set size (VmHWM from
/proc/self/status, reset between phases through /proc/self/clear_refs; and
getrusage's ru_maxrss, the whole process, never reset), and the bytes held by the
dataset tensors (every distinct tensor storage, counted once) against the 9.0 GB a
pre-resized set would need. Nothing in harness/ is patched or edited. CPU only by
default (`--device cuda` also reports torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

import torch  # noqa: E402
from torch import nn  # noqa: E402

from harness.engine import data as data_mod  # noqa: E402
from harness.engine.data import cache as data_cache  # noqa: E402
from harness.engine.recipe import Recipe  # noqa: E402
from harness.engine.train import make_optimizer, prepare  # noqa: E402
from harness.engine.groups import set_trainable

GB = 1e9
MIB = 2 ** 20


def status_kib(field: str) -> int | None:
    """A `VmXXX:  N kB` line of /proc/self/status, in KiB (None where there is no procfs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024   # Linux reports KiB, macOS bytes


def snapshot() -> dict:
    rss, hwm = status_kib("VmRSS"), status_kib("VmHWM")
    return {"rss_bytes": rss * 1024 if rss is not None else None,
            "hwm_bytes": hwm * 1024 if hwm is not None else None,
            "ru_maxrss_bytes": maxrss_bytes()}


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> tuple[int, dict[str, int]]:
    """(bytes of the distinct storages behind `tensors`, bytes of each tensor's own view)."""
    seen: dict[int, int] = {}
    for t in tensors.values():
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()), {k: t.numel() * t.element_size() for k, t in tensors.items()}


def dataset_tensors(run) -> dict[str, torch.Tensor]:
    """Every dataset tensor the process holds after prepare(): the splits (train on the
    device, val and test as loaded) and the decoded full set harness.engine.data keeps in memory."""
    ds = run.dataset
    out = {"train.x": run.train.x, "train.y": run.train.y,
           "val.x": ds.val.x, "val.y": ds.val.y, "test.x": ds.test.x, "test.y": ds.test.y}
    for key, prepared in data_cache._MEMORY_CACHE.items():   # read only: what the process holds
        for name, value in prepared.items():
            if isinstance(value, torch.Tensor):
                out[f"memory-cache[{key}].{name}"] = value
    return out


def make_recipe(args) -> Recipe:
    return Recipe.from_dict({
        "seed": 0,
        "device": args.device,
        "data": {"dataset": "fashion-mnist", "root": args.root, "image_size": args.image_size,
                 "batch_size": args.batch_size, "augment": args.augment},
        "model": {"arch": args.arch, "weights": args.weights, "head": "fastai"},
        "stages": [{"epochs": 1, "train": "all", "lr": 1e-3}],
    })


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="timm/tf_efficientnet_lite0")
    p.add_argument("--weights", default="none")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (a full epoch would be 1,687)")
    p.add_argument("--augment", action="store_true", help="recipe data.augment: true (default false)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--root", default=str(data_mod.SYSTEM_FASHION_DIR),
                   help="folder with the four Fashion-MNIST idx .gz files")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--workspace", default=None,
                   help="harness workspace (its dataset cache goes there; default: a temp dir)")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = make_recipe(args)
    stage = recipe.stages[0]
    bs, size = args.batch_size, args.image_size
    phases: dict[str, dict] = {}
    t_start = time.perf_counter()
    cuda = args.device == "cuda"

    phases["start"] = snapshot()            # interpreter + torch + harness imported
    resettable = reset_peak()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        workspace = Path(args.workspace or tmp)
        t0 = time.perf_counter()
        run = prepare(recipe, workspace)    # load the full set (cached in memory), build the model
        prepare_s = time.perf_counter() - t0
        phases["prepare"] = snapshot()
        model, dev, train = run.model, run.device, run.train
        total_data, per_tensor = tensor_bytes(dataset_tensors(run))
        n_train, n_val, n_test = len(train.y), len(run.dataset.val.y), len(run.dataset.test.y)
        params = sum(p.numel() for p in model.parameters())

        reset_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        set_trainable(model, stage.trainable_groups(model.n_groups), recipe.model.train_bn)
        opt = make_optimizer(model, stage, recipe, dev)
        t0, losses, shape = time.perf_counter(), [], None
        batches = data_mod.train_batches(train, bs, run.generator, recipe.data.augment, model.input_stats)
        for step, (x, y) in zip(range(args.steps), batches):
            shape = tuple(x.shape)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        losses_f = torch.stack(losses).float().cpu().tolist()
        steps_s = time.perf_counter() - t0
        phases["steps"] = snapshot()
        cuda_peak = torch.cuda.max_memory_allocated(dev) if cuda else None

    assert shape == (bs, 3, size, size), shape
    resized_u8 = n_train * 3 * size * size            # the train split alone, pre-resized, RGB uint8
    full_u8 = 60_000 * 3 * size * size                # Fashion-MNIST's official train set, as the brief's 9 GB
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch_threads": args.threads,
                    "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    "load_before": os.getloadavg()[0]},
        "torch": torch.__version__, "python": platform.python_version(),
        "config": vars(args), "batch_shape": list(shape), "parameters": params,
        "n_train": n_train, "n_val": n_val, "n_test": n_test, "losses": losses_f,
        "seconds": {"prepare": prepare_s, "steps": steps_s, "per_step": steps_s / max(1, len(losses_f)),
                    "total": time.perf_counter() - t_start},
        "phases": phases, "peak_reset_supported": resettable,
        "dataset_bytes": total_data, "dataset_tensor_bytes": per_tensor,
        "resized_uint8_train_split_bytes": resized_u8, "resized_uint8_full_train_set_bytes": full_u8,
        "cuda_max_allocated_bytes": cuda_peak,
    }
    print_report(out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def print_report(out: dict) -> None:
    def mib(b):
        return "n/a" if b is None else f"{b / MIB:,.0f} MiB"

    def row(label: str, value: str, note: str = "") -> None:
        print(f"{label:<52}{value:>14}  {note}".rstrip())

    ph, cfg = out["phases"], out["config"]
    m = out["machine"]
    print(f"machine  {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / GB:.0f} GB RAM, "
          f"load {m['load_before']:.1f}; torch {out['torch']}, {m['torch_threads']} thread(s)")
    print(f"work     {cfg['arch']} (weights {cfg['weights']}) @ {cfg['image_size']} px, batch {cfg['batch_size']}, "
          f"{len(out['losses'])} steps; Fashion-MNIST {out['n_train']:,} train / {out['n_val']:,} val / "
          f"{out['n_test']:,} test images; batch {tuple(out['batch_shape'])}")
    s = out["seconds"]
    print(f"time     prepare {s['prepare']:.1f} s, {s['per_step']:.2f} s per step, {s['total']:.1f} s in all")
    row("dataset tensors held (distinct storages)", mib(out["dataset_bytes"]),
        " + ".join(f"{k} {v / MIB:.1f}" for k, v in out["dataset_tensor_bytes"].items() if v > MIB))
    row("the train split pre-resized, uint8 RGB", f"{out['resized_uint8_train_split_bytes'] / GB:.2f} GB",
        f"{out['n_train']:,} x 3 x {cfg['image_size']}^2")
    row("the full train set pre-resized, uint8 RGB", f"{out['resized_uint8_full_train_set_bytes'] / GB:.2f} GB",
        f"60,000 x 3 x {cfg['image_size']}^2; held: "
        f"{out['dataset_bytes'] / out['resized_uint8_full_train_set_bytes'] * 100:.2f}% of it")
    row("RSS after imports", mib(ph["start"]["rss_bytes"]))
    row("peak RSS in prepare (VmHWM; load + model build)", mib(ph["prepare"]["hwm_bytes"]),
        f"RSS after: {mib(ph['prepare']['rss_bytes'])}")
    row("peak RSS in the steps (VmHWM)", mib(ph["steps"]["hwm_bytes"]),
        f"RSS after: {mib(ph['steps']['rss_bytes'])}")
    row("peak RSS of the whole process (ru_maxrss)", mib(ph["steps"]["ru_maxrss_bytes"]))
    if out["cuda_max_allocated_bytes"] is not None:
        row("CUDA max allocated in the steps", mib(out["cuda_max_allocated_bytes"]))
    if not out["peak_reset_supported"]:
        print("note: /proc/self/clear_refs not writable: the per-phase peaks are since the start")


if __name__ == "__main__":
    sys.exit(main())
