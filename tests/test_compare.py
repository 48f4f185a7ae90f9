"""`harness compare` decides: every pair tested (paired, Holm-corrected), the seeds that would
separate the leading pair, `--seeds auto` with a stopping rule that keeps its error rate;
the sweep's own model scored for seed 0 (the same numbers as training it again); accuracy
under ImageNet-C style corruptions and on a shift folder; the winner an MLflow model; the
ranking and the tests on the study's metric, all three test scores reported, a confusion
matrix per strategy and seed (an imbalanced folder end to end)."""
from __future__ import annotations

import math
import os
import random
import shutil

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from scipy import stats as sstats

from harness import stats
from harness.cli import main
from harness.compare import Comparison, StrategyResult, comparison_table, write_confusions
from harness.engine.shift import CORRUPTIONS, SEVERITIES, Corruption, corrupted_batches, per_class
from harness.engine.data import Split
from shipped import REPO
from test_sweep import THREADS, client_for, invoke


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    torch.set_num_threads(THREADS)
    yield


# --- the statistics -------------------------------------------------------------------------

def test_holm_step_down():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert stats.holm([0.03, 0.04]) == pytest.approx([0.06, 0.06])     # monotone: never below an earlier step
    assert stats.holm([0.6, 0.7, 0.9]) == [1.0, 1.0, 1.0]


def test_paired_test_is_scipys_with_the_t_interval_of_the_differences():
    a, b = [0.81, 0.84, 0.80, 0.86, 0.83], [0.79, 0.80, 0.81, 0.82, 0.78]
    t = stats.paired_test("a", a, "b", b)
    d = [x - y for x, y in zip(a, b)]
    assert t.p == pytest.approx(sstats.ttest_rel(a, b).pvalue, rel=1e-9)
    lo, hi = sstats.t.interval(0.95, 4, loc=sum(d) / 5, scale=sstats.sem(d))
    assert t.ci95 == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    assert t.mean_diff == pytest.approx(sum(d) / 5)
    assert stats.paired_test("a", [0.8, 0.9], "b", [0.8, 0.9]).p == 1.0     # no difference at all
    assert stats.paired_test("a", [0.5, 0.75], "b", [0.25, 0.5]).p == 0.0    # the same lead every seed
    assert stats.paired_test("a", [0.9, 0.8], "b", [0.8, 0.7]).p < 1e-10
    assert stats.paired_test("a", [0.9], "b", [0.8]).p is None


def test_all_pairs_are_holm_adjusted_then_multiplied_by_the_looks():
    results = {"x": [0.9, 0.91, 0.93, 0.92], "y": [0.85, 0.86, 0.9, 0.84], "z": [0.7, 0.75, 0.72, 0.71]}
    one, four = stats.all_pairs(results), stats.all_pairs(results, looks=4)
    raw = [t.p for t in one]
    assert [t.p_adjusted for t in one] == pytest.approx(stats.holm(raw))
    assert [t.p_adjusted for t in four] == pytest.approx([min(1.0, 4 * p) for p in stats.holm(raw)])


def _exact_power(effect, n, level):
    """A two-sided paired t-test's power: the noncentral t with df n - 1, nc effect * sqrt(n)."""
    df, nc = n - 1, effect * math.sqrt(n)
    crit = sstats.t.ppf(1 - level / 2, df)
    return sstats.nct.sf(crit, df, nc) + sstats.nct.cdf(-crit, df, nc)


@pytest.mark.parametrize("effect, level", [(3.0, 0.05 / 3), (3.0, 0.05), (1.0, 0.05), (1.0, 0.05 / 6),
                                           (0.5, 0.05), (2.0, 0.01), (0.3, 0.05 / 3)])
def test_seeds_to_separate_is_the_smallest_n_with_80_percent_exact_power(effect, level):
    """80 % power at the returned n and not at n - 1, computed exactly (noncentral t): the
    t-quantile approximation gave n = 4 for effect size 3 at 0.05/3, whose power is 0.77."""
    diffs = [effect - 1, effect, effect + 1]               # mean `effect`, standard deviation 1
    n = stats.seeds_to_separate(diffs, level)
    assert _exact_power(effect, n, level) >= 0.8
    assert n == 2 or _exact_power(effect, n - 1, level) < 0.8
    assert stats.paired_power(effect, n, level) == pytest.approx(_exact_power(effect, n, level), rel=1e-12)


def test_seeds_to_separate_grows_with_a_stricter_level_and_knows_no_difference():
    diffs = [0.02, -0.01, 0.03, 0.01, 0.0]
    n = stats.seeds_to_separate(diffs, 0.05)
    assert stats.seeds_to_separate(diffs, 0.05 / 3) > n            # a stricter level needs more
    assert stats.seeds_to_separate([0.01, -0.01], 0.05) is None    # no difference: no number will do
    assert stats.seeds_to_separate([0.01, 0.01], 0.05) == 2        # the same lead every seed


def _auto(rng, first, most, looks, effect=0.0):
    """The --seeds auto loop on simulated paired results; True when it separated the pair."""
    a, b = [], []
    while True:
        while len(a) < first:
            base = rng.gauss(0.8, 0.05)
            a.append(base + effect + rng.gauss(0, 0.02))
            b.append(base + rng.gauss(0, 0.02))
        cmp = Comparison.of([StrategyResult("a", 1, 0.9, 1.0, test=list(a)),
                             StrategyResult("b", 1, 0.9, 1.0, test=list(b))], looks)
        if cmp.significant:
            return True
        if len(a) >= most:
            return False
        first += 1


def test_seeds_auto_keeps_its_error_rate_where_looking_without_correction_does_not():
    """Under no difference, stopping at the first look with p < 0.05 (3..10 seeds, 8 looks)
    declares a winner far more often than 5 %; with the looks' Bonferroni factor it stays under."""
    rng = random.Random(0)
    reps = 1500
    naive = sum(_auto(rng, 3, 10, looks=1) for _ in range(reps)) / reps
    corrected = sum(_auto(rng, 3, 10, looks=8) for _ in range(reps)) / reps
    assert naive > 0.10            # the uncorrected sequential test: measured 0.178 here
    assert corrected <= 0.05       # measured 0.028
    power = sum(_auto(rng, 3, 10, looks=8, effect=0.04) for _ in range(300)) / 300
    assert power > 0.7             # and a real 4-point lead is still found (measured 0.83)


# --- corruptions ----------------------------------------------------------------------------

def _images(n=6, c=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(40, 216, (n, c, size, size), generator=g, dtype=torch.uint8)
    x[:, :, 8:24, 8:24] = 230   # some structure for blur and JPEG to destroy
    return x


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_corruption_changes_images_more_at_higher_severity(name, channels):
    x = _images(c=channels)
    dist = []
    for s in (1, 3, 5):
        out = Corruption(name, s).apply(x, torch.Generator().manual_seed(1))
        assert out.dtype == torch.uint8 and out.shape == x.shape
        dist.append((out.float() - x.float()).abs().mean().item())
    assert 0 < dist[0] < dist[1] < dist[2], dist


def test_corrupted_batches_are_the_same_for_every_batch_size_and_call():
    split = Split(_images(n=300, size=28), torch.arange(300) % 3, 32)
    c = Corruption("gaussian_noise", 2)
    one = torch.cat([x for x, _ in corrupted_batches(split, c, None)])
    two = torch.cat([x for x, _ in corrupted_batches(split, c, None, batch_size=7)])
    assert [len(y) for _, y in corrupted_batches(split, c, None, batch_size=100)] == [100, 100, 56, 44]
    assert one.shape == (300, 3, 32, 32) and torch.equal(one, two)
    clean = torch.cat([x for x, _ in corrupted_batches(split, Corruption("contrast", 1), None)])
    assert not torch.equal(one, clean)


def test_per_class_keeps_the_first_n_of_every_class_in_order():
    y = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    split = Split(torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 2, 2).clone(), y, 2)
    sub = per_class(split, 2)
    assert sub.y.tolist() == [0, 1, 0, 2, 1, 2] and sub.x[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 6]
    assert per_class(split, None) is split and per_class(split, 5).y.tolist() == y.tolist()


def test_severity_tables_are_imagenet_c():
    assert SEVERITIES["gaussian_noise"] == (0.08, 0.12, 0.18, 0.26, 0.38)
    assert SEVERITIES["jpeg"] == (25, 18, 15, 10, 7)
    assert Corruption("contrast", 5).value == 0.05 and Corruption("gaussian_blur", 2).label == "gaussian_blur-2"


# --- the study's metric, the confusion matrices ---------------------------------------------------

def _seed(cm, loss=0.5):
    from harness.engine.step import Score
    cm = torch.tensor(cm)
    return Score(loss, int(cm.trace()) / int(cm.sum()), int(cm.sum()), cm)


ALWAYS_0 = [[8, 0, 0], [3, 0, 0], [1, 0, 0]]      # 8 / 3 / 1 images: accuracy 8/12, macro F1 (16/20)/3
SPREAD = [[[3, 5, 0], [0, 3, 0], [0, 0, 1]],     # accuracy 7/12, macro F1 (6/11 + 6/11 + 1)/3
          [[4, 4, 0], [1, 2, 0], [0, 0, 1]]]     # accuracy 7/12, macro F1 (8/13 + 4/9 + 1)/3


def _rows(metric):
    a = StrategyResult("majority", 2, 0.9, 1.0, metric=metric, class_names=["x", "y", "z"])
    b = StrategyResult("spread", 2, 0.8, 1.0, metric=metric, class_names=["x", "y", "z"])
    for k in range(2):
        a.add_seed(_seed(ALWAYS_0, loss=0.6 + 0.1 * k), 3)
        b.add_seed(_seed(SPREAD[k], loss=0.9), 3)
    return a, b


def test_compare_ranks_and_tests_on_the_studys_metric_and_reports_all_three():
    """The majority guess wins on accuracy and loses on macro F1 and balanced accuracy:
    which one compare ranks and tests on is the study's metric."""
    by_acc = Comparison.of(list(_rows("accuracy")))
    assert by_acc.winner == "majority" and by_acc.rows[0].test == [8 / 12] * 2
    by_f1 = Comparison.of(list(_rows("macro_f1")))
    f1 = [(6 / 11 + 6 / 11 + 1) / 3, (8 / 13 + 4 / 9 + 1) / 3]
    assert by_f1.winner == "spread" and by_f1.rows[0].test == pytest.approx(f1)
    (pair,) = by_f1.pairs
    assert pair.mean_diff == pytest.approx(sum(f1) / 2 - (16 / 20) / 3)
    assert "paired t-test over 2 seeds on test macro_f1" in by_f1.verdict()
    table = comparison_table(by_f1)
    assert list(table.columns) == ["strategy", "trials", "best_val_macro_f1", "test_macro_f1_mean", "test_macro_f1_std",
                                   "test_ci95_low", "test_ci95_high", "seeds", "mean_trial_seconds",
                                   "test_accuracy_mean", "test_balanced_accuracy_mean"]
    assert list(table["test_accuracy_mean"]) == [round(7 / 12, 4), round(8 / 12, 4)]
    assert list(table["test_balanced_accuracy_mean"]) == [round(((3 / 8 + 1 + 1) / 3 + (4 / 8 + 2 / 3 + 1) / 3) / 2, 4),
                                                          round(1 / 3, 4)]
    # a loss is minimised: the lower mean wins
    by_loss = Comparison.of(list(_rows("loss")), maximize=False)
    assert by_loss.winner == "majority" and by_loss.rows[0].test == pytest.approx([0.6, 0.7])


def test_a_failed_seed_scores_0_and_a_uniform_guess_loss_without_a_confusion_matrix():
    r = StrategyResult("naive", 1, 0.9, 1.0, metric="loss")
    r.add_seed(None, 4)
    assert r.test == [math.log(4)] and r.confusions == [None]
    assert {k: v for k, v in r.scores.items() if k != "loss"} == dict.fromkeys(
        ("accuracy", "balanced_accuracy", "macro_f1"), [0.0])


def test_confusion_matrices_are_a_csv_and_a_picture_per_strategy_and_seed(tmp_path):
    a, b = _rows("macro_f1")
    b.add_seed(None, 3)                              # a failed third seed: no matrix
    written = write_confusions(Comparison.of([a, b]), tmp_path / "confusion")
    names = sorted(p.name for p in written)
    assert names == sorted(f"{s}-seed{k}.{ext}" for s in ("majority", "spread") for k in (0, 1) for ext in ("csv", "png"))
    for k in (0, 1):
        df = pd.read_csv(tmp_path / "confusion" / f"spread-seed{k}.csv", index_col=0)
        assert df.index.name == "true" and list(df.index) == list(df.columns) == ["x", "y", "z"]
        assert df.values.tolist() == SPREAD[k]
        assert (tmp_path / "confusion" / f"spread-seed{k}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad input ---------------------------------------------------------------------------------

def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _study_file(shrunk, tmp_path, **compare):
    path = shrunk("imagefolder-example", compare=compare)
    return path, tmp_path / "ws"


def test_seeds_auto_without_a_maximum_is_one_line_and_writes_nothing(shrunk, tmp_path):
    path, ws = _study_file(shrunk, tmp_path)
    res = _run(["compare", path, "--seeds", "auto", "--workspace", ws])
    assert res.exit_code == 2
    assert res.output.strip().endswith("compare.max_seeds: --seeds auto needs a maximum; "
                                       "set compare.max_seeds in the study file")
    assert len(res.output.strip().splitlines()) == 1 and not ws.exists()
    assert "is neither a number nor 'auto'" in _run(["compare", path, "--seeds", "some"]).output


@pytest.mark.parametrize("corruptions, says", [
    ({"fog": [1]}, "compare.corruptions.fog: unknown corruption (known: gaussian_noise, gaussian_blur, contrast, jpeg)"),
    ({"gaussian_nose": [1]}, "compare.corruptions.gaussian_nose: unknown corruption (did you mean 'gaussian_noise'?)"),
    ({"jpeg": [0, 6]}, "compare.corruptions.jpeg: severities must be distinct numbers 1..5, got [0, 6]"),
])
def test_an_unknown_shift_is_one_line_naming_the_field(shrunk, tmp_path, corruptions, says):
    path, ws = _study_file(shrunk, tmp_path, corruptions=corruptions)
    res = _run(["compare", path, "--workspace", ws])
    assert res.exit_code == 2 and says in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not ws.exists()


def test_a_shift_folder_with_other_classes_is_one_line_and_writes_nothing(shrunk, tmp_path):
    folder = tmp_path / "shifted"
    for name in ("alpha", "beta"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (10, 20, 30)).save(folder / name / "a.png")
    path, ws = _study_file(shrunk, tmp_path, shift_root=str(folder))
    res = _run(["compare", path, "--workspace", ws])
    assert res.exit_code == 2, res.output
    assert "compare.shift_root: the class folders of" in res.output and "differ from the training classes" in res.output
    assert "not training classes: alpha, beta" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not ws.exists()


# --- end to end: kept model, shift, MLflow model ------------------------------------------------

def _shift_folder(study_path, dest):
    """The study's tiny image folder, every image colour-inverted: the same classes, shifted."""
    root = yaml.safe_load(open(study_path))["recipe"]["data"]["root"]
    from pathlib import Path
    for class_dir in sorted(Path(root).iterdir()):
        (dest / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:4]:
            img = Image.open(f).convert("RGB")
            Image.eval(img, lambda v: 255 - v).save(dest / class_dir.name / f.name)
    return dest


@pytest.mark.slow
def test_compare_scores_the_kept_model_under_shift_and_logs_the_winner(shrunk, tmp_path):
    import mlflow
    import mlflow.pytorch

    path = shrunk("imagefolder-example", trials=2, strategies={"naive": {"lr": {"low": 1e-3, "high": 1e-2}},
                                                             "head_only": {"lr": {"low": 1e-3, "high": 1e-2}}})
    spec = yaml.safe_load(open(path))
    spec["compare"] = {"seeds": 2, "corruptions": {"gaussian_noise": [3], "jpeg": [2]},
                       "shift_root": str(_shift_folder(path, tmp_path / "shifted"))}
    path.write_text(yaml.safe_dump(spec))
    ws = tmp_path / "ws"
    opts = ["--workspace", ws]
    invoke(["sweep", path, *opts])
    models = ws / "models" / spec["name"]
    for strategy in ("naive", "head_only"):   # one kept model per strategy: its best trial's
        files = list((models / strategy).glob("trial-*.pt"))
        assert len(files) == 1, files

    first = invoke(["compare", path, *opts])
    assert first.output.count("(the sweep's own model)") == 2, first.output
    csv1 = pd.read_csv(ws / "reports" / spec["name"] / "compare.csv")
    assert {"gaussian_noise-3_mean", "jpeg-2_mean", "shift_folder_mean"} <= set(csv1.columns)
    pairs = pd.read_csv(ws / "reports" / spec["name"] / "compare_pairs.csv")
    assert len(pairs) == 1 and {"mean_diff", "diff_ci95_low", "p_adjusted"} <= set(pairs.columns)

    shutil.rmtree(models)   # without the kept models, seed 0 trains again: the same numbers
    second = invoke(["compare", path, *opts])
    assert "(the sweep's own model)" not in second.output
    csv2 = pd.read_csv(ws / "reports" / spec["name"] / "compare.csv")
    cols = ["strategy", "test_accuracy_mean", "gaussian_noise-3_mean", "jpeg-2_mean", "shift_folder_mean"]
    pd.testing.assert_frame_equal(csv1[cols], csv2[cols])

    client = client_for(f"sqlite:///{ws.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name(spec["name"])
    runs = sorted((r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "compare"),
                  key=lambda r: r.info.start_time)
    assert len(runs) == 2
    for name in ("test_accuracy", "shift_accuracy/gaussian_noise-3", "shift_accuracy/shift_folder"):
        keys = [f"{name}/{s}" for s in ("naive", "head_only")]
        h1 = [[m.value for m in client.get_metric_history(runs[0].info.run_id, k)] for k in keys]
        h2 = [[m.value for m in client.get_metric_history(runs[1].info.run_id, k)] for k in keys]
        assert h1 == h2 and all(len(v) == 2 for v in h1)   # bitwise: the kept model is the trial's
    # --seeds auto: from 2 seeds up to 3; it stops at 2 only if the pair is separated there
    spec["compare"]["max_seeds"] = 3
    path.write_text(yaml.safe_dump(spec))
    auto = invoke(["compare", path, "--seeds", "auto", *opts])
    lines = auto.output.strip().splitlines()
    verdict = lines[next(i for i, line in enumerate(lines) if line.startswith("saved ")) - 1]   # printed last
    assert "Bonferroni over 2 looks" in verdict, auto.output
    added = "--seeds auto: " in auto.output
    assert added == ("over 3 seeds" in verdict) and added != ("over 2 seeds" in verdict)
    assert ("is significant" in verdict) or added

    winner = runs[0].data.tags["winner"]
    # compare left no store setting behind for later commands of the process to pick up
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
    mlflow.set_tracking_uri(f"sqlite:///{ws.resolve()}/mlflow.db")
    model = mlflow.pytorch.load_model(runs[0].data.tags["model_uri"])
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert model(x).shape == (2, 3) and winner == csv1["strategy"][0]
    assert not (tmp_path / "mlruns").exists() and not (REPO / "mlruns").exists()   # nothing under Default
    art = client.get_experiment(exp.experiment_id).artifact_location
    assert runs[0].data.tags["model_uri"].startswith("models:/") and art.startswith("file://" + str(ws.resolve()))


# --- end to end: an imbalanced folder judged on balanced accuracy --------------------------------

IMBALANCED = {"train": (10, 5, 3), "val": (6, 2, 2), "test": (9, 3, 1)}   # images of classes a, b, c
CLASSES = ["a_major", "b_minor", "c_rare"]


def _imbalanced_folder(root):
    """train/ val/ test/ folders of 16 px images, a tint per class plus noise, the counts of
    IMBALANCED: the test split's confusion rows must sum to 9, 3 and 1."""
    g = torch.Generator().manual_seed(0)
    for split, counts in IMBALANCED.items():
        for c, (name, n) in enumerate(zip(CLASSES, counts)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 120, (16, 16, 3), generator=g, dtype=torch.uint8)
                img[..., c] += 120
                Image.fromarray(img.numpy()).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.slow   # 2 strategies x 2 trials, then compare over 2 seeds: 25 s on the shared 2 cores
def test_a_study_on_balanced_accuracy_sweeps_ranks_and_counts_confusions_by_it(tmp_path, tmp_path_factory):
    from conftest import tiny_recipe_dict
    from harness.engine.metrics import scores
    from harness.sweep.study import load_study
    from test_sweep import Sweep, fresh_tracking_uri, write_study

    recipe = tiny_recipe_dict()
    del recipe["stages"]
    recipe["data"] = {"dataset": "imagefolder", "root": str(_imbalanced_folder(tmp_path / "data")),
                      "image_size": 16, "batch_size": 4, "augment": False}
    path = write_study(tmp_path / "study.yaml", {
        "name": "imbalanced", "recipe": recipe, "budget": {"epochs": 2}, "metric": "val/balanced_accuracy",
        "trials": 2, "sampler": "random", "pruner": "median",
        "strategies": {"naive": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}, "head_only": None},
        "compare": {"seeds": 2}})
    sw = Sweep(path, load_study(path), tmp_path / "ws", f"sqlite:///{tmp_path / 'optuna.db'}",
               fresh_tracking_uri(tmp_path_factory, tmp_path), "")
    invoke(["sweep", path, *sw.opts()])
    client = client_for(sw.tracking)
    runs = {r.info.run_id: r for r in sw.runs()}
    for strategy in ("naive", "head_only"):   # every value the sweep and its pruner saw: the run's balanced accuracy
        for t in sw.ostudy(strategy).get_trials():
            hist = sorted(client.get_metric_history(t.user_attrs["mlflow_run_id"], "val/balanced_accuracy"),
                          key=lambda m: m.step)
            assert t.intermediate_values == {m.step: m.value for m in hist} and t.value == hist[-1].value
            assert (t.user_attrs["val_images"], t.user_attrs["val_class_counts"]) == (10, [6, 2, 2])
            assert runs[t.user_attrs["mlflow_run_id"]].data.metrics["val/accuracy"] is not None
    status = invoke(["status", path, *sw.opts()]).output
    assert "metric val/balanced_accuracy" in status.splitlines()[0]
    assert ("noise: 2 binomial standard errors of val/balanced_accuracy on an effective 7.7 val images "
            "(C^2 / sum of 1/n_class)") in status   # 9 / (1/6 + 1/2 + 1/2)

    out = invoke(["compare", path, *sw.opts()]).output
    reports = sw.workspace / "reports" / "imbalanced"
    df = pd.read_csv(reports / "compare.csv")
    assert list(df.columns[:5]) == ["strategy", "trials", "best_val_balanced_accuracy",
                                    "test_balanced_accuracy_mean", "test_balanced_accuracy_std"]
    assert {"test_accuracy_mean", "test_macro_f1_mean"} <= set(df.columns)
    assert list(df["test_balanced_accuracy_mean"]) == sorted(df["test_balanced_accuracy_mean"], reverse=True)
    (run,) = [r for r in sw.runs() if r.info.run_name == "compare"]
    assert "on test balanced_accuracy" in run.data.tags["verdict"] and run.data.tags["metric"] == "val/balanced_accuracy"
    assert "Ranked and tested on test balanced_accuracy" in (reports / "compare.md").read_text()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "confusion")}
    for row in df.itertuples(index=False):
        assert row.best_val_balanced_accuracy == round(sw.ostudy(row.strategy).best_trial.value, 4)
        per_seed = {name: [m.value for m in sorted(client.get_metric_history(run.info.run_id, f"test_{name}/{row.strategy}"),
                                                   key=lambda m: m.step)]
                    for name in ("accuracy", "balanced_accuracy", "macro_f1")}
        for k in (0, 1):
            cm = pd.read_csv(reports / "confusion" / f"{row.strategy}-seed{k}.csv", index_col=0)
            assert list(cm.index) == list(cm.columns) == CLASSES
            assert cm.values.sum(1).tolist() == list(IMBALANCED["test"])    # every test image, once, in its row
            assert {name: v[k] for name, v in per_seed.items()} == pytest.approx(scores(cm.values.tolist()), abs=1e-12)
            assert {f"confusion/{row.strategy}-seed{k}.csv", f"confusion/{row.strategy}-seed{k}.png"} <= logged
        assert row.test_balanced_accuracy_mean == pytest.approx(sum(per_seed["balanced_accuracy"]) / 2, abs=5.1e-5)
        assert row.test_macro_f1_mean == pytest.approx(sum(per_seed["macro_f1"]) / 2, abs=5.1e-5)
    assert "balanced" in out and "macro F1" in out
    export = invoke(["export", path, *sw.opts()]).output
    written = export.split()[1].rstrip(":")
    assert " val/balanced_accuracy = " in open(written).readline()
