"""The mean/std per RGB channel that a model's weights expect: set by the model
(harness/engine/groups.py, models.py, timm_models.py), used by the batches (harness/engine/data)."""
from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputStats:
    """The mean/std per RGB channel that a model's weights expect (grey is replicated)."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
