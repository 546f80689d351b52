"""Markdown of a search: tables for reading (numbers rounded, ``|`` escaped), the best configuration, the confirm stage,
the per-fold scores, ``summary.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ips_search.experiment import FOLD_SCORE, FOLD_SCORE_PATTERN, MEMORY_METRIC, METRIC, Status, best
from ips_search.report.axes import AXES, axis_spec, describe, param_columns
from ips_search.report.selection import (
    SCORE,
    SCORE_STD,
    TEST_SCORE,
    Evaluation,
    evaluation_of,
    metric_name,
)
from ips_search.report.sources import REFERENCE_LABEL

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
CONFIRM_HEADING = "Confirm stage"
FOLDS_HEADING = "Cross-validation of the top trials"
ROC_HEADING = "ROC curve of the chosen config on the test set"
# columns whose numbers are scores in [0, 1], written with 4 decimals
SCORE_WORDS = ("accuracy", "score", "auc", "confirm_test", "confirm_val", "fold ", "test (")


def _cell(col: str, value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):
            return "inf"
        if col in AXES and AXES[col].log:
            return f"{value:.2e}"
        if any(word in col for word in SCORE_WORDS):
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
    """The columns worth showing in a Markdown table: the usual ones plus searched parameters; with
    cross-validated selection, the score that ranks (and its spread over the folds) before the accuracies."""
    params = param_columns(df)
    ev = evaluation_of(df)
    scores = [] if ev.legacy else ["metric", SCORE, *([SCORE_STD, "folds_done"] if ev.cross_validated else [])]
    cols = [*extra, "trial_id", "status", *params, *scores]
    cols += [c for c in SHOWN if c not in cols]
    if not ev.legacy:
        cols.insert(cols.index("test_accuracy") if "test_accuracy" in cols else len(cols), TEST_SCORE)
    return [c for c in cols if c in df]


def _number(value: Any) -> float | None:
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return float(number) if pd.notna(number) else None


def _score(value: Any, std: Any = None) -> str:
    """A score with 4 decimals, and ``± std`` when there is one; ``n/a`` when missing."""
    mean, spread = _number(value), _number(std)
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {spread:.4f}" if spread is not None else f"{mean:.4f}"


def selection_sentence(ev: Evaluation) -> str:
    """How configs were ranked, in one sentence (Markdown)."""
    if ev.legacy:
        return "validation accuracy (ties: lower peak memory, then fewer trial-seconds; test accuracy takes no part)"
    spread = "lower spread over the folds, then " if ev.cross_validated else ""
    return f"{ev.score_label} (ties: {spread}lower peak memory, then fewer trial-seconds; the test set takes no part)"


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
    ev = evaluation_of(df)
    memory = f"peak memory {_cell(MEMORY_METRIC, row.get(MEMORY_METRIC))} MB ({escape(row.get('memory_kind'))})"
    if ev.legacy:
        figures = (
            f"- validation accuracy {_cell(METRIC, row.get(METRIC))}, test accuracy "
            f"{_cell('test_accuracy', row.get('test_accuracy'))}, {memory}"
        )
    else:
        spread = row.get(SCORE_STD) if ev.cross_validated else None
        figures = (
            f"- {ev.score_label}: {_score(row.get(SCORE), spread)}"
            f"{' (mean ± standard deviation over the folds)' if _number(spread) is not None else ''}; "
            f"test {ev.metric_name} {_score(row.get(TEST_SCORE))} (held out, not used for ranking); {memory}"
        )
    lines += [
        f"Trial {escape(row['trial_id'])} ({escape(row.get('status'))}), the {what}{of} {budget} by "
        f"{selection_sentence(ev)}.",
        "",
        f"- {params}" if params else "- (no searched parameter recorded)",
        figures,
        "",
    ]
    return "\n".join(lines)


def confirm_markdown(confirm: pd.DataFrame, heading: str = "##", ev: Evaluation | None = None) -> str:
    """The confirm stage: per confirmed config, its M, I, P, lr, the test metric's mean ± standard deviation over the
    confirm runs, the patient-level bootstrap 95% interval and the number of runs (an older ``confirm.csv`` has no
    interval: what it has is shown); a line saying no confirm stage ran when ``confirm`` is empty."""
    lines = [f"{heading} {CONFIRM_HEADING}", ""]
    if confirm is None or confirm.empty:
        return "\n".join(
            [
                *lines,
                "_No confirm stage was run (`--confirm K` retrains the best configs with K new seeds and scores each "
                "run on the test set): every test figure in this report is one training run._",
                "",
            ]
        )
    has_interval = "confirm_test_ci_low" in confirm and confirm["confirm_test_ci_low"].notna().any()
    if has_interval:
        lines += [
            "The best configs retrained on every non-test slide with new seeds, each run scored once on the held-out "
            "test set: the test metric's mean ± standard deviation over the runs, and its 95% bootstrap interval "
            "(test slides resampled by patient). The test set chose nothing: these figures only report.",
            "",
        ]
    else:
        lines += [
            "The best configs trained again with more seeds (the search's own run included): mean ± standard "
            "deviation over the runs. This confirm stage recorded no bootstrap interval.",
            "",
        ]
    for row in confirm.to_dict("records"):
        lines.append(_confirm_line(row, ev or Evaluation()))
    return "\n".join([*lines, ""])


def _confirm_line(row: dict[str, Any], ev: Evaluation) -> str:
    """One confirmed config, in one bullet."""
    metric = row.get("metric") if isinstance(row.get("metric"), str) and row.get("metric") else ev.metric
    name = metric_name(metric)
    runs = _number(row.get("confirm_runs"))
    over = f" over {int(runs)} run{'' if runs == 1 else 's'}" if runs is not None else ""
    config = describe(pd.Series(row))
    head = f"- Trial {escape(row['trial_id'])}" + (f" ({escape(config)})" if config else "")
    if _number(row.get("confirm_test_mean")) is None:
        test = f"test {name}: no confirm run scored the test set"
    else:
        spread = row.get("confirm_test_std") if _number(runs) and runs > 1 else None
        test = f"test {name} **{_score(row.get('confirm_test_mean'), spread)}**{over}"
        if runs == 1:
            test += " (one run: no spread)"
    low, high = _number(row.get("confirm_test_ci_low")), _number(row.get("confirm_test_ci_high"))
    if low is not None and high is not None:
        test += f", 95% bootstrap interval [{low:.4f}, {high:.4f}]"
    elif "confirm_val_mean" in row and _number(row.get("confirm_val_mean")) is not None:
        test += f"; validation {name} {_score(row.get('confirm_val_mean'), row.get('confirm_val_std'))}"
    return f"{head}: {test}"


def folds_markdown(folds: pd.DataFrame, ev: Evaluation, heading: str = "##") -> str:
    """The per-fold scores of the top trials (:func:`ips_search.report.selection.fold_table`), or a line saying the
    experiment has one validation split."""
    lines = [f"{heading} {FOLDS_HEADING}", ""]
    if folds is None or folds.empty:
        return "\n".join(
            [
                *lines,
                "_One validation split: no per-fold scores (`evaluation.folds` K > 1, or `--folds K`, scores each "
                "config on K patient-level folds)._",
                "",
            ]
        )
    readable = {c: f"fold {str(c)[len(FOLD_SCORE) :]}" for c in folds.columns if FOLD_SCORE_PATTERN.fullmatch(str(c))}
    lines += [
        f"Each config's validation {ev.metric_name} on each of its {ev.folds} patient-level folds (no patient of a "
        "fold's validation slides is among its training slides), their mean (what ranks) and standard deviation. "
        "The test column is the mean over the fold models, each scoring test once at its fold's end, and **is not "
        "used for ranking**.",
        "",
        to_markdown(folds.rename(columns=readable)),
        "",
    ]
    return "\n".join(lines)


def reference_markdown(reference: pd.DataFrame, df: pd.DataFrame) -> str:
    """One paragraph on the full-bag reference run (M = N) beside the chosen config, or ``""`` without one."""
    if reference is None or reference.empty:
        return ""
    ref = reference.iloc[0]
    ev = evaluation_of(reference if not evaluation_of(reference).legacy else df)
    n = _number(ref.get("n_patches"))
    label = REFERENCE_LABEL[:1].upper() + REFERENCE_LABEL[1:]
    what = f"{label}{f', N = {int(n)}' if n is not None else ''}: every patch kept, no selection"
    spread = ref.get(SCORE_STD) if ev.cross_validated else None
    memory = _number(ref.get(MEMORY_METRIC))
    text = (
        f"**{what}** (trial {escape(ref.get('trial_id'))}, {escape(ref.get('status'))}): {ev.score_label}: "
        f"{_score(ref.get(SCORE), spread)}; peak memory {_cell(MEMORY_METRIC, memory)} MB"
    )
    if _number(ref.get(TEST_SCORE)) is not None:
        text += f"; test {ev.metric_name} {_score(ref.get(TEST_SCORE))} (not used for ranking)"
    chosen = best(df)
    if chosen is not None and memory and _number(chosen.get(MEMORY_METRIC)):
        ratio = memory / float(chosen[MEMORY_METRIC])
        text += (
            f". The chosen config (trial {escape(chosen['trial_id'])}): {_score(chosen.get(SCORE))} at "
            f"{_cell(MEMORY_METRIC, float(chosen[MEMORY_METRIC]))} MB; the full bag needs {ratio:.1f}x its peak memory"
        )
    return text + "."


def summary_markdown(exp: Any, tables: dict[str, pd.DataFrame], files: dict[str, Path], notes: list[str]) -> str:
    """``summary.md``: the best configuration, the settings, notes, every table, and links to the plots."""
    import datetime as dt

    df = tables["all_trials"]
    s = exp.settings
    running = int(df["status"].isin([Status.RUNNING, Status.PENDING]).sum()) if "status" in df else 0
    budget = f"{exp.max_memory_mb:g} MB" if exp.max_memory_mb else "none"
    where = str(exp.path).replace("`", "'").replace("\n", " ")
    ev = exp.evaluation
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
        f"- configs ranked by {selection_sentence(ev)}",
        "",
        confirm_markdown(exp.confirm, ev=ev),
    ]
    if notes:
        lines += ["**Notes**", "", *[f"- {escape(n)}" for n in notes], ""]
    lines += [best_config_markdown(df, exp.max_memory_mb)]

    def image(name: str, alt: str) -> list[str]:
        return [f"![{alt}]({name})", ""] if name in files else []

    lines += [folds_markdown(tables.get("folds", pd.DataFrame()), ev)]
    lines += [f"## {ROC_HEADING}", ""]
    lines += image("roc.png", "ROC curve of the chosen config on the test set") or [
        "_Not drawn; see the notes above._",
        "",
    ]
    reference = reference_markdown(exp.reference, df)

    scores = [METRIC, "test_accuracy"] if ev.legacy else [METRIC, SCORE_STD, TEST_SCORE]
    budget_cols = ["budget_mb", "trials_within", "trial_id", *param_columns(df), *scores, MEMORY_METRIC]
    score = "validation accuracy" if ev.legacy else f"the score ({ev.score_label})"
    lines += [
        "## Accuracy vs peak memory: the Pareto set",
        "",
        f"Completed feasible trials that no other trial beats on both {score} and peak memory"
        + ("; the plot's error bars are ± one standard deviation over the folds." if ev.cross_validated else "."),
        "",
        *([reference, ""] if reference else []),
        to_markdown(tables["pareto"], shown_columns(tables["pareto"])),
        "",
        *image(
            "accuracy_vs_memory.png", f"{'validation accuracy' if ev.legacy else ev.score_label} against peak memory"
        ),
        "## Top trials",
        "",
        f"Completed trials within the memory budget, by {'validation accuracy' if ev.legacy else ev.score_label}.",
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
