"""Typed configuration that flows from the search space to the model.

``ExperimentConfig`` = data + model + training settings of one trial. The search
space (``space.py``) fills it from YAML and sampled values; the trainable, the
training loop, the datasets and :class:`~ips_search.model.IPSNet` each read only
their own part.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from ips_search.errors import ConfigError

LOADING_MODES = ("eager", "eager-sequential", "lazy")
SHUFFLES = ("none", "batch", "instance")
MEGAPIXEL_TASKS = ("majority", "max", "top", "multilabel")
METRICS = ("auc", "balanced_accuracy", "accuracy")  # evaluation.metric: what a search ranks configs by
SEED_LIMIT = 2**32  # numpy's: seeds are 0 .. 2**32 - 1


# -- registries -----------------------------------------------------------------------------------------------------
# Datasets (ips_search.data), encoders (ips_search.model.encoders) and extraction encoders (ips_search.extraction)
# register a name and an entry in their own module; the code asks the registry, never a list of names. The
# registries live above this module, so config checks only their fields' types and the registry's owner checks the
# name (space loading, building the data or the model), with the message a choice field gives.
class Named(Protocol):
    name: str


E = TypeVar("E", bound=Named)


class Registry(Generic[E]):
    """Entries by name, in registration order, like timm's model registry: ``REGISTRY[name]`` or a one-line
    "unknown ``noun`` 'x' in ``where``; choose one of ...". ``where`` names the config field that holds the name."""

    def __init__(self, noun: str, where: str) -> None:
        self.noun, self.where = noun, where
        self._entries: dict[str, E] = {}

    def register(self, entry: E) -> E:
        if entry.name in self._entries:
            raise ValueError(f"{self.noun} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        del self._entries[name]

    def get(self, name: Any, where: str | None = None) -> E:
        """The entry ``name`` registers, else a ConfigError naming the field ``where`` (default: the registry's)."""
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(f"unknown {self.noun} {name!r} in {where or self.where}; choose one of {', '.join(self)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> E:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def entries(self) -> list[E]:
        return list(self._entries.values())


# -- field validation -----------------------------------------------------------------------------------------------
# One mechanism checks every field of data, model and train when the config is built (so when a space is loaded,
# before Ray or any data build): the field's annotation gives its type (int, float, bool, str, a Literal's choices, a
# mapping, a list of items, ``| None`` for optional) and RULES narrows it where the type says too little (ranges,
# choices). A field that RULES does not name is still type-checked, so a new field is never unchecked.
class FieldError(ConfigError):
    """A field's bad value: one line naming ``<where>.<key>``, the value and the fix; :meth:`at` renames ``where``."""

    def __init__(self, where: str, key: str, render: Callable[[str], str]) -> None:
        super().__init__(render(f"{where}.{key}"))
        self.key, self.render = key, render

    def at(self, where: str) -> FieldError:
        return FieldError(where, self.key, self.render)


@dataclass(frozen=True)
class Rule:
    """What a field accepts: ``ok(value)`` is true, else "``<where>`` must be ``expects``, got ...; ``fix``".

    ``noun`` makes the rule a choice among names: "unknown ``noun`` 'x' in ``<where>``; choose one of ...".
    """

    ok: Callable[[Any], bool]
    expects: str
    fix: str
    noun: str | None = None

    def error(self, where: str, key: str, value: Any) -> FieldError:
        if self.noun:
            return FieldError(where, key, lambda at: f"unknown {self.noun} {value!r} in {at}; {self.fix}")
        fix = self.fix
        if isinstance(value, str) and _looks_numeric(value) and "e" in value.lower():  # YAML 1.1: 1e-4 is text
            fix = f"write it as a number with a dot (YAML reads {value} as text: write 1.0e-4, not 1e-4)"
        elif isinstance(value, str) and _looks_numeric(value):
            fix = "write the number without quotes"
        elif isinstance(value, str) and self.expects == BOOL.expects:
            fix = "write true or false without quotes"
        return FieldError(where, key, lambda at: f"{at} must be {self.expects}, got {value!r}; {fix}")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(fix: str = "set it to 1 or more") -> Rule:
    return Rule(lambda v: _is_int(v) and v >= 1, "a positive integer", fix)


def count(fix: str = "set it to 0 or more") -> Rule:
    return Rule(lambda v: _is_int(v) and v >= 0, "0 or a positive integer", fix)


def number(
    low: float | None = None, high: float | None = None, *, open_low: bool = False, open_high: bool = False, fix: str
) -> Rule:
    """A finite int or float in a range (``open_*``: the bound itself is excluded)."""

    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        if low is not None and (v < low or (open_low and v == low)):
            return False
        return high is None or (v < high if open_high else v <= high)

    if low is not None and high is not None:
        expects = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    elif low == 0 and open_low:
        expects = "a positive number"
    elif low is not None:
        expects = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        expects = "a number"
    return Rule(ok, expects, fix)


def choice(options: tuple[str, ...], noun: str) -> Rule:
    return Rule(
        lambda v: isinstance(v, str) and v in options,
        f"one of {', '.join(options)}",
        f"choose one of {', '.join(options)}",
        noun,
    )


def seed() -> Rule:
    return Rule(lambda v: _is_int(v) and 0 <= v < SEED_LIMIT, "an integer from 0 to 2**32 - 1", "use e.g. 0")


BOOL = Rule(lambda v: isinstance(v, bool), "true or false", "write true or false")
PATH = Rule(
    lambda v: isinstance(v, str) and v.strip() != "",
    "a path (text)",
    "write the path as text, in quotes if it could read as a number or list",
)


def _type_rule(hint: Any) -> Rule | None:
    """The rule a field's annotation implies (None: anything goes, e.g. ``Any``)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        options = tuple(typing.get_args(hint))
        return Rule(lambda v: v in options, f"one of {', '.join(options)}", f"choose one of {', '.join(options)}")
    if hint is bool:
        return BOOL
    if hint is int:
        return Rule(_is_int, "an integer", "write a whole number")
    if hint is float:
        return number(fix="write a number")
    if hint is str:
        return Rule(lambda v: isinstance(v, str), "text", "write it as text")
    if hint is dict or origin is dict:
        return Rule(lambda v: isinstance(v, dict), "a mapping", "write it as {key: value, ...}")
    if isinstance(hint, type) and hint is not object:
        return Rule(lambda v: isinstance(v, hint), f"a {hint.__name__}", f"give a {hint.__name__}")
    return None


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[Any, bool, bool]]:
    """Per field: (its type without None, whether None is allowed, whether it is a list of that type)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint, optional = hints[f.name], False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(args) < len(typing.get_args(hint))
            hint = args[0] if len(args) == 1 else Any
        many = typing.get_origin(hint) is tuple
        if many:
            hint = typing.get_args(hint)[0]
        out[f.name] = (hint, optional, many)
    return out


def check_fields(obj: Any, where: str, rules: Mapping[str, Rule]) -> None:
    """Check every field of dataclass ``obj``: its ``rules`` entry, else what its annotation implies.

    A list field (``tuple[X, ...]``) must be a list, and its rule applies to each item. Raises :class:`FieldError`.
    """
    for name, (hint, optional, many) in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        rule = rules.get(name) or _type_rule(hint)
        if many:
            if not isinstance(value, (list, tuple)):
                text = f"must be a list, got {value!r}; write " + (f"[{value}]" if isinstance(value, str) else "[a, b]")
                raise FieldError(where, name, lambda at, text=text: f"{at} {text}")
            bad = [item for item in value if rule is not None and not rule.ok(item)]
            if bad:
                raise rule.error(where, name, bad[0])
        elif rule is not None and not rule.ok(value):
            raise rule.error(where, name, value)


_DROPOUT_FIX = "use a rate from 0 (off) up to below 1, e.g. 0.1"
_FRACTION_FIX = "use a share strictly between 0 and 1, e.g. 0.2"
_PATHS = ("root", "manifest", "slides_root", "cache_dir")
# Range rules of the fields whose type says too little; the other fields are checked by type alone.
RULES: dict[str, dict[str, Rule]] = {
    "Task": {
        "name": Rule(
            lambda v: isinstance(v, str) and v != "" and "." not in v,
            "a non-empty name without dots",
            "name the task, e.g. label",
        ),
        "n_class": positive_int("give the number of classes, at least 1"),
    },
    "IPSConfig": {
        **{k: positive_int() for k in ("n_class", "n_chan", "memory_size", "iteration_size", "patch_size")},
        **{k: positive_int() for k in ("patch_stride", "dim", "heads", "d_k", "d_v", "d_inner", "encode_chunk")},
        "dropout": number(0, 1, open_high=True, fix=_DROPOUT_FIX),
        "attn_dropout": number(0, 1, open_high=True, fix=_DROPOUT_FIX),
        "loading": choice(LOADING_MODES, "loading mode"),
        "shuffle": choice(SHUFFLES, "shuffle"),
        "ips_dtype": choice(("float32", "bfloat16"), "ips_dtype"),
        "ips_impl": choice(("streaming", "reference"), "ips_impl"),
    },
    "DataConfig": {
        **{k: positive_int() for k in ("patch_size", "patch_stride", "canvas_size", "digit_size", "n_digits")},
        **{k: positive_int() for k in ("n_train", "n_test", "image_size", "n_chan", "slide_size")},
        "n_noise": count(),
        "augment_shift": count("set it to 0 (off) or a shift in pixels"),
        "val_fraction": number(0, 1, open_low=True, open_high=True, fix=_FRACTION_FIX),
        "test_fraction": number(0, 1, open_low=True, open_high=True, fix=_FRACTION_FIX),
        "tasks": choice(MEGAPIXEL_TASKS, "task"),
        **{k: PATH for k in _PATHS},
        "level": count("use 0 (full resolution) or a higher pyramid level"),
        "mpp": number(0, open_low=True, fix="give the microns per pixel to read at, e.g. 0.5"),
        "min_foreground": number(0, 1, fix="use a tissue share from 0 (keep every patch) to 1"),
        "cohort_size": count("use 0 (read root/manifest) or the number of slides to generate"),
        "feature_items": choice(("auto", "tensor", "source"), "feature_items"),
        "max_pixels": positive_int("give the largest image area to decode, e.g. 1000000000"),
        "seed": seed(),
    },
    "TrainConfig": {
        "epochs": positive_int(),
        "batch_size": positive_int(),
        "lr": number(0, open_low=True, fix="use a learning rate like 1.0e-3"),
        "weight_decay": number(0, fix="use 0 (off) or a positive number"),
        "warmup_epochs": number(0, fix="use 0 (no warm-up) or a positive number of epochs"),
        "min_lr_ratio": number(0, 1, fix="use a share of lr from 0 to 1, e.g. 0.01"),
        "grad_clip": number(0, open_low=True, fix="use a positive norm like 1.0, or null for no clipping"),
        "num_workers": count("use 0 (load in the trial's process) or a number of worker processes"),
        "device": Rule(
            lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
            "auto, cpu, cuda or cuda:N",
            "use auto, cpu, cuda or cuda:N",
        ),
        "seed": seed(),
    },
    "EvaluationConfig": {
        "metric": choice(METRICS, "metric"),
        "folds": positive_int("use 1 (one validation split) or the number of cross-validation folds, e.g. 5"),
    },
}


@dataclass(frozen=True)
class Task:
    """One prediction target: one query token and one head in the transformer.

    ``multi_label`` tasks use a sigmoid per class (BCE loss); others a softmax (CE loss).
    """

    name: str
    n_class: int
    multi_label: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "task", RULES["Task"])


@dataclass
class IPSConfig:
    """Model settings for :class:`~ips_search.model.IPSNet`.

    M = ``memory_size`` (patches kept), I = ``iteration_size`` (patches scored per
    iteration), P = ``patch_size``, D = ``dim``.
    """

    n_class: int = 10
    n_chan: int = 1  # image channels C; for the projector encoder, the embedding width D_in of the features
    memory_size: int = 5  # M
    iteration_size: int = 5  # I
    patch_size: int = 100  # P
    patch_stride: int | None = None  # defaults to patch_size (non-overlapping)
    encoder: str = "resnet18"
    pretrained: bool = False  # ImageNet weights (downloads; opt-in)
    dim: int = 512  # D
    heads: int = 8  # H
    d_k: int = 64
    d_v: int = 64
    d_inner: int = 2048
    dropout: float = 0.1
    attn_dropout: float = 0.1
    use_pos: bool = False  # 1-D sinusoidal positional encoding of the patch index
    orient_scores: bool = True  # before training, flip heads that score background first (IPSNet.orient_scores)
    tasks: tuple[Task, ...] = ()  # empty: one softmax task "label" with n_class classes
    encode_chunk: int = 256  # patches per encoder call in the no-grad IPS pass
    loading: str = "eager"  # eager | eager-sequential | lazy
    # training only: stream the patches in a random order (one per batch, or one per image), as the original IPS
    # code can; with several heads a patch's score depends on its company, so the order changes what is kept
    shuffle: str = "none"  # none | batch | instance
    fold_bn: bool = True  # fold BatchNorm into convs for the no-grad pass (same result, faster)
    ips_dtype: str = "float32"  # float32 | bfloat16: autocast dtype of the no-grad pass
    ips_impl: str = "streaming"  # streaming (chunked encoding) | reference (the notebook's per-iteration loop)

    def __post_init__(self) -> None:
        self.tasks = _tasks(self.tasks)
        if not self.tasks and _is_int(self.n_class):  # a bad n_class is named by validate()
            self.tasks = (Task("label", self.n_class),)
        if self.patch_stride is None:
            self.patch_stride = self.patch_size
        self.validate()

    @property
    def stride(self) -> int:
        assert self.patch_stride is not None
        return self.patch_stride

    def validate(self) -> None:
        """Every field's type and range (:data:`RULES`); the heads need not divide ``dim`` (each has ``d_k``)."""
        check_fields(self, "model", RULES["IPSConfig"])
        names = [t.name for t in self.tasks]
        if len(set(names)) < len(names):
            raise ConfigError(f"model.tasks names a task twice ({', '.join(names)}); give each task its own name")


def _tasks(raw: Any) -> Any:
    """``model.tasks`` as Task objects: each a Task or a mapping ``{name, n_class[, multi_label]}``."""
    if not isinstance(raw, (list, tuple)):
        return raw  # validate() names it
    tasks = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            item = build_config(Task, item, f"model.tasks[{i}]", prefix=f"model.tasks[{i}]")
        elif not isinstance(item, Task):
            raise ConfigError(
                f"model.tasks[{i}] must be a mapping like {{name: label, n_class: 10}}, got {item!r}; write it so"
            )
        tasks.append(item)
    return tuple(tasks)


@dataclass
class DataConfig:
    """Which dataset and how it is cut into patches (P = ``patch_size``)."""

    dataset: str = "megapixel"
    patch_size: int = 32
    patch_stride: int | None = None
    # megapixel
    canvas_size: int = 256
    digit_size: int = 28
    n_digits: int = 5
    n_noise: int = 20  # scribble strokes; the paper uses 50 on 1500x1500 canvases
    n_train: int = 1500  # canvases with training-split digits (validation is carved from these)
    n_test: int = 500
    val_fraction: float = 0.2
    tasks: tuple[str, ...] = ("majority",)
    # source digits (ips_search/data/digits.py): sklearn's 8x8 digits, mnist's 5,000 packaged real digits (both
    # offline), mnist-full torchvision's 70,000 (on disk, or download: true)
    digits: Literal["sklearn", "mnist", "mnist-full"] = "sklearn"
    augment_digits: bool = False  # train canvases only: each placed digit randomly rotated, scaled and sheared
    # megapixel, mnist-resized, folder: every read of a *training* image shifts it by up to this many pixels (zero
    # fill), so the patch grid cuts its content differently each epoch; validation and test images never move
    augment_shift: int = 0
    # mnist-resized
    image_size: int = 500
    # folder, slides, features
    root: str | None = None  # folder: class folders; slides: class folders of slides; features: the .h5 files
    n_chan: int = 3
    # slides and features: a CSV listing the items (slides: path,label[,split]; features: slide,label[,split])
    manifest: str | None = None
    # slides: whole-slide images / big scenes read lazily (patch_size and patch_stride are pixels at `level`)
    level: int | None = None  # pyramid level (0 = full resolution); default 0 unless mpp is set
    mpp: float | None = None  # target microns per pixel: read at the nearest level, resampled to it
    min_foreground: float = 0.5  # keep patches at least this tissue fraction (Otsu); 0 keeps every patch
    cohort_size: int = 0  # no root/manifest: generate this many synthetic slides into the cache dir
    slide_size: int = 3072  # side (level 0 pixels) of the generated slides
    # features (see ips_search/data/features.py)
    extract: dict[str, Any] | None = None  # extraction settings: the features are extracted on first use
    test_fraction: float = 0.2  # features without a split column: share of slides held out for test
    feature_items: str = "auto"  # auto | tensor | source: items as in-RAM (N, D) tensors or lazy sources
    slides_root: str | None = None  # features: the slides they were cut from (<slide>.<ext>), for attention maps
    # folder, slides: a plain image (PNG, JPEG, strip TIFF, ...) is decoded whole; one whose header claims more pixels
    # is refused before decoding (1 gigapixel: about 3 GB of RAM for RGB). Tiled slides are read lazily, never whole
    max_pixels: int = 1_000_000_000
    # common
    seed: int = 0
    download: bool = False  # opt-in network access (MNIST)
    cache_dir: str | None = None  # default: $IPS_SEARCH_CACHE or ~/.cache/ips-search

    def __post_init__(self) -> None:
        check_fields(self, "data", RULES["DataConfig"])  # every field's type and range, before any default is filled
        self.tasks = tuple(self.tasks)
        if self.patch_stride is None:
            self.patch_stride = self.patch_size
        if self.mpp is not None and self.level is not None:
            raise ConfigError("set either level or mpp for dataset: slides, not both")


@dataclass
class TrainConfig:
    """Optimisation settings: AdamW with linear warm-up then cosine decay."""

    epochs: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 1.0
    warm_start: bool = True  # start the encoder from the cached digit-pretrained weights
    amp: bool = True  # bfloat16 autocast for the training step on CUDA (no-op on CPU)
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "train", RULES["TrainConfig"])


@dataclass
class EvaluationConfig:
    """How a config is scored: the metric, and K patient-level cross-validation folds of the non-test items.

    ``splits`` names a splits file (``splits.csv``: ``slide,patient,label,split,fold``) or a folder of CLAM's
    ``splits_{k}.csv``; the search writes its own into the experiment folder and points every trial at it.
    ``refit`` trains on every non-test item with no validation (the confirm stage and the full-bag reference)."""

    metric: str = "accuracy"  # auc | balanced_accuracy | accuracy (see ips_search.scores)
    folds: int = 1  # 1: one validation split
    splits: str | None = None
    refit: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "evaluation", RULES["EvaluationConfig"])


@dataclass
class ExperimentConfig:
    """Everything one trial needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: IPSConfig = field(default_factory=IPSConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """The config of a space's sections (names are checked by :func:`ips_search.space.experiment_config`)."""
        return cls(
            data=DataConfig(**d.get("data", {})),
            model=IPSConfig(**d.get("model", {})),
            train=TrainConfig(**d.get("train", {})),
            evaluation=EvaluationConfig(**d.get("evaluation", {})),
        )


def build_config(section: type, values: dict[str, Any], where: str, prefix: str | None = None) -> Any:
    """Instantiate a config dataclass, turning unknown keys and bad values into a one-line ConfigError.

    ``prefix`` names the section in a field's error when it is not the class's own (``data.extract.from``).
    """
    known = {f.name for f in dataclasses.fields(section)}
    unknown = sorted(set(map(str, values)) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; known keys: {', '.join(sorted(known))}")
    try:
        return section(**values)
    except FieldError as exc:
        if prefix is None:
            raise
        raise exc.at(prefix) from None
    except TypeError as exc:
        raise ConfigError(f"bad value in {where}: {exc}") from None
