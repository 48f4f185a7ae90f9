"""Pure schedule functions: fastai's slice -> per-group LR, and the one-cycle LR and momentum.

Everything here is a function of plain numbers, so it is tested against the formula in
FINETUNE_SEMANTICS.md without building a model.
"""
from __future__ import annotations

import math
from typing import Sequence

DEFAULT_MOMS = (0.95, 0.85, 0.95)


def group_lrs(lr_min: float | None, lr_max: float, n_groups: int, sliced: bool) -> list[float]:
    """Peak LR per layer group: a plain number, fastai `slice(max)` or `slice(min, max)`.

    `sliced=False` gives every group `lr_max`; `slice(max)` gives the body `max/10`, the
    head `max`; `slice(min, max)` spaces the groups geometrically from min to max.
    """
    if not sliced:
        return [lr_max] * n_groups
    if lr_min is None:
        return [lr_max / 10] * (n_groups - 1) + [lr_max]
    if n_groups == 1:
        return [lr_max]
    return [lr_min * (lr_max / lr_min) ** (g / (n_groups - 1)) for g in range(n_groups)]


def cos_anneal(start: float, end: float, x: float) -> float:
    """Cosine interpolation from `start` (x=0) to `end` (x=1)."""
    return start + (1 - math.cos(math.pi * x)) * (end - start) / 2


def two_part_cos(pos: float, start: float, middle: float, end: float, pct: float) -> float:
    """fastai's combined cosine: start->middle over [0, pct), middle->end over [pct, 1]."""
    if pos < pct:
        return cos_anneal(start, middle, pos / pct)
    return cos_anneal(middle, end, (pos - pct) / (1 - pct))


def one_cycle_lr(step: int, total: int, lr_max: float, div: float, div_final: float,
                 pct_start: float) -> float:
    """LR at 0-based `step` of a `total`-step one-cycle fit (fastai `fit_one_cycle`)."""
    return two_part_cos(step / total, lr_max / div, lr_max, lr_max / div_final, pct_start)


def one_cycle_mom(step: int, total: int, pct_start: float,
                  moms: Sequence[float] = DEFAULT_MOMS) -> float:
    """Momentum (Adam beta1) at 0-based `step`: high -> low -> high, same for every group."""
    return two_part_cos(step / total, moms[0], moms[1], moms[2], pct_start)


def one_cycle_table(steps: range, total: int, peaks: Sequence[float], div: float, div_final: float,
                    pct_start: float, moms: Sequence[float] = DEFAULT_MOMS) -> tuple[list[list[float]], list[float]]:
    """(LR per group, momentum) at each of `steps`: exactly one_cycle_lr / one_cycle_mom's values,
    made in one go so that a training loop only reads them (no schedule arithmetic per step)."""
    lrs = [[one_cycle_lr(s, total, peak, div, div_final, pct_start) for peak in peaks] for s in steps]
    return lrs, [one_cycle_mom(s, total, pct_start, moms) for s in steps]
