"""fastai's LR range test: schedule, smoothing, stopping, suggestions, plot, tracking."""
from __future__ import annotations

import io
import math

import pytest
import torch

from harness import jobs
from harness.engine import lr_find as lf
from harness.engine import step as step_mod
from harness import report
from harness.sweep import centre
from harness.errors import HarnessError
from harness.engine.recipe import Recipe
from conftest import needs_fashion, tiny_recipe_dict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BETA = 0.98


def expected_lr(i: int, num_it: int, start: float, end: float) -> float:
    # fastai SchedExp, written out independently of the module
    return start * math.exp(math.log(end / start) * i / num_it)


def scripted_loss(values):
    """A stand-in for the loss function that returns the given values in order. The value
    is a leaf, so backward is free and the optimizer step has no gradients to apply: the
    tests that use it are about the loop's bookkeeping, and stay fast on a busy CPU."""
    it = iter(values)

    def loss(out, y):
        return torch.tensor(float(next(it)), requires_grad=True)
    return loss


class SpyOptimizer:
    """Wraps make_optimizer to keep the optimizer lr_find built."""

    def __init__(self):
        self.opt = None

    def __call__(self, *args, **kwargs):
        from harness.engine.train import make_optimizer
        self.opt = make_optimizer(*args, **kwargs)
        return self.opt


class FakeTracker:
    def __init__(self):
        self.steps, self.params, self.figures = [], {}, {}

    def log_steps(self, first_step, series):
        self.steps.append((first_step, {k: list(v) for k, v in series.items()}))

    def log_params(self, params):
        self.params.update(params)

    def log_figure(self, fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.figures[name] = buf.getvalue()


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.one_thread


# --- suggestion functions on synthetic curves --------------------------------------------

# A U-shaped curve with two bumps on the way down. lrs one decade apart.
U_LOSSES = [10.0, 9.0, 9.5, 8.0, 7.0, 7.2, 6.0, 5.0, 4.0, 6.0, 8.0]
U_LRS = [10.0 ** (k - 7) for k in range(len(U_LOSSES))]


def test_valley_on_u_curve():
    # Longest strictly decreasing subsequence: 10, 9, 8, 7, 6, 5, 4 (skips the bumps 9.5 and
    # 7.2), length 7, ending at index 8 (the first index reaching length 7).
    # fastai's start = end - length = 1; a third of 7 -> 2, half of that third (1.17) -> 1:
    # index 1 + 2 + 1 = 4.
    lr, idx = lf.valley(U_LRS, U_LOSSES)
    assert idx == 4 and lr == U_LRS[4]


def test_valley_contiguous_descent_from_the_first_point():
    # 10 points falling, then rising: length 10 ends at index 9, start = -1,
    # int(10/3) = 3, int(3.33/2) = 1 -> index 3.
    losses = [10 - k for k in range(10)] + [2, 3, 4, 5, 6]
    lrs = [10.0 ** (k / 4) for k in range(len(losses))]
    assert lf.valley(lrs, losses) == (lrs[3], 3)


def test_valley_never_wraps_to_the_last_point():
    # fastai: a 2-point valley from index 0 gives index -1 (the largest lr); clamped to 0.
    assert lf.valley([1, 2, 3, 4, 5], [2.0, 1.0, 3.0, 4.0, 5.0]) == (1.0, 0)
    # no decrease at all: index 0 (as fastai)
    assert lf.valley([1, 2, 3], [1.0, 2.0, 3.0]) == (1.0, 0)


def test_steep_on_u_curve():
    # forward differences: -1, +.5, -1.5, -1, +.2, -1.2, -1, -1, +2, +2 per decade:
    # the steepest segment is 2 -> 3, whose left point is index 2.
    lr, idx = lf.steep(U_LRS, U_LOSSES)
    assert idx == 2 and lr == U_LRS[2]


def test_steep_is_per_log_lr_not_per_step():
    # drops of 1.0, 0.1, 0.9 over log-lr spans of ln 10, ln 1.1, ln(100/11):
    # slopes -0.434, -1.049, -0.409 -> index 1, though the biggest raw drop is index 2.
    lrs, losses = [1e-3, 1e-2, 1.1e-2, 1e-1], [3.0, 2.0, 1.9, 1.0]
    assert lf.steep(lrs, losses) == (1e-2, 1)


def test_minimum_on_u_curve():
    lr, idx = lf.minimum(U_LRS, U_LOSSES)
    assert idx == 8 and lr == pytest.approx(U_LRS[8] / 10, rel=1e-15)


def test_suggestion_window_skips_both_ends_and_stops_at_nan():
    losses = [1.0] * 100
    assert lf.suggestion_window(losses, 100) == range(10, 95)
    losses[50] = math.nan
    assert lf.suggestion_window(losses, 100) == range(10, 50)
    # too short for fastai's window: every finite leading point instead
    assert lf.suggestion_window([1.0, 2.0, 3.0, math.inf], 100) == range(0, 3)
    assert lf.suggestion_window([math.nan], 100) == range(0, 0)


def test_suggest_reads_only_the_window():
    # 30 points (num_it 30 -> skip 3 at the start and 5 at the end); the raw minimum of the
    # whole list (index 1) and the huge drop at the end (index 27) must both be ignored.
    lrs = [expected_lr(i, 30, 1e-7, 10.0) for i in range(30)]
    losses = [5.0, 0.1, 5.0] + [5.0 - 0.1 * k for k in range(20)] + [4.0] * 4 + [-100.0, 1.0, 1.0]
    values, points = lf.suggest(lrs, losses, 30)
    # window = indices 3..24; its minimum is index 22 (loss 3.1)
    assert values["minimum"] == pytest.approx(lrs[22] / 10)
    assert points["minimum"] == (lrs[22], losses[22])
    assert set(values) == {"valley", "steep", "minimum"}
    assert lf.suggest([1e-3], [math.nan], 30) == ({}, {})


def test_smooth_losses_by_hand():
    r = [2.0, 1.0, 4.0]
    s = lf.smooth_losses(r)
    a0 = 0.02 * 2.0
    a1 = 0.98 * a0 + 0.02 * 1.0
    a2 = 0.98 * a1 + 0.02 * 4.0
    assert s == pytest.approx([a0 / 0.02, a1 / (1 - 0.98 ** 2), a2 / (1 - 0.98 ** 3)], rel=1e-12)


def test_bad_arguments_are_refused(tiny_recipe):
    with pytest.raises(HarnessError, match="start_lr"):
        lf.lr_find(tiny_recipe, test=lf.RangeTest(start_lr=0.0))
    with pytest.raises(HarnessError, match="end_lr"):
        lf.lr_find(tiny_recipe, test=lf.RangeTest(start_lr=1e-3, end_lr=1e-4))
    with pytest.raises(HarnessError, match="num_it"):
        lf.lr_find(tiny_recipe, test=lf.RangeTest(num_it=0))


# --- real runs on the tiny recipe ----------------------------------------------------------

@pytest.fixture(scope="module")
def run30(workspace):
    """One 30-step range test on the tiny recipe, with the optimizer it used."""
    recipe = Recipe.from_dict(tiny_recipe_dict())
    spy = SpyOptimizer()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lf, "make_optimizer", spy)
        before = torch.get_num_threads()
        torch.set_num_threads(1)   # see _one_thread
        # end_lr 1e-2 and no divergence stop: all 30 steps run on any machine
        try:
            result = lf.lr_find(recipe, workspace, lf.RangeTest(start_lr=1e-7, end_lr=1e-2, num_it=30, stop_div=False))
        finally:
            torch.set_num_threads(before)
    return result, spy.opt


@needs_fashion
def test_lrs_follow_the_exponential_schedule(run30):
    result, opt = run30
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses) == 30
    assert not result.stopped_early
    for i, lr in enumerate(result.lrs):
        assert lr == pytest.approx(expected_lr(i, 30, 1e-7, 1e-2), rel=1e-12)
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))
    # every param group held the same lr (no discriminative slice) and beta1 = fastai's 0.9
    for pg in opt.param_groups:
        assert pg["lr"] == result.lrs[-1]
        assert pg["betas"] == (0.9, 0.99)
    # stage 0 trains the head only (train_bn keeps body norm layers trainable)
    frozen = [p for pg in opt.param_groups if pg["layer_group"] == 0 and pg["weight_decay"] > 0
              for p in pg["params"]]
    assert frozen and not any(p.requires_grad for p in frozen)


@needs_fashion
def test_smoothing_matches_a_hand_computation(run30):
    result, _ = run30
    r = result.raw_losses
    a0 = (1 - BETA) * r[0]
    a1 = BETA * a0 + (1 - BETA) * r[1]
    a2 = BETA * a1 + (1 - BETA) * r[2]
    assert result.losses[:3] == pytest.approx([a0 / (1 - BETA), a1 / (1 - BETA ** 2),
                                               a2 / (1 - BETA ** 3)], rel=1e-12)
    assert result.losses == pytest.approx(lf.smooth_losses(r), rel=1e-12)
    assert all(math.isfinite(v) for v in r)


@needs_fashion
def test_suggestions_lie_in_the_searched_range(run30):
    result, _ = run30
    s = result.suggestions
    assert set(s) == {"valley", "steep", "minimum"}
    assert 1e-7 <= s["valley"] <= 1e-2
    assert 1e-7 <= s["steep"] <= 1e-2
    assert 1e-8 <= s["minimum"] <= 1e-3
    # each one is a recorded lr (minimum: a tenth of one) inside fastai's window [3:-5]
    window = result.lrs[3:25]
    assert s["valley"] in window and s["steep"] in window
    assert any(s["minimum"] == pytest.approx(lr / 10) for lr in window)


@needs_fashion
def test_figure_is_a_png_with_every_suggestion(run30, tmp_path):
    result, _ = run30
    fig = report.lr_find_figure(result)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [l.split(":")[0] for l in labels] == ["valley", "steep", "minimum"]
    path = tmp_path / "lr_find.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG_MAGIC


@needs_fashion
def test_stops_when_the_smoothed_loss_diverges(tiny_recipe, workspace, monkeypatch):
    raw = [1.0] * 5 + [1000.0] + [1.0] * 30
    monkeypatch.setattr(step_mod, "cross_entropy", scripted_loss(raw))
    result = lf.lr_find(tiny_recipe, workspace, lf.RangeTest(num_it=20))
    # the smoothed loss is 1.0 for 5 steps; step 5 jumps far past 4 x 1.0: recorded, then stop
    assert len(result.lrs) == 6 and result.stopped_early
    assert result.raw_losses == raw[:6]
    smooth = lf.smooth_losses(raw[:6])
    assert smooth[5] > 4 * min(smooth[:5]) and max(smooth[:5]) <= 4 * min(smooth[:5])
    # 6 points are too few for fastai's window: every recorded point is used
    assert 1e-8 <= result.suggestions["minimum"] <= 10.0


@needs_fashion
def test_non_finite_loss_stops_and_is_not_logged(tiny_recipe, workspace, monkeypatch):
    monkeypatch.setattr(step_mod, "cross_entropy", scripted_loss([2.0, 1.5, 1.2, 1.0, 0.9, math.nan] + [1.0] * 30))
    tracker = FakeTracker()
    result = lf.lr_find(tiny_recipe, workspace, lf.RangeTest(num_it=20, stop_div=False))
    jobs.log_lr_find(tracker, result)
    assert len(result.lrs) == 6 and result.stopped_early and math.isnan(result.losses[-1])
    # suggestions from the 5 finite points
    assert result.suggestions["minimum"] == pytest.approx(result.lrs[4] / 10)
    (first, series), = tracker.steps
    assert first == 0 and len(series["lr_find/loss"]) == 5


@needs_fashion
def test_short_runs_use_fastai_minimum_of_six_steps(tiny_recipe, workspace, monkeypatch):
    monkeypatch.setattr(step_mod, "cross_entropy", scripted_loss([1.0] * 10))
    result = lf.lr_find(tiny_recipe, workspace, lf.RangeTest(start_lr=1e-5, end_lr=1e-1, num_it=3))
    assert len(result.lrs) == 6
    assert result.lrs == pytest.approx([expected_lr(i, 6, 1e-5, 1e-1) for i in range(6)], rel=1e-12)


@needs_fashion
def test_no_divergence_stop_when_stop_div_is_false_and_tracking(tiny_recipe, workspace, monkeypatch):
    monkeypatch.setattr(step_mod, "cross_entropy", scripted_loss([1.0] * 5 + [1000.0] + [1.0] * 30))
    tracker = FakeTracker()
    result = lf.lr_find(tiny_recipe, workspace, lf.RangeTest(start_lr=1e-6, end_lr=1e-2, num_it=8, stop_div=False))
    jobs.log_lr_find(tracker, result)
    assert len(result.lrs) == 8 and not result.stopped_early
    (first, series), = tracker.steps
    assert first == 0
    assert series["lr_find/lr"] == result.lrs
    assert series["lr_find/loss"] == result.losses
    assert series["lr_find/raw_loss"] == result.raw_losses
    for name in ("valley", "steep", "minimum"):
        assert tracker.params[f"suggestion.{name}"] == result.suggestions[name]
    assert tracker.params["lr_find.stopped_early"] is False
    assert tracker.figures["lr_find.png"][:8] == PNG_MAGIC


# --- `harness sweep --lr-find`: the first trial of each strategy centred on the valley -------

def test_centred_first_trials_maps_the_valley_per_strategy_and_clips(monkeypatch, tmp_path):
    """Each LR from the finder run on the stage it governs: naive/head_only take lr = the
    stage-1 valley; two_phase takes lr_high = the valley of its unfrozen stage 2 (run after
    the default head stage) and lr_low = lr_high/100; lp_ft takes lr_probe from stage 1 and
    lr from stage 2. Values are clipped into the study's ranges.
    (Updated: two_phase used to take lr_high = stage-1 valley / 2.)"""
    import yaml

    from harness.sweep.study import load_study

    base = tiny_recipe_dict()
    del base["stages"]
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "centre", "recipe": base, "budget": {"epochs": 3}, "trials": 1, "pruner": "none",
        "strategies": {"naive": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}},
                       "head_only": {"lr": {"low": 1e-2, "high": 1e-1, "log": True}},
                       "two_phase": {"lr_low": {"low": 1e-7, "high": 1e-3, "log": True},
                                     "lr_high": {"low": 1e-4, "high": 1e-1, "log": True}},
                       "lp_ft": {"lr_probe": {"low": 1e-4, "high": 1e-1, "log": True},
                                 "lr": {"low": 1e-6, "high": 1e-2, "log": True}}}},
        sort_keys=False))
    study = load_study(study_file)
    seen = []
    valleys = {1: 4e-3, 2: 3e-4}   # the unfrozen model wants a lower LR than the head alone

    def fake_lr_find(recipe, workspace, stage=1, **kw):
        seen.append((stage, recipe.stages[stage - 1].train))
        return lf.LRFindResult(lrs=[], losses=[], raw_losses=[], suggestions={"valley": valleys[stage]},
                               stopped_early=False)

    monkeypatch.setattr(centre, "lr_find", fake_lr_find)
    got = centre.centred_first_trials(study, tmp_path, echo=lambda s: None)
    assert got["naive"]["lr"] == pytest.approx(4e-3)
    assert got["head_only"]["lr"] == pytest.approx(1e-2)          # 4e-3 clipped up to the range
    assert got["two_phase"]["lr_high"] == pytest.approx(3e-4)
    assert got["two_phase"]["lr_low"] == pytest.approx(3e-6)
    assert set(got["two_phase"]) == {"lr_low", "lr_high"}           # only the searched params
    assert got["lp_ft"]["lr_probe"] == pytest.approx(4e-3) and got["lp_ft"]["lr"] == pytest.approx(3e-4)
    # each finder ran on the stage its hyperparameter governs
    assert seen == [(1, "all"), (1, "head"), (2, "all"), (1, "head"), (2, "all")]


@needs_fashion
def test_sweep_with_lr_find_starts_from_the_suggestion(tmp_path, workspace):
    """Through the CLI: trial 0 of the sweep uses the LR finder's valley, not the default."""
    import optuna
    import yaml
    from click.testing import CliRunner

    from harness.cli import main

    base = tiny_recipe_dict()
    del base["stages"]
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "lrf", "recipe": base, "budget": {"epochs": 2}, "trials": 1, "pruner": "none",
        "strategies": {"naive": {"lr": {"low": 1e-6, "high": 1.0, "log": True}}}}))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    res = CliRunner().invoke(main, ["sweep", str(study_file), "--lr-find", "--workspace", str(workspace),
                                    "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert res.exit_code == 0, res.output
    assert "lr-find valley" in res.output
    trial = optuna.load_study(study_name="lrf/naive", storage=storage).trials[0]
    valley = float(res.output.split("lr-find valley ")[1].split(":")[0])
    assert trial.params["lr"] == pytest.approx(valley, rel=1e-2)   # printed with 3 significant digits
    assert trial.params["lr"] != pytest.approx(1e-3)               # not the published default
