"""What a fine-tune passes between the engine's modules: what a run is prepared with
(`Prepared`, built by `train.prepare`), and what it produced (`Result`, its `Outcome` and
`EpochStats`). Kept below train.py and stages.py, which both use them, so that the engine's
imports point one way.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from harness.engine.data import Dataset, Split
from harness.engine.groups import LayerGroups
from harness.engine.input_stats import InputStats
from harness.engine.step import Score


@dataclass
class EpochStats:
    epoch: int                  # 1-based, one axis across all stages
    stage: int                  # 0-based
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    val_balanced_accuracy: float | None = None
    val_macro_f1: float | None = None

    def value(self, metric: str) -> float | None:
        """The epoch's value of a study metric ("val/accuracy", "val/loss", ...)."""
        return getattr(self, metric.replace("/", "_"))


@dataclass(frozen=True)
class Outcome:
    """How a fine-tune ended: ok, diverged at step k, or out of memory at batch size B.
    A divergence or an out-of-memory is a result of the trial (its LR, its batch size), not
    an error: a sweep records it and goes on."""
    kind: str = "ok"                   # ok | diverged | out_of_memory
    step: int | None = None            # diverged: the global step (0-based) where it showed
    batch_size: int | None = None      # out_of_memory
    detail: str = ""                   # diverged: what was non-finite, when not the training loss

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    def __str__(self) -> str:
        if self.kind == "diverged":
            return f"diverged at step {self.step}" + (f" ({self.detail})" if self.detail else "")
        if self.kind == "out_of_memory":
            return f"out of memory at batch size {self.batch_size}"
        return "ok"


@dataclass
class Result:
    """What a fine-tune produced: per-epoch stats, test accuracy, the LR history."""
    group_names: list[str]
    outcome: Outcome = Outcome()
    epochs: list[EpochStats] = field(default_factory=list)
    test_accuracy: float | None = None
    test_score: Score | None = None                          # loss, accuracy and confusion matrix
    lrs: list[list[float]] = field(default_factory=list)     # [step][group], as the optimizer held them
    moms: list[float] = field(default_factory=list)          # [step]
    stage_starts: list[int] = field(default_factory=list)    # global step where each stage began
    n_train: int = 0
    class_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model: LayerGroups | None = field(default=None, repr=False)
    input_stats: InputStats | None = None            # the mean/std the inputs were normalised with

    @property
    def ok(self) -> bool:
        return self.outcome.ok

    @property
    def status(self) -> str:
        """The outcome in words ("ok", "diverged at step 12", ...): the run's tag and reason."""
        return str(self.outcome)

    def history(self) -> dict:
        """What a stage checkpoint keeps of the run so far (a continued run picks it up)."""
        return {"epochs": [asdict(e) for e in self.epochs], "stage_starts": list(self.stage_starts),
                "lrs": torch.tensor(self.lrs, dtype=torch.float64), "moms": torch.tensor(self.moms, dtype=torch.float64)}

    def resume(self, history: dict) -> None:
        """Continue from a stage checkpoint's history (floats kept exactly: float64 tensors)."""
        self.epochs = [EpochStats(**e) for e in history["epochs"]]
        self.stage_starts = list(history["stage_starts"])
        self.lrs, self.moms = history["lrs"].tolist(), history["moms"].tolist()

    @property
    def val_accuracy(self) -> float | None:
        """Val accuracy after the last epoch (the model that is kept)."""
        return self.epochs[-1].val_accuracy if self.epochs else None

    def val_metric(self, metric: str) -> float | None:
        """A study metric ("val/macro_f1", ...) after the last epoch."""
        return self.epochs[-1].value(metric) if self.epochs else None


@dataclass
class Prepared:
    """Everything a loop over training batches needs, built the same way for every user."""
    device: torch.device
    dataset: Dataset
    train: Split                     # on the device
    n_iter: int                      # optimizer steps per epoch
    model: LayerGroups               # on the device, in train mode
    generator: torch.Generator       # seeded, on the device: shuffling and augmentation
    workspace: Path | None = None    # where a disk feature cache goes (harness/engine/probe.py)
