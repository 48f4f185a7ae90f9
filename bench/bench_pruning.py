#!/usr/bin/env python
"""Would a pruner have pruned the right trials? Run a study without pruning, record every
trial's per-epoch val accuracy, then replay pruners' decisions on the recorded values.

    python bench/bench_pruning.py run STUDY.yaml [--trials N] [--epochs E] [--strategy S ...]
        [--space STRATEGY.PARAM=YAML ...] [--sampler random|tpe|gp] [--workspace DIR] [--json OUT]
    python bench/bench_pruning.py replay RECORD.json [--orders K]
    python bench/bench_pruning.py storage URL STUDY_NAME [--strategy S ...] [--json OUT] [--val-images N]

`run` sweeps STUDY.yaml with `pruner: none` (the overrides applied; the study file the sweep
ran is kept in the workspace, default /tmp/bench-pruning-<study>), saves the record (`--json`,
default bench/pruning-<study>.json), then replays. Optuna records a trial's intermediate
values (`trial.report`) with any pruner, the NopPruner included, so the record is what a
pruned sweep would have seen.
`replay` replays a saved record without training. `storage` reads an existing Optuna
storage (a measured sweep is not lost), saves the record and replays it.

The replay (harness.sweep.pruning.replay) runs the trials one after another in trial number
order, each reporting its recorded values until the pruner stops it; with a random sampler
the trials' parameters do not depend on what was pruned, so the replay is what a pruned
sweep would have done (a TPE sweep would have drawn other trials after a pruned one).
`--orders K` also replays K random orders of the same trials (seeded) and prints the mean.
`--pruners a,b` picks from PRUNERS below.

Measured (README, "Pruning"): bench/pruning-quickstart.json from
    OMP_NUM_THREADS=1 python bench/bench_pruning.py run bench/pruning-quickstart.yaml --orders 50
and bench/pruning-imagenet-transfer.json from
    OMP_NUM_THREADS=1 python bench/bench_pruning.py run studies/imagenet-transfer.yaml --strategy naive
        --strategy two_phase --trials 16 --sampler random --json bench/pruning-imagenet-transfer.json --orders 50

Printed per strategy: Spearman rank correlation of each epoch's value with the final value
(all trials; and at each annealed point, within the trials of one stage layout); then per
pruner: trials pruned, epochs saved, whether the top 3 trials (by final value) survive, and
per value of each int or choice hyperparameter its pruning rate next to its mean final value.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import yaml  # noqa: E402

from harness.sweep.pruning import (LAYOUT_ATTR, N_ATTR, LayoutPruner, Record, annealed_prefix,  # noqa: E402
                                   records_of, replay, spearman)

PRUNERS: dict[str, Callable[[int, int], optuna.pruners.BasePruner]] = {
    # name -> (epochs, val images) -> a fresh pruner
    "median": lambda e, n: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),   # `pruner: median`
    "median-late": lambda e, n: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=e - 1),
    "hyperband": lambda e, n: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=e),
    "layout": lambda e, n: LayoutPruner(default_n=n),              # as `pruner: layout`: z 2, 3 peers
    "layout-z1": lambda e, n: LayoutPruner(z=1.0, default_n=n),
    "layout-z0": lambda e, n: LayoutPruner(z=0.0, default_n=n),
    "layout-peers2": lambda e, n: LayoutPruner(min_peers=2, default_n=n),
    # mid-stage values too, from epoch 2 (3), among trials with the same stages so far
    "layout-mid2": lambda e, n: LayoutPruner(mid_stage_from=2, default_n=n),
    "layout-mid2-z1": lambda e, n: LayoutPruner(z=1.0, mid_stage_from=2, default_n=n),
    "layout-mid3": lambda e, n: LayoutPruner(mid_stage_from=3, default_n=n),
}


# --- recording -------------------------------------------------------------------------------

def study_with_overrides(path: Path, args: argparse.Namespace) -> dict:
    d = yaml.safe_load(path.read_text())
    if isinstance(d.get("recipe"), str):   # a path relative to the study file: make it absolute
        rp = Path(d["recipe"])
        d["recipe"] = str(rp if rp.is_absolute() or rp.exists() else (path.parent / rp).resolve())
    d["pruner"] = "none"
    if args.trials:
        d["trials"] = args.trials
    if args.epochs:
        d["budget"] = {"epochs": args.epochs}
    if args.sampler:
        d["sampler"] = args.sampler
    if args.strategy:
        d["strategies"] = {s: d["strategies"].get(s) for s in args.strategy}
    for item in args.space or []:
        key, _, value = item.partition("=")
        strategy, _, param = key.partition(".")
        space = d["strategies"].get(strategy) or {}
        space[param] = yaml.safe_load(value)
        d["strategies"][strategy] = space
    return d


def record_study(ostudies: dict[str, optuna.Study], epochs: int, meta: dict[str, Any]) -> dict:
    out = {**meta, "epochs": epochs, "strategies": {}}
    for s, ostudy in ostudies.items():
        trials = {t.number: t for t in ostudy.get_trials(deepcopy=False)}
        recs = records_of(ostudy)
        dists = {}
        for t in trials.values():
            for name, dist in t.distributions.items():
                dists[name] = ("int" if isinstance(dist, optuna.distributions.IntDistribution) else
                               "choice" if isinstance(dist, optuna.distributions.CategoricalDistribution) else "float")
        out["strategies"][s] = {
            "distributions": dists,
            "trials": [{"number": r.number, "values": {str(k): v for k, v in sorted(r.values.items())},
                        "final": r.final, "params": r.params, "user_attrs": r.user_attrs,
                        "seconds": trials[r.number].user_attrs.get("seconds")} for r in recs]}
    return out


def cmd_run(args: argparse.Namespace) -> dict:
    from harness.sweep.run import run_sweep
    from harness.sweep.study import load_study
    from harness.workspace import Stores

    d = study_with_overrides(Path(args.study), args)
    ws = Path(args.workspace or f"/tmp/bench-pruning-{d['name']}").resolve()
    ws.mkdir(parents=True, exist_ok=True)
    study_path = ws / "study.yaml"
    study_path.write_text(yaml.safe_dump(d, sort_keys=False))
    study = load_study(study_path)
    storage = f"sqlite:///{ws / 'optuna.db'}"
    stores = Stores.resolve(ws, storage, f"sqlite:///{ws / 'mlflow.db'}")
    import torch
    print(f"sweeping {args.study} as {study_path} (pruner none, {study.config.trials} trials x "
          f"{study.config.budget.epochs} epochs, sampler {study.config.sampler}, "
          f"torch threads {torch.get_num_threads()}); storage {storage}", flush=True)
    started = time.perf_counter()
    run_sweep(study, stores, study.select(), echo=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started
    ostudies = {s: optuna.load_study(study_name=f"{study.name}/{s}", storage=storage) for s in study.strategies}
    rec = record_study(ostudies, study.config.budget.epochs,
                       {"study": study.name, "source": str(args.study), "study_file": d,
                        "sweep_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads()})
    print(f"sweep took {seconds:.0f} s", flush=True)
    return rec


def cmd_storage(args: argparse.Namespace) -> dict:
    from harness.sweep import storage as st
    store = st.open_storage(args.url)
    names = [s.study_name for s in optuna.get_all_study_summaries(store)
             if s.study_name.startswith(args.study_name + "/")]
    strategies = [n.split("/", 1)[1] for n in names]
    if args.strategy:
        strategies = [s for s in strategies if s in args.strategy]
    ostudies = {s: optuna.load_study(study_name=f"{args.study_name}/{s}", storage=store) for s in strategies}
    epochs = max((max(t.intermediate_values) for o in ostudies.values()
                  for t in o.get_trials(deepcopy=False) if t.intermediate_values), default=0)
    rec = record_study(ostudies, epochs, {"study": args.study_name, "source": "storage"})
    if args.val_images:
        for srec in rec["strategies"].values():
            for t in srec["trials"]:
                t["user_attrs"].setdefault(N_ATTR, args.val_images)
    return rec


# --- replaying -------------------------------------------------------------------------------

def records(srec: dict) -> list[Record]:
    return [Record(t["number"], {int(k): v for k, v in t["values"].items()}, t["final"], t["params"], t["user_attrs"])
            for t in srec["trials"]]


def val_images(rec: dict) -> int | None:
    ns = {t["user_attrs"].get(N_ATTR) for s in rec["strategies"].values() for t in s["trials"]} - {None}
    return ns.pop() if len(ns) == 1 else None


def fmt(x: float) -> str:
    return "  nan" if x != x else f"{x:+.2f}"


def correlations(recs: list[Record], epochs: int) -> list[str]:
    done = [r for r in recs if r.final is not None and len(r.values) == epochs]
    lines = ["  Spearman(value at epoch e, final), all trials: " +
             "  ".join(f"e{e} {fmt(spearman([r.values[e] for r in done], [r.final for r in done]))}"
                       for e in range(1, epochs))]
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in done:
        layout = tuple(tuple(s) for s in r.user_attrs.get(LAYOUT_ATTR, ()))
        end = 0
        for st in layout[:-1]:
            end += st[0]
            groups[(end, annealed_prefix(layout, end))].append(r)
    for (end, prefix), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        lines.append(f"  annealed point epoch {end}, stages so far {list(prefix)}: n={len(rs)}, Spearman "
                     f"{fmt(spearman([r.values[end] for r in rs], [r.final for r in rs]))}")
    return lines


def report_strategy(name: str, srec: dict, epochs: int, n: int | None, pruners: list[str], orders: int,
                    study_name: str) -> dict:
    recs = records(srec)
    done = [r for r in recs if r.final is not None]
    ranked = sorted(done, key=lambda r: (-r.final, r.number))
    top3 = [r.number for r in ranked[:3]]
    print(f"\n== {name}: {len(recs)} trials ({len(done)} complete), best {ranked[0].final if ranked else '-'}; "
          f"top 3 (trial: final) " + ", ".join(f"{r.number}: {r.final:.3f}" for r in ranked[:3]))
    for line in correlations(recs, epochs):
        print(line)
    discrete = [p for p, kind in srec["distributions"].items() if kind in ("int", "choice")]
    by_value: dict[str, dict[Any, list[Record]]] = {p: defaultdict(list) for p in discrete}
    for r in recs:
        for p in discrete:
            if p in r.params:
                by_value[p][r.params[p]].append(r)
    out = {}
    for pname in pruners:
        res = replay(recs, PRUNERS[pname](epochs, n), study_name=study_name)
        survive = [num for num in top3 if res.pruned_at.get(num) is None]
        lost = [f"#{k + 1} (trial {num}, epoch {res.pruned_at[num]})" for k, num in enumerate(top3)
                if res.pruned_at.get(num) is not None]
        line = (f"  {pname:14s} pruned {res.n_pruned:2d}/{len(recs)}  epochs saved {100 * res.saved:5.1f}% "
                f"({res.epochs_total - res.epochs_run}/{res.epochs_total})  top 3 survive: "
                f"{'yes' if len(survive) == len(top3) else 'NO, lost ' + ', '.join(lost)}")
        extra = {}
        if orders:
            rng = random.Random(0)
            saves, oks = [], 0
            for _ in range(orders):
                order = [r.number for r in recs]
                rng.shuffle(order)
                rr = replay(recs, PRUNERS[pname](epochs, n), order=order, study_name=study_name)
                saves.append(rr.saved)
                oks += all(rr.pruned_at.get(num) is None for num in top3)
            line += f"  | {orders} random orders: saved {100 * statistics.fmean(saves):.1f}%, top 3 survive {oks}/{orders}"
            extra = {"orders_saved_mean": statistics.fmean(saves), "orders_top3_survive": oks / orders}
        print(line)
        for p in discrete:
            parts = []
            for v in sorted(by_value[p]):
                rs = by_value[p][v]
                finals = [r.final for r in rs if r.final is not None]
                k = sum(res.pruned_at.get(r.number) is not None for r in rs)
                parts.append(f"{v}: pruned {k}/{len(rs)}, mean final {statistics.fmean(finals):.3f}"
                             if finals else f"{v}: pruned {k}/{len(rs)}")
            print(f"  {'':14s}   {p}: " + "; ".join(parts))
        out[pname] = {"pruned_at": res.pruned_at, "epochs_run": res.epochs_run, "epochs_total": res.epochs_total,
                      "saved": res.saved, "top3_survive": len(survive) == len(top3), **extra}
    return out


def cmd_replay(rec: dict, pruners: list[str], orders: int) -> dict:
    epochs, n = rec["epochs"], val_images(rec)
    print(f"study {rec['study']} ({rec.get('source')}): {epochs} epochs, val images {n}"
          + (f", sweep {rec['sweep_seconds']:.0f} s" if rec.get("sweep_seconds") else ""))
    results = {s: report_strategy(s, srec, epochs, n, pruners, orders, f"{rec['study']}/{s}")
               for s, srec in rec["strategies"].items()}
    print("\n== all strategies: epochs saved")
    for p in pruners:
        run = sum(results[s][p]["epochs_run"] for s in results)
        total = sum(results[s][p]["epochs_total"] for s in results)
        ok = all(results[s][p]["top3_survive"] for s in results)
        print(f"  {p:14s} {100 * (1 - run / total):5.1f}% ({total - run}/{total})  top 3 of every strategy survive: "
              f"{'yes' if ok else 'no'}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="sweep without pruning, record, replay")
    r.add_argument("study")
    r.add_argument("--trials", type=int)
    r.add_argument("--epochs", type=int)
    r.add_argument("--strategy", action="append")
    r.add_argument("--space", action="append", help="STRATEGY.PARAM=YAML, e.g. 'two_phase.freeze_epochs={low: 1, high: 3}'")
    r.add_argument("--sampler", choices=("random", "tpe", "gp"))
    r.add_argument("--workspace")
    r.add_argument("--json")
    p = sub.add_parser("replay", help="replay a saved record")
    p.add_argument("record")
    s = sub.add_parser("storage", help="record an existing Optuna storage, then replay")
    s.add_argument("url")
    s.add_argument("study_name")
    s.add_argument("--strategy", action="append")
    s.add_argument("--json")
    s.add_argument("--val-images", type=int, help="val images, for trials that did not record them")
    for q in (r, p, s):
        q.add_argument("--pruners", default=",".join(PRUNERS), help=f"comma-separated, of {', '.join(PRUNERS)}")
        q.add_argument("--orders", type=int, default=0, help="also replay K random trial orders")
    args = ap.parse_args(argv)
    pruners = [x for x in args.pruners.split(",") if x]
    unknown = [x for x in pruners if x not in PRUNERS]
    if unknown:
        ap.error(f"--pruners: unknown {unknown[0]} (known: {', '.join(PRUNERS)})")
    if args.cmd == "replay":
        rec = json.loads(Path(args.record).read_text())
    else:
        rec = cmd_run(args) if args.cmd == "run" else cmd_storage(args)
        name = rec["study"].replace("/", "-")
        out = Path(args.json or ROOT / "bench" / f"{name if name.startswith('pruning-') else 'pruning-' + name}.json")
        out.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"recorded {out}")
    cmd_replay(rec, pruners, args.orders)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
