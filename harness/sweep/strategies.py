"""Fine-tuning strategies: hyperparameters + a total epoch budget -> a list of stages.

Each strategy spends exactly `epochs` epochs, so strategies compare on equal budgets.
"""
from __future__ import annotations

import inspect
from typing import Callable

from harness.errors import HarnessError
from harness.engine.recipe import Stage


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


def _check_freeze(epochs: int, freeze: int, field: str = "freeze_epochs") -> None:
    if not 1 <= freeze < epochs:
        raise HarnessError(f"{field}: must be between 1 and budget.epochs - 1 = {epochs - 1}, got {freeze}")


STRATEGIES: dict[str, Callable[..., list[Stage]]] = {
    "naive": naive, "head_only": head_only, "two_phase": two_phase,
    "discriminative": discriminative, "gradual": gradual, "lp_ft": lp_ft,
}


def defaults(strategy: str) -> dict[str, float | int]:
    """The published default hyperparameters of a strategy (its signature's defaults)."""
    sig = inspect.signature(STRATEGIES[strategy])
    return {n: p.default for n, p in sig.parameters.items()
            if n not in ("epochs", "n_groups") and p.default is not inspect.Parameter.empty}


def stages_for(strategy: str, epochs: int, n_groups: int = 3, **params) -> list[Stage]:
    """Stages of `strategy` for a budget of `epochs`, params by name (unknown name -> error).
    `n_groups` (the model's layer groups) reaches the strategies that depend on it: gradual
    unfreezes one group per stage."""
    if strategy not in STRATEGIES:
        raise HarnessError(f"strategy: unknown '{strategy}' (known: {', '.join(STRATEGIES)})")
    unknown = set(params) - set(defaults(strategy))
    if unknown:
        raise HarnessError(f"{strategy}: unknown hyperparameter '{sorted(unknown)[0]}' "
                           f"(known: {', '.join(defaults(strategy))})")
    fn = STRATEGIES[strategy]
    if "n_groups" in inspect.signature(fn).parameters:
        params = {**params, "n_groups": n_groups}
    return fn(epochs, **params)
