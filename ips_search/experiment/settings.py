"""What the command line decided for a search (``SearchSettings``), its rules, and reading it back from disk."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

from ips_search.errors import ConfigError
from ips_search.experiment.record import RUNG_METRICS

OBJECTIVES = ("accuracy", "accuracy-memory")
SAMPLERS = ("tpe", "gp", "nsga2", "random")
SCHEDULERS = ("asha", "fifo")
# the settings only ASHA reads, by the flag that sets each
ASHA_FLAGS = {
    "grace_period": "--grace-period",
    "reduction_factor": "--reduction-factor",
    "rung_metric": "--rung-metric",
    "brackets": "--brackets",
}
SEED_LIMIT = 2**32  # numpy's, so Optuna's samplers: seeds are 0 .. 2**32 - 1
NAME_LIMIT = 100  # characters of --name: a folder name, and Optuna's study name, that any filesystem takes
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass
class SearchSettings:
    """What the command line decided; saved in ``experiment.json``."""

    name: str
    results_dir: str
    space: str
    trials: int = 50
    objective: str = "accuracy"
    sampler: str = "tpe"
    # FIFO: on the default space the eventual best trial ranked 16th to 42nd of 50 after epoch 1 (benchmarks.md)
    scheduler: str = "fifo"
    max_memory_mb: float | None = None
    cpus_per_trial: float = 1.0
    # None: auto, resolved once the cluster is known (1 per trial when it has GPUs, else 0) and saved resolved
    gpus_per_trial: float | None = 0.0
    concurrency: int = 1
    seed: int = 0
    epochs: int = 4
    grace_period: int = 1  # ASHA: Ray's defaults
    reduction_factor: int = 4
    rung_metric: str = "val_accuracy"  # what ASHA compares at its rungs (RUNG_METRICS)
    brackets: int = 1  # ASHA brackets: more than 1 is asynchronous Hyperband
    confirm: int = 0  # after the search, retrain the best configs with this many more seeds (0: no confirm stage)
    confirm_top: int = 3  # how many of the best configs the confirm stage retrains

    @property
    def multi_objective(self) -> bool:
        return self.objective == "accuracy-memory"

    @property
    def experiment_dir(self) -> Path:
        return Path(self.results_dir).resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_positive(value: float | None, flag: str, allow_zero: bool = False) -> None:
    """``value`` (when given) is a finite amount above zero (or zero, where allowed)."""
    if value is None:
        return
    if not math.isfinite(value):  # argparse's float() takes "nan" and "inf": neither is an amount or a budget
        raise ConfigError(f"{flag} must be a finite number, got {value:g}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")


def check_settings(args: Any) -> None:
    """The rules shared by the flags and the settings a resumed experiment saved (same attribute names)."""
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {args.trials}")
    check_positive(args.max_memory_mb, "--max-memory-mb")
    check_positive(args.cpus_per_trial, "--cpus-per-trial")
    check_positive(args.gpus_per_trial, "--gpus-per-trial", allow_zero=True)
    if args.gpus_per_trial is not None and args.gpus_per_trial > 1 and args.gpus_per_trial != int(args.gpus_per_trial):
        raise ConfigError(f"--gpus-per-trial above 1 must be whole, got {args.gpus_per_trial:g}")
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {args.epochs}")
    if args.grace_period < 1:
        raise ConfigError(f"--grace-period must be at least 1 epoch, got {args.grace_period}")
    if args.brackets < 1:
        raise ConfigError(f"--brackets must be at least 1, got {args.brackets}")
    if args.reduction_factor < 2:
        raise ConfigError(f"--reduction-factor must be at least 2, got {args.reduction_factor}")
    if args.confirm < 0:
        raise ConfigError(f"--confirm must be 0 (off) or a number of extra seeds, got {args.confirm}")
    if args.confirm_top < 1:
        raise ConfigError(f"--confirm-top must be at least 1, got {args.confirm_top}")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise ConfigError(f"--name {args.name!r} must be a plain folder name (no '/', not starting with '.')")
    if not 0 <= args.seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")


def check_name(name: str) -> None:
    """``--name``: a plain folder name of at most ``NAME_LIMIT`` letters, digits, '.', '_' and '-', not hidden."""
    if len(name) > NAME_LIMIT or not NAME_PATTERN.fullmatch(name):
        shown = repr(name) if len(name) <= NAME_LIMIT else f"{name[:20]!r}... ({len(name)} characters)"
        raise ConfigError(
            f"--name {shown} must be a plain folder name: at most {NAME_LIMIT} letters, digits, '.', '_' and '-', "
            "not starting with '.'"
        )


def settings_from_saved(saved: Any) -> SearchSettings:
    """``SearchSettings`` from ``experiment.json``: exactly its fields, each of its declared type, each valid."""
    if not isinstance(saved, dict):
        raise ConfigError(f"'settings' must be a mapping, got {type(saved).__name__}")
    fields = {f.name: f for f in dataclasses.fields(SearchSettings)}
    unknown = sorted(map(str, set(saved) - set(fields)))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    missing = [n for n, f in fields.items() if n not in saved and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing setting(s) {', '.join(missing)}")
    types = get_type_hints(SearchSettings)
    for key, value in saved.items():
        if not _is_a(value, types[key]):
            raise ConfigError(f"setting {key} must be {_type_name(types[key])}, got {value!r}")
    settings = SearchSettings(**saved)
    check_settings(settings)
    for key, choices in (
        ("objective", OBJECTIVES),
        ("sampler", SAMPLERS),
        ("scheduler", SCHEDULERS),
        ("rung_metric", tuple(RUNG_METRICS)),
    ):
        if getattr(settings, key) not in choices:
            raise ConfigError(f"setting {key} must be one of {', '.join(choices)}, got {getattr(settings, key)!r}")
    return settings


def _is_a(value: Any, hint: Any) -> bool:
    """``value`` fits the annotation ``hint`` (``int``, ``float``, ``str``, or one of those ``| None``)."""
    for kind in get_args(hint) or (hint,):
        if kind is type(None) and value is None:
            return True
        if isinstance(value, bool):  # JSON true/false is a Python int: never a count or an amount
            continue
        if isinstance(value, (int, float) if kind is float else kind):
            return True
    return False


def _type_name(hint: Any) -> str:
    return " or ".join("null" if kind is type(None) else kind.__name__ for kind in get_args(hint) or (hint,))


def asha_rungs(settings: SearchSettings) -> list[int]:
    """The epochs at which ASHA compares trials (grace_period * reduction_factor**k below max_t)."""
    rungs, t = [], min(settings.grace_period, settings.epochs)
    while t < settings.epochs:
        rungs.append(t)
        t *= settings.reduction_factor
    return rungs
