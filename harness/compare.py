"""`harness compare`: each strategy's best recipe over seeds, scored on the held-out test
split (accuracy, balanced accuracy, macro F1 and a confusion matrix per seed) and under
shift (accuracy); ranked and every pair tested (harness/stats.py) on the study's metric;
`--seeds auto` adds seeds until the leading pair is separated; the winner logged as an
MLflow model.

Seed k of compare is the trial's own seed + k. Seed 0 is the very run the sweep made, so
its kept model (harness/sweep/keep.py) is scored instead of trained again; the others
train the recipe from scratch with their seed.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from harness import stats
from harness.engine import wise_ft
from harness.engine import data as data_mod
from harness.engine.data.resize import stored_size
from harness.engine.metrics import NAMES as SCORE_NAMES
from harness.engine.recipe import Recipe
from harness.engine.shift import Corruption, accuracy, corrupted_batches, corruptions, per_class
from harness.errors import HarnessError
from harness.results import trial_recipe
from harness.sweep.keep import fetch as fetch_kept
from harness.sweep.keep import load_kept
from harness.sweep.optuna_studies import best_trial, count_trials, load_ostudy
from harness.sweep.study import Study
from harness.tracking import Tracking
from harness.workspace import Stores


@dataclass(frozen=True)
class ComparePlan:
    """What compare will do, checked before anything is written: its seeds, its shifts."""
    first: int                              # seeds run before the first look
    most: int                               # --seeds auto: at most this many
    auto: bool
    corruptions: tuple[Corruption, ...] = ()
    shift_folder: data_mod.Split | None = None
    shift_per_class: int | None = None      # corrupt only the first N test images per class
    wise_ft: tuple[float, ...] = ()         # WiSE-FT's alphas, ascending (harness/engine/wise_ft.py); () = off

    @property
    def looks(self) -> int:
        """The looks --seeds auto may take (one per seed from `first` to `most`)."""
        return self.most - self.first + 1 if self.auto else 1

    @property
    def shift_labels(self) -> list[str]:
        return ([c.label for c in self.corruptions]) + (["shift_folder"] if self.shift_folder is not None else [])


def plan_compare(study: Study, seeds: int | str | None = None) -> ComparePlan:
    """--seeds (a number, `auto`, or the study's compare.seeds) and the study's shifts; a bad
    one is one line naming the field, before anything is written."""
    cfg = study.config.compare
    if seeds == "auto":
        if cfg.max_seeds is None:
            raise HarnessError(f"{study.source}: compare.max_seeds: --seeds auto needs a maximum; "
                               f"set compare.max_seeds in the study file")
        if cfg.seeds < 2:
            raise HarnessError(f"{study.source}: compare.seeds: --seeds auto starts from at least 2 seeds "
                               f"(a paired test needs 2), got {cfg.seeds}")
        first, most, auto = cfg.seeds, cfg.max_seeds, True
    else:
        first = most = int(seeds or cfg.seeds)
        auto = False
    folder = None
    root = cfg.shift_folder(Path(study.source))
    if root is not None:
        base = study.recipe_for(study.strategies[0], {}).data
        stored = stored_size(base)   # decoded as the test split is: resized, centre-cropped per batch
        folder = data_mod.load_folder(root, data_mod.class_names(base), stored, f"{study.source}: compare.shift_root")
        folder = dataclasses.replace(folder, size=base.image_size, stored=stored)
    alphas = tuple(sorted(cfg.wise_ft.alphas)) if cfg.wise_ft is not None else ()
    if alphas and study.recipe_for(study.strategies[0], {}).model.weights == "none":
        raise HarnessError(f"{study.source}: compare.wise_ft: recipe.model.weights is none, so there is no "
                           f"pretrained start model to interpolate with")
    return ComparePlan(first, most, auto, tuple(corruptions(cfg.corruptions)), folder, cfg.shift_per_class, alphas)


# --- results ----------------------------------------------------------------------------

@dataclass
class StrategyResult:
    strategy: str
    trials: int
    best_val: float
    mean_trial_s: float
    test: list[float] = field(default_factory=list)     # the study's metric on the test split, seeds 0..K-1
    metric: str = "accuracy"                            # which: a key of `scores`
    scores: dict[str, list[float]] = field(default_factory=dict)   # accuracy, balanced_accuracy, macro_f1, loss -> per seed
    confusions: list[Any] = field(default_factory=list)  # per seed: [true, predicted] counts (None: the seed failed)
    class_names: list[str] = field(default_factory=list)
    lr_result: Any = None                               # the seed-0 Result, for its LR curves
    recipe: Recipe | None = None                        # the best trial's recipe (its stages say which groups train)
    shift: dict[str, list[float]] = field(default_factory=dict)   # shift label -> accuracy per seed
    model: Any = None                                   # the seed-0 model, on the CPU
    kept: bool = False                                  # seed 0 scored the sweep's own model
    wise_ft: Any = None                                 # a wise_ft.WiseFt when compare.wise_ft is set

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test)

    @property
    def std(self) -> float:
        return statistics.stdev(self.test) if len(self.test) >= 2 else 0.0

    def ci95(self) -> tuple[float, float]:
        """The mean's 95 % t interval over the seeds (scipy's)."""
        from scipy import stats as sstats
        if len(self.test) < 2 or self.std == 0:
            return self.mean, self.mean
        lo, hi = sstats.ttest_1samp(self.test, 0.0).confidence_interval(0.95)
        return float(lo), float(hi)

    def shift_mean(self, label: str) -> float:
        return statistics.fmean(self.shift[label])

    def score_mean(self, name: str) -> float:
        """The mean over seeds of one test score ("accuracy", "macro_f1", ...)."""
        return statistics.fmean(self.scores[name]) if name in self.scores else self.mean

    def add_seed(self, score, n_classes: int) -> None:
        """One seed's test Score (step.Score); None for a failed seed, which scores 0, and
        ln(classes) in loss, a uniform guess's."""
        values = ({**score.metrics(), "loss": score.loss} if score is not None
                  else {**dict.fromkeys(SCORE_NAMES, 0.0), "loss": math.log(n_classes)})
        for name, v in values.items():
            self.scores.setdefault(name, []).append(v)
        self.test.append(values[self.metric])
        self.confusions.append(None if score is None else score.confusion.tolist())


@dataclass
class Comparison:
    rows: list[StrategyResult]                  # best mean test value of the study's metric first
    pairs: list[stats.PairTest] = field(default_factory=list)
    looks: int = 1                              # the looks --seeds auto's plan allowed
    maximize: bool = True                       # False for a loss: the lowest mean wins

    @classmethod
    def of(cls, rows: list[StrategyResult], looks: int = 1, maximize: bool = True) -> "Comparison":
        rows = sorted(rows, key=lambda r: r.mean, reverse=maximize)
        return cls(rows, stats.all_pairs({r.strategy: r.test for r in rows}, looks), looks, maximize)

    @property
    def metric(self) -> str:
        """What the rows are ranked and tested on ("accuracy", "macro_f1", "loss", ...)."""
        return self.rows[0].metric

    @property
    def winner(self) -> str:
        return self.rows[0].strategy

    @property
    def runner_up(self) -> str | None:
        return self.rows[1].strategy if len(self.rows) > 1 else None

    @property
    def leading(self) -> stats.PairTest | None:
        """The test of the winner against the runner-up."""
        return self.pairs[0] if self.pairs else None

    @property
    def p_value(self) -> float | None:
        return self.leading.p_adjusted if self.leading else None

    @property
    def significant(self) -> bool:
        return self.leading is not None and self.leading.separated

    @property
    def seeds(self) -> int:
        return len(self.rows[0].test)

    def method(self) -> str:
        parts = ["paired t-test over {} seeds".format(self.seeds)]
        if self.metric != "accuracy":
            parts[0] += f" on test {self.metric}"
        if len(self.pairs) > 1:
            parts.append(f"Holm-corrected over {len(self.pairs)} pairs")
        if self.looks > 1:
            parts.append(f"Bonferroni over {self.looks} looks")
        return ", ".join(parts)

    def seeds_needed(self) -> int | None:
        """Seeds that would separate the leading pair at the observed paired spread."""
        if self.leading is None:
            return None
        a, b = self.rows[0].test, self.rows[1].test
        return stats.seeds_to_separate([x - y for x, y in zip(a, b)], stats.ALPHA / (len(self.pairs) * self.looks))

    def verdict(self) -> str:
        if self.runner_up is None:
            return f"{self.winner} is the only strategy with a completed trial."
        if self.p_value is None:
            return f"{self.winner} leads {self.runner_up}; more than one seed is needed to test the lead."
        word = "significant" if self.significant else "not significant"
        text = (f"{self.winner} wins; its lead over {self.runner_up} is {word} "
                f"({self.method()}, p = {self.p_value:.3g})")
        if self.significant:
            return text + "."
        need = self.seeds_needed()
        if need is None:
            return text + "; they tie seed for seed, no number of seeds would separate them."
        more = (f"more than {stats.MAX_SEEDS_ESTIMATE}" if need > stats.MAX_SEEDS_ESTIMATE else f"about {need}")
        return text + f"; {more} seeds would separate them at the observed paired spread."


# --- running it ------------------------------------------------------------------------

@dataclass
class _Entry:
    row: StrategyResult
    trial: optuna.trial.FrozenTrial
    recipe: Recipe


def _entries(study: Study, stores: Stores, echo: Callable[[str], None]) -> list[_Entry]:
    out = []
    for strategy in study.strategies:
        ostudy = load_ostudy(study, strategy, stores.storage)
        best = best_trial(ostudy) if ostudy else None
        if best is None:
            echo(f"[{strategy}] no completed trial; left out of the comparison")
            continue
        times = [t.user_attrs["seconds"] for t in ostudy.get_trials(deepcopy=False) if "seconds" in t.user_attrs]
        recipe = trial_recipe(best)
        row = StrategyResult(strategy, count_trials(ostudy).done, best.value, sum(times) / max(len(times), 1),
                             metric=metric_key(study), recipe=recipe)
        out.append(_Entry(row, best, recipe))
    if not out:
        raise HarnessError(f"{study.source}: no strategy has a completed trial; run `harness sweep` first")
    return out


class _Scorer:
    """Scores one (strategy, seed): the kept model for the trial's own seed, else a fresh run."""

    def __init__(self, study: Study, stores: Stores, plan: ComparePlan, echo: Callable[[str], None]):
        self.study, self.stores, self.plan, self.echo = study, stores, plan, echo
        self._test: dict[tuple, data_mod.Split] = {}
        self._val: dict[tuple, data_mod.Split] = {}
        self._bodies: dict[tuple, dict] = {}

    def score(self, entry: _Entry, k: int) -> None:
        from harness.engine.stages import StagePlan
        from harness.engine.train import evaluate_split, fine_tune, resolve_device
        row, seed = entry.row, entry.recipe.seed + k
        recipe = entry.recipe.replace(seed=seed)
        device = resolve_device(recipe.device)
        head_at = wise_ft.head_stage(recipe) if self.plan.wise_ft else None
        kept = None
        if k == 0:   # the sweep's own model: in this workspace, or fetched from the MLflow server
            folder = self.stores.kept_models(self.study.name, row.strategy)
            fetch_kept(Tracking(self.stores.tracking_uri, self.stores.workspace),
                       entry.trial.user_attrs.get("mlflow_run_id"), folder, entry.trial.number)
            kept = load_kept(folder, entry.trial.number, recipe)
            if kept is not None and head_at is not None and kept.start_head is None:
                self.echo(f"[{row.strategy}] seed 0: the kept model has no start head for WiSE-FT "
                          f"(swept before it was kept); trained again")
                kept = None
        start = wise_ft.HeadAfter(head_at) if head_at is not None else None
        if kept is not None:
            model, result = kept.model.to(device), kept.result
            result.test_score = evaluate_split(model, self.test_split(recipe, device), 2 * recipe.data.batch_size,
                                               device)
        else:
            result = fine_tune(recipe, workspace=self.stores.workspace, plan=StagePlan(on_stage=start))
            model = result.model
            if not result.ok:
                self.echo(f"[{row.strategy}] seed {k}: {result.status}; scored as 0")
        row.class_names = list(result.class_names)
        row.add_seed(result.test_score if result.ok else None, len(result.class_names))
        shifted = self.shifted(model, recipe, device) if result.ok else {}
        for label in self.plan.shift_labels:
            row.shift.setdefault(label, []).append(shifted.get(label) or 0.0)
        wise = ""
        if self.plan.wise_ft:
            head = kept.start_head if kept is not None else (start.head(model) if start is not None else None)
            wise = self.wise_ft(row, model if result.ok else None, recipe, device, head)
        if k == 0:
            row.kept, row.model = kept is not None, model.cpu() if result.ok else None
            result.model = None
            row.lr_result = result
        where = " (the sweep's own model)" if kept is not None else ""
        extra = "".join(f", {label} {row.shift[label][-1]:.4f}" for label in self.plan.shift_labels)
        self.echo(f"[{row.strategy}] seed {k}: test accuracy {row.scores['accuracy'][-1]:.4f}, balanced "
                  f"{row.scores['balanced_accuracy'][-1]:.4f}, macro F1 {row.scores['macro_f1'][-1]:.4f}{extra}{where}")
        if wise:
            self.echo(wise)

    def wise_ft(self, row: StrategyResult, model, recipe: Recipe, device, head) -> str:
        """One seed's WiSE-FT curves (all 0 for a run that failed: its alpha is then the largest);
        the line that says what validation chose."""
        from harness.engine.train import evaluate
        alphas = self.plan.wise_ft
        row.wise_ft = row.wise_ft or wise_ft.WiseFt(alphas)
        conditions = ["val", "test", *self.plan.shift_labels]
        if model is None:
            row.wise_ft.add({c: [0.0] * len(alphas) for c in conditions})
            return ""
        bs = 2 * recipe.data.batch_size
        theta_0 = wise_ft.start_state(model, self.pretrained(recipe), head)

        def score(m) -> dict[str, float]:
            return {"test": evaluate(m, self.test_split(recipe, device), bs, device)[1],
                    **{k: v or 0.0 for k, v in self.shifted(m, recipe, device).items()}}

        def val(m) -> float:
            return evaluate(m, self.val_split(recipe, device), bs, device)[1] or 0.0

        at_ft = {"test": row.scores["accuracy"][-1], **{label: row.shift[label][-1] for label in self.plan.shift_labels}}
        curves = wise_ft.score_alphas(model, theta_0, alphas, score, at_ft, val)
        row.wise_ft.add(curves)
        i = alphas.index(row.wise_ft.chosen[-1])
        extra = "".join(f", {c} {curves[c][i]:.4f}" for c in conditions[2:])
        return (f"[{row.strategy}] seed {len(row.scores['accuracy']) - 1} WiSE-FT: alpha {alphas[i]:g} chosen on val "
                f"({curves['val'][i]:.4f}): test accuracy {curves['test'][i]:.4f}{extra}")

    def pretrained(self, recipe: Recipe) -> dict:
        """The body the recipe's weights give (built once per model)."""
        key = (recipe.model.model_dump_json(), recipe.data.model_dump_json())
        if key not in self._bodies:
            n_classes = len(data_mod.load_dataset(recipe.data, self.stores.workspace, recipe.seed).class_names)
            self._bodies[key] = wise_ft.pretrained_body(recipe, n_classes)
        return self._bodies[key]

    def val_split(self, recipe: Recipe, device) -> data_mod.Split:
        """The validation split of the seed's own run (the split is seeded)."""
        key = (recipe.data.model_dump_json(), recipe.seed, str(device))
        if key not in self._val:
            ds = data_mod.load_dataset(recipe.data, self.stores.workspace, recipe.seed)
            self._val[key] = data_mod.to_device(ds.val, device)
        return self._val[key]

    def test_split(self, recipe: Recipe, device) -> data_mod.Split:
        key = (recipe.data.model_dump_json(), str(device))
        if key not in self._test:
            ds = data_mod.load_dataset(recipe.data, self.stores.workspace, recipe.seed)
            self._test[key] = data_mod.to_device(ds.test, device)
        return self._test[key]

    def shifted(self, model, recipe: Recipe, device) -> dict[str, float | None]:
        stats_ = getattr(model, "input_stats", None)
        out: dict[str, float | None] = {}
        if self.plan.corruptions:
            test = per_class(self.test_split(recipe, device), self.plan.shift_per_class)
            for c in self.plan.corruptions:
                out[c.label] = accuracy(model, corrupted_batches(test, c, stats_, 2 * recipe.data.batch_size), device)
        if self.plan.shift_folder is not None:
            folder = data_mod.to_device(self.plan.shift_folder, device)
            out["shift_folder"] = accuracy(model, data_mod.eval_batches(folder, 2 * recipe.data.batch_size, stats_),
                                           device)
        return out


def compare(study: Study, stores: Stores, plan: ComparePlan | None = None,
            echo: Callable[[str], None] = print) -> Comparison:
    """Score each strategy's best recipe over the plan's seeds; with --seeds auto, add a seed
    to every strategy until the leading pair is separated or the plan's maximum is reached."""
    plan = plan or plan_compare(study)
    entries = _entries(study, stores, echo)
    scorer = _Scorer(study, stores, plan, echo)
    maximize = study.direction == "maximize"
    for k in range(plan.first):
        for e in entries:
            scorer.score(e, k)
    cmp = Comparison.of([e.row for e in entries], plan.looks, maximize)
    while plan.auto and len(entries) > 1 and not cmp.significant and cmp.seeds < plan.most:
        echo(f"--seeds auto: {cmp.winner} vs {cmp.runner_up} not separated after {cmp.seeds} seeds "
             f"(p = {cmp.p_value:.3g}); adding seed {cmp.seeds}")
        for e in entries:
            scorer.score(e, cmp.seeds)
        cmp = Comparison.of([e.row for e in entries], plan.looks, maximize)
    return cmp


def metric_key(study: Study) -> str:
    """The study's metric as a test score's name: val/macro_f1 -> macro_f1."""
    return study.config.metric.split("/", 1)[1]


# --- tables, picture, MLflow ---------------------------------------------------------------

def comparison_table(cmp: Comparison) -> "Any":
    """One row per strategy: the study's metric on val (best trial) and test (mean, std, 95 %
    interval over seeds), the other test scores' means, accuracy under each shift."""
    import pandas as pd

    from harness.report import wise_ft_columns
    records = []
    m = cmp.metric
    for r in cmp.rows:
        lo, hi = r.ci95()
        rec = {"strategy": r.strategy, "trials": r.trials, f"best_val_{m}": round(r.best_val, 4),
               f"test_{m}_mean": round(r.mean, 4), f"test_{m}_std": round(r.std, 4),
               "test_ci95_low": round(lo, 4), "test_ci95_high": round(hi, 4),
               "seeds": len(r.test), "mean_trial_seconds": round(r.mean_trial_s, 1)}
        rec.update({f"test_{name}_mean": round(r.score_mean(name), 4) for name in SCORE_NAMES
                    if name != m and name in r.scores})
        rec.update({f"{label}_mean": round(r.shift_mean(label), 4) for label in r.shift})
        rec.update(wise_ft_columns(r.wise_ft))
        records.append(rec)
    return pd.DataFrame.from_records(records)


def pairs_table(cmp: Comparison) -> "Any":
    import pandas as pd
    fmt = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return pd.DataFrame.from_records([
        {"a": t.a, "b": t.b, "seeds": t.n, "mean_diff": fmt(t.mean_diff), "diff_ci95_low": fmt(t.ci95[0]),
         "diff_ci95_high": fmt(t.ci95[1]), "p": None if t.p is None else float(f"{t.p:.4g}"),
         "p_adjusted": None if t.p_adjusted is None else float(f"{t.p_adjusted:.4g}"), "separated": t.separated}
        for t in cmp.pairs], columns=["a", "b", "seeds", "mean_diff", "diff_ci95_low", "diff_ci95_high",
                                      "p", "p_adjusted", "separated"])


def markdown_table(df) -> str:
    """A GitHub-style table without the optional `tabulate` dependency."""
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def report_text(study: Study, cmp: Comparison) -> str:
    """compare.md: the strategies, every pair, the verdict."""
    text = (f"# Study {study.name}: strategies on the held-out test split\n\n"
            f"Ranked and tested on test {cmp.metric} (the study's metric is {study.config.metric}); "
            f"shifts are scored in accuracy.\n\n"
            f"{markdown_table(comparison_table(cmp))}\n\n")
    if cmp.pairs:
        text += (f"## Every pair ({cmp.method()}; a 95 % interval per pair)\n\n"
                 f"{markdown_table(pairs_table(cmp))}\n\n")
    from harness.report import wise_ft_markdown
    return text + wise_ft_markdown(cmp.rows) + cmp.verdict() + "\n"


def write_confusions(cmp: Comparison, folder: Path) -> list[Path]:
    """Each strategy's confusion matrix per seed as `<strategy>-seed<k>.csv` (rows: true
    class, columns: predicted) and `.png` in `folder`; a failed seed has none."""
    import pandas as pd

    from harness.report import confusion_figure
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for r in cmp.rows:
        for k, cm in enumerate(r.confusions):
            if cm is None:
                continue
            stem = folder / f"{r.strategy}-seed{k}"
            df = pd.DataFrame(cm, index=pd.Index(r.class_names, name="true"), columns=r.class_names)
            df.to_csv(stem.with_suffix(".csv"))
            confusion_figure(cm, r.class_names, f"{r.strategy}, seed {k}").savefig(stem.with_suffix(".png"), dpi=110)
            written += [stem.with_suffix(".csv"), stem.with_suffix(".png")]
    return written


def save_comparison(study: Study, cmp: Comparison, stores: Stores) -> Path:
    """Write compare.csv / compare_pairs.csv / compare.md / compare.png (compare_wise_ft.csv
    with WiSE-FT) and the confusion matrices (confusion/<strategy>-seed<k>.csv and .png)
    under WORKSPACE/reports/<study>/ and log them, with each test score per strategy and seed
    (and accuracy per shift, and the WiSE-FT curves), to a `compare` run in the study's
    experiment; the winner's seed-0 model is logged there as an MLflow PyTorch model."""
    from harness.report import compare_figure, wise_ft_metrics, wise_ft_table

    out = stores.reports(study.name)
    out.mkdir(parents=True, exist_ok=True)
    comparison_table(cmp).to_csv(out / "compare.csv", index=False)
    pairs_table(cmp).to_csv(out / "compare_pairs.csv", index=False)
    names = ["compare.csv", "compare_pairs.csv", "compare.md"]
    if any(r.wise_ft is not None for r in cmp.rows):
        wise_ft_table(cmp.rows).to_csv(out / "compare_wise_ft.csv", index=False)
        names.append("compare_wise_ft.csv")
    else:   # not left from an earlier compare with WiSE-FT, beside tables it does not belong to
        (out / "compare_wise_ft.csv").unlink(missing_ok=True)
    (out / "compare.md").write_text(report_text(study, cmp))
    fig = compare_figure(cmp)
    fig.savefig(out / "compare.png", dpi=110)
    confusions = write_confusions(cmp, out / "confusion")
    tracking = Tracking(stores.tracking_uri, stores.workspace)
    with tracking.run(study.name, "compare", tags={"harness.kind": "compare", "winner": cmp.winner}) as run:
        for r in cmp.rows:
            scores = r.scores or {r.metric: r.test}
            run.log_steps(0, {**{f"test_{name}/{r.strategy}": v for name, v in scores.items()},
                              **{f"shift_accuracy/{label}/{r.strategy}": v for label, v in r.shift.items()}})
            run.log_epoch(0, {**{f"test_{name}_mean/{r.strategy}": statistics.fmean(v) for name, v in scores.items()},
                              **{f"shift_accuracy_mean/{label}/{r.strategy}": r.shift_mean(label) for label in r.shift}})
        if cmp.p_value is not None:
            run.log_epoch(0, {"p_value": cmp.p_value})
        curves, per_seed = wise_ft_metrics(cmp.rows)
        for alpha_step, values in sorted(curves.items()):
            run.log_epoch(alpha_step, values)
        run.log_steps(0, per_seed)
        run.set_tags({"verdict": cmp.verdict(), "method": cmp.method(), "metric": study.config.metric})
        for name in names:
            run.log_file(out / name)
        for path in confusions:
            run.log_file(path, "confusion")
        run.log_figure(fig, "compare.png")
        winner = cmp.rows[0]
        if winner.model is not None:
            run.log_model(winner.model, "model")
    return out
