"""WiSE-FT (Wortsman et al. 2022) at compare time: theta = (1 - alpha) theta_0 + alpha theta_ft.

theta_0 is the model the fine-tuning started from: the body as the recipe's weights give it
(rebuilt from the recipe, so nothing is stored for it), and the head the body was first
trained under: the head after the leading head-only stages (lp_ft's probe, two_phase's
frozen epochs, gradual's first stage), kept by the sweep with the trial's model
(harness/sweep/keep.py) or recorded while compare trains a seed (harness/compare.py).
A strategy whose body trains from the first step (naive, discriminative) started from a
random head, which has nothing to ensemble with: there the fine-tuned head is kept and only
the body is interpolated (head_only, whose body never trains, keeps its head as well).
Buffers (BatchNorm statistics) are interpolated like weights; integer ones come from the
nearer end.

Per seed, alpha is chosen on that run's validation split (ties: the larger alpha, the
fine-tuned end), then the test split and every shift are scored at every alpha: the curves
(tables and picture: harness/report.py).
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from harness.engine.recipe import Recipe


def probe_stages(recipe: Recipe) -> int:
    """How many leading stages train the head alone."""
    k = 0
    for stage in recipe.stages:
        if stage.trainable_groups(recipe.model.groups) != 1:
            break
        k += 1
    return k


def head_stage(recipe: Recipe) -> int | None:
    """The stage (counted from 1) whose head theta_0 takes: the end of the probe stages when
    the body trains after them; None when the head started random (theta_0 keeps theta_ft's)."""
    k = probe_stages(recipe)
    return k if 0 < k < len(recipe.stages) else None


class HeadAfter:
    """A StagePlan.on_stage that keeps the model's state after stage `k`, for its head."""

    def __init__(self, k: int):
        self.k, self.state = k, None

    def __call__(self, ckpt) -> None:
        if ckpt.stages_done == self.k:   # the model as it was scored: the average, with a weight EMA
            self.state = ckpt.ema if ckpt.ema is not None else ckpt.model

    def head(self, model) -> dict[str, torch.Tensor] | None:
        """The kept state's head tensors (those not in `model`'s body)."""
        return None if self.state is None else head_of(self.state, model)


def head_of(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    body = model.body_state_dict().keys()
    return {k: v.detach().cpu().clone() for k, v in state.items() if k not in body}


def pretrained_body(recipe: Recipe, n_classes: int) -> dict[str, torch.Tensor]:
    """The body the recipe's weights give, as every run of it starts (the global RNG untouched)."""
    from harness.engine.models import build_model
    m = recipe.model
    with torch.random.fork_rng(devices=[]):
        model = build_model(m.arch, n_classes, m.weights, m.head, m.groups, recipe.data.image_size)
    return {k: v.detach().clone() for k, v in model.body_state_dict().items()}


def start_state(model, body: dict[str, torch.Tensor], head: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """theta_0 for the fine-tuned `model`: the pretrained `body`, and `head` (None: the model's own)."""
    own = model.state_dict()
    body_keys = model.body_state_dict().keys()
    return {k: (body[k] if k in body_keys else (own[k] if head is None else head[k])).to(v.device)
            for k, v in own.items()}


def interpolate(theta_0: dict[str, torch.Tensor], theta_ft: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) theta_0 + alpha theta_ft per tensor (torch.lerp: exactly theta_0 at 0, theta_ft at 1)."""
    return {k: torch.lerp(a, theta_ft[k], alpha) if a.is_floating_point() else (theta_ft[k] if alpha >= 0.5 else a)
            for k, a in theta_0.items()}


def choose(alphas: tuple[float, ...], val: list[float]) -> float:
    """The alpha of the best validation accuracy; ties go to the larger alpha."""
    best = max(val)
    return max(a for a, v in zip(alphas, val) if v == best)


@dataclass
class WiseFt:
    """One strategy's WiSE-FT: per seed, the accuracy at every alpha under each condition
    ("val", "test", then each shift's label) and the alpha validation chose."""
    alphas: tuple[float, ...]
    curves: dict[str, list[list[float]]] = field(default_factory=dict)   # condition -> [seed][alpha]
    chosen: list[float] = field(default_factory=list)                    # per seed

    @property
    def conditions(self) -> list[str]:
        return list(self.curves)

    def add(self, scores: dict[str, list[float]]) -> None:
        """One seed's curves (condition -> accuracy per alpha)."""
        for condition, accs in scores.items():
            self.curves.setdefault(condition, []).append(list(accs))
        self.chosen.append(choose(self.alphas, scores["val"]))

    def at_chosen(self, condition: str) -> list[float]:
        """Per seed, the accuracy under `condition` at the alpha that seed's validation chose."""
        return [curve[self.alphas.index(a)] for curve, a in zip(self.curves[condition], self.chosen)]

    def mean_curve(self, condition: str) -> list[float]:
        return [statistics.fmean(c[i] for c in self.curves[condition]) for i in range(len(self.alphas))]


def score_alphas(model: nn.Module, theta_0: dict[str, torch.Tensor], alphas: tuple[float, ...],
                 score: Callable[[nn.Module], dict[str, float]], at_ft: dict[str, float],
                 val: Callable[[nn.Module], float]) -> dict[str, list[float]]:
    """The accuracies of every interpolation of `model` (theta_ft) with `theta_0`: `score(m)`
    gives the test and shift accuracies, `val(m)` the validation accuracy; where the
    interpolation is theta_ft itself (alpha 1, or theta_0 equal to it) `at_ft` is reused."""
    theta_ft = {k: v.detach().clone() for k, v in model.state_dict().items()}
    same = all(torch.equal(theta_0[k], v) for k, v in theta_ft.items())
    ft_scores = {"val": val(model), **at_ft}
    wise = copy.deepcopy(model)
    out: dict[str, list[float]] = {c: [] for c in ft_scores}
    for alpha in alphas:
        if alpha == 1 or same:
            scores = ft_scores
        else:
            wise.load_state_dict(interpolate(theta_0, theta_ft, alpha))
            scores = {"val": val(wise), **score(wise)}
        for c in out:
            out[c].append(scores[c])
    return out
