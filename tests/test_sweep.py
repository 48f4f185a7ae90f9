"""End-to-end tests of `harness sweep` (through the CLI, on real SQLite Optuna and MLflow
stores): one Optuna study per strategy, the published defaults as first trials, the MLflow
parent/child layout, resuming, diverged and pruned trials, and export -> train replay.

The base sweep (2 strategies x 2 trials x 3 epochs) is made once per session by
`base_sweep()`, which test_results.py shares; tests that change a sweep work on copies.
Every test that uses it is marked slow (making it takes ~20 s on a 2-core CPU).
"""
from __future__ import annotations

import shutil
import sqlite3
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import FASHION_DIR, needs_fashion, tiny_recipe_dict, template_store
from harness.cli import main
from harness.engine.recipe import Recipe
from harness.workspace import Stores
from harness.sweep.study import Study, load_study
from shipped import read_yaml, resolve_study, shrink

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH = (2 * 24) // 8                   # as test_cli.py counts for the tiny recipe
THREADS = 1

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    """One intra-op thread, like the session's base sweep: results depend on the thread count
    (an exact replay needs the same one), and 2 threads on a busy 2-core machine crawl."""
    torch.set_num_threads(THREADS)
    yield


# --- helpers shared with test_results.py ------------------------------------------------------

def base_recipe() -> dict:
    d = tiny_recipe_dict()
    del d["stages"]
    return d


def write_study(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def shrunk_study(**changes) -> dict:
    """studies/quickstart.yaml shrunk by tests/shipped.py with `changes`, read back as a dict
    (self-contained: its recipe is inline)."""
    with tempfile.TemporaryDirectory() as tmp:
        shrunk = shrink(resolve_study("quickstart"), tmp, **changes)
        assert not shrunk.pretrain
        return read_yaml(shrunk.path)


def fresh_tracking_uri(tmp_path_factory, folder: Path) -> str:
    db = folder / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)
    return f"sqlite:///{db}"


def client_for(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def invoke(args: list[str]):
    """Run the CLI in-process; fail with its output and traceback when it exits non-zero."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exit_code != 0:
        tb = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info else ""
        pytest.fail(f"harness {' '.join(map(str, args))} exited {res.exit_code}:\n{res.output[-4000:]}\n{tb}")
    return res


@dataclass
class Sweep:
    path: Path              # the study file
    study: Study
    workspace: Path
    storage: str            # Optuna storage URL
    tracking: str           # MLflow tracking URI
    output: str             # what `harness sweep` printed

    def opts(self, tracking: bool = True) -> list[str]:
        o = ["--workspace", str(self.workspace), "--storage", self.storage]
        return o + (["--tracking-uri", self.tracking] if tracking else [])

    def ostudy(self, strategy: str) -> optuna.Study:
        from harness.sweep.storage import open_storage
        return optuna.load_study(study_name=f"{self.study.name}/{strategy}", storage=open_storage(self.storage))

    def runs(self) -> list:
        client = client_for(self.tracking)
        exp = client.get_experiment_by_name(self.study.name)
        assert exp is not None, f"no MLflow experiment named {self.study.name}"
        return client.search_runs([exp.experiment_id], max_results=1000)

    def parents(self) -> dict:
        """strategy -> its parent run (the runs a sweep tags harness.kind=sweep)."""
        out = {}
        for r in self.runs():
            if r.data.tags.get("harness.kind") == "sweep":
                assert r.data.tags["strategy"] not in out, "two parent runs for one strategy"
                out[r.data.tags["strategy"]] = r
        return out

    def children(self, parent_id: str) -> list:
        kids = [r for r in self.runs() if r.data.tags.get("mlflow.parentRunId") == parent_id]
        return sorted(kids, key=lambda r: int(r.data.tags["optuna.trial_number"]))


# The base sweep's study (and the one the other tests and test_results.py vary, as
# `{**BASE_STUDY, "recipe": base_recipe(), ...}`): quickstart shrunk to the tiny recipe
# (resnet18 from scratch, 2 classes at 16 px, batch 8), 3 epochs, 2 random trials, no pruner,
# two strategies, compare at 2 seeds.
BASE_STUDY = shrunk_study(
    name="tiny-sweep",
    recipe=base_recipe(),
    budget={"epochs": 3},
    metric="val/accuracy",
    trials=2,
    sampler="random",
    pruner="none",
    strategies={
        # pct_start's range is above the published 0.25, so trial 0 has it clipped to 0.3
        "naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "pct_start": {"low": 0.3, "high": 0.6}},
        # lr_high's range starts above the published 1e-3: clipped to 2e-3
        "two_phase": {"freeze_epochs": {"low": 1, "high": 2},
                      "lr_low": {"low": 1e-6, "high": 1e-4, "log": True},
                      "lr_high": {"low": 2e-3, "high": 2e-2, "log": True},
                      "pct_start": {"low": 0.1, "high": 0.5}},
    },
    compare={"seeds": 2},
)
# the published defaults (naive lr 1e-3 pct 0.25; two_phase freeze 1, lr_high 1e-3, lr_low 1e-5,
# pct 0.3), clipped into BASE_STUDY's ranges
FIRST_TRIALS = {"naive": {"lr": 1e-3, "pct_start": 0.3},
                "two_phase": {"freeze_epochs": 1, "lr_low": 1e-5, "lr_high": 2e-3, "pct_start": 0.3}}

_SWEEPS: dict[str, Sweep] = {}


def base_sweep(tmp_path_factory) -> Sweep:
    """The session's base sweep, run once through `harness sweep` and shared (read-only)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _SWEEPS:
        torch.set_num_threads(THREADS)
        root = tmp_path_factory.mktemp("base-sweep")
        path = write_study(root / "study.yaml", {**BASE_STUDY, "recipe": base_recipe()})
        sw = Sweep(path, load_study(path), root / "ws", f"sqlite:///{root / 'optuna.db'}",
                   fresh_tracking_uri(tmp_path_factory, root), "")
        sw.output = invoke(["sweep", path, *sw.opts()]).output
        _SWEEPS[key] = sw
    return _SWEEPS[key]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Sweep:
    if not FASHION_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    return base_sweep(tmp_path_factory)


def copy_sweep(sw: Sweep, dst: Path) -> Sweep:
    """A private copy of a sweep's stores (and MLflow artifacts, re-pointed at the copy), so a
    test may add trials without touching the shared sweep."""
    dst.mkdir(parents=True, exist_ok=True)
    opt_db, ml_db = dst / "optuna.db", dst / "mlflow.db"
    shutil.copyfile(sw.storage.removeprefix("sqlite:///"), opt_db)
    shutil.copyfile(sw.tracking.removeprefix("sqlite:///"), ml_db)
    old, new = (sw.workspace / "artifacts").resolve().as_uri(), (dst / "artifacts").resolve().as_uri()
    shutil.copytree(sw.workspace / "artifacts", dst / "artifacts")
    with sqlite3.connect(ml_db) as con:
        con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    return Sweep(sw.path, sw.study, sw.workspace, f"sqlite:///{opt_db}", f"sqlite:///{ml_db}", sw.output)


def history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


# --- options -------------------------------------------------------------------------------------

def test_unknown_strategy_option_is_one_line_exit_2(tmp_path):
    path = write_study(tmp_path / "study.yaml", {**BASE_STUDY, "recipe": base_recipe()})
    res = CliRunner().invoke(main, ["sweep", str(path), "--strategy", "naive", "--strategy", "gradual",
                                    "--workspace", str(tmp_path / "ws"),
                                    "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == ("error: --strategy: 'gradual' is not in the study "
                                  "(it has: naive, two_phase)")


# --- the base sweep: Optuna -----------------------------------------------------------------------

@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_one_optuna_study_per_strategy_with_complete_trials(swept):
    summaries = optuna.get_all_study_summaries(swept.storage)
    assert sorted(s.study_name for s in summaries) == ["tiny-sweep/naive", "tiny-sweep/two_phase"]
    for strategy in ("naive", "two_phase"):
        ostudy = swept.ostudy(strategy)
        assert ostudy.direction == optuna.study.StudyDirection.MAXIMIZE
        trials = ostudy.get_trials()
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
        for t in trials:
            # val accuracy reported after every epoch, on one global epoch axis
            assert sorted(t.intermediate_values) == [1, 2, 3], t.intermediate_values
            assert t.value == t.intermediate_values[3]
            assert 0.0 <= t.value <= 1.0
            assert t.user_attrs["seconds"] > 0
            # the trial's complete recipe: the base + the strategy's stages for the budget
            recipe = Recipe.from_dict(yaml.safe_load(t.user_attrs["recipe"]))
            assert recipe == swept.study.recipe_for(strategy, t.params)
            assert recipe.epochs == 3
    assert "naive" in swept.output and "two_phase" in swept.output


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_trial_0_is_the_published_default_clipped(swept):
    for strategy, expected in FIRST_TRIALS.items():
        first = swept.ostudy(strategy).get_trials()[0]
        assert first.number == 0
        assert first.params == expected, strategy
    two_phase = swept.ostudy("two_phase").get_trials()[1].params
    assert two_phase["lr_low"] <= two_phase["lr_high"]


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_mlflow_one_parent_per_strategy_and_a_child_per_trial(swept):
    client = client_for(swept.tracking)
    parents = swept.parents()
    assert sorted(parents) == ["naive", "two_phase"]
    expected_params = {"naive": {"lr", "pct_start"},
                       "two_phase": {"freeze_epochs", "lr_low", "lr_high", "pct_start"}}
    for strategy, parent in parents.items():
        ostudy = swept.ostudy(strategy)
        assert ostudy.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
        assert parent.info.status == "FINISHED"
        assert "mlflow.parentRunId" not in parent.data.tags
        assert parent.data.tags["optuna.study"] == f"tiny-sweep/{strategy}"
        kids = swept.children(parent.info.run_id)
        trials = ostudy.get_trials()
        assert len(kids) == len(trials) == 2
        for kid, trial in zip(kids, trials):
            tags, params = kid.data.tags, kid.data.params
            assert kid.info.status == "FINISHED"
            assert tags["mlflow.parentRunId"] == parent.info.run_id
            assert tags["strategy"] == strategy
            assert tags["optuna.trial_number"] == str(trial.number)
            assert trial.user_attrs["mlflow_run_id"] == kid.info.run_id
            assert kid.info.run_name == f"{strategy}-trial-{trial.number}"
            # the trial's hyperparameters under their own names, exactly
            assert expected_params[strategy] <= set(params)
            assert {k: type(v)(params[k]) for k, v in trial.params.items()} == trial.params
            # ... plus everything `harness train` logs: the flattened recipe, curves, artifacts
            assert params["data.batch_size"] == "8" and params["model.arch"] == "resnet18"
            assert tags["layer_groups"] == "early,late,head"
            lr_head = history(client, kid.info.run_id, "lr/head")
            assert [m.step for m in lr_head] == list(range(3 * STEPS_PER_EPOCH))
            val = history(client, kid.info.run_id, "val/accuracy")
            assert [m.step for m in val] == [1, 2, 3]
            assert [m.value for m in val] == [trial.intermediate_values[e] for e in (1, 2, 3)]
            assert {a.path for a in client.list_artifacts(kid.info.run_id)} >= {"recipe.yaml", "lr_schedule.png"}
            # the sweep never looks at the test split
            assert not client.get_metric_history(kid.info.run_id, "test/accuracy")


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_mlflow_parent_has_the_best_trial_its_recipe_the_table_and_plots(swept, tmp_path):
    client = client_for(swept.tracking)
    for strategy, parent in swept.parents().items():
        ostudy = swept.ostudy(strategy)
        best = ostudy.best_trial
        run_id = parent.info.run_id
        assert parent.data.metrics["best/accuracy"] == best.value
        for k, v in best.params.items():
            assert parent.data.metrics[f"best/{k}"] == pytest.approx(float(v))
            assert parent.data.tags[f"best.{k}"] == str(v)
        assert parent.data.tags["best.trial"] == str(best.number)
        assert parent.data.params["strategy"] == strategy and parent.data.params["budget.epochs"] == "3"
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"best_recipe.yaml", "trials.csv", "optimization_history.png"} <= names, names
        dst = tmp_path / strategy
        dst.mkdir()
        best_yaml = Path(client.download_artifacts(run_id, "best_recipe.yaml", str(dst))).read_text()
        assert Recipe.from_dict(yaml.safe_load(best_yaml)) == Recipe.from_dict(
            yaml.safe_load(best.user_attrs["recipe"]))
        table = pd.read_csv(client.download_artifacts(run_id, "trials.csv", str(dst)))
        assert sorted(table["number"]) == [t.number for t in ostudy.get_trials()]
        assert "user_attrs_recipe" not in table.columns
        png = Path(client.download_artifacts(run_id, "optimization_history.png", str(dst))).read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 1000


# --- resume ---------------------------------------------------------------------------------------

@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_running_again_adds_only_the_missing_trials(swept, tmp_path):
    sw = copy_sweep(swept, tmp_path / "copy")
    parents_before = {s: r.info.run_id for s, r in sw.parents().items()}
    kids_before = {s: {k.info.run_id for k in sw.children(p)} for s, p in parents_before.items()}
    assert all(len(k) == 2 for k in kids_before.values())

    out = invoke(["sweep", sw.path, "--trials", 3, *sw.opts()]).output
    assert "2 trials done, running 1 more" in out
    for strategy in ("naive", "two_phase"):
        trials = sw.ostudy(strategy).get_trials()
        assert [t.number for t in trials] == [0, 1, 2]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # the same parent runs, each with exactly one new child
    parents_after = {s: r.info.run_id for s, r in sw.parents().items()}
    assert parents_after == parents_before
    kids_after = {}
    for strategy, parent_id in parents_after.items():
        kids = sw.children(parent_id)
        kids_after[strategy] = {k.info.run_id for k in kids}
        new = [k for k in kids if k.info.run_id not in kids_before[strategy]]
        assert len(new) == 1 and new[0].data.tags["optuna.trial_number"] == "2"
        assert kids_before[strategy] < kids_after[strategy]
    # the shared sweep was not touched
    assert len(swept.ostudy("naive").get_trials()) == 2

    out = invoke(["sweep", sw.path, "--trials", 3, *sw.opts()]).output
    assert "already has 3 trials; nothing to add" in out
    for strategy, parent_id in parents_after.items():
        assert len(sw.ostudy(strategy).get_trials()) == 3
        assert {k.info.run_id for k in sw.children(parent_id)} == kids_after[strategy]


# --- a diverged trial -------------------------------------------------------------------------------



def diverging_sweep(tmp_path, tmp_path_factory, workspace, lr: float, trials: int):
    study = {**BASE_STUDY, "name": "diverge", "recipe": base_recipe(), "trials": trials,
             "strategies": {"naive": {"lr": lr, "pct_start": {"low": 0.2, "high": 0.4}}}}
    path = write_study(tmp_path / "study.yaml", study)
    sw = Sweep(path, load_study(path), workspace, f"sqlite:///{tmp_path / 'optuna.db'}",
               fresh_tracking_uri(tmp_path_factory, tmp_path), "")
    res = CliRunner().invoke(main, ["sweep", str(path), *sw.opts()])
    assert res.exit_code == 0, res.output
    sw.output = res.output
    return sw


def test_count_trials_sorts_every_state():
    from harness.sweep.optuna_studies import Counts, count_trials
    ostudy = optuna.create_study(direction="maximize")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    S = optuna.trial.TrialState
    for state, value, attrs in [(S.COMPLETE, 0.8, {}), (S.PRUNED, None, {}),
                                (S.FAIL, None, {"failure": "diverged at step 3"}), (S.FAIL, None, {})]:
        ostudy.add_trial(optuna.trial.create_trial(state=state, value=value, params={"lr": 1e-3},
                                                   distributions=dist, user_attrs=attrs))
    ostudy.ask()                                     # left running
    got = count_trials(ostudy)
    assert got == Counts(complete=1, pruned=1, failed=1, errored=1, running=1)
    assert got.done == 3


@needs_fashion
@pytest.mark.timeout(600)
def test_a_diverged_trial_is_failed_with_its_reason_and_the_sweep_goes_on(tmp_path, tmp_path_factory, workspace):
    # lr 1e8: the training loss is NaN within the first epoch
    sw = diverging_sweep(tmp_path, tmp_path_factory, workspace, 1e8, trials=2)
    trials = sw.ostudy("naive").get_trials()
    assert len(trials) == 2                          # the second trial ran after the first diverged
    for t in trials:
        assert t.state == optuna.trial.TrialState.FAIL
        assert t.user_attrs["failure"].startswith("diverged"), t.user_attrs
        assert t.value is None
    assert trials[0].params == {"pct_start": 0.25}   # lr is fixed: only pct_start is searched
    (parent,) = sw.parents().values()
    kids = sw.children(parent.info.run_id)
    assert len(kids) == 2
    for kid, t in zip(kids, trials):
        assert kid.info.status == "FAILED"
        assert kid.data.tags["harness.reason"] == t.user_attrs["failure"]
        assert kid.data.params["lr"] == "100000000.0"
    assert parent.info.status == "FINISHED"
    # the status table counts them as failed
    line = next(ln for ln in sw.output.splitlines() if ln.startswith("naive "))
    assert line.split()[:7] == ["naive", "0", "0", "2", "0", "0", "-"]


@needs_fashion
@pytest.mark.timeout(600)
def test_a_trial_out_of_memory_fails_with_its_batch_size_and_the_sweep_goes_on(tmp_path, tmp_path_factory,
                                                                              workspace, monkeypatch):
    real, calls = torch.nn.functional.cross_entropy, []

    def cross_entropy(*args, **kwargs):      # the first trial's first step runs out of memory
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    study = {**BASE_STUDY, "name": "oom", "recipe": base_recipe(), "trials": 2,
             "strategies": {"naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}}
    path = write_study(tmp_path / "study.yaml", study)
    sw = Sweep(path, load_study(path), workspace, str(tmp_path / "optuna.journal"),
               fresh_tracking_uri(tmp_path_factory, tmp_path), "")
    res = CliRunner().invoke(main, ["sweep", str(path), *sw.opts()])
    assert res.exit_code == 0, res.output
    first, second = sw.ostudy("naive").get_trials()
    assert first.state == optuna.trial.TrialState.FAIL
    assert first.user_attrs["failure"] == "out of memory at batch size 8"
    assert second.state == optuna.trial.TrialState.COMPLETE
    assert "trial 0 fail     out of memory at batch size 8" in res.output
    (parent,) = sw.parents().values()
    kid = sw.children(parent.info.run_id)[0]
    assert kid.info.status == "FAILED" and kid.data.tags["harness.reason"] == "out of memory at batch size 8"


@needs_fashion
@pytest.mark.timeout(600)
def test_a_trial_at_lr_1e3_is_recorded_as_diverged(tmp_path, tmp_path_factory, workspace):
    sw = diverging_sweep(tmp_path, tmp_path_factory, workspace, 1e3, trials=1)
    (t,) = sw.ostudy("naive").get_trials()
    assert t.state == optuna.trial.TrialState.FAIL, (t.state, t.value)
    assert t.user_attrs["failure"].startswith("diverged")


# --- pruning, on a constructed case ------------------------------------------------------------

def fake_fine_tune(values_per_trial: list[float], calls: list):
    """A stand-in for tracked_fine_tune: reports `values_per_trial[n]` after each of the
    recipe's epochs for the n-th call, as the real one does, and logs val/accuracy."""
    from harness.engine.run_types import EpochStats, Result

    def fake(recipe, tracker, workspace="workspace", *, report=None, progress=False, plan=None, metric="val/accuracy"):
        n = len(calls)
        calls.append({"lr": recipe.stages[0].peak_lrs(3)[-1]})   # naive's one hyperparameter
        value = values_per_trial[n]
        result = Result(group_names=["early", "late", "head"])
        for epoch in range(1, recipe.epochs + 1):
            tracker.log_epoch(epoch, {"val/accuracy": value})
            result.epochs.append(EpochStats(epoch, 0, 0.5, 0.5, value, 0.01))
            if report is not None:
                report(epoch, value)
        return result

    return fake


@pytest.mark.timeout(600)
def test_median_pruner_prunes_a_trial_below_the_median(tmp_path, tmp_path_factory, monkeypatch):
    import harness.jobs
    from harness.sweep.run import run_sweep

    study_d = {**BASE_STUDY, "name": "prune", "recipe": base_recipe(), "trials": 4, "pruner": "median",
               "strategies": {"naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "head_only": None}}
    path = write_study(tmp_path / "study.yaml", study_d)
    study = load_study(path)
    calls: list = []
    monkeypatch.setattr(harness.jobs, "tracked_fine_tune", fake_fine_tune([0.9, 0.9, 0.9, 0.1], calls))
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", fresh_tracking_uri(tmp_path_factory, tmp_path)
    lines: list[str] = []
    run_sweep(study, Stores.resolve(tmp_path / "ws", storage, uri), study.select(["naive"]), echo=lines.append)
    assert len(calls) == 4
    assert calls[0] == {"lr": 1e-3}
    sw = Sweep(path, study, tmp_path / "ws", storage, uri, "\n".join(lines))

    trials = sw.ostudy("naive").get_trials()
    S = optuna.trial.TrialState
    assert [t.state for t in trials] == [S.COMPLETE, S.COMPLETE, S.COMPLETE, S.PRUNED]
    assert [t.intermediate_values for t in trials[:3]] == [{1: 0.9, 2: 0.9, 3: 0.9}] * 3
    assert trials[3].intermediate_values == {1: 0.1}      # pruned right after its first epoch
    with pytest.raises(KeyError):                          # --strategy naive: head_only never started
        sw.ostudy("head_only")

    (parent,) = sw.parents().values()
    kids = sw.children(parent.info.run_id)
    assert [k.info.status for k in kids] == ["FINISHED", "FINISHED", "FINISHED", "KILLED"]
    assert kids[3].data.tags["harness.pruned"] == "true"
    assert all("harness.pruned" not in k.data.tags for k in kids[:3])
    assert parent.data.metrics["best/accuracy"] == 0.9
    assert any("trial 3 pruned" in ln for ln in lines), lines


@pytest.mark.parametrize("strategy, pruned", [("two_phase", True), ("naive", False)])
@pytest.mark.timeout(600)
def test_layout_pruner_prunes_at_the_end_of_the_frozen_stage_and_never_a_single_stage(
        tmp_path, tmp_path_factory, monkeypatch, strategy, pruned):
    """`pruner: layout`: each trial records its stage layout and val image count; a two_phase
    trial far below three peers of its layout is pruned at epoch 1 (the end of its head
    stage); naive, one stage, has no annealed point before its end and is never pruned."""
    import harness.jobs
    from harness.sweep.pruning import LAYOUT_ATTR, N_ATTR
    from harness.sweep.run import run_sweep

    spaces = {"two_phase": {"freeze_epochs": 1, "lr_high": {"low": 1e-3, "high": 1e-2, "log": True}},
              "naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}
    study_d = {**BASE_STUDY, "name": "prune-layout", "recipe": base_recipe(), "trials": 4, "pruner": "layout",
               "strategies": {strategy: spaces[strategy]}}
    study = load_study(write_study(tmp_path / "study.yaml", study_d))
    calls: list = []
    monkeypatch.setattr(harness.jobs, "tracked_fine_tune", fake_fine_tune([0.9, 0.9, 0.9, 0.1], calls))
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", fresh_tracking_uri(tmp_path_factory, tmp_path)
    run_sweep(study, Stores.resolve(tmp_path / "ws", storage, uri), study.select(), echo=lambda line: None)
    trials = optuna.load_study(study_name=f"prune-layout/{strategy}", storage=storage).get_trials()
    S = optuna.trial.TrialState
    assert [t.state for t in trials] == [S.COMPLETE] * 3 + [S.PRUNED if pruned else S.COMPLETE]
    assert trials[3].intermediate_values == ({1: 0.1} if pruned else {1: 0.1, 2: 0.1, 3: 0.1})
    layout = [[1, 1], [2, 3]] if strategy == "two_phase" else [[3, 3]]
    assert all(t.user_attrs[LAYOUT_ATTR] == layout for t in trials)
    assert all(t.user_attrs[N_ATTR] == 16 for t in trials)     # 2 classes x 8 val images


# --- export -> train replays the best trial exactly --------------------------------------------

@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_export_then_train_replays_the_best_trial_exactly(swept, tmp_path):
    out_file = tmp_path / "best.yaml"
    res = invoke(["export", swept.path, "-o", out_file, *swept.opts(tracking=False)])
    bests = [(s, swept.ostudy(s).best_trial) for s in ("naive", "two_phase")]
    strategy, best = max(bests, key=lambda sb: sb[1].value)
    assert res.output.startswith(f"wrote {out_file}: ")
    assert f"{best.value:.4f}" in res.output
    text = out_file.read_text()
    assert text.startswith("# Best recipe of study 'tiny-sweep'")
    recipe = Recipe.from_yaml(out_file)
    exported_from = int(text.split(", trial ", 1)[1].split(":", 1)[0])
    exported = swept.ostudy(text.split("strategy ", 1)[1].split(",", 1)[0]).trials[exported_from]
    assert exported.value == best.value
    assert recipe == Recipe.from_dict(yaml.safe_load(exported.user_attrs["recipe"]))

    # --strategy picks that strategy's best
    other = tmp_path / "naive.yaml"
    invoke(["export", swept.path, "--strategy", "naive", "-o", other, *swept.opts(tracking=False)])
    assert Recipe.from_yaml(other) == Recipe.from_dict(
        yaml.safe_load(swept.ostudy("naive").best_trial.user_attrs["recipe"]))

    res = invoke(["train", out_file, "--workspace", swept.workspace, "--tracking-uri", swept.tracking,
                  "--experiment", "replay"])
    client = client_for(swept.tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("replay").experiment_id])
    val = history(client, run.info.run_id, "val/accuracy")
    assert [m.step for m in val] == [1, 2, 3]
    assert val[-1].value == best.value                       # exactly, not approximately
    assert [m.value for m in val] == [exported.intermediate_values[e] for e in (1, 2, 3)]
    assert f"{best.value:.4f}" in res.output


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_export_of_an_unknown_strategy_or_an_empty_study_is_one_line(swept, tmp_path):
    res = CliRunner().invoke(main, ["export", str(swept.path), "--strategy", "gradual",
                                    *swept.opts(tracking=False)])
    assert res.exit_code == 2 and res.output.startswith("error: --strategy: 'gradual'"), res.output
    res = CliRunner().invoke(main, ["export", str(swept.path), "--workspace", str(tmp_path),
                                    "--storage", f"sqlite:///{tmp_path / 'empty.db'}"])
    assert res.exit_code == 2 and "no completed trial" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.timeout(600)
def test_a_crashed_first_trial_is_run_again_with_the_defaults_on_resume(tmp_path, tmp_path_factory,
                                                                         monkeypatch):
    """A crash (not a divergence) in the enqueued default trial stops the sweep; the next
    `harness sweep` runs the published default again instead of losing the baseline."""
    import harness.jobs
    from harness.sweep.run import run_sweep

    study_d = {**BASE_STUDY, "name": "crash", "recipe": base_recipe(), "trials": 2, "pruner": "none",
               "strategies": {"naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}}
    study = load_study(write_study(tmp_path / "study.yaml", study_d))
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", fresh_tracking_uri(tmp_path_factory, tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(harness.jobs, "tracked_fine_tune", crash)
    with pytest.raises(RuntimeError):
        run_sweep(study, Stores.resolve(tmp_path / "ws", storage, uri), study.select(), echo=lambda s: None)
    calls: list = []
    monkeypatch.setattr(harness.jobs, "tracked_fine_tune", fake_fine_tune([0.8, 0.7], calls))
    run_sweep(study, Stores.resolve(tmp_path / "ws", storage, uri), study.select(), echo=lambda s: None)
    assert calls[0] == {"lr": 1e-3}                 # the baseline again, not a fresh sample
    trials = optuna.load_study(study_name="crash/naive", storage=storage).get_trials()
    S = optuna.trial.TrialState
    assert [t.state for t in trials] == [S.FAIL, S.COMPLETE, S.COMPLETE]
