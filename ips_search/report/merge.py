"""The trials table from its three sources: ``trials.csv``, the trial folders and Ray's snapshot.

* a trial folder wins over its ``trials.csv`` row when it has at least as many epochs (the CSV may be stale);
  Ray's status still comes from the CSV, and a trial the CSV says Ray stopped stays stopped;
* a trial the CSV lacks (CSV missing or stale) gets Ray's status from the snapshot, or ``ERROR`` when its folder
  holds ``error.txt``;
* a trial only Ray lists is pending when it has not started, and left out (with a note) when it finished.

Rows are built with :func:`ips_search.experiment.trial_record` (in the folder reader) and typed with
:func:`ips_search.experiment.coerce`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ips_search.experiment import (
    COLUMN_NAMES,
    IDENTITY,
    METRIC,
    ORDER,
    TRIALS_CSV,
    Status,
    coerce,
    sampled,
    trial_status,
)
from ips_search.report.axes import param_columns
from ips_search.report.selection import typed_scores, with_scores
from ips_search.report.sources import CURVE_COLUMNS, RayTrialState, TrialFolder
from ips_search.report.sources.ray_state import NOT_STARTED

TRAILING = ("node_id", "path")  # long, rarely read: last
METRIC_COLUMNS = [c for c in COLUMN_NAMES if c not in (*IDENTITY, *TRAILING)]
CURVE_NUMBERS = ("epoch", *(c for c in CURVE_COLUMNS if c != "status"))


def merge_trials(
    csv: pd.DataFrame | None,
    folders: list[TrialFolder],
    states: dict[str, RayTrialState],
    space: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """One tidy row per trial (see the module docstring), and notes on what was stale or lost, in words."""
    notes: list[str] = []
    csv_rows = {str(r["trial_id"]): r for r in csv.to_dict("records")} if csv is not None else {}
    by_id = {f.trial_id: f for f in folders}
    out = []
    for trial_id, csv_row in csv_rows.items():
        out.append(_with_csv(by_id.pop(trial_id, None), _present(csv_row)))
    for folder in by_id.values():  # folders the CSV doesn't know (CSV missing or stale)
        state = states.get(folder.trial_id)
        ray_status = state.ray_status if state else None
        if (folder.path / "error.txt").is_file():
            ray_status = "ERROR"
        out.append({**folder.row, "status": trial_status(ray_status, folder.last), "ray_status": ray_status})
    known = {str(r["trial_id"]) for r in out}
    lost = 0
    for trial_id, state in states.items():  # trials Ray knows that have no folder
        if trial_id in known:
            continue
        if state.ray_status in NOT_STARTED:  # not started yet: no folder is normal
            row = {"trial_id": trial_id, **sampled(state.config)}
            out.append({**row, "status": Status.PENDING, "ray_status": state.ray_status})
        else:
            lost += 1
    if lost:
        notes.append(f"{lost} finished trial(s) that Ray lists have no folder any more: left out")
    if csv is not None and len(csv_rows) < len(out):
        notes.append(
            f"{TRIALS_CSV} lists {len(csv_rows)} of {len(out)} trials (stale): the rest come from their folders"
        )
    return tidy(out, space or {}), notes


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row without its empty cells."""
    return {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}


def _with_csv(folder: TrialFolder | None, clean: dict[str, Any]) -> dict[str, Any]:
    """A trial's row from its CSV row and (when there is one) its folder."""
    if folder is None:  # no folder (pending, or removed): the CSV row as it is
        if "path" in clean and not Path(str(clean["path"])).is_dir():
            clean["path"] = None
        return clean
    row, last = folder.row, folder.last
    if _newer(row, clean):
        merged = {**clean, **{k: v for k, v in row.items() if v is not None}}
        merged["status"] = trial_status(clean.get("ray_status"), last) if last else clean.get("status", Status.PENDING)
        if merged["status"] == Status.RUNNING and clean.get("status") in (Status.EARLY_STOPPED, Status.FAILED):
            merged["status"] = clean["status"]  # the CSV knows Ray stopped it
    else:
        merged = {**row, **clean}
    merged["path"] = row["path"]
    return merged


def _newer(folder_row: dict[str, Any], csv_row: dict[str, Any]) -> bool:
    """Whether the trial folder has at least as many epochs as the CSV row (the folder is then authoritative)."""
    a, b = _number(folder_row.get("epochs")), _number(csv_row.get("epochs"))
    return a is not None and (b is None or a >= b)


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def tidy(rows: list[dict[str, Any]], space: dict[str, Any]) -> pd.DataFrame:
    """Typed rows in column order (identity, parameters, metrics, the rest), completed trials first, best first."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = coerce(df)  # early on, no trial has reported some columns: they are added empty
    df = with_scores(typed_scores(df))  # before cross-validation, val_accuracy is the score
    front = [*IDENTITY, *param_columns(df, space)]
    rest = [c for c in METRIC_COLUMNS if c in df]
    others = [c for c in df.columns if c not in front and c not in rest and c not in TRAILING]
    order = [c for c in front if c in df] + rest + others + [c for c in TRAILING if c in df]
    df = df[order]
    df = (
        df.assign(_order=df["status"].map(ORDER).fillna(len(ORDER)))
        .sort_values(["_order", METRIC], ascending=[True, False], kind="stable")
        .drop(columns="_order")
    )
    return df.reset_index(drop=True)


def merge_curves(folders: list[TrialFolder]) -> pd.DataFrame:
    """One row per trial and epoch (``trial_id, epoch, val_accuracy, ...``), numbers typed, in trial and epoch order."""
    curves = [f.curve for f in folders if not f.curve.empty]
    df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["trial_id", "epoch", *CURVE_COLUMNS])
    for col in CURVE_NUMBERS:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df.sort_values(["trial_id", "epoch"], kind="stable").reset_index(drop=True)
