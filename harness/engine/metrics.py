"""A classifier's scores from its confusion matrix (rows: true class, columns: predicted).

Accuracy, balanced accuracy (the mean recall over the classes present in the truth) and
macro F1 (the mean F1 over the classes present in the truth or the predictions, a class
with no true positive scoring 0), as scikit-learn defines them (`zero_division=0`).
"""
from __future__ import annotations

from typing import Sequence

import torch

NAMES = ("accuracy", "balanced_accuracy", "macro_f1")   # the scores every split reports


def confusion(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[true, predicted] counts, on the labels' device. An index_add_, not a bincount: CUDA's
    bincount reads the labels' range back to the host, a sync per batch."""
    counts = torch.zeros(n_classes * n_classes, dtype=torch.long, device=y_true.device)
    counts.index_add_(0, y_true * n_classes + y_pred, torch.ones_like(y_true))
    return counts.view(n_classes, n_classes)


def _counts(cm: torch.Tensor | Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(true positives, true count, predicted count) per class, as float64."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    return cm.diagonal(), cm.sum(1), cm.sum(0)


def accuracy(cm) -> float:
    tp, true, _ = _counts(cm)
    return float(tp.sum() / true.sum())


def balanced_accuracy(cm) -> float:
    """Mean recall over the classes with at least one true example."""
    tp, true, _ = _counts(cm)
    present = true > 0
    return float((tp[present] / true[present]).mean())


def macro_f1(cm) -> float:
    """Mean F1 = 2TP / (2TP + FP + FN) over the classes that are true or predicted at least
    once: a class never predicted has F1 0, one neither true nor predicted is left out."""
    tp, true, pred = _counts(cm)
    seen = (true + pred) > 0
    return float((2 * tp[seen] / (true[seen] + pred[seen])).mean())


def scores(cm) -> dict[str, float]:
    """Every name of NAMES -> its value on the confusion matrix `cm`."""
    return {"accuracy": accuracy(cm), "balanced_accuracy": balanced_accuracy(cm), "macro_f1": macro_f1(cm)}
