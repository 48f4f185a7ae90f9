"""Tests for harness.engine.recipe: YAML round-trips, validation errors naming the field, read_yaml."""
from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import ValidationError

from conftest import tiny_recipe_dict
from harness.errors import HarnessError
from harness.engine.recipe import LRSlice, Recipe, Stage, read_yaml


def with_stage(index: int = 0, **fields) -> dict:
    """The tiny recipe with fields of stages[index] replaced."""
    d = tiny_recipe_dict()
    d["stages"][index].update(fields)
    return d


def without_stage_field(name: str, index: int = 0) -> dict:
    """The tiny recipe with one field of stages[index] removed."""
    d = tiny_recipe_dict()
    del d["stages"][index][name]
    return d


def roundtrip(r: Recipe) -> Recipe:
    return Recipe.from_dict(yaml.safe_load(r.to_yaml()))


# --- round trips ------------------------------------------------------------------------

ROUNDTRIP_CASES = {
    "tiny": tiny_recipe_dict(),
    "lr number": with_stage(lr=3e-4),
    "lr max only": with_stage(lr={"max": 5e-3}),
    "lr min max": with_stage(lr={"min": 1e-6, "max": 1e-2}),
    "train all": with_stage(train="all"),
    "train last 2": with_stage(train={"last": 2}),
    "train groups 0 and head": with_stage(train={"groups": [0, 2]}),
    "layer decay": with_stage(1, lr=1e-3, layer_decay=0.65),
    "l2sp": with_stage(1, l2sp={"alpha_sp": 0.1, "beta": 0.01}),
    "moms given": with_stage(moms=[0.9, 0.8, 0.9], div_final=1e4),
    "linear head, no train_bn": tiny_recipe_dict(model={"head": "linear", "train_bn": False},
                                                 optimizer={"weight_decay": 0.0, "eps": 1e-8}),
}


@pytest.mark.parametrize("d", ROUNDTRIP_CASES.values(), ids=ROUNDTRIP_CASES.keys())
def test_to_yaml_round_trips(d):
    r = Recipe.from_dict(copy.deepcopy(d))
    back = roundtrip(r)
    assert back == r
    assert back.to_dict() == r.to_dict()


def test_round_trip_keeps_the_values_given():
    r = roundtrip(Recipe.from_dict(with_stage(1, lr={"min": 1e-6, "max": 1e-2}, moms=[0.9, 0.8, 0.9])))
    st = r.stages[1]
    assert isinstance(st.lr, LRSlice)
    assert (st.lr.min, st.lr.max) == (1e-6, 1e-2)
    assert tuple(st.moms) == (0.9, 0.8, 0.9)
    assert r.stages[0].train == "head" and r.stages[0].lr.min is None and r.stages[0].lr.max == 2e-3


def test_to_dict_leaves_out_absent_slice_min():
    d = Recipe.from_dict(with_stage(lr={"max": 5e-3})).to_dict()
    assert d["stages"][0]["lr"] == {"max": 5e-3}


def test_train_last_round_trips_as_mapping():
    r = roundtrip(Recipe.from_dict(with_stage(train={"last": 2})))
    assert r.stages[0].train.last == 2
    assert r.to_dict()["stages"][0]["train"] == {"last": 2}


def test_train_groups_round_trip_sorted_and_name_the_head_when_out_of_range():
    r = roundtrip(Recipe.from_dict(with_stage(train={"groups": [2, 0]})))
    assert r.to_dict()["stages"][0]["train"] == {"groups": [0, 2]}
    assert r.stages[0].trained_groups(3) == (0, 2) and r.stages[0].trainable_groups(3) == 2
    with pytest.raises(HarnessError) as ei:
        Recipe.from_dict(with_stage(train={"groups": [0, 5]}))
    assert str(ei.value) == ("recipe: stages[0].train.groups: group 5 is out of range "
                             "(resnet18 has 3 layer groups: 0..2, the head 2)")


def test_unset_layer_decay_and_l2sp_leave_a_recipes_yaml_as_it_was():
    """Recipes that do not use them export (and hash: stage checkpoints, pretrained bodies) as before."""
    text = Recipe.from_dict(tiny_recipe_dict()).to_yaml()
    assert "layer_decay" not in text and "l2sp" not in text


def test_from_yaml_reads_a_file(tmp_path):
    r = Recipe.from_dict(tiny_recipe_dict())
    path = tmp_path / "recipe.yaml"
    path.write_text(r.to_yaml())
    assert Recipe.from_yaml(path) == r
    assert Recipe.from_yaml(str(path)) == r


def test_defaults_fill_in_missing_sections():
    r = Recipe.from_dict({"stages": [{"epochs": 2, "lr": 1e-3}]})
    assert r.model.arch == "resnet18" and r.model.head == "fastai" and r.model.train_bn is True
    assert r.optimizer.weight_decay == 0.01 and r.optimizer.eps == 1e-5 and r.optimizer.sqr_mom == 0.99
    st = r.stages[0]
    assert (st.train, st.pct_start, st.div, st.div_final, tuple(st.moms)) == ("all", 0.25, 25, 1e5, (0.95, 0.85, 0.95))
    assert r.epochs == 2


def test_epochs_is_the_sum_over_stages():
    assert Recipe.from_dict(tiny_recipe_dict()).epochs == 3


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    """PyYAML reads `1e-3` as the string '1e-3'; the recipe must still take it as 0.001."""
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # the PyYAML quirk being guarded against
    text = """
stages:
  - epochs: 1
    lr: 1e-3
    div_final: 1e5
  - epochs: 1
    lr: {min: 1e-5, max: 1e-3}
optimizer:
  weight_decay: 1e-2
"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    r = Recipe.from_yaml(path)
    assert r.stages[0].lr == pytest.approx(0.001) and isinstance(r.stages[0].lr, float)
    assert r.stages[0].div_final == pytest.approx(1e5)
    assert (r.stages[1].lr.min, r.stages[1].lr.max) == (pytest.approx(1e-5), pytest.approx(1e-3))
    assert r.optimizer.weight_decay == pytest.approx(0.01)


def test_replace_revalidates():
    r = Recipe.from_dict(tiny_recipe_dict())
    assert r.replace(seed=5).seed == 5
    with pytest.raises(HarnessError, match="seed"):
        r.replace(seed=-1)


# --- invalid recipes ----------------------------------------------------------------------

INVALID = [
    # (id, recipe dict, text the one-line message must contain)
    ("unknown top-level key", tiny_recipe_dict(bogus=1), "bogus"),
    ("unknown nested key", with_stage(pct_strat=0.3), "stages[0].pct_strat"),
    ("unknown data key", tiny_recipe_dict(data={"batchsize": 4}), "data.batchsize"),
    ("epochs string", with_stage(epochs="two"), "stages[0].epochs"),
    ("epochs float", with_stage(epochs=1.5), "stages[0].epochs"),
    ("epochs bool", with_stage(epochs=True), "stages[0].epochs"),
    ("lr bool", with_stage(lr=True), "stages[0].lr"),
    ("lr max bool", with_stage(lr={"max": True}), "stages[0].lr.max"),
    ("lr not a number", with_stage(lr="fast"), "stages[0].lr"),
    ("lr negative", with_stage(lr=-1e-3), "stages[0].lr"),
    ("lr zero", with_stage(lr=0), "stages[0].lr"),
    ("lr missing", without_stage_field("lr"), "stages[0].lr"),
    ("augment maybe", tiny_recipe_dict(data={"augment": "maybe"}), "data.augment"),
    ("lr min > max", with_stage(lr={"min": 1e-2, "max": 1e-3}), "stages[0].lr"),
    ("pct_start 0", with_stage(pct_start=0), "stages[0].pct_start"),
    ("pct_start 1", with_stage(pct_start=1), "stages[0].pct_start"),
    ("pct_start 1.5", with_stage(pct_start=1.5), "stages[0].pct_start"),
    ("div 0", with_stage(1, div=0), "stages[1].div"),
    ("epochs 0", with_stage(epochs=0), "stages[0].epochs"),
    ("epochs -1", with_stage(1, epochs=-1), "stages[1].epochs"),
    ("moms too short", with_stage(moms=[0.95, 0.85]), "stages[0].moms"),
    ("moms out of range", with_stage(moms=[0.95, 1.2, 0.95]), "stages[0].moms"),
    ("train unknown name", with_stage(train="body"), "stages[0].train"),
    ("train last 0", with_stage(train={"last": 0}), "stages[0].train"),
    ("batch_size 0", tiny_recipe_dict(data={"batch_size": 0}), "data.batch_size"),
    ("batch_size 1", tiny_recipe_dict(data={"batch_size": 1}), "data.batch_size"),
    ("val_fraction 1.0", tiny_recipe_dict(data={"val_fraction": 1.0}), "data.val_fraction"),
    ("negative weight_decay", tiny_recipe_dict(optimizer={"weight_decay": -0.01}), "optimizer.weight_decay"),
    ("unknown arch", tiny_recipe_dict(model={"arch": "resnet19"}), "model.arch"),
    ("unknown head", tiny_recipe_dict(model={"head": "mlp"}), "model.head"),
    ("unknown dataset", tiny_recipe_dict(data={"dataset": "cifar10"}), "data.dataset"),
    ("imagefolder without root", tiny_recipe_dict(data={"dataset": "imagefolder"}), "data"),
    ("empty stages", tiny_recipe_dict(stages=[]), "stages"),
    ("stages not a list", tiny_recipe_dict(stages={"epochs": 1, "lr": 1e-3}), "stages"),
    ("train last 4 on 3 groups", with_stage(train={"last": 4}), "stages[0].train"),
    ("train group 3 on 3 groups", with_stage(train={"groups": [0, 3]}), "stages[0].train.groups"),
    ("train no groups", with_stage(train={"groups": []}), "stages[0].train.groups"),
    ("train a group twice", with_stage(train={"groups": [1, 1]}), "stages[0].train.groups"),
    ("train a negative group", with_stage(train={"groups": [-1, 2]}), "stages[0].train.groups"),
    ("train groups and last", with_stage(train={"groups": [0], "last": 1}), "stages[0].train.last"),
    ("layer_decay 0", with_stage(1, lr=1e-3, layer_decay=0), "stages[1].layer_decay"),
    ("layer_decay above 1", with_stage(1, lr=1e-3, layer_decay=1.5), "stages[1].layer_decay"),
    ("layer_decay on a slice", with_stage(1, layer_decay=0.75), "stages[1]: layer_decay"),
    ("l2sp negative alpha", with_stage(l2sp={"alpha_sp": -1, "beta": 0}), "stages[0].l2sp.alpha_sp"),
    ("l2sp without beta", with_stage(l2sp={"alpha_sp": 0.1}), "stages[0].l2sp.beta"),
    ("one class", tiny_recipe_dict(data={"classes": ["Bag"]}), "data.classes"),
    ("unknown device", tiny_recipe_dict(device="tpu"), "device"),
    ("negative seed", tiny_recipe_dict(seed=-1), "seed"),
]


@pytest.mark.parametrize("d,field", [(d, f) for _, d, f in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_recipe_is_one_line_error_naming_the_field(d, field):
    with pytest.raises(HarnessError) as ei:
        Recipe.from_dict(d)
    msg = str(ei.value)
    assert "\n" not in msg
    assert field in msg, msg
    assert msg.startswith("recipe: ")


def test_error_message_names_the_source_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_stage(epochs=0)))
    with pytest.raises(HarnessError, match=r"bad\.yaml: stages\[0\]\.epochs"):
        Recipe.from_yaml(path)


def test_unknown_nested_key_suggests_the_close_field():
    with pytest.raises(HarnessError) as ei:
        Recipe.from_dict(with_stage(pct_strat=0.3))
    assert "did you mean 'pct_start'" in str(ei.value)
    with pytest.raises(HarnessError) as ei:
        Recipe.from_dict(tiny_recipe_dict(data={"batchsize": 4}))
    assert "did you mean 'batch_size'" in str(ei.value)


def test_unknown_arch_suggests_the_close_arch():
    with pytest.raises(HarnessError) as ei:
        Recipe.from_dict(tiny_recipe_dict(model={"arch": "resnet19"}))
    msg = str(ei.value)
    assert "'resnet19'" in msg and "did you mean 'resnet18'" in msg


def test_unknown_key_in_lr_slice_suggests_min():
    with pytest.raises(HarnessError) as ei:
        Recipe.from_dict(with_stage(lr={"max": 1e-3, "mn": 1e-5}))
    assert "stages[0].lr.mn" in str(ei.value)
    assert "did you mean 'min'" in str(ei.value)


def test_bad_train_last_names_the_last_field():
    with pytest.raises(HarnessError) as ei:
        Recipe.from_dict(with_stage(train={"last": 0}))
    assert "stages[0].train.last" in str(ei.value)


def test_stage_validates_on_its_own():
    with pytest.raises(ValidationError):
        Stage(epochs=1, lr={"min": 1e-2, "max": 1e-3})
    with pytest.raises(ValidationError):
        Stage(epochs=1, lr=1e-3, unknown=1)


def test_recipe_is_frozen():
    r = Recipe.from_dict(tiny_recipe_dict())
    with pytest.raises(ValidationError):
        r.seed = 3  # type: ignore[misc]


# --- read_yaml ------------------------------------------------------------------------------

def test_read_yaml_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(HarnessError) as ei:
        read_yaml(path)
    msg = str(ei.value)
    assert "nope.yaml" in msg and "not found" in msg and "\n" not in msg


def test_read_yaml_invalid_syntax_reports_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 0\nstages:\n  - epochs: 1\n    lr: [1e-3\n")
    with pytest.raises(HarnessError) as ei:
        read_yaml(path)
    msg = str(ei.value)
    assert "broken.yaml" in msg and "line" in msg and "\n" not in msg


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType")])
def test_read_yaml_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(HarnessError) as ei:
        read_yaml(path)
    msg = str(ei.value)
    assert "mapping" in msg and kind in msg and "\n" not in msg


def test_read_yaml_directory(tmp_path):
    with pytest.raises(HarnessError):
        read_yaml(tmp_path)


def test_read_yaml_returns_the_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("seed: 3\ndata: {batch_size: 16}\n")
    assert read_yaml(path) == {"seed": 3, "data": {"batch_size": 16}}


# --- Stage helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("train,n,want", [("head", 3, 1), ("all", 3, 3), ("all", 5, 5),
                                          ({"last": 2}, 3, 2), ({"last": 3}, 3, 3), ({"groups": [0, 4]}, 5, 2)])
def test_stage_trainable_groups(train, n, want):
    assert Stage(epochs=1, train=train, lr=1e-3).trainable_groups(n) == want


@pytest.mark.parametrize("train,n,want", [("head", 3, (2,)), ("all", 3, (0, 1, 2)), ({"last": 2}, 4, (2, 3)),
                                          ({"groups": [3, 1]}, 4, (1, 3))])
def test_stage_trained_groups(train, n, want):
    assert Stage(epochs=1, train=train, lr=1e-3).trained_groups(n) == want


def test_stage_peak_lrs_follow_fastai_slice():
    assert Stage(epochs=1, lr=3e-3).peak_lrs(3) == pytest.approx([3e-3] * 3)
    assert Stage(epochs=1, lr={"max": 2e-3}).peak_lrs(3) == pytest.approx([2e-4, 2e-4, 2e-3], rel=1e-12)
    assert Stage(epochs=1, lr={"min": 1e-5, "max": 1e-3}).peak_lrs(3) == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)
    four = Stage(epochs=1, lr={"min": 1e-6, "max": 1e-3}).peak_lrs(4)
    assert four == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3], rel=1e-12)
