"""The engine's jobs as MLflow records: `harness train`, `harness pretrain`, `harness lr-find`.

Each opens a run in the tracking store of `Stores` and logs what a person browsing MLflow
wants to see: the flattened recipe as params, the recipe YAML, per-step curves, the pictures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from harness.engine.data.plan import plan_for
from harness.engine.data.resize import eval_transform
from harness.engine.groups import group_names
from harness.engine.lr_find import LRFindResult, RangeTest, chosen_stages, range_test, states_after
from harness.engine.models import read_checkpoint, save_checkpoint
from harness.engine.recipe import Recipe, config_hash, flatten
from harness.engine.run_types import Result
from harness.engine.stages import StagePlan, saver, stage_path
from harness.engine.train import check_inputs, fine_tune, resolve_device
from harness.errors import HarnessError
from harness.tracking import MlflowTracker, Tracking
from harness.workspace import Stores


def tracked_fine_tune(recipe: Recipe, tracker: MlflowTracker, workspace: str | Path = "workspace", *,
                      report: Callable[[int, float | None], None] | None = None, progress: bool = False,
                      plan: StagePlan | None = None, metric: str = "val/accuracy") -> Result:
    """fine_tune with everything a run records: the flattened recipe as params, the layer
    groups and runtime tags, the recipe YAML, per-step curves and the LR plot. A diverged
    run ends FAILED with its reason. `report` gets `metric`'s value every epoch."""
    import torch

    from harness.report import lr_figure

    tracker.log_params(flatten(recipe.to_dict()))
    tracker.log_params({"data.eval_transform": eval_transform(recipe.data)})   # what val/test images see
    memory = plan_for(recipe.data, Path(workspace), resolve_device(recipe.device))
    tracker.log_params(memory.params())   # where the images live, and the bytes that decided it
    # exact CPU replays need the same torch build and thread count: record them
    tracker.set_tags({"layer_groups": ",".join(group_names(recipe.model.groups)),
                      "runtime.torch": torch.__version__, "runtime.threads": torch.get_num_threads(),
                      "runtime.device": str(resolve_device(recipe.device))})
    tracker.log_text(recipe.to_yaml(), "recipe.yaml")
    result = fine_tune(recipe, tracker, workspace, report=report, progress=progress, plan=plan, memory=memory,
                       metric=metric)
    tracker.set_tags({"harness.status": result.status})
    if result.input_stats is not None:   # what the inputs were normalised with (the weights' own)
        tracker.log_params({"input.mean": list(result.input_stats.mean), "input.std": list(result.input_stats.std)})
    if result.lrs:
        tracker.log_figure(lr_figure(result, trainable=recipe), "lr_schedule.png")
    if not result.ok:
        tracker.end_as("FAILED", result.status)
    return result


@dataclass
class TrainRun:
    """What `harness train` did: the Result, its MLflow run, the stage checkpoints it kept."""
    result: Result
    run_id: str
    stage_files: list[Path] = field(default_factory=list)


def train(recipe: Recipe, stores: Stores, name: str, experiment: str = "harness-train",
          save_stages: bool = False, progress: bool = False) -> TrainRun:
    """`harness train`: check the inputs, then fine-tune once as a run named `name`;
    `save_stages` keeps the model after every stage (workspace and MLflow artifacts)."""
    ws = stores.workspace
    check_inputs(recipe, ws)
    with Tracking(stores.tracking_uri, ws).run(experiment, name, tags={"harness.kind": "train"}) as tracker:
        plan = StagePlan(on_stage=saver(ws, recipe, tracker)) if save_stages else None
        result = tracked_fine_tune(recipe, tracker, ws, progress=progress, plan=plan)
    kept = [stage_path(ws, recipe, k) for k in range(1, len(recipe.stages) + 1)] if save_stages else []
    return TrainRun(result, tracker.run_id, [p for p in kept if p.is_file()])


def pretrain(recipe: Recipe, stores: Stores, output: str | Path, force: bool = False,
             progress: bool = False) -> dict:
    """`harness pretrain`: train `recipe` and save its body to `output`; returns the
    checkpoint's metadata. A checkpoint from the same recipe is reused as it is (the recipe's
    hash is in it), so the same pretraining never runs twice."""
    output, digest = Path(output), config_hash(recipe)
    if output.exists():
        meta = read_checkpoint(output).get("meta", {})
        if meta.get("config_hash") == digest:
            return {**meta, "reused": True}
        if not force:
            raise HarnessError(f"{output}: exists from a different pretraining recipe "
                               f"(use --force to overwrite, or another --output)")
    ws = stores.workspace
    check_inputs(recipe, ws)
    with Tracking(stores.tracking_uri, ws).run("harness-pretrain", f"pretrain-{output.stem}",
                                               tags={"harness.kind": "pretrain"}) as tracker:
        result = tracked_fine_tune(recipe, tracker, ws, progress=progress)
        if not result.ok:
            raise HarnessError(f"pretraining {result.status}; lower the learning rate")
        meta = {"arch": recipe.model.arch, "source_classes": result.class_names,
                "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                "config_hash": digest, "recipe": recipe.to_yaml(), "mlflow_run_id": tracker.run_id,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        save_checkpoint(result.model, output, meta)
        tracker.log_params({"checkpoint": str(output)})
    return {**meta, "reused": False}


def lr_find(recipe: Recipe, stores: Stores, plot: str | Path, stage: int | str = 1,
            experiment: str = "harness-lr-find") -> list[LRFindResult]:
    """`harness lr-find [--stage K|all]`: the range test on each chosen stage, logged as one
    MLflow run, with the plot saved (--stage all: every stage side by side). The stages
    before them are loaded or trained first, so a failure there records nothing."""
    from harness.report import lr_find_figure, lr_find_stages_figure

    ws = stores.workspace
    stages = chosen_stages(recipe, stage)
    check_inputs(recipe, ws)
    before = states_after(recipe, [k - 1 for k in stages], ws)
    with Tracking(stores.tracking_uri, ws).run(experiment, "lr-find", tags={"harness.kind": "lr-find",
                                                                          "lr_find.stages": stage}) as tracker:
        tracker.log_text(recipe.to_yaml(), "recipe.yaml")
        results = [range_test(recipe, k, before[k - 1], RangeTest(), ws) for k in stages]
        if len(results) == 1:
            log_lr_find(tracker, results[0])
        else:
            for r in results:
                log_lr_find(tracker, r, f"stage{r.stage}/")
            tracker.log_figure(lr_find_stages_figure(results), "lr_find_stages.png")
    plot = Path(plot)
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig = lr_find_figure(results[0]) if len(results) == 1 else lr_find_stages_figure(results)
    fig.savefig(plot, dpi=110)
    return results


def log_lr_find(tracker: Any, result: LRFindResult, scope: str = "") -> None:
    """A range test's curves "lr_find/lr", "lr_find/loss" (smoothed), "lr_find/raw_loss" per
    step, its suggestions as params "suggestion.<name>", and (unscoped) the plot
    "lr_find.png"; `scope` ('stage2/') keeps stages apart."""
    import math

    from harness.report import lr_find_figure

    # only the finite prefix: a metric store need not accept NaN or inf
    n = next((k for k, v in enumerate(result.losses) if not math.isfinite(v)), len(result.losses))
    tracker.log_steps(0, {f"lr_find/{scope}lr": result.lrs[:n], f"lr_find/{scope}loss": result.losses[:n],
                          f"lr_find/{scope}raw_loss": result.raw_losses[:n]})
    p = scope.replace("/", ".")
    params: dict[str, Any] = {f"{p}suggestion.{k}": v for k, v in result.suggestions.items()}
    params[f"lr_find.{p}stopped_early"] = result.stopped_early
    if not scope:
        params["lr_find.stage"] = result.stage
    if result.start:
        params[f"lr_find.{p}start"] = result.start
    tracker.log_params(params)
    if not scope:
        tracker.log_figure(lr_find_figure(result), "lr_find.png")
