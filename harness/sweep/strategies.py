"""Fine-tuning strategies: hyperparameters + a total epoch budget -> a list of stages.

Each strategy spends exactly `epochs` epochs, so strategies compare on equal budgets.
Everything the harness knows of a strategy is its record (`Strategy`, in STRATEGIES below):
the stage builder (whose keyword defaults are the published hyperparameters), the rules
its search space keeps, and how `harness sweep --lr-find` centres its first trial. The
search space, the study loader and the LR-finder centring all read the record.

Adding a strategy: write its stage builder here, add its `Strategy(...)` to STRATEGIES, and
a test in tests/test_strategies.py (its stages and budget). Nothing else changes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from harness.engine.recipe import Stage
from harness.errors import HarnessError
from harness.sweep.space import Rules


def naive(epochs: int, lr: float = 1e-3, pct_start: float = 0.25) -> list[Stage]:
    """Train everything from the start at one LR (fastai's fit_one_cycle)."""
    return [Stage(epochs=epochs, train="all", lr=lr, pct_start=pct_start, div=25)]


def head_only(epochs: int, lr: float = 2e-3, pct_start: float = 0.25) -> list[Stage]:
    """Keep the body frozen throughout; train the head (and, by default, the norm layers)."""
    return [Stage(epochs=epochs, train="head", lr={"max": lr}, pct_start=pct_start, div=25)]


def two_phase(epochs: int, freeze_epochs: int = 1, lr_low: float = 1e-5, lr_high: float = 1e-3,
              pct_start: float = 0.3) -> list[Stage]:
    """fastai's fine_tune: base_lr = 2*lr_high, lr_mult = lr_high/lr_low."""
    _check_freeze(epochs, freeze_epochs)
    return [Stage(epochs=freeze_epochs, train="head", lr={"max": 2 * lr_high}, pct_start=0.99, div=25),
            Stage(epochs=epochs - freeze_epochs, train="all", lr={"min": lr_low, "max": lr_high},
                  pct_start=pct_start, div=5)]


def discriminative(epochs: int, lr_low: float = 1e-5, lr_high: float = 1e-3,
                   pct_start: float = 0.25) -> list[Stage]:
    """Everything trains from the start, with LRs spread across groups by slice(lr_low, lr_high)."""
    return [Stage(epochs=epochs, train="all", lr={"min": lr_low, "max": lr_high},
                  pct_start=pct_start, div=25)]


def gradual(epochs: int, lr: float = 1e-3, lr_decay: float = 2.6, pct_start: float = 0.3,
            n_groups: int = 3) -> list[Stage]:
    """ULMFiT's gradual unfreezing: one more group per stage, each at lr/lr_decay^k below the head.

    The budget is split as evenly as possible over `n_groups` stages (earlier stages get
    the remainder last, so the longest stage is the full unfreeze).
    """
    if epochs < n_groups:
        raise HarnessError(f"budget.epochs: gradual needs at least {n_groups} epochs "
                           f"(one per layer group), got {epochs}")
    base, extra = divmod(epochs, n_groups)
    lengths = [base + (1 if k >= n_groups - extra else 0) for k in range(n_groups)]
    stages = []
    for k, n in enumerate(lengths, start=1):
        lo = lr / lr_decay ** (n_groups - 1)
        stages.append(Stage(epochs=n, train={"last": k}, lr={"min": lo, "max": lr} if k > 1 else {"max": lr},
                            pct_start=pct_start, div=25))
    return stages


def lp_ft(epochs: int, probe_epochs: int = 1, lr_probe: float = 1e-2, lr: float = 1e-4,
          pct_start: float = 0.25) -> list[Stage]:
    """Linear probe then full fine-tune (Kumar et al.); pair it with model.head=linear and
    model.train_bn=false to probe a truly frozen body."""
    _check_freeze(epochs, probe_epochs, field="probe_epochs")
    return [Stage(epochs=probe_epochs, train="head", lr=lr_probe, pct_start=pct_start, div=25),
            Stage(epochs=epochs - probe_epochs, train="all", lr=lr, pct_start=pct_start, div=25)]


def llrd(epochs: int, lr: float = 1e-3, layer_decay: float = 0.75, pct_start: float = 0.25) -> list[Stage]:
    """Layer-wise LR decay (BEiT, ELECTRA): everything trains, block i of a model `depth`
    blocks deep at lr * layer_decay^(depth - i) (timm's blocks: harness/engine/layer_decay.py);
    0.75 is timm's default decay."""
    return [Stage(epochs=epochs, train="all", lr=lr, pct_start=pct_start, div=25, layer_decay=layer_decay)]


def surgical(epochs: int, block: int = 0, lr: float = 1e-3, pct_start: float = 0.25,
             n_groups: int = 3) -> list[Stage]:
    """Surgical fine-tuning (Lee et al. 2023): body group `block` and the head train, the rest
    stays frozen (block 0, the first, is the paper's pick for input-level shifts)."""
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block <= n_groups - 2:
        raise HarnessError(f"block: must be a body group, 0..{n_groups - 2} of the model's {n_groups} "
                           f"layer groups (the head, {n_groups - 1}, always trains), got {block!r}")
    return [Stage(epochs=epochs, train={"groups": [block, n_groups - 1]}, lr=lr, pct_start=pct_start, div=25)]


def l2sp(epochs: int, lr: float = 1e-3, alpha_sp: float = 0.1, beta: float = 0.01,
         pct_start: float = 0.25) -> list[Stage]:
    """L2-SP (Li et al. 2018): everything trains at one LR; the body decays toward the
    pretrained weights (strength alpha_sp), the head toward zero (beta); decoupled, as AdamW's
    weight decay (harness/engine/l2sp.py)."""
    return [Stage(epochs=epochs, train="all", lr=lr, pct_start=pct_start, div=25,
                  l2sp={"alpha_sp": alpha_sp, "beta": beta})]


def _check_freeze(epochs: int, freeze: int, field: str = "freeze_epochs") -> None:
    if not 1 <= freeze < epochs:
        raise HarnessError(f"{field}: must be between 1 and budget.epochs - 1 = {epochs - 1}, got {freeze}")


# An LR-finder valley -> the hyperparameters it sets, read on one stage of the default first trial.
Centring = tuple[tuple[int, Callable[[float], dict[str, float]]], ...]
LR_FROM_STAGE_1: Centring = ((1, lambda v: {"lr": v}),)
SLICE = (("lr_low", "lr_high"),)     # slice(lr_low, lr_high): the bottom never above the top


@dataclass(frozen=True)
class Strategy:
    """One strategy's record.

    `centring`: per (stage counted from 1, valley -> hyperparameters). A valley is an LR for
    the model as it stands at that stage, so an LR is read from the stage it is used in: a
    slice's top from the stage that trains the body (its bottom by the default slice ratio,
    /100), a head LR from the frozen body."""
    name: str
    build: Callable[..., list[Stage]]        # (epochs, **hyperparameters[, n_groups]) -> stages
    rules: Rules = Rules()
    centring: Centring = LR_FROM_STAGE_1

    @property
    def defaults(self) -> dict[str, float | int]:
        """The published default hyperparameters (the builder's keyword defaults)."""
        return {n: p.default for n, p in inspect.signature(self.build).parameters.items()
                if n not in ("epochs", "n_groups") and p.default is not inspect.Parameter.empty}

    def stages(self, epochs: int, n_groups: int = 3, **params) -> list[Stage]:
        """The stages for a budget of `epochs`; `n_groups` (the model's layer groups) reaches
        the builders that depend on it (gradual unfreezes one group per stage, surgical picks
        one body group)."""
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise HarnessError(f"{self.name}: unknown hyperparameter '{sorted(unknown)[0]}' "
                               f"(known: {', '.join(self.defaults)})")
        if "n_groups" in inspect.signature(self.build).parameters:
            params = {**params, "n_groups": n_groups}
        return self.build(epochs, **params)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("naive", naive),
    Strategy("head_only", head_only),
    Strategy("two_phase", two_phase, Rules(SLICE, ("freeze_epochs",)), ((2, lambda v: {"lr_high": v, "lr_low": v / 100}),)),
    Strategy("discriminative", discriminative, Rules(SLICE), ((1, lambda v: {"lr_high": v, "lr_low": v / 100}),)),
    Strategy("gradual", gradual),
    Strategy("lp_ft", lp_ft, Rules(epoch_splits=("probe_epochs",)),
             ((1, lambda v: {"lr_probe": v}), (2, lambda v: {"lr": v}))),
    Strategy("llrd", llrd),
    Strategy("surgical", surgical),
    Strategy("l2sp", l2sp),
)}


def strategy(name: str) -> Strategy:
    """The record of `name`, or one line naming the known ones."""
    if name not in STRATEGIES:
        raise HarnessError(f"strategy: unknown '{name}' (known: {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def defaults(name: str) -> dict[str, float | int]:
    """The published default hyperparameters of a strategy."""
    return strategy(name).defaults


def stages_for(name: str, epochs: int, n_groups: int = 3, **params) -> list[Stage]:
    """Stages of strategy `name` for a budget of `epochs`, params by name (unknown name -> error)."""
    return strategy(name).stages(epochs, n_groups, **params)
