"""The names of the architectures a recipe may ask for, known without building a model: what
recipe validation needs (harness/engine/recipe.py), so that the schema imports no model code.

- `TORCHVISION_ARCHS`: the torchvision archs with fastai's splits, built by
  harness/engine/models.py (`models.ARCHS` has exactly these keys, in this order: tested);
- `timm/<name>` (`TIMM_PREFIX`): any timm model, built by harness/engine/timm_models.py; timm
  is imported only when such a name is checked.
"""
from __future__ import annotations

import difflib

TIMM_PREFIX = "timm/"
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "convnext_tiny")


def timm_name(arch: str) -> str:
    return arch[len(TIMM_PREFIX):]


def check_timm_arch(arch: str) -> None:
    """An unknown timm name is a one-line error naming the closest ones."""
    import timm
    name = timm_name(arch)
    base = name.split(".", 1)[0]
    if name and timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.5)
    hint = f" (closest: {', '.join(TIMM_PREFIX + c for c in close)})" if close else ""
    raise ValueError(f"unknown timm architecture '{name}'{hint}")


def is_timm_model(name: str) -> bool:
    """Is `name` (without the timm/ prefix, a `.tag` allowed) a timm architecture?"""
    import timm
    return timm.is_model(name.split(".", 1)[0])
