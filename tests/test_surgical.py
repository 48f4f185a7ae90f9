"""Surgical fine-tuning (`surgical`, a stage's `train: {groups: [...]}`): exactly the listed
groups train; the others stay bit for bit as they were."""
from __future__ import annotations

import pytest
import torch

import harness.engine.train as train_mod
from conftest import needs_fashion, tiny_recipe_dict
from harness.engine.groups import set_trainable
from harness.engine.models import build_model
from harness.engine.recipe import Recipe
from harness.engine.train import fine_tune
from harness.sweep.strategies import surgical

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.one_thread


def test_set_trainable_trains_the_listed_groups():
    model = build_model("resnet18", 2, "none", "fastai", 3)
    set_trainable(model, (0, 2), train_bn=False)
    trains = [{p.requires_grad for _, p, _ in members} for members in model.group_members()]
    assert trains == [{True}, {False}, {True}]
    assert model.eval_modules == (model[1],)   # the frozen group runs in eval mode
    set_trainable(model, (1, 2), train_bn=True)   # fastai's train_bn: frozen norms still train
    norms = {p.requires_grad for _, p, norm in model.group_members()[0] if norm}
    assert norms == {True} and not model[0].conv1.weight.requires_grad and model.eval_modules == ()


@needs_fashion
@pytest.mark.parametrize("block", [0, 1])
def test_the_frozen_groups_stay_bitwise_unchanged(workspace, monkeypatch, block):
    """surgical(block): that body group and the head move; the other body group's weights and
    buffers (BN running statistics) are exactly what the model was built with."""
    built = {}
    real_build = train_mod.build_model

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(train_mod, "build_model", build)
    d = tiny_recipe_dict(model={"train_bn": False}, data={"test_per_class": 4})
    d["stages"] = [s.model_dump(mode="json") for s in surgical(1, block=block, lr=5e-3)]
    result = fine_tune(Recipe.from_dict(d), workspace=workspace)
    assert result.ok
    after = result.model.state_dict()
    frozen = 1 - block
    for g in (0, 1, 2):
        keys = [k for k in after if k.startswith(f"{g}.")]
        same = all(torch.equal(after[k], built[k]) for k in keys)
        assert same == (g == frozen), f"group {g}"
