"""Bad input through the CLI, one table: every case exits 2 with ONE line `error: ...` on
stderr naming the field, file or option, no traceback, and nothing written to any store.

Each case changes one thing of a valid baseline (a tiny ImageFolder study, the shipped
studies/imagefolder-example.yaml shrunk by tests/shipped.py, that
`test_baseline_is_valid_and_sweeps` runs for real), so it fails on the bad input itself.
Most cases run in-process (click's CliRunner); the ones about stores run `python -m harness`
in a subprocess, because only a real process shows what MLflow, Optuna and SQLAlchemy
print on the real stderr (their loggers keep the stream they were created with).
"""
from __future__ import annotations

import copy
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from conftest import template_store
from harness.cli import main
from shipped import read_yaml, resolve_study, shrink

# --- the valid baseline ---------------------------------------------------------------------

CLASSES = ("cat", "dog")
PER_CLASS = 12   # test 3 + val 2 + train 7 per class: 14 train images, 3 steps of 4 per epoch


def make_images(root: Path, classes=CLASSES, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """An ImageFolder of 8x8 RGB PNGs, one folder per class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            pixels[..., c % 3] //= 4     # a little signal per class
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


def base_recipe(root: Path) -> dict:
    return {"seed": 0, "device": "cpu",
            "data": {"dataset": "imagefolder", "root": str(root), "val_fraction": 0.25,
                     "image_size": 8, "batch_size": 4, "augment": False},
            "model": {"arch": "resnet18", "weights": "none", "head": "linear", "train_bn": True}}


def full_recipe(root: Path) -> dict:
    return {**base_recipe(root),
            "stages": [{"epochs": 1, "train": "head", "lr": {"max": 2e-3}},
                       {"epochs": 1, "train": "all", "lr": {"min": 1e-5, "max": 1e-3}}]}


def base_study(root: Path, dest_dir: Path) -> dict:
    """studies/imagefolder-example.yaml shrunk (into dest_dir) to the baseline, read back: the
    images at `root`, base_recipe's model and data (no train_per_class cap: every image
    but the held-out ones), 2 epochs, 1 random trial, no pruner, naive only, compare at its
    default 3 seeds."""
    shrunk = shrink(resolve_study("imagefolder-example"), dest_dir, name="bad-input",
                    recipe={**base_recipe(root), "data": {**base_recipe(root)["data"], "train_per_class": None}},
                    budget={"epochs": 2}, trials=1, sampler="random", pruner="none",
                    strategies={"naive": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}, compare={"seeds": 3})
    return read_yaml(shrunk.path)


def dump(path: Path, d) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """The baseline's ImageFolder, shared and only ever read."""
    return make_images(tmp_path_factory.mktemp("bad-input-data") / "imgs")


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, images) -> dict:
    """The baseline study as a dict, shrunk once (copy it before changing it)."""
    return base_study(images, tmp_path_factory.mktemp("bad-input-study"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints that must not load into the baseline's resnet18."""
    from harness.engine.models import CHECKPOINT_FORMAT, build_model, save_checkpoint
    folder = tmp_path_factory.mktemp("bad-input-checkpoints")
    other_arch = folder / "resnet34.pt"
    save_checkpoint(build_model("resnet34", 2, head="linear"), other_arch, {"arch": "resnet34"})
    truncated = folder / "truncated.pt"
    blob = other_arch.read_bytes()
    truncated.write_bytes(blob[:len(blob) // 2])
    garbage = folder / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 this is not a checkpoint " * 64)
    plain = folder / "plain-state-dict.pt"
    torch.save({"fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}, plain)
    misfit = folder / "misfit.pt"          # says resnet18, holds something else
    torch.save({"format": CHECKPOINT_FORMAT, "arch": "resnet18",
                "body": {"0.conv1.weight": torch.zeros(3, 3, 1, 1)}, "meta": {}}, misfit)
    return {"other-arch": other_arch, "truncated": truncated, "garbage": garbage,
            "plain": plain, "misfit": misfit}


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    return template_store(tmp_path_factory)


class _RefusesWrites(http.server.BaseHTTPRequestHandler):
    """An MLflow-ish server that answers every read with 200 {} and every write with 403."""

    def _reply(self, code: int) -> None:
        body = b"{}"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(200)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._reply(403)

    do_PATCH = do_DELETE = do_PUT = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def read_only_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusesWrites)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# --- what a case gets to build its input ------------------------------------------------------

class Ctx:
    """Paths of one case; the shared, costly inputs are made only when a case asks."""

    def __init__(self, tmp: Path, images: Path, request: pytest.FixtureRequest):
        self.tmp, self.images, self._request = tmp, images, request
        self.ws = tmp / "ws"

    @property
    def baseline(self) -> dict:
        return copy.deepcopy(self._request.getfixturevalue("baseline"))

    @property
    def checkpoints(self) -> dict[str, Path]:
        return self._request.getfixturevalue("checkpoints")

    @property
    def mlflow_template(self) -> Path:
        return self._request.getfixturevalue("mlflow_template")

    @property
    def server(self) -> str:
        return self._request.getfixturevalue("read_only_server")

    def study(self, *, recipe: dict | str | None = None, **changes) -> Path:
        """The baseline study with top-level `changes`; a `recipe` dict is merged into its
        recipe one level deep (recipe={"data": {"batch_size": 0}} changes one data field),
        a string replaces it (a recipe file's path)."""
        d = self.baseline
        d.update(changes)
        if isinstance(recipe, str):
            d["recipe"], recipe = recipe, None
        for key, value in (recipe or {}).items():
            r = d["recipe"]
            r[key] = {**r[key], **value} if isinstance(value, dict) and isinstance(r.get(key), dict) else value
        return dump(self.tmp / "study.yaml", d)

    def with_data(self, **data) -> Path:
        return self.study(recipe={"data": data})

    def with_weights(self, path: Path) -> Path:
        return self.study(recipe={"model": {"weights": str(path)}})

    def recipe(self, *, stage: dict | None = None, **changes) -> Path:
        """The baseline full recipe (for `harness train`); `stage` changes stages[0]."""
        d = full_recipe(self.images)
        for key, value in changes.items():
            d[key] = {**d[key], **value} if isinstance(value, dict) and isinstance(d.get(key), dict) else value
        if stage:
            d["stages"][0] = {**d["stages"][0], **stage}
        return dump(self.tmp / "recipe.yaml", d)


def sweep(study: Path, *options) -> list[str]:
    return ["sweep", str(study), *[str(o) for o in options]]


def train(recipe: Path, *options) -> list[str]:
    return ["train", str(recipe), *[str(o) for o in options]]


Build = Callable[[Ctx], tuple[list[str], str]]   # -> (CLI args without --workspace, text the error names)


# --- the cases' builders that need more than one line ------------------------------------------

def _text_file(name: str, text: str | bytes) -> Build:
    def build(c: Ctx):
        p = c.tmp / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        return sweep(p), name
    return build


def _study_is_a_folder(c: Ctx):
    p = c.tmp / "study.yaml"
    p.mkdir()
    return sweep(p), str(p)


def _recipe_file_malformed(c: Ctx):
    (c.tmp / "base.yaml").write_text("data:\n  dataset: imagefolder\n  root: [unclosed\n")
    return sweep(c.study(recipe="base.yaml")), "base.yaml: invalid YAML"


def _dataset_missing(c: Ctx):
    root = c.tmp / "no-such-folder"
    return sweep(c.with_data(root=str(root))), f"data.root: {root}"


def _dataset_empty(c: Ctx):
    root = c.tmp / "empty"
    root.mkdir()
    return sweep(c.with_data(root=str(root))), f"no class folders in {root}"


def _dataset_is_a_file(c: Ctx):
    root = c.tmp / "imgs.tar"
    root.write_bytes(b"not a folder")
    return sweep(c.with_data(root=str(root))), f"data.root: {root} is not a directory"


def _dataset_dangling_link(c: Ctx):
    root = c.tmp / "imgs-link"
    root.symlink_to(c.tmp / "gone")
    return sweep(c.with_data(root=str(root))), f"data.root: {root}"


def _class_folder_broken_link(c: Ctx):
    root = make_images(c.tmp / "imgs", per_class=4)
    (root / "emu").symlink_to(c.tmp / "emu-images-moved-away")
    return sweep(c.with_data(root=str(root))), str(root / "emu")


def _image_broken_link(c: Ctx):
    root = make_images(c.tmp / "imgs", per_class=4)
    (root / "dog" / "99.png").symlink_to(c.tmp / "gone.png")
    return sweep(c.with_data(root=str(root))), str(root / "dog" / "99.png")


def _class_without_images(c: Ctx):
    root = make_images(c.tmp / "imgs", per_class=4)
    (root / "zebra").mkdir()
    (root / "zebra" / "notes.txt").write_text("no images here")
    return sweep(c.with_data(root=str(root))), str(root / "zebra")


def _corrupt_image(c: Ctx):
    root = make_images(c.tmp / "imgs", per_class=4)
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage, not a png at all")
    return sweep(c.with_data(root=str(root))), str(bad)


def _one_class_only(c: Ctx):
    root = make_images(c.tmp / "imgs", classes=("cat",), per_class=8)
    return sweep(c.with_data(root=str(root))), f"data.root: {root} has only one class"


def _val_class_not_in_train(c: Ctx):
    root = c.tmp / "split"
    make_images(root / "train", per_class=8)
    make_images(root / "val", classes=("cat", "cow"), per_class=2)
    return sweep(c.with_data(root=str(root))), str(root / "val" / "cow")


def _fashion_unknown_class(c: Ctx):
    return sweep(c.with_data(dataset="fashion-mnist", root=None, classes=["Sandal", "Sandals"],
                             train_per_class=8)), "data.classes"


def _fashion_root_without_files(c: Ctx):
    root = c.tmp / "fashion"
    root.mkdir()
    return sweep(c.with_data(dataset="fashion-mnist", root=str(root), classes=["Sandal", "Bag"])), \
        f"data.root: {root}"


def _unwritable_workspace(c: Ctx):
    blocker = c.tmp / "a-file"
    blocker.write_text("a regular file, so nothing can be created under it")
    c.ws = blocker / "ws"
    return sweep(c.study()), "--workspace"


def _sqlite_in_missing_folder(c: Ctx):
    return sweep(c.study(), "--storage", f"sqlite:///{c.tmp / 'no-such-folder' / 'optuna.db'}"), "--storage"


def _read_only_tracking_db(c: Ctx):
    db = c.tmp / "mlflow-ro.db"
    db.write_bytes(c.mlflow_template.read_bytes())
    return sweep(c.study(), "--tracking-uri", f"sqlite:///file:{db}?mode=ro&uri=true"), "tracking URI"


def _train_malformed(c: Ctx):
    p = c.tmp / "recipe.yaml"
    p.write_text("seed: 0\nstages: [{epochs: 1\n  lr: : 3\n")
    return train(p), "recipe.yaml: invalid YAML"


def _train_workspace_unwritable(c: Ctx):
    blocker = c.tmp / "a-file"
    blocker.write_text("x")
    c.ws = blocker / "ws"
    return train(c.recipe()), "--workspace"


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")


def case(id: str, build: Build, *, subprocess: bool = False, marks=()):
    return pytest.param(build, subprocess, id=id, marks=marks)


CASES = [
    # --- the study file itself
    case("study-missing-file", lambda c: (sweep(c.tmp / "nope.yaml"), str(c.tmp / "nope.yaml"))),
    case("study-empty-file", _text_file("study.yaml", "")),
    case("study-only-a-comment", _text_file("study.yaml", "# nothing here\n")),
    case("study-malformed-yaml", _text_file("study.yaml", "name: x\nstrategies: {naive: [\n  budget: 3\n")),
    case("study-not-a-mapping", _text_file("study.yaml", "- naive\n- two_phase\n")),
    case("study-not-utf8", _text_file("study.yaml", b"name: \xff\xfe\n")),
    case("study-is-a-folder", _study_is_a_folder),
    # --- study fields
    case("unknown-key-did-you-mean", lambda c: (sweep(c.study(trails=2)), "trails: unknown key (did you mean 'trials'?)")),
    case("trials-string-for-int", lambda c: (sweep(c.study(trials="2")), "trials")),
    case("trials-zero-in-file", lambda c: (sweep(c.study(trials=0)), "trials")),
    case("budget-bool-for-int", lambda c: (sweep(c.study(budget={"epochs": True})), "budget.epochs")),
    case("budget-zero-epochs", lambda c: (sweep(c.study(budget={"epochs": 0})), "budget.epochs")),
    case("budget-negative-epochs", lambda c: (sweep(c.study(budget={"epochs": -2})), "budget.epochs")),
    case("budget-unknown-key", lambda c: (sweep(c.study(budget={"epochs": 2, "minutes": 5})), "budget.minutes")),
    case("range-bool-for-number", lambda c: (sweep(c.study(strategies={"naive": {"lr": {"low": True, "high": 1e-2}}})),
                                             "strategies.naive.lr.low")),
    case("range-string-for-number", lambda c: (sweep(c.study(strategies={"naive": {"pct_start": {"low": "0.1", "high": 0.5}}})),
                                               "strategies.naive.pct_start.low")),
    case("range-empty", lambda c: (sweep(c.study(strategies={"naive": {"lr": {"low": 1e-3, "high": 1e-3}}})),
                                   "strategies.naive.lr")),
    case("range-inverted", lambda c: (sweep(c.study(strategies={"naive": {"lr": {"low": 1e-2, "high": 1e-4}}})),
                                      "strategies.naive.lr")),
    case("range-log-from-zero", lambda c: (sweep(c.study(strategies={"naive": {"lr": {"low": 0, "high": 1e-2, "log": True}}})),
                                           "strategies.naive.lr")),
    case("freeze-range-reaches-budget",
         lambda c: (sweep(c.study(strategies={"two_phase": {"freeze_epochs": {"low": 1, "high": 2}}})),
                    "strategies.two_phase.freeze_epochs")),
    case("lr-low-range-above-lr-high",
         lambda c: (sweep(c.study(budget={"epochs": 3}, strategies={"two_phase": {
             "lr_low": {"low": 1e-3, "high": 1e-2, "log": True}, "lr_high": {"low": 1e-4, "high": 1e-1, "log": True}}})),
                    "strategies.two_phase.lr_low")),
    case("pct-start-range-beyond-1", lambda c: (sweep(c.study(strategies={"naive": {"pct_start": {"low": 0.1, "high": 1.5}}})),
                                                "strategies.naive.pct_start")),
    case("gradual-budget-too-short", lambda c: (sweep(c.study(strategies={"gradual": None})), "budget.epochs")),
    case("unknown-strategy", lambda c: (sweep(c.study(strategies={"naiv": None})), "strategies.naiv")),
    case("unknown-hyperparameter", lambda c: (sweep(c.study(strategies={"naive": {"pct_strat": 0.3}})),
                                              "strategies.naive.pct_strat: unknown hyperparameter (did you mean 'pct_start'?)")),
    case("unknown-sampler", lambda c: (sweep(c.study(sampler="cmaes")), "sampler")),
    case("unknown-pruner", lambda c: (sweep(c.study(pruner="asha")), "pruner")),
    case("unknown-metric", lambda c: (sweep(c.study(metric="val/acc")), "metric")),
    case("bad-study-name", lambda c: (sweep(c.study(name="my study/1")), "name")),
    case("no-strategies", lambda c: (sweep(c.study(strategies={})), "strategies")),
    case("compare-seeds-zero", lambda c: (sweep(c.study(compare={"seeds": 0})), "compare.seeds")),
    # --- the study's recipe
    case("recipe-file-missing", lambda c: (sweep(c.study(recipe="no/such/recipe.yaml")), "no/such/recipe.yaml")),
    case("recipe-file-malformed-yaml", _recipe_file_malformed),
    case("recipe-with-stages", lambda c: (sweep(c.study(recipe={"stages": [{"epochs": 1, "lr": 1e-3}]})), "recipe.stages")),
    case("recipe-unknown-key-did-you-mean", lambda c: (sweep(c.study(recipe={"data": {"batchsize": 8}})),
                                                       "recipe.data.batchsize: unknown key (did you mean 'batch_size'?)")),
    case("unknown-arch", lambda c: (sweep(c.study(recipe={"model": {"arch": "resnet19"}})), "recipe.model.arch")),
    case("unknown-head", lambda c: (sweep(c.study(recipe={"model": {"head": "mlp"}})), "recipe.model.head")),
    case("unknown-timm-arch", lambda c: (sweep(c.study(recipe={"model": {"arch": "timm/convnxt_tiny"}})),
                                         "recipe.model.arch: unknown timm architecture 'convnxt_tiny' (closest: timm/convnext_tiny")),
    case("groups-on-a-torchvision-arch", lambda c: (sweep(c.study(recipe={"model": {"groups": 5}})), "recipe.model.groups")),
    case("groups-beyond-the-blocks", lambda c: (sweep(c.study(recipe={"model": {"arch": "timm/test_resnet", "groups": 7}})),
                                                "model.groups: 7 asks for 6 body groups, but timm/test_resnet has 5 blocks")),
    case("timm-imagenet-offline-uncached", lambda c: (sweep(c.study(recipe={"model": {"arch": "timm/test_resnet",
                                                                                      "weights": "imagenet"}})),
                                                      "model.weights: no pretrained weights for test_resnet")),
    case("unknown-dataset", lambda c: (sweep(c.with_data(dataset="cifar10")), "recipe.data.dataset")),
    case("batch-size-zero", lambda c: (sweep(c.with_data(batch_size=0)), "recipe.data.batch_size")),
    case("batch-size-negative", lambda c: (sweep(c.with_data(batch_size=-4)), "recipe.data.batch_size")),
    case("batch-size-bool", lambda c: (sweep(c.with_data(batch_size=True)), "recipe.data.batch_size")),
    case("image-size-too-small", lambda c: (sweep(c.with_data(image_size=4)), "recipe.data.image_size")),
    case("val-fraction-one", lambda c: (sweep(c.with_data(val_fraction=1.0)), "recipe.data.val_fraction")),
    case("val-fraction-zero-in-a-sweep", lambda c: (sweep(c.with_data(val_fraction=0)), "recipe.data.val_fraction")),
    case("one-class-listed", lambda c: (sweep(c.with_data(classes=["cat"])), "recipe.data.classes")),
    case("imagefolder-without-root", lambda c: (sweep(c.with_data(root=None)), "root")),
    # --- the data, found bad only when it is read (before any store is opened)
    case("dataset-missing-folder", _dataset_missing),
    case("dataset-empty-folder", _dataset_empty),
    case("dataset-root-is-a-file", _dataset_is_a_file),
    case("dataset-root-dangling-symlink", _dataset_dangling_link),
    case("class-folder-broken-symlink", _class_folder_broken_link),
    case("image-broken-symlink", _image_broken_link),
    case("class-folder-without-images", _class_without_images),
    case("corrupt-image", _corrupt_image),
    case("dataset-with-one-class", _one_class_only),
    case("val-class-not-in-train", _val_class_not_in_train),
    case("unknown-class-name", lambda c: (sweep(c.with_data(classes=["cat", "cow"])), "data.classes")),
    case("fashion-unknown-class", _fashion_unknown_class),
    case("fashion-root-without-idx-files", _fashion_root_without_files),
    case("batch-size-larger-than-train-set", lambda c: (sweep(c.with_data(batch_size=64)), "data.batch_size")),
    # --- weights
    case("checkpoint-missing", lambda c: (sweep(c.with_weights(c.tmp / "missing.pt")), str(c.tmp / "missing.pt"))),
    case("checkpoint-other-arch", lambda c: (sweep(c.with_weights(c.checkpoints["other-arch"])), "resnet34")),
    case("checkpoint-truncated", lambda c: (sweep(c.with_weights(c.checkpoints["truncated"])), "truncated.pt")),
    case("checkpoint-garbage-bytes", lambda c: (sweep(c.with_weights(c.checkpoints["garbage"])), "garbage.pt")),
    case("checkpoint-plain-state-dict", lambda c: (sweep(c.with_weights(c.checkpoints["plain"])), "plain-state-dict.pt")),
    case("checkpoint-body-does-not-fit", lambda c: (sweep(c.with_weights(c.checkpoints["misfit"])), "misfit.pt")),
    # --- options
    case("trials-option-zero", lambda c: (sweep(c.study(), "--trials", 0), "--trials")),
    case("workers-option-zero", lambda c: (sweep(c.study(), "--workers", 0), "--workers")),
    case("unknown-strategy-option", lambda c: (sweep(c.study(), "--strategy", "naiv"), "--strategy")),
    case("workspace-under-a-file", _unwritable_workspace),
    # --- stores (subprocess: the real stderr)
    case("storage-unreachable-postgres",
         lambda c: (sweep(c.study(), "--storage", "postgresql://postgres@127.0.0.1:1/nope"), "--storage"),
         subprocess=True),
    case("storage-sqlite-in-missing-folder", _sqlite_in_missing_folder, subprocess=True),
    case("tracking-uri-unreachable", lambda c: (sweep(c.study(), "--tracking-uri", "http://127.0.0.1:1"), "tracking URI"),
         subprocess=True),
    case("tracking-server-refuses-writes", lambda c: (sweep(c.study(), "--tracking-uri", c.server), "tracking URI"),
         subprocess=True),
    case("tracking-sqlite-read-only", _read_only_tracking_db, subprocess=True),
    # --- `harness train` on a full recipe
    case("train-recipe-malformed-yaml", _train_malformed),
    case("train-unknown-key-did-you-mean", lambda c: (train(c.recipe(data={"batch_sise": 4})),
                                                      "data.batch_sise: unknown key (did you mean 'batch_size'?)")),
    case("train-epochs-string", lambda c: (train(c.recipe(stage={"epochs": "two"})), "stages[0].epochs")),
    case("train-epochs-zero", lambda c: (train(c.recipe(stage={"epochs": 0})), "stages[0].epochs")),
    case("train-epochs-negative", lambda c: (train(c.recipe(stage={"epochs": -1})), "stages[0].epochs")),
    case("train-no-stages", lambda c: (train(c.recipe(stages=[])), "stages")),
    case("train-lr-bool", lambda c: (train(c.recipe(stage={"lr": True})), "stages[0].lr")),
    case("train-weight-decay-bool", lambda c: (train(c.recipe(optimizer={"weight_decay": True})), "optimizer.weight_decay")),
    case("train-lr-min-above-max", lambda c: (train(c.recipe(stage={"lr": {"min": 1e-2, "max": 1e-3}})), "stages[0].lr")),
    case("train-last-groups-beyond-arch", lambda c: (train(c.recipe(stage={"train": {"last": 5}})), "stages[0].train")),
    case("train-batch-size-negative", lambda c: (train(c.recipe(data={"batch_size": -1})), "data.batch_size")),
    case("train-batch-size-larger-than-train-set", lambda c: (train(c.recipe(data={"batch_size": 64})), "data.batch_size")),
    case("train-cuda-without-cuda", lambda c: (train(c.recipe(device="cuda")), "device"), marks=no_cuda),
    case("train-checkpoint-other-arch", lambda c: (train(c.recipe(model={"weights": str(c.checkpoints["other-arch"])})),
                                                   "model.weights")),
    case("train-workspace-under-a-file", _train_workspace_unwritable),
]


# --- the checks -------------------------------------------------------------------------------

# what a store leaves in a workspace (Optuna, MLflow, and the folders the commands write)
STORE_NAMES = {"optuna.journal", "optuna.db", "mlflow.db", "mlruns", "artifacts", "checkpoints",
               "reports", "exports"}


def listing(root: Path) -> dict[str, tuple | None]:
    """Every path under `root` (symlinks not followed): files with (size, mtime), folders None."""
    out: dict[str, tuple | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            st = p.lstat()
            is_folder = p.is_dir() and not p.is_symlink()
            out[p.relative_to(root).as_posix()] = None if is_folder else (st.st_size, st.st_mtime_ns)
    return out


def assert_no_store_written(before: dict, after: dict, ws: str) -> None:
    """Nothing new but the workspace folder itself and its decoded-data cache (a cache, not a
    store: it is rebuilt from the data whenever it is missing); no existing file changed."""
    new = sorted(set(after) - set(before))
    stores = [p for p in new if set(p.split("/")) & STORE_NAMES or p.split("/")[-1].startswith(("optuna", "mlflow"))]
    assert not stores, f"refused input still wrote to a store: {stores}"
    allowed = {ws, f"{ws}/cache"}
    unexpected = [p for p in new if p not in allowed and not p.startswith(f"{ws}/cache/")]
    assert not unexpected, f"refused input still wrote {unexpected}"
    changed = [p for p, v in before.items() if v is not None and after.get(p) != v]
    assert not changed, f"refused input changed {changed}"


def run_harness(args: list[str]) -> tuple[int, str, str]:
    """`python -m harness ARGS` in a fresh process: the real stderr, loggers and all."""
    env = {k: v for k, v in os.environ.items() if k not in ("HARNESS_STORAGE", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("build, in_subprocess", CASES)
def test_bad_input_exits_2_with_one_line_and_writes_no_store(build, in_subprocess, tmp_path, images,
                                                             request, monkeypatch):
    for var in ("HARNESS_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    c = Ctx(tmp_path, images, request)
    args, names = build(c)
    args = [*args, "--workspace", str(c.ws)]
    before = listing(tmp_path)
    crash = None
    if in_subprocess:
        code, stdout, stderr = run_harness(args)
    else:
        result = CliRunner().invoke(main, args)
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback
            crash = "".join(traceback.format_exception(result.exception))[-3000:]
    after = listing(tmp_path)

    shown = f"exit {code}\nstdout: {stdout[-1500:]}\nstderr: {stderr[-3000:]}"
    assert crash is None, f"crashed instead of a one-line error:\n{crash}"
    assert "Traceback" not in stdout + stderr, shown
    assert code == 2, shown
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: "):].strip(), line
    assert names in line, f"{names!r} not named in: {line}"
    ws = c.ws.relative_to(tmp_path).as_posix()
    assert_no_store_written(before, after, ws)


def test_there_are_enough_cases():
    ids = [p.id for p in CASES]
    assert len(ids) >= 32 and len(set(ids)) == len(ids)


def test_baseline_is_valid_and_sweeps(tmp_path, images, baseline, monkeypatch):
    """The input every case departs from is good: the recipe passes check_inputs and the
    study sweeps one trial for real (~10-20 s: a fresh MLflow store, two tiny epochs)."""
    from harness.engine.recipe import Recipe
    from harness.engine.train import check_inputs

    for var in ("HARNESS_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    ws = tmp_path / "ws"
    check_inputs(Recipe.from_dict(full_recipe(images)), ws)
    study = dump(tmp_path / "study.yaml", baseline)
    result = CliRunner().invoke(main, ["sweep", str(study), "--trials", "1", "--workspace", str(ws)])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    assert "Traceback" not in result.output
