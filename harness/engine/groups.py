"""The layer-groups contract every model meets, the new heads, freezing and parameter groups.

A model is cut into layer groups, input -> output, the new head last. The trainer sees only
this contract (`LayerGroups`): `n_groups`, `group_names`, `group_members()` (every parameter in
exactly one group), `body_state_dict()`, `group_blocks()`, `input_stats` (the mean/std the
weights expect), and the split forward `head_forward(features(x)) == model(x)` (what the body
computes, then the head on it). harness/engine/models.py builds torchvision models to it,
timm_models.py timm ones.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from harness.engine.input_stats import InputStats

# fastai's norm types, plus GroupNorm/RMSNorm (timm's NF-nets, GN EfficientNets, some ViTs):
# none of fastai's splits holds one, so the torchvision archs behave exactly as fastai's.
NORM_TYPES = tuple(t for t in (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                               nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None)


class AdaptiveConcatPool2d(nn.Module):
    """Max- and average-pool to 1x1 and concatenate, max first (fastai)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.adaptive_max_pool2d(x, 1),
                          nn.functional.adaptive_avg_pool2d(x, 1)], dim=1)


def _head_bn(n: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(n)
    nn.init.ones_(bn.weight)
    nn.init.constant_(bn.bias, 1e-3)
    return bn


def fastai_head(nf: int, n_classes: int, pool: bool = True) -> nn.Sequential:
    """fastai's default head: concat-pool, BN, dropout, 512 hidden, BN, dropout, linear.
    `pool=False` takes `nf` pooled features (a timm ViT's pre-logits) instead of a map."""
    n_in = 2 * nf if pool else nf
    first = [AdaptiveConcatPool2d(), nn.Flatten()] if pool else []
    head = nn.Sequential(
        *first,
        _head_bn(n_in), nn.Dropout(0.25), nn.Linear(n_in, 512, bias=False), nn.ReLU(inplace=True),
        _head_bn(512), nn.Dropout(0.5), nn.Linear(512, n_classes, bias=False))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
    return head


def linear_head(nf: int, n_classes: int) -> nn.Sequential:
    """A plain head: average-pool, one linear layer."""
    fc = nn.Linear(nf, n_classes)
    nn.init.kaiming_normal_(fc.weight)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)


HEADS = {"fastai": fastai_head, "linear": linear_head}


Member = tuple[str, nn.Parameter, bool]   # (qualified name, parameter, owned by a norm layer)


def group_names(n: int) -> list[str]:
    """Names of n layer groups, input -> output: early/late/head for fastai's 3."""
    if n == 3:
        return ["early", "late", "head"]
    if n == 2:
        return ["body", "head"]
    return [f"body{g}" for g in range(1, n)] + ["head"]


class LayerGroups:
    """What the trainer needs of a model: its layer groups and its weights' input statistics.
    Mixed into an `nn.Module` (first among the bases, so its `train` is the one called)."""
    arch: str
    group_names: list[str]
    input_stats: InputStats = InputStats()   # ImageNet's, unless the weights say otherwise
    eval_modules: tuple[nn.Module, ...] = ()  # truly frozen (set_trainable, train_bn off): always in eval mode

    def train(self, mode: bool = True):
        """nn.Module.train, then the truly frozen modules back to eval mode (fastai's BnFreeze):
        the closing `model.train(...)` of a scoring pass (step.score) leaves them frozen."""
        super().train(mode)   # type: ignore[misc]  (nn.Module's, next in the MRO)
        for m in self.eval_modules:
            m.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the body hands the head group (a feature map, or pooled features)."""
        raise NotImplementedError

    def head_forward(self, f: torch.Tensor) -> torch.Tensor:
        """The head group on `features(x)`: together exactly `model(x)`."""
        raise NotImplementedError

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def group_members(self) -> list[list[Member]]:
        raise NotImplementedError

    def body_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def group_blocks(self) -> list[list[str]]:
        """Per group, the module (or block) names it holds, for `harness groups`."""
        raise NotImplementedError


# --- freezing and parameter groups ------------------------------------------------------

def is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES)


def set_trainable(model: LayerGroups, trainable: int | Iterable[int], train_bn: bool = True) -> None:
    """Train the last `trainable` groups, or the groups it lists (0-based); the other groups
    are frozen except (if train_bn) their normalisation layers, as fastai's freeze_to does.
    Without train_bn the frozen groups are truly frozen (fastai's train_bn=False with BnFreeze):
    their modules run in eval mode even while the model trains (running statistics fixed,
    dropout and drop-path off). With train_bn (the default) the model is in train mode
    throughout, as fastai's."""
    n = model.n_groups
    train = set(range(n - trainable, n)) if isinstance(trainable, int) else set(trainable)
    for g, members in enumerate(model.group_members()):
        for _, p, norm in members:
            p.requires_grad_(g in train or (train_bn and norm))
    model.eval_modules = () if train_bn or train >= set(range(n)) else frozen_modules(model)
    model.train(model.training)   # re-applies every module's mode: the new frozen set, the rest as the model


def frozen_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """The largest submodules that hold no trainable parameter and are not inside a module all
    of whose parameters train: the frozen groups, with their parameter-free parts (activations,
    dropout, drop-path). The root itself never is (it holds the head)."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        flags = [p.requires_grad for p in m.parameters()]
        if flags and all(flags):
            return                # a trainable module: its dropout trains with it
        if not any(flags):
            out.append(m)         # frozen, or parameter-free beside frozen ones
            return
        for child in m.children():
            visit(child)
    for child in model.children():
        visit(child)
    return tuple(out)


def param_groups(model: LayerGroups, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Optimizer param groups per layer group: with weight decay, and without it
    (normalisation parameters, every bias, and what a timm model lists in
    `no_weight_decay()`: position embeddings, class tokens). Keys: `layer_group` (which),
    `decay` (whether the harness decays them) and `lr_scale`, the factor on the layer group's
    LR (1, or per parameter name from `lr_scales`: layer-wise LR decay), one group per scale."""
    skip = getattr(model, "no_decay_names", frozenset())
    out = []
    for g, members in enumerate(model.group_members()):
        split: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for name, p, norm in members:
            decay = not (norm or name.rsplit(".", 1)[-1] == "bias" or name in skip)
            scale = 1.0 if lr_scales is None else lr_scales[name]
            split.setdefault((decay, scale), []).append(p)
        for decay in (True, False):
            for (d, scale), params in split.items():
                if d == decay:
                    out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                                "layer_group": g, "decay": decay, "lr_scale": scale})
    return out


def describe_groups(model: LayerGroups) -> list[dict]:
    """Per layer group: its name, the modules (or blocks) it holds, its parameter count."""
    return [{"group": name, "modules": blocks, "parameters": sum(p.numel() for _, p, _ in members)}
            for name, blocks, members in zip(model.group_names, model.group_blocks(), model.group_members())]
