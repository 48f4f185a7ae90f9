"""Tests for harness.sweep.study: the shipped study files load, every invalid study file is refused
with one HarnessError line naming the field, and a trial's recipe spends exactly the budget."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner

from conftest import tiny_recipe_dict
from harness.errors import HarnessError
from harness.engine.recipe import Recipe
from harness.sweep.space import suggest
from harness.sweep.strategies import STRATEGIES
from harness.sweep.study import load_study
from shipped import read_yaml, resolve_study, shrink

STUDIES = Path(__file__).resolve().parent.parent / "studies"


def base_recipe() -> dict:
    d = tiny_recipe_dict()
    del d["stages"]
    return d


# the valid study every case departs from: studies/quickstart.yaml shrunk (tests/shipped.py) with
# these changes: the tiny recipe (resnet18, 16 px, 2 classes), 3 epochs, 2 random trials, no
# pruner, naive only, compare at its default 3 seeds (the metric is quickstart's val/accuracy)
TINY = {"name": "tiny", "recipe": base_recipe(), "budget": {"epochs": 3}, "trials": 2,
        "sampler": "random", "pruner": "none",
        "strategies": {"naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}, "compare": {"seeds": 3}}


@pytest.fixture
def study_dict(tmp_path):
    """`study_dict(**changes) -> dict`: the valid study (read back from its shrunk file) with
    top-level `changes` applied by dict.update (a value replaces the key's whole value).
    (shrink itself, not conftest's `shrunk` fixture: its make(name, **changes) cannot take
    the study's `name` as a change; quickstart has no pretraining to run.)"""
    def make(**changes) -> dict:
        d = read_yaml(shrink(resolve_study("quickstart"), tmp_path / "shrunk", **TINY).path)
        d.update(changes)
        return d
    return make


def write_study(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# --- the shipped studies ----------------------------------------------------------------------

SHIPPED = sorted(STUDIES.glob("*.yaml"))


def test_there_are_shipped_studies():
    assert {p.stem for p in SHIPPED} >= {"quickstart", "fashion-transfer", "imagefolder-example"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_study_loads(path):
    study = load_study(path)
    raw = yaml.safe_load(path.read_text())
    assert study.name == raw["name"]
    assert study.strategies == list(raw["strategies"])
    assert study.direction == "maximize"
    assert "stages" not in study.base
    for strategy in study.strategies:
        # the first trial (published defaults, clipped) and its recipe are valid
        first = study.baseline(strategy)
        recipe = study.recipe_for(strategy, first)
        assert recipe.epochs == raw["budget"]["epochs"]
        for name, value in first.items():
            spec = study.spaces[strategy][name]
            assert spec.lowest <= value <= spec.highest, (strategy, name, value)


# --- invalid study files: one line naming the field ----------------------------------------------

def two_phase(**space) -> dict:
    return {"two_phase": space}


INVALID = [
    # (id, changes to the valid study, the field the message starts with, words in the message)
    ("unknown-top-level-key", {"trails": 3}, "trails", "did you mean 'trials'"),
    ("unknown-strategy", {"strategies": {"naiv": None}}, "strategies.naiv", "did you mean 'naive'"),
    ("unknown-hyperparameter", {"strategies": {"naive": {"pct_strat": 0.3}}},
     "strategies.naive.pct_strat", "did you mean 'pct_start'"),
    ("unknown-hyperparameter-of-this-strategy", {"strategies": {"naive": {"freeze_epochs": 1}}},
     "strategies.naive.freeze_epochs", "unknown hyperparameter"),
    ("inverted-range", {"strategies": {"naive": {"lr": {"low": 1e-2, "high": 1e-4}}}},
     "strategies.naive.lr", "inverted"),
    ("log-range-from-zero", {"strategies": {"naive": {"lr": {"low": 0, "high": 1e-2, "log": True}}}},
     "strategies.naive.lr", "low > 0"),
    ("unknown-key-in-range", {"strategies": {"naive": {"lr": {"low": 1e-4, "high": 1e-2, "scale": "log"}}}},
     "strategies.naive.lr", "unknown key 'scale'"),
    ("float-freeze-epochs", {"strategies": two_phase(freeze_epochs={"low": 1, "high": 1.5})},
     "strategies.two_phase.freeze_epochs.high", "whole number"),
    ("freeze-epochs-reaches-budget", {"strategies": two_phase(freeze_epochs={"low": 1, "high": 3})},
     "strategies.two_phase.freeze_epochs", "budget.epochs (3)"),
    ("fixed-freeze-epochs-reaches-budget", {"strategies": two_phase(freeze_epochs=3)},
     "strategies.two_phase.freeze_epochs", "budget.epochs (3)"),
    ("lr-low-range-above-lr-high", {"strategies": two_phase(lr_low={"low": 1e-3, "high": 1e-2, "log": True},
                                                            lr_high={"low": 1e-4, "high": 1e-1, "log": True})},
     "strategies.two_phase.lr_low", "lr_high"),
    ("lr-low-range-above-default-lr-high", {"strategies": two_phase(lr_low={"low": 1e-4, "high": 1e-2})},
     "strategies.two_phase.lr_low", "0.01"),
    ("unknown-sampler", {"sampler": "cmaes"}, "sampler", "'tpe', 'gp' or 'random'"),
    ("unknown-pruner", {"pruner": "asha"}, "pruner", "'median', 'hyperband', 'layout' or 'none'"),
    ("zero-trials", {"trials": 0}, "trials", "greater than or equal to 1"),
    ("float-trials", {"trials": 2.5}, "trials", "integer"),
    ("zero-budget", {"budget": {"epochs": 0}}, "budget.epochs", "greater than or equal to 1"),
    ("budget-unknown-key", {"budget": {"epochs": 3, "minutes": 5}}, "budget.minutes", "unknown key"),
    ("unknown-metric", {"metric": "val/acc"}, "metric", "val/accuracy"),
    ("bad-name", {"name": "my study/1"}, "name", "pattern"),
    ("no-strategies", {"strategies": {}}, "strategies", "at least 1"),
    ("compare-seeds-zero", {"compare": {"seeds": 0}}, "compare.seeds", "greater than or equal to 1"),
    ("recipe-with-stages", {"recipe": tiny_recipe_dict()}, "recipe.stages", "not allowed"),
    ("recipe-bad-batch-size", {"recipe": {**base_recipe(), "data": {**base_recipe()["data"], "batch_size": 0}}},
     "recipe.data.batch_size", "greater than or equal to 2"),
    ("recipe-unknown-nested-key", {"recipe": {**base_recipe(), "data": {**base_recipe()["data"], "batchsize": 8}}},
     "recipe.data.batchsize", "did you mean 'batch_size'"),
    ("recipe-unknown-arch", {"recipe": {**base_recipe(), "model": {"arch": "resnet19"}}},
     "recipe.model.arch", "resnet18"),
    ("pct-start-range-to-1.5", {"strategies": {"naive": {"pct_start": {"low": 0.1, "high": 1.5}}}},
     "strategies.naive.pct_start", "1.5"),
    ("lr-range-from-zero", {"strategies": {"naive": {"lr": {"low": 0, "high": 1e-2}}}},
     "strategies.naive.lr", "greater than 0"),
    ("gradual-budget-2", {"budget": {"epochs": 2}, "strategies": {"gradual": None}},
     "strategies.gradual", "needs at least 3 epochs"),
    ("two-phase-budget-1", {"budget": {"epochs": 1}, "strategies": {"two_phase": None}},
     "strategies.two_phase", "freeze_epochs"),
    ("missing-recipe-file", {"recipe": "no/such/recipe.yaml"}, None, "no/such/recipe.yaml: file not found"),
    ("surgical-block-beyond-the-body", {"strategies": {"surgical": {"block": {"choices": [0, 2]}}}},
     "strategies.surgical", "block: must be a body group, 0..1"),
    ("surgical-block-range-beyond-the-body", {"strategies": {"surgical": {"block": {"low": 0, "high": 3}}}},
     "strategies.surgical", "got 3"),
    ("surgical-block-not-whole", {"strategies": {"surgical": {"block": {"choices": [0, 0.5]}}}},
     "strategies.surgical.block.choices", "whole number"),
    ("llrd-decay-above-1", {"strategies": {"llrd": {"layer_decay": {"low": 0.5, "high": 1.2}}}},
     "strategies.llrd.layer_decay", "less than or equal to 1"),
    ("l2sp-negative-alpha", {"strategies": {"l2sp": {"alpha_sp": -0.1}}},
     "strategies.l2sp.alpha_sp", "greater than or equal to 0"),
]


@pytest.mark.parametrize("changes, field, words", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_study_is_one_line_naming_the_field(tmp_path, study_dict, changes, field, words):
    path = write_study(tmp_path / "study.yaml", study_dict(**changes))
    with pytest.raises(HarnessError) as info:
        load_study(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    if field is not None:
        assert msg.startswith(f"{path}: {field}:"), msg
    assert words in msg, msg


@pytest.mark.parametrize("block", [{"choices": [1, 0]}, {"low": 0, "high": 1}])
def test_surgical_block_is_searched_as_a_choice_or_a_whole_number(tmp_path, study_dict, block):
    study = load_study(write_study(tmp_path / "study.yaml", study_dict(strategies={"surgical": {"block": block}})))
    assert study.baseline("surgical")["block"] == 0   # the published first block, inside the space
    sampled = set()
    ostudy = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = ostudy.ask()
        params = suggest(trial, study.spaces["surgical"])
        ostudy.tell(trial, 0.5)
        sampled.add(params["block"])
        assert study.recipe_for("surgical", params).stages[0].trained_groups(3) == (params["block"], 2)
    assert sampled == {0, 1} and all(type(b) is int for b in sampled)


def test_gradual_budget_error_names_the_budget(tmp_path, study_dict):
    path = write_study(tmp_path / "study.yaml",
                       study_dict(budget={"epochs": 2}, strategies={"gradual": None}))
    with pytest.raises(HarnessError, match=r"budget\.epochs: gradual needs at least 3 epochs.*got 2"):
        load_study(path)


@pytest.mark.parametrize("name, value", [("pct_start", 1.5), ("lr", 0), ("lr", "fast"), ("lr", True)])
def test_invalid_fixed_value_is_refused_naming_the_hyperparameter(tmp_path, study_dict, name, value):
    path = write_study(tmp_path / "study.yaml", study_dict(strategies={"naive": {name: value}}))
    with pytest.raises(HarnessError) as info:
        load_study(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: strategies.naive.{name}:"), msg


def test_malformed_yaml(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("name: tiny\nstrategies: {naive: [\n  budget: 3\n")
    with pytest.raises(HarnessError) as info:
        load_study(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: invalid YAML"), msg


def test_a_study_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("- naive\n- two_phase\n")
    with pytest.raises(HarnessError, match="expected a mapping"):
        load_study(path)


def test_cli_refuses_an_invalid_study_with_one_line_and_exit_code_2(tmp_path, study_dict):
    from harness.cli import main
    path = write_study(tmp_path / "study.yaml", study_dict(trails=3))
    for args in (["sweep", str(path)], ["status", str(path)], ["export", str(path)],
                 ["compare", str(path)]):
        res = CliRunner().invoke(main, [*args, "--workspace", str(tmp_path / "ws")])
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "trails" in lines[0], res.output
        assert "Traceback" not in res.output


# --- the recipe: inline or a path relative to the study file ---------------------------------

def test_recipe_path_relative_to_the_study_file(tmp_path, monkeypatch, study_dict):
    folder = tmp_path / "studies"
    (folder / "recipes").mkdir(parents=True)
    # a complete recipe (stages and all) may serve as the base: the strategies make the stages
    full = tiny_recipe_dict(seed=7)
    (folder / "recipes" / "base.yaml").write_text(yaml.safe_dump(full))
    path = write_study(folder / "study.yaml", study_dict(recipe="recipes/base.yaml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    study = load_study(path)
    expected = dict(full)
    del expected["stages"]
    assert study.base == expected
    recipe = study.recipe_for("naive", {})
    assert recipe.seed == 7 and recipe.data.batch_size == 8 and recipe.epochs == 3


def test_recipe_path_with_a_bad_field_names_it(tmp_path, study_dict):
    bad = base_recipe()
    bad["data"] = {**bad["data"], "batch_size": 0}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(bad))
    path = write_study(tmp_path / "study.yaml", study_dict(recipe=str(tmp_path / "base.yaml")))
    with pytest.raises(HarnessError) as info:
        load_study(path)
    assert "recipe.data.batch_size" in str(info.value) and "\n" not in str(info.value)


def test_defaults_of_the_optional_fields(tmp_path, study_dict):
    d = study_dict()
    for key in ("trials", "sampler", "pruner", "metric", "compare"):
        del d[key]
    study = load_study(write_study(tmp_path / "study.yaml", d))
    cfg = study.config
    assert (cfg.metric, cfg.trials, cfg.sampler, cfg.pruner, cfg.compare.seeds) == (
        "val/accuracy", 8, "tpe", "none", 3)
    assert study.direction == "maximize"
    for metric, direction in (("val/balanced_accuracy", "maximize"), ("val/macro_f1", "maximize"),
                              ("val/loss", "minimize")):
        assert load_study(write_study(tmp_path / "study.yaml", {**d, "metric": metric})).direction == direction
    d["metric"] = "val/f1"
    with pytest.raises(HarnessError, match=r"metric: Input should be 'val/accuracy', 'val/balanced_accuracy', "
                                           r"'val/macro_f1' or 'val/loss' \(got 'val/f1'\)"):
        load_study(write_study(tmp_path / "study.yaml", d))
    # the layout pruner's margin is a proportion's noise: a loss has none
    with pytest.raises(HarnessError, match="pruner: layout judges beyond a proportion's binomial noise"):
        load_study(write_study(tmp_path / "study.yaml", {**d, "metric": "val/loss", "pruner": "layout"}))


def test_a_strategy_without_a_space_keeps_its_defaults(tmp_path, study_dict):
    study = load_study(write_study(tmp_path / "study.yaml", study_dict(strategies={"naive": None})))
    assert study.spaces == {"naive": {}} and study.baseline("naive") == {}
    (stage,) = study.recipe_for("naive", {}).stages
    assert (stage.lr, stage.pct_start, stage.epochs) == (1e-3, 0.25, 3)


# --- recipe_for: base + the strategy's stages for the budget -------------------------------------

ALL = {"naive": None, "head_only": None, "two_phase": {"freeze_epochs": {"low": 1, "high": 4}},
       "discriminative": None, "gradual": None, "lp_ft": {"probe_epochs": {"low": 1, "high": 4}},
       "llrd": None, "surgical": {"block": {"choices": [0, 1]}}, "l2sp": None}


@pytest.mark.parametrize("budget", [3, 5])
def test_recipe_for_spends_exactly_the_budget(tmp_path, study_dict, budget):
    strategies = dict(ALL)
    if budget <= 4:
        strategies["two_phase"] = {"freeze_epochs": {"low": 1, "high": budget - 1}}
        strategies["lp_ft"] = {"probe_epochs": {"low": 1, "high": budget - 1}}
    study = load_study(write_study(tmp_path / "study.yaml",
                                   study_dict(budget={"epochs": budget}, strategies=strategies)))
    assert set(study.strategies) == set(STRATEGIES)
    for strategy in study.strategies:
        for params in ({}, study.baseline(strategy),
                       {n: s.highest for n, s in study.spaces[strategy].items()}):
            recipe = study.recipe_for(strategy, params)
            assert isinstance(recipe, Recipe)
            assert recipe.epochs == budget, (strategy, params)
            assert sum(s.epochs for s in recipe.stages) == budget
            assert recipe.data.batch_size == 8 and recipe.model.arch == "resnet18"


def test_recipe_for_uses_the_trials_hyperparameters_and_seed(tmp_path, study_dict):
    study = load_study(write_study(tmp_path / "study.yaml", study_dict(
        budget={"epochs": 4},
        strategies={"two_phase": {"freeze_epochs": {"low": 1, "high": 3},
                                  "lr_low": {"low": 1e-7, "high": 1e-4, "log": True},
                                  "lr_high": {"low": 1e-4, "high": 1e-2, "log": True}}})))
    recipe = study.recipe_for("two_phase", {"freeze_epochs": 3, "lr_low": 2e-6, "lr_high": 4e-3}, seed=5)
    s1, s2 = recipe.stages
    assert (s1.epochs, s1.train, s2.epochs, s2.train) == (3, "head", 1, "all")
    assert s1.lr.max == pytest.approx(8e-3) and (s2.lr.min, s2.lr.max) == (2e-6, 4e-3)
    assert s2.pct_start == 0.3                       # not searched: the published default
    assert recipe.seed == 5
    assert study.recipe_for("two_phase", {}).seed == 0
    # the recipe round-trips through YAML (what a trial stores and `export` writes)
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
