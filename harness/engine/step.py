"""One training step, the same for fine_tune and the LR finder: the step's hyperparameters
into every param group, then forward, backward, step. And one scoring pass, the same for
validation, the test split, a probe's cached features and the shifted test sets.

On CUDA the forward runs under bfloat16 autocast with channels-last inputs; the loss is
taken in float32. Nothing here reads the device: the loss comes back as a device tensor.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from harness.engine.metrics import confusion, scores


@dataclass(frozen=True)
class Hyper:
    """One step's hyperparameters: an LR per layer group (param groups carry `layer_group`,
    and `lr_scale`, the factor on it: 1 but under layer-wise LR decay), and AdamW's betas."""
    lrs: Sequence[float]
    beta1: float
    sqr_mom: float


_NO_AUTOCAST = nullcontext()   # reusable and reentrant


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; elsewhere no context at all (a disabled torch.autocast does
    nothing either, but costs ~6 µs of Python per step on the CPU)."""
    if device.type != "cuda":
        return _NO_AUTOCAST
    return torch.autocast(device.type, dtype=torch.bfloat16)


def model_format(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The input in the model's memory format: channels-last on CUDA."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float(), y)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               hyper: Hyper, forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Set `hyper` on every param group, then forward, backward, step; the detached loss.
    `forward` replaces the model's forward on images (a probe: the head on features)."""
    lrs, betas = hyper.lrs, (hyper.beta1, hyper.sqr_mom)
    for pg in opt.param_groups:
        pg["lr"] = lrs[pg["layer_group"]] * pg["lr_scale"]   # x * 1.0 is x, bit for bit
        pg["betas"] = betas
    with autocast(x.device):
        out = forward(x) if forward is not None else model(model_format(x, x.device))
    loss = cross_entropy(out, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@dataclass(frozen=True)
class Score:
    loss: float        # mean cross-entropy
    accuracy: float    # argmax accuracy
    n: int             # examples scored
    confusion: torch.Tensor | None = None   # [true, predicted] counts, on the CPU

    def metrics(self) -> dict[str, float]:
        """accuracy, balanced_accuracy and macro_f1 (harness/engine/metrics.py)."""
        return scores(self.confusion)


def score(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
          forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Score | None:
    """The model on (inputs, labels) batches in eval mode without gradients: summed
    cross-entropy and the confusion matrix of the argmax, kept on the device and read once;
    None without a batch.
    `forward` replaces the model's forward on images (a probe: the head on features). The
    model is left in the mode it was found in (train or eval), even when a batch fails."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss_sum = torch.zeros((), device=device)
            cm = None
            n = 0
            for x, y in batches:
                with autocast(device):
                    out = forward(x) if forward is not None else model(model_format(x, device))
                loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum")
                counts = confusion(y, out.argmax(1), out.shape[1])
                cm = counts if cm is None else cm + counts
                n += len(y)
    finally:
        model.train(was_training)
    if not n:
        return None
    cm = cm.cpu()
    return Score(loss_sum.item() / n, int(cm.trace()) / n, n, cm)
