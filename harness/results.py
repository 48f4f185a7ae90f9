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
from harness.sweep.pruning import NOISE_Z, PROPORTIONS, binomial_margin, trial_noise_images
from harness.sweep.space import on_boundary
from harness.sweep.study import Study
from harness.workspace import Stores


def status_rows(study: Study, stores: Stores) -> list[dict[str, Any]]:
    """One row per strategy: trial counts, best value and params, params on a range edge, the
    completed trials' values (best first) and the images the metric's noise is taken over."""
    url = stores.storage
    rows = []
    for strategy in study.strategies:
        ostudy = load_ostudy(study, strategy, url)
        row: dict[str, Any] = {"strategy": strategy, "complete": 0, "pruned": 0, "failed": 0,
                               "lost": 0, "running": 0, "best": None, "best_params": {}, "on_boundary": [],
                               "values": [], "noise_n": None}
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
                done = [t.value for t in ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
                row["values"] = sorted(done, reverse=study.direction == "maximize")
                row["noise_n"] = trial_noise_images(best, study.config.metric)
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
    return "\n".join(lines + noise_lines(study, rows))


def noise_lines(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """Whether the best trials of each strategy, and the strategies' bests, are further apart
    than NOISE_Z binomial standard errors of the metric on the val set (harness/sweep/
    pruning.py), in images: a ranking inside that margin is the val set's noise."""
    metric = study.config.metric
    if metric not in PROPORTIONS:
        return [f"noise: {metric} has no binomial standard error; how far apart the trials are is not judged"]
    exact = metric == "val/accuracy"   # other metrics: images of an equally good balanced val set
    out = []
    for r in rows:
        if len(r["values"]) >= 2 and r["noise_n"]:
            out.append(_apart(f"[{r['strategy']}] best trials", r["values"], r["noise_n"], exact))
    bests = sorted(((r["best"], r["strategy"], r["noise_n"]) for r in rows if r["best"] is not None and r["noise_n"]),
                   key=lambda b: b[0], reverse=study.direction == "maximize")   # ties in the study's order
    if len(bests) >= 2:
        out.append(_apart("[strategies] bests", [v for v, _, _ in bests], bests[0][2], exact,
                          [s for _, s, _ in bests]))
    if out:
        n = bests[0][2] if bests else next(r["noise_n"] for r in rows if r["noise_n"])
        size = f"{n:.0f} val images" if exact else f"an effective {n:.1f} val images (C^2 / sum of 1/n_class)"
        out.insert(0, f"noise: {NOISE_Z:g} binomial standard errors of {metric} on {size}")
    return out


def _apart(what: str, values: list[float], n: float, exact: bool, names: list[str] | None = None) -> str:
    """One line: the values within NOISE_Z standard errors (at the best's value) of the best,
    and how many images separate them; or by how much the best leads the next."""
    best = values[0]
    margin = binomial_margin(best, n, NOISE_Z)
    tied = [v for v in values if abs(best - v) <= margin + 1e-12]
    label = (lambda i: f"{names[i]} {values[i]:.4f}") if names else (lambda i: f"{values[i]:.4f}")
    noise = f"{NOISE_Z:g} SE = {margin * n:.1f} images"
    if len(tied) >= 2:
        shown = ", ".join(label(i) for i in range(len(tied)))
        return (f"  {what}: {len(tied)} within noise ({shown}), {_images(abs(best - tied[-1]) * n, exact)} "
                f"apart, {noise}: their order is not evidence")
    return (f"  {what}: {label(0)} leads the next ({label(1)}) by {_images(abs(best - values[1]) * n, exact)}, "
            f"beyond {noise}")


def _images(x: float, exact: bool) -> str:
    if exact:
        k = round(x)
        return f"{k} image" + ("" if k == 1 else "s")
    return f"about {x:.1f} images"


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
