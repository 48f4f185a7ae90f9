"""Where a command reads and writes: the workspace, the Optuna storage, the MLflow tracking
store, and the default paths of what it writes. Resolved once per command, from its
options, then the environment, then the workspace.

- Optuna: --storage, else HARNESS_STORAGE, else WORKSPACE/optuna.journal (WORKSPACE/optuna.db
  when an older sweep left one and no journal exists). A spec is a URL, or a journal
  file's path (anything without "://"); harness/sweep/storage.py opens it.
- MLflow: --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///WORKSPACE/mlflow.db.
- heartbeat: seconds between a trial's heartbeats on PostgreSQL (--heartbeat, HARNESS_HEARTBEAT).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

JOURNAL = "optuna.journal"
LEGACY_SQLITE = "optuna.db"     # the default before several workers existed
MLFLOW_DB = "mlflow.db"
HEARTBEAT_S = 30                # --heartbeat's default


def optuna_spec(workspace: str | Path, explicit: str | None = None) -> str:
    """--storage, else HARNESS_STORAGE, else the workspace's journal file (its SQLite file
    when an older sweep left one there and no journal exists)."""
    spec = explicit or os.environ.get("HARNESS_STORAGE")
    if spec:
        return spec if "://" in spec else str(Path(spec).resolve())
    ws = Path(workspace).resolve()
    if (ws / LEGACY_SQLITE).exists() and not (ws / JOURNAL).exists():
        return f"sqlite:///{ws / LEGACY_SQLITE}"
    return str(ws / JOURNAL)


def tracking_uri(workspace: str | Path, explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the workspace's mlflow.db (nothing to
    start on one machine)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workspace).resolve() / MLFLOW_DB}"


@dataclass(frozen=True)
class Stores:
    """One command's workspace and stores. `Stores.resolve(...)` reads options and the
    environment; nothing is created until `ready()`."""
    workspace: Path
    storage: str              # the Optuna storage spec
    tracking_uri: str         # the MLflow tracking URI
    heartbeat: int = HEARTBEAT_S

    @classmethod
    def resolve(cls, workspace: str | Path = "workspace", storage: str | None = None,
                tracking: str | None = None, heartbeat: int = HEARTBEAT_S) -> "Stores":
        return cls(Path(workspace), optuna_spec(workspace, storage), tracking_uri(workspace, tracking), heartbeat)

    def ready(self) -> "Stores":
        """The workspace made and writable, or one line naming --workspace."""
        try:
            self.workspace.mkdir(parents=True, exist_ok=True)
            # a probe of its own: workers sharing a workspace (Ray tasks, a Kubernetes volume)
            # start together, and one name would let one remove the file another just made
            with tempfile.TemporaryFile(prefix=".write-test-", dir=self.workspace):
                pass
        except OSError as e:
            raise HarnessError(f"--workspace: cannot write to {self.workspace} "
                               f"({e.strerror or e.__class__.__name__})") from None
        return self

    def env(self) -> dict[str, str]:
        """The stores for a child process: in its environment, never on a command line (`ps`
        would show a password)."""
        return {"HARNESS_STORAGE": self.storage, "MLFLOW_TRACKING_URI": self.tracking_uri}

    # --- default output paths ---------------------------------------------------------------
    def checkpoint(self, name: str) -> Path:
        """A pretrained body: WORKSPACE/checkpoints/<name>.pt."""
        return self.workspace / "checkpoints" / f"{name}.pt"

    def export(self, study: str, strategy: str) -> Path:
        """A study's best recipe: WORKSPACE/exports/<study>-<strategy>.yaml."""
        return self.workspace / "exports" / f"{study}-{strategy}.yaml"

    def kept_models(self, study: str, strategy: str) -> Path:
        """A strategy's best trial's model: WORKSPACE/models/<study>/<strategy>/trial-<n>.pt."""
        return self.workspace / "models" / study / strategy

    def reports(self, study: str) -> Path:
        """A study's comparison: WORKSPACE/reports/<study>/."""
        return self.workspace / "reports" / study

    def lr_find_plot(self, recipe: str, stage: int | str = 1) -> Path:
        """WORKSPACE/reports/lr_find-<recipe>.png; -stageK for stage K > 1, -stages for all."""
        suffix = "-stages" if stage == "all" else ("" if stage == 1 else f"-stage{stage}")
        return self.workspace / "reports" / f"lr_find-{recipe}{suffix}.png"
