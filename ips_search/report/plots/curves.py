"""Learning curves: validation accuracy and training loss per epoch, the top trials coloured, the rest grey."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ips_search.experiment import rank
from ips_search.report.axes import describe
from ips_search.report.plots.style import empty, figure, literal_text

TITLE = "Learning curves"
PANELS = (("val_accuracy", "validation accuracy"), ("train_loss", "training loss"))


@dataclass(frozen=True)
class Curve:
    """One trial's curve; ``rank`` is its place among the top trials (0: a background curve)."""

    trial_id: str
    rank: int
    label: str
    epoch: tuple[float, ...]
    val_accuracy: tuple[float, ...]
    train_loss: tuple[float, ...]


@dataclass(frozen=True)
class LearningCurvesPlot:
    """What :func:`plot_learning_curves` draws; ``message`` (when set) says why it draws nothing."""

    title: str
    top: tuple[Curve, ...] = ()  # best first
    background: tuple[Curve, ...] = ()
    message: str | None = None


def learning_curves_data(curves: pd.DataFrame, df: pd.DataFrame | None = None, top: int = 5) -> LearningCurvesPlot:
    """The curves of :func:`plot_learning_curves`: the ``top`` trials by the ranking rule, then the rest."""
    if curves is None or curves.empty:
        return LearningCurvesPlot(TITLE, message="no epoch has been reported yet")
    order = list(rank(df, provisional=True)["trial_id"]) if df is not None and not df.empty else []
    order += [t for t in curves["trial_id"].unique() if t not in order]
    best = order[:top]
    rows = df.set_index("trial_id") if df is not None and not df.empty else pd.DataFrame()
    leaders = []
    for i, trial_id in enumerate(best):
        g = curves[curves["trial_id"] == trial_id]
        if not g.empty:
            desc = describe(rows.loc[trial_id]) if trial_id in rows.index else ""
            leaders.append(_curve(trial_id, i + 1, f"#{i + 1} {literal_text(trial_id)}  {desc}", g))
    rest = tuple(_curve(t, 0, "", g) for t, g in curves.groupby("trial_id", sort=False) if t not in best)
    return LearningCurvesPlot(TITLE, top=tuple(leaders), background=rest)


def _curve(trial_id: str, rank_: int, label: str, g: pd.DataFrame) -> Curve:
    values = {c: tuple(pd.to_numeric(g[c], errors="coerce")) if c in g else () for c, _ in PANELS}
    return Curve(str(trial_id), rank_, label, tuple(pd.to_numeric(g["epoch"], errors="coerce")), **values)


def draw_learning_curves(data: LearningCurvesPlot) -> Figure:
    """The figure of ``data``: accuracy on the left, training loss on the right."""
    fig = figure(11, 4.2)
    if data.message:
        return empty(fig, data.title, data.message)
    axes = fig.subplots(1, 2)
    for ax, (metric, label) in zip(axes, PANELS, strict=True):
        for curve in data.background:
            ax.plot(curve.epoch, getattr(curve, metric), color="0.75", linewidth=0.8, zorder=1)
        for curve in data.top:
            ax.plot(
                curve.epoch,
                getattr(curve, metric),
                marker="o",
                markersize=3.5,
                color=f"C{(curve.rank - 1) % 10}",
                linewidth=1.6,
                label=curve.label,
                zorder=3,
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    top = max((c.rank for c in data.top), default=0)
    axes[0].set_title(f"Validation accuracy per epoch (top {top} coloured, others grey)")
    axes[1].set_title("Training loss per epoch")
    axes[1].legend(fontsize=7.5, loc="best")
    return fig


def plot_learning_curves(curves: pd.DataFrame, df: pd.DataFrame | None = None, top: int = 5) -> Figure:
    """Validation accuracy and training loss per epoch of the ``top`` trials (others faint in the background)."""
    return draw_learning_curves(learning_curves_data(curves, df, top))
