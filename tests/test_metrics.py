"""The scores of imbalanced data (harness/engine/metrics.py): accuracy, balanced accuracy and
macro F1 from a confusion matrix, against hand-computed values and scikit-learn's; and the
confusion matrix the scoring pass (step.score) counts on a constructed imbalanced split."""
from __future__ import annotations

import pytest
import torch
from sklearn import metrics as skm
from torch import nn

from harness.engine import data as data_mod
from harness.engine import metrics
from harness.engine.input_stats import InputStats
from harness.engine.train import evaluate, evaluate_split

CPU = torch.device("cpu")

# 12 images of 3 classes, 8 / 3 / 1: class 0 is mostly right, class 2 is never predicted.
TRUE = [0] * 8 + [1] * 3 + [2]
PRED = [0] * 6 + [1] * 2 + [0] + [1] * 2 + [0]
CM = [[6, 2, 0],     # true 0: 6 right, 2 called 1
      [1, 2, 0],     # true 1: 1 called 0, 2 right
      [1, 0, 0]]     # true 2: called 0; no image is ever predicted 2
# by hand: accuracy (6 + 2) / 12; recalls 6/8, 2/3, 0; F1 = 2TP / (true + predicted):
# 12/16, 4/7, 0/1
ACCURACY = 8 / 12
BALANCED = (6 / 8 + 2 / 3 + 0) / 3          # 17/36
MACRO_F1 = (12 / 16 + 4 / 7 + 0) / 3        # 37/84


def test_confusion_counts_true_rows_against_predicted_columns():
    assert metrics.confusion(torch.tensor(TRUE), torch.tensor(PRED), 3).tolist() == CM


def test_scores_of_a_hand_made_imbalanced_matrix_with_a_class_never_predicted():
    got = metrics.scores(CM)
    assert got == pytest.approx({"accuracy": ACCURACY, "balanced_accuracy": BALANCED, "macro_f1": MACRO_F1},
                                abs=1e-15)
    assert (BALANCED, MACRO_F1) == (pytest.approx(17 / 36), pytest.approx(37 / 84))
    # accuracy flatters the majority class: predicting 0 for everything scores 8/12 too
    always0 = metrics.scores([[8, 0, 0], [3, 0, 0], [1, 0, 0]])
    assert always0 == pytest.approx({"accuracy": 8 / 12, "balanced_accuracy": 1 / 3,
                                     "macro_f1": (2 * 8 / (8 + 12)) / 3})


def test_scores_agree_with_scikit_learn_including_absent_and_never_true_classes():
    assert metrics.balanced_accuracy(CM) == pytest.approx(skm.balanced_accuracy_score(TRUE, PRED), abs=1e-15)
    assert metrics.macro_f1(CM) == pytest.approx(skm.f1_score(TRUE, PRED, average="macro", zero_division=0),
                                                 abs=1e-15)
    # a 4th class neither true nor predicted is left out of both means
    cm4 = [row + [0] for row in CM] + [[0, 0, 0, 0]]
    assert metrics.scores(cm4) == pytest.approx(metrics.scores(CM), abs=1e-15)
    # a class predicted but never true: out of the recalls, in the F1s (with 0), as scikit-learn
    true, pred = [0, 0, 1, 1], [0, 2, 1, 1]
    cm = metrics.confusion(torch.tensor(true), torch.tensor(pred), 3)
    assert metrics.balanced_accuracy(cm) == pytest.approx((1 / 2 + 1) / 2)
    assert metrics.macro_f1(cm) == pytest.approx((2 / 3 + 1 + 0) / 3)
    with pytest.warns(UserWarning):   # scikit-learn warns about the class absent from the truth
        assert metrics.balanced_accuracy(cm) == pytest.approx(skm.balanced_accuracy_score(true, pred))
    assert metrics.macro_f1(cm) == pytest.approx(skm.f1_score(true, pred, average="macro", zero_division=0))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(5))
def test_scores_agree_with_scikit_learn_on_random_imbalanced_predictions(seed):
    g = torch.Generator().manual_seed(seed)
    true = torch.multinomial(torch.tensor([0.6, 0.25, 0.1, 0.05]), 60, replacement=True, generator=g)
    pred = torch.where(torch.rand(60, generator=g) < 0.6, true, torch.randint(0, 4, (60,), generator=g))
    got = metrics.scores(metrics.confusion(true, pred, 4))
    t, p = true.tolist(), pred.tolist()
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(t, p), abs=1e-15)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(t, p), abs=1e-15)
    assert got["macro_f1"] == pytest.approx(skm.f1_score(t, p, average="macro", zero_division=0), abs=1e-15)


class FirstPixels(nn.Module):
    """Logits = the first `k` pixels of a one-channel image: an image lit at pixel p is
    predicted p (the normalisation is one increasing map, so it keeps the argmax)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.input_stats = InputStats((0.5,) * 3, (0.25,) * 3)

    def forward(self, x):
        return x.flatten(1)[:, :self.k]


def test_the_scoring_pass_counts_a_constructed_imbalanced_split():
    """12 images, 8 / 3 / 1 per class, each lit where PRED says: the confusion matrix and the
    scores come out as counted by hand, in batches of 5 (the last partial)."""
    x = torch.zeros(len(TRUE), 1, 4, 4, dtype=torch.uint8)
    for i, p in enumerate(PRED):
        x[i, 0, 0, p] = 255
    split = data_mod.Split(x, torch.tensor(TRUE), 4)
    s = evaluate_split(FirstPixels(3), split, 5, CPU)
    assert s.n == 12 and s.confusion.tolist() == CM
    assert s.accuracy == ACCURACY and s.metrics() == pytest.approx(
        {"accuracy": ACCURACY, "balanced_accuracy": BALANCED, "macro_f1": MACRO_F1}, abs=1e-15)
    assert evaluate(FirstPixels(3), split, 5, CPU) == (s.loss, s.accuracy)
