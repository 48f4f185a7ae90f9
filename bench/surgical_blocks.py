#!/usr/bin/env python
"""Surgical fine-tuning (Lee et al. 2023), one body group at a time: which group wins in
distribution and which under the ImageNet-C corruptions?

    python bench/surgical_blocks.py [--workspace /tmp/surgical-blocks] [--trials 4]

studies/methods.yaml's data, model and budget, its `surgical` strategy with `block` fixed to
each body group in turn (0: the stem and early blocks, 1: the later blocks, with the study's
3 layer groups) and the learning rate searched as there; each block is its own study
(`surgical-block<k>`: a study holds one entry per strategy), swept with `harness sweep`
and scored with `harness compare` (3 seeds on the test split; the study's corruptions on the
first `shift_per_class` test images of each class, 100 there). Prints one table: test accuracy and accuracy under
each corruption, per block, mean over the seeds; the reports stay in the workspace
(reports/surgical-block<k>/compare.csv, compare.png).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def study_for(base: dict, block: int, trials: int) -> dict:
    """methods.yaml with one strategy, surgical at `block`; its compare without WiSE-FT."""
    return {**base, "name": f"surgical-block{block}", "trials": trials,
            "strategies": {"surgical": {**base["strategies"]["surgical"], "block": block}},
            "compare": {k: v for k, v in base["compare"].items() if k != "wise_ft"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", default="/tmp/surgical-blocks")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "studies" / "methods.yaml").read_text())
    ws = Path(args.workspace)
    ws.mkdir(parents=True, exist_ok=True)
    harness = [sys.executable, "-m", "harness"]
    rows = []
    for block in args.blocks:
        path = ws / f"surgical-block{block}.yaml"
        path.write_text(yaml.safe_dump(study_for(base, block, args.trials), sort_keys=False))
        for cmd in ("sweep", "compare"):
            print(f"== block {block}: harness {cmd}", flush=True)
            subprocess.run([*harness, cmd, str(path), "--workspace", str(ws / "ws")], cwd=ROOT, check=True)
        table = pd.read_csv(ws / "ws" / "reports" / f"surgical-block{block}" / "compare.csv")
        rows.append(table.assign(block=block))
    result = pd.concat(rows, ignore_index=True)
    result.to_csv(ws / "surgical_blocks.csv", index=False)
    print(result.drop(columns=[c for c in result.columns if c.endswith("_std")]).to_string(index=False))
    print(f"wrote {ws / 'surgical_blocks.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
