"""Pretrain a backbone on a source dataset and save it as a checkpoint to fine-tune from.

This is how the built-in default gets a pretrained body where nothing can be downloaded:
train on five Fashion-MNIST classes, fine-tune on the other five. A checkpoint records the
hash of the recipe that made it, so the same pretraining is never run twice.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

from harness.errors import HarnessError
from harness.engine.models import read_checkpoint, save_checkpoint
from harness.engine.recipe import Recipe


def config_hash(recipe: Recipe) -> str:
    # device does not change what is learned enough to retrain for it
    return hashlib.sha256(recipe.replace(device="auto").to_yaml().encode()).hexdigest()[:16]


def pretrain(recipe: Recipe, output: str | Path, workspace: str | Path = "workspace",
             tracking_uri: str | None = None, force: bool = False, progress: bool = False) -> dict:
    """Train `recipe` and save its body to `output`; returns the checkpoint's metadata.
    An existing checkpoint from the same recipe is reused as it is."""
    from harness.tracking import default_tracking_uri, mlflow_run, tracked_fine_tune
    from harness.engine.train import check_inputs

    output, digest = Path(output), config_hash(recipe)
    if output.exists():
        meta = read_checkpoint(output).get("meta", {})
        if meta.get("config_hash") == digest:
            return {**meta, "reused": True}
        if not force:
            raise HarnessError(f"{output}: exists from a different pretraining recipe "
                               f"(use --force to overwrite, or another --output)")
    check_inputs(recipe, workspace)
    uri = default_tracking_uri(workspace, tracking_uri)
    with mlflow_run(uri, "harness-pretrain", f"pretrain-{output.stem}", workspace,
                    tags={"harness.kind": "pretrain"}) as tracker:
        result = tracked_fine_tune(recipe, tracker, workspace, progress=progress)
        if not result.ok:
            raise HarnessError(f"pretraining {result.status}; lower the learning rate")
        meta = {"arch": recipe.model.arch, "source_classes": result.class_names,
                "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                "config_hash": digest, "recipe": recipe.to_yaml(), "mlflow_run_id": tracker.run_id,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        save_checkpoint(result.model, output, meta)
        tracker.log_params({"checkpoint": str(output)})
    return {**meta, "reused": False}
