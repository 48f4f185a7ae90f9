"""The one schema: a Recipe describes one fine-tune (data, model, optimizer, stages, seed).

Frozen, validated pydantic models. `Recipe.from_yaml` / `to_yaml` round-trip, and every
invalid value is refused with a `HarnessError` whose one line names the field.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, Discriminator, Field, StrictBool, StrictInt, Tag,
                      ValidationError, field_validator, model_validator)

from harness.errors import HarnessError
from harness.engine.archs import TIMM_PREFIX, TORCHVISION_ARCHS, check_timm_arch, is_timm_model
from harness.engine.eval_crop import SMALL_IMAGE, default_crop_pct   # SMALL_IMAGE: at or below, CIFAR-style defaults
from harness.engine.schedule import DEFAULT_MOMS
from harness.engine.strict_model import StrictModel


def _no_bool(v: Any) -> Any:
    # pydantic's lax mode would read `true` as 1.0; a flag where a number belongs is a mistake
    if isinstance(v, bool):
        raise ValueError("expected a number, got a boolean")
    return v


Num = Annotated[float, BeforeValidator(_no_bool)]
Positive = Annotated[Num, Field(gt=0)]
Fraction = Annotated[Num, Field(gt=0, lt=1)]


class LRSlice(StrictModel):
    """fastai `slice(max)` (min omitted) or `slice(min, max)` across layer groups."""
    min: Positive | None = None
    max: Positive

    @model_validator(mode="after")
    def _ordered(self) -> "LRSlice":
        if self.min is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) must not exceed max ({self.max:g})")
        return self


class TrainLast(StrictModel):
    """Train only the last N layer groups (the head is the last group)."""
    last: Annotated[StrictInt, Field(ge=1)]


class TrainGroups(StrictModel):
    """Train exactly these layer groups (0-based, input -> output: the head is the last one);
    the others are frozen as `head` freezes the body (surgical fine-tuning)."""
    groups: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]

    @field_validator("groups")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"a group is listed twice in {v}")
        return sorted(v)   # one spelling per set: the same recipe hashes the same


class L2SP(StrictModel):
    """L2-SP (Li et al. 2018): the body decays toward its start weights, the head toward zero."""
    alpha_sp: Annotated[Num, Field(ge=0)]   # the body's decoupled pull toward theta_0
    beta: Annotated[Num, Field(ge=0)]       # the head's ordinary decoupled weight decay


# Union member tags show up in pydantic's error locations; they are named so that no real
# field can share the name, and format_loc drops them.
def _lr_tag(v: Any) -> str:
    return "<lr-slice>" if isinstance(v, (dict, LRSlice)) else "<lr-number>"


def _train_tag(v: Any) -> str:
    if isinstance(v, TrainGroups) or (isinstance(v, dict) and "groups" in v):
        return "<train-groups>"
    return "<train-last>" if isinstance(v, (dict, TrainLast)) else "<train-name>"


LR = Annotated[Union[Annotated[Positive, Tag("<lr-number>")], Annotated[LRSlice, Tag("<lr-slice>")]],
               Discriminator(_lr_tag)]
Train = Annotated[Union[Annotated[Literal["head", "all"], Tag("<train-name>")],
                        Annotated[TrainLast, Tag("<train-last>")],
                        Annotated[TrainGroups, Tag("<train-groups>")]], Discriminator(_train_tag)]
_UNION_TAGS = {"<lr-number>", "<lr-slice>", "<train-name>", "<train-last>", "<train-groups>"}
_TAG_MODELS = {"<lr-slice>": LRSlice, "<train-last>": TrainLast, "<train-groups>": TrainGroups}
_OPTIONAL_STAGE_FIELDS = ("layer_decay", "l2sp")   # left out of a recipe's YAML when unset


class Stage(StrictModel):
    """One one-cycle fit: which groups train, their peak LRs, and the cycle's shape."""
    epochs: Annotated[StrictInt, Field(ge=1)]
    train: Train = "all"
    lr: LR
    pct_start: Fraction = 0.25
    div: Positive = 25.0
    div_final: Positive = 1e5
    moms: tuple[Fraction, Fraction, Fraction] = DEFAULT_MOMS
    # layer-wise LR decay: each block's peak LR is lr * layer_decay^(depth - block)
    # (harness/engine/layer_decay.py); unset: every parameter of a group at the group's LR
    layer_decay: Annotated[Num, Field(gt=0, le=1)] | None = None
    l2sp: L2SP | None = None   # decay toward the start weights (harness/engine/l2sp.py)

    @model_validator(mode="after")
    def _decay_needs_one_lr(self) -> "Stage":
        if self.layer_decay is not None and isinstance(self.lr, LRSlice):
            raise ValueError("layer_decay spreads one lr over the blocks: give lr as a number, not a slice")
        return self

    def trainable_groups(self, n_groups: int) -> int:
        """How many groups train in this stage."""
        if self.train == "all":
            return n_groups
        if self.train == "head":
            return 1
        if isinstance(self.train, TrainGroups):
            return len(self.train.groups)
        return self.train.last

    def trained_groups(self, n_groups: int) -> tuple[int, ...]:
        """The groups (0-based, input -> output, the head last) that train in this stage."""
        if isinstance(self.train, TrainGroups):
            return tuple(self.train.groups)
        return tuple(range(n_groups - self.trainable_groups(n_groups), n_groups))

    def peak_lrs(self, n_groups: int) -> list[float]:
        """Peak LR per group, input -> output (fastai's slice semantics)."""
        from harness.engine.schedule import group_lrs
        if isinstance(self.lr, LRSlice):
            return group_lrs(self.lr.min, self.lr.max, n_groups, sliced=True)
        return group_lrs(None, self.lr, n_groups, sliced=False)




def _augment_name(v: Any) -> Any:
    # `true` / `false` keep their meaning from before augment was a choice
    if v is True:
        return "flip"
    if v is False:
        return "none"
    return v


Column = Union[StrictInt, str]   # a CSV column: its name, or its 0-based position


class DataConfig(StrictModel):
    dataset: Literal["fashion-mnist", "imagefolder", "csv"] = "fashion-mnist"
    root: str | None = None         # imagefolder: the folder
    csv: str | None = None          # csv: the CSV file; image paths are relative to its folder
    fn_col: Column = 0              # csv: the image path column (fastai's fn_col)
    label_col: Column = 1           # csv: the label column (fastai's label_col)
    valid_col: str | None = None    # csv: the split column (train/valid/test, or booleans as is_valid)
    label_delim: str | None = None  # csv: multi-label labels (refused for now: single-label only)
    classes: Annotated[list[Union[StrictInt, str]], Field(min_length=2)] | None = None
    train_per_class: Annotated[StrictInt, Field(ge=1)] | None = None
    test_per_class: Annotated[StrictInt, Field(ge=1)] | None = None   # None: the whole test split
    val_fraction: Annotated[Num, Field(ge=0, lt=1)] = 0.2
    image_size: Annotated[StrictInt, Field(ge=8)] = 32
    batch_size: Annotated[StrictInt, Field(ge=2)] = 64
    # unset: flip at <= 64 px, fastai above (resolved on reading, so an exported recipe names it)
    augment: Annotated[Literal["none", "flip", "fastai", "randaugment"], BeforeValidator(_augment_name)] = "flip"
    # evaluation: resize to image_size / crop_pct, centre-crop image_size; None: 1.0 at <= 64 px,
    # above it the weights' own (timm's pretrained_cfg crop_pct, torchvision's eval transform)
    crop_pct: Annotated[Num, Field(gt=0, le=1)] | None = None
    residency: Literal["auto", "device", "host"] = "auto"   # where decoded images live (memory plan)

    @model_validator(mode="after")
    def _inputs_for_dataset(self) -> "DataConfig":
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError("root is required when dataset is imagefolder")
        if self.dataset == "csv" and not self.csv:
            raise ValueError("csv is required when dataset is csv (the CSV file of image paths and labels)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_augment(cls, d: Any) -> Any:
        if isinstance(d, dict) and d.get("augment") is None:
            size = d.get("image_size", 32)
            small = not isinstance(size, int) or size <= SMALL_IMAGE   # a bad size is refused by its own field
            d = {**d, "augment": "flip" if small else "fastai"}
        return d


class ModelConfig(StrictModel):
    arch: str = "resnet18"  # a torchvision arch (fastai's splits), or timm/<name> (any timm model)
    weights: str = "none"   # none | imagenet | path to a harness checkpoint
    head: Literal["fastai", "linear"] = "fastai"
    train_bn: bool = True
    groups: Annotated[StrictInt, Field(ge=2)] = 3   # layer groups, the head included

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v.startswith(TIMM_PREFIX):
            check_timm_arch(v)
            return v
        if v not in TORCHVISION_ARCHS:
            hint = f" (did you mean '{TIMM_PREFIX}{v}'?)" if is_timm_model(v) else did_you_mean(v, TORCHVISION_ARCHS)
            raise ValueError(f"unknown arch '{v}'{hint} "
                             f"(known: {', '.join(TORCHVISION_ARCHS)}, or timm/<name> for any timm model)")
        return v

    @field_validator("groups")
    @classmethod
    def _groups_for_arch(cls, v: int, info) -> int:
        arch = info.data.get("arch")
        if arch and not arch.startswith(TIMM_PREFIX) and v != 3:
            raise ValueError(f"{arch} has fastai's 3-group split; use arch {TIMM_PREFIX}{arch} for {v} groups")
        return v


class EmaConfig(StrictModel):
    """A moving average of the weights (timm's ModelEmaV3, harness/engine/ema.py): validation,
    test and compare score it. decay 0 is the raw model; warmup ramps the decay up from 0."""
    decay: Annotated[Num, Field(ge=0, lt=1)] = 0.9999   # ModelEmaV3's default
    warmup: StrictBool = True                             # ModelEmaV3's use_warmup (gamma 1, power 2/3)


class OptimizerConfig(StrictModel):
    weight_decay: Annotated[Num, Field(ge=0)] = 0.01
    eps: Positive = 1e-5
    sqr_mom: Fraction = 0.99
    ema: EmaConfig | None = None    # off unless given


class Recipe(StrictModel):
    """One fine-tune, fully resolved: replaying it reproduces the run."""
    seed: Annotated[StrictInt, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    stages: Annotated[list[Stage], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _resolve_crop_pct(cls, d: Any) -> Any:
        """An unset data.crop_pct becomes a number here, from the image size and the weights
        (harness/engine/eval_crop.py), so an exported recipe names it and replays exactly."""
        if not isinstance(d, dict):
            return d
        data, model = d.get("data", {}), d.get("model", {})
        if isinstance(data, DataConfig):
            data = data.model_dump()
        if isinstance(model, ModelConfig):
            model = model.model_dump()
        if not isinstance(data, dict) or not isinstance(model, dict) or data.get("crop_pct") is not None:
            return d
        crop_pct = default_crop_pct(data.get("image_size", DataConfig.model_fields["image_size"].default),
                                    model.get("arch", ModelConfig.model_fields["arch"].default),
                                    model.get("weights", ModelConfig.model_fields["weights"].default))
        return d if crop_pct is None else {**d, "data": {**data, "crop_pct": crop_pct}}

    @model_validator(mode="after")
    def _stages_fit_model(self) -> "Recipe":
        n = self.model.groups
        for i, st in enumerate(self.stages):
            if isinstance(st.train, TrainGroups) and st.train.groups[-1] >= n:
                raise ValueError(f"stages[{i}].train.groups: group {st.train.groups[-1]} is out of range "
                                 f"({self.model.arch} has {n} layer groups: 0..{n - 1}, the head {n - 1})")
            if st.trainable_groups(n) > n:
                raise ValueError(f"stages[{i}].train: last {st.trainable_groups(n)} exceeds the "
                                 f"{n} layer groups of {self.model.arch}")
        return self

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    # --- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, source: str = "recipe") -> "Recipe":
        """Validate a plain dict; a bad value raises HarnessError naming `source` and the field."""
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise HarnessError(f"{source}: {format_validation_error(e, cls)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(read_yaml(path), source=str(path))

    def to_dict(self) -> dict:
        """The YAML-shaped dict (defaults resolved; `lr.min`, `optimizer.ema` and the unset
        optional stage fields left out, so a recipe that does not use them reads and hashes as
        before they existed)."""
        d = self.model_dump(mode="json")
        if d["optimizer"]["ema"] is None:
            del d["optimizer"]["ema"]
        for st in d["stages"]:
            if isinstance(st["lr"], dict) and st["lr"]["min"] is None:
                del st["lr"]["min"]
            for name in _OPTIONAL_STAGE_FIELDS:
                if st[name] is None:
                    del st[name]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with top-level fields changed, validated again."""
        return Recipe.from_dict({**self.to_dict(), **changes})


def config_hash(recipe: Recipe) -> str:
    """What a recipe trains, as a short hash: the key of pretrained bodies and stage checkpoints.
    The device is left out: it does not change what is learned enough to train again for it."""
    import hashlib
    return hashlib.sha256(recipe.replace(device="auto").to_yaml().encode()).hexdigest()[:16]


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}, 'l': [x, y]} -> {'a.b': '1', 'l.0': ...}; lists of scalars stay whole
    (a recipe as MLflow params, and the field where two recipes differ)."""
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


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely; a missing file or bad syntax is a one-line HarnessError."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise HarnessError(f"{p}: file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise HarnessError(f"{p}: cannot read ({e.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise HarnessError(f"{p}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{p}: expected a mapping of fields, got {type(data).__name__}")
    return data


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model found by walking `loc` from `model` (for did-you-mean)."""
    import typing
    current: Any = model
    for part in loc:
        if part in _TAG_MODELS:   # the union member the value was read as
            current = _TAG_MODELS[part]
            continue
        if isinstance(part, int) or part in _UNION_TAGS:
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = field.annotation
        # unwrap Optional / list / Annotated / Union down to a model class, if any
        for _ in range(6):
            if isinstance(current, type) and issubclass(current, BaseModel):
                break
            args = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a
                    for a in typing.get_args(current) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            current = models[0] if models else (args[0] if args else None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part in _UNION_TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(e: ValidationError, model: type[BaseModel]) -> str:
    """The first error of `e` as 'field.path: what is wrong' on one line."""
    errors = e.errors()
    err = errors[0]
    # a required field missing beside an unknown key: the unknown key is the misspelt one
    err = next((x for x in errors if x["type"] == "extra_forbidden" and tuple(x["loc"])[:-1] == tuple(err["loc"])[:-1]), err)
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        name = loc[-1]
        hint = did_you_mean(name, _fields_at(model, loc[:-1]))
        return f"{format_loc(loc)}: unknown key{hint}"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] not in ("value_error", "assertion_error") and "input" in err:
        shown = repr(err["input"])
        msg += f" (got {shown if len(shown) < 60 else shown[:57] + '...'})"
    where = format_loc(loc)
    return f"{where}: {msg}" if where else msg
