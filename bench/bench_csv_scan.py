#!/usr/bin/env python
"""What reading labels from a CSV costs before decoding, against the same images as an image folder.

    python bench/bench_csv_scan.py [--classes 10] [--per-class 1000] [--rounds 5] [--json OUT]

Writes classes x per-class tiny PNGs (8x8) into a temporary folder laid out as class folders,
plus a labels.csv listing every image (shuffled rows). Then, alternating within each round:

- folder: `folders.scan_imagefolder` + `folders.fingerprint` (what `open_source` does for an
  image folder: the cache identity of the layout);
- csv:    `csvfile.scan_csv` + `csvfile.csv_identity` (the same for `data.dataset: csv`: the
  CSV parsed, every listed file checked, duplicates refused, the CSV hashed, the fingerprint);
- decode: `folders.decode_imagefolder` of the layout at 32 px once (what a cache miss adds),
  to put the scans in proportion.

Reports the median seconds of each and the ratios csv / folder and csv / decode. Nothing in
harness/ is patched. Timing with time.perf_counter only.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from PIL import Image  # noqa: E402

from harness.engine.data import csvfile, folders  # noqa: E402
from harness.engine.recipe import DataConfig  # noqa: E402


def make_dataset(root: Path, n_classes: int, per_class: int) -> Path:
    """Class folders of 8x8 PNGs and a labels.csv listing them in shuffled order."""
    lines = []
    for c in range(n_classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (c, i % 256, i // 256)).save(root / f"class{c}" / f"{i}.png")
            lines.append(f"class{c}/{i}.png,class{c}")
    random.Random(0).shuffle(lines)
    (root / "labels.csv").write_text("file,label\n" + "\n".join(lines) + "\n")
    return root / "labels.csv"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        csv_file = make_dataset(Path(tmp) / "imgs", args.classes, args.per_class)
        cfg = DataConfig.model_validate({"dataset": "csv", "csv": str(csv_file)})
        folder_s, csv_s = [], []
        for r in range(args.rounds):   # alternate which side goes first
            sides = [("folder", folder_s, lambda: folders.fingerprint(folders.scan_imagefolder(csv_file.parent)[0])),
                     ("csv", csv_s, lambda: csvfile.csv_identity(csv_file, csvfile.scan_csv(cfg)[0]))]
            for _, times, fn in (sides if r % 2 == 0 else sides[::-1]):
                times.append(seconds(fn))
        layout, names = csvfile.scan_csv(cfg)
        decode_s = seconds(lambda: folders.decode_imagefolder(layout, names, 32))
    out = {"images": args.classes * args.per_class, "rounds": args.rounds,
           "folder_scan_s": statistics.median(folder_s), "csv_scan_s": statistics.median(csv_s),
           "decode_32px_s": decode_s}
    out["ratio_csv_over_folder"] = out["csv_scan_s"] / out["folder_scan_s"]
    out["ratio_csv_over_decode"] = out["csv_scan_s"] / decode_s
    for key, value in out.items():
        print(f"{key:24s} {value:.3f}" if isinstance(value, float) else f"{key:24s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
