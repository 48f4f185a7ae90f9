"""Tests for the command line: a full `harness train` through the console script and what
it records in MLflow, and bad input refused with one line and exit code 2."""
from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import needs_fashion, tiny_recipe_dict, template_store
from harness.cli import main
from harness.engine.recipe import Recipe

HARNESS = Path(sys.executable).parent / "harness"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




def run_count(db: Path) -> int:
    """Runs in an MLflow SQLite store; 0 when the file does not exist."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "runs" not in tables:
            return 0
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def write_recipe(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def my_flatten(d, prefix=""):
    """Dotted keys of a nested recipe dict (lists of dicts indexed, scalar lists whole)."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(my_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and isinstance(d[0], dict):
        for i, v in enumerate(d):
            out.update(my_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


# --- a full train through the console script ----------------------------------------------

@pytest.mark.slow      # ~20 s on a quiet 2-core machine: a fresh interpreter, training, MLflow
@needs_fashion
def test_train_console_script_logs_a_complete_mlflow_run(tmp_path, workspace, tmp_path_factory):
    assert HARNESS.is_file(), f"console script not installed at {HARNESS}"
    recipe_path = write_recipe(tmp_path / "tiny.yaml", tiny_recipe_dict())
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)
    uri = f"sqlite:///{db}"
    proc = subprocess.run([str(HARNESS), "train", str(recipe_path), "--workspace", str(workspace),
                           "--tracking-uri", uri], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout
    assert "Traceback" not in proc.stderr

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("harness-train")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run_id in proc.stdout

    # params: the flattened recipe, defaults resolved
    recipe = Recipe.from_yaml(recipe_path)
    params = run.data.params
    assert params["stages.1.lr.min"] == "1e-05"
    assert params["stages.1.lr.max"] == "0.001"
    assert params["stages.0.lr.max"] == "0.002"
    assert params["data.batch_size"] == "8"
    assert params["model.arch"] == "resnet18"
    assert params["stages.0.train"] == "head"
    assert params["optimizer.weight_decay"] == "0.01"
    expected_keys = set(my_flatten(recipe.to_dict()))
    assert expected_keys <= set(params)
    assert run.data.tags["layer_groups"] == "early,late,head"
    # the input statistics the weights expect (torchvision, no checkpoint: ImageNet's)
    assert params["input.mean"] == "[0.485, 0.456, 0.406]" and params["input.std"] == "[0.229, 0.224, 0.225]"

    # per-step curves: one global step axis across both stages
    steps_per_epoch = (2 * 24) // 8
    n_steps = steps_per_epoch * sum(s["epochs"] for s in tiny_recipe_dict()["stages"])
    assert n_steps == 18

    def history(key):
        return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)

    for key in ["lr/early", "lr/late", "lr/head", "momentum/early", "momentum/late",
                "momentum/head", "train/loss"]:
        assert [m.step for m in history(key)] == list(range(n_steps)), key
    head, early = history("lr/head"), history("lr/early")
    assert head[0].value == pytest.approx(2e-3 / 25, rel=1e-6)          # stage 1 start: head max / 25
    assert early[0].value == pytest.approx(2e-4 / 25, rel=1e-6)         # body max/10 / 25
    assert early[steps_per_epoch].value == pytest.approx(1e-5 / 5, rel=1e-6)  # stage 2 start
    assert head[steps_per_epoch].value == pytest.approx(1e-3 / 5, rel=1e-6)
    assert history("momentum/late")[0].value == pytest.approx(0.95, rel=1e-9)
    for key in ["val/loss", "val/accuracy"]:
        assert [m.step for m in history(key)] == [1, 2, 3], key
    assert all(0.0 <= m.value <= 1.0 for m in history("val/accuracy"))
    test_acc = history("test/accuracy")
    assert len(test_acc) == 1 and 0.0 <= test_acc[0].value <= 1.0
    assert f"{test_acc[0].value:.4f}" in proc.stdout

    # artifacts: the recipe (loads back equal) and the LR plot (a real PNG)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"recipe.yaml", "lr_schedule.png"} <= names
    dst = tmp_path / "artifacts"
    dst.mkdir()
    logged_recipe = Path(client.download_artifacts(run_id, "recipe.yaml", str(dst)))
    assert Recipe.from_yaml(logged_recipe) == recipe
    png = Path(client.download_artifacts(run_id, "lr_schedule.png", str(dst))).read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000


def test_python_dash_m_harness_reports_a_missing_recipe_in_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    db = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "harness", "train", str(missing),
                           "--workspace", str(tmp_path / "ws"), "--tracking-uri", f"sqlite:///{db}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert run_count(db) == 0


def test_console_script_help_lists_the_commands():
    proc = subprocess.run([str(HARNESS), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "train" in proc.stdout and "pretrain" in proc.stdout


# --- bad input: exit 2, one line naming the field or file, and no MLflow run --------------

def _bad(**overrides):
    return lambda tmp_path: write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(**overrides))


def _invalid_yaml(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text("seed: 0\nstages: [{epochs: 1\n  lr: : 3\n")
    return p


def _unknown_key(tmp_path):
    d = tiny_recipe_dict()
    d["data"]["batch_sise"] = 8
    return write_recipe(tmp_path / "recipe.yaml", d)


def _lr_min_above_max(tmp_path):
    d = tiny_recipe_dict()
    d["stages"][1]["lr"] = {"min": 1e-3, "max": 1e-5}
    return write_recipe(tmp_path / "recipe.yaml", d)


def _imagefolder_without_root(tmp_path):
    d = tiny_recipe_dict(data={"dataset": "imagefolder", "classes": None})
    return write_recipe(tmp_path / "recipe.yaml", d)


def _imagefolder_missing_root(tmp_path):
    d = tiny_recipe_dict(data={"dataset": "imagefolder", "classes": None,
                               "root": str(tmp_path / "no-such-folder")})
    return write_recipe(tmp_path / "recipe.yaml", d)


def _missing_checkpoint(tmp_path):
    d = tiny_recipe_dict(model={"weights": str(tmp_path / "missing.pt")})
    return write_recipe(tmp_path / "recipe.yaml", d)


BAD_INPUTS = [
    pytest.param(lambda tmp_path: tmp_path / "missing.yaml", r"missing\.yaml", id="missing-file"),
    pytest.param(_invalid_yaml, r"recipe\.yaml: invalid YAML", id="invalid-yaml"),
    pytest.param(_unknown_key, r"data\.batch_sise", id="unknown-key"),
    pytest.param(_lr_min_above_max, r"stages(\[1\]|\.1)\.lr", id="lr-min-above-max"),
    pytest.param(_bad(model={"arch": "resnet19"}), r"model\.arch.*resnet19", id="unknown-arch"),
    pytest.param(_imagefolder_without_root, r"\bdata(\.root)?: .*\broot\b", id="imagefolder-without-root"),
    pytest.param(_imagefolder_missing_root, r"data\.root.*no-such-folder", id="imagefolder-missing-root"),
    pytest.param(_missing_checkpoint, r"model\.weights.*missing\.pt", id="missing-checkpoint"),
]


@pytest.mark.parametrize("make_recipe, names", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_no_run(tmp_path, tmp_path_factory, make_recipe, names):
    import re
    recipe_path = make_recipe(tmp_path)
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)     # an existing, empty store
    result = CliRunner().invoke(main, ["train", str(recipe_path), "--workspace", str(tmp_path / "ws"),
                                       "--tracking-uri", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert re.search(names, lines[0]), lines[0]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)          # a clean exit, not a crash
    assert run_count(db) == 0, "an MLflow run was created for input that was refused"


def test_unwritable_workspace_exits_2_naming_the_option(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe_path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict())
    db = tmp_path / "mlflow.db"
    result = CliRunner().invoke(main, ["train", str(recipe_path), "--workspace", str(blocker / "ws"),
                                       "--tracking-uri", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--workspace" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert run_count(db) == 0
