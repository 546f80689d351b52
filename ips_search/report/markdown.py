"""Markdown of a search: tables for reading (numbers rounded, ``|`` escaped), the best configuration, ``summary.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ips_search.experiment import MEMORY_METRIC, METRIC, Status, best
from ips_search.report.axes import AXES, axis_spec, param_columns

SHOWN = [
    "trial_id",
    "status",
    "memory_size",
    "iteration_size",
    "patch_size",
    "lr",
    "val_accuracy",
    "val_accuracy_best",
    "test_accuracy",
    "peak_memory_mb",
    "memory_kind",
    "feasible",
    "epochs",
    "time_total_s",
]
BEST_HEADING = "Best configuration"


def _cell(col: str, value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):
            return "inf"
        if col in AXES and AXES[col].log:
            return f"{value:.2e}"
        if "accuracy" in col:
            return f"{value:.4f}"
        if col == "budget_mb":
            return f"{value:g}"
        if col.endswith("_mb") or col.endswith("_s") or col == "images_per_s":
            return f"{value:.1f}"
        return f"{value:.4g}"
    text = str(value)
    for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("$", "\\$"), ("<", "&lt;"), (">", "&gt;"), ("\n", " ")):
        text = text.replace(char, escaped)
    return text


def to_markdown(df: pd.DataFrame, columns: list[str] | None = None, max_rows: int | None = None) -> str:
    """A Markdown table of ``df`` (numbers rounded for reading, ``|`` escaped), or ``_(none)_``."""
    if df is None or df.empty:
        return "_(none)_"
    cols = [c for c in columns if c in df] if columns is not None else list(df.columns)
    view = df[cols].head(max_rows) if max_rows else df[cols]
    header = "| " + " | ".join(_cell("", c) for c in cols) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(view[c]) else "---" for c in cols) + "|"
    body = [
        "| " + " | ".join(_cell(c, v) for c, v in zip(cols, row, strict=True)) + " |"
        for row in view.itertuples(index=False, name=None)
    ]
    more = [f"\n_{len(df) - len(view)} more rows in the CSV_"] if len(view) < len(df) else []
    return "\n".join([header, rule, *body, *more])


def shown_columns(df: pd.DataFrame, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The columns worth showing in a Markdown table: the usual ones plus searched parameters."""
    params = param_columns(df)
    cols = [*extra, "trial_id", "status", *params]
    cols += [c for c in SHOWN if c not in cols]
    return [c for c in cols if c in df]


def escape(text: Any) -> str:
    """``text`` as literal Markdown: no emphasis, no code spans, no HTML."""
    return _cell("", str(text)).replace("`", "'").replace("*", "\\*").replace("_", "\\_")


def best_config_markdown(
    df: pd.DataFrame, max_memory_mb: float | None = None, heading: str = "##", search: str | None = None
) -> str:
    """The best configuration by :func:`ips_search.experiment.best`, in words and as a one-row table.

    While no trial has completed, the provisional leader (same keys, any trial with a validation accuracy) is shown
    and called provisional. ``search``: the experiment's name, said in the first sentence.
    """
    row, provisional = best(df), False
    if row is None:
        row, provisional = best(df, provisional=True), True
    lines = [f"{heading} {BEST_HEADING}", ""]
    if row is None:
        return "\n".join([*lines, "_No trial has a validation accuracy yet._", ""])
    budget = f"within the memory budget of {max_memory_mb:g} MB" if max_memory_mb else "(no memory budget was set)"
    if provisional:
        lines += ["**Provisional**: no trial has completed yet; this is the leader so far.", ""]
    params = ", ".join(f"{axis_spec(p).heading} = {_cell(p, row.get(p))}" for p in param_columns(df))
    what = "leading trial so far" if provisional else "best completed trial"
    of = f" of search {escape(search)}" if search else ""
    lines += [
        f"Trial {escape(row['trial_id'])} ({escape(row.get('status'))}), the {what}{of} {budget} by "
        "validation accuracy (ties: lower peak memory, then fewer trial-seconds; test accuracy takes no part).",
        "",
        f"- {params}" if params else "- (no searched parameter recorded)",
        f"- validation accuracy {_cell(METRIC, row.get(METRIC))}, test accuracy "
        f"{_cell('test_accuracy', row.get('test_accuracy'))}, peak memory "
        f"{_cell(MEMORY_METRIC, row.get(MEMORY_METRIC))} MB ({escape(row.get('memory_kind'))})",
        "",
    ]
    return "\n".join(lines)


def summary_markdown(exp: Any, tables: dict[str, pd.DataFrame], files: dict[str, Path], notes: list[str]) -> str:
    """``summary.md``: the best configuration, the settings, notes, every table, and links to the plots."""
    import datetime as dt

    df = tables["all_trials"]
    s = exp.settings
    running = int(df["status"].isin([Status.RUNNING, Status.PENDING]).sum()) if "status" in df else 0
    budget = f"{exp.max_memory_mb:g} MB" if exp.max_memory_mb else "none"
    where = str(exp.path).replace("`", "'").replace("\n", " ")
    lines = [
        f"# IPS search report: {escape(exp.name)}",
        "",
        f"- experiment: `{where}`",
        f"- space: {escape(s.get('space', '?'))}; objective: {escape(s.get('objective', '?'))}; sampler: "
        f"{escape(s.get('sampler', '?'))}; scheduler: {escape(s.get('scheduler', '?'))}; memory budget: {budget}",
        f"- trials: {len(df)} of {s.get('trials', '?')} planned ("
        + ", ".join(f"{n} {st}" for st, n in zip(tables["status"]["status"], tables["status"]["trials"], strict=True))
        + ")"
        + (f"; **{running} still running or pending: this is a snapshot**" if running else ""),
        f"- epochs per trial: {exp.max_epochs or '?'}; written {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
    ]
    if notes:
        lines += ["**Notes**", "", *[f"- {escape(n)}" for n in notes], ""]
    lines += [best_config_markdown(df, exp.max_memory_mb)]

    def image(name: str, alt: str) -> list[str]:
        return [f"![{alt}]({name})", ""] if name in files else []

    budget_cols = ["budget_mb", "trials_within", "trial_id", *param_columns(df), METRIC, "test_accuracy", MEMORY_METRIC]
    lines += [
        "## Accuracy vs peak memory: the Pareto set",
        "",
        "Completed feasible trials that no other trial beats on both validation accuracy and peak memory.",
        "",
        to_markdown(tables["pareto"], shown_columns(tables["pareto"])),
        "",
        *image("accuracy_vs_memory.png", "validation accuracy against peak memory"),
        "## Top trials",
        "",
        "Completed trials within the memory budget, by validation accuracy.",
        "",
        to_markdown(tables["top"], shown_columns(tables["top"], ["rank"])),
        "",
        "## Best trial under each memory budget",
        "",
        to_markdown(tables["budgets"], [c for c in budget_cols if c in tables["budgets"]]),
        "",
        "## Parameter effects",
        "",
        "Completed trials grouped by each parameter's value (or bin).",
        "",
        to_markdown(tables["effects"]),
        "",
        *image("parameters.png", "validation accuracy against each parameter"),
        "## Learning curves",
        "",
        *image("learning_curves.png", "learning curves of the top trials"),
        "## Parameter importance",
        "",
    ]
    imp = tables.get("importance")
    if imp is not None and not imp.empty:
        wide = imp.pivot_table(index="parameter", columns="target", values="importance").reset_index()
        lines += [to_markdown(wide), "", *image("importance.png", "parameter importance")]
    else:
        lines += ["_Not computed; see the notes above._", ""]
    lines += ["## Attention maps of the best trial", ""]
    lines += image("attention.png", "attention maps") or ["_Not drawn; see the notes above._", ""]
    lines += ["## All trials", "", to_markdown(df, shown_columns(df)), ""]
    return "\n".join(lines)
