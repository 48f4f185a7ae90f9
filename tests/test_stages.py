"""Stage checkpoints and the LR finder on any stage: fastai's save('stage-1') / load /
unfreeze / lr_find workflow, made exact.

- `harness train --save-stages` keeps every stage, and continuing from one reproduces the
  uninterrupted run bit for bit (weights, per-epoch numbers, LR history);
- `harness lr-find --stage K` starts from the model after stage K-1 (the saved checkpoint,
  or those stages trained exactly as `train` trains them); `--stage all` draws every stage;
- bad input (--stage 0, beyond the recipe, a checkpoint of another recipe) is one line,
  exit 2, nothing written.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import needs_fashion, template_store, tiny_recipe_dict
from harness.engine import lr_find as lf
from harness.sweep import centre
from harness.engine import stages as st
from harness.cli import main
from harness.errors import HarnessError
from harness.engine.recipe import Recipe
from harness.engine.stages import StagePlan
from harness.engine.train import fine_tune

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.one_thread


def write(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def share_cache(src_ws: Path, dst_ws: Path) -> None:
    """Copy the decoded data of one workspace into another, where there is any: a process that
    decoded the data already keeps it in memory and writes no cache file (the order of tests on
    an xdist worker decides which)."""
    if (src_ws / "cache").is_dir():
        shutil.copytree(src_ws / "cache", dst_ws / "cache", dirs_exist_ok=True)


def epochs_of(result) -> list[tuple]:
    """Per-epoch numbers without the wall time."""
    return [(e.epoch, e.stage, e.train_loss, e.val_loss, e.val_accuracy) for e in result.epochs]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- keys (no training) ---------------------------------------------------------------------

def test_the_key_is_the_recipe_prefix_and_seed_without_device():
    base = Recipe.from_dict(tiny_recipe_dict())
    later_changed = Recipe.from_dict(tiny_recipe_dict(stages=[
        tiny_recipe_dict()["stages"][0], {"epochs": 5, "train": "all", "lr": 3e-4}]))
    assert st.prefix_key(base, 1) == st.prefix_key(later_changed, 1)        # stage 2 is not in the prefix
    assert st.prefix_key(base, 1) == st.prefix_key(base.replace(device="cuda"), 1)
    assert st.prefix_key(base, 1) != st.prefix_key(base.replace(seed=1), 1)
    assert st.prefix_key(base, 1) != st.prefix_key(base, 2)
    assert st.prefix_key(base, 2) != st.prefix_key(later_changed, 2)
    path = st.stage_path("ws", base, 1)
    assert path == Path("ws/checkpoints/stages") / f"{st.prefix_key(base, 1)}-stage1.pt"


def test_a_bad_stage_number_is_refused_before_anything_runs(tiny_recipe):
    for bad in (0, 3, -1, True, "2"):
        with pytest.raises(HarnessError, match=r"stage: .* stage"):
            lf.lr_find(tiny_recipe, "/nonexistent-workspace", stage=bad)


# --- train --save-stages, then continue: bit for bit ----------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, workspace):
    """`harness train --save-stages` on the tiny 2-stage recipe (a fresh MLflow store), and the
    same recipe run straight through the Python API."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stages")
    ws = root / "ws"
    share_cache(workspace, ws)
    db = root / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)
    recipe_path = write(root / "tiny.yaml", tiny_recipe_dict())
    res = CliRunner().invoke(main, ["train", str(recipe_path), "--save-stages", "--workspace", str(ws),
                                    "--tracking-uri", f"sqlite:///{db}"])
    assert res.exit_code == 0, res.output
    recipe = Recipe.from_yaml(recipe_path)
    straight = fine_tune(recipe, workspace=ws)
    return {"root": root, "ws": ws, "db": db, "recipe_path": recipe_path, "recipe": recipe,
            "straight": straight, "output": res.output}


@needs_fashion
def test_save_stages_keeps_every_stage_in_the_workspace_and_in_mlflow(saved):
    from mlflow.tracking import MlflowClient

    recipe, ws = saved["recipe"], saved["ws"]
    paths = [st.stage_path(ws, recipe, k) for k in (1, 2)]
    assert all(p.is_file() for p in paths)
    assert all(str(p) in saved["output"] for p in paths)
    client = MlflowClient(f"sqlite:///{saved['db']}")
    exp = client.get_experiment_by_name("harness-train")
    (run,) = client.search_runs([exp.experiment_id])
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "stages"))
    assert logged == sorted(f"stages/{p.name}" for p in paths)   # listed by name, and names are hashes
    assert run.data.tags["stage_checkpoint.1"] == str(paths[0])
    ckpt = st.read_stage(paths[1], recipe)
    assert ckpt.stages_done == 2 and ckpt.step == 18 and ckpt.epoch == 3


@needs_fashion
def test_continuing_from_the_stage_1_checkpoint_reproduces_the_run_bit_for_bit(saved):
    recipe, straight = saved["recipe"], saved["straight"]
    ckpt = st.read_stage(st.stage_path(saved["ws"], recipe, 1), recipe)
    assert ckpt.stages_done == 1 and ckpt.step == 6 and ckpt.epoch == 1
    assert set(ckpt.model) == set(straight.model.state_dict())    # body, head and buffers
    continued = fine_tune(recipe, workspace=saved["ws"], plan=StagePlan(start=ckpt))
    assert continued.ok and same_weights(straight.model, continued.model)
    assert epochs_of(continued) == epochs_of(straight)
    assert [e.val_loss for e in continued.epochs] == [e.val_loss for e in straight.epochs]
    assert continued.lrs == straight.lrs and continued.moms == straight.moms
    assert continued.stage_starts == straight.stage_starts == [0, 6]
    assert continued.test_accuracy == straight.test_accuracy
    # the saved final stage is the straight run's final model too
    final = st.read_stage(st.stage_path(saved["ws"], recipe, 2), recipe)
    assert all(torch.equal(final.model[k], v) for k, v in straight.model.state_dict().items())


@needs_fashion
def test_dropout_rng_is_part_of_what_continues(saved, monkeypatch):
    """Without the global RNG (the head's dropout) the continued run drifts: the checkpoint
    must carry it, and restoring it is what makes the run above exact."""
    recipe = saved["recipe"]
    ckpt = st.read_stage(st.stage_path(saved["ws"], recipe, 1), recipe)
    monkeypatch.setattr(st.torch, "set_rng_state", lambda state: None)
    drifted = fine_tune(recipe, workspace=saved["ws"], plan=StagePlan(start=ckpt, test=False))
    assert not same_weights(saved["straight"].model, drifted.model)


# --- lr-find on stage K ---------------------------------------------------------------------

class ModelAtStart:
    """Wraps make_optimizer: keeps the model's state and trainable flags when the test starts."""

    def __init__(self):
        self.state, self.trainable = None, None

    def __call__(self, model, *args, **kwargs):
        from harness.engine.train import make_optimizer
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.trainable = [all(p.requires_grad for _, p, _ in g) for g in model.group_members()]
        return make_optimizer(model, *args, **kwargs)


@needs_fashion
def test_stage_2_starts_from_the_model_after_stage_1_trained_as_train_does(saved, tmp_path, monkeypatch):
    """No checkpoint in this workspace: stage 1 is trained first, bit for bit as `harness
    train` trained it, and the range test runs with every group trainable."""
    recipe = saved["recipe"]
    spy = ModelAtStart()
    monkeypatch.setattr(lf, "make_optimizer", spy)
    ws = tmp_path / "ws"
    share_cache(saved["ws"], ws)
    result = lf.lr_find(recipe, ws, lf.RangeTest(num_it=20, stop_div=False), stage=2)
    ckpt = st.read_stage(st.stage_path(saved["ws"], recipe, 1), recipe)
    assert spy.state.keys() == ckpt.model.keys()
    assert all(torch.equal(spy.state[k], ckpt.model[k]) for k in ckpt.model)
    assert spy.trainable == [True, True, True]                  # stage 2 trains all
    assert result.stage == 2 and result.train == "all" and result.start == "trained"
    assert len(result.lrs) == 20 and set(result.suggestions) == {"valley", "steep", "minimum"}
    assert not (ws / "checkpoints").exists()                      # lr-find saves nothing


@needs_fashion
def test_stage_2_loads_a_saved_checkpoint_instead_of_training(saved, monkeypatch):
    recipe, ws = saved["recipe"], saved["ws"]
    trained = lf.lr_find(recipe, ws, lf.RangeTest(num_it=12, stop_div=False), stage=2)
    assert trained.start == str(st.stage_path(ws, recipe, 1))
    monkeypatch.setattr(lf, "fine_tune", lambda *a, **k: pytest.fail("trained although a checkpoint exists"))
    again = lf.lr_find(recipe, ws, lf.RangeTest(num_it=12, stop_div=False), stage=2)
    assert again.raw_losses == trained.raw_losses and again.lrs == trained.lrs


@needs_fashion
@pytest.mark.slow
def test_stage_all_draws_every_stage_and_logs_one_run(saved, tmp_path, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_store(tmp_path_factory), db)      # a migrated store: no minute of migrations
    out = tmp_path / "stages.png"
    res = CliRunner().invoke(main, ["lr-find", str(saved["recipe_path"]), "--stage", "all", "-o", str(out),
                                    "--workspace", str(saved["ws"]), "--tracking-uri", f"sqlite:///{db}"])
    assert res.exit_code == 0, res.output
    assert "stage 1 (trains head):" in res.output
    assert f"stage 2 (trains all, from {st.stage_path(saved['ws'], saved['recipe'], 1)}):" in res.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("harness-lr-find").experiment_id])
    assert "lr_find_stages.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    for k in (1, 2):
        assert f"stage{k}.suggestion.valley" in run.data.params
        assert client.get_metric_history(run.info.run_id, f"lr_find/stage{k}/loss")


def test_the_stages_figure_has_a_panel_per_stage_with_its_suggestions():
    def result(stage, train, shift):
        lrs = [10 ** (-7 + k / 10) for k in range(60)]
        losses = [2.0 - 0.02 * k + max(0, k - 40 + shift) ** 2 * 0.01 for k in range(60)]
        values, points = lf.suggest(lrs, losses, 60)
        return lf.LRFindResult(lrs, losses, losses, values, False, points, 60, stage=stage, train=train)

    from harness.report import lr_find_stages_figure
    fig = lr_find_stages_figure([result(1, "head", 0), result(2, "all", 10)])
    axes = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert [ax.get_title().split(":")[0] for ax in axes] == ["stage 1", "stage 2"]
    for ax in axes:
        assert ax.get_xscale() == "log"
        assert [t.get_text().split(":")[0] for t in ax.get_legend().get_texts()] == ["valley", "steep", "minimum"]
    assert "valley" in fig._suptitle.get_text()


# --- the model families: the whole model's state, torchvision and timm --------------------

@needs_fashion
def test_a_timm_model_continues_bit_for_bit_too(workspace):
    recipe = Recipe.from_dict(tiny_recipe_dict(
        model={"arch": "timm/test_resnet", "groups": 3}, data={"image_size": 32, "train_per_class": 16},
        stages=[{"epochs": 1, "train": "head", "lr": {"max": 2e-3}}, {"epochs": 1, "train": "all", "lr": 1e-3}]))
    kept = []
    straight = fine_tune(recipe, workspace=workspace, plan=StagePlan(on_stage=kept.append, test=False))
    continued = fine_tune(recipe, workspace=workspace, plan=StagePlan(start=kept[0], test=False))
    assert type(straight.model).__name__ == "TimmTransferModel"
    assert same_weights(straight.model, continued.model) and epochs_of(straight) == epochs_of(continued)


# --- bad input: one line, exit 2, nothing written -------------------------------------------

def listing(root: Path) -> dict[str, tuple | None]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            out[p.relative_to(root).as_posix()] = None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
    return out


def refused(args: list[str], root: Path, names: str) -> str:
    before = listing(root)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], res.stderr
    new = [p for p in set(listing(root)) - set(before) if not p.startswith("ws/cache") and p != "ws"]
    assert not new, f"refused input still wrote {new}"
    assert all(listing(root).get(p) == v for p, v in before.items() if v is not None)
    return lines[0]


@pytest.mark.parametrize("stage", ["0", "3", "-1", "two"])
def test_a_bad_stage_is_one_line_naming_the_option(tmp_path, stage):
    recipe = write(tmp_path / "r.yaml", tiny_recipe_dict())
    line = refused(["lr-find", str(recipe), "--stage", stage, "--workspace", str(tmp_path / "ws"),
                    "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], tmp_path, "--stage")
    assert stage in line


@needs_fashion
@pytest.mark.parametrize("what", ["other-recipe", "truncated"])
def test_a_stage_checkpoint_of_another_recipe_is_refused_naming_the_file(saved, tmp_path, what):
    """The file at this recipe's stage-1 path was made by another recipe (here: copied from a
    recipe with another seed), or is cut short: refused, naming the file."""
    other = Recipe.from_dict(tiny_recipe_dict(seed=7))
    path = st.stage_path(tmp_path / "ws", other, 1)
    path.parent.mkdir(parents=True)
    blob = st.stage_path(saved["ws"], saved["recipe"], 1).read_bytes()
    path.write_bytes(blob if what == "other-recipe" else blob[:len(blob) // 3])
    share_cache(saved["ws"], tmp_path / "ws")
    recipe = write(tmp_path / "r.yaml", tiny_recipe_dict(seed=7))
    line = refused(["lr-find", str(recipe), "--stage", "2", "--workspace", str(tmp_path / "ws"),
                    "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], tmp_path, str(path))
    assert ("another recipe (differs in seed)" if what == "other-recipe" else "not a readable") in line


# --- sweep --lr-find: each hyperparameter from the stage it governs, for real ---------------

@needs_fashion
@pytest.mark.slow
def test_sweep_centres_two_phase_lr_high_from_its_unfrozen_stage(saved, tmp_path, monkeypatch):
    from harness.sweep.study import load_study

    base = tiny_recipe_dict()
    del base["stages"]
    study = load_study(write(tmp_path / "study.yaml", {
        "name": "centre2", "recipe": base, "budget": {"epochs": 2}, "trials": 1, "pruner": "none",
        "strategies": {"two_phase": {"lr_low": {"low": 1e-9, "high": 1.0, "log": True},
                                     "lr_high": {"low": 1e-9, "high": 10.0, "log": True}}}}))
    lines, runs, real = [], [], lf.lr_find

    def lr_find(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(centre, "lr_find", lr_find)
    got = centre.centred_first_trials(study, saved["ws"], echo=lines.append)["two_phase"]
    (run,) = runs
    # stage 2, from the head stage the default first trial trains (the saved tiny stage 1)
    assert run.stage == 2 and run.train == "all" and run.start == str(st.stage_path(saved["ws"], saved["recipe"], 1))
    assert got["lr_high"] == pytest.approx(run.suggestions["valley"])
    assert got["lr_low"] == pytest.approx(got["lr_high"] / 100)
    assert any("stage 2 (all) sets lr_high, lr_low" in line for line in lines), lines


@needs_fashion
def test_a_checkpoint_from_another_device_type_loads_with_reseeded_generators(saved):
    """device is not in the key (as pretrain's config_hash): a GPU checkpoint continues on the
    CPU, its weights exact, its generators re-seeded from seed and stage (a CUDA generator's
    state does not fit a CPU one)."""
    from harness.engine.train import prepare

    recipe = saved["recipe"]
    ckpt = st.read_stage(st.stage_path(saved["ws"], recipe, 1), recipe)
    ckpt.device, ckpt.generator, ckpt.rng = "cuda", torch.zeros(16, dtype=torch.uint8), {}
    runs = [prepare(recipe, saved["ws"]) for _ in range(2)]
    for run in runs:
        st.restore(ckpt, run)
        assert all(torch.equal(v, ckpt.model[k]) for k, v in run.model.state_dict().items())
    assert torch.equal(runs[0].generator.get_state(), runs[1].generator.get_state())
    assert torch.equal(runs[0].generator.get_state(), torch.Generator().manual_seed(1).get_state())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stage_checkpoints_continue_on_cuda(workspace):
    recipe = Recipe.from_dict(tiny_recipe_dict(device="cuda"))
    kept = []
    straight = fine_tune(recipe, workspace=workspace, plan=StagePlan(on_stage=kept.append, test=False))
    assert kept[0].device == "cuda" and "cuda" in kept[0].rng
    continued = fine_tune(recipe, workspace=workspace, plan=StagePlan(start=kept[0], test=False))
    assert continued.ok and continued.lrs == straight.lrs and len(continued.epochs) == 3
    # the same batches as the straight run: its train losses agree to bf16 precision
    assert [e.train_loss for e in continued.epochs] == pytest.approx([e.train_loss for e in straight.epochs], rel=0.05)
