"""WiSE-FT at compare time (harness/engine/wise_ft.py): exact ends of the interpolation, the start
model's rule (pretrained body; the probe stages' head, else the fine-tuned head), alpha chosen
on validation, the grid refused outside [0, 1], and a compare end to end."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.engine.models import build_model
from harness.sweep.strategies import stages_for
from harness.engine.recipe import Recipe
from harness.engine.wise_ft import choose, head_stage, interpolate, start_state

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int):
    torch.manual_seed(seed)
    return build_model("resnet18", 3, "none", "fastai", image_size=16).eval()


def test_alpha_0_and_1_give_exactly_the_two_models_logits():
    start, tuned = _model(0), _model(1)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want0, want1 = start(x), tuned(x)
        wise = copy.deepcopy(tuned)
        for alpha, want in ((0.0, want0), (1.0, want1)):
            wise.load_state_dict(interpolate(start.state_dict(), tuned.state_dict(), alpha))
            assert torch.equal(wise(x), want), alpha
        wise.load_state_dict(interpolate(start.state_dict(), tuned.state_dict(), 0.5))
        half = wise(x)
    assert not torch.equal(half, want0) and not torch.equal(half, want1)


def test_the_start_model_is_the_pretrained_body_with_the_probe_head_or_the_fine_tuned_head():
    pretrained, tuned, probe = _model(0), _model(1), _model(2)
    body = pretrained.body_state_dict()
    head_keys = [k for k in tuned.state_dict() if k not in body]
    assert head_keys and all(k.startswith("2.") for k in head_keys)   # resnet18: group 2 is the head
    for head, source in ((None, tuned), ({k: probe.state_dict()[k] for k in head_keys}, probe)):
        theta_0 = start_state(tuned, body, head)
        assert all(torch.equal(theta_0[k], v) for k, v in body.items())
        assert all(torch.equal(theta_0[k], source.state_dict()[k]) for k in head_keys)


@pytest.mark.parametrize("strategy, params, stage", [
    ("naive", {}, None), ("discriminative", {}, None),      # the head starts random: the fine-tuned one
    ("head_only", {}, None),                                 # the body never trains: its own head
    ("two_phase", {"freeze_epochs": 2}, 1), ("lp_ft", {"probe_epochs": 2}, 1), ("gradual", {}, 1),
])
def test_the_start_head_is_taken_after_the_head_only_stages_that_precede_body_training(strategy, params, stage):
    stages = [s.model_dump(mode="json") for s in stages_for(strategy, 4, 3, **params)]
    assert head_stage(Recipe.from_dict({"stages": stages})) == stage


def test_validation_chooses_alpha_and_a_tie_goes_to_the_larger_alpha():
    alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
    assert choose(alphas, [0.5, 0.7, 0.6, 0.6, 0.4]) == 0.25
    assert choose(alphas, [0.5, 0.7, 0.6, 0.7, 0.4]) == 0.75
    assert choose(alphas, [0.0] * 5) == 1.0


# --- the grid and the start model, refused before anything is written ----------------------------

@pytest.mark.parametrize("study, alphas, says", [
    ("quickstart", [0, 0.5, 1.5], "compare.wise_ft.alphas: every alpha must lie in [0, 1] (0: the start model, "
                                  "1: the fine-tuned one), got [0.0, 0.5, 1.5]"),
    ("quickstart", [-0.25, 1], "compare.wise_ft.alphas: every alpha must lie in [0, 1]"),
    ("quickstart", [0.5, 0.5], "compare.wise_ft.alphas: alphas must differ by at least 0.001, got [0.5, 0.5]"),
    ("imagefolder-example", [0, 1], "compare.wise_ft: recipe.model.weights is none, so there is no pretrained "
                                    "start model to interpolate with"),
])
def test_a_bad_grid_or_no_start_model_is_one_line_and_writes_nothing(shrunk, tmp_path, study, alphas, says):
    path = shrunk(study, compare={"wise_ft": {"alphas": alphas}})
    ws = tmp_path / "ws"
    res = CliRunner().invoke(main, ["compare", str(path), "--workspace", str(ws)])
    assert res.exit_code == 2 and says in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not ws.exists()


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.slow   # a sweep of 2 strategies and a compare of 2 seeds with WiSE-FT on Lite0: ~60 s
def test_compare_scores_every_alpha_from_the_exact_start_model(shrunk, tmp_path):
    from harness.compare import compare, plan_compare, save_comparison
    from harness.engine.stages import StagePlan
    from harness.engine.train import evaluate, fine_tune
    from harness.results import trial_recipe
    from harness.sweep.keep import load_kept
    from harness.sweep.optuna_studies import best_trial, load_ostudy
    from harness.sweep.study import load_study
    from harness.workspace import Stores
    from test_sweep import client_for, invoke

    path = shrunk("quickstart", trials=1, compare={"wise_ft": {"alphas": [0, 0.5, 1]}},
                  strategies={"naive": {"lr": 1e-3}, "lp_ft": {"probe_epochs": 1, "lr_probe": 1e-2, "lr": 1e-3}})
    ws = tmp_path / "ws"
    invoke(["sweep", path, "--workspace", ws])
    study = load_study(path)
    stores = Stores.resolve(ws)
    kept = {}
    for s in ("naive", "lp_ft"):
        trial = best_trial(load_ostudy(study, s, stores.storage))
        kept[s] = load_kept(stores.kept_models(study.name, s), trial.number, trial_recipe(trial))
    assert kept["naive"].start_head is None and kept["lp_ft"].start_head is not None   # only a probe's head is kept

    cmp = compare(study, stores, plan_compare(study), echo=lambda line: None)
    rows = {r.strategy: r for r in cmp.rows}
    pretrained = build_model("timm/tf_efficientnet_lite0", 5, "imagenet", "fastai", 3, 32)
    for s, r in rows.items():
        w = r.wise_ft
        assert w.alphas == (0.0, 0.5, 1.0) and w.conditions == ["val", "test", "gaussian_noise-1"]
        assert [c[-1] for c in w.curves["test"]] == r.test   # alpha 1 is the fine-tuned model
        assert w.curves["val"][0][-1] == r.best_val          # seed 0: the trial itself, on its own val split
        for k in range(2):   # alpha 0, rebuilt by hand: the pretrained body and the rule's head
            recipe = r.recipe.replace(seed=r.recipe.seed + k)
            if s == "lp_ft":   # the head after the probe stage, trained again
                head_model = fine_tune(recipe, workspace=ws, plan=StagePlan(stop=1, test=False)).model
            else:              # the fine-tuned head: seed 0's model is the one compare kept
                head_model = r.model if k == 0 else fine_tune(recipe, workspace=ws).model
            theta_0 = copy.deepcopy(pretrained)
            body = theta_0.body_state_dict()
            theta_0.load_state_dict({**theta_0.state_dict(),
                                     **{n: v for n, v in head_model.state_dict().items() if n not in body}})
            test = _test_split(recipe, ws)
            assert evaluate(theta_0, test, 16, torch.device("cpu"))[1] == w.curves["test"][k][0], (s, k)

    out = save_comparison(study, cmp, stores)
    table = pd.read_csv(out / "compare.csv")
    assert {"wise_ft_alpha_mean", "wise_ft_test_mean", "wise_ft_gaussian_noise-1_mean"} <= set(table.columns)
    curves = pd.read_csv(out / "compare_wise_ft.csv")
    assert len(curves) == 2 * 3 * 3 and "## WiSE-FT" in (out / "compare.md").read_text()
    client = client_for(f"sqlite:///{ws.resolve()}/mlflow.db")
    run = next(r for r in client.search_runs([client.get_experiment_by_name(study.name).experiment_id])
               if r.info.run_name == "compare")
    history = client.get_metric_history(run.info.run_id, "wise_ft/test/lp_ft")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 500, 1000]
    assert len(client.get_metric_history(run.info.run_id, "wise_ft_alpha/lp_ft")) == 2


def _test_split(recipe, ws):
    from harness.engine import data as data_mod
    return data_mod.load_dataset(recipe.data, ws, recipe.seed).test
