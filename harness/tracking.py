"""MLflow tracking: one run per fine-tune, metrics sent in batches off the training thread.

The tracker talks to `MlflowClient` with explicit run ids (never the thread-local active
run), so workers and threads can log children under a parent they were handed.
"""
from __future__ import annotations

import errno
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from harness.errors import HarnessError, reason, redact

BATCH = 1000        # MLflow's limit of metrics per log_batch request
PARAM_BATCH = 100   # ... and of params


def store_url(workspace: str | Path, explicit: str | None, env_var: str, filename: str) -> str:
    """A store's URL: the option given, else the environment variable, else a SQLite file
    in the workspace (nothing to start on one machine)."""
    if explicit:
        return explicit
    if os.environ.get(env_var):
        return os.environ[env_var]
    return f"sqlite:///{Path(workspace).resolve() / filename}"


def default_tracking_uri(workspace: str | Path, explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the workspace's mlflow.db."""
    return store_url(workspace, explicit, "MLFLOW_TRACKING_URI", "mlflow.db")


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}, 'l': [x, y]} -> {'a.b': '1', 'l.0': ...}; lists of scalars stay whole."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = str(d)
    return out


class MlflowTracker:
    """Logs one run's metrics, params and artifacts; metric batches go through one
    background thread so the training loop never waits on the store."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-log")
        self._pending: list[Future] = []

    # --- the Tracker protocol used by fine_tune ------------------------------------------
    def log_steps(self, first_step: int, series: dict[str, list[float]]) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        metrics = [Metric(key, float(v), ts, first_step + i)
                   for key, values in series.items() for i, v in enumerate(values)]
        self._send(metrics)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        self._send([Metric(k, float(v), ts, epoch) for k, v in values.items()])

    # --- run-level records -----------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + PARAM_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, name: str) -> None:
        self._artifact(self.client.log_text, text, name)

    def log_figure(self, fig, name: str) -> None:
        self._artifact(self.client.log_figure, fig, name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        self._artifact(self.client.log_artifact, str(path), folder)

    def _artifact(self, log, *args) -> None:
        try:
            log(self.run_id, *args)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or e.filename:
                raise
            # name where it was going: the error the user sees says which disk is full
            where = self.client.get_run(self.run_id).info.artifact_uri.removeprefix("file://")
            raise OSError(e.errno, e.strerror, where) from e

    def flush(self) -> None:
        """Wait for every metric batch sent so far; re-raise the first failure."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def _send(self, metrics: list) -> None:
        for i in range(0, len(metrics), BATCH):
            chunk = metrics[i:i + BATCH]
            self._pending.append(self._pool.submit(self.client.log_batch, self.run_id, metrics=chunk))


def get_experiment_id(client, name: str, artifact_root: Path | None) -> str:
    """The experiment's id, created (with artifacts under `artifact_root`) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (artifact_root / name).resolve().as_uri() if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # another worker created it between our look-up and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def make_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except Exception as e:
        raise HarnessError(f"tracking URI {redact(tracking_uri)}: cannot open ({reason(e)})") from None


def local_artifact_root(tracking_uri: str, workspace: str | Path) -> Path | None:
    """Where a local (SQLite) store's runs keep their artifacts: WORKSPACE/artifacts; None
    for a server, which chooses."""
    return Path(workspace) / "artifacts" if tracking_uri.startswith("sqlite:") else None


def open_run(client, tracking_uri: str, experiment: str, run_name: str, workspace: str | Path,
             parent_run_id: str | None = None, tags: dict | None = None, resume_run_id: str | None = None):
    """Create a run (a child of `parent_run_id` when given), or reopen `resume_run_id`."""
    artifact_root = local_artifact_root(tracking_uri, workspace)
    try:
        if resume_run_id:
            client.update_run(resume_run_id, status="RUNNING")
            return client.get_run(resume_run_id)
        exp_id = get_experiment_id(client, experiment, artifact_root)
        all_tags = {k: str(v) for k, v in (tags or {}).items()}   # a server takes strings only
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        return client.create_run(exp_id, run_name=run_name, tags=all_tags)
    except HarnessError:
        raise
    except Exception as e:
        raise HarnessError(f"tracking URI {redact(tracking_uri)}: cannot create a run ({reason(e)})") from None


def probe_tracking(tracking_uri: str, experiment: str, workspace: str | Path) -> None:
    """Can we write there? Checked before any other store is touched: the experiment is
    created (or tagged, if it exists), which a read-only or unreachable store refuses."""
    if tracking_uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request
        try:
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass   # it answers: whether it takes writes is checked below
        except Exception as e:
            raise HarnessError(f"tracking URI {redact(tracking_uri)}: cannot reach the server ({reason(e)})") from None
    import logging
    client = make_client(tracking_uri)
    artifact_root = local_artifact_root(tracking_uri, workspace)
    log = logging.getLogger("mlflow")
    level, log.level = log.level, logging.CRITICAL   # a refused write is logged with a traceback
    try:
        for attempt in range(3):
            try:
                exp_id = get_experiment_id(client, experiment, artifact_root)
                client.set_experiment_tag(exp_id, "harness.study", experiment)
                return
            except Exception as e:
                # workers starting together write the same new tag: all but one insert
                # collide once (the store's upsert is a read, then an insert); try again
                if attempt == 2:
                    raise HarnessError(f"tracking URI {redact(tracking_uri)}: cannot write ({reason(e)})") from None
                time.sleep(0.2 + random.random() * 0.3)
    finally:
        log.setLevel(level)


@contextmanager
def mlflow_run(tracking_uri: str, experiment: str, run_name: str, workspace: str | Path,
               parent_run_id: str | None = None, tags: dict | None = None,
               resume_run_id: str | None = None) -> Iterator[MlflowTracker]:
    """Open a run (or reopen `resume_run_id`) and always close it: FINISHED, FAILED on an
    error, KILLED on Ctrl-C.

    The body may set `tracker.status` / `tracker.reason` to end the run otherwise
    (a diverged fine-tune ends FAILED with its reason).
    """
    client = make_client(tracking_uri)
    run = open_run(client, tracking_uri, experiment, run_name, workspace, parent_run_id, tags, resume_run_id)
    tracker = MlflowTracker(client, run.info.run_id)
    tracker.status, tracker.reason = "FINISHED", None
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.status, tracker.reason = "KILLED", "interrupted"
        raise
    except BaseException as e:
        tracker.status = tracker.status if tracker.status == "KILLED" else "FAILED"
        tracker.reason = tracker.reason or f"{e.__class__.__name__}: {e}"[:500]
        raise
    finally:
        try:
            tracker.close()
        finally:
            if tracker.reason:
                client.set_tag(run.info.run_id, "harness.reason", tracker.reason)
            client.set_terminated(run.info.run_id, status=tracker.status)


def tracked_fine_tune(recipe, tracker: MlflowTracker, workspace: str | Path = "workspace",
                      report=None, progress: bool = False, extra_params: dict | None = None,
                      evaluate_test: bool = True, *, plan=None):
    """fine_tune with everything a run records: the flattened recipe as params (plus
    `extra_params`), the layer groups tag, the recipe YAML, per-step curves and the LR plot.
    A diverged run ends FAILED with its reason. `plan`: fine_tune's StagePlan."""
    import torch

    from harness.engine.models import group_names
    from harness.report import lr_figure
    from harness.engine.train import fine_tune, resolve_device

    params = flatten(recipe.to_dict())
    params.update(extra_params or {})
    tracker.log_params(params)
    # exact CPU replays need the same torch build and thread count: record them
    tracker.set_tags({"layer_groups": ",".join(group_names(recipe.model.groups)),
                      "runtime.torch": torch.__version__, "runtime.threads": torch.get_num_threads(),
                      "runtime.device": str(resolve_device(recipe.device))})
    tracker.log_text(recipe.to_yaml(), "recipe.yaml")
    result = fine_tune(recipe, tracker, report=report, workspace=workspace, progress=progress,
                       evaluate_test=evaluate_test, plan=plan)
    tracker.set_tags({"harness.status": result.status})
    if result.input_stats is not None:   # what the inputs were normalised with (the weights' own)
        tracker.log_params({"input.mean": list(result.input_stats.mean), "input.std": list(result.input_stats.std)})
    if result.lrs:
        import matplotlib.pyplot as plt
        fig = lr_figure(result)
        tracker.log_figure(fig, "lr_schedule.png")
        plt.close(fig)
    if not result.ok:
        tracker.status, tracker.reason = "FAILED", result.status
    return result
