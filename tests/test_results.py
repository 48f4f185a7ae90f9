"""Tests for harness.results: `harness status` (counts, best, on-boundary flag), `harness
compare` on the session's base sweep (CSV / Markdown / PNG, a `compare` run in MLflow, the
verdict), and the statistics behind it (t interval, paired-test verdict)."""
from __future__ import annotations

import math
import statistics

import optuna
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from scipy import stats

from conftest import FASHION_DIR, needs_fashion
from harness.cli import main
from harness.compare import Comparison, StrategyResult
from harness.results import status_rows
from harness.workspace import Stores
from harness.sweep.study import load_study
from test_sweep import (BASE_STUDY, PNG_MAGIC, THREADS, base_recipe, base_sweep,
                        client_for, fresh_tracking_uri, invoke, write_study)

optuna.logging.set_verbosity(optuna.logging.WARNING)

CSV_COLUMNS = ["strategy", "trials", "best_val_accuracy", "test_accuracy_mean", "test_accuracy_std",
               "test_ci95_low", "test_ci95_high", "mean_trial_seconds"]


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    """The base sweep's thread count (see test_sweep.py)."""
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    if not FASHION_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    return base_sweep(tmp_path_factory)


def status_line(output: str, strategy: str) -> list[str]:
    lines = [ln for ln in output.splitlines() if ln.split()[:1] == [strategy]]
    assert len(lines) == 1, output
    return lines[0].split()


# --- status -----------------------------------------------------------------------------------

@needs_fashion
@pytest.mark.slow
def test_status_names_every_strategy_with_its_counts_and_best(swept):
    out = invoke(["status", swept.path, "--workspace", swept.workspace, "--storage", swept.storage]).output
    assert out.splitlines()[0] == "study tiny-sweep: 2 trials per strategy, 3 epochs each, metric val/accuracy"
    for strategy in ("naive", "two_phase"):
        ostudy = swept.ostudy(strategy)
        trials = ostudy.get_trials()
        complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        fields = status_line(out, strategy)
        assert fields[:7] == [strategy, str(complete), "0", "0", "0", "0", f"{ostudy.best_trial.value:.4f}"]
        for name in ostudy.best_trial.params:
            assert f"{name}=" in out
    # the sweep printed the same table at its end
    assert status_line(swept.output, "naive")[:7] == status_line(out, "naive")[:7]


@needs_fashion
@pytest.mark.slow
def test_status_of_a_strategy_never_swept(swept, tmp_path):
    d = {**BASE_STUDY, "recipe": base_recipe(), "strategies": {**BASE_STUDY["strategies"], "head_only": None}}
    path = write_study(tmp_path / "study.yaml", d)
    out = invoke(["status", path, "--workspace", swept.workspace, "--storage", swept.storage]).output
    assert status_line(out, "head_only") == ["head_only", "0", "0", "0", "0", "0", "-"]
    assert status_line(out, "naive")[1] == "2"


def constructed_storage(tmp_path, trials: dict[str, list], **changes) -> tuple:
    """A study file 'edge' (BASE_STUDY with `changes`) and an Optuna storage holding
    hand-made trials per strategy, swept (says the store) on the study's metric."""
    d = {**BASE_STUDY, "name": "edge", "recipe": base_recipe(), **changes}
    path = write_study(tmp_path / "study.yaml", d)
    study = load_study(path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for strategy, made in trials.items():
        ostudy = optuna.create_study(study_name=f"edge/{strategy}", storage=storage, direction=study.direction)
        ostudy.set_user_attr("metric", study.config.metric)
        for t in made:
            ostudy.add_trial(t)
    return path, study, storage


def naive_trial(value, lr, pct_start, state=optuna.trial.TrialState.COMPLETE, **attrs):
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
            "pct_start": optuna.distributions.FloatDistribution(0.3, 0.6)}
    return optuna.trial.create_trial(state=state, value=value, params={"lr": lr, "pct_start": pct_start},
                                     distributions=dist, user_attrs=attrs,
                                     intermediate_values={1: value} if value is not None else {})


def test_status_flags_a_best_point_on_the_range_boundary(tmp_path):
    # naive's space: lr [1e-4, 1e-2] log, pct_start [0.3, 0.6]
    path, study, storage = constructed_storage(tmp_path, {
        "naive": [naive_trial(0.6, 1e-3, 0.4), naive_trial(0.9, 1.05e-4, 0.45), naive_trial(0.7, 3e-3, 0.6)],
        "two_phase": []})
    rows = {r["strategy"]: r for r in status_rows(study, Stores.resolve(tmp_path, storage))}
    assert rows["naive"]["best"] == 0.9
    assert rows["naive"]["best_params"] == {"lr": 1.05e-4, "pct_start": 0.45}
    assert rows["naive"]["on_boundary"] == ["lr (low)"]
    assert (rows["two_phase"]["complete"], rows["two_phase"]["best"], rows["two_phase"]["on_boundary"]) == (0, None, [])
    out = invoke(["status", path, "--workspace", tmp_path, "--storage", storage]).output
    line = next(ln for ln in out.splitlines() if ln.startswith("naive "))
    assert line.split()[:7] == ["naive", "3", "0", "0", "0", "0", "0.9000"]
    assert line.endswith("[on boundary: lr (low)]")
    assert "on boundary" not in next(ln for ln in out.splitlines() if ln.startswith("two_phase "))


def test_status_counts_pruned_trials(tmp_path):
    path, study, storage = constructed_storage(tmp_path, {
        "naive": [naive_trial(0.8, 1e-3, 0.4), naive_trial(0.2, 2e-3, 0.4, state=optuna.trial.TrialState.PRUNED)]})
    out = invoke(["status", path, "--workspace", tmp_path, "--storage", storage]).output
    assert out.splitlines()[2].split()[:7] == ["naive", "1", "1", "0", "0", "0", "0.8000"]


def test_status_counts_failed_trials(tmp_path):
    path, study, storage = constructed_storage(tmp_path, {
        "naive": [naive_trial(0.8, 1e-3, 0.4),
                  naive_trial(None, 2e-3, 0.4, state=optuna.trial.TrialState.FAIL, failure="diverged at step 3"),
                  naive_trial(None, 3e-3, 0.4, state=optuna.trial.TrialState.FAIL)]})   # lost: no failure
    res = CliRunner().invoke(main, ["status", str(path), "--workspace", str(tmp_path), "--storage", storage])
    assert res.exit_code == 0, repr(res.exception)
    # complete, pruned, failed (a result), lost (crashed or interrupted: run again), running
    assert res.output.splitlines()[2].split()[:7] == ["naive", "1", "0", "1", "1", "0", "0.8000"]


# --- status: rankings inside the val set's noise ----------------------------------------------

def two_phase_trial(value, lr_high, **attrs):
    dist = {"lr_high": optuna.distributions.FloatDistribution(2e-3, 2e-2, log=True)}
    return optuna.trial.create_trial(value=value, params={"lr_high": lr_high}, distributions=dist, user_attrs=attrs)


def noise_part(output: str) -> list[str]:
    lines = output.splitlines()
    return lines[next(i for i, ln in enumerate(lines) if ln.startswith("noise:")):]


def test_status_says_which_best_trials_are_within_the_val_sets_noise(tmp_path):
    """80 val images, best 0.95: one binomial standard error is sqrt(.95 * .05 / 80) = 0.0244,
    2 of them 3.9 images. naive's 3 best lie 2 images apart (inside), its 4th 12 images
    below; two_phase's best leads its next by 10 images (outside); the strategies' bests
    tie."""
    n = {"val_images": 80}
    path, study, storage = constructed_storage(tmp_path, {
        "naive": [naive_trial(v, 1e-3, 0.4, **n) for v in (0.9375, 0.80, 0.95, 0.925)],
        "two_phase": [two_phase_trial(0.95, 3e-3, **n), two_phase_trial(0.825, 4e-3, **n)]})
    res = CliRunner().invoke(main, ["status", str(path), "--workspace", str(tmp_path), "--storage", storage])
    assert res.exit_code == 0, res.output
    assert noise_part(res.output) == [
        "noise: 2 binomial standard errors of val/accuracy on 80 val images",
        "  [naive] best trials: 3 within noise (0.9500, 0.9375, 0.9250), 2 images apart, 2 SE = 3.9 images: "
        "their order is not evidence",
        "  [two_phase] best trials: 0.9500 leads the next (0.8250) by 10 images, beyond 2 SE = 3.9 images",
        "  [strategies] bests: 2 within noise (naive 0.9500, two_phase 0.9500), 0 images apart, 2 SE = 3.9 images: "
        "their order is not evidence"]
    # the margin is the layout pruner's: z standard errors at the best value
    from harness.sweep.pruning import binomial_margin
    assert binomial_margin(0.95, 80, 2.0) * 80 == pytest.approx(2 * math.sqrt(0.95 * 0.05 / 80) * 80)
    assert round(binomial_margin(0.95, 80, 2.0) * 80, 1) == 3.9
    # with 4x the images the same values are beyond the noise: 8 images apart, 2 SE = 7.8
    n4 = {"val_images": 320}
    (tmp_path / "big").mkdir()
    path, study, storage = constructed_storage(tmp_path / "big", {
        "naive": [naive_trial(v, 1e-3, 0.4, **n4) for v in (0.95, 0.925)]})
    out = invoke(["status", path, "--workspace", tmp_path, "--storage", storage]).output
    assert noise_part(out)[1] == "  [naive] best trials: 0.9500 leads the next (0.9250) by 8 images, beyond 2 SE = 7.8 images"


def test_status_noise_of_balanced_accuracy_counts_the_small_classes(tmp_path):
    """60 + 20 val images: balanced accuracy's standard error is that of C^2 / sum(1/n_c) = 4 /
    (1/60 + 1/20) = 60 images, not 80, the images of the 20-image class weighing 3x."""
    attrs = {"val_images": 80, "val_class_counts": [60, 20]}
    path, study, storage = constructed_storage(tmp_path, {
        "naive": [naive_trial(v, 1e-3, 0.4, **attrs) for v in (0.9, 0.85, 0.7)]}, metric="val/balanced_accuracy")
    out = noise_part(invoke(["status", path, "--workspace", tmp_path, "--storage", storage]).output)
    margin = 2 * math.sqrt(0.9 * 0.1 / 60)      # 0.0775: 0.85 is within it, 0.7 is not
    assert out == ["noise: 2 binomial standard errors of val/balanced_accuracy on an effective 60.0 val images "
                   "(C^2 / sum of 1/n_class)",
                   f"  [naive] best trials: 2 within noise (0.9000, 0.8500), about 3.0 images apart, "
                   f"2 SE = {margin * 60:.1f} images: their order is not evidence"]


def test_status_of_a_loss_says_it_judges_no_noise_and_a_study_swept_on_another_metric_is_refused(
        tmp_path, tmp_path_factory):
    path, study, storage = constructed_storage(tmp_path, {
        "naive": [naive_trial(v, 1e-3, 0.4, val_images=80) for v in (0.3, 0.31)]}, metric="val/loss")
    out = invoke(["status", path, "--workspace", tmp_path, "--storage", storage]).output
    assert status_line(out, "naive")[:7] == ["naive", "2", "0", "0", "0", "0", "0.3000"]   # minimised
    assert noise_part(out) == ["noise: val/loss has no binomial standard error; how far apart the trials are "
                               "is not judged"]
    # the same store read (or swept) by a study file that now says val/macro_f1: one line, exit 2
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "metric": "val/macro_f1"}))
    tracking = fresh_tracking_uri(tmp_path_factory, tmp_path)
    for cmd in ("status", "export", "compare", "sweep"):   # a sweep would add macro F1s to a study of losses
        res = CliRunner().invoke(main, [cmd, str(path), "--workspace", str(tmp_path), "--storage", storage,
                                        "--tracking-uri", tracking])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        assert res.output.strip().endswith("metric: val/macro_f1, but the stored study edge/naive was swept on "
                                           "val/loss; give the study a new name or set metric back to val/loss")
    assert [t.value for t in optuna.load_study(study_name="edge/naive", storage=storage).get_trials()] == [0.3, 0.31]


# --- compare on the base sweep ------------------------------------------------------------------

@needs_fashion
@pytest.mark.slow
def test_compare_writes_csv_markdown_png_and_an_mlflow_run(swept):
    res = invoke(["compare", swept.path, "--seeds", 2, *swept.opts()])
    out_dir = swept.workspace / "reports" / "tiny-sweep"
    for name in ("compare.csv", "compare.md", "compare.png"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "compare.png").read_bytes()[:8] == PNG_MAGIC

    df = pd.read_csv(out_dir / "compare.csv")
    assert list(df.columns[:7]) == CSV_COLUMNS[:7] and set(CSV_COLUMNS) <= set(df.columns)
    assert sorted(df["strategy"]) == ["naive", "two_phase"] and len(df) == 2
    assert list(df["test_accuracy_mean"]) == sorted(df["test_accuracy_mean"], reverse=True)
    winner = df["strategy"][0]

    # the per-seed test accuracies are in the compare run; the table's numbers follow from them
    client = client_for(swept.tracking)
    exp = client.get_experiment_by_name("tiny-sweep")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "compare"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["winner"] == winner
    for row in df.itertuples(index=False):
        ostudy = swept.ostudy(row.strategy)
        trials = ostudy.get_trials()
        assert row.trials == len(trials)
        assert row.best_val_accuracy == round(ostudy.best_trial.value, 4)
        seconds = [t.user_attrs["seconds"] for t in trials]
        assert row.mean_trial_seconds == pytest.approx(sum(seconds) / len(seconds), abs=0.051)
        hist = sorted(client.get_metric_history(run.info.run_id, f"test_accuracy/{row.strategy}"),
                      key=lambda m: m.step)
        test = [m.value for m in hist]
        assert [m.step for m in hist] == [0, 1] and all(0.0 <= v <= 1.0 for v in test)
        mean, std = statistics.mean(test), statistics.stdev(test)
        assert row.test_accuracy_mean == pytest.approx(mean, abs=5.1e-5)
        assert row.test_accuracy_std == pytest.approx(std, abs=5.1e-5)
        if std > 0:
            lo, hi = stats.t.interval(0.95, len(test) - 1, loc=mean, scale=std / math.sqrt(len(test)))
        else:
            lo = hi = mean
        assert (row.test_ci95_low, row.test_ci95_high) == (pytest.approx(lo, abs=5.1e-5), pytest.approx(hi, abs=5.1e-5))
        assert row.test_ci95_low <= row.test_accuracy_mean <= row.test_ci95_high
    # the verdict names the winner, and is printed, in the Markdown and on the run
    verdict = run.data.tags["verdict"]
    assert verdict.startswith(f"{winner} wins; its lead over ") and "paired t-test over 2 seeds" in verdict
    assert verdict in res.output.splitlines()
    assert "p_value" in run.data.metrics
    md = (out_dir / "compare.md").read_text()
    assert "| strategy | trials | best_val_accuracy |" in md and verdict in md
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"compare.csv", "compare.md", "compare.png"}


# --- the statistics -------------------------------------------------------------------------------

@pytest.mark.parametrize("test", [[0.8, 0.9], [0.71, 0.74, 0.69], [0.5, 0.52, 0.55, 0.61, 0.58]])
def test_ci95_is_the_t_interval(test):
    r = StrategyResult("naive", trials=4, best_val=0.9, mean_trial_s=1.0, test=list(test))
    mean, sem = statistics.mean(test), statistics.stdev(test) / math.sqrt(len(test))
    lo, hi = stats.t.interval(0.95, len(test) - 1, loc=mean, scale=sem)
    assert r.mean == pytest.approx(mean, rel=1e-12)
    assert r.std == pytest.approx(statistics.stdev(test), rel=1e-12)
    assert r.ci95() == (pytest.approx(lo, rel=1e-10), pytest.approx(hi, rel=1e-10))


def test_ci95_of_one_seed_or_equal_seeds_is_the_mean():
    assert StrategyResult("naive", 1, 0.9, 1.0, test=[0.75]).ci95() == (0.75, 0.75)
    assert StrategyResult("naive", 1, 0.9, 1.0, test=[0.75]).std == 0.0
    assert StrategyResult("naive", 1, 0.9, 1.0, test=[0.5, 0.5, 0.5]).ci95() == (0.5, 0.5)


def rows(*tests):
    return [StrategyResult(f"s{i}", 3, 0.9, 1.0, test=list(t)) for i, t in enumerate(tests)]


def test_verdict_significant():
    a, b = [0.90, 0.91, 0.92, 0.93], [0.80, 0.80, 0.83, 0.82]
    p = stats.ttest_rel(a, b).pvalue
    assert p < 0.05
    cmp = Comparison.of(rows(a, b))
    assert cmp.significant and cmp.p_value == pytest.approx(p, rel=1e-9)
    assert cmp.verdict() == (f"s0 wins; its lead over s1 is significant "
                             f"(paired t-test over 4 seeds, p = {p:.3g}).")


def test_verdict_not_significant_says_how_many_seeds_would_separate():
    a, b = [0.90, 0.80, 0.85], [0.84, 0.86, 0.83]
    p = stats.ttest_rel(a, b).pvalue
    assert p >= 0.05
    cmp = Comparison.of(rows(a, b))
    assert not cmp.significant
    assert cmp.verdict().startswith("s0 wins; its lead over s1 is not significant (paired t-test over 3 seeds")
    need = cmp.seeds_needed()
    assert need is not None and need > 3 and f"about {need} seeds would separate them" in cmp.verdict()


def test_rows_are_ordered_by_mean_and_the_winner_is_first():
    cmp = Comparison.of(rows([0.5, 0.6], [0.9, 0.8], [0.7, 0.7]))
    assert [r.strategy for r in cmp.rows] == ["s1", "s2", "s0"]
    assert (cmp.winner, cmp.runner_up) == ("s1", "s2")
    assert [(t.a, t.b) for t in cmp.pairs] == [("s1", "s2"), ("s1", "s0"), ("s2", "s0")]


def test_verdict_single_strategy_and_single_seed():
    cmp = Comparison.of(rows([0.9, 0.8]))
    assert not cmp.significant
    assert cmp.verdict() == "s0 is the only strategy with a completed trial."
    cmp = Comparison.of(rows([0.9], [0.8]))
    assert "s0 leads s1" in cmp.verdict() and "more than one seed" in cmp.verdict()
