"""Tables of a search: the top trials, the Pareto set, the best trial per memory budget, parameter effects, statuses.

Every function takes the trials DataFrame of :func:`ips_search.report.load_results`
and returns a DataFrame; :func:`build_tables` makes all of them and
:func:`write_tables` saves them as CSV. Ranking is :func:`ips_search.experiment.rank`'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ips_search.experiment import MEMORY_METRIC, METRIC, completed, finite, rank
from ips_search.experiment import pareto_front as _pareto_front
from ips_search.report.axes import PARAM_ORDER, axis_spec, param_columns
from ips_search.report.selection import SCORE_STD, TEST_SCORE, with_scores

EFFECT_COLUMNS = [
    "parameter",
    "value",
    "trials",
    "mean_val_score",
    "best_val_score",
    "mean_test_accuracy",
    "mean_peak_memory_mb",
]


def pareto_front(df: pd.DataFrame, x: str = MEMORY_METRIC, y: str = METRIC, **kwargs: bool) -> pd.DataFrame:
    """:func:`ips_search.experiment.pareto_front` of ``df``, whose score is its validation accuracy when it predates
    cross-validation (:func:`ips_search.report.selection.with_scores`): a table read by hand reports as before."""
    return _pareto_front(with_scores(df), x, y, **kwargs)


def full_budget(df: pd.DataFrame, feasible_only: bool = True) -> pd.DataFrame:
    """Trials that ran all their epochs, within the budget if asked (:func:`ips_search.experiment.completed`)."""
    return completed(df, feasible_only)


def ranked(df: pd.DataFrame) -> pd.DataFrame:
    """Trials best first by the ranking rule (:func:`ips_search.experiment.rank`); while none has completed, every
    trial with a validation accuracy, by the same keys."""
    return rank(with_scores(df), provisional=True)


def top_trials(df: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The ``n`` best trials (see :func:`ranked`) with a ``rank`` column."""
    top = ranked(df).head(n).copy()
    top.insert(0, "rank", range(1, len(top) + 1))
    return top.reset_index(drop=True)


def best_trial(df: pd.DataFrame) -> pd.Series | None:
    """The best trial's row (see :func:`ranked`), or ``None``."""
    top = ranked(df)
    return None if top.empty else top.iloc[0]


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits (47.3 -> 48, 1234 -> 1300)."""
    if value <= 0:
        return value
    step = 10 ** (math.floor(math.log10(value)) - 1)
    return float(f"{math.ceil(value / step - 1e-9) * step:.2g}")


def default_budgets(df: pd.DataFrame, max_memory_mb: float | None = None) -> list[float]:
    """A few memory budgets spanning the full-budget trials' peak memory (quartiles, rounded), plus the search's."""
    pool = finite(full_budget(df, feasible_only=False), MEMORY_METRIC) if MEMORY_METRIC in df else df.iloc[:0]
    budgets = set()
    if not pool.empty:
        mem = pd.to_numeric(pool[MEMORY_METRIC]).to_numpy(dtype=float)
        budgets = {_round_up(float(np.quantile(mem, q))) for q in (0.25, 0.5, 0.75, 1.0)}
    if max_memory_mb:
        budgets.add(float(max_memory_mb))
    return sorted(budgets)


def budget_table(
    df: pd.DataFrame, budgets: list[float] | None = None, max_memory_mb: float | None = None
) -> pd.DataFrame:
    """The best full-budget trial whose peak memory is within each budget (MB)."""
    df = with_scores(df)
    budgets = budgets if budgets is not None else default_budgets(df, max_memory_mb)
    pool = finite(full_budget(df), MEMORY_METRIC, METRIC) if MEMORY_METRIC in df else df.iloc[:0]
    params = param_columns(df)
    rows = []
    for budget in budgets:
        within = pool[pd.to_numeric(pool[MEMORY_METRIC]) <= budget] if not pool.empty else pool
        row: dict[str, Any] = {"budget_mb": budget, "trials_within": len(within)}
        best = ranked(within)
        if not best.empty:
            b = best.iloc[0]
            row.update(
                {
                    "trial_id": b["trial_id"],
                    **{p: b.get(p) for p in params},
                    # the score that ranked, its spread over the folds, and the accuracies an older table had
                    **{c: b.get(c) for c in (METRIC, SCORE_STD, "val_accuracy", TEST_SCORE, "test_accuracy")},
                    MEMORY_METRIC: b.get(MEMORY_METRIC),
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _bins(values: pd.Series, name: str, max_bins: int) -> pd.Series:
    """Group labels for a parameter: its values when few, else quantile bins (log-spaced on a log axis)."""
    spec = axis_spec(name)
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().all():
        return values.astype(str)
    if numeric.nunique() <= max_bins:
        return numeric.map(spec.format)
    log = spec.log and bool((numeric > 0).all())
    binned = pd.qcut(np.log(numeric) if log else numeric, max_bins, duplicates="drop")
    integers = spec.integer or (not spec.log and bool((numeric == np.round(numeric)).all()))
    labels = {}
    for interval in binned.cat.categories:
        lo, hi = interval.left, interval.right
        if log:
            lo, hi = math.exp(lo), math.exp(hi)
        if integers:  # the whole numbers in (lo, hi]: M = 3-5, not 2.999-5.8
            first, last = math.floor(lo) + 1, math.floor(hi)
            labels[interval] = f"{first}" if first == last else f"{first}–{last}"
        else:
            labels[interval] = f"{spec.format(lo)}–{spec.format(hi)}"
    return binned.map(labels).astype(str)


def parameter_effects(df: pd.DataFrame, params: list[str] | None = None, max_bins: int = 5) -> pd.DataFrame:
    """Validation accuracy and peak memory of full-budget trials grouped by each parameter's value (or bin).

    One row per (parameter, value or bin): trials, mean / best validation accuracy,
    mean test accuracy, mean peak memory.
    """
    df = with_scores(df)
    params = params or [p for p in param_columns(df) if p in PARAM_ORDER]
    pool = full_budget(df, feasible_only=False)
    pool = pool[pool[METRIC].notna()] if METRIC in pool else pool.iloc[:0]
    rows = []
    for name in params:
        if name not in pool or pool[name].isna().all():
            continue
        sub = pool[pool[name].notna()]
        groups = _bins(sub[name], name, max_bins)
        order = pd.to_numeric(sub[name], errors="coerce").groupby(groups.values).min().sort_values()
        for label in order.index:
            g = sub[groups.values == label]
            rows.append(
                {
                    "parameter": name,
                    "value": label,
                    "trials": len(g),
                    "mean_val_score": g[METRIC].mean(),
                    "best_val_score": g[METRIC].max(),
                    "mean_test_accuracy": g["test_accuracy"].mean() if "test_accuracy" in g else np.nan,
                    "mean_peak_memory_mb": finite(g, MEMORY_METRIC)[MEMORY_METRIC].mean()
                    if MEMORY_METRIC in g
                    else np.nan,
                }
            )
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Trials per status."""
    if df.empty or "status" not in df:
        return pd.DataFrame(columns=["status", "trials"])
    counts = df["status"].value_counts()
    return pd.DataFrame({"status": counts.index.astype(str), "trials": counts.to_numpy()})


def build_tables(
    df: pd.DataFrame, max_memory_mb: float | None = None, top: int = 10, budgets: list[float] | None = None
) -> dict[str, pd.DataFrame]:
    """All tables by file stem: ``all_trials``, ``top``, ``pareto``, ``budgets``, ``effects``, ``status``."""
    return {
        "all_trials": df,
        "top": top_trials(df, top),
        "pareto": pareto_front(df).reset_index(drop=True),
        "budgets": budget_table(df, budgets, max_memory_mb),
        "effects": parameter_effects(df),
        "status": status_counts(df),
    }


def write_tables(tables: dict[str, pd.DataFrame], folder: str | Path) -> dict[str, Path]:
    """Save each table as ``<folder>/<name>.csv``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, table in tables.items():
        paths[name] = folder / f"{name}.csv"
        table.to_csv(paths[name], index=False)
    return paths
