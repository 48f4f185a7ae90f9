"""Shared fixtures: a tiny recipe that trains in a second or two on a 2-core CPU."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.engine.recipe import Recipe

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


def template_store(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite store made once per session (migrating takes seconds,
    copying the file nothing)."""
    template = tmp_path_factory.getbasetemp() / "mlflow-template" / "mlflow.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient
        template.parent.mkdir(exist_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    return template


@pytest.fixture
def tiny_recipe() -> Recipe:
    return Recipe.from_dict(tiny_recipe_dict())


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """One workspace per test session, so the decoded-data cache is shared."""
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="session", autouse=True)
def _no_hub(tmp_path_factory):
    """No test reaches a model hub or reads the user's caches: empty HF and torch caches,
    HF offline (tests that need cached weights fill a cache of their own)."""
    import os
    cache = tmp_path_factory.mktemp("hub-caches")
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "TORCH_HOME")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache / "hf"), TORCH_HOME=str(cache / "torch"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _no_stop_left_pending():
    """A test that sends itself Ctrl-C or SIGTERM (or runs a command that installs the
    handlers in this process) leaves no pending stop or handler behind: the next test's
    `interrupts.checkpoint()` would raise KeyboardInterrupt and crash the xdist worker."""
    yield
    from harness import interrupts
    interrupts.reset()


@pytest.fixture
def one_thread():
    """One torch thread for a test (after the 2 below): on a shared, busy 2-core machine two
    OpenMP threads spin-wait (a tiny fine-tune measured 150 s with 2 threads, 5 s with 1);
    exactness needs only the same count within a test. `pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _few_threads():
    # deterministic, and fair to the 2-core CI machine: two threads, or one per pytest-xdist
    # worker when the suite runs in parallel (two workers of two threads would spin-wait)
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    yield


# --- real services: PostgreSQL on 127.0.0.1:5432, an `mlflow server` on loopback --------------
# They run in CI (PostgreSQL is started before it); a missing server is an error, not a skip.

@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database of this test's own (dropped afterwards): its URL."""
    from services import pg_database
    with pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """docker/compose.yaml's own `mlflow server` command, run on loopback against a
    PostgreSQL database of its own: the tracking URI."""
    from services import compose_mlflow_server
    with compose_mlflow_server(tmp_path_factory.mktemp("mlartifacts")) as uri:
        yield uri


@pytest.fixture
def shrunk(tmp_path):
    """`shrunk(name, **changes) -> Path`: a shipped study (its stem, e.g. "quickstart", or a
    path) shrunk by tests/shipped.py into tmp_path, its pretraining (if any) already run.
    The rules and the merge semantics of `changes` are in `shipped.shrink`'s docstring."""
    from shipped import resolve_study, run_pretraining, shrink

    def make(name, /, **changes) -> Path:
        study = shrink(resolve_study(name), tmp_path / "shrunk", **changes)
        run_pretraining(study, tmp_path / "pretrain-workspace")
        return study.path
    return make
