"""Tests for harness.sweep.strategies: each strategy's stages, the epoch budget, fastai fine_tune LRs."""
from __future__ import annotations

import pytest

from harness.errors import HarnessError
from harness.engine.recipe import LRSlice, Stage
from harness.engine.schedule import one_cycle_lr, one_cycle_mom
from harness.sweep.strategies import (STRATEGIES, defaults, discriminative, gradual, head_only, l2sp, llrd, lp_ft,
                                naive, stages_for, surgical, two_phase)

N_GROUPS = 3


def lr_parts(st: Stage):
    """(min, max) of a sliced LR, or the plain number."""
    return (st.lr.min, st.lr.max) if isinstance(st.lr, LRSlice) else st.lr


# --- each strategy's stages ------------------------------------------------------------------

def test_naive_is_one_stage_training_everything_at_one_lr():
    (st,) = naive(5, lr=3e-3, pct_start=0.4)
    assert (st.epochs, st.train, st.lr, st.pct_start, st.div, st.div_final) == (5, "all", 3e-3, 0.4, 25, 1e5)
    assert not isinstance(st.lr, LRSlice)
    assert st.peak_lrs(N_GROUPS) == [3e-3] * 3


def test_head_only_trains_the_head_with_slice_max():
    (st,) = head_only(4, lr=2e-3)
    assert (st.epochs, st.train, st.div) == (4, "head", 25)
    assert isinstance(st.lr, LRSlice) and st.lr.min is None and st.lr.max == 2e-3
    assert st.trainable_groups(N_GROUPS) == 1


def test_two_phase_is_fastai_fine_tune():
    s1, s2 = two_phase(5, freeze_epochs=2, lr_low=1e-5, lr_high=1e-3, pct_start=0.3)
    # phase 1: freeze, fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99), base_lr = 2*lr_high
    assert (s1.epochs, s1.train, s1.pct_start, s1.div, s1.div_final) == (2, "head", 0.99, 25, 1e5)
    assert lr_parts(s1) == (None, pytest.approx(2e-3, rel=1e-12))
    # phase 2: unfreeze, fit_one_cycle(E - freeze, slice(base_lr/2/lr_mult, base_lr/2), pct, div=5)
    assert (s2.epochs, s2.train, s2.pct_start, s2.div, s2.div_final) == (3, "all", 0.3, 5, 1e5)
    assert lr_parts(s2) == (pytest.approx(1e-5, rel=1e-12), pytest.approx(1e-3, rel=1e-12))
    assert tuple(s1.moms) == tuple(s2.moms) == (0.95, 0.85, 0.95)


def test_discriminative_spreads_lrs_over_groups_from_the_start():
    (st,) = discriminative(4, lr_low=1e-6, lr_high=1e-2)
    assert (st.epochs, st.train) == (4, "all")
    assert st.peak_lrs(N_GROUPS) == pytest.approx([1e-6, 1e-4, 1e-2], rel=1e-12)


def test_gradual_unfreezes_one_group_per_stage():
    stages = gradual(7, lr=1e-3, lr_decay=2.6)
    assert [st.trainable_groups(N_GROUPS) for st in stages] == [1, 2, 3]
    lengths = [st.epochs for st in stages]
    assert lengths == [2, 2, 3]          # remainder goes to the later stages, the full unfreeze longest
    # below the head, group g trains at lr / 2.6**(distance from the head)
    assert stages[-1].peak_lrs(N_GROUPS) == pytest.approx([1e-3 / 2.6 ** 2, 1e-3 / 2.6, 1e-3], rel=1e-12)
    assert stages[1].peak_lrs(N_GROUPS)[1:] == pytest.approx([1e-3 / 2.6, 1e-3], rel=1e-12)
    assert stages[0].peak_lrs(N_GROUPS)[-1] == pytest.approx(1e-3)


def test_lp_ft_probes_then_fine_tunes():
    probe, ft = lp_ft(6, probe_epochs=2, lr_probe=1e-2, lr=1e-4)
    assert (probe.epochs, probe.train, probe.lr) == (2, "head", 1e-2)
    assert (ft.epochs, ft.train, ft.lr) == (4, "all", 1e-4)


def test_llrd_trains_everything_at_one_lr_decayed_per_block():
    (st,) = llrd(5, lr=2e-3, layer_decay=0.65, pct_start=0.3)
    assert (st.epochs, st.train, st.lr, st.layer_decay, st.pct_start, st.div) == (5, "all", 2e-3, 0.65, 0.3, 25)
    assert st.peak_lrs(N_GROUPS) == [2e-3] * 3 and st.l2sp is None


def test_surgical_trains_one_body_group_and_the_head():
    (st,) = surgical(4, block=1, lr=3e-3, n_groups=5)
    assert (st.epochs, st.lr, st.trained_groups(5)) == (4, 3e-3, (1, 4))
    assert stages_for("surgical", 4, n_groups=3)[0].trained_groups(3) == (0, 2)   # block 0 by default


@pytest.mark.parametrize("block", [-1, 2, 7, 0.5, True])
def test_surgical_block_must_be_a_body_group(block):
    with pytest.raises(HarnessError) as ei:
        surgical(4, block=block, n_groups=3)
    assert str(ei.value).startswith("block: must be a body group, 0..1") and "\n" not in str(ei.value)


def test_l2sp_trains_everything_with_its_two_decays():
    (st,) = l2sp(3, lr=5e-4, alpha_sp=0.2, beta=0.05)
    assert (st.epochs, st.train, st.lr, st.l2sp.alpha_sp, st.l2sp.beta) == (3, "all", 5e-4, 0.2, 0.05)
    assert st.layer_decay is None


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("E", [3, 4, 5, 7])
def test_every_strategy_spends_exactly_the_budget(strategy, E):
    stages = stages_for(strategy, E)
    assert sum(st.epochs for st in stages) == E
    assert all(st.epochs >= 1 for st in stages)


@pytest.mark.parametrize("E", [3, 4, 5, 6, 7, 10])
def test_gradual_stage_lengths_are_even_with_the_longest_last(E):
    lengths = [st.epochs for st in gradual(E)]
    assert sum(lengths) == E and len(lengths) == 3
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths)


@pytest.mark.parametrize("freeze", [0, -1, 3, 4])
def test_two_phase_freeze_epochs_out_of_range(freeze):
    with pytest.raises(HarnessError) as ei:
        two_phase(3, freeze_epochs=freeze)
    assert "freeze_epochs" in str(ei.value) and "\n" not in str(ei.value)


def test_two_phase_needs_at_least_two_epochs():
    with pytest.raises(HarnessError):
        stages_for("two_phase", 1)


@pytest.mark.parametrize("probe", [0, 4, 5])
def test_lp_ft_probe_epochs_out_of_range(probe):
    with pytest.raises(HarnessError, match="probe_epochs"):
        lp_ft(4, probe_epochs=probe)


@pytest.mark.parametrize("E", [1, 2])
def test_gradual_needs_one_epoch_per_group(E):
    with pytest.raises(HarnessError, match="gradual"):
        gradual(E)


def test_stages_for_unknown_strategy():
    with pytest.raises(HarnessError) as ei:
        stages_for("three_phase", 5)
    msg = str(ei.value)
    assert "three_phase" in msg and "two_phase" in msg


def test_stages_for_unknown_hyperparameter():
    with pytest.raises(HarnessError) as ei:
        stages_for("two_phase", 5, lr_hgh=1e-3)
    assert "lr_hgh" in str(ei.value) and "lr_high" in str(ei.value)
    # epochs and n_groups are not hyperparameters one can pass
    with pytest.raises(HarnessError):
        stages_for("naive", 5, freeze_epochs=1)


def test_stages_for_passes_hyperparameters():
    s1, s2 = stages_for("two_phase", 6, freeze_epochs=2, lr_high=4e-3)
    assert (s1.epochs, s2.epochs) == (2, 4)
    assert s1.lr.max == pytest.approx(8e-3) and s2.lr.max == pytest.approx(4e-3)


def test_published_defaults():
    assert defaults("naive") == {"lr": 1e-3, "pct_start": 0.25}
    assert defaults("head_only") == {"lr": 2e-3, "pct_start": 0.25}
    assert defaults("two_phase") == {"freeze_epochs": 1, "lr_low": 1e-5, "lr_high": 1e-3, "pct_start": 0.3}
    assert defaults("llrd") == {"lr": 1e-3, "layer_decay": 0.75, "pct_start": 0.25}   # timm's decay
    assert defaults("surgical") == {"block": 0, "lr": 1e-3, "pct_start": 0.25}
    assert defaults("l2sp") == {"lr": 1e-3, "alpha_sp": 0.1, "beta": 0.01, "pct_start": 0.25}


def test_defaults_are_what_stages_for_uses():
    s1, s2 = stages_for("two_phase", 4)
    assert (s1.epochs, s1.lr.max, s2.lr.min, s2.lr.max, s2.pct_start) == (1, 2e-3, 1e-5, 1e-3, 0.3)
    (st,) = stages_for("naive", 4)
    assert (st.lr, st.pct_start) == (1e-3, 0.25)


# --- two_phase on a 3-group model is fastai's fine_tune ---------------------------------------------

def fastai_fine_tune_peaks(lr_high: float, lr_low: float, n: int):
    """fine_tune(base_lr=2*lr_high, lr_mult=lr_high/lr_low) per-group peaks, from fastai's code path."""
    base_lr = 2 * lr_high
    lr_mult = lr_high / lr_low
    phase1 = [base_lr / 10] * (n - 1) + [base_lr]            # slice(base_lr)
    base_lr /= 2
    lo, hi = base_lr / lr_mult, base_lr                       # slice(base_lr/lr_mult, base_lr)
    phase2 = [lo * (hi / lo) ** (g / (n - 1)) for g in range(n)]
    return phase1, phase2


@pytest.mark.parametrize("lr_high,lr_low", [(1e-3, 1e-5), (3e-3, 1e-4), (1e-2, 1e-2)])
def test_two_phase_peaks_match_fastai_fine_tune(lr_high, lr_low):
    s1, s2 = two_phase(4, lr_low=lr_low, lr_high=lr_high)
    want1, want2 = fastai_fine_tune_peaks(lr_high, lr_low, N_GROUPS)
    assert s1.peak_lrs(N_GROUPS) == pytest.approx(want1, rel=1e-12)
    assert s2.peak_lrs(N_GROUPS) == pytest.approx(want2, rel=1e-12)
    assert (s1.trainable_groups(N_GROUPS), s2.trainable_groups(N_GROUPS)) == (1, 3)


def test_two_phase_default_peaks_are_the_documented_numbers():
    s1, s2 = two_phase(3, lr_low=1e-5, lr_high=1e-3)
    assert s1.peak_lrs(N_GROUPS) == pytest.approx([2e-4, 2e-4, 2e-3], rel=1e-12)
    assert s2.peak_lrs(N_GROUPS) == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)


def test_two_phase_reproduces_the_worked_example():
    """fine_tune(2, 2e-3) with 10 steps/epoch = two_phase(3, lr_high=1e-3, lr_low=1e-5)."""
    s1, s2 = two_phase(3, freeze_epochs=1, lr_low=1e-5, lr_high=1e-3, pct_start=0.3)
    T1, T2 = s1.epochs * 10, s2.epochs * 10
    assert (T1, T2) == (10, 20)
    p1 = s1.peak_lrs(N_GROUPS)
    lr = lambda st, T, peak, s: one_cycle_lr(s, T, peak, st.div, st.div_final, st.pct_start)  # noqa: E731
    assert [lr(s1, T1, p1[0], s) for s in range(3)] == pytest.approx([8.0e-06, 1.279317e-05, 2.669405e-05], rel=1e-6)
    assert [lr(s1, T1, p1[2], s) for s in range(3)] == pytest.approx([8.0e-05, 1.279317e-04, 2.669405e-04], rel=1e-6)
    assert [one_cycle_mom(s, T1, s1.pct_start, s1.moms) for s in range(3)] == pytest.approx(
        [0.95, 0.947504, 0.940264], rel=1e-6)
    p2 = s2.peak_lrs(N_GROUPS)
    assert [lr(s2, T2, p2[0], s) for s in (0, 1, 2, 19)] == pytest.approx(
        [2.0e-06, 2.535898e-06, 4.0e-06, 1.254593e-07], rel=1e-6)
    assert [one_cycle_mom(s, T2, s2.pct_start, s2.moms) for s in range(3)] == pytest.approx(
        [0.95, 0.943301, 0.925], rel=1e-6)


# --- the records: what the search space, the study loader and the LR finder read -----------------

@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_records_rules_and_centring_name_its_own_hyperparameters_and_stages(name):
    """A record that names a hyperparameter its builder does not have, or centres on a
    stage its default stages do not have, would be silently ignored: refuse it here."""
    record = STRATEGIES[name]
    known = set(record.defaults)
    for a, b in record.rules.ordered_pairs:
        assert {a, b} <= known and record.defaults[a] <= record.defaults[b]
    assert set(record.rules.epoch_splits) <= known
    stages = record.stages(6)
    for stage, sets in record.centring:
        assert 1 <= stage <= len(stages)
        assert set(sets(1e-3)) <= known


def test_epoch_splits_and_ordered_pairs_are_where_the_strategies_need_them():
    assert STRATEGIES["two_phase"].rules.epoch_splits == ("freeze_epochs",)
    assert STRATEGIES["lp_ft"].rules.epoch_splits == ("probe_epochs",)
    assert {n for n, r in STRATEGIES.items() if r.rules.ordered_pairs} == {"two_phase", "discriminative"}
    # two_phase's slice top is read from the stage that trains the body (its second)
    (stage, sets), = STRATEGIES["two_phase"].centring
    assert stage == 2 and sets(1e-3) == pytest.approx({"lr_high": 1e-3, "lr_low": 1e-5})
