"""Which `data.crop_pct` a recipe evaluates with when it names none: evaluation follows the
weights, as their publishers evaluate them (resize to image_size / crop_pct, centre-crop).

- images of 64 px or less (CIFAR-style): 1.0, no crop (the numbers of studies made so far);
- `weights: imagenet` with `timm/<name>`: timm's `pretrained_cfg['crop_pct']` for the name
  (its default tag unless the name has one), read from timm's registry, nothing downloaded;
- `weights: imagenet` with a torchvision arch: its DEFAULT weights' published eval transform,
  crop_size / resize_size (resnet18: 224 / 256 = 0.875; resnet50 V2: 224 / 232);
- `weights: none` or a harness checkpoint: 1.0 (no published eval transform to follow).

Read by the Recipe's validator (harness/engine/recipe.py), before the fields are checked: an
arch it cannot look up gives None here, and the field's own validator says what is wrong.
"""
from __future__ import annotations

from typing import Any

from harness.engine.archs import TIMM_PREFIX, TORCHVISION_ARCHS, timm_name

SMALL_IMAGE = 64   # at or below: CIFAR-style defaults (augment flip, no eval crop)


def default_crop_pct(image_size: Any, arch: Any, weights: Any) -> float | None:
    """The crop_pct a recipe without one gets; None when the inputs are not valid (yet)."""
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        return None
    if image_size <= SMALL_IMAGE or weights != "imagenet":
        return 1.0
    if not isinstance(arch, str):
        return None
    if arch.startswith(TIMM_PREFIX):
        return _timm_crop_pct(timm_name(arch))
    if arch in TORCHVISION_ARCHS:
        return _torchvision_crop_pct(arch)
    return None


def _timm_crop_pct(name: str) -> float | None:
    import timm.models
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:   # an unknown name or tag: the arch's validator reports it
        return None
    return None if cfg is None or cfg.crop_pct is None else float(cfg.crop_pct)


def _torchvision_crop_pct(arch: str) -> float:
    import torchvision
    transform = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    return transform.crop_size[0] / transform.resize_size[0]
