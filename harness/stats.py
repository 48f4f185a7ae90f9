"""The statistics behind `harness compare`: every pair of strategies tested on the same seeds.

- A pair (a, b) is tested with a paired t-test over the seeds both ran (seed k of a against
  seed k of b: the same data split, shuffling and initial head), with the mean difference
  a - b and its 95 % t interval.
- The pairs' p-values are Holm-corrected (Holm 1979): the family-wise error rate over all
  pairs stays at most alpha, without assuming the tests independent.
- `--seeds auto` looks at the data after every added seed. Looking repeatedly raises the
  chance of a false "separated", so each look's Holm-adjusted p-values are also multiplied
  by the number of looks the plan allows (Bonferroni over the looks). The reported p is the
  one the stopping rule used, and the family-wise error rate over every pair and every look
  stays at most alpha. It is conservative; it needs no assumption about how looks correlate.
- From the leading pair's observed paired spread, the seeds that would separate it: the
  smallest n whose t-test at the corrected level has 80 % power for the observed difference
  (the exact power: the t statistic's noncentral t distribution, two-sided).
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Sequence

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS_ESTIMATE = 1000   # beyond this, "more than 1000"


@dataclass(frozen=True)
class PairTest:
    a: str
    b: str
    n: int                      # seeds both ran
    mean_diff: float            # mean of a - b
    ci95: tuple[float, float]   # 95 % t interval of the mean difference (per pair)
    p: float | None             # paired t-test, two-sided; None with fewer than 2 seeds
    p_adjusted: float | None = None   # Holm across pairs (and Bonferroni across looks)

    @property
    def separated(self) -> bool:
        return self.p_adjusted is not None and self.p_adjusted < ALPHA


def paired_test(a: str, xa: Sequence[float], b: str, xb: Sequence[float]) -> PairTest:
    """Paired t-test of a against b over the seeds both have (scipy's, on the differences)."""
    from scipy import stats
    n = min(len(xa), len(xb))
    diffs = [x - y for x, y in zip(xa[:n], xb[:n])]
    mean = statistics.fmean(diffs) if n else 0.0
    if n < 2:
        return PairTest(a, b, n, mean, (mean, mean), None)
    if statistics.stdev(diffs) == 0:   # every seed gave the same difference: certain, or no difference at all
        return PairTest(a, b, n, mean, (mean, mean), 1.0 if mean == 0 else 0.0)
    with warnings.catch_warnings():   # differences equal but for float rounding: a precision warning
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_1samp(diffs, 0.0)
    lo, hi = res.confidence_interval(0.95)
    return PairTest(a, b, n, mean, (float(lo), float(hi)), float(res.pvalue))


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def all_pairs(results: dict[str, Sequence[float]], looks: int = 1) -> list[PairTest]:
    """Every pair (a ahead of b in the given order, best first), Holm-adjusted over the
    pairs and Bonferroni-adjusted over `looks`."""
    names = list(results)
    pairs = [paired_test(a, results[a], b, results[b]) for i, a in enumerate(names) for b in names[i + 1:]]
    tested = [k for k, t in enumerate(pairs) if t.p is not None]
    adjusted = holm([pairs[k].p for k in tested])
    for k, adj in zip(tested, adjusted):
        t = pairs[k]
        pairs[k] = PairTest(t.a, t.b, t.n, t.mean_diff, t.ci95, t.p, min(1.0, adj * looks))
    return pairs


def paired_power(effect: float, n: int, level: float) -> float:
    """The exact power of a two-sided paired t-test at `level` over `n` seeds when the true
    mean difference is `effect` standard deviations of the differences: the statistic
    follows a noncentral t with n - 1 degrees of freedom and noncentrality effect * sqrt(n)."""
    from scipy import stats
    df, nc = n - 1, abs(effect) * math.sqrt(n)
    crit = stats.t.ppf(1 - level / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_to_separate(diffs: Sequence[float], level: float) -> int | None:
    """Seeds a paired t-test at two-sided `level` needs for 80 % power (exact: noncentral t),
    if the observed mean difference and spread are the truth; None when the difference is 0
    (no number will do)."""
    if len(diffs) < 2:
        return None
    mean, sd = abs(statistics.fmean(diffs)), statistics.stdev(diffs)
    if mean == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, MAX_SEEDS_ESTIMATE + 1):   # the power grows with n: the first is the smallest
        if paired_power(mean / sd, n, level) >= POWER:
            return n
    return MAX_SEEDS_ESTIMATE + 1
