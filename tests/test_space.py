"""Tests for harness.sweep.space: the per-hyperparameter syntax, sampling with Optuna's real trials
(ordered pairs and epoch splits hold by construction), the clipped baseline and the
on-boundary flag."""
from __future__ import annotations

import math

import optuna
import pytest

from harness.errors import HarnessError
from harness.sweep.space import ParamSpec, Space, baseline, check_space, on_boundary, parse_param, suggest
from harness.sweep.strategies import STRATEGIES, defaults

optuna.logging.set_verbosity(optuna.logging.WARNING)


def space_of(strategy: str, raw: dict) -> Space:
    """A strategy's space as load_study builds it (parse each, with the strategy's rules)."""
    known = defaults(strategy)
    return Space({n: parse_param(f"strategies.{strategy}.{n}", v, known[n]) for n, v in raw.items()},
                 STRATEGIES[strategy].rules)


def one_line_error(fn, *args) -> str:
    with pytest.raises(HarnessError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --- parse_param: each syntax ------------------------------------------------------------------

def test_float_range_linear_and_log():
    spec = parse_param("strategies.naive.lr", {"low": 1e-5, "high": 1e-1, "log": True}, 1e-3)
    assert (spec.name, spec.kind, spec.low, spec.high, spec.log) == ("lr", "float", 1e-5, 1e-1, True)
    spec = parse_param("strategies.naive.pct_start", {"low": 0.1, "high": 0.5}, 0.25)
    assert (spec.kind, spec.low, spec.high, spec.log) == ("float", 0.1, 0.5, False)
    assert (spec.lowest, spec.highest) == (0.1, 0.5)


def test_float_range_accepts_whole_numbers_as_bounds():
    spec = parse_param("strategies.gradual.lr_decay", {"low": 2, "high": 4}, 2.6)
    assert (spec.kind, spec.low, spec.high) == ("float", 2, 4)


def test_int_range_when_the_default_is_an_int():
    spec = parse_param("strategies.two_phase.freeze_epochs", {"low": 1, "high": 3}, 1)
    assert (spec.name, spec.kind, spec.low, spec.high, spec.log) == ("freeze_epochs", "int", 1, 3, False)


def test_choices():
    spec = parse_param("strategies.naive.lr", {"choices": [1e-4, 1e-3, 1e-2]}, 1e-3)
    assert spec.kind == "choices" and spec.choices == (1e-4, 1e-3, 1e-2)
    assert (spec.lowest, spec.highest) == (1e-4, 1e-2)


@pytest.mark.parametrize("raw, default", [(3e-3, 1e-3), (1, 1e-3), (2, 1)])
def test_fixed_value(raw, default):
    spec = parse_param("strategies.x.p", raw, default)
    assert spec.kind == "fixed" and spec.value == raw
    assert spec.lowest == spec.highest == raw
    assert spec.clip(12345) == raw            # a fixed value is what it is


@pytest.mark.parametrize("raw, default, field, words", [
    # inverted and empty ranges
    ({"low": 1e-2, "high": 1e-4}, 1e-3, "strategies.naive.lr", "inverted"),
    ({"low": 1e-3, "high": 1e-3}, 1e-3, "strategies.naive.lr", "empty"),
    ({"low": 3, "high": 1}, 1, "strategies.two_phase.freeze_epochs", "inverted"),
    # log ranges need low > 0
    ({"low": 0, "high": 1e-1, "log": True}, 1e-3, "strategies.naive.lr", "low > 0"),
    ({"low": -1e-3, "high": 1e-1, "log": True}, 1e-3, "strategies.naive.lr", "low > 0"),
    # not numbers
    ({"low": "small", "high": 1e-1}, 1e-3, "strategies.naive.lr.low", "expected a number"),
    ({"low": 1e-5, "high": None}, 1e-3, "strategies.naive.lr.high", "expected a number"),
    ({"low": True, "high": 1e-1}, 1e-3, "strategies.naive.lr.low", "expected a number"),
    ({"low": 1e-5, "high": 1e-1, "log": "yes"}, 1e-3, "strategies.naive.lr.log", "true or false"),
    ([1e-4, 1e-2], 1e-3, "strategies.naive.lr", "expected a number, a range"),
    (None, 1e-3, "strategies.naive.lr", "expected a number, a range"),
    # a float where a whole number of epochs belongs
    ({"low": 1.0, "high": 3}, 1, "strategies.two_phase.freeze_epochs.low", "whole number"),
    ({"low": 1, "high": 2.5}, 1, "strategies.two_phase.freeze_epochs.high", "whole number"),
    (1.5, 1, "strategies.two_phase.freeze_epochs", "whole number"),
    (True, 1, "strategies.two_phase.freeze_epochs", "whole number"),
    # unknown or missing keys in a range
    ({"low": 1e-5, "high": 1e-1, "step": 1e-5}, 1e-3, "strategies.naive.lr", "unknown key 'step'"),
    ({"low": 1e-5, "hgih": 1e-1}, 1e-3, "strategies.naive.lr", "unknown key 'hgih'"),
    ({"low": 1e-5}, 1e-3, "strategies.naive.lr", "needs both low and high"),
    # choices must be a non-empty list
    ({"choices": []}, 1e-3, "strategies.naive.lr.choices", "non-empty list"),
    ({"choices": 1e-3}, 1e-3, "strategies.naive.lr.choices", "non-empty list"),
    # choices of one kind, the hyperparameter's own (mixed kinds crashed Optuna's ordering)
    ({"choices": [1e-3, "fast"]}, 1e-3, "strategies.naive.lr.choices", "lr takes numbers, got 'fast'"),
    ({"choices": ["a", 1]}, None, "strategies.naive.lr.choices", "takes text, got 1"),
    ({"choices": [0, True]}, 0, "strategies.surgical.block.choices", "takes numbers, got True"),
    ({"choices": [[0, 1], [2]]}, 0, "strategies.surgical.block.choices", "a number, true/false or text"),
    ({"choices": [0, 1.5]}, 0, "strategies.surgical.block.choices", "whole number, got 1.5"),
])
def test_parse_param_errors_are_one_line_naming_the_field(raw, default, field, words):
    name = ".".join(field.split(".")[:3])      # strategies.<s>.<param>
    msg = one_line_error(parse_param, name, raw, default)
    assert msg.startswith(f"{field}:"), msg
    assert words in msg, msg


# --- check_space --------------------------------------------------------------------------------

def test_check_space_refuses_an_epoch_split_reaching_the_budget():
    space = space_of("two_phase", {"freeze_epochs": {"low": 1, "high": 3}})
    msg = one_line_error(check_space, "strategies.two_phase", space, 3)
    assert msg.startswith("strategies.two_phase.freeze_epochs:") and "budget.epochs (3)" in msg
    check_space("strategies.two_phase", space, 4)    # 3 < 4: fine
    msg = one_line_error(check_space, "strategies.two_phase", space_of("two_phase", {"freeze_epochs": 0}), 4)
    assert "at least 1" in msg
    msg = one_line_error(check_space, "strategies.lp_ft", space_of("lp_ft", {"probe_epochs": {"choices": [1, 4]}}), 4)
    assert msg.startswith("strategies.lp_ft.probe_epochs:")


def test_check_space_refuses_lr_low_starting_above_lr_high():
    space = space_of("two_phase", {"lr_low": {"low": 1e-3, "high": 1e-2, "log": True},
                                   "lr_high": {"low": 1e-4, "high": 1e-1, "log": True}})
    msg = one_line_error(check_space, "strategies.two_phase", space, 4)
    assert msg.startswith("strategies.two_phase.lr_low:")
    # overlapping ranges are fine: lr_low is sampled below the lr_high already drawn
    check_space("strategies.two_phase", space_of("two_phase", {
        "lr_low": {"low": 1e-6, "high": 1e-2, "log": True},
        "lr_high": {"low": 1e-4, "high": 1e-1, "log": True}}), 4)


# --- suggest with Optuna's real trials ----------------------------------------------------------

def ask_many(space: dict[str, ParamSpec], n: int, sampler=None, value=None) -> list[tuple[dict, dict]]:
    """(suggested values, trial.params) for n trials of an in-memory study."""
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0), direction="maximize")
    out = []
    for i in range(n):
        trial = study.ask()
        values = suggest(trial, space)
        out.append((values, dict(trial.params)))
        if value is not None:
            study.tell(trial, value(values, i))
    return out


OVERLAPPING = {
    "freeze_epochs": {"low": 1, "high": 3},
    # wide, overlapping ranges: drawn independently, lr_low > lr_high about half the time
    "lr_low": {"low": 1e-7, "high": 1e-2, "log": True},
    "lr_high": {"low": 1e-5, "high": 1e-1, "log": True},
    "pct_start": {"low": 0.1, "high": 0.5},
}


def test_suggest_300_random_trials_never_give_lr_low_above_lr_high():
    space = space_of("two_phase", OVERLAPPING)
    check_space("strategies.two_phase", space, 4)
    draws = ask_many(space, 300)
    lows, highs = [], []
    for values, params in draws:
        assert set(values) == set(OVERLAPPING)
        assert values == params                       # everything sampled is recorded by Optuna
        assert values["lr_low"] <= values["lr_high"], values
        assert 1e-7 <= values["lr_low"] <= 1e-2 and 1e-5 <= values["lr_high"] <= 1e-1
        assert isinstance(values["freeze_epochs"], int) and 1 <= values["freeze_epochs"] <= 3
        assert 0.1 <= values["pct_start"] <= 0.5
        lows.append(values["lr_low"])
        highs.append(values["lr_high"])
    # the draws really explore: every freeze_epochs value, lr_low across most of its range
    assert {v["freeze_epochs"] for v, _ in draws} == {1, 2, 3}
    assert min(lows) < 1e-6 and max(lows) > 1e-3 and max(highs) > 1e-2


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_suggest_with_the_sweeps_tpe_sampler_keeps_the_order():
    from harness.sweep.optuna_studies import make_sampler
    space = space_of("discriminative", {k: OVERLAPPING[k] for k in ("lr_low", "lr_high", "pct_start")})
    draws = ask_many(space, 30, sampler=make_sampler("tpe", 0),
                     value=lambda v, i: -abs(math.log10(v["lr_high"]) + 3))
    assert all(v["lr_low"] <= v["lr_high"] for v, _ in draws)


def test_suggest_lr_low_range_below_a_fixed_lr_high():
    space = space_of("two_phase", {"lr_low": {"low": 1e-7, "high": 1e-2, "log": True}, "lr_high": 1e-4})
    for values, params in ask_many(space, 100):
        assert values["lr_high"] == 1e-4 and "lr_high" not in params     # fixed: passed through
        assert 1e-7 <= values["lr_low"] <= 1e-4


def test_suggest_lr_high_range_above_a_fixed_lr_low():
    space = space_of("two_phase", {"lr_low": 1e-5, "lr_high": {"low": 1e-6, "high": 1e-2, "log": True}})
    # lowest lr_low (1e-5) > lowest lr_high (1e-6): the study refuses this space ...
    with pytest.raises(HarnessError):
        check_space("strategies.two_phase", space, 4)
    # ... and one that starts at the fixed value samples lr_high above it
    space = space_of("two_phase", {"lr_low": 1e-5, "lr_high": {"low": 1e-5, "high": 1e-2, "log": True}})
    for values, _ in ask_many(space, 100):
        assert values["lr_low"] == 1e-5 <= values["lr_high"] <= 1e-2


def test_suggest_lr_low_choices_below_a_fixed_lr_high():
    space = space_of("two_phase", {"lr_low": {"choices": [1e-6, 1e-5, 1e-3]}, "lr_high": 1e-4})
    check_space("strategies.two_phase", space, 3)
    draws = ask_many(space, 60)
    assert {v["lr_low"] for v, _ in draws} == {1e-6, 1e-5}     # 1e-3 > lr_high is never offered


@pytest.mark.parametrize("lr_low, lr_high", [
    ({"choices": [1e-6, 1e-4, 1e-2]}, {"choices": [1e-4, 1e-3, 1e-2]}),
    ({"choices": [1e-6, 1e-4]}, {"low": 1e-4, "high": 1e-2, "log": True}),
    ({"low": 1e-7, "high": 1e-4, "log": True}, {"choices": [1e-4, 1e-3]}),
])
def test_choices_in_a_searched_ordered_pair_are_refused(lr_low, lr_high):
    """Optuna needs a categorical's choices to be the same in every trial, so choices whose
    allowed subset would depend on the partner's draw cannot keep lr_low <= lr_high by
    construction: the space is refused up front, naming the field."""
    space = space_of("two_phase", {"lr_low": lr_low, "lr_high": lr_high})
    with pytest.raises(HarnessError) as info:
        check_space("strategies.two_phase", space, 3)
    msg = str(info.value)
    assert msg.startswith("strategies.two_phase.lr_low:") and "\n" not in msg, msg


def test_suggest_fixed_and_choices_paths():
    space = space_of("naive", {"lr": 3e-3, "pct_start": {"choices": [0.2, 0.3]}})
    draws = ask_many(space, 40)
    for values, params in draws:
        assert values["lr"] == 3e-3
        assert params.keys() == {"pct_start"}       # only searched values are Optuna params
        assert values["pct_start"] in (0.2, 0.3)
    assert {v["pct_start"] for v, _ in draws} == {0.2, 0.3}


def test_suggest_freeze_epochs_range_stays_inside_its_bounds():
    space = space_of("two_phase", {"freeze_epochs": {"low": 2, "high": 4}})
    got = {values["freeze_epochs"] for values, _ in ask_many(space, 100)}
    assert got == {2, 3, 4}


def test_suggest_an_enqueued_baseline_comes_back_exactly():
    space = space_of("two_phase", OVERLAPPING)
    first = baseline(space, defaults("two_phase"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(first)
    trial = study.ask()
    assert suggest(trial, space) == {"freeze_epochs": 1, "lr_low": 1e-5, "lr_high": 1e-3, "pct_start": 0.3}


# --- baseline: the published defaults, clipped -------------------------------------------------

def test_baseline_is_the_published_default_inside_wide_ranges():
    wide = {"lr": {"low": 1e-6, "high": 1.0, "log": True}, "pct_start": {"low": 0.05, "high": 0.9}}
    assert baseline(space_of("naive", wide), defaults("naive")) == {"lr": 1e-3, "pct_start": 0.25}
    assert baseline(space_of("head_only", wide), defaults("head_only")) == {"lr": 2e-3, "pct_start": 0.25}
    assert baseline(space_of("two_phase", OVERLAPPING), defaults("two_phase")) == {
        "freeze_epochs": 1, "lr_high": 1e-3, "lr_low": 1e-5, "pct_start": 0.3}


def test_baseline_clips_into_the_study_ranges():
    space = space_of("naive", {"lr": {"low": 1e-2, "high": 1e-1, "log": True},
                               "pct_start": {"low": 0.05, "high": 0.2}})
    assert baseline(space, defaults("naive")) == {"lr": 1e-2, "pct_start": 0.2}
    space = space_of("two_phase", {"freeze_epochs": {"low": 2, "high": 3}})
    got = baseline(space, defaults("two_phase"))
    assert got == {"freeze_epochs": 2} and isinstance(got["freeze_epochs"], int)


def test_baseline_leaves_out_fixed_values_and_picks_the_nearest_choice():
    space = space_of("naive", {"lr": 5e-3, "pct_start": {"choices": [0.1, 0.3, 0.5]}})
    assert baseline(space, defaults("naive")) == {"pct_start": 0.3}


@pytest.mark.parametrize("raw", [
    # lr_low's default (1e-5) fits its range, lr_high's clipped value (5e-6) is below it
    {"lr_low": {"low": 1e-6, "high": 1e-4, "log": True}, "lr_high": {"low": 1e-6, "high": 5e-6, "log": True}},
    # lr_low's range lies above the default lr_high; lr_high's range starts at the same place
    {"lr_low": {"low": 2e-3, "high": 1e-2, "log": True}, "lr_high": {"low": 2e-3, "high": 3e-3, "log": True}},
    {"lr_low": {"low": 1e-7, "high": 1e-6, "log": True}, "lr_high": {"low": 1e-7, "high": 5e-7, "log": True}},
])
def test_baseline_keeps_lr_low_at_or_below_lr_high(raw):
    space = space_of("two_phase", raw)
    check_space("strategies.two_phase", space, 4)
    got = baseline(space, defaults("two_phase"))
    assert got["lr_low"] <= got["lr_high"], got
    for name, v in got.items():
        assert space[name].low <= v <= space[name].high, (name, v)


def test_baseline_fix_moves_lr_low_down_to_lr_high():
    space = space_of("two_phase", {"lr_low": {"low": 1e-6, "high": 1e-4, "log": True},
                                   "lr_high": {"low": 1e-6, "high": 5e-6, "log": True}})
    assert baseline(space, defaults("two_phase")) == {"lr_low": 5e-6, "lr_high": 5e-6}


def test_baseline_keeps_lr_low_at_or_below_lr_high_with_choices():
    # the default lr_low 1e-5 is nearest the choice 1.6e-5, which is above lr_high
    space = space_of("two_phase", {"lr_low": {"choices": [1e-6, 1.6e-5]}, "lr_high": 1.5e-5})
    check_space("strategies.two_phase", space, 4)
    got = baseline(space, defaults("two_phase"))
    assert got["lr_low"] == 1e-6, got          # the largest choice at or below lr_high (fixed)
    # and the first trial of a sweep (the enqueued baseline) can be sampled
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(got)
    values = suggest(study.ask(), space)
    assert values["lr_low"] <= values["lr_high"]


# --- on_boundary -----------------------------------------------------------------------------

def test_on_boundary_linear_range():
    spec = parse_param("strategies.naive.pct_start", {"low": 0.1, "high": 0.5}, 0.25)
    # 2% of the width (0.4) is 0.008
    assert on_boundary(spec, 0.1) == "low"
    assert on_boundary(spec, 0.107) == "low"
    assert on_boundary(spec, 0.11) is None
    assert on_boundary(spec, 0.3) is None
    assert on_boundary(spec, 0.49) is None
    assert on_boundary(spec, 0.493) == "high"
    assert on_boundary(spec, 0.5) == "high"


def test_on_boundary_log_range_is_measured_in_log_units():
    spec = parse_param("strategies.naive.lr", {"low": 1e-5, "high": 1e-1, "log": True}, 1e-3)
    # 2% of 4 decades is 0.08 decades: a factor of ~1.2 from either edge
    assert on_boundary(spec, 1e-5) == "low"
    assert on_boundary(spec, 1.15e-5) == "low"
    assert on_boundary(spec, 1.3e-5) is None
    assert on_boundary(spec, 1e-3) is None
    assert on_boundary(spec, 0.09) == "high"     # linear units would not flag it (0.01 > 0.002)
    assert on_boundary(spec, 0.08) is None
    assert on_boundary(spec, 0.1) == "high"


def test_on_boundary_int_range_and_non_ranges():
    spec = parse_param("strategies.two_phase.freeze_epochs", {"low": 1, "high": 3}, 1)
    assert [on_boundary(spec, v) for v in (1, 2, 3)] == ["low", None, "high"]
    assert on_boundary(parse_param("strategies.naive.lr", {"choices": [1e-4, 1e-2]}, 1e-3), 1e-4) is None
    assert on_boundary(parse_param("strategies.naive.lr", 1e-3, 1e-3), 1e-3) is None
