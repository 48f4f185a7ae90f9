"""torchvision architectures cut into layer groups, a fresh head, weights, freezing.

A model is a `TransferModel`: an `nn.Sequential` whose children ARE the layer groups,
input -> output, the last one being the new head. So `model[g]` is group g.

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

from harness.errors import HarnessError

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
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


def fastai_head(nf: int, n_classes: int) -> nn.Sequential:
    """fastai's default head: concat-pool, BN, dropout, 512 hidden, BN, dropout, linear."""
    head = nn.Sequential(
        AdaptiveConcatPool2d(), nn.Flatten(),
        _head_bn(2 * nf), nn.Dropout(0.25), nn.Linear(2 * nf, 512, bias=False), nn.ReLU(inplace=True),
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


class TransferModel(nn.Sequential):
    """A body cut into layer groups plus a head; the children are the groups."""

    def __init__(self, arch: str, groups: list[nn.Module], group_names: tuple[str, ...]):
        super().__init__(*groups)
        self.arch = arch
        self.group_names = list(group_names)

    def body_state_dict(self) -> dict[str, torch.Tensor]:
        head_prefix = f"{len(self) - 1}."
        return {k: v for k, v in self.state_dict().items() if not k.startswith(head_prefix)}


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


def build_model(arch: str, n_classes: int, weights: str = "none", head: str = "fastai") -> TransferModel:
    """A torchvision `arch` with `weights` (none | imagenet | checkpoint path) and a new head."""
    family = ARCHS[arch]
    tv = _torchvision_model(arch, weights)
    groups = family.split(tv) + [HEADS[head](family.n_features(tv), n_classes)]
    model = TransferModel(arch, groups, family.group_names)
    if weights not in ("none", "imagenet"):
        load_body(model, weights)
    return model


def save_checkpoint(model: TransferModel, path: str | Path, meta: dict) -> None:
    """Save the body (not the head) with its arch and `meta`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "arch": model.arch,
                "body": {k: v.detach().cpu() for k, v in model.body_state_dict().items()},
                "meta": meta}, tmp)
    os.replace(tmp, path)


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


def load_body(model: TransferModel, path: str | Path) -> dict:
    """Load a checkpoint's body into `model` (head untouched); returns the checkpoint's meta."""
    ckpt = read_checkpoint(path)
    if ckpt["arch"] != model.arch:
        raise HarnessError(f"model.weights: {path} holds a {ckpt['arch']} body, "
                           f"but model.arch is {model.arch}")
    expected = model.body_state_dict()
    body = ckpt["body"]
    bad = [k for k in expected if k not in body or body[k].shape != expected[k].shape]
    if bad or len(body) != len(expected):
        raise HarnessError(f"model.weights: {path} does not fit {model.arch} "
                           f"(first mismatch: {bad[0] if bad else 'extra keys'})")
    model.load_state_dict(body, strict=False)
    return ckpt.get("meta", {})


# --- freezing and parameter groups ------------------------------------------------------

def is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES)


def set_trainable(model: TransferModel, n_trainable: int, train_bn: bool = True) -> None:
    """Train the last `n_trainable` groups; earlier groups are frozen except (if train_bn)
    their normalisation layers, as fastai's freeze_to does."""
    first = len(model) - n_trainable
    for g, group in enumerate(model):
        for m in group.modules():
            direct = list(m.parameters(recurse=False))
            train = g >= first or (train_bn and is_norm(m))
            for p in direct:
                p.requires_grad_(train)


def param_groups(model: TransferModel, weight_decay: float) -> list[dict]:
    """Two optimizer param groups per layer group: with weight decay, and without it
    (normalisation parameters and every bias). Key `layer_group` says which group."""
    out = []
    for g, group in enumerate(model):
        decay, no_decay = [], []
        for m in group.modules():
            for name, p in m.named_parameters(recurse=False):
                (no_decay if is_norm(m) or name == "bias" else decay).append(p)
        out.append({"params": decay, "weight_decay": weight_decay, "layer_group": g})
        out.append({"params": no_decay, "weight_decay": 0.0, "layer_group": g})
    return [pg for pg in out if pg["params"]]


def describe_groups(model: TransferModel) -> str:
    """A readable dump of which modules sit in which layer group, with parameter counts."""
    lines = []
    for name, group in zip(model.group_names, model):
        n = sum(p.numel() for p in group.parameters())
        kids = ", ".join(k for k, _ in group.named_children())
        lines.append(f"{name}: {n:,} parameters [{kids}]")
    return "\n".join(lines)
