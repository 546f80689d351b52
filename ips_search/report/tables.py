"""Tables of a search: all trials, the top trials, the Pareto set, the best trial per memory budget, parameter effects.

Every function takes the trials DataFrame of :func:`ips_search.report.load_results`
and returns a DataFrame; :func:`build_tables` makes all of them and
:func:`write_tables` saves them as CSV.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ips_search.experiment import completed, pareto_front, rank
from ips_search.experiment import finite as _finite
from ips_search.report.load import param_columns

SHOWN = [
    "trial_id",
    "status",
    "memory_size",
    "iteration_size",
    "patch_size",
    "lr",
    "val_accuracy",
    "best_val_accuracy",
    "test_accuracy",
    "peak_memory_mb",
    "memory_kind",
    "feasible",
    "epochs",
    "time_total_s",
]
LABELS = {
    "memory_size": "M (memory size)",
    "iteration_size": "I (iteration size)",
    "patch_size": "P (patch size)",
    "lr": "learning rate",
}


def full_budget(df: pd.DataFrame, feasible_only: bool = True) -> pd.DataFrame:
    """Trials that ran all their epochs, within the budget if asked (:func:`ips_search.experiment.completed`)."""
    return completed(df, feasible_only)


def ranked(df: pd.DataFrame) -> pd.DataFrame:
    """Trials best first by the ranking rule (:func:`ips_search.experiment.rank`); while none has completed, every
    trial with a validation accuracy, by the same keys."""
    return rank(df, provisional=True)


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
    pool = _finite(full_budget(df, feasible_only=False), "peak_memory_mb") if "peak_memory_mb" in df else df.iloc[:0]
    budgets = set()
    if not pool.empty:
        mem = pd.to_numeric(pool["peak_memory_mb"]).to_numpy(dtype=float)
        budgets = {_round_up(float(np.quantile(mem, q))) for q in (0.25, 0.5, 0.75, 1.0)}
    if max_memory_mb:
        budgets.add(float(max_memory_mb))
    return sorted(budgets)


def budget_table(
    df: pd.DataFrame, budgets: list[float] | None = None, max_memory_mb: float | None = None
) -> pd.DataFrame:
    """The best full-budget trial whose peak memory is within each budget (MB)."""
    budgets = budgets if budgets is not None else default_budgets(df, max_memory_mb)
    pool = _finite(full_budget(df), "peak_memory_mb", "val_accuracy") if "peak_memory_mb" in df else df.iloc[:0]
    params = param_columns(df)
    rows = []
    for budget in budgets:
        within = pool[pd.to_numeric(pool["peak_memory_mb"]) <= budget] if not pool.empty else pool
        row: dict[str, Any] = {"budget_mb": budget, "trials_within": len(within)}
        best = ranked(within)
        if not best.empty:
            b = best.iloc[0]
            row.update(
                {
                    "trial_id": b["trial_id"],
                    **{p: b.get(p) for p in params},
                    "val_accuracy": b.get("val_accuracy"),
                    "test_accuracy": b.get("test_accuracy"),
                    "peak_memory_mb": b.get("peak_memory_mb"),
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _bins(values: pd.Series, name: str, max_bins: int) -> pd.Series:
    """Group labels for a parameter: its values when few, else (log-spaced for lr) quantile bins."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().all():
        return values.astype(str)
    if numeric.nunique() <= max_bins:
        return numeric.map(lambda v: _fmt_value(name, v))
    log = name == "lr" and (numeric > 0).all()
    binned = pd.qcut(np.log(numeric) if log else numeric, max_bins, duplicates="drop")
    integers = name != "lr" and bool((numeric == np.round(numeric)).all())
    labels = {}
    for interval in binned.cat.categories:
        lo, hi = interval.left, interval.right
        if log:
            lo, hi = math.exp(lo), math.exp(hi)
        if integers:  # the whole numbers in (lo, hi]: M = 3-5, not 2.999-5.8
            first, last = math.floor(lo) + 1, math.floor(hi)
            labels[interval] = f"{first}" if first == last else f"{first}–{last}"
        else:
            labels[interval] = f"{_fmt_value(name, lo)}–{_fmt_value(name, hi)}"
    return binned.map(labels).astype(str)


def _fmt_value(name: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if name == "lr":
        return f"{value:.1e}"
    return f"{value:g}" if isinstance(value, float) and value != int(value) else f"{int(round(value))}"


def parameter_effects(df: pd.DataFrame, params: list[str] | None = None, max_bins: int = 5) -> pd.DataFrame:
    """Validation accuracy and peak memory of full-budget trials grouped by each parameter's value (or bin).

    One row per (parameter, value or bin): trials, mean / best validation accuracy,
    mean test accuracy, mean peak memory.
    """
    params = params or [p for p in param_columns(df) if p in ("memory_size", "iteration_size", "patch_size", "lr")]
    pool = full_budget(df, feasible_only=False)
    pool = pool[pool["val_accuracy"].notna()] if "val_accuracy" in pool else pool.iloc[:0]
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
                    "mean_val_accuracy": g["val_accuracy"].mean(),
                    "best_val_accuracy": g["val_accuracy"].max(),
                    "mean_test_accuracy": g["test_accuracy"].mean() if "test_accuracy" in g else np.nan,
                    "mean_peak_memory_mb": _finite(g, "peak_memory_mb")["peak_memory_mb"].mean()
                    if "peak_memory_mb" in g
                    else np.nan,
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "parameter",
            "value",
            "trials",
            "mean_val_accuracy",
            "best_val_accuracy",
            "mean_test_accuracy",
            "mean_peak_memory_mb",
        ],
    )


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Trials per status."""
    if df.empty or "status" not in df:
        return pd.DataFrame(columns=["status", "trials"])
    counts = df["status"].value_counts()
    return pd.DataFrame({"status": counts.index.astype(str), "trials": counts.to_numpy()})


MIN_IMPORTANCE_TRIALS = 5


def param_importances(study, min_trials: int = MIN_IMPORTANCE_TRIALS, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """Optuna's fANOVA importances of the sampled parameters, for validation accuracy and for peak memory.

    Returns ``(table, note)``: ``table`` has columns ``parameter, target, importance``
    (empty when they can't be computed) and ``note`` says why in words (or is empty).
    Uses COMPLETE trials of the study (early-stopped trials are PRUNED there);
    parameters with a single value are left out (nothing to attribute).
    """
    import optuna
    from optuna.trial import TrialState

    columns = ["parameter", "target", "importance"]
    if study is None:
        return pd.DataFrame(columns=columns), "no Optuna study (optuna.journal) in the experiment"
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(trials) < min_trials:
        return pd.DataFrame(columns=columns), (
            f"parameter importance needs at least {min_trials} finished trials in the Optuna study; "
            f"it has {len(trials)}"
        )
    names = sorted({p for t in trials for p in t.params})
    params = [p for p in names if len({repr(t.params.get(p)) for t in trials}) > 1]
    targets = {
        "val_accuracy": lambda t: t.values[0],
        "peak_memory_mb": lambda t: float(t.user_attrs.get("peak_memory_mb", math.nan)),
    }
    rows, notes = [], []
    for target, fn in targets.items():
        values = np.array([fn(t) for t in trials], dtype=float)
        usable = [t for t, v in zip(trials, values, strict=True) if np.isfinite(v)]
        spread = values[np.isfinite(values)]
        if len(usable) < min_trials or not params:
            notes.append(f"{target}: too few trials with a finite value or no varied parameter")
            continue
        if np.ptp(spread) == 0:
            notes.append(f"{target}: every trial has the same value, so no parameter explains it")
            continue
        sub = optuna.create_study(directions=["maximize"])
        sub.add_trials(
            [optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=fn(t)) for t in usable]
        )
        try:
            found = optuna.importance.get_param_importances(
                sub, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed), params=params
            )
        except (RuntimeError, ValueError) as exc:  # e.g. zero variance in every tree
            notes.append(f"{target}: Optuna could not compute importances ({exc})")
            continue
        rows += [{"parameter": p, "target": target, "importance": float(v)} for p, v in found.items()]
    return pd.DataFrame(rows, columns=columns), "; ".join(notes)


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


# -- Markdown ----------------------------------------------------------------------------------------------------------
def _cell(col: str, value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):
            return "inf"
        if col == "lr":
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


def _escape(text: Any) -> str:
    return _cell("", str(text)).replace("`", "'").replace("*", "\\*").replace("_", "\\_")


def summary_markdown(exp: Any, tables: dict[str, pd.DataFrame], files: dict[str, Path], notes: list[str]) -> str:
    """``summary.md``: settings, notes, the best trial, every table, and links to the plots."""
    import datetime as dt

    df = tables["all_trials"]
    s = exp.settings
    running = int(df["status"].isin(["running", "pending"]).sum()) if "status" in df else 0
    budget = f"{exp.max_memory_mb:g} MB" if exp.max_memory_mb else "none"
    where = str(exp.path).replace("`", "'").replace("\n", " ")
    lines = [
        f"# IPS search report: {_escape(exp.name)}",
        "",
        f"- experiment: `{where}`",
        f"- space: {_escape(s.get('space', '?'))}; objective: {_escape(s.get('objective', '?'))}; sampler: "
        f"{_escape(s.get('sampler', '?'))}; scheduler: {_escape(s.get('scheduler', '?'))}; memory budget: {budget}",
        f"- trials: {len(df)} of {s.get('trials', '?')} planned ("
        + ", ".join(f"{n} {st}" for st, n in zip(tables["status"]["status"], tables["status"]["trials"], strict=True))
        + ")"
        + (f"; **{running} still running or pending: this is a snapshot**" if running else ""),
        f"- epochs per trial: {exp.max_epochs or '?'}; written {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
    ]
    if notes:
        lines += ["**Notes**", "", *[f"- {_escape(n)}" for n in notes], ""]
    best = best_trial(df)
    lines += ["## Best trial", ""]
    if best is None:
        lines += ["_No trial has a validation accuracy yet._", ""]
    else:
        params = ", ".join(f"{LABELS.get(p, p)} = {_cell(p, best.get(p))}" for p in param_columns(df))
        lines += [
            f"Trial {_escape(best['trial_id'])} ({_escape(best.get('status'))}): {params}; validation accuracy "
            f"{_cell('val_accuracy', best.get('val_accuracy'))}, test accuracy "
            f"{_cell('test_accuracy', best.get('test_accuracy'))}, peak memory "
            f"{_cell('peak_memory_mb', best.get('peak_memory_mb'))} MB ({_escape(best.get('memory_kind'))}).",
            "",
        ]

    def image(name: str, alt: str) -> list[str]:
        return [f"![{alt}]({name})", ""] if name in files else []

    budget_cols = [
        "budget_mb",
        "trials_within",
        "trial_id",
        *param_columns(df),
        "val_accuracy",
        "test_accuracy",
        "peak_memory_mb",
    ]
    lines += [
        "## Top trials",
        "",
        "Completed trials within the memory budget, by validation accuracy.",
        "",
        to_markdown(tables["top"], shown_columns(tables["top"], ["rank"])),
        "",
        "## Accuracy vs peak memory: the Pareto set",
        "",
        "Completed feasible trials that no other trial beats on both validation accuracy and peak memory.",
        "",
        to_markdown(tables["pareto"], shown_columns(tables["pareto"])),
        "",
        *image("accuracy_vs_memory.png", "validation accuracy against peak memory"),
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
