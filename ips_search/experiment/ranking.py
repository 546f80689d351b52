"""The ranking rule, one for the CLI summary, the report's tables and its attention maps.

Completed, feasible trials by their validation score (``evaluation.metric``, the mean over the cross-validation
folds); ties go to the lower spread over folds, then to lower peak memory, then to fewer trial-seconds. Experiments
whose confirm stage retrained configs on their validation split (before the folds) list the confirmed configs first,
by their mean validation score over seeds. The test set never takes part: model selection must not see it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ips_search.experiment.record import MEMORY_METRIC, METRIC, as_bool
from ips_search.experiment.status import Status

CONFIRMED_MEAN = "confirm_val_mean"
SPREAD = "val_score_std"
RANK_KEYS = ((METRIC, False), (SPREAD, True), (MEMORY_METRIC, True), ("time_total_s", True))  # (column, ascending)


def completed(df: pd.DataFrame, feasible_only: bool = True) -> pd.DataFrame:
    """Trials that ran all their epochs, and (``feasible_only``) were not found over the memory budget."""
    out = df[df["status"].astype(str) == Status.COMPLETED] if "status" in df else df
    if feasible_only and "feasible" in out:
        out = out[out["feasible"].map(as_bool).map(lambda v: v is not False)]  # True, or unknown
    return out


def rank(df: pd.DataFrame, provisional: bool = False) -> pd.DataFrame:
    """Completed, feasible trials best first (see the module docstring).

    ``provisional``: while no trial has completed, rank every trial that reported a validation accuracy by the same
    keys, so a running search's report has something to show; the CLI's final choice never uses it.
    """
    pool = completed(df)
    if METRIC in pool:
        pool = pool[pd.to_numeric(pool[METRIC], errors="coerce").notna()]
    if pool.empty and provisional and METRIC in df:
        pool = df[pd.to_numeric(df[METRIC], errors="coerce").notna()]
    if pool.empty:
        return pool
    keys = [(c, asc) for c, asc in RANK_KEYS if c in pool]
    numeric = pool.assign(**{f"_rank_{c}": pd.to_numeric(pool[c], errors="coerce") for c, _ in keys})
    if CONFIRMED_MEAN in pool:  # confirmed configs first, by their mean over seeds, then the rest by one run
        mean = pd.to_numeric(pool[CONFIRMED_MEAN], errors="coerce")
        numeric["_rank_confirmed"] = mean.notna()
        numeric[f"_rank_{METRIC}"] = mean.fillna(numeric[f"_rank_{METRIC}"])
        keys = [("confirmed", False), *keys]
    ordered = numeric.sort_values(
        [f"_rank_{c}" for c, _ in keys], ascending=[asc for _, asc in keys], kind="stable", na_position="last"
    )
    return ordered.drop(columns=[f"_rank_{c}" for c, _ in keys])


def best(df: pd.DataFrame, provisional: bool = False) -> pd.Series | None:
    """The best trial's row by :func:`rank`, or ``None``."""
    ranked = rank(df, provisional)
    return None if ranked.empty else ranked.iloc[0]


def pareto_front(
    df: pd.DataFrame,
    x: str = MEMORY_METRIC,
    y: str = METRIC,
    minimize_x: bool = True,
    maximize_y: bool = True,
    completed_only: bool = True,
) -> pd.DataFrame:
    """The rows of ``df`` that no other row dominates, sorted by ``x``.

    By default: lower peak memory and higher validation accuracy are better, and only full-budget rows count
    (:func:`completed`). A row is dominated when another is at least as good on both axes and better on one; rows
    with equal values are all kept. Rows where ``x`` or ``y`` is missing or infinite are ignored.
    """
    if x not in df or y not in df:
        return df.iloc[0:0]
    pool = finite(completed(df) if completed_only else df, x, y)
    if pool.empty:
        return pool
    xs = pd.to_numeric(pool[x]).to_numpy(dtype=float) * (1 if minimize_x else -1)  # smaller is better
    ys = pd.to_numeric(pool[y]).to_numpy(dtype=float) * (-1 if maximize_y else 1)  # smaller is better
    no_worse = (xs[None, :] <= xs[:, None]) & (ys[None, :] <= ys[:, None])  # [i, j]: j no worse than i
    better = (xs[None, :] < xs[:, None]) | (ys[None, :] < ys[:, None])
    front = pool[~(no_worse & better).any(axis=1)]
    return front.sort_values([x, y], ascending=[minimize_x, not maximize_y], kind="stable")


def finite(df: pd.DataFrame, *cols: str) -> pd.DataFrame:
    """The rows whose ``cols`` are all finite numbers."""
    keep = np.ones(len(df), dtype=bool)
    for col in cols:
        keep &= np.isfinite(pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float))
    return df[keep]
