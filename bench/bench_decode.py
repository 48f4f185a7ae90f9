#!/usr/bin/env python
"""Decoding an image folder to 224 px: the harness against torchvision's ImageFolder + DataLoader.

    python bench/bench_decode.py [--root DIR] [--n 5000] [--mixed 1000] [--size 224]
        [--rounds 2] [--decoders 100] [--quick] [--json OUT]

1. Generates, once (kept under --root, default $TMPDIR/harness-bench-decode, and reused):
   - `jpeg-500x375-<n>`: n RGB JPEGs of 500x375 (quality 90, ~60 KB: smooth random colour
     fields plus fine noise, so they compress like photos, not like solid colours), in 10
     class folders;
   - `mixed-<m>`: m images of 100-1200 px a side, one sixth each of RGB JPEG, grey JPEG,
     RGBA PNG, palette (P) PNG, CMYK JPEG and grey PNG;
   - `jpeg-1600x1200-40`: 40 larger JPEGs, for the decoder table only.
2. Per set, in one run, --rounds times in alternating order (harness first in odd rounds):
   - harness: `harness.engine.data.cache.prepared_dataset` on a new, empty workspace (the
     folder scanned and fingerprinted, every image decoded into the cache file);
   - torchvision: `ImageFolder(transform=Resize(size) + CenterCrop(size) + PILToTensor())`
     and `DataLoader(num_workers=cores, batch_size=64)`, iterated to the end;
   and prints the best images/s of each and their ratio (harness / torchvision). Then the
   warm start: the same load with the in-process cache emptied (the files memory-mapped again),
   and the time to copy every decoded image once out of the map (from the page cache).
3. The decoder table (--decoders N, 0 to skip): N images, one process, one torch thread,
   each candidate pipeline from file to uint8 [3, size, size], best of 3 passes taken in turn.
4. The serial/parallel threshold: `decode_rows` with 1 and with `cores` workers on 64..512
   images, best of 2 taken in turn.

Timings are wall-clock (time.perf_counter) in this process; only ratios measured in the
same run are meaningful on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from harness.engine.data import cache as data_cache  # noqa: E402
from harness.engine.data import decode, resize  # noqa: E402

N_CLASSES = 10


# ---------------------------------------------------------------- the generated folders

def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 [h, w, 3]: a smooth random colour field with fine noise (JPEG sizes like photos)."""
    low = rng.integers(0, 256, (int(rng.integers(6, 24)), int(rng.integers(8, 32)), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.int16)
    return (smooth + rng.integers(-12, 13, smooth.shape, dtype=np.int16)).clip(0, 255).astype(np.uint8)


def _save_mixed(rng: np.random.Generator, path_stem: Path, kind: int) -> None:
    """One image of the mixed set: kind 0..5 = RGB JPEG, L JPEG, RGBA PNG, P PNG, CMYK JPEG, L PNG."""
    width, height = (int(v) for v in rng.integers(100, 1201, 2))
    img = Image.fromarray(_texture(rng, width, height))
    if kind == 0:
        img.save(path_stem.with_suffix(".jpg"), quality=90)
    elif kind == 1:
        img.convert("L").save(path_stem.with_suffix(".jpg"), quality=90)
    elif kind == 2:
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        rgba = img.convert("RGBA")
        rgba.putalpha(alpha)
        rgba.save(path_stem.with_suffix(".png"))
    elif kind == 3:
        img.quantize(64).save(path_stem.with_suffix(".png"))
    elif kind == 4:
        img.convert("CMYK").save(path_stem.with_suffix(".jpg"), quality=90)
    else:
        img.convert("L").save(path_stem.with_suffix(".png"))


def generate(folder: Path, n: int, kind: str, seed: int) -> Path:
    """n images in N_CLASSES class folders under `folder`, made once (a marker says complete)."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(n):
        class_dir = folder / f"class{i % N_CLASSES}"
        class_dir.mkdir(parents=True, exist_ok=True)
        if kind == "mixed":
            _save_mixed(rng, class_dir / f"{i:06d}", i % 6)
        else:
            width, height = (int(v) for v in kind.split("x"))
            Image.fromarray(_texture(rng, width, height)).save(class_dir / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{n}\n")
    print(f"generated {n} images in {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return folder


# ---------------------------------------------------------------- harness vs torchvision

def harness_cold(root: Path, size: int) -> tuple[float, dict]:
    """Seconds of a first load (empty workspace) and the prepared dataset."""
    cfg = SimpleNamespace(dataset="imagefolder", root=str(root), image_size=size)
    workspace = Path(tempfile.mkdtemp(prefix="bench-decode-ws-"))
    data_cache._MEMORY_CACHE.clear()
    t0 = time.perf_counter()
    prepared = data_cache.prepared_dataset(cfg, workspace)
    return time.perf_counter() - t0, {"workspace": workspace, "cfg": cfg, "prepared": prepared}


def harness_warm(state: dict) -> tuple[float, float]:
    """(seconds to load again from the cache files, seconds to then read every pixel once)."""
    data_cache._MEMORY_CACHE.clear()
    t0 = time.perf_counter()
    prepared = data_cache.prepared_dataset(state["cfg"], state["workspace"])
    opened = time.perf_counter() - t0
    x = prepared["train_x"]
    t0 = time.perf_counter()
    for i in range(0, len(x), 256):   # copied out, as load_dataset's split indexing does
        x[i:i + 256].clone()
    return opened, time.perf_counter() - t0


def torchvision_load(root: Path, size: int, workers: int) -> tuple[float, int]:
    """Seconds to iterate ImageFolder + DataLoader once over the folder, and the image count."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    transform = transforms.Compose([transforms.Resize(size, antialias=True), transforms.CenterCrop(size),
                                    transforms.PILToTensor()])
    t0 = time.perf_counter()
    loader = DataLoader(datasets.ImageFolder(str(root), transform=transform), batch_size=64, num_workers=workers)
    count = 0
    for images, _ in loader:
        assert images.shape[1:] == (3, size, size)
        count += len(images)
    return time.perf_counter() - t0, count


def compare(root: Path, size: int, rounds: int, workers: int) -> dict:
    """Both sides `rounds` times, alternating who goes first; best images/s of each."""
    n = sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    harness_s, tv_s, state = [], [], None
    for r in range(rounds):
        for side in (("harness", "tv") if r % 2 == 0 else ("tv", "harness")):
            if side == "harness":
                seconds, state = harness_cold(root, size)
                assert len(state["prepared"]["train_x"]) == n and state["prepared"]["train_x"].shape[-1] == size
                harness_s.append(seconds)
            else:
                seconds, count = torchvision_load(root, size, workers)
                assert count == n
                tv_s.append(seconds)
            print(f"  round {r + 1} {side:11s} {n / seconds:7.1f} images/s ({seconds:.1f} s)", flush=True)
    opened, read = harness_warm(state)
    result = {"images": n, "harness_images_per_s": n / min(harness_s), "torchvision_images_per_s": n / min(tv_s),
              "harness_seconds": harness_s, "torchvision_seconds": tv_s,
              "warm_open_seconds": opened, "warm_read_all_seconds": read,
              "channels": int(state["prepared"]["train_x"].shape[1])}
    result["ratio"] = result["harness_images_per_s"] / result["torchvision_images_per_s"]
    print(f"  best: harness {result['harness_images_per_s']:.1f} images/s, torchvision "
          f"{result['torchvision_images_per_s']:.1f} images/s, ratio {result['ratio']:.2f}; warm start "
          f"{opened:.3f} s to open, {read:.2f} s to read every pixel once", flush=True)
    return result


# ---------------------------------------------------------------- the decoder table

def _pil_rgb(path: Path, draft: int | None = None) -> Image.Image:
    with Image.open(path) as img:
        if draft:
            img.draft("RGB", (draft, draft))
        return img.convert("RGB")


def _chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _read_jpeg(path: Path) -> torch.Tensor:
    import warnings
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _pil_box(img: Image.Image, size: int) -> Image.Image:
    """PIL's own resize of the centre crop's source box straight to size x size."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    box = (left * w / new_w, top * h / new_h, (left + size) * w / new_w, (top + size) * h / new_h)
    return img.resize((size, size), Image.BILINEAR, box=box)


PIPELINES = {
    "PIL decode + float interpolate (the decode before)": lambda p, s: resize.resize(_chw(_pil_rgb(p))[None], s)[0],
    "PIL decode + PIL resize": lambda p, s: _chw(_pil_box(_pil_rgb(p), s)),
    "PIL decode + uint8 interpolate": lambda p, s: decode._fit(_chw(_pil_rgb(p)), s),
    "PIL draft() + uint8 interpolate": lambda p, s: decode._fit(_chw(_pil_rgb(p, draft=s)), s),
    "torchvision.io.decode_jpeg + float interpolate": lambda p, s: resize.resize(_read_jpeg(p)[None], s)[0],
    "torchvision.io.decode_jpeg + uint8 interpolate": lambda p, s: decode._fit(_read_jpeg(p), s),
    "harness decode_image (chosen per file)": lambda p, s: decode.decode_image(p, s),
}


def decoder_table(sets: dict[str, Path], n: int, size: int, passes: int = 3) -> dict:
    """images/s of each pipeline (one process, one torch thread) per set: the pipelines take
    turns, `passes` times, and each keeps its best pass (a shared machine's load comes and goes)."""
    torch.set_num_threads(1)
    table: dict[str, dict[str, float]] = {}
    for set_name, root in sets.items():
        paths = sorted(root.rglob("*.jpg"))[:n]
        best = {name: float("inf") for name in PIPELINES}
        for _ in range(passes):
            for name, pipeline in PIPELINES.items():
                t0 = time.perf_counter()
                for p in paths:
                    out = pipeline(p, size)
                best[name] = min(best[name], time.perf_counter() - t0)
                assert tuple(out.shape) == (3, size, size)
        for name in PIPELINES:
            table.setdefault(name, {})[set_name] = len(paths) / best[name]
            print(f"  {set_name:16s} {name:50s} {len(paths) / best[name]:7.1f} images/s", flush=True)
    torch.set_num_threads(decode.default_workers())
    return table


def threshold_table(root: Path, size: int, workers: int, passes: int = 2) -> dict:
    """Best seconds of decode_rows on the first k images, in this process and in `workers`
    forked processes (their start-up included), taking turns."""
    paths = sorted(root.rglob("*.jpg"))
    rows = {}
    for k in (64, 128, 256, 512):
        timing = {1: float("inf"), workers: float("inf")}
        for _ in range(passes):
            for w in timing:
                t0 = time.perf_counter()
                for _ in decode.decode_rows(paths[:k], size, workers=w):
                    pass
                timing[w] = min(timing[w], time.perf_counter() - t0)
        rows[k] = timing
        print(f"  {k:4d} images: 1 process {timing[1]:.2f} s, {workers} workers {timing[workers]:.2f} s", flush=True)
    return rows


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "harness-bench-decode"),
                   help="where the generated folders are kept (made once, reused)")
    p.add_argument("--n", type=int, default=5000, help="JPEGs of 500x375 in the main set")
    p.add_argument("--mixed", type=int, default=1000, help="images in the mixed set (0: skip it)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=2, help="runs of each side per set, order alternating")
    p.add_argument("--decoders", type=int, default=100, help="images per set for the decoder table (0: skip)")
    p.add_argument("--quick", action="store_true", help="a tiny run: 300 + 120 images, 1 round, 20 for the table")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.mixed, args.rounds, args.decoders = 300, 120, 1, 20
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    root, cores = Path(args.root), decode.default_workers()
    print(f"{platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    main_set = generate(root / f"jpeg-500x375-{args.n}", args.n, "500x375", seed=0)
    results: dict = {"cores": cores, "size": args.size, "sets": {}}
    sets = {"500x375 JPEG": main_set}
    if args.mixed:
        sets["mixed"] = generate(root / f"mixed-{args.mixed}", args.mixed, "mixed", seed=1)
    for name, folder in sets.items():
        print(f"{name}: harness vs torchvision ImageFolder + DataLoader(num_workers={cores})", flush=True)
        results["sets"][name] = compare(folder, args.size, args.rounds, cores)
    if args.decoders:
        large = generate(root / "jpeg-1600x1200-40", 40, "1600x1200", seed=2)
        print("decoders (one process, one torch thread):", flush=True)
        results["decoders"] = decoder_table({"500x375 JPEG": main_set, "1600x1200 JPEG": large},
                                            args.decoders, args.size)
        print("serial / parallel threshold:", flush=True)
        results["threshold"] = threshold_table(main_set, args.size, cores)
    results["load_average_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
