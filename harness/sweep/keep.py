"""The best trial's model, kept: `compare` scores it instead of training it again.

When a trial finishes better than every completed trial of its strategy, its whole model
(state dict on the CPU), the recipe it was trained by, its class names and input
statistics, its LR history and, when its head was trained before its body (lp_ft's probe),
that head as the body started under it (WiSE-FT's start model, harness/engine/wise_ft.py) are
saved as WORKSPACE/models/<study>/<strategy>/trial-<n>.pt
(written to a temporary file, then renamed). Files of completed trials that it beats are
removed, so about one file per strategy remains; a file is never removed for a trial that
is still running (another worker's trial may yet be the best).

On an MLflow server (an http(s) tracking URI, the set-up of a sweep over several machines)
the file is also logged as the artifact kept/trial-<n>.pt of the trial's run, so `compare`
on any node finds it: a node without the file downloads it into its own workspace (its
cache) instead of training the trial again. A beaten file stays in the artifact store
(about log2(trials) files per strategy). With a local tracking store the workspace is the
only copy: the machine that swept is the one that compares.
"""
from __future__ import annotations

import os
import sys
import tempfile
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
from harness.errors import reason

FORMAT = "finetune-harness-kept/1"
ARTIFACTS = "kept"      # the artifact folder of a trial's run that holds its kept model


def path_for(folder: Path, trial_number: int) -> Path:
    return folder / f"trial-{trial_number}.pt"


def _better(value: float, than: float, direction: str) -> bool:
    return value > than if direction == "maximize" else value < than


def keep_if_best(trial: optuna.Trial, value: float, result: Result, recipe: Recipe, folder: Path,
                 start_head: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Save the trial's model (and `start_head`, WiSE-FT's) when `value` beats every completed
    trial of its study."""
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
                       "history": result.history(), "start_head": start_head}, path)
    for t in done:   # every completed trial is beaten: its file, if any, is no longer the best
        path_for(folder, t.number).unlink(missing_ok=True)
    return path


def shared(tracking_uri: str) -> bool:
    """Is the tracking store one that every node reads (an MLflow server)?"""
    return tracking_uri.startswith(("http://", "https://"))


def share(tracking, run_id: str, path: Path) -> None:
    """Log the kept file `path` as an artifact of its trial's run (`tracking`: a
    harness.tracking.Tracking), where every node can read it; nothing on a local store.
    A failed upload costs a retrain in a remote compare, not the trial: one warning line."""
    if not shared(tracking.uri):
        return
    tracker = tracking.tracker(run_id)
    try:
        tracker.log_file(path, ARTIFACTS)
    except Exception as e:
        print(f"warning: {path.name} not uploaded to the MLflow server ({reason(e)}); a compare on "
              "another machine trains that trial again", file=sys.stderr, flush=True)
    finally:
        tracker.close()


def fetch(tracking, run_id: str | None, folder: Path, trial_number: int) -> bool:
    """Is the kept file of trial `trial_number` in `folder`? When it is not, it is first
    downloaded from the artifacts of run `run_id` (written to a temporary file, then
    renamed). False when there is none to download: compare then trains the trial again."""
    path = path_for(folder, trial_number)
    if path.is_file():
        return True
    if not run_id or not shared(tracking.uri):
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            got = tracking.client.download_artifacts(run_id, f"{ARTIFACTS}/{path.name}", tmp)
            os.replace(got, path)
    except Exception:
        return False     # not logged (an older sweep, a local store), or the store is down
    return True


@dataclass
class Kept:
    """A kept model, ready to score: the model (on the CPU, eval mode) and the Result of its trial;
    `start_head`: the head after its probe stages (None: none kept)."""
    model: torch.nn.Module
    result: Result
    start_head: dict[str, torch.Tensor] | None = None


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
    return Kept(model, result, saved.get("start_head"))


def _yaml(text: str) -> dict:
    import yaml
    return yaml.safe_load(text)
