"""`harness compare` decides: every pair tested (paired, Holm-corrected), the seeds that would
separate the leading pair, `--seeds auto` with a stopping rule that keeps its error rate;
the sweep's own model scored for seed 0 (the same numbers as training it again); accuracy
under ImageNet-C style corruptions and on a shift folder; the winner an MLflow model."""
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
from harness.compare import Comparison, StrategyResult
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
