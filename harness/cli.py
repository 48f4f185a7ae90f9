"""The command line: parses arguments and calls functions in harness/. No logic lives here."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from harness.errors import HarnessError


def _fail_cleanly(fn):
    """Turn a HarnessError into one line on stderr and exit code 2 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HarnessError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def _workspace(path: str) -> Path:
    ws = Path(path)
    try:
        ws.mkdir(parents=True, exist_ok=True)
        probe = ws / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise HarnessError(f"--workspace: cannot write to {ws} ({e.strerror or e.__class__.__name__})") from None
    return ws


workspace_opt = click.option("--workspace", default="workspace", show_default=True,
                             help="Folder for caches, checkpoints, mlflow.db and artifacts.")
tracking_opt = click.option("--tracking-uri", default=None,
                            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the workspace's SQLite).")
device_opt = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                          help="Override the recipe's device.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """finetune-harness: compare fine-tuning strategies for pretrained vision models."""


@main.command()
@click.argument("recipe_path", metavar="RECIPE.yaml")
@workspace_opt
@tracking_opt
@device_opt
@click.option("--experiment", default="harness-train", show_default=True, help="MLflow experiment name.")
@_fail_cleanly
def train(recipe_path, workspace, tracking_uri, device, experiment):
    """Fine-tune once as RECIPE.yaml says, logging the run to MLflow."""
    from harness.recipe import Recipe
    from harness.report import summary_table
    from harness.tracking import default_tracking_uri, mlflow_run, tracked_fine_tune

    recipe = Recipe.from_yaml(recipe_path)
    if device:
        recipe = recipe.replace(device=device)
    ws = _workspace(workspace)
    uri = default_tracking_uri(ws, tracking_uri)
    with mlflow_run(uri, experiment, Path(recipe_path).stem, ws,
                    tags={"harness.kind": "train"}) as tracker:
        result = tracked_fine_tune(recipe, tracker, ws, progress=True)
    click.echo(summary_table(result))
    click.echo(f"mlflow run {tracker.run_id} in experiment '{experiment}' ({uri})")
    if not result.ok:
        sys.exit(1)


@main.command()
@click.argument("recipe_path", metavar="RECIPE.yaml")
@click.option("-o", "--output", default=None,
              help="Checkpoint path (default: WORKSPACE/checkpoints/<recipe name>.pt).")
@click.option("--force", is_flag=True, help="Overwrite a checkpoint made from another recipe.")
@workspace_opt
@tracking_opt
@device_opt
@_fail_cleanly
def pretrain(recipe_path, output, force, workspace, tracking_uri, device):
    """Pretrain a backbone as RECIPE.yaml says and save it (skipped if already done)."""
    from harness.pretrain import pretrain as run_pretrain
    from harness.recipe import Recipe

    recipe = Recipe.from_yaml(recipe_path)
    if device:
        recipe = recipe.replace(device=device)
    ws = _workspace(workspace)
    out = Path(output) if output else ws / "checkpoints" / f"{Path(recipe_path).stem}.pt"
    meta = run_pretrain(recipe, out, ws, tracking_uri, force=force, progress=True)
    verb = "reused" if meta["reused"] else "saved"
    click.echo(f"{verb} {out}: {meta['arch']} pretrained on {', '.join(meta['source_classes'])}; "
               f"val accuracy {meta['val_accuracy']:.4f}, test accuracy {meta['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
