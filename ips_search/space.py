"""Search spaces: YAML files of fixed settings plus searched parameters.

A space file (``search_spaces/<name>.yaml``, loaded with ``yaml.safe_load``)::

    data:  {dataset: megapixel, canvas_size: 256, ...}   # fixed DataConfig fields
    model: {encoder: small-cnn, dim: 64, ...}            # fixed IPSConfig fields
    train: {epochs: 4, batch_size: 16, ...}              # fixed TrainConfig fields
    search:                                               # searched parameters
      patch_size: {choices: [32, 64]}                     # P
      memory_size: {low: 2, high: 16, log: true}          # M
      iteration_size: {low: 2, high: 32, log: true}       # I
      lr: {low: 1.0e-4, high: 3.0e-3, log: true}
    first: [{patch_size: 32, memory_size: 4, ...}]        # configs evaluated first (optional)

M and I depend on the patch count N, which depends on P. So the define-by-run
space (:func:`define_space`) samples P first, then M and I as *quantiles* of their
feasible ranges (``M in [low, min(high, N - 1)]``, ``I in [low, min(high, N - M)]``,
on a log scale when asked): the sampler sees fixed ``[0, 1]`` distributions it can
model jointly with P, and every config satisfies ``M < N`` and ``I <= N - M``. A space that searches no M but runs
under a memory budget gets an M range from the driver (:func:`ips_search.search.plan.budget_memory_range`): up to the
largest M predicted to fit at each P, kept per P in ``memory_highs``.

Paths in a space (``data``'s ``root``, ``manifest``, ``cache_dir``, ``slides_root``, the same keys of
``data.extract.from``, and a TorchScript file named by ``data.extract.encoder``) are resolved once, when the space
is loaded: a relative path is taken relative to the current working directory of the command (not to the space
file), ``~`` is expanded, and the absolute path is what the trials use and what ``experiment.json`` saves (Ray
runs each trial in another working directory, so a relative path there would point elsewhere).

``data.dataset`` and ``model.encoder`` name registered kinds (:data:`ips_search.data.DATASETS`,
:data:`ips_search.model.encoders.ENCODERS`), checked here when the space loads. A dataset kind may name a default
encoder (``dataset: features`` holds patch embeddings, which only the ``projector`` reads): a space that names no
encoder gets it, saved explicitly; an encoder that does not read what the dataset holds is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ips_search.config import DataConfig, EvaluationConfig, ExperimentConfig, IPSConfig, TrainConfig, build_config
from ips_search.data import DATASETS, DatasetKind, dataset_kind
from ips_search.errors import ConfigError
from ips_search.experiment.record import QUANTILE_SUFFIX
from ips_search.model.encoders import ENCODERS

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
SECTIONS = {"data": DataConfig, "model": IPSConfig, "train": TrainConfig, "evaluation": EvaluationConfig}
SEARCHABLE = ("data", "model", "train")  # the sections a search may sample into (evaluation is the same for all)
DERIVED = ("memory_size", "iteration_size")  # sampled as quantiles of a range that depends on N
PATH_FIELDS = ("root", "manifest", "cache_dir", "slides_root")  # data fields that name files: resolved at load
# where a searched parameter lands: the first section with that field, so the data's geometry (patch_size,
# patch_stride, n_chan, tasks) lands in data, which gives it to the model (DataGeometry.model_config)
PARAM_SECTIONS: dict[str, tuple[str, ...]] = {}
for _section in SEARCHABLE:
    for _f in dataclasses.fields(SECTIONS[_section]):
        PARAM_SECTIONS.setdefault(_f.name, (_section,))


@dataclass
class Param:
    """One searched parameter: categorical ``choices``, or a numeric ``low``..``high`` range."""

    name: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass
class SearchSpace:
    """A parsed, validated space: fixed sections, searched parameters, configs to try first."""

    name: str
    fixed: dict[str, dict[str, Any]]
    params: dict[str, Param]
    first: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    path: str | None = None  # the YAML file it was read from
    # N per patch size of datasets whose N comes from their files (slides, features): the smallest N of any item,
    # known once the driver has built the data (plan.prepare_data); saved with the space
    patch_counts: dict[int, int] = field(default_factory=dict)
    # per patch size, the largest M the memory budget fits (:func:`ips_search.search.plan.budget_memory_range`, run
    # once by the driver when the space searches no M of its own); saved with the space, so trials and a resume
    # sample the same range. 0: not even the smallest M fits at that patch size
    memory_highs: dict[int, int] = field(default_factory=dict)

    def base_config(self) -> ExperimentConfig:
        return experiment_config(self.fixed)

    @property
    def dataset(self) -> DatasetKind:
        return DATASETS[self.base_config().data.dataset]

    @property
    def counts_from_files(self) -> bool:
        """N depends on the files (slide sizes and tissue, feature rows), not on the config alone."""
        return self.dataset.variable_n

    def n_patches(self, patch_size: int, patch_stride: int | None = None) -> int | None:
        """N for a patch size: from the image size of the fixed data settings; where each item has its own N
        (slides, features) the smallest N of the built data, or ``None`` before it is built."""
        data = self.base_config().data
        kind = DATASETS[data.dataset]
        if kind.image_side is None:
            return self.patch_counts.get(int(patch_size))
        side = kind.image_side(data)
        stride = patch_stride or self.fixed.get("data", {}).get("patch_stride") or patch_size
        if patch_size > side:
            return 0
        per_side = (side - patch_size) // stride + 1
        return per_side * per_side

    def patch_sizes(self) -> list[int]:
        p = self.params.get("patch_size")
        if p is None:
            return [self.base_config().data.patch_size]
        if p.choices is not None:
            return [int(c) for c in p.choices]
        return list(range(int(p.low), int(p.high) + 1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            **self.fixed,
            "search": {k: _param_to_dict(p) for k, p in self.params.items()},
            "first": self.first,
            **({"patch_counts": {str(k): v for k, v in self.patch_counts.items()}} if self.patch_counts else {}),
            **({"memory_highs": {str(k): v for k, v in self.memory_highs.items()}} if self.memory_highs else {}),
        }


def _param_to_dict(p: Param) -> dict[str, Any]:
    if p.choices is not None:
        return {"choices": p.choices}
    return {"low": p.low, "high": p.high, "log": p.log}


def resolve_space_path(name_or_path: str) -> Path:
    """A YAML path as given, else ``search_spaces/<name>.yaml`` (cwd first, then the project's)."""
    candidates = [Path(name_or_path)]
    if not name_or_path.endswith((".yaml", ".yml")):
        candidates += [Path("search_spaces") / f"{name_or_path}.yaml", SPACES_DIR / f"{name_or_path}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
    raise ConfigError(f"search space {name_or_path!r} not found; use a YAML path or one of: {', '.join(known)}")


def _parse_param(name: str, spec: Any, where: str) -> Param:
    if name not in PARAM_SECTIONS:
        raise ConfigError(
            f"unknown parameter {name!r} under 'search' in {where}; searchable: {', '.join(sorted(PARAM_SECTIONS))}"
        )
    if not isinstance(spec, dict):
        raise ConfigError(f"search.{name} in {where} must be a mapping like {{low: 1, high: 8}} or {{choices: [..]}}")
    unknown = set(spec) - {"choices", "low", "high", "log"}
    if unknown:
        raise ConfigError(
            f"search.{name} in {where} has unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
            "use choices, or low/high/log"
        )
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"search.{name}.choices in {where} must be a non-empty list")
        return Param(name, choices=choices)
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"search.{name} in {where} needs numeric low and high, got low={low!r} high={high!r}")
    if low > high or (spec.get("log") and low <= 0):
        raise ConfigError(
            f"search.{name} in {where} has an empty or invalid range [{low}, {high}]"
            + (" (log ranges need low > 0)" if spec.get("log") else "")
        )
    integer = isinstance(low, int) and isinstance(high, int)
    return Param(name, low=low, high=high, log=bool(spec.get("log", False)), integer=integer)


def load_space(name_or_path: str) -> SearchSpace:
    """Read and validate a space file; every problem is one ConfigError line."""
    path = resolve_space_path(name_or_path)
    raw = _read_yaml(path)
    if raw is None or raw == {}:  # empty or only comments: running it would silently search the built-in defaults
        raise ConfigError(
            f"space file {path} is empty; add data/model/train/search sections (see search_spaces/smoke.yaml)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a YAML mapping with data/model/train/search sections")
    return _space_from_mapping(raw, str(path), path.stem, str(path.resolve()))


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read {path} as a YAML text file ({type(exc).__name__}); pass a .yaml file") from None
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(
            f"{path} uses a YAML tag that is not allowed ({getattr(exc, 'problem', exc)}); "
            "search spaces hold plain values only"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{at}: {getattr(exc, 'problem', exc)}; fix the syntax") from None


def saved_space(saved: Any) -> SearchSpace:
    """The space an experiment saved (:meth:`SearchSpace.to_dict`), checked like a space file.

    ``experiment.json`` can be edited or damaged by hand, so nothing in it is trusted: a problem is a
    :class:`ConfigError` (the caller names the file) instead of a traceback once Ray runs.
    """
    if not isinstance(saved, dict):
        raise ConfigError(f"'space' must be a mapping, got {type(saved).__name__}")
    name = saved.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"space 'name' must be a non-empty string, got {name!r}")
    sections = {k: v for k, v in saved.items() if k != "name"}
    return _space_from_mapping(sections, "the saved space", name, None)


def _space_from_mapping(raw: dict[str, Any], where: str, name: str, path: str | None) -> SearchSpace:
    """Validate a space's sections (a space file's top level) and build it; every problem is one ConfigError."""
    unknown = set(raw) - {*SECTIONS, "search", "first", "description", "patch_counts", "memory_highs"}
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(sorted(map(str, unknown)))} in {where}; "
            f"use {', '.join(SECTIONS)}, search, first, description"
        )
    for section in (*SECTIONS, "search"):
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"section {section!r} in {where} must be a mapping of names to values")
    fixed = {s: dict(raw.get(s) or {}) for s in SECTIONS}
    fixed["data"] = resolve_data_paths(fixed["data"])
    if fixed["evaluation"].get("splits"):  # a user's splits file, relative to where the space was loaded
        fixed["evaluation"]["splits"] = resolve_path(fixed["evaluation"]["splits"])
    for section, cls in SECTIONS.items():
        build_config(cls, fixed[section], f"{section} of {where}")  # unknown keys, types, ranges
    kind = dataset_kind(DataConfig(**fixed["data"]))  # a registered dataset, and the config fits it
    if kind.default_encoder:  # explicit, so the saved space says which encoder ran
        fixed["model"].setdefault("encoder", kind.default_encoder)
    experiment_config(fixed)  # the encoder is registered and reads what the dataset holds
    params = {k: _parse_param(k, v, where) for k, v in (raw.get("search") or {}).items()}
    for p in params.values():
        if p.name in PATH_FIELDS and p.choices is not None:
            p.choices = [resolve_path(c) for c in p.choices]
    first = raw.get("first") or []
    if not isinstance(first, list) or not all(isinstance(p, dict) for p in first):
        raise ConfigError(f"'first' in {where} must be a list of parameter mappings")
    first = [{k: resolve_path(v) if k in PATH_FIELDS else v for k, v in point.items()} for point in first]
    space = SearchSpace(name, fixed, params, first, str(raw.get("description", "")), path)
    space.patch_counts = _patch_counts(raw.get("patch_counts"), where)
    space.memory_highs = _patch_counts(raw.get("memory_highs"), where, "memory_highs", "largest memory sizes")
    validate_space(space, where)
    first_points(space)  # 'first' configs must fit their ranges: checked before Ray starts
    return space


def resolve_path(value: Any) -> Any:
    """A relative path made absolute against the current working directory, ``~`` expanded; an absolute path
    keeps its spelling; anything else (a wrong type, named later by the config checks) is returned unchanged."""
    if not isinstance(value, str) or not value.strip():
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (Path.cwd() / path).resolve())


def resolve_data_paths(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its paths resolved (:func:`resolve_path`), those of ``extract.from`` and a TorchScript
    ``extract.encoder`` too. The one place a space's relative paths become absolute (see the module docstring)."""
    data = {k: resolve_path(v) if k in PATH_FIELDS else v for k, v in data.items()}
    extract = data.get("extract")
    if isinstance(extract, dict):
        extract = dict(extract)
        if isinstance(extract.get("from"), dict):
            extract["from"] = resolve_data_paths(extract["from"])
        encoder = extract.get("encoder")
        if isinstance(encoder, str) and Path(encoder).expanduser().is_file():
            extract["encoder"] = resolve_path(encoder)  # a TorchScript file (a named encoder is not a file)
        data["extract"] = extract
    return data


def _patch_counts(raw: Any, where: str, key: str = "patch_counts", what: str = "patch counts") -> dict[int, int]:
    """A saved mapping of patch sizes to whole numbers (``patch_counts``: N; ``memory_highs``: the top M)."""
    if raw is None:
        return {}
    try:
        counts = {int(k): int(v) for k, v in dict(raw).items()}
    except (TypeError, ValueError):
        raise ConfigError(f"'{key}' in {where} must map patch sizes to {what}") from None
    return counts


def validate_space(space: SearchSpace, where: str) -> None:
    """Reject a space whose M / I ranges can't satisfy ``M < N`` and ``I <= N - M`` for some P."""
    fixed_model = space.fixed.get("model", {})
    m = space.params.get("memory_size") or Param("memory_size", low=fixed_model.get("memory_size", 5))
    i = space.params.get("iteration_size") or Param("iteration_size", low=fixed_model.get("iteration_size", 5))
    for p in space.params.values():
        for value in p.choices if p.choices is not None else (p.low, p.high):
            trial_config(space.fixed, {p.name: value})  # each choice / bound obeys its field's own rule
        if p.name in DERIVED and p.choices is not None:
            raise ConfigError(f"search.{p.name} in {where} must be a low/high range (it is scaled to each patch count)")
    for patch_size in space.patch_sizes():
        n = space.n_patches(patch_size)
        if n is None:  # slides, features: checked once the data is built (plan.prepare_data)
            continue
        if n < 2:
            raise ConfigError(
                f"patch_size {patch_size} in {where} leaves {n} patch(es) per image; "
                "use a smaller patch_size or a larger image"
            )
        if m.low >= n:
            raise ConfigError(
                f"memory_size low={m.low} in {where} is not below N={n} patches at patch_size "
                f"{patch_size}; lower memory_size.low to at most {n - 1}"
            )
        capped = "iteration_size" not in space.params and "memory_size" in space.params  # fixed I, capped at N - M
        if not capped and i.low > n - m.low:
            raise ConfigError(
                f"iteration_size low={i.low} in {where} exceeds N - M = {n - int(m.low)} at "
                f"patch_size {patch_size}; lower iteration_size.low"
            )


def _scaled(p: Param, q: float, low: float, high: float) -> int:
    """The integer at quantile ``q`` of ``[low, high]`` (log scale when ``p.log``)."""
    if p.log:
        value = math.exp(math.log(low) + q * (math.log(high) - math.log(low)))
    else:
        value = low + q * (high - low)
    return int(min(high, max(low, round(value))))


def _quantile(p: Param, value: float, low: float, high: float) -> float:
    if high <= low:
        return 0.0
    if p.log:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def memory_iteration_ranges(space: SearchSpace, n: int, memory_size: int | None = None, patch_size: int | None = None):
    """Feasible ``(low, high)`` of M for N patches, and of I once M is known (a fixed value when not searched).

    ``patch_size``: where the space holds the memory budget's top M for it (``memory_highs``), M stays at or below
    that too (at ``low`` where not even the smallest M fits: those trials are marked infeasible)."""
    m, i = space.params.get("memory_size"), space.params.get("iteration_size")
    model = space.fixed.get("model", {})
    fixed_m, fixed_i = int(model.get("memory_size", 5)), int(model.get("iteration_size", 5))
    m_range = (m.low, min(m.high, n - 1)) if m else (fixed_m, fixed_m)
    if m and patch_size is not None and int(patch_size) in space.memory_highs:
        m_range = (m.low, max(m.low, min(m_range[1], space.memory_highs[int(patch_size)])))
    if memory_size is None:
        return m_range, None
    i_range = (i.low, min(i.high, n - memory_size)) if i else (min(fixed_i, n - memory_size),) * 2
    return m_range, i_range


def define_space(trial: Any, space_dict: dict[str, Any]) -> dict[str, Any]:
    """Optuna define-by-run space (top level, so Ray can pickle it for resume).

    Samples every searched parameter; M and I as quantiles (``memory_size_quantile``,
    ``iteration_size_quantile``) of their ranges at this P. Returns the derived M and I.
    """
    space = space_from_dict(space_dict)
    derived: dict[str, Any] = {}
    sampled = {p.name: p.suggest(trial) for p in space.params.values() if p.name not in DERIVED}
    patch_size = sampled.get("patch_size", space.base_config().data.patch_size)
    n = space.n_patches(int(patch_size))
    (m_low, m_high), _ = memory_iteration_ranges(space, n, patch_size=int(patch_size))
    memory_size = int(m_low)
    if "memory_size" in space.params:
        q = trial.suggest_float("memory_size" + QUANTILE_SUFFIX, 0.0, 1.0)
        memory_size = _scaled(space.params["memory_size"], q, m_low, m_high)
    derived["memory_size"] = memory_size
    i_low, i_high = memory_iteration_ranges(space, n, memory_size)[1]
    derived["iteration_size"] = int(i_low)  # a fixed I, capped at N - M
    if "iteration_size" in space.params:
        q = trial.suggest_float("iteration_size" + QUANTILE_SUFFIX, 0.0, 1.0)
        derived["iteration_size"] = _scaled(space.params["iteration_size"], q, i_low, i_high)
    return derived


def space_from_dict(d: dict[str, Any]) -> SearchSpace:
    params = {k: _parse_param(k, v, d.get("name", "space")) for k, v in d.get("search", {}).items()}
    fixed = {s: dict(d.get(s) or {}) for s in SECTIONS}
    space = SearchSpace(d.get("name", "space"), fixed, params, list(d.get("first", [])), d.get("description", ""))
    space.patch_counts = _patch_counts(d.get("patch_counts"), "the space")
    space.memory_highs = _patch_counts(d.get("memory_highs"), "the space", "memory_highs", "largest memory sizes")
    return space


def searcher_space(space: SearchSpace):
    """The define-by-run function handed to ``OptunaSearch``: a picklable partial of :func:`define_space`."""
    return functools.partial(define_space, space_dict=space.to_dict())


def first_points(space: SearchSpace) -> list[dict[str, Any]]:
    """``first`` configs in absolute units, turned into the sampler's parameters (quantiles for M and I)."""
    points = []
    for raw in space.first:
        unknown = set(raw) - set(space.params)
        if unknown:
            raise ConfigError(
                f"'first' config {raw} names unsearched parameter(s) {', '.join(sorted(map(str, unknown)))}"
            )
        try:  # each value obeys its field's own rule, so the range checks below compare numbers
            trial_config(space.fixed, raw)
        except ConfigError as exc:
            raise ConfigError(f"'first' config {raw}: {exc}") from None
        point = {k: v for k, v in raw.items() if k not in DERIVED}
        patch_size = int(raw.get("patch_size", space.base_config().data.patch_size))
        n = space.n_patches(patch_size)
        if n is None:  # N comes from the files: the ranges are checked once the data is built
            points.append(point)
            continue
        if "memory_size" in raw:
            (lo, hi), _ = memory_iteration_ranges(space, n, patch_size=patch_size)
            if not lo <= raw["memory_size"] <= hi:
                raise ConfigError(f"'first' config {raw}: memory_size must be in [{lo}, {hi}] for N={n} patches")
            point["memory_size" + QUANTILE_SUFFIX] = _quantile(space.params["memory_size"], raw["memory_size"], lo, hi)
        if "iteration_size" in raw:
            _, (lo, hi) = memory_iteration_ranges(space, n, raw.get("memory_size"))
            if not lo <= raw["iteration_size"] <= hi:
                raise ConfigError(f"'first' config {raw}: iteration_size must be in [{lo}, {hi}] for N={n} patches")
            point["iteration_size" + QUANTILE_SUFFIX] = _quantile(
                space.params["iteration_size"], raw["iteration_size"], lo, hi
            )
        points.append(point)
    return points


def trial_config(fixed: dict[str, dict[str, Any]], sampled: dict[str, Any]) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of one trial: fixed sections overlaid with sampled values."""
    sections = {s: dict(fixed.get(s) or {}) for s in SECTIONS}
    for name, value in sampled.items():
        if name.endswith(QUANTILE_SUFFIX):
            continue
        for section in PARAM_SECTIONS.get(name, ()):
            sections[section][name] = value
    return experiment_config(sections)


def experiment_config(sections: dict[str, dict[str, Any]]) -> ExperimentConfig:
    """The config of a space's sections, its names checked against the registries: ``data.dataset`` a registered
    kind that accepts the data settings, ``model.encoder`` (default: the kind's) a registered encoder that reads what
    the dataset holds. Every problem is one ConfigError line."""
    data = DataConfig(**sections.get("data", {}))
    kind = dataset_kind(data)
    model = dict(sections.get("model", {}))
    if kind.default_encoder:
        model.setdefault("encoder", kind.default_encoder)
    check_encoder_fits(kind, model.get("encoder", IPSConfig.encoder))
    return ExperimentConfig.from_dict({**sections, "model": model})


def check_encoder_fits(kind: DatasetKind, encoder: Any) -> None:
    """An encoder that reads patch embeddings fits a features dataset and only it does; the others read images. A
    mismatch is one ConfigError (the model would fail on its first batch, in every trial)."""
    if not isinstance(encoder, str):
        return  # IPSConfig names it
    reads_features = ENCODERS[encoder].reads_features
    if kind.features and not reads_features:
        raise ConfigError(
            f"model.encoder {encoder} reads images, but dataset: {kind.name} holds patch embeddings; "
            f"set model.encoder: {kind.default_encoder} (or leave it out: {kind.name} default to it)"
        )
    if reads_features and not kind.features:
        holders = ", ".join(k.name for k in DATASETS.entries() if k.features)
        raise ConfigError(
            f"model.encoder {encoder} reads patch embeddings (dataset: {holders}), not {kind.name} images; "
            "choose an image encoder such as small-cnn or resnet18"
        )
