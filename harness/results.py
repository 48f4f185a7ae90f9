"""What a sweep found: status per strategy, the best recipe export, and the held-out comparison."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml

from harness.engine.recipe import Recipe
from harness.errors import HarnessError
from harness.stores import Stores
from harness.sweep.ostudies import best_trial, count_trials, load_ostudy
from harness.sweep.space import on_boundary
from harness.sweep.study import Study


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
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best recipe of study '{study.name}', strategy {strategy}, trial {trial.number}: "
              f"{study.config.metric} = {trial.value:.6f}\n"
              f"# hyperparameters: {', '.join(f'{k}={v}' for k, v in trial.params.items())}\n"
              f"# replay: harness train {path}\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + recipe.to_yaml())
    tmp.replace(path)
    return path, strategy, trial


# --- compare ----------------------------------------------------------------------------

@dataclass
class StrategyResult:
    strategy: str
    trials: int
    best_val: float
    mean_trial_s: float
    test: list[float] = field(default_factory=list)     # one per seed, seeds 0..K-1
    lr_result: Any = None                               # the seed-0 Result, for its LR curves

    @property
    def mean(self) -> float:
        return sum(self.test) / len(self.test)

    @property
    def std(self) -> float:
        if len(self.test) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in self.test) / (len(self.test) - 1))

    def ci95(self) -> tuple[float, float]:
        from scipy import stats
        if len(self.test) < 2:
            return self.mean, self.mean
        half = stats.t.ppf(0.975, len(self.test) - 1) * self.std / math.sqrt(len(self.test))
        return self.mean - half, self.mean + half


@dataclass
class Comparison:
    rows: list[StrategyResult]
    winner: str
    runner_up: str | None
    p_value: float | None        # paired t-test by seed, winner vs runner-up

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < 0.05

    def verdict(self) -> str:
        if self.runner_up is None:
            return f"{self.winner} is the only strategy with a completed trial."
        if self.p_value is None:
            return f"{self.winner} leads {self.runner_up}; more than one seed is needed to test the lead."
        word = "significant" if self.significant else "not significant"
        return (f"{self.winner} wins; its lead over {self.runner_up} is {word} "
                f"(paired t-test over {len(self.rows[0].test)} seeds, p = {self.p_value:.3g}).")


def compare(study: Study, stores: Stores, seeds: int | None = None,
            echo: Callable[[str], None] = print) -> Comparison:
    """Re-run each strategy's best recipe with seeds 0..K-1 and score it on the test split."""
    from harness.engine.train import fine_tune

    url, workspace = stores.storage, stores.workspace
    k = seeds or study.config.compare.seeds
    rows = []
    for strategy in study.strategies:
        ostudy = load_ostudy(study, strategy, url)
        best = best_trial(ostudy) if ostudy else None
        if best is None:
            echo(f"[{strategy}] no completed trial; left out of the comparison")
            continue
        c = count_trials(ostudy)
        times = [t.user_attrs["seconds"] for t in ostudy.get_trials(deepcopy=False) if "seconds" in t.user_attrs]
        row = StrategyResult(strategy, c.done, best.value, sum(times) / max(len(times), 1))
        recipe = trial_recipe(best)
        for seed in range(k):
            result = fine_tune(recipe.replace(seed=seed), workspace=workspace)
            if not result.ok:
                echo(f"[{strategy}] seed {seed}: {result.status}; scored as 0")
            row.test.append(result.test_accuracy or 0.0)
            if seed == 0:
                result.model = None
                row.lr_result = result
            echo(f"[{strategy}] seed {seed}: test accuracy {row.test[-1]:.4f}")
        rows.append(row)
    if not rows:
        raise HarnessError(f"{study.source}: no strategy has a completed trial; run `harness sweep` first")
    rows.sort(key=lambda r: r.mean, reverse=True)
    p = None
    if len(rows) > 1 and k > 1:
        from scipy import stats
        diffs = [a - b for a, b in zip(rows[0].test, rows[1].test)]
        p = 1.0 if all(d == 0 for d in diffs) else float(stats.ttest_rel(rows[0].test, rows[1].test).pvalue)
    return Comparison(rows, rows[0].strategy, rows[1].strategy if len(rows) > 1 else None, p)


def comparison_table(cmp: Comparison) -> "Any":
    import pandas as pd
    records = []
    for r in cmp.rows:
        lo, hi = r.ci95()
        records.append({"strategy": r.strategy, "trials": r.trials, "best_val_accuracy": round(r.best_val, 4),
                        "test_accuracy_mean": round(r.mean, 4), "test_accuracy_std": round(r.std, 4),
                        "test_ci95_low": round(lo, 4), "test_ci95_high": round(hi, 4),
                        "seeds": len(r.test), "mean_trial_seconds": round(r.mean_trial_s, 1)})
    return pd.DataFrame.from_records(records)


def markdown_table(df) -> str:
    """A GitHub-style table without the optional `tabulate` dependency."""
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def save_comparison(study: Study, cmp: Comparison, stores: Stores) -> Path:
    """Write compare.csv / compare.md / compare.png under WORKSPACE/reports/<study>/ and log
    them, with one metric per strategy and seed, to a `compare` run in the study's experiment."""
    import matplotlib.pyplot as plt

    from harness.report import compare_figure
    from harness.tracking import Tracking

    out = stores.reports(study.name)
    out.mkdir(parents=True, exist_ok=True)
    df = comparison_table(cmp)
    df.to_csv(out / "compare.csv", index=False)
    (out / "compare.md").write_text(f"# Study {study.name}: strategies on the held-out test split\n\n"
                                    f"{markdown_table(df)}\n\n{cmp.verdict()}\n")
    fig = compare_figure(cmp)
    fig.savefig(out / "compare.png", dpi=110)
    tracking = Tracking(stores.tracking_uri, stores.workspace)
    with tracking.run(study.name, "compare", tags={"harness.kind": "compare", "winner": cmp.winner}) as run:
        for r in cmp.rows:
            run.log_steps(0, {f"test_accuracy/{r.strategy}": r.test})
            run.log_epoch(0, {f"test_accuracy_mean/{r.strategy}": r.mean})
        if cmp.p_value is not None:
            run.log_epoch(0, {"p_value": cmp.p_value})
        run.set_tags({"verdict": cmp.verdict()})
        for name in ("compare.csv", "compare.md"):
            run.log_file(out / name)
        run.log_figure(fig, "compare.png")
    plt.close(fig)
    return out
