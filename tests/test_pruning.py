"""The layout pruner (harness/sweep/pruning.py) and the replay bench/bench_pruning.py runs,
on Optuna studies in memory with hand-made intermediate values: no training."""
from __future__ import annotations

import math

import optuna
import pytest
import yaml

from harness.sweep.optuna_studies import make_pruner
from harness.sweep.pruning import (CLASS_COUNTS_ATTR, LAYOUT_ATTR, N_ATTR, LayoutPruner, Record, annealed_prefix,
                                   binomial_margin, judged_prefix, noise_images, recipe_layout, records_of, replay,
                                   spearman)
from harness.sweep.strategies import stages_for

optuna.logging.set_verbosity(optuna.logging.WARNING)

# two_phase on a 5-epoch budget, 3 layer groups: the head alone for F epochs, then all 3 groups
F1 = [[1, 1], [4, 3]]
F2 = [[2, 1], [3, 3]]
F3 = [[3, 1], [2, 3]]
NAIVE = [[5, 3]]


def study(pruner=None, direction="maximize"):
    return optuna.create_study(direction=direction, pruner=pruner or LayoutPruner())


def add(s: optuna.Study, layout, values: list[float], n: int | None = 100, final: bool = True,
        class_counts: list[int] | None = None) -> list[bool]:
    """One trial reporting `values` (epochs 1, 2, ...), told COMPLETE with its last value;
    returns should_prune() after each report (the trial runs on whatever it says)."""
    t = s.ask()
    if layout is not None:
        t.set_user_attr(LAYOUT_ATTR, layout)
    if n is not None:
        t.set_user_attr(N_ATTR, n)
    if class_counts is not None:
        t.set_user_attr(CLASS_COUNTS_ATTR, class_counts)
    said = []
    for epoch, v in enumerate(values, start=1):
        t.report(v, epoch)
        said.append(t.should_prune())
    if final:
        s.tell(t, values[-1])
    return said


def test_the_layout_of_a_recipe_is_epochs_and_trainable_groups_per_stage():
    stages = stages_for("two_phase", 5, 3, freeze_epochs=2)
    recipe = {"model": {"groups": 3}, "stages": [st.model_dump(mode="json") for st in stages]}
    assert recipe_layout(recipe) == ((2, 1), (3, 3))
    assert recipe_layout(yaml.safe_dump(recipe)) == ((2, 1), (3, 3))
    recipe["model"]["groups"] = 4
    assert recipe_layout(recipe) == ((2, 1), (3, 4))
    recipe["stages"][0]["train"] = {"last": 2}
    assert recipe_layout(recipe) == ((2, 2), (3, 4))
    assert recipe_layout({"stages": [st.model_dump(mode="json") for st in stages_for("gradual", 6, 3)]}) == (
        (2, 1), (2, 2), (2, 3))


def test_annealed_points_are_the_ends_of_stages_before_the_last():
    layout = ((2, 1), (1, 2), (3, 3))
    assert [annealed_prefix(layout, e) for e in range(1, 7)] == [
        None, ((2, 1),), ((2, 1), (1, 2)), None, None, None]
    assert [annealed_prefix(((5, 3),), e) for e in range(1, 6)] == [None] * 5


def test_mid_stage_values_are_judged_only_when_asked_and_among_the_same_current_stage():
    layout = ((2, 1), (3, 3))
    assert [judged_prefix(layout, e) for e in range(1, 6)] == [None, ((2, 1),), None, None, None]
    assert [judged_prefix(layout, e, mid_stage_from=3) for e in range(1, 6)] == [
        None, ((2, 1),), ((2, 1), (3, 3)), ((2, 1), (3, 3)), None]
    assert [judged_prefix(((5, 3),), e, mid_stage_from=2) for e in range(1, 6)] == [
        None, ((5, 3),), ((5, 3),), ((5, 3),), None]
    s = study(LayoutPruner(mid_stage_from=2))
    for _ in range(3):
        add(s, NAIVE, [0.8] * 5)
        add(s, F1, [0.8] * 5)
    assert add(s, NAIVE, [0.1] * 5, final=False) == [False, True, True, True, False]
    # F2's stage 2 is not F1's (3 epochs, not 4): no peers mid-stage, nor at its annealed epoch 2
    assert add(s, F2, [0.1] * 5) == [False] * 5


def test_a_clearly_worse_trial_is_pruned_at_its_annealed_point_among_peers_of_its_layout():
    s = study()
    for v in (0.80, 0.82, 0.78):
        assert add(s, F1, [v, v, v, v, v]) == [False] * 5
    assert add(s, F1, [0.40, 0.9, 0.9, 0.9, 0.9], final=False) == [True, False, False, False, False]


def test_never_before_an_annealed_point_nor_at_the_last_epoch():
    s = study()
    for _ in range(3):
        add(s, F3, [0.8] * 5)
    # far below its peers at every epoch: judged only at epoch 3, the end of the frozen stage
    assert add(s, F3, [0.1, 0.1, 0.8, 0.1, 0.1]) == [False] * 5
    assert add(s, F3, [0.1, 0.1, 0.1, 0.1, 0.1], final=False) == [False, False, True, False, False]


def test_the_noise_of_a_class_averaged_metric_is_taken_over_the_effective_image_count():
    """90 + 10 val images: balanced accuracy's standard error is that of 4 / (1/90 + 1/10) = 36
    images. A trial 0.10 below its peers' 0.80 is beyond 2 standard errors of accuracy on 100
    images (0.080) but inside those of balanced accuracy (0.133): pruned on one, not the other."""
    assert noise_images("val/accuracy", 100, [90, 10]) == 100
    assert noise_images("val/balanced_accuracy", 100, [90, 10]) == pytest.approx(36)
    assert noise_images("val/macro_f1", 100, [50, 50]) == pytest.approx(100)   # balanced: n itself
    assert noise_images("val/balanced_accuracy", 100) == 100                   # counts not recorded
    assert noise_images("val/loss", 100, [90, 10]) is None and noise_images("val/accuracy", None) is None
    for metric, pruned in (("val/accuracy", True), ("val/balanced_accuracy", False)):
        s = study(make_pruner("layout", 5, metric))
        for _ in range(3):
            add(s, F1, [0.8] * 5, class_counts=[90, 10])
        assert add(s, F1, [0.7] * 5, final=False, class_counts=[90, 10])[0] is pruned, metric


def test_a_single_stage_trial_is_never_pruned():
    s = study(LayoutPruner(min_peers=1, z=0.0))
    for _ in range(5):
        add(s, NAIVE, [0.9] * 5)
    assert add(s, NAIVE, [0.0] * 5) == [False] * 5


def test_never_compares_across_layouts():
    s = study()
    for _ in range(5):
        add(s, F1, [0.9] * 5)
        add(s, F2, [0.9] * 5)
    # a freeze_epochs 3 trial: no peer with its layout, though ten trials are far above it at epoch 3
    assert add(s, F3, [0.1] * 5) == [False] * 5
    # the same epochs but the whole body trains in stage 1: not a peer of the frozen-head trials
    assert add(s, [[1, 3], [4, 3]], [0.1] * 5) == [False] * 5
    # its first stage matches F1's: compared at epoch 1 although its second stage differs
    assert add(s, [[1, 1], [2, 3], [2, 3]], [0.1] * 5, final=False)[0] is True


def test_peers_need_only_the_same_stages_so_far():
    s = study()
    for _ in range(3):
        add(s, [[1, 1], [4, 3]], [0.9] * 5)
    assert add(s, [[1, 1], [1, 2], [3, 3]], [0.1] * 5, final=False)[:2] == [True, False]
    s = study()
    for _ in range(3):
        add(s, [[1, 1], [4, 3]], [0.9] * 5)
    # epoch 2 ends its second stage, but no peer shares stages 1-2
    assert add(s, [[1, 1], [1, 2], [3, 3]], [0.9, 0.1, 0.1, 0.1, 0.1]) == [False] * 5


def test_within_the_noise_margin_is_not_pruned():
    # peers' median 0.80 on 100 images: one binomial standard error is 0.04
    assert binomial_margin(0.8, 100, 1.0) == pytest.approx(0.04)
    for value, n, pruned in ((0.77, 100, False), (0.755, 100, True), (0.77, 10_000, True), (0.797, 10_000, False)):
        s = study(LayoutPruner(z=1.0))
        for v in (0.78, 0.80, 0.82):
            add(s, F2, [v] * 5, n=n)
        assert add(s, F2, [value] * 5, n=n, final=False)[1] is pruned, (value, n)
    s = study()                                                 # `pruner: layout`: z 2
    for v in (0.78, 0.80, 0.82):
        add(s, F2, [v] * 5)
    assert add(s, F2, [0.75] * 5, final=False)[1] is False      # within 2 standard errors (0.08)
    assert add(s, F2, [0.70] * 5, final=False)[1] is True        # the running 0.75 is a peer: median 0.79


def test_too_few_peers_or_no_image_count_never_prunes():
    s = study()
    for _ in range(2):
        add(s, F1, [0.9] * 5)
    assert add(s, F1, [0.1] * 5) == [False] * 5                 # 2 peers of 3 needed
    s = study()
    for _ in range(3):
        add(s, F1, [0.9] * 5)
    assert add(s, F1, [0.1] * 5, n=None) == [False] * 5         # no val_images, no default_n
    s = study(LayoutPruner(default_n=100))
    for _ in range(3):
        add(s, F1, [0.9] * 5)
    assert add(s, F1, [0.1] * 5, n=None, final=False)[0] is True


def test_the_layout_is_read_from_the_recipe_when_the_trial_did_not_record_it():
    def recipe(freeze):
        return yaml.safe_dump({"model": {"groups": 3}, "stages": [
            st.model_dump(mode="json") for st in stages_for("two_phase", 5, 3, freeze_epochs=freeze)]})

    s = study()
    for _ in range(3):
        t = s.ask()
        t.set_user_attr("recipe", recipe(2))
        t.set_user_attr(N_ATTR, 100)
        for e in range(1, 6):
            t.report(0.9, e)
        s.tell(t, 0.9)
    for freeze, expected in ((3, False), (2, True)):
        t = s.ask()
        t.set_user_attr("recipe", recipe(freeze))
        t.set_user_attr(N_ATTR, 100)
        t.report(0.1, 1)
        t.report(0.1, 2)
        assert t.should_prune() is expected, freeze
        s.tell(t, state=optuna.trial.TrialState.PRUNED)


def test_minimize_prunes_above_the_peers():
    s = study(direction="minimize")
    for _ in range(3):
        add(s, F1, [0.1] * 5)
    assert add(s, F1, [0.9] * 5, final=False)[0] is True
    assert add(s, F1, [0.05] * 5)[0] is False


def test_make_pruner_knows_layout_and_keeps_the_others():
    assert isinstance(make_pruner("layout", 5), LayoutPruner)
    assert isinstance(make_pruner("median", 5), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("hyperband", 5), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none", 5), optuna.pruners.NopPruner)


# --- replay ----------------------------------------------------------------------------------

def records() -> list[Record]:
    """Four freeze_epochs-1 trials and two single-stage ones, 5 epochs each (30 epochs)."""
    f1 = {LAYOUT_ATTR: F1, N_ATTR: 100}
    nv = {LAYOUT_ATTR: NAIVE, N_ATTR: 100}
    return [
        Record(0, {e: 0.8 for e in range(1, 6)}, 0.8, {"freeze_epochs": 1}, f1),
        Record(1, {e: 0.8 for e in range(1, 6)}, 0.8, {"freeze_epochs": 1}, f1),
        Record(2, {1: 0.2, 2: 0.9, 3: 0.9, 4: 0.9, 5: 0.9}, 0.9, {"freeze_epochs": 1}, f1),   # too few peers yet
        Record(3, {1: 0.2, 2: 0.9, 3: 0.9, 4: 0.9, 5: 0.9}, 0.9, {"freeze_epochs": 1}, f1),   # pruned at 1
        Record(4, {e: 0.1 for e in range(1, 6)}, 0.1, {}, nv),
        Record(5, {e: 0.9 for e in range(1, 6)}, 0.9, {}, nv),
    ]


def test_replay_counts_the_epochs_a_pruner_saves():
    res = replay(records(), LayoutPruner())
    assert res.pruned_at == {0: None, 1: None, 2: None, 3: 1, 4: None, 5: None}
    assert (res.epochs_run, res.epochs_total) == (26, 30)
    assert res.saved == pytest.approx(4 / 30)
    # in another order trial 3 has only two peers and trial 2 three
    res = replay(records(), LayoutPruner(), order=[0, 1, 3, 2, 4, 5])
    assert res.pruned_at[2] == 1 and res.pruned_at[3] is None
    # MedianPruner (as shipped: 3 complete trials, from epoch 1) compares every epoch across layouts
    res = replay(records(), optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    assert res.pruned_at == {0: None, 1: None, 2: None, 3: 1, 4: 1, 5: None}
    assert res.saved == pytest.approx(8 / 30)
    assert replay(records(), optuna.pruners.NopPruner()).saved == 0.0


def test_replay_of_a_failed_trial_counts_its_epochs_and_tells_it_failed():
    recs = records()[:3] + [Record(3, {1: 0.5, 2: math.nan}, None, {}, {LAYOUT_ATTR: F1, N_ATTR: 100})]
    res = replay(recs, optuna.pruners.NopPruner())
    assert (res.epochs_run, res.epochs_total, res.n_pruned) == (17, 17, 0)


def test_records_of_a_stored_study_read_values_layout_and_image_count():
    s = study(optuna.pruners.NopPruner())
    for freeze, v in ((1, 0.7), (3, 0.8)):
        t = s.ask()
        t.suggest_int("freeze_epochs", 1, 3)
        t.set_user_attr("recipe", yaml.safe_dump({"model": {"groups": 3}, "stages": [
            st.model_dump(mode="json") for st in stages_for("two_phase", 5, 3, freeze_epochs=freeze)]}))
        t.set_user_attr(N_ATTR, 100)
        for e in range(1, 6):
            t.report(v, e)
        s.tell(t, v)
    t = s.ask()
    s.tell(t, state=optuna.trial.TrialState.FAIL)      # crashed (no `failure` attr): not a result
    recs = records_of(s)
    assert [r.number for r in recs] == [0, 1]
    assert recs[1].values == {e: 0.8 for e in range(1, 6)} and recs[1].final == 0.8
    assert recs[0].user_attrs == {LAYOUT_ATTR: [[1, 1], [4, 3]], N_ATTR: 100}
    assert recs[1].user_attrs[LAYOUT_ATTR] == [[3, 1], [2, 3]]


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)   # ties: average ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))


def test_peer_quantile_interpolates_linearly():
    from harness.sweep.pruning import _quantile
    assert _quantile([4, 1, 3, 2], 0.5) == 2.5 and _quantile([1, 2, 3, 4], 0.25) == 1.75
    assert _quantile([0.7], 0.9) == 0.7 and _quantile([0.2, 0.6], 0.75) == pytest.approx(0.5)
