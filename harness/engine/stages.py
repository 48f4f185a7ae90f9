"""Stage checkpoints: a fine-tune as it stands after its first K stages, to continue exactly.

fastai's `save('stage-1')` / `load('stage-1')`, made exact. A checkpoint holds the whole
model's state (body, head and buffers, any arch: `model.state_dict()` of the model the
recipe builds), the state of the generator that shuffles and augments, the global torch
RNG (dropout), the step and epoch counters and the Result history so far. No optimizer
state: it is reset at every stage (fastai), so a stage boundary needs none.

Key: the recipe's prefix (its first K stages, device left out, the rule of
`harness.engine.recipe.config_hash`), seed included; stored as
WORKSPACE/checkpoints/stages/<hash>-stage<K>.pt and loaded with weights_only=True.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness.errors import HarnessError
from harness.engine.files import torch_save_atomic
from harness.engine.recipe import Recipe, config_hash, flatten
from harness.engine.run_types import Prepared

STAGE_FORMAT = "finetune-harness-stage/1"


@dataclass
class StageCheckpoint:
    """A run after `stages_done` stages: everything needed to continue it bit for bit."""
    stages_done: int                  # K, counted from 1
    prefix: str                       # YAML of the recipe prefix it was trained by
    model: dict[str, torch.Tensor]    # the whole model's state_dict, on the CPU
    generator: torch.Tensor           # the shuffling/augmentation generator's state
    rng: dict[str, torch.Tensor]      # the global RNGs: "cpu", and "cuda" on a GPU
    device: str                       # the device type the RNG states belong to
    step: int                         # optimizer steps done (global)
    epoch: int                        # epochs done (global)
    history: dict[str, Any] = field(default_factory=dict)   # Result.history(): epochs, lrs, moms, stage_starts
    ema: dict[str, torch.Tensor] | None = None              # the weight EMA's state (optimizer.ema), on the CPU
    source: str = field(default="", compare=False)          # the file it was read from (not saved)


class StagesDidNotFinish(HarnessError):
    """The stages before a range test diverged (or ran out of memory): a result, not bad input."""


_SAVED = [f for f in StageCheckpoint.__dataclass_fields__ if f != "source"]
_OPTIONAL = ("ema",)   # absent from checkpoints written before it existed (recipes without an EMA)


@dataclass(frozen=True)
class StagePlan:
    """Which of a recipe's stages `fine_tune` runs, and what it keeps of them."""
    start: StageCheckpoint | None = None                          # continue after its stages
    stop: int | None = None                                       # run stages up to this one (1-based), then return
    on_stage: Callable[[StageCheckpoint], None] | None = None     # called after every finished stage
    test: bool = True                                             # score the test split after the last stage


# --- keys ------------------------------------------------------------------------------

def prefix_recipe(recipe: Recipe, k: int) -> Recipe:
    """The recipe with only its first k stages, device left out (it does not decide the weights)."""
    d = recipe.to_dict()
    return Recipe.from_dict({**d, "stages": d["stages"][:k], "device": "auto"})


def prefix_key(recipe: Recipe, k: int) -> str:
    return config_hash(prefix_recipe(recipe, k))


def stage_path(workspace: str | Path, recipe: Recipe, k: int) -> Path:
    return Path(workspace) / "checkpoints" / "stages" / f"{prefix_key(recipe, k)}-stage{k}.pt"


# --- capture and restore -------------------------------------------------------------------

def capture(recipe: Recipe, k: int, run: Prepared, counters: tuple[int, int],
            history: dict[str, Any], ema: dict[str, torch.Tensor] | None = None) -> StageCheckpoint:
    """The run after its stage k: `counters` = (global step, epoch), `history` = Result.history(),
    `ema` the weight EMA's state (when the recipe has one)."""
    rng = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    model = {k_: v.detach().to("cpu", copy=True) for k_, v in run.model.state_dict().items()}
    return StageCheckpoint(k, prefix_recipe(recipe, k).to_yaml(), model, run.generator.get_state(),
                           rng, run.device.type, counters[0], counters[1], history, ema)


def restore(ckpt: StageCheckpoint, run: Prepared) -> None:
    """Put a freshly prepared run in the checkpoint's state. The RNG states only carry over to
    the same device type; on another one the generator is re-seeded from the seed and stage
    (deterministic, but not the stream an uninterrupted run there would have drawn)."""
    try:
        run.model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [""]
        raise HarnessError(f"{ckpt.source or 'stage checkpoint'}: does not fit this recipe's model ({first[0].strip()})") from None
    if ckpt.device == run.device.type:
        run.generator.set_state(ckpt.generator)
        torch.set_rng_state(ckpt.rng["cpu"])
        if "cuda" in ckpt.rng:
            torch.cuda.set_rng_state(ckpt.rng["cuda"], run.device)
    else:
        seed = Recipe.from_dict(_yaml(ckpt.prefix)).seed * 1000 + ckpt.stages_done
        run.generator.manual_seed(seed)
        torch.manual_seed(seed)


# --- files ------------------------------------------------------------------------------------

def save_stage(ckpt: StageCheckpoint, path: str | Path) -> Path:
    """Write atomically (a crash leaves the old file or none, never half of one)."""
    path = Path(path)
    blob = {"format": STAGE_FORMAT, **{f: getattr(ckpt, f) for f in _SAVED}}
    torch_save_atomic(blob, path, mode=None)
    return path


def read_stage(path: str | Path, recipe: Recipe) -> StageCheckpoint:
    """Load a stage checkpoint (weights_only) made by `recipe`'s own prefix, or raise one line
    naming the file."""
    p = Path(path)
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HarnessError(f"{p}: not a readable stage checkpoint ({e.__class__.__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != STAGE_FORMAT:
        raise HarnessError(f"{p}: not a finetune-harness stage checkpoint")
    missing = [f for f in _SAVED if f not in blob and f not in _OPTIONAL]
    if missing:
        raise HarnessError(f"{p}: not a complete stage checkpoint (no {missing[0]})")
    ckpt = StageCheckpoint(**{f: blob[f] for f in _SAVED if f in blob}, source=str(p))
    check_prefix(ckpt, recipe)
    return ckpt


def check_prefix(ckpt: StageCheckpoint, recipe: Recipe) -> None:
    """Refuse a checkpoint that `recipe`'s first stages (and seed) did not make."""
    expected = prefix_recipe(recipe, ckpt.stages_done).to_yaml() if ckpt.stages_done <= len(recipe.stages) else None
    if ckpt.prefix != expected:
        what = (_first_difference(ckpt.prefix, expected) if expected else
                f"its {ckpt.stages_done} stages, more than the recipe's {len(recipe.stages)}")
        raise HarnessError(f"{ckpt.source or 'stage checkpoint'}: a stage checkpoint of another recipe "
                           f"(differs in {what}); delete it or use that recipe")


def find_stage(workspace: str | Path, recipe: Recipe, k: int) -> StageCheckpoint | None:
    """The workspace's checkpoint of the recipe after stage k, if one was saved."""
    path = stage_path(workspace, recipe, k)
    if not path.is_file():
        return None
    ckpt = read_stage(path, recipe)
    if ckpt.stages_done != k:
        raise HarnessError(f"{path}: holds the model after stage {ckpt.stages_done}, not {k}")
    return ckpt


def saver(workspace: str | Path, recipe: Recipe, tracker: Any = None) -> Callable[[StageCheckpoint], None]:
    """A StagePlan.on_stage that writes every stage's checkpoint to the workspace and, given a
    tracker, logs it as an artifact (folder `stages/`)."""
    def keep(ckpt: StageCheckpoint) -> None:
        path = save_stage(ckpt, stage_path(workspace, recipe, ckpt.stages_done))
        if tracker is not None:
            tracker.log_file(path, "stages")
            tracker.set_tags({f"stage_checkpoint.{ckpt.stages_done}": str(path)})
    return keep


def _yaml(text: str) -> dict:
    import yaml
    return yaml.safe_load(text)


def _first_difference(a: str, b: str) -> str:
    """The first flattened field where two recipe YAMLs differ, e.g. 'stages.0.lr.max' or 'seed'."""
    fa, fb = flatten(_yaml(a)), flatten(_yaml(b))
    diff = [k for k in list(fa) + [k for k in fb if k not in fa] if fa.get(k) != fb.get(k)]
    return diff[0] if diff else "its format"
