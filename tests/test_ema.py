"""Weight EMA (`optimizer.ema`, harness/engine/ema.py): timm's ModelEmaV3 with warm-up, scored
by validation and test, decay 0 the raw model, searchable from a study."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_recipe_dict
from harness.engine.ema import WeightEma, decay_at
from harness.engine.recipe import Recipe
from harness.engine.stages import StagePlan
from harness.engine.train import fine_tune
from harness.errors import HarnessError
from harness.sweep.study import load_study
from shipped import read_yaml, resolve_study, shrink
from test_study import TINY, write_study

pytestmark = pytest.mark.usefixtures("one_thread")


# --- timm's ModelEmaV3, step for step --------------------------------------------------------------

@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.9999])
def test_decay_is_timms_model_ema_v3(decay, warmup):
    from timm.utils.model_ema import ModelEmaV3
    ref = ModelEmaV3(nn.Linear(2, 2), decay=decay, use_warmup=warmup)
    assert [decay_at(n, decay, warmup) for n in range(0, 300)] == [ref.get_decay(n) for n in range(0, 300)]


def test_the_average_is_timms_model_ema_v3_buffers_included():
    from timm.utils.model_ema import ModelEmaV3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    ref, ours = ModelEmaV3(model, decay=0.9, use_warmup=True), WeightEma(model, 0.9, True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for n in range(1, 8):
        model(torch.randn(4, 3, 6, 6)).sum().backward()   # train mode: BN's running statistics move too
        opt.step()
        opt.zero_grad()
        ref.update(model, step=n)
        ours.update()
        assert all(torch.equal(a, b) for a, b in zip(ours.module.state_dict().values(), ref.module.state_dict().values()))
    raw, avg = model.state_dict(), ours.module.state_dict()
    assert not torch.equal(raw["1.running_mean"], avg["1.running_mean"])
    assert int(avg["1.num_batches_tracked"]) == int(raw["1.num_batches_tracked"]) > 0   # copied


# --- in a fine-tune ------------------------------------------------------------------------------------

def _recipe(ema=None, probe=False, **changes) -> Recipe:
    """The tiny recipe in 2 one-epoch stages (a head stage, then all); `probe`: a truly frozen
    body without augmentation, so the head stage runs on cached features."""
    d = tiny_recipe_dict(stages=[{"epochs": 1, "train": "head", "lr": {"max": 2e-3}},
                                 {"epochs": 1, "train": "all", "lr": {"min": 1e-5, "max": 1e-3}}], **changes)
    # 4 steps an epoch, 80 test images (the whole test split of 2 classes would be most of the time)
    d["data"].update(train_per_class=16, test_per_class=40)
    if probe:
        d["model"]["train_bn"], d["data"]["augment"] = False, "none"
    if ema is not None:
        d["optimizer"] = {"ema": ema}
    return Recipe.from_dict(d)


def _scores(r):
    return [e.train_loss for e in r.epochs], [(e.val_loss, e.val_accuracy) for e in r.epochs], r.test_accuracy


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("probe", [False, True], ids=["images", "cached-features"])
def test_decay_0_is_the_raw_model_and_an_average_leaves_training_alone(workspace, probe):
    raw = fine_tune(_recipe(probe=probe), workspace=workspace)
    zero = fine_tune(_recipe({"decay": 0.0}, probe), workspace=workspace)
    avg = fine_tune(_recipe({"decay": 0.9}, probe), workspace=workspace)
    assert raw.ok and zero.ok and avg.ok
    assert _scores(zero) == _scores(raw) and _same_state(zero.model, raw.model)
    # the average does not touch what is trained (the same losses), only what is scored and kept
    assert _scores(avg)[0] == _scores(raw)[0]
    assert _scores(avg)[1] != _scores(raw)[1] and not _same_state(avg.model, raw.model)


def test_a_run_continued_from_a_stage_checkpoint_continues_its_average(workspace):
    recipe = _recipe({"decay": 0.9, "warmup": False})
    saved = []
    whole = fine_tune(recipe, workspace=workspace, plan=StagePlan(on_stage=saved.append))
    assert saved[0].ema is not None and not _same_state_dicts(saved[0].ema, saved[0].model)
    rest = fine_tune(recipe, workspace=workspace, plan=StagePlan(start=saved[0]))
    assert _scores(rest) == _scores(whole) and _same_state(rest.model, whole.model)


def _same_state_dicts(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# --- the recipe and the study ----------------------------------------------------------------------

def test_the_recipe_field_and_its_errors():
    assert "ema" not in Recipe.from_dict(tiny_recipe_dict()).to_yaml()   # absent: the YAML and hashes of before
    r = Recipe.from_dict(tiny_recipe_dict(optimizer={"ema": {}}))
    assert (r.optimizer.ema.decay, r.optimizer.ema.warmup) == (0.9999, True)   # ModelEmaV3's, warm-up on
    assert Recipe.from_dict(r.to_dict()) == r
    for bad, says in (({"decay": 1.0}, "optimizer.ema.decay: Input should be less than 1"),
                      ({"decay": -0.1}, "optimizer.ema.decay: Input should be greater than or equal to 0"),
                      ({"warmup": "yes"}, "optimizer.ema.warmup: Input should be a valid boolean"),
                      ({"decay": 0.9, "power": 1}, "optimizer.ema.power: unknown key")):
        with pytest.raises(HarnessError) as info:
            Recipe.from_dict(tiny_recipe_dict(optimizer={"ema": bad}))
        assert says in str(info.value) and "\n" not in str(info.value)


def _study(tmp_path: Path, space: dict, recipe_optimizer: dict | None = None) -> Path:
    d = read_yaml(shrink(resolve_study("quickstart"), tmp_path / "shrunk", **TINY).path)
    d["strategies"] = {"naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, **space}}
    if recipe_optimizer is not None:
        d["recipe"]["optimizer"] = recipe_optimizer
    return write_study(tmp_path / "study.yaml", d)


def test_a_study_searches_the_decay_of_any_strategy(tmp_path):
    study = load_study(_study(tmp_path, {"optimizer.ema.decay": {"low": 0.5, "high": 0.99},
                                         "optimizer.ema.warmup": {"choices": [True, False]}}))
    # the first trial: ModelEmaV3's default clipped into the range, warm-up on
    assert study.baseline("naive") == {"lr": 1e-3, "optimizer.ema.decay": 0.99, "optimizer.ema.warmup": True}
    recipe = study.recipe_for("naive", {"lr": 2e-3, "optimizer.ema.decay": 0.7, "optimizer.ema.warmup": False})
    assert (recipe.optimizer.ema.decay, recipe.optimizer.ema.warmup, recipe.stages[0].lr) == (0.7, False, 2e-3)
    assert study.recipe_for("naive", {"lr": 2e-3}).optimizer.ema is None   # not searched: the base's (off)
    # the base recipe's own average is the default
    study = load_study(_study(tmp_path, {"optimizer.ema.decay": {"low": 0.5, "high": 0.99}},
                              {"ema": {"decay": 0.8}}))
    assert study.baseline("naive")["optimizer.ema.decay"] == 0.8


@pytest.mark.parametrize("space, says", [
    ({"optimizer.ema.decay": {"low": 0.9, "high": 1.0}},
     "strategies.naive.optimizer.ema.decay: 1.0 is not a valid optimizer.ema.decay (Input should be less than 1"),
    ({"optimizer.ema.warmup": {"choices": ["yes", "no"]}},
     "strategies.naive.optimizer.ema.warmup.choices: warmup takes true/false, got 'yes'"),
    ({"optimizer.ema.warmup": 1},
     "strategies.naive.optimizer.ema.warmup: 1 is not a valid optimizer.ema.warmup (Input should be a valid boolean"),
    ({"optimizer.weight_decay": 0.1},
     "strategies.naive.optimizer.weight_decay: unknown recipe field (searchable: optimizer.ema.decay, "
     "optimizer.ema.warmup)"),
])
def test_a_bad_searched_field_is_one_line_naming_it(tmp_path, space, says):
    path = _study(tmp_path, space)
    with pytest.raises(HarnessError) as info:
        load_study(path)
    assert str(info.value).startswith(f"{path}: {says}"), str(info.value)
    assert "\n" not in str(info.value)
