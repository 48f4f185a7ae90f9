"""Shared fixtures: a tiny recipe that trains in a second or two on a 2-core CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.recipe import Recipe

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION_DIR.is_dir(),
                                   reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def tiny_recipe_dict(**overrides) -> dict:
    """2 classes x 24 train images at 16 px, batch 8: 6 steps per epoch, two stages."""
    d = {
        "seed": 0,
        "device": "cpu",
        "data": {"dataset": "fashion-mnist", "classes": ["Sandal", "Bag"], "train_per_class": 24,
                 "val_fraction": 0.25, "image_size": 16, "batch_size": 8, "augment": True},
        "model": {"arch": "resnet18", "weights": "none", "head": "fastai", "train_bn": True},
        "stages": [
            {"epochs": 1, "train": "head", "lr": {"max": 2e-3}, "pct_start": 0.99, "div": 25},
            {"epochs": 2, "train": "all", "lr": {"min": 1e-5, "max": 1e-3}, "pct_start": 0.3, "div": 5},
        ],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return d


@pytest.fixture
def tiny_recipe() -> Recipe:
    return Recipe.from_dict(tiny_recipe_dict())


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """One workspace per test session, so the decoded-data cache is shared."""
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(autouse=True)
def _few_threads():
    # deterministic, and fair to the 2-core CI machine
    torch.set_num_threads(2)
    yield
