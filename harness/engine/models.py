"""Backbones cut into layer groups, a fresh head, weights, freezing.

Two kinds of model, one contract (`LayerGroups`, harness/engine/groups.py):
- torchvision archs: a `TransferModel`, an `nn.Sequential` whose children ARE the layer
  groups, so `model[g]` is group g (fastai's splits, below).
- `timm/<name>`: any timm architecture, grouped from its own block structure
  (harness/engine/timm_models.py).

Splits (3 groups each; documented here because users tune per-group LRs on them):
- resnet18/34/50 (fastai's split): early = conv1, bn1, relu, maxpool, layer1, layer2;
  late = layer3, layer4; head.
- efficientnet_b0: early = features[0:5] (stem + MBConv stages 1-4);
  late = features[5:9] (stages 5-7 + the final 1x1 conv); head.
- convnext_tiny: early = features[0:4] (stem, stage 1, downsample, stage 2);
  late = features[4:8] (downsample, stage 3, downsample, stage 4); head.
  (The classifier's LayerNorm is dropped with the classifier, as fastai's create_body does.)
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from harness.engine.archs import TIMM_PREFIX
from harness.engine.files import torch_save_atomic
from harness.engine.groups import LayerGroups, Member, fastai_head, is_norm, linear_head
from harness.engine.input_stats import InputStats
from harness.errors import HarnessError

CHECKPOINT_FORMAT = "finetune-harness-checkpoint/1"


def _resnet_split(m: nn.Module) -> list[nn.Module]:
    early = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    return [nn.Sequential(OrderedDict((n, getattr(m, n)) for n in early)),
            nn.Sequential(OrderedDict(layer3=m.layer3, layer4=m.layer4))]


def _features_split(cut: int) -> Callable[[nn.Module], list[nn.Module]]:
    def split(m: nn.Module) -> list[nn.Module]:
        return [m.features[:cut], m.features[cut:]]
    return split


@dataclass(frozen=True)
class Family:
    split: Callable[[nn.Module], list[nn.Module]]   # torchvision model -> body groups
    n_features: Callable[[nn.Module], int]          # channels out of the body
    group_names: tuple[str, ...] = ("early", "late", "head")


def _fc_in(m: nn.Module) -> int:
    return m.fc.in_features


def _last_linear_in(m: nn.Module) -> int:
    return [l for l in m.classifier.modules() if isinstance(l, nn.Linear)][-1].in_features


ARCHS: dict[str, Family] = {
    "resnet18": Family(_resnet_split, _fc_in),
    "resnet34": Family(_resnet_split, _fc_in),
    "resnet50": Family(_resnet_split, _fc_in),
    "efficientnet_b0": Family(_features_split(5), _last_linear_in),
    "convnext_tiny": Family(_features_split(4), _last_linear_in),
}


HEADS = {"fastai": fastai_head, "linear": linear_head}


class TransferModel(LayerGroups, nn.Sequential):
    """A torchvision body cut into layer groups plus a head; the children are the groups."""

    def __init__(self, arch: str, groups: list[nn.Module], group_names: tuple[str, ...]):
        nn.Sequential.__init__(self, *groups)
        self.arch = arch
        self.group_names = list(group_names)

    def group_members(self) -> list[list[Member]]:
        return [[(f"{g}.{mn}.{pn}" if mn else f"{g}.{pn}", p, is_norm(m))
                 for mn, m in group.named_modules() for pn, p in m.named_parameters(recurse=False)]
                for g, group in enumerate(self)]

    def body_state_dict(self) -> dict[str, torch.Tensor]:
        head_prefix = f"{len(self) - 1}."
        return {k: v for k, v in self.state_dict().items() if not k.startswith(head_prefix)}

    def group_blocks(self) -> list[list[str]]:
        return [[n for n, _ in group.named_children()] for group in list(self)[:-1]] + [["head (new)"]]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for group in list(self)[:-1]:   # nn.Sequential.forward, stopped before the head
            x = group(x)
        return x

    def head_forward(self, f: torch.Tensor) -> torch.Tensor:
        return self[-1](f)


def _torchvision_model(arch: str, weights: str) -> nn.Module:
    if weights != "imagenet":
        return torchvision.models.get_model(arch, weights=None)
    w = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    try:
        return torchvision.models.get_model(arch, weights=w)
    except Exception as e:  # offline: urllib raises URLError, OSError, ... depending on the stack
        raise HarnessError(f"model.weights: imagenet weights for {arch} are not in the torch cache "
                           f"and cannot be downloaded ({e.__class__.__name__}); put {w.url} at "
                           f"{cached}") from None


def build_model(arch: str, n_classes: int, weights: str = "none", head: str = "fastai",
                groups: int = 3, image_size: int | None = None) -> LayerGroups:
    """`arch` (torchvision name, or timm/<name>) with `weights` (none | imagenet | checkpoint
    path), a new head for `n_classes`, cut into `groups` layer groups (timm: any number;
    torchvision: fastai's 3). timm models are checked on `image_size` input when given."""
    if arch.startswith(TIMM_PREFIX):
        from harness.engine.timm_models import build_timm
        model = build_timm(arch, n_classes, weights, head, groups, image_size)
        if weights not in ("none", "imagenet"):
            load_body(model, weights)
        return model
    family = ARCHS[arch]
    tv = _torchvision_model(arch, weights)
    groups = family.split(tv) + [HEADS[head](family.n_features(tv), n_classes)]
    model = TransferModel(arch, groups, family.group_names)
    if weights not in ("none", "imagenet"):
        load_body(model, weights)
    return model


def save_checkpoint(model: LayerGroups, path: str | Path, meta: dict) -> None:
    """Save the body (not the head) with its arch and `meta`, atomically."""
    torch_save_atomic({"format": CHECKPOINT_FORMAT, "arch": model.arch,
                       "body": {k: v.detach().cpu() for k, v in model.body_state_dict().items()},
                       "input_stats": {"mean": list(model.input_stats.mean), "std": list(model.input_stats.std)},
                       "meta": meta}, Path(path), mode=None)


def read_checkpoint(path: str | Path) -> dict:
    """Load a harness checkpoint safely (weights_only) or raise a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise HarnessError(f"model.weights: checkpoint not found: {p} "
                           f"(use none, imagenet, or run `harness pretrain` first)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HarnessError(f"model.weights: {p} is not a readable checkpoint "
                           f"({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise HarnessError(f"model.weights: {p} is not a finetune-harness checkpoint")
    return ckpt


def load_body(model: LayerGroups, path: str | Path) -> dict:
    """Load a checkpoint's body into `model` (head untouched); returns the checkpoint's meta.
    The model then expects the input statistics the body was trained with (ImageNet's for
    checkpoints older than that record)."""
    ckpt = read_checkpoint(path)
    if ckpt["arch"] != model.arch:
        raise HarnessError(f"model.weights: {path} holds a {ckpt['arch']} body, "
                           f"but model.arch is {model.arch}")
    expected = model.body_state_dict()
    body = ckpt["body"]
    bad = [k for k in expected if k not in body or body[k].shape != expected[k].shape]
    # a timm body saved with another head may hold modules this head does not use (a
    # ConvNeXt's head norm under the fastai head): those are left out, nothing is missing
    extra = len(body) != len(expected) and not model.arch.startswith(TIMM_PREFIX)
    if bad or extra:
        raise HarnessError(f"model.weights: {path} does not fit {model.arch} "
                           f"(first mismatch: {bad[0] if bad else 'extra keys'})")
    model.load_state_dict({k: body[k] for k in expected}, strict=False)
    stats = ckpt.get("input_stats") or {}   # absent before they were recorded: ImageNet's then
    default = InputStats()
    model.input_stats = InputStats(tuple(stats.get("mean", default.mean)), tuple(stats.get("std", default.std)))
    return ckpt.get("meta", {})


