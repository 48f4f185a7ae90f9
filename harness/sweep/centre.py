"""`harness sweep --lr-find`: each strategy's first trial centred on the LR finder.

The default first trial, with each LR the strategy's record names (`Strategy.centring`)
moved to the LR finder's valley on the stage that LR governs, clipped into the study's
ranges, its ordered pairs kept."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harness.engine.lr_find import describe_train, lr_find
from harness.engine.recipe import Recipe
from harness.engine.stages import StagesDidNotFinish
from harness.sweep.space import enforce_order
from harness.sweep.strategies import STRATEGIES
from harness.sweep.study import Study


def centred_first_trials(study: Study, workspace: str | Path, strategies: list[str] | None = None,
                         echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Per strategy, its default first trial with each LR moved to the LR finder's valley on
    the stage that LR governs, clipped into the study's ranges."""
    return {s: _centred_trial(study, s, workspace, echo) for s in strategies or study.strategies}


def _centred_trial(study: Study, strategy: str, workspace: str | Path, echo) -> dict[str, Any]:
    first = study.baseline(strategy)
    recipe, space, moved = study.recipe_for(strategy, first), study.spaces[strategy], dict(first)
    found = False
    for stage, sets in STRATEGIES[strategy].centring:
        valley = _valley(recipe, stage, workspace, strategy, echo)
        if valley is None:
            continue
        found = True
        values = sets(valley)
        echo(f"[{strategy}] lr-find valley {valley:.3g}: stage {stage} "
             f"({describe_train(recipe.stages[stage - 1].train)}) sets {', '.join(values)}")
        for name, value in values.items():
            if name in space and space[name].kind != "fixed":
                moved[name] = space[name].clip(value)
    if not found:
        return first
    moved = enforce_order(moved, space)
    echo(f"[{strategy}] first trial "
         + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in moved.items()))
    return moved


def _valley(recipe: Recipe, stage: int, workspace: str | Path, strategy: str, echo) -> float | None:
    try:
        valley = lr_find(recipe, workspace, stage=stage).suggestions.get("valley")
    except StagesDidNotFinish as e:
        echo(f"[{strategy}] lr-find on stage {stage}: {e}; its hyperparameters keep their defaults")
        return None
    if valley is None:
        echo(f"[{strategy}] lr-find found no valley on stage {stage}; its hyperparameters keep their defaults")
    return valley
