"""Accuracy against peak memory: every trial by status, the Pareto front of full-budget trials, the budget line.

The y axis is the score configs were ranked by: the chosen metric's mean over the patient-level folds, each point
with an error bar of plus and minus its standard deviation over the folds (when there are several), or, for an
experiment from before cross-validation, the last epoch's validation accuracy. The full-bag reference run (M = N, no
patch selection) is a star of its own with its error bar: what IPS's memory saving costs.

Where the trials report the part of the predicted peak that M moves (``predicted_gradient_mb``: the gradient pass
over the B x M kept patches, above the weights and optimiser state; :func:`ips_search.prediction.estimate_phases`),
a second panel beside the total plots the score against it. The total is often set by the no-grad selection pass
over all N patches, which M does not move, so trials with different M share one total and differ only there.

The front's points are labelled with their config. Front points often sit close together (configs that differ only
in M or the learning rate cost the same memory), so each label is placed where it overlaps no other label and no
front marker, trying a ring of offsets around its point; a label set away from its point gets a leader line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

from ips_search.experiment import MEMORY_METRIC, Status, as_bool, pareto_front
from ips_search.report.axes import describe
from ips_search.report.plots.style import (
    STATUS_STYLE,
    MarkerStyle,
    as_status,
    empty,
    figure,
    memory_label,
    numeric,
    plain_log_ticks,
    style_of,
    wide,
)
from ips_search.report.selection import SCORE, SCORE_STD, evaluation_of, with_scores
from ips_search.report.sources import REFERENCE_LABEL

TITLE = "Validation accuracy vs peak memory"
GRADIENT_MEMORY = "predicted_gradient_mb"  # the gradient pass's part of the predicted peak: what M moves
PART_TITLE = "... vs the part of it that M moves"
PART_LABEL = "gradient pass over the kept patches (MB, predicted CUDA, above the model state)"
REFERENCE_STYLE = MarkerStyle("*", "black", REFERENCE_LABEL)
FRONT_MEANING = "Pareto front: no other trial is as accurate with less memory (up and left is better)"
ANNOTATED = 8  # front points labelled with their M, I, P, lr
FRONT_COLOR = "tab:purple"
# where a front label may go, in points from its point, nearest first: right-up, right-down, left-up, left-down, then
# further out; (dx, dy, horizontal alignment)
LABEL_OFFSETS = tuple(
    (dx, dy, "left" if dx > 0 else "right") for dy in (6, -14, 18, -26, 30, -38, 42, -50, 54, -62) for dx in (6, -6)
)
LEADER_FROM = 20  # points: a label further than this from its point gets a line to it


@dataclass(frozen=True)
class StatusPoints:
    """The trials of one status (completed trials over the budget apart), as drawn."""

    status: Status
    over_budget: bool
    trial_ids: tuple[str, ...]
    memory_mb: tuple[float, ...]
    accuracy: tuple[float, ...]
    spread: tuple[float, ...] = ()  # each point's standard deviation over the folds (nan: unknown); () none drawn

    @property
    def style(self) -> MarkerStyle:
        return style_of(self.status, self.over_budget)

    @property
    def label(self) -> str:
        return f"{self.style.label} ({len(self.trial_ids)})"


@dataclass(frozen=True)
class ReferencePoint:
    """The full-bag reference run (M = N), as drawn: its memory, score and spread over the folds (nan: none)."""

    trial_id: str
    memory_mb: float
    accuracy: float
    spread: float = float("nan")
    n_patches: float = float("nan")  # N, when the run reported it
    label: str = REFERENCE_LABEL


@dataclass(frozen=True)
class AccuracyMemoryPlot:
    """What :func:`plot_accuracy_vs_memory` draws; ``message`` (when set) says why it draws nothing."""

    title: str
    x_label: str = ""  # says "log scale" when log_x
    y_label: str = ""
    points: tuple[StatusPoints, ...] = ()
    front_ids: tuple[str, ...] = ()  # the Pareto front, by increasing memory
    front_memory_mb: tuple[float, ...] = ()
    front_accuracy: tuple[float, ...] = ()
    front_notes: tuple[str, ...] = ()  # "M=4 I=2 P=32 lr=1.0e-03" of the first ANNOTATED front points
    front_until: float | None = None  # the front's step runs on to here (right of every point)
    budget_mb: float | None = None
    log_x: bool = False
    x_values: tuple[float, ...] = ()  # every memory value on the axis, budget included: where ticks go
    shown: int = 0
    trials: int = 0
    reference: ReferencePoint | None = None
    message: str | None = None
    # the second panel: each status's trials at their GRADIENT_MEMORY (no error bars); () when no trial reports it
    parts: tuple[StatusPoints, ...] = ()
    part_label: str = ""
    part_log_x: bool = False


def _status_points(
    shown: pd.DataFrame, statuses: pd.Series, over: pd.Series, x: str, y: str, spread: bool
) -> tuple[StatusPoints, ...]:
    """The rows of ``shown`` grouped as drawn (each status; completed trials over the budget apart) at column ``x``."""
    points = []
    for status in STATUS_STYLE:
        for over_budget in (False, True) if status == Status.COMPLETED else (False,):
            sub = shown[(statuses == status) & (over == over_budget)]
            if not sub.empty:
                points.append(
                    StatusPoints(
                        status,
                        over_budget,
                        tuple(sub["trial_id"].astype(str)) if "trial_id" in sub else ("",) * len(sub),
                        tuple(numeric(sub[x])),
                        tuple(numeric(sub[y])),
                        tuple(numeric(sub[SCORE_STD])) if spread else (),
                    )
                )
    return tuple(points)


def accuracy_vs_memory_data(
    df: pd.DataFrame,
    max_memory_mb: float | None = None,
    y: str | None = None,
    title: str | None = None,
    reference: pd.DataFrame | None = None,
) -> AccuracyMemoryPlot:
    """The points, front, budget line and reference run of :func:`plot_accuracy_vs_memory`, computed without drawing.

    ``y``: the column on the y axis (default: the score configs were ranked by, ``val_score_mean``, which is the
    validation accuracy for an experiment from before cross-validation); ``reference``: the full-bag reference run's
    trials (``Experiment.reference``).
    """
    df = with_scores(df)
    y = y or SCORE
    evaluation = evaluation_of(df)
    ranked_by_score = y == SCORE
    if title is None:
        title = (
            TITLE if evaluation.legacy or not ranked_by_score else f"Validation {evaluation.metric_name} vs peak memory"
        )
    if df.empty or MEMORY_METRIC not in df or y not in df:
        return AccuracyMemoryPlot(title, message="no trial has reported yet", trials=len(df))
    shown = df[np.isfinite(numeric(df[MEMORY_METRIC])) & np.isfinite(numeric(df[y]))]
    if shown.empty:
        return AccuracyMemoryPlot(title, message="no trial has reported memory and accuracy yet", trials=len(df))
    statuses = shown["status"].map(as_status) if "status" in shown else pd.Series(Status.COMPLETED, shown.index)
    over = (statuses == Status.COMPLETED) & _infeasible(shown)
    spread = ranked_by_score and evaluation.cross_validated and SCORE_STD in shown
    points = _status_points(shown, statuses, over, MEMORY_METRIC, y, spread)
    parts: tuple[StatusPoints, ...] = ()
    if GRADIENT_MEMORY in shown:
        has_part = np.isfinite(numeric(shown[GRADIENT_MEMORY]))
        if has_part.any():
            parts = _status_points(shown[has_part], statuses[has_part], over[has_part], GRADIENT_MEMORY, y, False)
    front = pareto_front(df, y=y)
    ref = reference_point(reference, y, spread)
    memory = np.append(numeric(shown[MEMORY_METRIC]), [max_memory_mb or np.nan, ref.memory_mb if ref else np.nan])
    front_memory = tuple(numeric(front[MEMORY_METRIC]))
    log_x = wide(memory)
    return AccuracyMemoryPlot(
        title=title,
        x_label=memory_label(shown) + (", log scale" if log_x else ""),
        y_label=evaluation.score_label if ranked_by_score else y.replace("_", " "),
        points=points,
        front_ids=tuple(front["trial_id"].astype(str)) if "trial_id" in front else (),
        front_memory_mb=front_memory,
        front_accuracy=tuple(numeric(front[y])),
        front_notes=tuple(describe(row) for _, row in front.head(ANNOTATED).iterrows()),
        front_until=max(float(np.nanmax(numeric(shown[MEMORY_METRIC]))) * 1.05, front_memory[-1])
        if front_memory
        else None,
        budget_mb=float(max_memory_mb) if max_memory_mb else None,
        log_x=log_x,
        x_values=tuple(float(v) for v in memory if np.isfinite(v)),
        shown=len(shown),
        trials=len(df),
        reference=ref,
        parts=parts,
        part_label=PART_LABEL if parts else "",
        part_log_x=wide(np.concatenate([g.memory_mb for g in parts])) if parts else False,
    )


def reference_point(reference: pd.DataFrame | None, y: str = SCORE, spread: bool = True) -> ReferencePoint | None:
    """The reference run's point: its row with a memory and a ``y`` (a completed one first), or ``None``."""
    if reference is None or reference.empty or MEMORY_METRIC not in reference:
        return None
    ref = with_scores(reference)
    if y not in ref:
        return None
    ref = ref[np.isfinite(numeric(ref[MEMORY_METRIC])) & np.isfinite(numeric(ref[y]))]
    if ref.empty:
        return None
    done = ref[ref["status"].astype(str) == Status.COMPLETED] if "status" in ref else ref
    row = (done if not done.empty else ref).iloc[0]
    std = row.get(SCORE_STD) if spread and y == SCORE else None
    return ReferencePoint(
        trial_id=str(row.get("trial_id", "")),
        memory_mb=float(row[MEMORY_METRIC]),
        accuracy=float(row[y]),
        spread=_number(std),
        n_patches=_number(row.get("n_patches")),
    )


def _number(value: object) -> float:
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return float(number) if pd.notna(number) else float("nan")


def _infeasible(df: pd.DataFrame) -> pd.Series:
    if "feasible" not in df:
        return pd.Series(False, index=df.index)
    return df["feasible"].map(lambda v: as_bool(v) is False).astype(bool)


def draw_accuracy_vs_memory(data: AccuracyMemoryPlot, annotate: bool = True) -> Figure:
    """The figure of ``data``."""
    fig = figure(12.5 if data.parts else 7.5, 5)
    if data.message:
        return empty(fig, data.title, data.message)
    ax = fig.add_subplot(1, 2, 1) if data.parts else fig.add_subplot()
    for group in data.points:
        style = group.style
        if group.spread:  # +- one standard deviation over the folds, behind the markers
            ax.errorbar(
                group.memory_mb,
                group.accuracy,
                yerr=np.nan_to_num(np.asarray(group.spread, dtype=float)),
                fmt="none",
                ecolor=style.color,
                elinewidth=0.9,
                capsize=2.5,
                alpha=0.6,
                zorder=2.5,
            )
        ax.scatter(
            group.memory_mb,
            group.accuracy,
            marker=style.marker,
            s=36,
            facecolors="none" if style.hollow else style.color,
            edgecolors=style.color,
            linewidths=1.2,
            label=group.label,
            zorder=3,
        )
    if data.front_memory_mb:
        n = len(data.front_memory_mb)
        ax.step(
            [*data.front_memory_mb, data.front_until],
            [*data.front_accuracy, data.front_accuracy[-1]],
            where="post",
            color=FRONT_COLOR,
            linewidth=1.6,
            alpha=0.8,
            zorder=2,
            label=f"Pareto front ({n} trial{'' if n == 1 else 's'})",
        )
        ax.scatter(
            data.front_memory_mb,
            data.front_accuracy,
            s=110,
            facecolors="none",
            edgecolors=FRONT_COLOR,
            linewidths=1.6,
            zorder=4,
        )
    if data.reference is not None:
        ref = data.reference
        ax.errorbar(
            [ref.memory_mb],
            [ref.accuracy],
            yerr=None if np.isnan(ref.spread) else [ref.spread],
            fmt=REFERENCE_STYLE.marker,
            markersize=13,
            color=REFERENCE_STYLE.color,
            markerfacecolor="gold",
            ecolor=REFERENCE_STYLE.color,
            elinewidth=1.2,
            capsize=3.5,
            label=ref.label,
            zorder=5,
        )
    if data.budget_mb:
        ax.axvline(
            data.budget_mb,
            color="tab:red",
            linestyle="--",
            linewidth=1.3,
            label=f"memory budget ({data.budget_mb:g} MB)",
        )
    if data.log_x:
        ax.set_xscale("log")
        plain_log_ticks(ax, values=data.x_values)
    ax.set_xlabel(data.x_label)
    ax.set_ylabel(data.y_label)
    title = f"{data.title} ({data.shown} of {data.trials} trials)"
    ax.set_title(f"{title}\n{FRONT_MEANING}" if data.front_memory_mb else title, fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    if data.parts:
        draw_memory_part(fig.add_subplot(1, 2, 2, sharey=ax), data)
    if annotate and data.front_notes:
        n = len(data.front_notes)
        label_front(ax, data.front_notes, data.front_memory_mb[:n], data.front_accuracy[:n])
    return fig


def draw_memory_part(ax, data: AccuracyMemoryPlot) -> None:
    """The second panel: each trial's score against the part of its predicted peak that M moves."""
    for group in data.parts:
        style = group.style
        ax.scatter(
            group.memory_mb,
            group.accuracy,
            marker=style.marker,
            s=36,
            facecolors="none" if style.hollow else style.color,
            edgecolors=style.color,
            linewidths=1.2,
            label=group.label,
            zorder=3,
        )
    if data.part_log_x:
        ax.set_xscale("log")
        plain_log_ticks(ax, values=tuple(v for g in data.parts for v in g.memory_mb))
    ax.set_xlabel(data.part_label + (", log scale" if data.part_log_x else ""))
    ax.set_title(PART_TITLE, fontsize=10)
    ax.tick_params(labelleft=False)
    ax.grid(True, alpha=0.3, which="both")


def label_front(ax, notes: tuple[str, ...], xs: tuple[float, ...], ys: tuple[float, ...]) -> list[Annotation]:
    """Label each front point with its note where the label overlaps no other label, no front marker and no legend
    and stays in the axes (the first free offset of :data:`LABEL_OFFSETS`; when none is free, the one overlapping
    least)."""
    fig = ax.figure
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)  # a renderer to measure text with; savefig works as before
    fig.draw_without_rendering()  # settles the constrained layout, so display positions hold from here on
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    ring = 9 * fig.dpi / 72  # the front markers' circles (s=110 points^2), in pixels
    taken = [
        Bbox.from_extents(x - ring, y - ring, x + ring, y + ring)
        for x, y in ax.transData.transform(np.column_stack([xs, ys]))
    ]
    legend = ax.get_legend()
    if legend is not None:  # pinned where "best" put it, so the labels placed around it cannot move it
        box = legend.get_window_extent(renderer)
        legend.set_loc(tuple(ax.transAxes.inverted().transform((box.x0, box.y0))))
        taken.append(box)
    placed = []
    for note, px, py in zip(notes, xs, ys, strict=True):
        best, best_cost = None, np.inf
        for dx, dy, ha in LABEL_OFFSETS:
            label = _front_label(ax, note, (px, py), dx, dy, ha)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)  # the text alone, not its leader line
            outside = box.width * box.height - _overlap(box, frame)
            cost = outside + sum(_overlap(box, other) for other in taken)
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (label, box), cost
            else:
                label.remove()
            if cost == 0:
                break
        taken.append(best[1])
        placed.append(best[0])
    return placed


def _front_label(ax, note: str, xy: tuple[float, float], dx: float, dy: float, ha: str) -> Annotation:
    leader = None
    if np.hypot(dx, dy) > LEADER_FROM:
        leader = {"arrowstyle": "-", "color": FRONT_COLOR, "lw": 0.6, "alpha": 0.6, "shrinkA": 1, "shrinkB": 6}
    label = ax.annotate(
        note,
        xy,
        xytext=(dx, dy),
        textcoords="offset points",
        ha=ha,
        fontsize=7.5,
        color=FRONT_COLOR,
        arrowprops=leader,
    )
    label.set_in_layout(False)  # placed after the layout settled: it must not move the axes
    return label


def _overlap(a: Bbox, b: Bbox) -> float:
    """The area two display boxes share (0 when they are apart)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def plot_accuracy_vs_memory(
    df: pd.DataFrame,
    max_memory_mb: float | None = None,
    y: str | None = None,
    annotate: bool = True,
    title: str | None = None,
    reference: pd.DataFrame | None = None,
) -> Figure:
    """The score against peak memory of every trial (with its spread over the folds), the Pareto front of
    full-budget trials, the budget line, and the full-bag reference run (``reference``, M = N) when given."""
    return draw_accuracy_vs_memory(
        accuracy_vs_memory_data(df, max_memory_mb, y, title, reference=reference), annotate=annotate
    )
