"""Tests for `harness pretrain` (harness.jobs.pretrain): a checkpoint with its metadata, reuse without training,
refusal to overwrite another recipe's checkpoint, and fine-tuning from it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import needs_fashion, template_store
from harness.engine import train as train_mod
from harness import jobs
from harness.workspace import Stores
from harness.errors import HarnessError
from harness.engine.models import build_model, read_checkpoint
from harness.jobs import pretrain
from harness.engine.recipe import Recipe
from harness.engine.train import fine_tune

pytestmark = needs_fashion

SOURCE_CLASSES = ["T-shirt/top", "Trouser"]


def stores(workspace, uri) -> Stores:
    return Stores.resolve(workspace, tracking=uri)
TARGET_CLASSES = ["Sandal", "Sneaker", "Bag"]




def source_recipe(seed: int = 0) -> Recipe:
    return Recipe.from_dict({
        "seed": seed, "device": "cpu",
        "data": {"dataset": "fashion-mnist", "classes": SOURCE_CLASSES, "train_per_class": 24,
                 "val_fraction": 0.25, "image_size": 16, "batch_size": 8},
        "model": {"arch": "resnet18", "weights": "none", "head": "linear"},
        "stages": [{"epochs": 1, "train": "all", "lr": 1e-3}],
    })


def target_recipe(weights: Path) -> Recipe:
    return Recipe.from_dict({
        "seed": 0, "device": "cpu",
        "data": {"dataset": "fashion-mnist", "classes": TARGET_CLASSES, "train_per_class": 16,
                 "val_fraction": 0.25, "image_size": 16, "batch_size": 8},
        "model": {"arch": "resnet18", "weights": str(weights), "head": "fastai"},
        "stages": [{"epochs": 1, "train": "head", "lr": {"max": 2e-3}, "pct_start": 0.99},
                   {"epochs": 1, "train": "all", "lr": {"min": 1e-5, "max": 1e-3}, "pct_start": 0.3,
                    "div": 5}],
    })


def _refuse_training(*args, **kwargs):
    raise AssertionError("training ran although the checkpoint should have been reused")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, workspace):
    """One pretraining run shared by the tests below (its outputs are only read)."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("pretrain")
    db = root / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)
    uri = f"sqlite:///{db}"
    out = root / "checkpoints" / "source.pt"
    meta = pretrain(source_recipe(), stores(workspace, uri), out)
    return {"meta": meta, "out": out, "uri": uri, "workspace": workspace}


def test_pretrain_writes_a_checkpoint_with_meta(pretrained):
    meta, out = pretrained["meta"], pretrained["out"]
    assert out.is_file()
    assert meta["reused"] is False
    assert meta["arch"] == "resnet18"
    assert meta["source_classes"] == SOURCE_CLASSES
    assert 0.0 <= meta["val_accuracy"] <= 1.0
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    assert isinstance(meta["config_hash"], str) and meta["config_hash"]

    ckpt = read_checkpoint(out)
    assert ckpt["arch"] == "resnet18"
    for key in ("arch", "source_classes", "val_accuracy", "test_accuracy", "config_hash"):
        assert ckpt["meta"][key] == meta[key], key
    # the body only: exactly the keys of groups 0 and 1 of a resnet18 TransferModel
    fresh = build_model("resnet18", len(SOURCE_CLASSES), "none", "linear")
    assert set(ckpt["body"]) == set(fresh.body_state_dict())
    assert not any(k.startswith("2.") for k in ckpt["body"])

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=pretrained["uri"])
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["checkpoint"] == str(out)


def test_same_recipe_is_reused_without_training(pretrained, monkeypatch):
    out = pretrained["out"]
    before = out.read_bytes()
    monkeypatch.setattr(jobs, "tracked_fine_tune", _refuse_training)
    monkeypatch.setattr(train_mod, "fine_tune", _refuse_training)
    meta = pretrain(source_recipe(), stores(pretrained["workspace"], pretrained["uri"]), out)
    assert meta["reused"] is True
    assert meta["config_hash"] == pretrained["meta"]["config_hash"]
    assert meta["source_classes"] == SOURCE_CLASSES
    assert out.read_bytes() == before


def test_same_recipe_on_another_device_is_reused(pretrained, monkeypatch):
    monkeypatch.setattr(jobs, "tracked_fine_tune", _refuse_training)
    monkeypatch.setattr(train_mod, "fine_tune", _refuse_training)
    meta = pretrain(source_recipe().replace(device="auto"), stores(pretrained["workspace"], pretrained["uri"]),
                    pretrained["out"])
    assert meta["reused"] is True


def test_another_recipe_for_the_same_output_needs_force(pretrained, tmp_path, monkeypatch):
    out = tmp_path / "copy.pt"
    shutil.copyfile(pretrained["out"], out)
    before = out.read_bytes()
    calls = []
    real = jobs.tracked_fine_tune
    monkeypatch.setattr(jobs, "tracked_fine_tune",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    with pytest.raises(HarnessError) as info:
        pretrain(source_recipe(seed=1), stores(pretrained["workspace"], pretrained["uri"]), out)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert out.read_bytes() == before and calls == []

    meta = pretrain(source_recipe(seed=1), stores(pretrained["workspace"], pretrained["uri"]), out, force=True)
    assert calls == [1]
    assert meta["reused"] is False
    assert meta["config_hash"] != pretrained["meta"]["config_hash"]
    assert read_checkpoint(out)["meta"]["config_hash"] == meta["config_hash"]
    assert out.read_bytes() != before


def test_fine_tune_from_the_checkpoint_starts_from_its_body(pretrained, monkeypatch):
    out = pretrained["out"]
    body = read_checkpoint(out)["body"]

    # build_model directly: the body is the checkpoint's, the head is new (3 classes)
    model = build_model("resnet18", len(TARGET_CLASSES), str(out), "fastai")
    state = model.body_state_dict()
    assert set(state) == set(body)
    for k, v in body.items():
        assert torch.equal(state[k], v), k
    assert model[-1][-1].out_features == len(TARGET_CLASSES)

    # and fine_tune starts from exactly that body
    seen = {}
    real_build = train_mod.build_model

    def spy_build(*args, **kwargs):
        m = real_build(*args, **kwargs)
        seen["body"] = {k: v.detach().clone() for k, v in m.body_state_dict().items()}
        return m

    monkeypatch.setattr(train_mod, "build_model", spy_build)
    result = fine_tune(target_recipe(out), workspace=pretrained["workspace"])
    assert result.status == "ok"
    assert result.class_names == TARGET_CLASSES
    assert result.test_accuracy is not None
    assert set(seen["body"]) == set(body)
    for k, v in body.items():
        assert torch.equal(seen["body"][k], v), k
    # and training then moved the body away from the checkpoint
    trained = result.model.body_state_dict()
    assert not torch.equal(trained["0.conv1.weight"], body["0.conv1.weight"])


def test_checkpoint_of_another_arch_is_refused(pretrained):
    with pytest.raises(HarnessError, match="model.weights"):
        build_model("resnet34", 3, str(pretrained["out"]), "fastai")
