"""Tests for harness.tracking: flatten, batched metric logging on a real SQLite MLflow
store, run end states, and which tracking URI is used."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import needs_fashion, tiny_recipe_dict, template_store
from harness.engine.recipe import Recipe
from harness.engine.recipe import flatten
from harness.jobs import tracked_fine_tune
from harness.workspace import tracking_uri as default_tracking_uri
from harness.tracking import MlflowTracker, Tracking




@pytest.fixture
def uri(tmp_path, tmp_path_factory) -> str:
    """A fresh SQLite tracking store in this test's tmp_path."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)
    return f"sqlite:///{db}"


def client_for(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run, got {len(runs)}"
    return runs[0]


# --- flatten ----------------------------------------------------------------------------

def test_flatten_nested_dicts_lists_of_dicts_and_scalar_lists():
    d = {"seed": 3,
         "data": {"batch_size": 8, "classes": ["Sandal", "Bag"], "root": None},
         "stages": [{"epochs": 1, "lr": {"max": 0.002}},
                    {"epochs": 2, "lr": {"min": 1e-05, "max": 0.001}, "moms": [0.95, 0.85, 0.95]}]}
    assert flatten(d) == {
        "seed": "3",
        "data.batch_size": "8",
        "data.classes": "['Sandal', 'Bag']",
        "data.root": "None",
        "stages.0.epochs": "1",
        "stages.0.lr.max": "0.002",
        "stages.1.epochs": "2",
        "stages.1.lr.min": "1e-05",
        "stages.1.lr.max": "0.001",
        "stages.1.moms": "[0.95, 0.85, 0.95]",
    }


def test_flatten_of_a_recipe_names_every_field():
    params = flatten(Recipe.from_dict(tiny_recipe_dict()).to_dict())
    assert params["stages.1.lr.min"] == "1e-05"
    assert params["stages.1.lr.max"] == "0.001"
    assert params["stages.0.lr.max"] == "0.002"
    assert "stages.0.lr.min" not in params          # slice(max): no min
    assert params["data.batch_size"] == "8"
    assert params["model.arch"] == "resnet18"
    assert params["optimizer.eps"] == "1e-05"
    assert params["stages.1.pct_start"] == "0.3"
    assert all(isinstance(v, str) for v in params.values())


# --- MlflowTracker on a real store --------------------------------------------------------

def test_log_steps_splits_into_batches_of_at_most_1000(uri):
    client = client_for(uri)
    exp_id = client.create_experiment("t")
    run_id = client.create_run(exp_id).info.run_id
    sizes = []
    real_log_batch = client.log_batch

    def spy(run_id_, metrics=(), params=(), tags=(), **kw):
        sizes.append(len(metrics))
        return real_log_batch(run_id_, metrics=metrics, params=params, tags=tags, **kw)

    client.log_batch = spy
    tracker = MlflowTracker(client, run_id)
    a = [float(i) / 7 for i in range(1500)]
    b = [float(-i) for i in range(700)]
    try:
        tracker.log_steps(5, {"a": a, "b": b})
        tracker.log_epoch(2, {"val/accuracy": 0.5})
        tracker.flush()
    finally:
        tracker.close()
    assert sizes and max(sizes) <= 1000
    assert sum(sizes) == 1500 + 700 + 1
    assert len(sizes) >= 3            # 2,201 points need at least three requests

    hist_a = sorted(client.get_metric_history(run_id, "a"), key=lambda m: m.step)
    hist_b = sorted(client.get_metric_history(run_id, "b"), key=lambda m: m.step)
    assert [m.step for m in hist_a] == list(range(5, 1505))
    assert [m.value for m in hist_a] == pytest.approx(a, rel=1e-12)
    assert [m.step for m in hist_b] == list(range(5, 705))
    assert [m.value for m in hist_b] == pytest.approx(b, rel=1e-12)
    acc = client.get_metric_history(run_id, "val/accuracy")
    assert [(m.step, m.value) for m in acc] == [(2, 0.5)]


def test_log_steps_keeps_what_it_was_given_and_every_batch_after_a_failed_one(uri):
    """Metric records are made on the logging thread: a list the caller changes afterwards is
    logged as it was; a batch the store refuses is raised at flush, and the others are stored."""
    client = client_for(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    real_log_batch, calls = client.log_batch, []

    def first_fails(run_id_, metrics=(), **kw):
        calls.append(len(metrics))
        if len(calls) == 1:
            raise OSError("store refused")
        return real_log_batch(run_id_, metrics=metrics, **kw)

    client.log_batch = first_fails
    tracker = MlflowTracker(client, run_id)
    loss = [float(i) for i in range(1200)]
    try:
        tracker.log_steps(0, {"loss": loss})
        loss[-1] = -1.0                  # reused by the caller before the thread got to it
        with pytest.raises(OSError, match="store refused"):
            tracker.flush()
    finally:
        tracker.close()
    assert calls == [1000, 200]
    hist = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(s, float(s)) for s in range(1000, 1200)]


# --- mlflow_run end states ------------------------------------------------------------------

def test_mlflow_run_ends_finished(tmp_path, uri):
    with Tracking(uri, tmp_path).run("exp", "ok-run", tags={"harness.kind": "test"}) as tracker:
        tracker.log_epoch(1, {"val/accuracy": 0.75})
    run = only_run(client_for(uri), "exp")
    assert run.info.run_id == tracker.run_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "ok-run"
    assert run.data.tags["harness.kind"] == "test"
    assert "harness.reason" not in run.data.tags
    assert run.data.metrics["val/accuracy"] == 0.75        # flushed before the run ended


def test_mlflow_run_ends_failed_with_reason_on_an_exception(tmp_path, uri):
    with pytest.raises(ValueError, match="boom"):
        with Tracking(uri, tmp_path).run("exp", "bad-run"):
            raise ValueError("boom")
    run = only_run(client_for(uri), "exp")
    assert run.info.status == "FAILED"
    assert "boom" in run.data.tags["harness.reason"]
    assert "ValueError" in run.data.tags["harness.reason"]


def test_mlflow_run_ends_killed_on_keyboard_interrupt(tmp_path, uri):
    with pytest.raises(KeyboardInterrupt):
        with Tracking(uri, tmp_path).run("exp", "ctrl-c"):
            raise KeyboardInterrupt
    run = only_run(client_for(uri), "exp")
    assert run.info.status == "KILLED"


def test_mlflow_run_parent_id_is_recorded(tmp_path, uri):
    with Tracking(uri, tmp_path).run("exp", "parent") as parent:
        with Tracking(uri, tmp_path).run("exp", "child", parent_id=parent.run_id) as child:
            pass
    client = client_for(uri)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert client.get_run(parent.run_id).info.status == "FINISHED"


@needs_fashion
def test_diverged_tracked_fine_tune_ends_the_run_failed(uri, workspace):
    recipe = Recipe.from_dict(tiny_recipe_dict(stages=[{"epochs": 2, "train": "all", "lr": 1e6}]))
    with Tracking(uri, workspace).run("exp", "diverge") as tracker:
        result = tracked_fine_tune(recipe, tracker, workspace)      # no exception
    assert result.status.startswith("diverged at step ")
    run = only_run(client_for(uri), "exp")
    assert run.info.status == "FAILED"
    assert run.data.tags["harness.reason"] == result.status
    assert run.data.tags["harness.status"] == result.status
    assert "test/accuracy" not in run.data.metrics


# --- default_tracking_uri -----------------------------------------------------------------

def test_default_tracking_uri_precedence(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env/mlflow.db")
    assert default_tracking_uri(ws, "http://explicit:5000") == "http://explicit:5000"
    assert default_tracking_uri(ws) == "sqlite:////env/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert default_tracking_uri(ws) == f"sqlite:///{ws.resolve() / 'mlflow.db'}"
    assert default_tracking_uri(ws, "sqlite:///x.db") == "sqlite:///x.db"


def test_default_tracking_uri_resolves_a_relative_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri("rel-ws")
    assert uri == f"sqlite:///{(tmp_path / 'rel-ws').resolve() / 'mlflow.db'}"
    assert Path(uri.removeprefix("sqlite:///")).is_absolute()


# --- probe_tracking -------------------------------------------------------------------------

@pytest.mark.parametrize("collisions, ok", [(0, True), (2, True), (3, False)])
def test_probe_tracking_retries_a_colliding_first_write(tmp_path, uri, monkeypatch, collisions, ok):
    """Workers starting together tag the new experiment at once and all but one collide on the
    store's insert: the probe tries again; a store that keeps refusing is one clear error."""
    import harness.tracking as tr
    from harness.errors import HarnessError

    real = client_for(uri)
    refused = []

    class Colliding:
        def __getattr__(self, name):
            return getattr(real, name)

        def set_experiment_tag(self, *args):
            if len(refused) < collisions:
                refused.append(args)
                raise RuntimeError('duplicate key value violates unique constraint "experiment_tag_pk"')
            return real.set_experiment_tag(*args)

    monkeypatch.setattr(tr, "make_client", lambda _uri: Colliding())
    if ok:
        tr.Tracking(uri, tmp_path).probe("probe")
        assert real.get_experiment_by_name("probe").tags["harness.study"] == "probe"
    else:
        with pytest.raises(HarnessError, match=r"cannot write \(RuntimeError: duplicate key"):
            tr.Tracking(uri, tmp_path).probe("probe")
    assert len(refused) == collisions


# --- the experiment kind ----------------------------------------------------------------------

def test_every_harness_experiment_is_of_the_model_training_kind(tmp_path, uri):
    """MLflow 3 reads `mlflow.experimentKind`: a new experiment carries it from its creation;
    one made before (or by someone else) without it gets it when the harness next opens it;
    one that chose another kind keeps it."""
    from harness.tracking import EXPERIMENT_TAGS
    client = client_for(uri)
    assert EXPERIMENT_TAGS == {"mlflow.experimentKind": "custom_model_development"}

    with Tracking(uri, tmp_path).run("fresh", "r"):
        pass
    assert client.get_experiment_by_name("fresh").tags["mlflow.experimentKind"] == "custom_model_development"

    old = client.create_experiment("older")
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert Tracking(uri, tmp_path).experiment_id("older") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"

    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "finetuning"})
    Tracking(uri, tmp_path).probe("chosen")
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "finetuning"


def test_find_experiment_and_harness_experiments_create_nothing(tmp_path, uri):
    client = client_for(uri)
    tracking = Tracking(uri, tmp_path)
    assert tracking.find_experiment("nope") is None
    assert tracking.harness_experiments() == []
    assert client.get_experiment_by_name("nope") is None           # a look-up creates nothing

    study = tracking.experiment_id("study-a")
    train = client.create_experiment("harness-train")              # made before the kind tag
    client.create_experiment("someone-elses")                      # not the harness's
    gone = tracking.experiment_id("deleted")
    client.delete_experiment(gone)
    assert tracking.find_experiment("study-a") == study
    assert tracking.find_experiment("deleted") is None
    assert tracking.harness_experiments() == [(study, "study-a"), (train, "harness-train")]
