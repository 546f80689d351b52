"""How configs were selected, as the report shows it: the metric that ranked them, over how many patient-level folds,
each top trial's per-fold scores, the confirm stage's test figures and the full-bag reference.

A search with ``evaluation: {metric: auc, folds: 5}`` scores every config on K patient-level folds of the non-test
slides and ranks by the mean (``val_score_mean``), then by the spread (``val_score_std``); the test set is scored once
by each fold's model (``test_score``: their mean) and never ranks. An experiment written before that has none of
these columns: its last epoch's validation accuracy is its score (:func:`with_scores`), so it reports as it always
did.

Pandas only: no plotting here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ips_search.experiment import FOLD_SCORE_PATTERN, fold_columns, rank
from ips_search.report.axes import param_columns

SCORE = "val_score_mean"  # what ranks configs: the chosen metric's mean over the finished folds
SCORE_STD = "val_score_std"  # its standard deviation over the folds (empty with one fold)
TEST_SCORE = "test_score"  # the chosen metric on the held-out test set: the mean over the fold models, never ranks
LEGACY_SCORE = "val_accuracy"  # the score of an experiment written before cross-validation
TEST_NOT_RANKED = "test (not used for ranking)"  # the fold table's heading of test_score: never read it as a ranking
# the columns cross-validated selection adds to a trial's row (besides val_score_fold0 .. val_score_fold{K-1})
NUMBER_COLUMNS = (
    "folds",
    "folds_done",
    "val_score",
    SCORE,
    SCORE_STD,
    TEST_SCORE,
    "val_auc",
    "val_balanced_accuracy",
    "val_accuracy",
    "test_auc",
    "test_balanced_accuracy",
    "test_accuracy",
)
# what selection adds to the record: every column above but the two accuracies, which the record always had
SELECTION_COLUMNS = ("metric", *(c for c in NUMBER_COLUMNS if c not in ("val_accuracy", "test_accuracy")))
METRIC_NAMES = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy"}
# confirm.csv: trial_id, confirm_runs, the test metric's mean, std and patient-level bootstrap 95% interval, metric;
# an older confirm.csv has the validation accuracy's mean and std beside the test accuracy's, and no interval
CONFIRM_FIGURES = (
    "confirm_runs",
    "confirm_test_mean",
    "confirm_test_std",
    "confirm_test_ci_low",
    "confirm_test_ci_high",
    "confirm_val_mean",
    "confirm_val_std",
    "metric",
)


@dataclass(frozen=True)
class Evaluation:
    """How an experiment scored its configs: ``metric`` over ``folds`` patient-level folds.

    ``legacy``: written before cross-validation, so the score is the last epoch's validation accuracy on one split.
    """

    metric: str = "accuracy"
    folds: int = 1
    legacy: bool = True

    @property
    def metric_name(self) -> str:
        """The metric as a reader says it: ``AUC``, ``balanced accuracy``, ``accuracy``."""
        return metric_name(self.metric)

    @property
    def cross_validated(self) -> bool:
        """Scores are means over several folds, with a spread worth drawing."""
        return not self.legacy and self.folds > 1

    @property
    def score_label(self) -> str:
        """What ``val_score_mean`` is, for an axis or a sentence."""
        if self.legacy:
            return "validation accuracy (last epoch)"
        if self.folds > 1:
            return f"validation {self.metric_name}, mean of {self.folds} patient-level folds"
        return f"validation {self.metric_name}, one patient-level split"


def metric_name(metric: Any) -> str:
    """A metric's name for reading (``auc`` -> ``AUC``); an unknown one as written."""
    text = str(metric)
    return METRIC_NAMES.get(text, text.replace("_", " "))


def _values(df: pd.DataFrame, column: str) -> pd.Series:
    return df[column].dropna() if column in df else pd.Series(dtype=object)


def _numbers(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(df[column], errors="coerce").dropna() if column in df else pd.Series(dtype=float)


def is_selection_column(name: str) -> bool:
    """Whether ``name`` is a column of cross-validated selection (a score, a fold's score, the metric)."""
    return name in SELECTION_COLUMNS or FOLD_SCORE_PATTERN.fullmatch(name) is not None


def typed_scores(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its score columns as numbers (a CSV cell or a JSON value that is not a number reads as empty)."""
    cols = [c for c in df.columns if c in NUMBER_COLUMNS or FOLD_SCORE_PATTERN.fullmatch(str(c))]
    return df.assign(**{c: pd.to_numeric(df[c], errors="coerce") for c in cols}) if cols else df


def filled_fold_columns(df: pd.DataFrame) -> list[str]:
    """The per-fold score columns (``val_score_fold0`` ..) that hold a value, in fold order."""
    return [c for c in fold_columns(df) if df[c].notna().any()]


def evaluation_of(df: pd.DataFrame, settings: Mapping[str, Any] | None = None) -> Evaluation:
    """The experiment's :class:`Evaluation`: from its trials' ``metric`` and ``folds`` columns, else from its
    settings (``metric``, ``folds``, or the space's ``evaluation`` section); an experiment with neither is legacy."""
    settings = settings or {}
    section = settings.get("evaluation") if isinstance(settings.get("evaluation"), Mapping) else {}
    metrics = _values(df, "metric").astype(str)
    folds = _numbers(df, "folds")
    metric = metrics.mode().iloc[0] if not metrics.empty else settings.get("metric") or section.get("metric")
    k = folds.max() if not folds.empty else settings.get("folds") or section.get("folds")
    if k is None and filled_fold_columns(df):
        k = len(filled_fold_columns(df))
    if metric is None and k is None:
        return Evaluation()
    return Evaluation(metric=str(metric or "accuracy"), folds=max(1, int(k or 1)), legacy=False)


def with_scores(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``val_score_mean`` filled from ``val_accuracy`` when the experiment predates cross-validation
    (no trial has a score or a ``metric``), so ranking, plots and tables read one column either way.

    A newer experiment is left as it is: a trial still in its first fold has no mean yet, and its validation
    accuracy is not its score when the metric is another.
    """
    if df.empty or LEGACY_SCORE not in df or not _numbers(df, SCORE).empty or not _values(df, "metric").empty:
        return df
    return df.assign(**{SCORE: pd.to_numeric(df[LEGACY_SCORE], errors="coerce")})


def fold_table(df: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The ``n`` best trials' scores on each fold, their mean and spread, and their test score under a heading that
    says it takes no part in the ranking; empty unless the experiment has more than one fold."""
    folds = filled_fold_columns(df)
    if not evaluation_of(df).cross_validated or not folds:
        return pd.DataFrame()
    top = rank(df, provisional=True).head(n)
    cols = ["trial_id", "status", *param_columns(df), "folds_done", *folds, SCORE, SCORE_STD, TEST_SCORE]
    out = top[[c for c in cols if c in top]].rename(columns={TEST_SCORE: TEST_NOT_RANKED})
    out.insert(0, "rank", range(1, len(out) + 1))
    return out.reset_index(drop=True)


def confirmed_table(confirm: pd.DataFrame | None, trials: pd.DataFrame) -> pd.DataFrame:
    """One row per confirmed config: its ``trial_id``, M, I, P, lr (from ``trials``) and the confirm figures that
    ``confirm.csv`` holds (an older file has no interval and no metric); in the file's order."""
    if confirm is None or confirm.empty or "trial_id" not in confirm:
        return pd.DataFrame()
    figures = confirm[["trial_id", *(c for c in CONFIRM_FIGURES if c in confirm)]].copy()
    figures["trial_id"] = figures["trial_id"].astype(str)
    params = param_columns(trials)
    if "trial_id" in trials and params:
        own = trials[["trial_id", *params]].assign(trial_id=trials["trial_id"].astype(str))
        figures = figures.merge(own.drop_duplicates("trial_id"), on="trial_id", how="left")
    return figures[["trial_id", *params, *(c for c in CONFIRM_FIGURES if c in figures)]]


def confirmed_from_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """``confirm.csv``'s table rebuilt from the confirm columns ``trials.csv`` holds (when the file itself is gone)."""
    if "confirm_runs" not in trials:
        return pd.DataFrame()
    rows = trials[pd.to_numeric(trials["confirm_runs"], errors="coerce").notna()]
    return rows[["trial_id", *(c for c in CONFIRM_FIGURES if c in rows)]].reset_index(drop=True)
