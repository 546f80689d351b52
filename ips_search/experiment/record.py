"""The trial record: what a trial reports each epoch, and the one row per trial that ``trials.csv`` and the report hold.

:class:`EpochReport` is what the trainable hands to ``tune.report``; :func:`trial_record` turns a trial's config and
last report into its row, for the driver's ``trials.csv`` (from Ray's trial objects) and the report's loader (from the
trial's ``params.json`` and ``result.json``) alike; :func:`sampled` is the one rule for which config values are its
parameters; :data:`COLUMNS` names each column of that row with its type, and :func:`coerce` applies them (reading
a column an older version named otherwise, :data:`RENAMED`, under today's name).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ips_search.experiment.status import Status, trial_status

# The objective every search maximises: evaluation.metric's validation score, the mean over the folds finished so far
# (and the running fold's latest epoch), so the last report's is the mean over all K folds
METRIC = "val_score_mean"
# What ASHA may compare trials on at its rungs, and which way is better
RUNG_METRICS = {
    "val_score_mean": "max",
    "val_score": "max",
    "val_accuracy": "max",
    "val_accuracy_best": "max",
    "val_loss": "min",
}
FOLD_SCORE = "val_score_fold"  # + k: fold k's validation score, once the fold has finished
FOLD_SCORE_PATTERN = re.compile(rf"{FOLD_SCORE}\d+")
TEST_FOLD_SCORE = "test_score_fold"  # + k: the test set's score by fold k's model, at that fold's end; never ranks
TEST_FOLD_SCORE_PATTERN = re.compile(rf"{TEST_FOLD_SCORE}\d+")
MEMORY_METRIC = "peak_memory_mb"  # the second objective, and what the memory budget limits
SEARCHED_IN_RESULT = ("memory_size", "iteration_size", "patch_size")  # M and I are derived from N: read from the result
QUANTILE_SUFFIX = "_quantile"  # M and I are sampled as quantiles (memory_size_quantile): the value used is the column
NOT_SAMPLED = ("fixed", "max_memory_mb")  # in every trial's config beside the sampled values: the space, the budget


class MemoryKind(str, enum.Enum):
    """What ``peak_memory_mb`` measures."""

    CUDA = "cuda"  # the CUDA caching allocator's measured peak of the training steps
    PREDICTED_CUDA = "predicted-cuda"  # the estimator's CUDA peak of a training step (no GPU: deterministic)
    CPU_RSS = "cpu-rss"  # growth of the process's resident set (noisy; experiments before the estimator)

    def __str__(self) -> str:
        return self.value


@dataclass
class EpochReport:
    """One ``tune.report`` of the trainable: after every epoch, or once when a trial can't go on."""

    status: Status
    epoch: int  # epochs finished in the running fold
    peak_memory_mb: float
    memory_kind: str
    feasible: bool
    val_accuracy: float | None = None  # None when refitting on every non-test item (no validation)
    metric: str | None = None  # evaluation.metric: what val_score and test_score measure
    folds: int | None = None  # K
    fold: int | None = None  # the running fold, 0..K-1
    folds_done: int | None = None
    val_score: float | None = None  # the running fold's, this epoch
    val_score_mean: float | None = None  # METRIC
    val_score_std: float | None = None  # over the finished folds (two or more)
    val_auc: float | None = None
    val_balanced_accuracy: float | None = None
    memory_size: int | None = None  # M
    iteration_size: int | None = None  # I
    patch_size: int | None = None  # P
    n_patches: int | None = None  # N
    predicted_memory_mb: float | None = None  # the estimator's CUDA peak, beside a measured one
    predicted_gradient_mb: float | None = None  # its gradient pass over the B x M kept patches: the part M moves
    host_rss_mb: float | None = None  # host memory the trial process grew by while training
    device: str | None = None
    node_id: str | None = None  # which Ray node ran it: how a slow or failing node is found
    val_loss: float | None = None
    val_accuracy_best: float | None = None  # the trial's best epoch so far: a rung metric that forgives one bad epoch
    train_loss: float | None = None
    train_accuracy: float | None = None
    data_seconds: float | None = None  # building (or opening the cached) dataset in this trial process
    epoch_seconds: float | None = None
    train_seconds: float | None = None
    images_per_s: float | None = None
    test_accuracy: float | None = None  # after the last epoch only
    test_score: float | None = None  # mean over the fold models' test scores, after the last fold; never ranks
    test_auc: float | None = None
    test_balanced_accuracy: float | None = None
    test_loss: float | None = None
    test_seconds: float | None = None
    error: str | None = None
    per_task: dict[str, float] = field(default_factory=dict)  # val_<task>/accuracy, test_<task>/auc, ...
    fold_scores: list[float] = field(default_factory=list)  # each finished fold's validation score
    test_fold_scores: list[float] = field(default_factory=list)  # each finished fold's model's test score

    def to_metrics(self) -> dict[str, Any]:
        """The flat dict ``tune.report`` takes; unset fields are left out."""
        nested = ("per_task", "fold_scores", "test_fold_scores")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in nested}
        out["status"] = Status(self.status).value
        out = {k: v for k, v in out.items() if v is not None}
        out.update(self.per_task)
        out.update({f"{FOLD_SCORE}{k}": v for k, v in enumerate(self.fold_scores)})
        out.update({f"{TEST_FOLD_SCORE}{k}": v for k, v in enumerate(self.test_fold_scores)})
        return out


@dataclass(frozen=True)
class Column:
    """A column of the trial record and how to read it back from CSV."""

    name: str
    kind: str  # float | int | bool | str


COLUMNS: tuple[Column, ...] = (
    Column("trial_id", "str"),
    Column("status", "str"),
    Column("ray_status", "str"),
    # the searched parameters come here (memory_size, iteration_size, patch_size, lr, ...): see PARAM_KINDS
    Column("metric", "str"),
    Column("folds", "int"),
    Column("folds_done", "int"),
    Column("val_score_mean", "float"),
    Column("val_score_std", "float"),
    Column("val_score", "float"),
    Column("val_accuracy", "float"),
    Column("val_accuracy_best", "float"),  # the best epoch's, as the trainable reports it for ASHA's rungs
    Column("val_auc", "float"),
    Column("val_balanced_accuracy", "float"),
    Column("test_score", "float"),
    Column("test_accuracy", "float"),
    Column("test_auc", "float"),
    Column("test_balanced_accuracy", "float"),
    Column("peak_memory_mb", "float"),
    Column("memory_kind", "str"),
    Column("predicted_memory_mb", "float"),
    Column("predicted_gradient_mb", "float"),
    Column("host_rss_mb", "float"),
    Column("feasible", "bool"),
    Column("epochs", "int"),
    Column("time_total_s", "float"),
    Column("train_seconds", "float"),
    Column("images_per_s", "float"),
    Column("n_patches", "int"),
    Column("node_id", "str"),
    # the confirm stage's figures, on the rows of confirmed configs (the search's own run included)
    Column("confirm_runs", "int"),
    Column("confirm_val_mean", "float"),
    Column("confirm_val_std", "float"),
    Column("confirm_test_mean", "float"),
    Column("confirm_test_std", "float"),
    Column("confirm_test_ci_low", "float"),
    Column("confirm_test_ci_high", "float"),
    Column("path", "str"),
)
CONFIRM_COLUMNS = (
    "confirm_runs",
    "confirm_val_mean",
    "confirm_val_std",
    "confirm_test_mean",
    "confirm_test_std",
    "confirm_test_ci_low",
    "confirm_test_ci_high",
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)
IDENTITY = ("trial_id", "status", "ray_status")  # the columns before the parameters
PARAM_KINDS = {"memory_size": "int", "iteration_size": "int", "patch_size": "int"}
# Columns an older version wrote under another name (trials.csv before the record took the reported metric's name):
# read under today's name, so an experiment written before still loads
RENAMED = {"best_val_accuracy": "val_accuracy_best"}
# Columns an older version did not have, read from the one that held their meaning then (one split, accuracy)
FILLED_FROM = {"val_score_mean": "val_accuracy", "test_score": "test_accuracy"}
# Filled from the last report, the rest from the trial's bookkeeping
_FROM_REPORT = tuple(
    c for c in COLUMN_NAMES if c not in (*IDENTITY, *CONFIRM_COLUMNS, "val_accuracy_best", "epochs", "path")
)


def sampled(config: Mapping[str, Any]) -> dict[str, Any]:
    """The sampled parameters of a trial's config (Ray's, or its ``params.json``): the fixed part, the budget, the
    quantiles and anything nested left out."""
    return {
        k: v
        for k, v in config.items()
        if k not in NOT_SAMPLED and not k.endswith(QUANTILE_SUFFIX) and not isinstance(v, (dict, list))
    }


def trial_record(
    last: Mapping[str, Any],
    *,
    trial_id: str,
    ray_status: str | None,
    config: Mapping[str, Any],
    val_accuracy_best: float | None,
    path: str | None,
) -> dict[str, Any]:
    """The row of one trial: its identity, status, searched parameters (as sampled, M/I/P as used) and last report.

    ``val_accuracy_best`` is the trial's best validation accuracy over its reports, which the caller has at hand
    (Ray's metric analysis, or every line of ``result.json``): reports before the trainable reported it lack it.
    """
    row: dict[str, Any] = {"trial_id": str(trial_id), "status": trial_status(ray_status, last).value}
    row["ray_status"] = ray_status
    row.update(sampled(config))
    row.update({k: last[k] for k in SEARCHED_IN_RESULT if k in last})
    row.update({k: last.get(k) for k in _FROM_REPORT})
    row.update({k: v for k, v in last.items() if _is_fold_column(k)})
    row["val_accuracy_best"] = val_accuracy_best
    row["epochs"] = last.get("training_iteration", last.get("epoch"))
    row["path"] = path
    return row


def renamed(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the columns of an older version (:data:`RENAMED`) under today's names, in their place; where both
    are there (rows of both versions), today's value is kept and the old one fills its gaps."""
    both = [old for old, new in RENAMED.items() if old in df and new in df]
    df = df.rename(columns={old: new for old, new in RENAMED.items() if old in df and new not in df})
    if both:
        df = df.assign(**{RENAMED[old]: df[RENAMED[old]].combine_first(df[old]) for old in both}).drop(columns=both)
    return df


def best_of(values: list[Any]) -> float | None:
    """The highest finite value (e.g. a trial's best validation accuracy over its epochs)."""
    finite = [v for v in (_finite(x) for x in values) if v is not None]
    return max(finite) if finite else None


def coerce(df: pd.DataFrame) -> pd.DataFrame:
    """Give each known column its type (numbers, nullable ints and booleans), adding missing ones as empty; a column
    an older version named otherwise is read under today's name (:func:`renamed`)."""
    df = renamed(df)  # a new frame: the caller's is left as it is
    for new, old in FILLED_FROM.items():
        if old in df and (new not in df or df[new].isna().all()):
            df[new] = df[old]
    folds = [c for c in df.columns if _is_fold_column(str(c))]
    kinds = {c.name: c.kind for c in COLUMNS} | PARAM_KINDS | {c: "float" for c in folds}
    for name in COLUMN_NAMES:
        if name not in df:
            df[name] = None
    for name, kind in kinds.items():
        if name not in df:
            continue
        if kind == "float":
            df[name] = pd.to_numeric(df[name], errors="coerce")
        elif kind == "int":
            df[name] = pd.to_numeric(df[name], errors="coerce").round().astype("Int64")
        elif kind == "bool":
            df[name] = df[name].map(as_bool).astype("boolean")
        else:
            df[name] = df[name].map(lambda v: v if isinstance(v, str) or v is None else _text(v))
    return df


def fold_columns(df: pd.DataFrame, prefix: str = FOLD_SCORE) -> list[str]:
    """The per-fold score columns of ``df`` (``val_score_fold0`` ..; ``prefix`` :data:`TEST_FOLD_SCORE`: the fold
    models' test scores), in fold order."""
    found = [c for c in df.columns if re.fullmatch(rf"{prefix}\d+", str(c))]
    return sorted(found, key=lambda c: int(c[len(prefix) :]))


def _is_fold_column(name: str) -> bool:
    return bool(FOLD_SCORE_PATTERN.fullmatch(name) or TEST_FOLD_SCORE_PATTERN.fullmatch(name))


def as_bool(value: Any) -> Any:
    """``True``/``False`` from a bool, 0/1 or the text a CSV holds; ``pd.NA`` when unknown."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return bool(value)
    return pd.NA


def _text(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
