"""MLflow, all of it: the tracker that logs one run, and every way a run starts and ends.

Runs are addressed by id through `MlflowClient` (never the thread-local active run), so
workers and threads log children under a parent they were handed. Every change of a run's
state is a method of `Tracking`: start (a run, or a child of a parent), reopen, finish,
fail, kill, abandon (a sweep's parent left early) and lose (a trial whose worker died).
Metric batches go through one background thread so the training loop never waits on the store.
"""
from __future__ import annotations

import errno
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness.errors import HarnessError, reason, redact

BATCH = 1000        # MLflow's limit of metrics per log_batch request
PARAM_BATCH = 100   # ... and of params
# MLflow 3's experiment kind: every harness experiment is model training, not GenAI
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}
TRAIN_EXPERIMENT = "harness-train"   # `harness train`'s experiment


@dataclass(frozen=True)
class RunEnd:
    """How a run ends: FINISHED, FAILED or KILLED, with the reason (tag `harness.reason`)."""
    status: str = "FINISHED"
    reason: str | None = None


class MlflowTracker:
    """Logs one run's metrics, params and artifacts; metric batches go through one
    background thread so the training loop never waits on the store."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.end = RunEnd()    # how `Tracking.run` ends the run; the body may decide otherwise
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-log")
        self._pending: list[Future] = []

    def end_as(self, status: str, reason: str) -> None:
        """End the run FAILED or KILLED with `reason` (a diverged fine-tune, a pruned trial)."""
        self.end = RunEnd(status, reason)

    # --- the Tracker protocol used by fine_tune ------------------------------------------
    def log_steps(self, first_step: int, series: dict[str, list[float]]) -> None:
        """Every value of every series at its step (first_step, first_step + 1, ...). The
        Metric records are made on the logging thread: on the training thread this is a copy
        of the lists (a caller may reuse them) and a hand-over."""
        ts = int(time.time() * 1000)
        copied = {key: list(values) for key, values in series.items()}
        self._pending.append(self._pool.submit(self._log_series, first_step, copied, ts))

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

    def log_model(self, model, name: str) -> str:
        """Log a PyTorch model (pickled whole: load it with `mlflow.pytorch.load_model(uri)`
        where finetune-harness is installed); its `models:/` URI is also the run's tag
        `<name>_uri`. No requirement inference: it would import the model in a subprocess."""
        import logging
        import warnings

        import mlflow
        import mlflow.pytorch
        import torch
        # mlflow's fluent API (log_model's) also writes MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID
        # into the environment, where Stores and child workers would read them: put them back
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
        log = logging.getLogger("mlflow.pytorch")   # its pickle warning: the docstring says it
        level = log.level
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            log.setLevel(logging.ERROR)
            try:
                mlflow.set_tracking_uri(self.client.tracking_uri)
                # the model's own record (a LoggedModel) goes to the active experiment: the run's
                mlflow.set_experiment(experiment_id=self.client.get_run(self.run_id).info.experiment_id)
                info = mlflow.pytorch.log_model(model.eval(), name=name, run_id=self.run_id,
                                                serialization_format="pickle",
                                                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                                  "finetune-harness"])
            finally:
                log.setLevel(level)
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        self.set_tags({f"{name}_uri": info.model_uri})
        return info.model_uri

    def _log_series(self, first_step: int, series: dict[str, list[float]], ts: int) -> None:
        """On the logging thread: log_steps' records, in batches of at most BATCH; a failed
        batch does not keep the others from the store (the first failure is raised at flush)."""
        from mlflow.entities import Metric
        metrics = [Metric(key, float(v), ts, first_step + i)
                   for key, values in series.items() for i, v in enumerate(values)]
        failure = None
        for i in range(0, len(metrics), BATCH):
            try:
                self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])
            except Exception as e:
                failure = failure or e
        if failure is not None:
            raise failure

    def _send(self, metrics: list) -> None:
        for i in range(0, len(metrics), BATCH):
            chunk = metrics[i:i + BATCH]
            self._pending.append(self._pool.submit(self.client.log_batch, self.run_id, metrics=chunk))


def make_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except Exception as e:
        raise HarnessError(f"tracking URI {redact(tracking_uri)}: cannot open ({reason(e)})") from None


class Tracking:
    """One tracking store: its URI, and the workspace where a local (SQLite) store keeps the
    runs' artifacts (WORKSPACE/artifacts; a server chooses its own)."""

    def __init__(self, uri: str, workspace: str | Path):
        self.uri, self.workspace = uri, Path(workspace)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.uri)
        return self._client

    @property
    def artifact_root(self) -> Path | None:
        return self.workspace / "artifacts" if self.uri.startswith("sqlite:") else None

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created (with artifacts under the artifact root) if missing.
        Every experiment the harness opens carries EXPERIMENT_TAGS: one made before them
        gets them now."""
        client, root = self.client, self.artifact_root
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            self._tag_experiment(exp)
            return exp.experiment_id
        location = (root / name).resolve().as_uri() if root else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=dict(EXPERIMENT_TAGS))
        except Exception:
            # another worker created it between our look-up and create
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            self._tag_experiment(exp)
            return exp.experiment_id

    def _tag_experiment(self, exp) -> None:
        for key, value in EXPERIMENT_TAGS.items():
            if key not in exp.tags:
                try:
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
                except Exception:
                    pass   # a worker starting at the same time wrote it first; or a read-only store

    def find_experiment(self, name: str) -> str | None:
        """The id of the active experiment named `name`; None if there is none (nothing is
        created)."""
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp is not None and exp.lifecycle_stage == "active" else None

    def harness_experiments(self) -> list[tuple[str, str]]:
        """(id, name) of every active experiment the harness made or opened (it carries the
        tag `harness.study` or `mlflow.experimentKind`; or it is `harness-train`), by id."""
        from mlflow.entities import ViewType
        exps = self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
        mine = [e for e in exps if "harness.study" in e.tags or EXPERIMENT_KIND in e.tags
                or e.name == TRAIN_EXPERIMENT]
        return sorted(((e.experiment_id, e.name) for e in mine), key=lambda e: (len(e[0]), e[0]))

    def probe(self, experiment: str) -> None:
        """Can we write there? Checked before any other store is touched: the experiment is
        created (or tagged, if it exists), which a read-only or unreachable store refuses."""
        uri = self.uri
        if uri.startswith(("http://", "https://")):
            import urllib.error
            import urllib.request
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
            except urllib.error.HTTPError:
                pass   # it answers: whether it takes writes is checked below
            except Exception as e:
                raise HarnessError(f"tracking URI {redact(uri)}: cannot reach the server ({reason(e)})") from None
        import logging
        client = self.client   # first: importing mlflow sets its loggers' levels
        log = logging.getLogger("mlflow")
        level, log.level = log.level, logging.CRITICAL   # a refused write is logged with a traceback
        try:
            for attempt in range(3):
                try:
                    client.set_experiment_tag(self.experiment_id(experiment), "harness.study", experiment)
                    return
                except Exception as e:
                    # workers starting together write the same new tag: all but one insert
                    # collide once (the store's upsert is a read, then an insert); try again
                    if attempt == 2:
                        raise HarnessError(f"tracking URI {redact(uri)}: cannot write ({reason(e)})") from None
                    time.sleep(0.2 + random.random() * 0.3)
        finally:
            log.setLevel(level)

    # --- a run's life ----------------------------------------------------------------------
    def start(self, experiment: str, run_name: str, parent_id: str | None = None,
              tags: dict | None = None) -> str:
        """A new RUNNING run (a child of `parent_id` when given): its id."""
        try:
            exp_id = self.experiment_id(experiment)
            all_tags = {k: str(v) for k, v in (tags or {}).items()}   # a server takes strings only
            if parent_id:
                all_tags["mlflow.parentRunId"] = parent_id
            return self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        except HarnessError:
            raise
        except Exception as e:
            raise HarnessError(f"tracking URI {redact(self.uri)}: cannot create a run ({reason(e)})") from None

    def status(self, run_id: str | None) -> str | None:
        """The run's status; None when there is no such run (any other error is raised)."""
        from mlflow.exceptions import MlflowException
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id).info.status
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def reopen(self, run_id: str) -> None:
        """A resumed sweep's parent runs again."""
        self.client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, end: RunEnd) -> None:
        if end.reason:
            self.client.set_tag(run_id, "harness.reason", end.reason)
        self.client.set_terminated(run_id, status=end.status)

    def finish(self, run_id: str) -> None:
        self.end(run_id, RunEnd())

    def fail(self, run_id: str, why: str) -> None:
        self.end(run_id, RunEnd("FAILED", why))

    def kill(self, run_id: str, why: str) -> None:
        self.end(run_id, RunEnd("KILLED", why))

    def abandon(self, run_id: str, interrupted: bool, why: str) -> None:
        """A sweep's parent left with no trial running: KILLED (Ctrl-C) or FAILED, so the UI
        shows no sweep as running that is not. Only a RUNNING run is touched."""
        if self.status(run_id) == "RUNNING":
            (self.kill if interrupted else self.fail)(run_id, why)

    def lose(self, run_id: str | None, why: str) -> None:
        """A lost trial's run ends FAILED with `lost: <why>`. A FINISHED one too: its worker
        died after closing the run but before Optuna recorded the value, so the study has no
        result from it and runs it again. The store may be down: the trial is re-run anyway."""
        try:
            if run_id and self.status(run_id) in ("RUNNING", "FINISHED"):
                self.fail(run_id, f"lost: {why}")
        except Exception:
            pass

    def tracker(self, run_id: str) -> MlflowTracker:
        """A tracker logging to an existing run (close it when done)."""
        return MlflowTracker(self.client, run_id)

    @contextmanager
    def run(self, experiment: str, run_name: str, parent_id: str | None = None,
            tags: dict | None = None) -> Iterator[MlflowTracker]:
        """Start a run and always end it: as `tracker.end` says (FINISHED unless the body
        decided otherwise), FAILED on an error, KILLED on Ctrl-C."""
        tracker = self.tracker(self.start(experiment, run_name, parent_id, tags))
        try:
            yield tracker
        except KeyboardInterrupt:
            tracker.end = RunEnd("KILLED", "interrupted")
            raise
        except BaseException as e:
            end = tracker.end
            tracker.end = RunEnd("KILLED" if end.status == "KILLED" else "FAILED",
                                 end.reason or f"{e.__class__.__name__}: {e}"[:500])
            raise
        finally:
            try:
                tracker.close()
            finally:
                self.end(tracker.run_id, tracker.end)
