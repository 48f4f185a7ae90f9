"""L2-SP (`l2sp`, a stage's `l2sp: {alpha_sp, beta}`): the body's decoupled pull toward theta_0,
the head's ordinary weight decay, and alpha_sp = 0 being naive."""
from __future__ import annotations

import pytest
import torch

import harness.engine.train as train_mod
from conftest import needs_fashion, tiny_recipe_dict
from harness.engine.l2sp import AdamWSP
from harness.engine.models import build_model
from harness.engine.recipe import Recipe
from harness.engine.train import fine_tune, make_optimizer, start_weights
from harness.sweep.strategies import l2sp, naive

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.one_thread
SMALL_TEST = {"test_per_class": 4}   # the test split is not what these tests look at


def recipe_with(stages, **overrides) -> Recipe:
    d = tiny_recipe_dict(**overrides)
    d["stages"] = [s.model_dump(mode="json") for s in stages]
    return Recipe.from_dict(d)


def test_one_step_with_zero_gradient_moves_the_body_toward_theta_0_by_the_closed_form():
    """Zero gradients leave Adam's update at exactly 0, so one step is the decay alone: the
    body's distance to theta_0 shrinks by (1 - lr * alpha_sp), the head's decayed weights by
    (1 - lr * beta), the head's biases and norms stay."""
    lr, alpha, beta = 0.01, 3.0, 2.0
    recipe = recipe_with(l2sp(1, lr=lr, alpha_sp=alpha, beta=beta))
    torch.manual_seed(0)
    model = build_model("resnet18", 2, "none", "fastai", 3)
    theta_0 = start_weights(recipe, model)
    with torch.no_grad():   # away from theta_0, as after some training
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, recipe.stages[0], recipe, torch.device("cpu"), theta_0)
    assert isinstance(opt, AdamWSP)
    for pg in opt.param_groups:
        pg["lr"] = lr * pg["lr_scale"]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    head_decayed = {n for n, p, norm in model.group_members()[-1] if not norm and not n.endswith("bias")}
    assert theta_0.keys() == {n for members in model.group_members()[:-1] for n, _, _ in members}
    for n, p in model.named_parameters():
        if n in theta_0:
            want = theta_0[n] + (1 - lr * alpha) * (before[n] - theta_0[n])
        elif n in head_decayed:
            want = before[n] * (1 - lr * beta)
        else:
            want = before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7, msg=n)
    moved = sum(float((before[n] - theta_0[n]).norm()) for n in theta_0)
    assert sum(float((p.detach() - theta_0[n]).norm()) for n, p in model.named_parameters() if n in theta_0) < moved


@needs_fashion
def test_alpha_sp_zero_reproduces_naive_bitwise(workspace):
    """alpha_sp = 0 and beta = the recipe's weight decay (0 here: naive decays the body too)
    is naive, bit for bit: the same weights, the same validation loss."""
    runs = []
    for stages in (naive(1, lr=2e-3), l2sp(1, lr=2e-3, alpha_sp=0.0, beta=0.0)):
        result = fine_tune(recipe_with(stages, optimizer={"weight_decay": 0.0}, data=SMALL_TEST), workspace=workspace)
        runs.append((result.epochs[-1].val_loss, result.model.state_dict()))
    (loss_a, a), (loss_b, b) = runs
    assert loss_a == loss_b
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_fashion
def test_theta_0_is_the_model_as_built_not_the_weights_a_stage_starts_from(workspace, monkeypatch):
    """An l2sp stage after a stage that trained the body still pulls toward the start model."""
    built, anchors, at_start = {}, [], []
    real_build, real_make = train_mod.build_model, train_mod.make_optimizer

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return model

    def make(model, *args, **kwargs):
        opt = real_make(model, *args, **kwargs)
        names = {id(p): n for n, p in model.named_parameters()}
        anchors.append({names[id(p)]: a for pg in opt.param_groups for p, a in zip(pg["params"], pg.get("anchors", []))})
        at_start.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return opt

    monkeypatch.setattr(train_mod, "build_model", build)
    monkeypatch.setattr(train_mod, "make_optimizer", make)
    result = fine_tune(recipe_with(naive(1, lr=2e-3) + l2sp(1, lr=2e-3, alpha_sp=0.5), data=SMALL_TEST), workspace=workspace)
    assert result.ok and anchors[0] == {}
    body = {n for members in result.model.group_members()[:-1] for n, _, _ in members}
    assert anchors[1].keys() == body
    assert all(torch.equal(anchors[1][n], built[n]) for n in body)
    assert any(not torch.equal(at_start[1][n], built[n]) for n in body)   # stage 1 did move the body
