"""`harness sweep` runs the strategies that need engine support of their own (llrd, surgical,
l2sp) end to end: one trial each on the tiny recipe, tracked like the others."""
from __future__ import annotations

import optuna
import pytest
import torch
import yaml

from conftest import needs_fashion
from harness.engine.recipe import Recipe
from harness.sweep.study import load_study
from test_sweep import BASE_STUDY, Sweep, base_recipe, client_for, fresh_tracking_uri, history, invoke, write_study

STUDY = {**BASE_STUDY, "name": "tiny-methods", "recipe": base_recipe(), "budget": {"epochs": 1}, "trials": 1,
         "strategies": {"llrd": {"layer_decay": {"low": 0.5, "high": 0.9}},
                        "surgical": {"block": {"choices": [0, 1]}},
                        "l2sp": {"alpha_sp": {"low": 0.01, "high": 1.0, "log": True}}}}


@needs_fashion
@pytest.mark.slow   # 3 trials through the CLI with real Optuna and MLflow stores: ~20 s on 2 busy cores
def test_a_sweep_runs_llrd_surgical_and_l2sp(tmp_path, tmp_path_factory):
    torch.set_num_threads(1)
    path = write_study(tmp_path / "study.yaml", STUDY)
    sw = Sweep(path, load_study(path), tmp_path / "ws", f"sqlite:///{tmp_path / 'optuna.db'}",
               fresh_tracking_uri(tmp_path_factory, tmp_path), "")
    invoke(["sweep", path, *sw.opts()])
    client = client_for(sw.tracking)
    first = {"llrd": {"layer_decay": 0.75}, "surgical": {"block": 0}, "l2sp": {"alpha_sp": 0.1}}
    parents = sw.parents()
    assert sorted(parents) == ["l2sp", "llrd", "surgical"]
    for strategy, parent in parents.items():
        (trial,) = sw.ostudy(strategy).get_trials()
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.params == first[strategy]
        recipe = Recipe.from_dict(yaml.safe_load(trial.user_attrs["recipe"]))
        assert recipe == sw.study.recipe_for(strategy, trial.params)
        (kid,) = sw.children(parent.info.run_id)
        params, metrics = kid.data.params, kid.data.metrics
        assert {k: type(v)(params[k]) for k, v in trial.params.items()} == trial.params
        # each block's spread shows as a group's fastest and slowest LR, for llrd only
        assert ("lr/early/min" in metrics) == (strategy == "llrd"), strategy
        assert len(history(client, kid.info.run_id, "lr/head")) == 6
    kid = sw.children(parents["llrd"].info.run_id)[0]
    assert kid.data.params["stages.0.layer_decay"] == "0.75"
    kid = sw.children(parents["surgical"].info.run_id)[0]
    assert kid.data.params["stages.0.train.groups"] == "[0, 2]"
    kid = sw.children(parents["l2sp"].info.run_id)[0]
    assert (kid.data.params["stages.0.l2sp.alpha_sp"], kid.data.params["stages.0.l2sp.beta"]) == ("0.1", "0.01")
