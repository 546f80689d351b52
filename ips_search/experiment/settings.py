"""What the command line decided for a search (``SearchSettings``), its rules, and reading it back from disk.

Each saved setting is declared once, as a field of ``SearchSettings`` whose metadata holds a :class:`Setting` (help,
choices, range rules, what a resume may do with it). Its flag, the flag's validation, the resume check and its place in
``experiment.json`` are generated from that field: a new search setting is one new field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from ips_search.config import METRICS, SEED_LIMIT, EvaluationConfig, TrainConfig
from ips_search.errors import ConfigError
from ips_search.experiment.record import RUNG_METRICS

OBJECTIVES = ("accuracy", "accuracy-memory")
SAMPLERS = ("tpe", "gp", "nsga2", "random")
SCHEDULERS = ("asha", "fifo")
NAME_LIMIT = 100  # characters of --name: a folder name, and Optuna's study name, that any filesystem takes
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
SETTING = "setting"  # the metadata key of a field's Setting


@dataclass(frozen=True)
class Rule:
    """A range rule: ``holds(value)``, else the one-line error ``<flag> <says>, got <value>``."""

    holds: Callable[[Any], bool]
    says: str


def at_least(low: int, unit: str = "") -> Rule:
    return Rule(lambda value: value >= low, f"must be at least {low}{' ' + unit if unit else ''}")


FINITE = Rule(math.isfinite, "must be a finite number")  # argparse's float() takes "nan" and "inf": no amount is either
POSITIVE = (FINITE, Rule(lambda value: value > 0, "must be > 0"))
NON_NEGATIVE = (FINITE, Rule(lambda value: value >= 0, "must be >= 0"))


@dataclass(frozen=True)
class Setting:
    """What a field is on the command line: its flag ``--<field-name>`` shows ``help`` (a help that names its own
    default, ``%(default)s`` or in words, gets no ``(default: ...)`` added), takes one of ``choices`` and obeys
    ``rules``."""

    help: str
    choices: tuple[str, ...] | None = None
    rules: tuple[Rule, ...] = ()
    metavar: str | None = None
    # left out of a new search, resolved later (from the space or the cluster, as ``help`` says): the flag's default
    # is None, and the field's default only fills settings built in code or saved before the field existed
    auto: bool = False
    # "keep": a resumed search refuses another value (it would be silently ignored); "extend": a resume may raise it
    resume: Literal["keep", "extend"] = "keep"
    only_with: tuple[str, str] | None = None  # (setting, value): the only case the flag means anything in


def setting(default: Any, help: str, **declared: Any) -> Any:
    """A dataclass field that is a flag: ``default`` and the :class:`Setting` made of ``help`` and ``declared``."""
    return dataclasses.field(default=default, metadata={SETTING: Setting(help=help, **declared)})


@dataclass
class SearchSettings:
    """What the command line decided; saved in ``experiment.json``. The fields without a :class:`Setting` name the
    experiment and come from ``--name``, ``--results-dir`` and ``--space``."""

    name: str
    results_dir: str
    space: str
    trials: int = setting(
        50,
        "number of trials (configs) to run (default %(default)s); with --resume, a higher number extends the finished "
        "search with more trials of the same Optuna study",
        rules=(at_least(1),),
        resume="extend",
    )
    objective: str = setting(
        "accuracy",
        "maximise validation accuracy, or find the Pareto front of accuracy vs peak memory",
        choices=OBJECTIVES,
    )
    max_memory_mb: float | None = setting(
        None,
        "memory budget in MB: a config whose predicted CUDA peak of a training step is over it is marked infeasible "
        "and never trains; on a GPU, a trial whose first measured training step goes over it stops as infeasible too",
        rules=POSITIVE,
    )
    sampler: str = setting("tpe", "Optuna sampler", choices=SAMPLERS)
    # FIFO: on the default space the eventual best trial ranked 16th to 42nd of 50 after epoch 1 (benchmarks.md)
    scheduler: str = setting(
        "fifo",
        "trial scheduler: %(default)s runs every trial to its last epoch (the default); asha stops trials early "
        "(faster, but its early rungs stop configs that would have won: docs/benchmarks.md)",
        choices=SCHEDULERS,
    )
    grace_period: int = setting(  # ASHA: Ray's defaults
        1,
        "ASHA: epochs every trial runs before it can be stopped (default %(default)s, Ray's ASHAScheduler default)",
        rules=(at_least(1, "epoch"),),
        only_with=("scheduler", "asha"),
    )
    reduction_factor: int = setting(
        4,
        "ASHA: each rung keeps the best 1/reduction-factor of trials; rungs at grace-period * reduction-factor^k "
        "epochs (default %(default)s, Ray's ASHAScheduler default)",
        rules=(at_least(2),),
        only_with=("scheduler", "asha"),
    )
    rung_metric: str = setting(
        "val_score_mean",
        "ASHA: what trials are compared on at a rung: the validation score so far (mean over the finished folds and "
        "the running fold's latest epoch; with one fold, this epoch's), this epoch's score or accuracy, the trial's "
        "best epoch's accuracy, or validation loss (default: %(default)s)",
        choices=tuple(RUNG_METRICS),
        only_with=("scheduler", "asha"),
    )
    brackets: int = setting(  # more than 1 is asynchronous Hyperband
        1,
        "ASHA: brackets of different grace periods (default %(default)s; above 1: asynchronous Hyperband)",
        rules=(at_least(1),),
        only_with=("scheduler", "asha"),
    )
    cpus_per_trial: float = setting(1.0, "CPUs per trial (also torch's thread count)", rules=POSITIVE)
    # None: auto, resolved once the cluster is known (1 per trial when it has GPUs, else 0) and saved resolved
    gpus_per_trial: float | None = setting(
        0.0,
        "GPUs per trial, fractional allowed (0.25 packs four trials per GPU); 0 keeps every trial on the CPU. "
        "Default: auto, 1 per trial when the cluster has GPUs, else 0 (the resolved value is saved and kept by "
        "--resume). A value above 0 falls back to CPU with a warning when the cluster has no GPU",
        rules=(*NON_NEGATIVE, Rule(lambda value: value <= 1 or value == int(value), "above 1 must be whole")),
        auto=True,
    )
    # None: auto, as many trials as the cluster fits, resolved once it is known (launch.fit_resources), saved resolved
    concurrency: int | None = setting(
        1, "trials at once (default: as many as the cluster's CPUs/GPUs fit)", rules=(at_least(1),), auto=True
    )
    confirm: int = setting(  # 0: no confirm stage
        0,
        "after the search, train the best --confirm-top configs again with K more seeds and pick the winner by mean "
        "validation accuracy (0: off)",
        rules=(Rule(lambda value: value >= 0, "must be 0 (off) or a number of extra seeds"),),
        metavar="K",
    )
    confirm_top: int = setting(3, "how many of the best configs --confirm retrains", rules=(at_least(1),))
    seed: int = setting(
        0,
        "seed of the sampler and of every trial",
        rules=(Rule(lambda value: 0 <= value < SEED_LIMIT, "must be between 0 and 2**32 - 1"),),
    )
    # a new search takes the space's train.epochs (whose own default is TrainConfig's) unless --epochs says otherwise
    epochs: int = setting(
        TrainConfig.epochs, "epochs per trial (overrides the space's train.epochs)", rules=(at_least(1),), auto=True
    )
    # a new search takes the space's evaluation section (whose defaults are EvaluationConfig's) unless a flag says
    metric: str = setting(
        EvaluationConfig.metric,
        "what configs are ranked by on validation (overrides the space's evaluation.metric): auc (binary; macro "
        "one-vs-rest for more classes), balanced_accuracy or accuracy (default: the space's, else %(default)s)",
        choices=METRICS,
    )
    folds: int = setting(
        EvaluationConfig.folds,
        "patient-level cross-validation folds of the non-test slides each trial trains and validates on (overrides "
        "the space's evaluation.folds; 1: one validation split; default: the space's, else %(default)s)",
        rules=(at_least(1),),
    )
    no_reference: bool = setting(
        False,
        "skip the full-bag reference run: after the search (and --confirm), the best config trained once more with "
        "M = N, every patch through the aggregator, to show what selection costs in accuracy",
    )
    prune_margin: float = setting(
        0.05,
        "with folds above 1: stop a trial at a check (see --prune-interval) when its mean score over the folds so "
        "far is more than this, plus one standard error of the best finished trial's fold scores, below that "
        "trial's mean at the same point (single-objective searches only)",
        rules=NON_NEGATIVE,
    )
    prune_interval: int = setting(
        3,
        "with folds above 1: also check a trial every this many epochs inside a fold, against the best finished "
        "trial at the same epoch of the same fold (0: at fold ends only; default %(default)s)",
        rules=(at_least(0, "epochs"),),
    )

    @property
    def multi_objective(self) -> bool:
        return self.objective == "accuracy-memory"

    @property
    def experiment_dir(self) -> Path:
        return Path(self.results_dir).resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Flag:
    """One setting of a schema (``SearchSettings`` or another dataclass of :func:`setting` fields), as a flag."""

    name: str  # the field
    flag: str  # --the-field
    kind: type  # int, float, str or bool (``| None`` dropped)
    default: Any  # what a new search takes when the flag is left out (None: resolved later, ``Setting.auto``)
    setting: Setting


def flags_of(schema: type = SearchSettings) -> list[Flag]:
    """The fields of ``schema`` that are flags, in declaration order."""
    hints = get_type_hints(schema)
    return [
        Flag(
            name=f.name,
            flag=flag_name(f.name),
            kind=next(kind for kind in get_args(hints[f.name]) or (hints[f.name],) if kind is not type(None)),
            default=None if f.metadata[SETTING].auto else f.default,
            setting=f.metadata[SETTING],
        )
        for f in dataclasses.fields(schema)
        if SETTING in f.metadata
    ]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value: Any) -> str:
    """A setting's value as an error message writes it (``0.25``, ``4``, ``none``)."""
    return f"{value:g}" if isinstance(value, float) else "none" if value is None else str(value)


def check_value(flag: str, value: Any, rules: tuple[Rule, ...]) -> None:
    """``value`` (when given) obeys ``rules``, else the first broken one is the error."""
    if value is None:
        return
    for rule in rules:
        if not rule.holds(value):
            raise ConfigError(f"{flag} {rule.says}, got {shown(value)}")


def check_positive(value: float | None, flag: str, allow_zero: bool = False) -> None:
    """``value`` (when given) is a finite amount above zero (or zero, where allowed)."""
    check_value(flag, value, NON_NEGATIVE if allow_zero else POSITIVE)


def check_settings(values: Mapping[str, Any], schema: type = SearchSettings) -> None:
    """Every rule of ``schema``'s settings that ``values`` names (the flags given, or a saved experiment's)."""
    for f in flags_of(schema):
        check_value(f.flag, values.get(f.name), f.setting.rules)


def check_applies(given: Mapping[str, Any], schema: type = SearchSettings) -> None:
    """A new search's flag that only means something with another setting's value (ASHA's, with ``--scheduler
    asha``) would be silently ignored without it, so it is a bad input."""
    defaults = {f.name: f.default for f in flags_of(schema)}
    for f in flags_of(schema):
        if f.name in given and f.setting.only_with is not None:
            key, needed = f.setting.only_with
            current = given.get(key, defaults[key])
            if current != needed:
                raise ConfigError(
                    f"{f.flag} only applies to {flag_name(key)} {needed}, and this search uses {current}; "
                    f"add {flag_name(key)} {needed} or leave {f.flag} out"
                )


def check_resume(given: Mapping[str, Any], settings: SearchSettings) -> None:
    """Apply a resume's flags to the settings it saved: a kept setting given another value would be silently ignored,
    so it is a bad input (the same value is harmless); an extendable one (``--trials``) is raised, never lowered."""
    for f in sorted(flags_of(type(settings)), key=lambda f: f.setting.resume == "extend"):  # kept ones first
        if f.name not in given:
            continue
        value, saved = given[f.name], getattr(settings, f.name)
        if f.setting.resume == "extend":
            if value < saved:
                noun = f.name.replace("_", " ")
                raise ConfigError(
                    f"{f.flag} {shown(value)} is below the {shown(saved)} {noun} experiment {settings.name!r} already "
                    f"has; pass {f.flag} {shown(saved)} or more to extend it, or leave {f.flag} out to continue it"
                )
            setattr(settings, f.name, value)
        elif value != saved:
            raise ConfigError(
                f"{f.flag} {shown(value)} differs from experiment {settings.name!r}, which runs with {shown(saved)}; "
                f"a resumed search keeps the settings it started with: leave {f.flag} out, or start a new experiment "
                "with --name"
            )


def new_settings(given: Mapping[str, Any], schema: type = SearchSettings, **resolved: Any) -> Any:
    """A new search's settings: each flag's value where given, else ``resolved`` (the experiment's name, folder and
    space, and what the space decides: its epochs), else the flag's default (None where ``Setting.auto``)."""
    return schema(**{**{f.name: f.default for f in flags_of(schema)}, **resolved, **given})


def trial_fixed(fixed: Mapping[str, Any], settings: SearchSettings, seed: int | None = None) -> dict[str, Any]:
    """The space's fixed sections as every trial trains with them: the epochs, seed, metric and folds the settings
    decided (the one place settings reach a trial's config). ``seed``: a confirm run's own, instead of the search's."""
    train = {**fixed.get("train", {}), "epochs": settings.epochs, "seed": settings.seed if seed is None else seed}
    evaluation = {**fixed.get("evaluation", {}), "metric": settings.metric, "folds": settings.folds}
    return {**fixed, "train": train, "evaluation": evaluation}


def trials_at_once(settings: SearchSettings, cpus: float, gpus: float | None = None) -> int:
    """How many trials ``cpus`` and ``gpus`` run at once (at most the trial count); 0 when not even one fits.
    ``gpus`` None: not known yet (no cluster), only the CPUs count."""
    fits = [int(cpus // settings.cpus_per_trial)]
    if gpus is not None and settings.gpus_per_trial:
        fits.append(int(round(gpus / settings.gpus_per_trial, 6)))
    return min(*fits, settings.trials)


def check_name(name: str) -> None:
    """``--name``: a plain folder name of at most ``NAME_LIMIT`` letters, digits, '.', '_' and '-', not hidden."""
    if len(name) > NAME_LIMIT or not NAME_PATTERN.fullmatch(name):
        shown_name = repr(name) if len(name) <= NAME_LIMIT else f"{name[:20]!r}... ({len(name)} characters)"
        raise ConfigError(
            f"--name {shown_name} must be a plain folder name: at most {NAME_LIMIT} letters, digits, '.', '_' and '-', "
            "not starting with '.'"
        )


def settings_from_saved(saved: Any, schema: type = SearchSettings) -> Any:
    """``schema`` (``SearchSettings``) from ``experiment.json``: exactly its fields, each of its declared type, each
    valid."""
    if not isinstance(saved, dict):
        raise ConfigError(f"'settings' must be a mapping, got {type(saved).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(map(str, set(saved) - set(fields)))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    missing = [n for n, f in fields.items() if n not in saved and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing setting(s) {', '.join(missing)}")
    types = get_type_hints(schema)
    for key, value in saved.items():
        if not _is_a(value, types[key]):
            raise ConfigError(f"setting {key} must be {_type_name(types[key])}, got {value!r}")
    settings = schema(**saved)
    check_settings(dataclasses.asdict(settings), schema)
    name = settings.name
    if not name or "/" in name or name.startswith("."):  # looser than --name's rule: older experiments' names pass
        raise ConfigError(f"--name {name!r} must be a plain folder name (no '/', not starting with '.')")
    for f in flags_of(schema):
        value = getattr(settings, f.name)
        if f.setting.choices is not None and value not in f.setting.choices:
            raise ConfigError(f"setting {f.name} must be one of {', '.join(f.setting.choices)}, got {value!r}")
    return settings


def _is_a(value: Any, hint: Any) -> bool:
    """``value`` fits the annotation ``hint`` (``int``, ``float``, ``str``, ``bool``, or one of those ``| None``)."""
    for kind in get_args(hint) or (hint,):
        if kind is type(None) and value is None:
            return True
        if kind is bool:
            if isinstance(value, bool):
                return True
            continue
        if isinstance(value, bool):  # JSON true/false is a Python int: never a count or an amount
            continue
        if isinstance(value, (int, float) if kind is float else kind):
            return True
    return False


def _type_name(hint: Any) -> str:
    return " or ".join("null" if kind is type(None) else kind.__name__ for kind in get_args(hint) or (hint,))


def asha_rungs(settings: SearchSettings) -> list[int]:
    """The epochs at which ASHA compares trials (grace_period * reduction_factor**k below max_t; with K folds, epochs
    are counted over the folds one after another)."""
    max_t = settings.epochs * settings.folds
    rungs, t = [], min(settings.grace_period, max_t)
    while t < max_t:
        rungs.append(t)
        t *= settings.reduction_factor
    return rungs
