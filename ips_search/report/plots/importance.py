"""Parameter importances as horizontal bars, one panel per target (validation accuracy, peak memory)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from matplotlib.figure import Figure

from ips_search.experiment import MEMORY_METRIC, METRIC
from ips_search.report.axes import QUANTILE_SUFFIX, param_label
from ips_search.report.plots.style import empty, figure

TITLE = "Parameter importance (Optuna, fANOVA)"
# the study's objective is the validation score (a study from before cross-validation named it val_accuracy)
TARGETS = {
    METRIC: ("validation score", "tab:blue"),
    "val_accuracy": ("validation accuracy", "tab:blue"),
    MEMORY_METRIC: ("peak memory", "tab:orange"),
}
QUANTILE_NOTE = "M and I are sampled as quantiles of their feasible range at each patch size"


@dataclass(frozen=True)
class ImportancePanel:
    """The bars of one target, least important first (drawn bottom up)."""

    target: str
    title: str
    labels: tuple[str, ...]
    importances: tuple[float, ...]
    color: str


@dataclass(frozen=True)
class ImportancePlot:
    """What :func:`plot_importance` draws; ``message`` (when set) says why it draws nothing."""

    title: str
    panels: tuple[ImportancePanel, ...] = ()
    parameters: int = 0
    footnote: str | None = None
    message: str | None = None


def importance_data(importances: pd.DataFrame | dict[str, float], title: str | None = None) -> ImportancePlot:
    """The panels of :func:`plot_importance`. ``importances``: ``{parameter: importance}`` or the table of
    :func:`ips_search.report.importance.param_importances` (``parameter, target, importance``)."""
    if isinstance(importances, dict):
        importances = pd.DataFrame(
            {"parameter": list(importances), "target": METRIC, "importance": list(importances.values())}
        )
    title = title or TITLE
    if importances.empty:
        return ImportancePlot(title, message="no importances (too few finished trials)")
    panels = []
    for target in dict.fromkeys(importances["target"]):
        sub = importances[importances["target"] == target].sort_values("importance")
        name, color = TARGETS.get(target, (target, "tab:orange"))
        panels.append(
            ImportancePanel(
                target=target,
                title=f"for {name}",
                labels=tuple(param_label(str(p)) for p in sub["parameter"]),
                importances=tuple(float(v) for v in sub["importance"]),
                color=color,
            )
        )
    quantiles = any(str(p).endswith(QUANTILE_SUFFIX) for p in importances["parameter"])
    return ImportancePlot(
        title,
        panels=tuple(panels),
        parameters=int(importances["parameter"].nunique()),
        footnote=QUANTILE_NOTE if quantiles else None,
    )


def draw_importance(data: ImportancePlot) -> Figure:
    """The figure of ``data``."""
    fig = figure(5.2 * max(1, len(data.panels)), 0.5 * max(3, data.parameters) + 1.6 if data.panels else 3)
    if data.message:
        return empty(fig, data.title, data.message)
    axes = fig.subplots(1, len(data.panels), squeeze=False).ravel()
    for ax, panel in zip(axes, data.panels, strict=True):
        bars = ax.barh(list(panel.labels), list(panel.importances), color=panel.color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
        ax.set_xlim(0, max(1.0, max(panel.importances) * 1.15))
        ax.set_xlabel("importance (share of variance)")
        ax.set_title(panel.title)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(data.title)
    if data.footnote:
        fig.supxlabel(data.footnote, fontsize=8)
    return fig


def plot_importance(importances: pd.DataFrame | dict[str, float], title: str | None = None) -> Figure:
    """Horizontal bars of parameter importances (one panel per target)."""
    return draw_importance(importance_data(importances, title))
