"""Weight EMA (`optimizer.ema`): a moving average of the whole model state, timm's ModelEmaV3.

After every optimizer step n (1-based, counted across stages), every floating tensor of the
state dict, buffers included (BatchNorm's running statistics, as timm's default), moves
towards the trained model's: ema <- ema + (1 - d_n) * (model - ema); integer buffers are
copied. d_n is ModelEmaV3.get_decay(n): 0 at n = 1 (the average starts as a copy), then
`decay`, or with warm-up min(decay, 1 - (1 + (n - 1)) ** -2/3) (warmup_gamma 1, power 2/3).
decay 0 is the raw model exactly (lerp with weight 1 returns the end point). A run without
`optimizer.ema` makes none of this: its loop is the one it was.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

WARMUP_GAMMA = 1.0
WARMUP_POWER = 2 / 3


def decay_at(n: int, decay: float, warmup: bool) -> float:
    """ModelEmaV3.get_decay(step=n) with update_after_step 0 and min_decay 0."""
    s = max(0, n - 1)
    if s <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1 - (1 + s / WARMUP_GAMMA) ** -WARMUP_POWER, decay), 0.0)


class WeightEma:
    """The averaged copy of `model` (`module`, in eval mode) and the updates that move it."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool, updates: int = 0,
                 state: dict[str, torch.Tensor] | None = None):
        self.decay, self.warmup, self.updates = decay, warmup, updates
        self.module = copy.deepcopy(model)
        if state is not None:   # a run continued from a stage checkpoint
            self.module.load_state_dict(state)
        self.module.eval()
        self.module.requires_grad_(False)
        # the same tensors every step (parameters and buffers are updated in place)
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._floats = ([e for e, m in pairs if e.is_floating_point()], [m for e, m in pairs if e.is_floating_point()])
        self._others = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One step's update, after the optimizer step."""
        self.updates += 1
        weight = 1.0 - decay_at(self.updates, self.decay, self.warmup)
        torch._foreach_lerp_(self._floats[0], self._floats[1], weight)
        for e, m in self._others:
            e.copy_(m)

    def after(self, step_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """`step_fn` followed by this update."""
        def step(*args, **kwargs) -> torch.Tensor:
            loss = step_fn(*args, **kwargs)
            self.update()
            return loss
        return step

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged state, on the CPU (what a stage checkpoint keeps)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
