"""Plots of a search, each a matplotlib :class:`~matplotlib.figure.Figure` (no pyplot state; save or display it).

* :func:`plot_accuracy_vs_memory`: every trial, the Pareto front, the memory budget;
* :func:`plot_parameters`: accuracy against M, I, patch size and learning rate;
* :func:`plot_learning_curves`: validation accuracy and training loss per epoch of the top trials;
* :func:`plot_importance`: Optuna's parameter importances for accuracy and for peak memory.

The attention maps are in :mod:`ips_search.report.attention`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from ips_search.report.load import param_columns
from ips_search.report.tables import LABELS, pareto_front, ranked

STATUS_STYLE: dict[str, dict[str, Any]] = {
    "completed": {"marker": "o", "color": "tab:blue", "label": "completed"},
    "over-budget": {"marker": "o", "color": "tab:red", "label": "completed, over the budget", "hollow": True},
    "early-stopped": {"marker": "o", "color": "tab:gray", "label": "early-stopped (fewer epochs)", "hollow": True},
    "infeasible": {"marker": "X", "color": "tab:red", "label": "infeasible (over budget)"},
    "out-of-memory": {"marker": "X", "color": "darkred", "label": "out of memory"},
    "nan-loss": {"marker": "v", "color": "tab:orange", "label": "NaN loss"},
    "failed": {"marker": "s", "color": "black", "label": "failed", "hollow": True},
    "running": {"marker": "D", "color": "tab:green", "label": "running (partial)", "hollow": True},
    "pending": {"marker": "D", "color": "tab:olive", "label": "pending", "hollow": True},
}
AXIS = {
    "memory_size": "M, memory size (patches kept)",
    "iteration_size": "I, iteration size (patches per step)",
    "patch_size": "P, patch size (pixels)",
    "lr": "learning rate",
}


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _empty(fig: Figure, title: str, message: str) -> Figure:
    fig.set_size_inches(6.5, 2.5)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()
    return fig


def _numeric(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)


def _wide(values: np.ndarray, ratio: float = 5.0) -> bool:
    """Whether positive values span enough (max/min >= ratio) to deserve a log axis."""
    v = values[np.isfinite(values) & (values > 0)]
    return len(v) > 1 and v.max() / v.min() >= ratio


def _plain_log_ticks(ax, axis: str = "x", fmt: str = "{:g}", values: np.ndarray | None = None) -> None:
    """Readable ticks on a log axis: 1, 2, 5 per decade, written as plain numbers (or ``fmt``).

    With ``values`` spanning less than that gives two ticks for, three ticks spread over their range instead.
    """
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(FuncFormatter(lambda v, _: fmt.format(v)))
    target.set_minor_formatter(NullFormatter())
    target.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    v = values[np.isfinite(values) & (values > 0)] if values is not None else np.array([])
    if len(v):
        lo, hi = float(v.min()), float(v.max())
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        nice = [m * 10.0**d for d in decades for m in (1, 2, 5) if lo <= m * 10.0**d <= hi]
        if len(nice) < 2 and hi > lo:
            ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(lo, hi, 3)})
            target.set_major_locator(FixedLocator(ticks))
            return
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))


def _scatter_status(ax, df: pd.DataFrame, x: str, y: str, statuses=None, size: float = 36, **kw: Any) -> None:
    for status, style in STATUS_STYLE.items():
        if statuses is not None and status not in statuses:
            continue
        sub = df[df["status"] == status] if "status" in df else (df if status == "completed" else df.iloc[:0])
        if sub.empty:
            continue
        hollow = style.get("hollow", False)
        ax.scatter(
            _numeric(sub[x]),
            _numeric(sub[y]),
            marker=style["marker"],
            s=size,
            facecolors="none" if hollow else style["color"],
            edgecolors=style["color"],
            linewidths=1.2,
            label=f"{style['label']} ({len(sub)})",
            zorder=3,
            **kw,
        )


def _memory_label(df: pd.DataFrame) -> str:
    kinds = sorted({str(k) for k in df.get("memory_kind", pd.Series(dtype=str)).dropna()})
    kind = {"cuda": "GPU, CUDA peak allocated", "cpu-rss": "CPU, process RSS"}
    what = ", ".join(kind.get(k, k) for k in kinds)
    return f"peak memory (MB{', ' + what if what else ''})"


def literal_text(value: object) -> str:
    """``value`` as literal plot text: a ``$`` from a trial name must not start matplotlib mathtext."""
    return str(value).replace("$", r"\$")


def _short(row: pd.Series) -> str:
    parts = []
    for col, name in (("memory_size", "M"), ("iteration_size", "I"), ("patch_size", "P")):
        if col in row and pd.notna(row[col]):
            parts.append(f"{name}={int(row[col])}")
    if "lr" in row and pd.notna(row["lr"]):
        parts.append(f"lr={float(row['lr']):.1e}")
    return " ".join(parts)


def plot_accuracy_vs_memory(
    df: pd.DataFrame,
    max_memory_mb: float | None = None,
    y: str = "val_accuracy",
    annotate: bool = True,
    title: str | None = None,
) -> Figure:
    """Accuracy against peak memory of every trial, the Pareto front of full-budget trials, the budget line."""
    fig = _figure(7.5, 5)
    title = title or "Validation accuracy vs peak memory"
    if df.empty or "peak_memory_mb" not in df or y not in df:
        return _empty(fig, title, "no trial has reported yet")
    mem = _numeric(df["peak_memory_mb"])
    acc = _numeric(df[y])
    shown = df[np.isfinite(mem) & np.isfinite(acc)]
    if shown.empty:
        return _empty(fig, title, "no trial has reported memory and accuracy yet")
    ax = fig.add_subplot()
    if "feasible" in shown and "status" in shown:  # completed trials that went over the budget after the probe step
        over = (shown["status"] == "completed") & (shown["feasible"].astype(str).str.lower() == "false")
        shown = shown.assign(status=shown["status"].where(~over, "over-budget"))
    _scatter_status(ax, shown, "peak_memory_mb", y)
    front = pareto_front(df, y=y)
    if not front.empty:
        fx, fy = _numeric(front["peak_memory_mb"]), _numeric(front[y])
        right = np.nanmax(_numeric(shown["peak_memory_mb"])) * 1.05
        ax.step(
            np.append(fx, max(right, fx[-1])),
            np.append(fy, fy[-1]),
            where="post",
            color="tab:purple",
            linewidth=1.6,
            alpha=0.8,
            zorder=2,
            label=f"Pareto front ({len(front)} trial{'' if len(front) == 1 else 's'})",
        )
        ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="tab:purple", linewidths=1.6, zorder=4)
        if annotate:
            for (_, row), px, py in zip(front.head(8).iterrows(), fx, fy, strict=False):
                ax.annotate(
                    _short(row), (px, py), xytext=(6, 6), textcoords="offset points", fontsize=7.5, color="tab:purple"
                )
    if max_memory_mb:
        ax.axvline(
            max_memory_mb, color="tab:red", linestyle="--", linewidth=1.3, label=f"memory budget ({max_memory_mb:g} MB)"
        )
    memory = np.append(_numeric(shown["peak_memory_mb"]), max_memory_mb or np.nan)
    if _wide(memory):
        ax.set_xscale("log")
        _plain_log_ticks(ax, values=memory)
    ax.set_xlabel(_memory_label(shown))
    ax.set_ylabel("validation accuracy (last epoch)" if y == "val_accuracy" else y.replace("_", " "))
    ax.set_title(f"{title} ({len(shown)} of {len(df)} trials)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_parameters(df: pd.DataFrame, y: str = "val_accuracy", params: list[str] | None = None) -> Figure:
    """Accuracy against each searched parameter (M, I, patch size, learning rate), coloured by peak memory.

    Filled markers: full-budget (completed) trials; hollow: the rest. For parameters
    with few distinct values, the line is the mean accuracy of completed trials per value.
    """
    params = params or [p for p in param_columns(df) if p in AXIS] or param_columns(df)
    title = "Validation accuracy by parameter"
    fig = _figure(4.0 * min(max(len(params), 1), 2) + 1.2, 3.4 * math.ceil(max(len(params), 1) / 2))
    if df.empty or y not in df or not params:
        return _empty(fig, title, "no trial has reported yet")
    data = df[np.isfinite(_numeric(df[y]))]
    if data.empty:
        return _empty(fig, title, "no trial has reported an accuracy yet")
    cols = 2 if len(params) > 1 else 1
    axes = fig.subplots(math.ceil(len(params) / cols), cols, squeeze=False).ravel()
    mem = _numeric(data["peak_memory_mb"]) if "peak_memory_mb" in data else np.full(len(data), np.nan)
    finite_mem = mem[np.isfinite(mem)]
    norm = None
    if len(finite_mem):
        lo, hi = finite_mem.min(), finite_mem.max()
        norm = LogNorm(lo, hi) if _wide(finite_mem) else Normalize(lo, hi if hi > lo else lo + 1)
    completed = (data["status"] == "completed").to_numpy() if "status" in data else np.ones(len(data), bool)
    mappable = None
    for ax, name in zip(axes, params, strict=False):
        xs = _numeric(data[name])
        ys = _numeric(data[y])
        ok = np.isfinite(xs)
        done, rest = ok & completed, ok & ~completed
        if done.any():
            sc = ax.scatter(
                xs[done],
                ys[done],
                c=mem[done] if norm else "tab:blue",
                cmap="viridis",
                norm=norm,
                s=34,
                edgecolors="k",
                linewidths=0.4,
                plotnonfinite=True,
                zorder=3,
            )
            mappable = sc if norm is not None else mappable
        if rest.any():
            ax.scatter(
                xs[rest],
                ys[rest],
                s=34,
                facecolors="none",
                edgecolors=_cmap_colors(mem[rest], norm),
                linewidths=1.1,
                zorder=3,
            )
        values = np.unique(xs[ok & completed])
        if name != "lr" and 1 < len(values) <= 8 and np.all(values == np.round(values)):
            means = [np.nanmean(_numeric(data[y])[ok & completed & (xs == v)]) for v in values]
            ax.plot(values, means, color="tab:gray", linewidth=1.2, alpha=0.8, zorder=2, label="mean (completed)")
            ax.legend(fontsize=7, loc="best")
        if name == "lr" or (_wide(xs, 8.0) and (xs[ok] > 0).all()):
            ax.set_xscale("log")
            _plain_log_ticks(ax, fmt="{:.1e}" if name == "lr" else "{:g}", values=xs)
        if name != "lr" and len(np.unique(xs[ok])) <= 8 and len(xs[ok]):
            ax.set_xticks(np.unique(xs[ok]))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        elif name != "lr" and ax.get_xscale() == "linear":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(AXIS.get(name, name.replace("_", " ")))
        ax.set_ylabel("validation accuracy" if y == "val_accuracy" else y.replace("_", " "))
        ax.set_title(LABELS.get(name, name))
        ax.grid(True, alpha=0.3)
    for ax in axes[len(params) :]:
        ax.set_axis_off()
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes[: len(params)].tolist(), label=_memory_label(data), shrink=0.8)
        if isinstance(norm, LogNorm):
            _plain_log_ticks(bar.ax, axis="y", values=finite_mem)
    fig.suptitle(f"{title} (filled: completed trials, hollow: others; {len(data)} trials)")
    return fig


def _cmap_colors(values: np.ndarray, norm) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    if norm is None:
        return ["tab:gray"] * len(values)
    return [cmap(norm(v)) if np.isfinite(v) else "tab:gray" for v in values]


def plot_learning_curves(curves: pd.DataFrame, df: pd.DataFrame | None = None, top: int = 5) -> Figure:
    """Validation accuracy and training loss per epoch of the ``top`` trials (others faint in the background)."""
    fig = _figure(11, 4.2)
    title = "Learning curves"
    if curves is None or curves.empty:
        return _empty(fig, title, "no epoch has been reported yet")
    order = list(ranked(df)["trial_id"]) if df is not None and not df.empty else []
    order += [t for t in curves["trial_id"].unique() if t not in order]
    best = order[:top]
    rows = df.set_index("trial_id") if df is not None and not df.empty else pd.DataFrame()
    axes = fig.subplots(1, 2)
    panels = (("val_accuracy", "validation accuracy"), ("train_loss", "training loss"))
    colors = [f"C{i}" for i in range(10)]
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for trial_id, g in curves.groupby("trial_id", sort=False):
            if trial_id not in best:
                ax.plot(g["epoch"], g[metric], color="0.75", linewidth=0.8, zorder=1)
        for i, trial_id in enumerate(best):
            g = curves[curves["trial_id"] == trial_id]
            if g.empty:
                continue
            desc = _short(rows.loc[trial_id]) if trial_id in rows.index else ""
            ax.plot(
                g["epoch"],
                g[metric],
                marker="o",
                markersize=3.5,
                color=colors[i % 10],
                linewidth=1.6,
                label=f"#{i + 1} {literal_text(trial_id)}  {desc}",
                zorder=3,
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].set_title(f"Validation accuracy per epoch (top {len(best)} coloured, others grey)")
    axes[1].set_title("Training loss per epoch")
    axes[1].legend(fontsize=7.5, loc="best")
    return fig


def plot_importance(importances: pd.DataFrame | dict[str, float], title: str | None = None) -> Figure:
    """Horizontal bars of parameter importances.

    ``importances``: a dict ``{parameter: importance}``, or the DataFrame of
    :func:`ips_search.report.tables.param_importances` (columns ``parameter``, ``target``,
    ``importance``; one panel per target).
    """
    if isinstance(importances, dict):
        importances = pd.DataFrame(
            {"parameter": list(importances), "target": "val_accuracy", "importance": list(importances.values())}
        )
    title = title or "Parameter importance (Optuna, fANOVA)"
    targets = list(dict.fromkeys(importances["target"])) if not importances.empty else []
    fig = _figure(
        5.2 * max(1, len(targets)),
        0.5 * max(3, importances["parameter"].nunique()) + 1.6 if not importances.empty else 3,
    )
    if not targets:
        return _empty(fig, title, "no importances (too few finished trials)")
    axes = fig.subplots(1, len(targets), squeeze=False).ravel()
    names = {"val_accuracy": "validation accuracy", "peak_memory_mb": "peak memory"}
    for ax, target in zip(axes, targets, strict=True):
        sub = importances[importances["target"] == target].sort_values("importance")
        labels = [_param_label(p) for p in sub["parameter"]]
        bars = ax.barh(labels, sub["importance"], color="tab:blue" if target == "val_accuracy" else "tab:orange")
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
        ax.set_xlim(0, max(1.0, float(sub["importance"].max()) * 1.15))
        ax.set_xlabel("importance (share of variance)")
        ax.set_title(f"for {names.get(target, target)}")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title)
    if any(str(p).endswith("_quantile") for p in importances["parameter"]):
        fig.supxlabel("M and I are sampled as quantiles of their feasible range at each patch size", fontsize=8)
    return fig


def _param_label(name: str) -> str:
    base = name.removesuffix("_quantile")
    short = {"memory_size": "M", "iteration_size": "I", "patch_size": "P", "lr": "learning rate"}.get(base, base)
    return f"{short} (as quantile)" if name.endswith("_quantile") else short
