"""Shrink any shipped study (studies/*.yaml) into a tiny one that runs end to end on a CPU.

`shrink(study, dest_dir, **changes)` writes a self-contained copy of the study (its recipe
inlined) into dest_dir and returns a `Shrunk`: the new file's path and the pretraining steps
(`harness pretrain RECIPE -o CHECKPOINT`) that must run before it. Other tests build their tiny
studies from a shipped one (the `shrunk` fixture in conftest.py) instead of writing them by hand.

It reads and writes YAML and runs the command line (`python -m harness ...`) in a
subprocess; from the harness it takes only what the rules need to agree with it: the strategy
records (which hyperparameters split the epochs) and the recipe schema's defaults.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.engine.recipe import DataConfig, ModelConfig
from harness.sweep.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"

TRIALS = 2
SEEDS = 2
SHIFT_PER_CLASS = 20   # the corrupted test images per class (the clean test split stays whole)
EPOCHS = 2
PER_CLASS = 4
TEST_PER_CLASS = 20   # test images scored per class (Fashion-MNIST has 1,000: most of a shrunk study's time)
IMAGE_SIZE = 32
BATCH = 8          # eval batches are 2 x this
MIN_VAL_FRACTION = 0.25
DEFAULT_GROUPS = ModelConfig().groups                  # the recipe schema's defaults
DEFAULT_IMAGE_SIZE = DataConfig().image_size
DEFAULT_VAL_FRACTION = DataConfig().val_fraction
# archs whose `weights: imagenet` load offline (from a package dependency, not a hub)
OFFLINE_IMAGENET = {"timm/tf_efficientnet_lite0"}
# a timm arch whose weights would come from a hub is swapped for timm's tiny test model of its
# family (random weights either way here; timm/convnext_tiny at 32 px costs 10x test_convnext)
TINY_TIMM = {"convnext": "timm/test_convnext", "vit": "timm/test_vit", "efficientnet": "timm/test_efficientnet",
             "nfnet": "timm/test_nfnet", "maxvit": "timm/test_maxvit", "coatnet": "timm/test_coatnet"}
TINY_TIMM_DEFAULT = "timm/test_resnet"
# the tiny image folder made for a study whose data.root does not exist
FOLDER_CLASSES = 3
FOLDER_IMAGES = 8
FOLDER_PX = 40


@dataclass(frozen=True)
class PretrainStep:
    recipe: Path        # a shrunk pretraining recipe
    checkpoint: Path    # where `harness pretrain RECIPE -o CHECKPOINT` writes the body (absolute)


@dataclass(frozen=True)
class Shrunk:
    """A shrunk study file and the pretraining it needs first (str() and os.fspath() give the path)."""
    path: Path
    pretrain: tuple[PretrainStep, ...] = ()

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def shipped_studies() -> list[Path]:
    """Every shipped study file, sorted (a new one is picked up by the tests automatically)."""
    return sorted(STUDIES.glob("*.yaml"))


def resolve_study(name: str | os.PathLike) -> Path:
    """A shipped study's stem ('quickstart') or a path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    shipped = STUDIES / f"{name}.yaml"
    if not shipped.is_file():
        raise FileNotFoundError(f"no shipped study '{name}' (have: {', '.join(s.stem for s in shipped_studies())})")
    return shipped


def read_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def base_recipe(study_path: str | os.PathLike) -> dict:
    """The study's base recipe as a dict: inline, or read from the path `recipe:` names
    (relative to the study file; else to the working directory, as the harness also
    accepts), with its stages dropped."""
    study_path = Path(study_path)
    recipe = read_yaml(study_path).get("recipe") or {}
    if isinstance(recipe, str):
        rp = Path(recipe)
        if not rp.is_absolute() and (study_path.parent / rp).exists():
            rp = study_path.parent / rp
        recipe = read_yaml(rp)
    recipe = copy.deepcopy(recipe)
    recipe.pop("stages", None)
    return recipe


def merge(base: dict, changes: dict, replace: tuple[str, ...] = ()) -> dict:
    """`base` with `changes` deep-merged into it (a new dict; neither argument changes): a
    dict merges into a dict key by key, recursively; any other value (a number, a list, None,
    a dict where base has no dict) replaces; top-level keys named in `replace` are replaced
    whole even when both sides are dicts."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in replace:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _shrink_compare(compare: dict) -> dict:
    out = {**compare, "seeds": SEEDS}
    if out.get("max_seeds") is not None:
        out["max_seeds"] = min(out["max_seeds"], SEEDS + 1)
    if out.get("corruptions"):
        name, severities = next(iter(out["corruptions"].items()))
        out["corruptions"] = {name: severities[:1]}
        out["shift_per_class"] = SHIFT_PER_CLASS
    return out


def shrink(study_path: str | os.PathLike, dest_dir: str | os.PathLike, **changes: Any) -> Shrunk:
    """Write a shrunk, self-contained copy of the study at `study_path` into `dest_dir`.

    Returns a `Shrunk`: `.path`, the YAML file written (dest_dir/<study stem>.yaml, or
    <stem>-2.yaml, ... when that exists), and `.pretrain`, the `harness pretrain` steps to run
    (in order) before the study can be swept. Rules:

    - The recipe is inlined: a `recipe:` path is read relative to the study file (its stages
      dropped). `recipe.device` becomes cpu.
    - `trials` 2, `compare.seeds` 2 (`max_seeds` at most 3); `compare.corruptions` keeps only
      its first corruption at its first severity, on `shift_per_class` 20 test images per class; `pruner`, `sampler`, `metric`, `name` are kept.
    - `budget.epochs` 2; with the `gradual` strategy, max(2, recipe.model.groups (the schema's
      default when unset, 3)), since gradual spends one stage (at least one epoch) per layer group.
    - Epoch-split hyperparameters (a strategy's `rules.epoch_splits` in
      harness.sweep.strategies: two_phase's freeze_epochs, lp_ft's probe_epochs) must lie between 1 and
      epochs - 1. A range (or choices, or fixed value) that no longer fits becomes the fixed
      value 1 (a plain number is a fixed value); one that fits is kept.
    - data: `train_per_class` 4, `test_per_class` 20 (the study's own when smaller), `image_size` 32 (the study's own when it is smaller),
      `batch_size` 8, `val_fraction` the study's but at least 0.25 (so each class has a val
      image at 4 per class), `classes` and everything else kept.
    - data.dataset imagefolder whose root does not exist (relative to the working directory
      or the study file): a tiny folder is made at dest_dir/<stem>-images, 3 classes x 8 RGB
      PNGs of 40 px (the study's class names when it lists them), each class its own colour
      plus noise so it is learnable, and root points to it (absolute). A root that exists is
      kept (made absolute).
    - model.weights `imagenet` is kept only for timm/tf_efficientnet_lite0 (whose weights
      install offline with a package); any other `imagenet` becomes `none` (no hub here).
      A timm arch whose `imagenet` became `none` is swapped for timm's tiny test model of
      its family (`tiny_timm`: timm/convnext_tiny -> timm/test_convnext): the weights are random
      either way, and the study's own arch is what makes the real one slow on a CPU.
      `none` is kept. A checkpoint path is matched by its file stem to a pretraining recipe
      (studies/recipes/<stem>.yaml beside the study, or <stem>.yaml beside it): that recipe is
      shrunk (`shrink_recipe`) into dest_dir/pretrain/, the weights point to
      dest_dir/checkpoints/<stem>.pt (absolute), and the step is returned in `.pretrain`.
      A path with no such recipe is kept (made absolute) when the file exists; otherwise
      ValueError.
    - `**changes` are applied last, verbatim, and no rule above is applied again after them:
      dicts deep-merge key by key (`recipe={"data": {"image_size": 16}}` changes only the
      image size; `budget={"epochs": 4}`, `compare={"seeds": 3}`), except `strategies`, which
      replaces the study's strategies whole; anything else (a number, a string, a list,
      None) replaces the value (`trials=3`, `name="x"`, `recipe={"data": {"classes": [0, 1]}}`).
      Changing `recipe.model.weights` away from a pretrained checkpoint drops its
      pretraining step. Changing the budget leaves epoch splits as the rules made them (pass
      `strategies` too when they must change).
    """
    study_path = Path(study_path)
    dest_dir = Path(dest_dir).resolve()
    dest_dir.mkdir(parents=True, exist_ok=True)
    raw = read_yaml(study_path)
    recipe = base_recipe(study_path)
    model = recipe.setdefault("model", {}) or {}
    recipe["model"] = model
    strategies = {k: dict(v or {}) for k, v in (raw.get("strategies") or {}).items()}

    epochs = EPOCHS
    if "gradual" in strategies:
        epochs = max(epochs, int(model.get("groups", DEFAULT_GROUPS)))
    for strategy, space in strategies.items():
        splits = STRATEGIES[strategy].rules.epoch_splits if strategy in STRATEGIES else ()
        for name in splits:
            if name in space and not _fits(space[name], epochs):
                space[name] = 1

    recipe["device"] = "cpu"
    data = dict(recipe.get("data") or {})
    data["train_per_class"] = PER_CLASS
    data["test_per_class"] = min(TEST_PER_CLASS, data.get("test_per_class") or TEST_PER_CLASS)
    data["image_size"] = min(IMAGE_SIZE, int(data.get("image_size", DEFAULT_IMAGE_SIZE)))
    data["batch_size"] = BATCH
    data["val_fraction"] = max(MIN_VAL_FRACTION, float(data.get("val_fraction", DEFAULT_VAL_FRACTION)))
    if data.get("dataset") == "imagefolder":
        root = _existing(data.get("root"), study_path)
        if root is None:
            root = make_image_folder(dest_dir / f"{study_path.stem}-images", data.get("classes"))
        data["root"] = str(root)
    recipe["data"] = data

    steps: list[PretrainStep] = []
    weights = model.get("weights", "none")
    if weights == "imagenet":
        model["weights"] = "imagenet" if model.get("arch") in OFFLINE_IMAGENET else "none"
        if model["weights"] == "none" and str(model.get("arch", "")).startswith("timm/"):
            model["arch"] = tiny_timm(model["arch"])
    elif weights != "none":
        source = _pretraining_recipe(Path(weights).stem, study_path)
        if source is not None:
            ckpt = dest_dir / "checkpoints" / f"{Path(weights).stem}.pt"
            steps.append(PretrainStep(shrink_recipe(source, dest_dir / "pretrain"), ckpt))
            model["weights"] = str(ckpt)
        elif (found := _existing(weights, study_path)) is not None:
            model["weights"] = str(found)
        else:
            raise ValueError(f"{study_path}: recipe.model.weights {weights}: no such file, and no pretraining "
                             f"recipe named {Path(weights).stem}.yaml beside the study or in its recipes/")

    shrunk = dict(raw)   # the study's own key order; keys it lacks go last
    shrunk.update(recipe=recipe, budget={**(raw.get("budget") or {}), "epochs": epochs}, trials=TRIALS,
                  strategies=strategies, compare=_shrink_compare(raw.get("compare") or {}))
    shrunk = merge(shrunk, changes, replace=("strategies",))
    final_weights = ((shrunk.get("recipe") or {}).get("model") or {}).get("weights") \
        if isinstance(shrunk.get("recipe"), dict) else None
    steps = [s for s in steps if final_weights == str(s.checkpoint)]

    out = _free_name(dest_dir, study_path.stem)
    out.write_text(f"# {study_path.name} shrunk by tests/shipped.py (trials {TRIALS}, tiny data, cpu)\n"
                   + yaml.safe_dump(shrunk, sort_keys=False))
    return Shrunk(out, tuple(steps))


def tiny_timm(arch: str) -> str:
    """timm's tiny test model of `arch`'s family (timm/convnext_tiny -> timm/test_convnext);
    timm/test_resnet when timm has none for the family."""
    name = arch.removeprefix("timm/").split(".", 1)[0]
    return next((tiny for family, tiny in TINY_TIMM.items() if name.startswith(family)), TINY_TIMM_DEFAULT)


def shrink_recipe(recipe_path: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Write a shrunk copy of a pretraining recipe to dest_dir/<stem>.yaml and return its path:
    one stage of 1 epoch (the recipe's first stage), train_per_class 4, image_size 32 (the
    recipe's own when smaller), batch_size 8, device cpu; weights `imagenet` follow shrink's
    rule. The same recipe shrinks to the same file, so `harness pretrain` reuses its checkpoint."""
    recipe_path = Path(recipe_path)
    dest_dir = Path(dest_dir).resolve()
    dest_dir.mkdir(parents=True, exist_ok=True)
    r = read_yaml(recipe_path)
    r["device"] = "cpu"
    data = dict(r.get("data") or {})
    data.update(train_per_class=PER_CLASS, batch_size=BATCH,
                image_size=min(IMAGE_SIZE, int(data.get("image_size", DEFAULT_IMAGE_SIZE))))
    r["data"] = data
    model = dict(r.get("model") or {})
    if model.get("weights") == "imagenet" and model.get("arch") not in OFFLINE_IMAGENET:
        model["weights"] = "none"
    elif model.get("weights", "none") not in ("none", "imagenet"):
        raise ValueError(f"{recipe_path}: pretraining from a checkpoint ({model['weights']}) is not supported")
    r["model"] = model
    stages = r.get("stages") or [{"lr": 1e-3}]
    r["stages"] = [{**stages[0], "epochs": 1}]
    out = dest_dir / f"{recipe_path.stem}.yaml"
    out.write_text(f"# {recipe_path.name} shrunk by tests/shipped.py (1 epoch, tiny data, cpu)\n"
                   + yaml.safe_dump(r, sort_keys=False))
    return out


def make_image_folder(root: Path, classes: list | None = None) -> Path:
    """A tiny image folder: class folders of 8 RGB PNGs (40 px), each class a distinct colour
    with noise, so a model can tell them apart. Class names: `classes` when they are names,
    else class0, class1, ... (enough for integer `classes`). Returns the folder (absolute)."""
    import numpy as np
    from PIL import Image

    if classes and all(isinstance(c, str) for c in classes):
        names = list(classes)
    else:
        n = max([FOLDER_CLASSES] + [c + 1 for c in classes or [] if isinstance(c, int)])
        names = [f"class{i}" for i in range(n)]
    palette = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (200, 60, 220), (40, 210, 210)]
    rng = np.random.default_rng(0)
    root = Path(root).resolve()
    for i, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(palette[i % len(palette)], dtype=np.float32) * (0.6 + 0.4 * ((i // len(palette)) % 2))
        for k in range(FOLDER_IMAGES):
            noise = rng.normal(0, 25, size=(FOLDER_PX, FOLDER_PX, 3))
            img = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img, "RGB").save(folder / f"{k}.png")
    return root


def harness(*args: Any, timeout: float = 1800, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` in a subprocess: one torch thread (OMP_NUM_THREADS=1), the
    hubs offline, and no MLFLOW_TRACKING_URI / HARNESS_STORAGE from the caller (the
    workspace's own SQLite store and journal)."""
    env = _child_env()
    return subprocess.run([sys.executable, "-m", "harness", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def harness_session(*commands: list, timeout: float = 1800,
                    cwd: str | os.PathLike | None = None) -> list[subprocess.CompletedProcess]:
    """Several harness commands, in order, in ONE subprocess (torch, mlflow and optuna imported
    once, not once per command), each run as `harness ARGS` would be run from the command line
    (click's main, its own exit code, stdout and stderr; an exception's traceback in its
    stderr). Same environment as `harness()`. Stops after the first command that fails; returns
    one CompletedProcess per command run. For tests that are not about the process boundary."""
    import json
    import tempfile
    env = _child_env()
    with tempfile.TemporaryDirectory() as tmp:
        plan, results = Path(tmp) / "commands.json", Path(tmp) / "results.json"
        plan.write_text(json.dumps([[str(a) for a in c] for c in commands]))
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"from shipped import _run_commands; _run_commands({str(plan)!r}, {str(results)!r})")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=cwd)
        if not results.is_file():
            raise AssertionError(f"the command session died (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                                 f"\n{proc.stderr[-5000:]}")
        ran = json.loads(results.read_text())
    return [subprocess.CompletedProcess(["harness", *args], code, out, err) for args, code, out, err in ran]


def _run_commands(plan: str, results: str) -> None:
    """harness_session's child: run each command of `plan` through click, write what each did."""
    import json
    import traceback

    from click.testing import CliRunner

    from harness.cli import main

    ran = []
    for args in json.loads(Path(plan).read_text()):
        res = CliRunner().invoke(main, args)
        err = res.stderr
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            err += "".join(traceback.format_exception(*res.exc_info))
        ran.append([args, res.exit_code, res.stdout, err])
        if res.exit_code != 0:
            break
    Path(results).write_text(json.dumps(ran))


def run_pretraining(shrunk: Shrunk, workspace: str | os.PathLike) -> list[subprocess.CompletedProcess]:
    """Run the shrunk study's pretraining steps in order (`harness pretrain RECIPE -o CKPT
    --workspace WS`); the first that fails raises AssertionError with its output."""
    procs = []
    for step in shrunk.pretrain:
        proc = harness("pretrain", step.recipe, "-o", step.checkpoint, "--workspace", workspace)
        assert proc.returncode == 0, f"harness pretrain {step.recipe} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        procs.append(proc)
    return procs


# --- helpers ----------------------------------------------------------------------------

def _child_env() -> dict[str, str]:
    """A harness child's environment: one torch thread, the hubs offline, and no
    MLFLOW_TRACKING_URI / HARNESS_STORAGE from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HARNESS_STORAGE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _fits(spec: Any, epochs: int) -> bool:
    """Whether an epoch-split hyperparameter's every value lies in 1 .. epochs - 1."""
    if isinstance(spec, dict) and "choices" in spec:
        values = spec["choices"] or []
    elif isinstance(spec, dict):
        values = [spec.get("low"), spec.get("high")]
    else:
        values = [spec]
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= epochs - 1
                                for v in values)


def _existing(path: str | None, study_path: Path) -> Path | None:
    """`path` made absolute when it exists (as given, else beside the study file)."""
    if not path:
        return None
    for p in (Path(path), study_path.parent / path):
        if p.exists():
            return p.resolve()
    return None


def _pretraining_recipe(stem: str, study_path: Path) -> Path | None:
    for p in (study_path.parent / "recipes" / f"{stem}.yaml", study_path.parent / f"{stem}.yaml"):
        if p.is_file() and p.resolve() != study_path.resolve():
            return p
    return None


def _free_name(folder: Path, stem: str) -> Path:
    out, k = folder / f"{stem}.yaml", 2
    while out.exists():
        out, k = folder / f"{stem}-{k}.yaml", k + 1
    return out
