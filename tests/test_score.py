"""One scoring pass (harness/engine/step.py: score) behind validation and test scores
(train.evaluate), a probe's cached features (Probe.evaluate) and the shifted test sets
(shift.accuracy): eval mode without gradients, mean cross-entropy and argmax accuracy, and
the model handed back in the mode it came in."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.engine import data as data_mod
from harness.engine import probe, shift
from harness.engine.groups import set_trainable
from harness.engine.models import build_model
from harness.engine.step import score
from harness.engine.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.one_thread

CPU = torch.device("cpu")
BATCH = 7


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model("timm/test_resnet", 3, "none", "fastai", 3, 32)
    set_trainable(m, 1, train_bn=False)   # a truly frozen body: its modules stay in eval mode
    return m


@pytest.fixture
def split():
    g = torch.Generator().manual_seed(0)
    return data_mod.Split(torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8),
                          torch.arange(20) % 3, 32)


def _by_hand(model, split) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model in eval mode, on the whole split at once."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(data_mod.normalize(split.x, model.input_stats))
    model.train(was)
    return nn.functional.cross_entropy(out, split.y).item(), (out.argmax(1) == split.y).sum().item() / len(split.y)


def _callers(model, split):
    """The three scorers, each as (mean loss or None, accuracy)."""
    return {
        "evaluate": lambda: evaluate(model, split, BATCH, CPU),
        "probe": lambda: probe.Probe(model, CPU, None, {}).evaluate("val", split, BATCH),
        "shift": lambda: (None, shift.accuracy(model, data_mod.eval_batches(split, BATCH, model.input_stats), CPU)),
    }


def _modes(model) -> list[bool]:
    return [m.training for m in model.modules()]


def test_every_scorer_gives_the_numbers_of_the_model_in_eval_mode(model, split):
    loss, acc = _by_hand(model, split)
    for name, call in _callers(model, split).items():
        got_loss, got_acc = call()
        assert got_acc == pytest.approx(acc, abs=1e-12), name
        if got_loss is not None:
            assert got_loss == pytest.approx(loss, rel=1e-5), name


@pytest.mark.parametrize("training", [False, True])
def test_every_scorer_hands_the_model_back_in_the_mode_it_found(model, split, training):
    model.train(training)
    modes = _modes(model)
    assert any(modes) == training and not all(modes)    # eval: all off; train: the frozen body stays off
    for name, call in _callers(model, split).items():
        call()
        assert model.training == training and _modes(model) == modes, name


@pytest.mark.parametrize("training", [False, True])
def test_the_mode_comes_back_when_a_batch_fails(model, split, training):
    model.train(training)
    modes = _modes(model)

    def batches():
        yield from data_mod.eval_batches(split, BATCH, model.input_stats)
        raise RuntimeError("the data went away")
    with pytest.raises(RuntimeError, match="the data went away"):
        score(model, batches(), CPU)
    assert _modes(model) == modes


def test_no_batch_is_no_score(model):
    assert score(model, iter([]), CPU) is None
    empty = data_mod.Split(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), 32)
    assert evaluate(model, empty, BATCH, CPU) == (None, None)
    assert shift.accuracy(model, iter([]), CPU) is None
