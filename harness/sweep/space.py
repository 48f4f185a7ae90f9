"""A strategy's search space as data, and the ONLY place that calls `trial.suggest_*`.

Syntax per hyperparameter: float `{low, high, log}`, int `{low, high}` (int when the
strategy's default is an int: epochs, surgical's `block`), `{choices: [...]}`, or a fixed value. A space carries its
strategy's rules (harness/sweep/strategies.py): ordered pairs such as `lr_low <= lr_high`
hold by construction (the second one is sampled inside the first's bound, so no trial is
ever wasted on an impossible combination), and epoch splits leave the next stage an epoch.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError


@dataclass(frozen=True)
class Rules:
    """What must hold between a strategy's hyperparameters in every trial."""
    ordered_pairs: tuple[tuple[str, str], ...] = ()   # (a, b): a <= b always
    epoch_splits: tuple[str, ...] = ()                # epochs of a first stage: at least 1, below the budget


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: str                       # float | int | choices | fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None
    value: Any = None

    @property
    def lowest(self) -> Any:
        return {"fixed": self.value, "choices": min(self.choices or (0,))}.get(self.kind, self.low)

    @property
    def highest(self) -> Any:
        return {"fixed": self.value, "choices": max(self.choices or (0,))}.get(self.kind, self.high)

    def clip(self, v: Any) -> Any:
        """`v` moved into this space (the published default, clipped into the study's range)."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "choices":
            return v if v in self.choices else min(self.choices, key=lambda c: _distance(c, v))
        v = min(max(v, self.low), self.high)
        return int(round(v)) if self.kind == "int" else float(v)


    def clip_below(self, bound: Any) -> Any:
        """The value of this space nearest to `bound` from below (check_space makes one exist)."""
        if self.kind == "choices":
            return max(c for c in self.choices if c <= bound)
        return self.clip(bound)


class Space(Mapping):
    """One strategy's search space: hyperparameter name -> ParamSpec (a read-only mapping),
    with the strategy's rules."""

    def __init__(self, params: dict[str, ParamSpec] | None = None, rules: Rules = Rules()):
        self._params, self.rules = dict(params or {}), rules

    def __getitem__(self, name: str) -> ParamSpec:
        return self._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        return f"Space({self._params!r}, {self.rules!r})"


def _distance(a: Any, b: Any) -> float:
    try:
        return abs(float(a) - float(b))
    except (TypeError, ValueError):
        return 0.0 if a == b else 1.0


def _kind(v: Any) -> str | None:
    """What a choice is, in words for errors: Optuna's categorical values, ordered within a kind."""
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return "numbers"
    return "text" if isinstance(v, str) else None


def parse_param(field: str, raw: Any, default: Any) -> ParamSpec:
    """One hyperparameter's spec from YAML; `field` names it in errors."""
    name = field.rsplit(".", 1)[-1]
    is_int = isinstance(default, int) and not isinstance(default, bool)
    if isinstance(raw, dict):
        keys = set(raw)
        if keys == {"choices"}:
            choices = raw["choices"]
            if not isinstance(choices, list) or not choices:
                raise HarnessError(f"{field}.choices: must be a non-empty list")
            odd = [c for c in choices if _kind(c) is None]
            if odd:
                raise HarnessError(f"{field}.choices: each choice must be a number, true/false or text, "
                                   f"got {odd[0]!r}")
            want = _kind(default) or _kind(choices[0])
            other = [c for c in choices if _kind(c) != want]
            if other:
                raise HarnessError(f"{field}.choices: {name} takes {want}, got {other[0]!r} "
                                   f"(choices must all be of one kind)")
            bad = [c for c in choices if is_int and not isinstance(c, int)]
            if bad:
                raise HarnessError(f"{field}.choices: {name} is a whole number, got {bad[0]!r}")
            return ParamSpec(name, "choices", choices=tuple(choices))
        unknown = keys - {"low", "high", "log"}
        if unknown:
            raise HarnessError(f"{field}: unknown key '{sorted(unknown)[0]}' (a range has low, high, log; "
                               f"or use choices)")
        if not {"low", "high"} <= keys:
            raise HarnessError(f"{field}: a range needs both low and high")
        low, high, log = raw["low"], raw["high"], raw.get("log", False)
        for k, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise HarnessError(f"{field}.{k}: expected a number, got {v!r}")
            if is_int and not isinstance(v, int):
                raise HarnessError(f"{field}.{k}: {name} is a whole number, got {v!r}")
        if not isinstance(log, bool):
            raise HarnessError(f"{field}.log: expected true or false, got {log!r}")
        if not low < high:
            raise HarnessError(f"{field}: empty or inverted range (low {low} must be below high {high})")
        if log and low <= 0:
            raise HarnessError(f"{field}: a log range needs low > 0, got {low}")
        return ParamSpec(name, "int" if is_int else "float", low=low, high=high, log=log)
    if isinstance(raw, (list, tuple)) or raw is None:
        raise HarnessError(f"{field}: expected a number, a range {{low, high}} or {{choices: [...]}}")
    if is_int and (isinstance(raw, bool) or not isinstance(raw, int)):
        raise HarnessError(f"{field}: {name} is a whole number, got {raw!r}")
    return ParamSpec(name, "fixed", value=raw)


def check_space(prefix: str, space: Space, budget: int) -> None:
    """Refuse spaces where a constraint could fail: epoch splits reaching the budget,
    ordered pairs that cannot be satisfied."""
    for name in space.rules.epoch_splits:
        spec = space.get(name)
        if spec is None:
            continue
        if spec.lowest < 1:
            raise HarnessError(f"{prefix}.{name}: must be at least 1, got {spec.lowest}")
        if spec.highest >= budget:
            raise HarnessError(f"{prefix}.{name}: {spec.highest} reaches budget.epochs ({budget}); "
                               f"the highest allowed is {budget - 1}")
    for a, b in space.rules.ordered_pairs:
        if a not in space or b not in space:
            continue
        kinds = {space[a].kind, space[b].kind}
        if "choices" in kinds and "fixed" not in kinds:
            # Optuna needs the same choices in every trial; bounding them by the partner's
            # draw would change them, so ordered pairs use ranges (or one fixed side)
            raise HarnessError(f"{prefix}.{a}: with {b} also searched, {a} and {b} must be ranges "
                               f"{{low, high}}, not choices (choices cannot keep {a} <= {b})")
        if space[a].lowest > space[b].lowest:
            raise HarnessError(f"{prefix}.{a}: its lowest value ({space[a].lowest}) is above the lowest "
                               f"{b} ({space[b].lowest}), so some trials could have {a} > {b}")


def baseline(space: Space, defaults: dict[str, Any]) -> dict[str, Any]:
    """The published defaults clipped into the space, for the params that are searched."""
    values = enforce_order({n: s.clip(defaults[n]) for n, s in space.items()}, space)
    return {n: v for n, v in values.items() if space[n].kind != "fixed"}


def enforce_order(values: dict[str, Any], space: Space) -> dict[str, Any]:
    """`values` with the lower member of every ordered pair moved down to its partner when
    it sits above it (to the nearest value of its own space, when it has one)."""
    values = dict(values)
    for a, b in space.rules.ordered_pairs:
        if a in values and b in values and values[a] > values[b]:
            values[a] = space[a].clip_below(values[b]) if a in space else values[b]
    return values


def _sampling_order(space: Space) -> list[str]:
    # fixed values first; then, in each ordered pair, the upper one before the lower one
    names = sorted(space, key=lambda n: space[n].kind != "fixed")
    for a, b in space.rules.ordered_pairs:
        if a in names and b in names and space[a].kind != "fixed" and space[b].kind != "fixed":
            names.remove(b)
            names.insert(names.index(a), b)
    return names


def suggest(trial, space: Space) -> dict[str, Any]:
    """Sample every hyperparameter of `space` for an Optuna trial (fixed ones pass through)."""
    values: dict[str, Any] = {}
    for name in _sampling_order(space):
        spec = space[name]
        if spec.kind == "fixed":
            values[name] = spec.value
            continue
        low, high = _bounds(name, spec, values, space.rules)
        if spec.kind == "choices":
            allowed = [c for c in spec.choices if low <= c <= high] if low is not None else list(spec.choices)
            values[name] = trial.suggest_categorical(name, allowed)
        elif spec.kind == "int":
            values[name] = trial.suggest_int(name, int(low), int(high), log=spec.log)
        else:
            values[name] = trial.suggest_float(name, low, high, log=spec.log)
    return values


def _bounds(name: str, spec: ParamSpec, values: dict[str, Any], rules: Rules) -> tuple:
    low, high = spec.low, spec.high
    for a, b in rules.ordered_pairs:
        if name == a and b in values:
            high = values[b] if high is None else min(high, values[b])
            low = -math.inf if low is None else low
        if name == b and a in values:
            low = values[a] if low is None else max(low, values[a])
            high = math.inf if high is None else high
    return low, high


def on_boundary(spec: ParamSpec, value: Any, tol: float = 0.02) -> str | None:
    """'low' / 'high' when `value` sits within `tol` of the range's edge (in log units for
    log ranges): a sign the best point may lie outside the searched range."""
    if spec.kind not in ("float", "int"):
        return None
    f = (lambda x: math.log(x)) if spec.log else float
    width = f(spec.high) - f(spec.low)
    if f(value) - f(spec.low) <= tol * width:
        return "low"
    if f(spec.high) - f(value) <= tol * width:
        return "high"
    return None
