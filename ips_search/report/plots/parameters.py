"""Accuracy against each searched parameter (M, I, P, learning rate), coloured by peak memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from ips_search.experiment import MEMORY_METRIC, METRIC, Status
from ips_search.report.axes import AXES, AxisSpec, axis_spec, param_columns
from ips_search.report.plots.style import empty, figure, memory_label, metric_label, numeric, plain_log_ticks, wide
from ips_search.report.selection import SCORE, evaluation_of, with_scores

TITLE = "Validation accuracy by parameter"
FEW_VALUES = 8  # up to this many distinct values: each is a tick, and whole-number ones get a mean line
LOG_RATIO = 8.0  # a parameter whose values span this factor is drawn log-scaled


@dataclass(frozen=True)
class ParameterPanel:
    """One parameter's panel: completed trials filled, the rest hollow, both coloured by peak memory."""

    axis: AxisSpec
    x_completed: tuple[float, ...]
    y_completed: tuple[float, ...]
    memory_completed: tuple[float, ...]
    x_other: tuple[float, ...]
    y_other: tuple[float, ...]
    memory_other: tuple[float, ...]
    means: tuple[tuple[float, float], ...]  # (value, mean accuracy of completed trials) for few whole-number values
    log_x: bool
    ticks: tuple[float, ...]  # each distinct value, when few; () leaves the ticks to matplotlib


@dataclass(frozen=True)
class ParametersPlot:
    """What :func:`plot_parameters` draws; ``message`` (when set) says why it draws nothing."""

    title: str
    y_label: str = ""
    panels: tuple[ParameterPanel, ...] = ()
    memory_range: tuple[float, float] | None = None  # the colour scale; None: no trial reported memory
    memory_log: bool = False
    memory_values: tuple[float, ...] = ()
    memory_label: str = ""
    trials: int = 0
    message: str | None = None


def parameters_data(df: pd.DataFrame, y: str = METRIC, params: list[str] | None = None) -> ParametersPlot:
    """The panels of :func:`plot_parameters`, computed without drawing."""
    df = with_scores(df)
    params = params or [p for p in param_columns(df) if p in AXES] or param_columns(df)
    if df.empty or y not in df or not params:
        return ParametersPlot(TITLE, message="no trial has reported yet")
    data = df[np.isfinite(numeric(df[y]))]
    if data.empty:
        return ParametersPlot(TITLE, message="no trial has reported an accuracy yet")
    mem = numeric(data[MEMORY_METRIC]) if MEMORY_METRIC in data else np.full(len(data), np.nan)
    finite_mem = mem[np.isfinite(mem)]
    completed = (data["status"] == Status.COMPLETED).to_numpy() if "status" in data else np.ones(len(data), bool)
    ys = numeric(data[y])
    panels = tuple(_panel(axis_spec(name), numeric(data[name]), ys, mem, completed) for name in params)
    return ParametersPlot(
        title=TITLE,
        y_label=evaluation_of(df).score_label if y == SCORE else metric_label(y),
        panels=panels,
        memory_range=(float(finite_mem.min()), float(finite_mem.max())) if len(finite_mem) else None,
        memory_log=wide(finite_mem),
        memory_values=tuple(finite_mem),
        memory_label=memory_label(data),
        trials=len(data),
    )


def _panel(spec: AxisSpec, xs: np.ndarray, ys: np.ndarray, mem: np.ndarray, completed: np.ndarray) -> ParameterPanel:
    ok = np.isfinite(xs)
    done, rest = ok & completed, ok & ~completed
    values = np.unique(xs[done])
    means = ()
    if not spec.log and 1 < len(values) <= FEW_VALUES and np.all(values == np.round(values)):
        means = tuple((float(v), float(np.nanmean(ys[done & (xs == v)]))) for v in values)
    distinct = np.unique(xs[ok])
    return ParameterPanel(
        axis=spec,
        x_completed=tuple(xs[done]),
        y_completed=tuple(ys[done]),
        memory_completed=tuple(mem[done]),
        x_other=tuple(xs[rest]),
        y_other=tuple(ys[rest]),
        memory_other=tuple(mem[rest]),
        means=means,
        log_x=spec.log or (wide(xs, LOG_RATIO) and bool((xs[ok] > 0).all())),
        ticks=tuple(distinct) if not spec.log and 0 < len(distinct) <= FEW_VALUES else (),
    )


def draw_parameters(data: ParametersPlot) -> Figure:
    """The figure of ``data``: one panel per parameter, two panels a row, a shared memory colour bar."""
    n = max(len(data.panels), 1)
    fig = figure(4.0 * min(n, 2) + 1.2, 3.4 * math.ceil(n / 2))
    if data.message:
        return empty(fig, data.title, data.message)
    cols = 2 if len(data.panels) > 1 else 1
    axes = fig.subplots(math.ceil(len(data.panels) / cols), cols, squeeze=False).ravel()
    norm = None
    if data.memory_range is not None:
        lo, hi = data.memory_range
        norm = LogNorm(lo, hi) if data.memory_log else Normalize(lo, hi if hi > lo else lo + 1)
    mappable = None
    for ax, panel in zip(axes, data.panels, strict=False):
        mappable = _draw_panel(ax, panel, data.y_label, norm) or mappable
    for ax in axes[len(data.panels) :]:
        ax.set_axis_off()
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes[: len(data.panels)].tolist(), label=data.memory_label, shrink=0.8)
        if isinstance(norm, LogNorm):
            plain_log_ticks(bar.ax, axis="y", values=data.memory_values)
    fig.suptitle(f"{data.title} (filled: completed trials, hollow: others; {data.trials} trials)")
    return fig


def _draw_panel(ax, panel: ParameterPanel, y_label: str, norm):
    """Draw one panel; returns the scatter the colour bar follows (or ``None``)."""
    mappable = None
    if panel.x_completed:
        sc = ax.scatter(
            panel.x_completed,
            panel.y_completed,
            c=panel.memory_completed if norm else "tab:blue",
            cmap="viridis",
            norm=norm,
            s=34,
            edgecolors="k",
            linewidths=0.4,
            plotnonfinite=True,
            zorder=3,
        )
        mappable = sc if norm is not None else None
    if panel.x_other:
        edges = _cmap_colors(np.asarray(panel.memory_other, dtype=float), norm)
        ax.scatter(panel.x_other, panel.y_other, s=34, facecolors="none", edgecolors=edges, linewidths=1.1, zorder=3)
    if panel.means:
        values, means = zip(*panel.means, strict=True)
        ax.plot(values, means, color="tab:gray", linewidth=1.2, alpha=0.8, zorder=2, label="mean (completed)")
        ax.legend(fontsize=7, loc="best")
    spec = panel.axis
    if panel.log_x:
        ax.set_xscale("log")
        plain_log_ticks(ax, fmt=spec.fmt, values=(*panel.x_completed, *panel.x_other))
    if panel.ticks:
        ax.set_xticks(panel.ticks)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: spec.format(v)))
    elif spec.integer and not panel.log_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(spec.label)
    ax.set_ylabel(y_label)
    ax.set_title(spec.heading)
    ax.grid(True, alpha=0.3)
    return mappable


def _cmap_colors(values: np.ndarray, norm) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    if norm is None:
        return ["tab:gray"] * len(values)
    return [cmap(norm(v)) if np.isfinite(v) else "tab:gray" for v in values]


def plot_parameters(df: pd.DataFrame, y: str = METRIC, params: list[str] | None = None) -> Figure:
    """Accuracy against each searched parameter (M, I, patch size, learning rate), coloured by peak memory.

    Filled markers: full-budget (completed) trials; hollow: the rest. For parameters
    with few distinct whole-number values, the line is the mean accuracy of completed trials per value.
    """
    return draw_parameters(parameters_data(df, y, params))
