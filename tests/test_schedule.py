"""Tests for harness.engine.schedule: fastai's slice -> per-group LRs and the one-cycle LR/momentum.

Expectations come from FINETUNE_SEMANTICS.md: a reference implementation of the doc's
formula written out here with math.cos, the doc's worked example, and torch's OneCycleLR
with the doc's adapted arguments as an independent implementation.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness.engine.schedule import DEFAULT_MOMS, group_lrs, one_cycle_lr, one_cycle_mom, one_cycle_table


# --- an independent reference of the doc's formula ---------------------------------------

def ref_f(pos: float, a: float, m: float, e: float, p: float) -> float:
    """f(pos; a, m, e, p) from FINETUNE_SEMANTICS.md, written out independently."""
    if pos < p:
        x = pos / p
        return a + (1 - math.cos(math.pi * x)) * (m - a) / 2
    x = (pos - p) / (1 - p)
    return m + (1 - math.cos(math.pi * x)) * (e - m) / 2


def ref_lr(s: int, T: int, lr_max: float, div: float, div_final: float, p: float) -> float:
    return ref_f(s / T, lr_max / div, lr_max, lr_max / div_final, p)


def ref_mom(s: int, T: int, p: float) -> float:
    return ref_f(s / T, 0.95, 0.85, 0.95, p)


CYCLES = [  # (T, pct_start, div, div_final)
    (10, 0.99, 25.0, 1e5),
    (20, 0.3, 5.0, 1e5),
    (100, 0.25, 25.0, 1e5),
    (7, 0.5, 10.0, 1e4),
    (1, 0.25, 25.0, 1e5),
    (37, 0.1, 3.0, 100.0),
]


# --- group_lrs ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_plain_number_gives_every_group_the_same_lr(n):
    assert group_lrs(None, 3e-3, n, sliced=False) == [3e-3] * n


def test_slice_max_gives_body_a_tenth_and_head_the_max():
    assert group_lrs(None, 2e-3, 3, sliced=True) == pytest.approx([2e-4, 2e-4, 2e-3], rel=1e-12)
    assert group_lrs(None, 1e-2, 4, sliced=True) == pytest.approx([1e-3, 1e-3, 1e-3, 1e-2], rel=1e-12)


def test_slice_min_max_is_geometric_across_three_groups():
    assert group_lrs(1e-5, 1e-3, 3, sliced=True) == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)


def test_slice_min_max_geometric_for_five_groups():
    got = group_lrs(1e-6, 1e-2, 5, sliced=True)
    assert got == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2], rel=1e-12)
    ratios = [b / a for a, b in zip(got, got[1:])]
    assert ratios == pytest.approx([10.0] * 4, rel=1e-12)


def test_slice_on_a_single_group_gives_the_max():
    # fastai: even_mults(start, stop, 1) is stop; slice(max) has no body to divide
    assert group_lrs(1e-5, 1e-3, 1, sliced=True) == pytest.approx([1e-3])
    assert group_lrs(None, 1e-3, 1, sliced=True) == pytest.approx([1e-3])


def test_slice_with_min_equal_max_is_flat():
    assert group_lrs(1e-3, 1e-3, 3, sliced=True) == pytest.approx([1e-3] * 3, rel=1e-12)


# --- one-cycle vs the formula ------------------------------------------------------------------

@pytest.mark.parametrize("T,pct,div,div_final", CYCLES)
def test_one_cycle_lr_matches_the_doc_formula_at_every_step(T, pct, div, div_final):
    lr_max = 3e-3
    for s in range(T):
        want = ref_lr(s, T, lr_max, div, div_final, pct)
        got = one_cycle_lr(s, T, lr_max, div, div_final, pct)
        assert got == pytest.approx(want, rel=1e-12, abs=0), f"step {s}"


@pytest.mark.parametrize("T,pct,div,div_final", CYCLES)
def test_one_cycle_mom_matches_the_doc_formula_at_every_step(T, pct, div, div_final):
    for s in range(T):
        assert one_cycle_mom(s, T, pct) == pytest.approx(ref_mom(s, T, pct), rel=1e-12, abs=0), f"step {s}"


@pytest.mark.parametrize("T,pct,div,div_final", CYCLES)
def test_one_cycle_table_is_the_per_step_values_exactly(T, pct, div, div_final):
    """The loop reads a table made per epoch: the same floats as the per-step functions, bit for bit."""
    peaks, moms, half = [1e-4, 1e-3, 3e-3], (0.9, 0.8, 0.85), range(T // 2, T)
    lrs, betas = one_cycle_table(half, T, peaks, div, div_final, pct, moms)
    assert lrs == [[one_cycle_lr(s, T, p, div, div_final, pct) for p in peaks] for s in half]
    assert betas == [one_cycle_mom(s, T, pct, moms) for s in half]


def test_one_cycle_mom_uses_given_moms():
    moms = (0.9, 0.8, 0.85)
    T, p = 12, 0.3
    for s in range(T):
        want = ref_f(s / T, *moms, p)
        assert one_cycle_mom(s, T, p, moms) == pytest.approx(want, rel=1e-12)


def test_default_moms_are_fastai_defaults():
    assert tuple(DEFAULT_MOMS) == (0.95, 0.85, 0.95)


def test_worked_example_phase1():
    """fine_tune(2, 2e-3), 10 steps/epoch, phase 1: T=10, slice(2e-3), pct 0.99, div 25."""
    body = [one_cycle_lr(s, 10, 2e-3 / 10, 25, 1e5, 0.99) for s in range(3)]
    head = [one_cycle_lr(s, 10, 2e-3, 25, 1e5, 0.99) for s in range(3)]
    mom = [one_cycle_mom(s, 10, 0.99) for s in range(3)]
    assert body == pytest.approx([8.0e-06, 1.279317e-05, 2.669405e-05], rel=1e-6)
    assert head == pytest.approx([8.0e-05, 1.279317e-04, 2.669405e-04], rel=1e-6)
    assert mom == pytest.approx([0.95, 0.947504, 0.940264], rel=1e-6)


def test_worked_example_phase2():
    """Phase 2: T=20, base_lr 1e-3, slice(1e-5, 1e-3), pct 0.3, div 5, div_final 1e5."""
    peaks = group_lrs(1e-3 / 100, 1e-3, 3, sliced=True)
    g0 = [one_cycle_lr(s, 20, peaks[0], 5, 1e5, 0.3) for s in (0, 1, 2, 19)]
    assert g0 == pytest.approx([2.0e-06, 2.535898e-06, 4.0e-06, 1.254593e-07], rel=1e-6)
    for s in range(20):
        lrs = [one_cycle_lr(s, 20, pk, 5, 1e5, 0.3) for pk in peaks]
        assert lrs[1] == pytest.approx(10 * lrs[0], rel=1e-9)
        assert lrs[2] == pytest.approx(100 * lrs[0], rel=1e-9)
    mom = [one_cycle_mom(s, 20, 0.3) for s in range(3)]
    assert mom == pytest.approx([0.95, 0.943301, 0.925], rel=1e-6)


@pytest.mark.parametrize("T,pct,div,div_final", CYCLES)
def test_position_never_reaches_one(T, pct, div, div_final):
    lr_max = 1e-3
    assert one_cycle_lr(0, T, lr_max, div, div_final, pct) == pytest.approx(lr_max / div, rel=1e-12)
    last = one_cycle_lr(T - 1, T, lr_max, div, div_final, pct)
    assert last > lr_max / div_final * (1 + 1e-9)
    # the step count is 0-based: the final value lr_max/div_final is only reached at s == T
    assert one_cycle_lr(T, T, lr_max, div, div_final, pct) == pytest.approx(lr_max / div_final, rel=1e-9)


@pytest.mark.parametrize("pct", [0.1, 0.25, 0.3, 0.5, 0.99])
def test_peak_sits_at_pct_start(pct):
    T, lr_max = 100, 1e-3
    lrs = [one_cycle_lr(s, T, lr_max, 25, 1e5, pct) for s in range(T)]
    peak_step = round(pct * T)
    assert lrs[peak_step] == pytest.approx(lr_max, rel=1e-2)
    assert max(lrs) <= lr_max * (1 + 1e-12)
    # rises before the peak, falls after it
    assert all(a < b for a, b in zip(lrs[:peak_step], lrs[1:peak_step + 1]))
    assert all(a > b for a, b in zip(lrs[peak_step:], lrs[peak_step + 1:]))
    moms = [one_cycle_mom(s, T, pct) for s in range(T)]
    assert moms[peak_step] == pytest.approx(0.85, rel=1e-3)


# --- cross-check with torch's OneCycleLR ---------------------------------------------------------

def _torch_one_cycle(T, lr_max, *, total_steps, pct_start, div, final_div, n_values):
    """lr and momentum read off torch's OneCycleLR for steps 0..n_values-1."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr_max, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr_max, total_steps=total_steps, pct_start=pct_start, anneal_strategy="cos",
        cycle_momentum=True, base_momentum=0.85, max_momentum=0.95, div_factor=div,
        final_div_factor=final_div, three_phase=False)
    lrs, moms = [], []
    for s in range(n_values):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        if s < n_values - 1:
            opt.step()
            sched.step()
    return lrs, moms


@pytest.mark.parametrize("T,pct,div,div_final", [c for c in CYCLES if c[0] >= 2])
def test_naive_torch_one_cycle_does_not_match(T, pct, div, div_final):
    """The doc: OneCycleLR with the same arguments ends at max/(div*div_final) and peaks early."""
    lr_max = 1e-3
    naive, _ = _torch_one_cycle(T, lr_max, total_steps=T, pct_start=pct, div=div,
                                final_div=div_final, n_values=T)
    ours = [one_cycle_lr(s, T, lr_max, div, div_final, pct) for s in range(T)]
    assert naive[-1] == pytest.approx(lr_max / (div * div_final), rel=1e-6)
    assert ours[-1] > lr_max / div_final
    worst = max(abs(a - b) / b for a, b in zip(naive, ours))
    assert worst > 1e-2
    # it reaches the peak one step before pct_start*T (when that step is a whole step)
    peak = round(pct * T)
    if peak == pct * T and 1 <= peak < T:
        assert naive[peak - 1] == pytest.approx(lr_max, rel=1e-9)
        assert ours[peak - 1] < lr_max * (1 - 1e-3)


@pytest.mark.parametrize("T,pct,div,div_final", CYCLES)
def test_adapted_torch_one_cycle_matches_at_every_step(T, pct, div, div_final):
    """The doc's adapted OneCycleLR (T+1 steps, shifted pct, final_div=div_final/div) stepped
    T times gives our lr and momentum at every step: an independent implementation."""
    lr_max = 2e-3
    lrs, moms = _torch_one_cycle(T, lr_max, total_steps=T + 1, pct_start=(pct * T + 1) / (T + 1),
                                 div=div, final_div=div_final / div, n_values=T + 1)
    for s in range(T):
        assert one_cycle_lr(s, T, lr_max, div, div_final, pct) == pytest.approx(lrs[s], rel=1e-6), f"lr step {s}"
        assert one_cycle_mom(s, T, pct) == pytest.approx(moms[s], rel=1e-6), f"mom step {s}"
    # after T steps the adapted scheduler sits at the end value lr_max/div_final
    assert lrs[T] == pytest.approx(lr_max / div_final, rel=1e-6)
