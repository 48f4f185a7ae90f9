"""The study file: a base recipe, an equal epoch budget, and one search space per strategy.

`load_study(path)` validates everything up front (one-line errors naming the field), so a
sweep never starts with a space that could produce an invalid trial.

Beside its strategy's hyperparameters, a space may search a recipe field that any strategy
has, named by its dotted path (RECIPE_FIELDS: `optimizer.ema.decay`, `optimizer.ema.warmup`).
Its value is written into the trial's recipe (setting `optimizer.ema` switches the EMA on);
its default, for the first trial, is the base recipe's value, else the schema's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, ValidationError

from harness.errors import HarnessError
from harness.engine.recipe import Num, Recipe, did_you_mean, format_validation_error, read_yaml
from harness.engine.strict_model import StrictModel
from harness.sweep.space import ParamSpec, Space, baseline, check_space, enforce_order, parse_param
from harness.sweep.strategies import STRATEGIES, defaults, stages_for

# the final epoch's value on the validation split; pruning reads it every epoch
METRICS = {"val/accuracy": "maximize", "val/balanced_accuracy": "maximize", "val/macro_f1": "maximize",
           "val/loss": "minimize"}
RECIPE_FIELDS = ("optimizer.ema.decay", "optimizer.ema.warmup")   # searchable in any strategy's space


class Budget(StrictModel):
    epochs: Annotated[StrictInt, Field(ge=1)]


class WiseFtConfig(StrictModel):
    """WiSE-FT at compare time (harness/engine/wise_ft.py): the alphas of (1 - alpha) theta_0 + alpha theta_ft."""
    alphas: Annotated[list[Num], Field(min_length=1)] = [0.0, 0.25, 0.5, 0.75, 1.0]


class CompareConfig(StrictModel):
    seeds: Annotated[StrictInt, Field(ge=1)] = 3            # seeds per strategy; with --seeds auto, the first look
    max_seeds: Annotated[StrictInt, Field(ge=2)] | None = None   # --seeds auto adds seeds up to this many
    shift_root: str | None = None                           # a second test folder: one subfolder per class
    corruptions: dict[str, list[StrictInt]] = {}           # ImageNet-C style: name -> severities (1..5)
    shift_per_class: Annotated[StrictInt, Field(ge=1)] | None = None   # corrupt only the first N test images per class
    wise_ft: WiseFtConfig | None = None                     # weight-space ensembles with the start model

    def check(self) -> None:
        """One ValueError line, named from `compare.` on, for a value the schema cannot say."""
        from harness.engine.shift import CORRUPTIONS
        if self.max_seeds is not None and self.max_seeds < self.seeds:
            raise ValueError(f"compare.max_seeds: {self.max_seeds} is below compare.seeds ({self.seeds})")
        for name, severities in self.corruptions.items():
            if name not in CORRUPTIONS:
                hint = did_you_mean(name, CORRUPTIONS) or f" (known: {', '.join(CORRUPTIONS)})"
                raise ValueError(f"compare.corruptions.{name}: unknown corruption{hint}")
            bad = [v for v in severities if not 1 <= v <= 5]
            if bad or not severities or len(set(severities)) != len(severities):
                raise ValueError(f"compare.corruptions.{name}: severities must be distinct numbers 1..5, "
                                 f"got {severities}")
        if self.wise_ft is not None:
            alphas = self.wise_ft.alphas
            if any(not 0 <= a <= 1 for a in alphas):
                raise ValueError(f"compare.wise_ft.alphas: every alpha must lie in [0, 1] (0: the start "
                                 f"model, 1: the fine-tuned one), got {alphas}")
            ordered = sorted(alphas)
            if any(b - a < 0.001 for a, b in zip(ordered, ordered[1:])):
                raise ValueError(f"compare.wise_ft.alphas: alphas must differ by at least 0.001, got {alphas}")

    def shift_folder(self, study_path: Path) -> Path | None:
        """shift_root as given, or (when it is not there) beside the study file, like `recipe`."""
        if self.shift_root is None:
            return None
        p = Path(self.shift_root)
        return p if p.is_absolute() or p.exists() else study_path.parent / p


class StudyConfig(StrictModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]
    recipe: dict[str, Any] | str
    budget: Budget
    metric: Literal["val/accuracy", "val/balanced_accuracy", "val/macro_f1", "val/loss"] = "val/accuracy"
    trials: Annotated[StrictInt, Field(ge=1)] = 8
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "layout", "none"] = "none"
    strategies: Annotated[dict[str, dict[str, Any] | None], Field(min_length=1)]
    compare: CompareConfig = CompareConfig()


@dataclass(frozen=True)
class Selection:
    """The part of a study a command works on: these strategies, this many trials each."""
    strategies: tuple[str, ...]
    trials: int


@dataclass(frozen=True)
class Study:
    config: StudyConfig
    base: dict[str, Any]                            # the base recipe without stages
    spaces: dict[str, Space]                        # strategy -> hyperparameter -> spec
    source: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def direction(self) -> str:
        return METRICS[self.config.metric]

    @property
    def strategies(self) -> list[str]:
        return list(self.spaces)

    @property
    def n_groups(self) -> int:
        """The base recipe's layer groups (gradual's stage count follows them)."""
        from harness.engine.recipe import ModelConfig
        return ModelConfig.model_validate(self.base.get("model") or {}).groups

    def select(self, strategies: list[str] | tuple[str, ...] | None = None, trials: int | None = None) -> Selection:
        """--strategy (default: all of them) and --trials (default: the study's), checked."""
        chosen = tuple(strategies or self.strategies)
        unknown = [s for s in chosen if s not in self.spaces]
        if unknown:
            raise HarnessError(f"--strategy: '{unknown[0]}' is not in the study (it has: {', '.join(self.strategies)})")
        return Selection(chosen, trials or self.config.trials)

    def defaults(self, strategy: str) -> dict[str, Any]:
        """The strategy's published defaults and the searchable recipe fields' (the base's values)."""
        return {**defaults(strategy), **field_defaults(self.base)}

    def baseline(self, strategy: str) -> dict[str, Any]:
        """The strategy's published defaults, clipped into this study's ranges."""
        return baseline(self.spaces[strategy], self.defaults(strategy))

    def recipe_for(self, strategy: str, params: dict[str, Any], seed: int | None = None) -> Recipe:
        """The complete recipe of one trial: base + the strategy's stages for the budget, with
        the recipe fields it searches set."""
        own = {k: v for k, v in params.items() if k not in RECIPE_FIELDS}
        stages = stages_for(strategy, self.config.budget.epochs, self.n_groups, **{**defaults(strategy), **own})
        d = with_fields(self.base, {k: v for k, v in params.items() if k in RECIPE_FIELDS})
        d["stages"] = [s.model_dump(mode="json") for s in stages]
        if seed is not None:
            d["seed"] = seed
        return Recipe.from_dict(d, source=f"{self.source}: {strategy}")


def with_fields(base: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """A copy of the recipe dict `base` with each dotted field set (missing sections made)."""
    import copy
    d = copy.deepcopy(base)
    for path, value in fields.items():
        *parents, leaf = path.split(".")
        node = d
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return d


def field_defaults(base: dict[str, Any]) -> dict[str, Any]:
    """Each searchable recipe field's value in the base recipe; an optional section that is
    off (`optimizer.ema` absent) gives its schema's defaults."""
    import typing

    from pydantic import BaseModel
    recipe = Recipe.model_validate({**base, "stages": [{"epochs": 1, "lr": 1e-3}]})
    out = {}
    for path in RECIPE_FIELDS:
        node: Any = recipe
        for part in path.split("."):
            value = getattr(node, part)
            if value is None:   # `X | None`: the section's own defaults
                value = next(a for a in typing.get_args(type(node).model_fields[part].annotation)
                             if isinstance(a, type) and issubclass(a, BaseModel))()
            node = value
        out[path] = node
    return out


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; every problem is one HarnessError line."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise HarnessError(f"{path}: {format_validation_error(e, StudyConfig)}") from None
    try:
        cfg.compare.check()
    except ValueError as e:
        raise HarnessError(f"{path}: {e}") from None
    if cfg.pruner == "layout" and cfg.metric == "val/loss":
        raise HarnessError(f"{path}: pruner: layout judges beyond a proportion's binomial noise, and "
                           f"val/loss is not a proportion (use median, hyperband or none)")
    base = _base_recipe(cfg.recipe, path)
    fields = field_defaults(base)
    spaces = {}
    for strategy, raw_space in cfg.strategies.items():
        if strategy not in STRATEGIES:
            raise HarnessError(f"{path}: strategies.{strategy}: unknown strategy"
                               f"{did_you_mean(strategy, STRATEGIES)} (known: {', '.join(STRATEGIES)})")
        spaces[strategy] = _space(path, strategy, raw_space or {}, cfg.budget.epochs, fields)
    study = Study(cfg, base, spaces, str(path))
    for strategy in spaces:
        _probe(study, strategy)
    return study


def _base_recipe(recipe: dict | str, study_path: Path) -> dict:
    if isinstance(recipe, str):
        rp = Path(recipe)
        rp = rp if rp.is_absolute() or rp.exists() else study_path.parent / rp
        recipe = read_yaml(rp)
        recipe.pop("stages", None)  # a full recipe may be reused as a base: strategies make the stages
    elif "stages" in recipe:
        raise HarnessError(f"{study_path}: recipe.stages: not allowed in a study (each strategy makes its stages)")
    try:
        data = Recipe.model_validate({**recipe, "stages": [{"epochs": 1, "lr": 1e-3}]}).data
    except ValidationError as e:
        raise HarnessError(f"{study_path}: recipe.{format_validation_error(e, Recipe)}") from None
    # trials are scored on the validation split: without one, every trial would train and then fail
    own_val = data.dataset == "imagefolder" and all((Path(data.root) / d).is_dir() for d in ("train", "val"))
    if data.val_fraction == 0 and not own_val and not (data.dataset == "csv" and _csv_has_valid_rows(data)):
        raise HarnessError(f"{study_path}: recipe.data.val_fraction: a sweep needs a validation split "
                           f"(> 0, an image folder with its own train/ and val/ folders, or a CSV with valid rows)")
    return recipe


def _csv_has_valid_rows(data: Any) -> bool:
    """Whether a CSV dataset's split column marks some rows valid (they are the val split)."""
    from harness.engine.data.csvfile import scan_csv
    return "val" in scan_csv(data)[0]


def _space(path: Path, strategy: str, raw: dict, budget: int, fields: dict[str, Any]) -> Space:
    known = {**defaults(strategy), **fields}
    prefix = f"strategies.{strategy}"
    params: dict[str, ParamSpec] = {}
    for name, value in raw.items():
        if name not in known:
            what = "unknown recipe field (searchable: " + ", ".join(fields) if "." in str(name) else \
                "unknown hyperparameter" + did_you_mean(name, known) + " (known: " + ", ".join(known)
            raise HarnessError(f"{path}: {prefix}.{name}: {what})")
        try:
            params[name] = parse_param(f"{prefix}.{name}", value, known[name])
        except HarnessError as e:
            raise HarnessError(f"{path}: {e}") from None
    space = Space(params, STRATEGIES[strategy].rules)
    try:
        check_space(prefix, space, budget)
    except HarnessError as e:
        raise HarnessError(f"{path}: {e}") from None
    return space


def _probe(study: Study, strategy: str) -> None:
    """Build the stages at each end of every range: a value that would make an invalid
    stage (pct_start 1.5, lr 0, a budget too short for the strategy) is refused now."""
    space = study.spaces[strategy]
    base = study.baseline(strategy)
    fixed = {n: s.value for n, s in space.items() if s.kind == "fixed"}
    # each hyperparameter alone at each of its ends (fixed ones at their value), then all defaults
    candidates = [(name, value) for name, spec in space.items()
                  for value in dict.fromkeys((spec.lowest, spec.highest))]
    candidates.append((None, None))
    for name, value in candidates:
        if name in RECIPE_FIELDS:
            _probe_field(study, strategy, name, value)
            continue
        params = enforce_order({**base, **fixed, **({name: value} if name else {})}, space)
        params = {k: v for k, v in params.items() if k not in RECIPE_FIELDS}
        try:
            stages_for(strategy, study.config.budget.epochs, study.n_groups, **params)
        except HarnessError as e:
            raise HarnessError(f"{study.source}: strategies.{strategy}: {e}") from None
        except (ValidationError, TypeError) as e:
            msg = (format_validation_error(e, Recipe).split(": ", 1)[-1]
                   if isinstance(e, ValidationError) else str(e))
            where = f".{name}: {value!r}" if name else ": the defaults"
            raise HarnessError(f"{study.source}: strategies.{strategy}{where} gives an invalid stage "
                               f"({msg})") from None


def _probe_field(study: Study, strategy: str, name: str, value: Any) -> None:
    """A recipe field's value at one end of its range makes a valid recipe, or one line."""
    d = with_fields(study.base, {name: value})
    try:
        Recipe.model_validate({**d, "stages": [{"epochs": 1, "lr": 1e-3}]})
    except ValidationError as e:
        msg = format_validation_error(e, Recipe).split(": ", 1)[-1]
        raise HarnessError(f"{study.source}: strategies.{strategy}.{name}: {value!r} is not a valid "
                           f"{name} ({msg})") from None
