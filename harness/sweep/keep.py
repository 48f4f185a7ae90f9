"""The best trial's model, kept: `compare` scores it instead of training it again.

When a trial finishes better than every completed trial of its strategy, its whole model
(state dict on the CPU), the recipe it was trained by, its class names and input
statistics and its LR history are saved as WORKSPACE/models/<study>/<strategy>/trial-<n>.pt
(written to a temporary file, then renamed). Files of completed trials that it beats are
removed, so about one file per strategy remains; a file is never removed for a trial that
is still running (another worker's trial may yet be the best).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from harness.engine.input_stats import InputStats
from harness.engine.files import torch_save_atomic
from harness.engine.models import build_model
from harness.engine.recipe import Recipe
from harness.engine.run_types import Result

FORMAT = "finetune-harness-kept/1"


def path_for(folder: Path, trial_number: int) -> Path:
    return folder / f"trial-{trial_number}.pt"


def _better(value: float, than: float, direction: str) -> bool:
    return value > than if direction == "maximize" else value < than


def keep_if_best(trial: optuna.Trial, value: float, result: Result, recipe: Recipe, folder: Path) -> Path | None:
    """Save the trial's model when `value` beats every completed trial of its study."""
    if result.model is None:
        return None
    ostudy = trial.study
    direction = "maximize" if ostudy.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
    done = [t for t in ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if any(not _better(value, t.value, direction) for t in done):
        return None
    path = path_for(folder, trial.number)
    torch_save_atomic({"format": FORMAT, "trial": trial.number, "value": value, "recipe": recipe.to_yaml(),
                       "model": {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()},
                       "class_names": list(result.class_names), "group_names": list(result.group_names),
                       "input_stats": {"mean": list(result.input_stats.mean), "std": list(result.input_stats.std)},
                       "history": result.history()}, path)
    for t in done:   # every completed trial is beaten: its file, if any, is no longer the best
        path_for(folder, t.number).unlink(missing_ok=True)
    return path


@dataclass
class Kept:
    """A kept model, ready to score: the model (on the CPU, eval mode) and the Result of its trial."""
    model: torch.nn.Module
    result: Result


def load_kept(folder: Path, trial_number: int, recipe: Recipe) -> Kept | None:
    """The kept model of trial `trial_number`, if its file is there, readable and was
    trained by exactly `recipe`; else None (compare then trains it again)."""
    path = path_for(folder, trial_number)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:
        return None
    if saved.get("format") != FORMAT or Recipe.from_dict(_yaml(saved["recipe"])) != recipe:
        return None
    m = recipe.model
    model = build_model(m.arch, len(saved["class_names"]), "none", m.head, m.groups, recipe.data.image_size)
    model.load_state_dict(saved["model"])
    stats = saved["input_stats"]
    model.input_stats = InputStats(tuple(stats["mean"]), tuple(stats["std"]))
    model.eval()
    result = Result(group_names=saved["group_names"], class_names=saved["class_names"], model=model,
                    input_stats=model.input_stats)
    result.resume(saved["history"])
    return Kept(model, result)


def _yaml(text: str) -> dict:
    import yaml
    return yaml.safe_load(text)
