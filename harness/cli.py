"""The command line: parses arguments and calls functions in harness/. No logic lives here."""
from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path

import click

from harness.errors import HarnessError, lost_store
from harness.workspace import HEARTBEAT_S


def _fail_cleanly(fn):
    """Turn a HarnessError, a full disk or a store lost mid-run into one line on stderr and
    exit code 2 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HarnessError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            from harness import interrupts
            click.echo("interrupted", err=True)
            sys.exit(128 + (interrupts.received() or 2))   # 130 for Ctrl-C, 143 for SIGTERM
        except Exception as e:
            # the stores stay consistent: the trial that was running is failed and re-run on resume
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                click.echo(f"error: no space left on the device holding {e.filename or 'an output file'}: free some "
                           "space, then run the same command again to resume", err=True)
            elif cause := lost_store(e):
                click.echo(f"error: a store stopped answering in the middle of the run ({cause}): once it is "
                           "back, run the same command again to resume", err=True)
            else:
                raise
            sys.exit(2)
    return wrapper


def _next(stores, *steps: tuple[str, str]) -> None:
    """What to run next, as the user would type it: the program as they called it, their
    --workspace kept."""
    typed = sys.argv[0] if sys.argv else ""
    prog = typed if Path(typed).name == "harness" else "python -m harness" if typed.endswith("__main__.py") \
        else "harness"
    ws = "" if stores.workspace == Path("workspace") else f" --workspace {stores.workspace}"
    for command, why in steps:
        click.echo(f"next: {prog} {command}{ws}   # {why}")


def _recipe(path: str, device: str | None):
    """The recipe at `path`, with --device applied when given."""
    from harness.engine.recipe import Recipe
    recipe = Recipe.from_yaml(path)
    return recipe.replace(device=device) if device else recipe


def store_options(heartbeat: bool = False):
    """--workspace, --storage, --tracking-uri (and, for the commands that run trials,
    --heartbeat) on a command, resolved once into its `stores` argument (harness/workspace.py).
    Every command takes them all; a command ignores the stores it does not use."""
    def decorate(fn):
        @functools.wraps(fn)
        def command(*args, workspace, storage, tracking_uri, **kwargs):
            from harness.workspace import Stores
            beat = {"heartbeat": kwargs.pop("heartbeat")} if heartbeat else {}
            return fn(*args, stores=Stores.resolve(workspace, storage, tracking_uri, **beat), **kwargs)
        for option in reversed([workspace_opt, storage_opt, tracking_opt] + ([heartbeat_opt] if heartbeat else [])):
            command = option(command)
        return command
    return decorate


workspace_opt = click.option("--workspace", default="workspace", show_default=True,
                             help="Folder for caches, checkpoints, mlflow.db, optuna.journal and artifacts.")
storage_opt = click.option("--storage", default=None,
                           help="Optuna storage: a journal file, sqlite:///FILE (one worker) or postgresql://... "
                                "(default: HARNESS_STORAGE, else WORKSPACE/optuna.journal). Put a password in "
                                "HARNESS_STORAGE or ~/.pgpass, not on the command line.")
tracking_opt = click.option("--tracking-uri", default=None,
                            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the workspace's SQLite).")
heartbeat_opt = click.option("--heartbeat", type=click.IntRange(min=1), default=HEARTBEAT_S, show_default=True,
                             envvar="HARNESS_HEARTBEAT",
                             help="PostgreSQL: seconds between a trial's heartbeats; a trial silent for twice "
                                  "this is failed and run again.")
device_opt = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                          help="Override the recipe's device.")


class _OneLineErrors(click.Group):
    """click's own usage errors (a bad option value, an unknown option) as one line too."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """finetune-harness: compare fine-tuning strategies for pretrained vision models."""
    import logging
    import os
    # MLflow and alembic announce database creation at INFO on stderr; errors stay one line
    # (mlflow sets its level from this variable when it is imported, so set it first)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # nor a "View run at" link for every run closed on a tracking server
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # nor Optuna's trial-by-trial log: the sweep prints its own line per trial
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # the commands write pictures to files and MLflow, never to a screen: the library leaves
    # the backend alone (a notebook keeps its inline plots), the command line picks Agg
    import matplotlib
    matplotlib.use("Agg")
    _one_line_thread_errors()


def _one_line_thread_errors() -> None:
    """A background thread (Optuna's heartbeat) that loses its store says so in one line;
    the main thread, which loses it too, ends the command with the error."""
    import threading
    default = threading.excepthook

    def hook(args) -> None:
        cause = lost_store(args.exc_value) if args.exc_value is not None else None
        if cause is None:
            return default(args)
        name = args.thread.name if args.thread else "a background thread"
        click.echo(f"warning: {'the trial heartbeat' if 'heartbeat' in name else name} stopped ({cause})", err=True)
    threading.excepthook = hook


@main.command()
@click.argument("recipe_path", metavar="RECIPE.yaml")
@store_options()
@device_opt
@click.option("--experiment", default="harness-train", show_default=True, help="MLflow experiment name.")
@click.option("--save-stages", is_flag=True,
              help="Keep the model after every stage (WORKSPACE/checkpoints/stages/, and as MLflow artifacts): "
                   "`harness lr-find --stage K` starts from it.")
@_fail_cleanly
def train(recipe_path, stores, device, experiment, save_stages):
    """Fine-tune once as RECIPE.yaml says, logging the run to MLflow."""
    from harness import jobs
    from harness.report import summary_table

    recipe = _recipe(recipe_path, device)
    run = jobs.train(recipe, stores.ready(), Path(recipe_path).stem, experiment, save_stages, progress=True)
    click.echo(summary_table(run.result))
    for k, path in enumerate(run.stage_files, start=1):
        click.echo(f"stage {k} checkpoint: {path}")
    click.echo(f"mlflow run {run.run_id} in experiment '{experiment}' ({stores.tracking_uri})")
    if not run.result.ok:
        sys.exit(1)


@main.command()
@click.argument("recipe_path", metavar="RECIPE.yaml")
@click.option("-o", "--output", default=None,
              help="Checkpoint path (default: WORKSPACE/checkpoints/<recipe name>.pt).")
@click.option("--force", is_flag=True, help="Overwrite a checkpoint made from another recipe.")
@store_options()
@device_opt
@_fail_cleanly
def pretrain(recipe_path, output, force, stores, device):
    """Pretrain a backbone as RECIPE.yaml says and save it (skipped if already done)."""
    from harness import jobs

    recipe = _recipe(recipe_path, device)
    stores.ready()
    out = Path(output) if output else stores.checkpoint(Path(recipe_path).stem)
    meta = jobs.pretrain(recipe, stores, out, force=force, progress=True)
    verb = "reused" if meta["reused"] else "saved"
    click.echo(f"{verb} {out}: {meta['arch']} pretrained on {', '.join(meta['source_classes'])}; "
               f"val accuracy {meta['val_accuracy']:.4f}, test accuracy {meta['test_accuracy']:.4f}")


strategy_opt = click.option("--strategy", "strategies", multiple=True,
                            help="Only this strategy (repeatable; default all).")
trials_opt = click.option("--trials", type=click.IntRange(min=1), default=None,
                          help="Trials per strategy (overrides the study).")


def _interruptible() -> None:
    """First Ctrl-C or SIGTERM: stop the running trial cleanly; second: exit at once."""
    from harness import interrupts
    interrupts.install(lambda s: click.echo(s, err=True))


@main.command()
@click.argument("study_path", metavar="STUDY.yaml")
@strategy_opt
@trials_opt
@click.option("--lr-find", "use_lr_find", is_flag=True,
              help="Centre each strategy's first trial on the LR finder's suggestion.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes on this machine (default: one per GPU, or 1 on a CPU).")
@click.option("--workers-per-gpu", type=click.IntRange(min=1), default=None,
              help="Workers sharing each GPU (--engine local; default 1).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Who starts the workers: this machine's processes, or Ray tasks on a Ray cluster.")
@click.option("--address", default=None,
              help="--engine ray: the cluster (HOST:PORT, ray://HOST:PORT or auto; default RAY_ADDRESS, "
                   "else a local Ray started for this sweep).")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=None,
              help="--engine ray: GPUs per worker, fractions pack workers on a GPU (default: 1 where the "
                   "cluster has GPUs, else 0).")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--engine ray: CPUs per worker (default 1).")
@store_options(heartbeat=True)
@_fail_cleanly
def sweep(study_path, strategies, trials, use_lr_find, workers, workers_per_gpu, engine, address,
          gpus_per_trial, cpus_per_trial, stores):
    """Run (or resume) an Optuna study per strategy; every trial is a tracked fine-tune."""
    from harness.results import format_status, status_rows
    from harness.sweep.study import load_study
    from harness.sweep.run import run_sweep

    launch = _launch(engine, workers, workers_per_gpu, address, gpus_per_trial, cpus_per_trial)
    study = load_study(study_path)
    selection = study.select(strategies, trials)
    stores.ready()
    _interruptible()
    centre = None
    if use_lr_find:
        from harness.sweep.centre import centred_first_trials
        centre = centred_first_trials(study, stores.workspace, list(selection.strategies), echo=click.echo)
    run_sweep(study, stores, selection, launch, centre=centre, echo=click.echo)
    click.echo(format_status(study, status_rows(study, stores), trials))
    _next(stores, (f"compare {study_path}", "each strategy's best recipe over seeds, on the test split"),
          (f"ui {study_path}", "every trial's curves in the MLflow UI"))


def _launch(engine, workers, workers_per_gpu, address, gpus_per_trial, cpus_per_trial):
    """The sweep's launcher options, or one line naming an option that belongs to the other engine."""
    from harness.errors import HarnessError
    from harness.sweep.launch import Launch
    from harness.sweep.ray_engine import RayLaunch
    if engine == "local":
        given = [n for n, v in (("--address", address), ("--gpus-per-trial", gpus_per_trial),
                                ("--cpus-per-trial", cpus_per_trial)) if v is not None]
        if given:
            raise HarnessError(f"{given[0]}: only with --engine ray")
        return Launch(workers, workers_per_gpu or 1)
    if workers_per_gpu is not None:
        raise HarnessError("--workers-per-gpu: only with --engine local (with Ray, --gpus-per-trial 0.5 "
                           "packs two workers on a GPU)")
    import os
    return RayLaunch(address or os.environ.get("RAY_ADDRESS") or None, workers, gpus_per_trial,
                     cpus_per_trial if cpus_per_trial is not None else 1.0)


@main.command()
@click.argument("study_path", metavar="STUDY.yaml")
@strategy_opt
@trials_opt
@click.option("--name", default="", help="A name for this worker's output lines and MLflow runs.")
@click.option("--seed-offset", type=int, default=None, hidden=True)
@store_options(heartbeat=True)
@_fail_cleanly
def worker(study_path, strategies, trials, name, seed_offset, stores):
    """Join the study's sweep and run trials until every strategy has its trials.

    What every machine of a distributed sweep runs, with --storage postgresql://... (or
    HARNESS_STORAGE) and --tracking-uri http://... (or MLFLOW_TRACKING_URI)."""
    from harness.sweep.study import load_study
    from harness.sweep.run import check_stores
    from harness.sweep.worker import Worker

    study = load_study(study_path)
    selection = study.select(strategies, trials)
    stores.ready()
    _interruptible()
    check_stores(study, stores, selection, workers=2)
    from harness.sweep.connections import warn_if_short
    warn_if_short(stores.storage, 1, stores.tracking_uri)   # this one worker; the others check for themselves
    # no --seed-offset (a worker started by hand, a pod, a Ray task): seeds from its random token
    w = Worker(study, stores, selection, name=name, seed_offset=seed_offset, echo=click.echo)
    w.prepare()
    w.run()
    click.echo(f"{name or 'worker'}: every strategy has its {selection.trials} trials")


@main.command()
@click.argument("study_path", metavar="STUDY.yaml")
@store_options()
@_fail_cleanly
def status(study_path, stores):
    """Trials done / pruned / failed / running and the best point of each strategy."""
    from harness.results import format_status, status_rows
    from harness.sweep.study import load_study

    study = load_study(study_path)
    click.echo(format_status(study, status_rows(study, stores)))


@main.command()
@click.argument("study_path", metavar="STUDY.yaml")
@click.option("--strategy", default=None, help="Export this strategy's best (default: the best strategy).")
@click.option("-o", "--output", default=None, help="Recipe file to write (default: WORKSPACE/exports/<study>-<strategy>.yaml).")
@store_options()
@_fail_cleanly
def export(study_path, strategy, output, stores):
    """Write the best trial's complete recipe; `harness train` replays it."""
    from harness.results import export_best
    from harness.sweep.study import load_study

    study = load_study(study_path)
    path, strat, trial = export_best(study, stores, strategy, output)
    click.echo(f"wrote {path}: {strat} trial {trial.number}, {study.config.metric} {trial.value:.4f}")
    _next(stores, (f"train {path}", "replays this recipe and scores it on the test split"))


class _SeedsType(click.ParamType):
    """--seeds: a number of seeds (1 or more), or `auto`."""
    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)
        if n < 1:
            self.fail(f"{n} is below 1", param, ctx)
        return n


@main.command()
@click.argument("study_path", metavar="STUDY.yaml")
@click.option("--seeds", type=_SeedsType(), default=None,
              help="Seeds per strategy (default: the study's compare.seeds), or `auto`: add seeds "
                   "until the leading pair is separated, at most compare.max_seeds.")
@store_options()
@_fail_cleanly
def compare(study_path, seeds, stores):
    """Score each strategy's best recipe over K seeds on the held-out test split (and under
    the study's shifts); test every pair; log the winner as an MLflow model."""
    from harness.compare import compare as run_compare
    from harness.compare import comparison_table, markdown_table, plan_compare, save_comparison
    from harness.sweep.study import load_study

    study = load_study(study_path)
    plan = plan_compare(study, seeds)     # a bad --seeds or shift: one line, nothing written
    cmp = run_compare(study, stores.ready(), plan, echo=click.echo)
    out = save_comparison(study, cmp, stores)
    click.echo(markdown_table(comparison_table(cmp)))
    click.echo(cmp.verdict())
    wise = ", compare_wise_ft.csv" if plan.wise_ft else ""
    click.echo(f"saved {out}/compare.csv, compare_pairs.csv{wise}, compare.md, compare.png")
    _next(stores, (f"export {study_path}", "the winner's recipe as YAML, to replay with train"),
          (f"ui {study_path}", "the runs, and the compare run with its pictures, in the MLflow UI"))


@main.command()
@click.argument("recipe_path", metavar="RECIPE.yaml")
@store_options()
@_fail_cleanly
def groups(recipe_path, stores):
    """Print the model's layer groups: name, parameter count, modules (a study file: its recipe)."""
    from harness.engine.train import layer_groups
    from harness.report import groups_table

    click.echo(groups_table(layer_groups(_recipe_or_study_base(recipe_path), stores.ready().workspace)))


def _recipe_or_study_base(path: str):
    from harness.engine.recipe import Recipe, read_yaml
    if "strategies" in read_yaml(path):   # a study: its base recipe, with a placeholder stage
        from harness.sweep.study import load_study
        study = load_study(path)
        return Recipe.from_dict({**study.base, "stages": [{"epochs": 1, "lr": 1e-3}]}, source=path)
    return Recipe.from_yaml(path)


@main.command("lr-find")
@click.argument("recipe_path", metavar="RECIPE.yaml")
@click.option("--stage", default="1", show_default=True,
              help="The stage to test, counted from 1 (the stages before it are loaded from a "
                   "`train --save-stages` checkpoint, or trained), or 'all': every stage in one picture.")
@click.option("-o", "--output", default=None,
              help="PNG plot path (default: WORKSPACE/reports/lr_find-<recipe>[-stageK|-stages].png).")
@store_options()
@device_opt
@_fail_cleanly
def lr_find_cmd(recipe_path, stage, output, stores, device):
    """fastai's LR range test on a stage of the recipe: plot and suggestions."""
    from harness import jobs
    from harness.engine.lr_find import chosen_stages

    recipe = _recipe(recipe_path, device)
    stages = chosen_stages(recipe, stage)   # a bad --stage is refused before anything is written
    which = "all" if stage == "all" else stages[0]
    stores.ready()
    out = Path(output) if output else stores.lr_find_plot(Path(recipe_path).stem, which)
    for r in jobs.lr_find(recipe, stores, out, stage=which):
        origin = {"": "", "trained": ", the stages before it trained first"}.get(r.start, f", from {r.start}")
        click.echo(f"stage {r.stage} (trains {r.train}{origin}):")
        for name, value in r.suggestions.items():
            click.echo(f"{name:>8}: {value:.3g}")
    click.echo(f"plot: {out}")


@main.command()
@click.argument("study_path", metavar="[STUDY.yaml]", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it to the network).")
@click.option("--port", type=int, default=5000, show_default=True)
@store_options()
@_fail_cleanly
def ui(study_path, host, port, stores):
    """The MLflow UI on the workspace's tracking store; prints the URL of the study's
    experiment (without STUDY.yaml: of every harness experiment) in the "Model training" view."""
    from harness.ui import serve_ui

    study = None
    if study_path is not None:
        from harness.sweep.study import load_study
        study = load_study(study_path).name    # a bad study file: one line, no server started
    serve_ui(stores.tracking_uri, host, port, study=study, workspace=stores.workspace)


if __name__ == "__main__":
    main()
