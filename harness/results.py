"""What a sweep found: status per strategy and the best recipe export (compare is harness/compare.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import yaml

from harness.engine.files import write_text_atomic
from harness.engine.recipe import Recipe
from harness.errors import HarnessError
from harness.sweep.optuna_studies import best_trial, count_trials, load_ostudy
from harness.sweep.space import on_boundary
from harness.sweep.study import Study
from harness.workspace import Stores


def status_rows(study: Study, stores: Stores) -> list[dict[str, Any]]:
    """One row per strategy: trial counts, best value and params, params on a range edge."""
    url = stores.storage
    rows = []
    for strategy in study.strategies:
        ostudy = load_ostudy(study, strategy, url)
        row: dict[str, Any] = {"strategy": strategy, "complete": 0, "pruned": 0, "failed": 0,
                               "lost": 0, "running": 0, "best": None, "best_params": {}, "on_boundary": []}
        if ostudy is not None:
            c = count_trials(ostudy)
            row.update(complete=c.complete, pruned=c.pruned, failed=c.failed, lost=c.errored,
                       running=c.running)
            best = best_trial(ostudy)
            if best is not None:
                row["best"] = best.value
                row["best_params"] = best.params
                space = study.spaces[strategy]
                row["on_boundary"] = [f"{k} ({edge})" for k, v in best.params.items()
                                      if (edge := on_boundary(space[k], v))]
        rows.append(row)
    return rows


def format_status(study: Study, rows: list[dict[str, Any]], trials: int | None = None) -> str:
    metric = study.config.metric
    lines = [f"study {study.name}: {trials or study.config.trials} trials per strategy, "
             f"{study.config.budget.epochs} epochs each, metric {metric}",
             f"{'strategy':<15} {'complete':>8} {'pruned':>6} {'failed':>6} {'lost':>4} {'running':>7} "
             f"{'best':>7}  best params / on boundary"]
    for r in rows:
        best = "-" if r["best"] is None else f"{r['best']:.4f}"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in r["best_params"].items())
        edge = f"  [on boundary: {', '.join(r['on_boundary'])}]" if r["on_boundary"] else ""
        lines.append(f"{r['strategy']:<15} {r['complete']:>8} {r['pruned']:>6} {r['failed']:>6} "
                     f"{r['lost']:>4} {r['running']:>7} {best:>7}  {params}{edge}")
    return "\n".join(lines)


def best_of(study: Study, stores: Stores, strategy: str | None = None) -> tuple[str, optuna.trial.FrozenTrial]:
    """(strategy, best trial) of one strategy, or of the best strategy overall."""
    found = []
    for s in study.select([strategy] if strategy else None).strategies:
        ostudy = load_ostudy(study, s, stores.storage)
        best = best_trial(ostudy) if ostudy else None
        if best is not None:
            found.append((s, best))
    if not found:
        raise HarnessError(f"{study.source}: no completed trial for {strategy or 'any strategy'} yet; "
                           f"run `harness sweep {study.source}` first")
    sign = 1 if study.direction == "maximize" else -1
    return max(found, key=lambda sb: sign * sb[1].value)


def trial_recipe(trial: optuna.trial.FrozenTrial) -> Recipe:
    return Recipe.from_dict(yaml.safe_load(trial.user_attrs["recipe"]), source=f"trial {trial.number}")


def export_best(study: Study, stores: Stores, strategy: str | None = None,
                output: str | Path | None = None) -> tuple[Path, str, optuna.trial.FrozenTrial]:
    """Write the best trial's complete recipe; `harness train` on it replays the trial."""
    strategy, trial = best_of(study, stores, strategy)
    recipe = trial_recipe(trial)
    path = Path(output) if output else stores.export(study.name, strategy)
    header = (f"# Best recipe of study '{study.name}', strategy {strategy}, trial {trial.number}: "
              f"{study.config.metric} = {trial.value:.6f}\n"
              f"# hyperparameters: {', '.join(f'{k}={v}' for k, v in trial.params.items())}\n"
              f"# replay: harness train {path}\n")
    write_text_atomic(path, header + recipe.to_yaml())
    return path, strategy, trial
