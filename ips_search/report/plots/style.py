"""What the plots share: a marker style per trial status, figures without pyplot, readable log axes, plain text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

from ips_search.experiment import MemoryKind, Status


@dataclass(frozen=True)
class MarkerStyle:
    """How the trials of one status are drawn."""

    marker: str
    color: str
    label: str
    hollow: bool = False


STATUS_STYLE: dict[Status, MarkerStyle] = {
    Status.COMPLETED: MarkerStyle("o", "tab:blue", "completed"),
    Status.EARLY_STOPPED: MarkerStyle("o", "tab:gray", "early-stopped (fewer epochs)", hollow=True),
    Status.INFEASIBLE: MarkerStyle("X", "tab:red", "infeasible (over budget)"),
    Status.OUT_OF_MEMORY: MarkerStyle("X", "darkred", "out of memory"),
    Status.NAN_LOSS: MarkerStyle("v", "tab:orange", "NaN loss"),
    Status.FAILED: MarkerStyle("s", "black", "failed", hollow=True),
    Status.RUNNING: MarkerStyle("D", "tab:green", "running (partial)", hollow=True),
    Status.PENDING: MarkerStyle("D", "tab:olive", "pending", hollow=True),
}
# completed trials found over the budget after the probe step (feasible is False)
OVER_BUDGET_STYLE = MarkerStyle("o", "tab:red", "completed, over the budget", hollow=True)
MEMORY_KINDS = {
    MemoryKind.CUDA: "GPU, CUDA peak allocated",
    MemoryKind.PREDICTED_CUDA: "predicted CUDA peak of a training step",
    MemoryKind.CPU_RSS: "CPU, process RSS",
}
LOG_RATIO = 5.0  # a memory axis whose values span this factor is drawn log-scaled


def style_of(status: Status, over_budget: bool = False) -> MarkerStyle:
    return OVER_BUDGET_STYLE if over_budget else STATUS_STYLE[status]


def as_status(value: object) -> Status | None:
    """The :class:`Status` a table cell names, or ``None`` for anything else."""
    try:
        return Status(str(value))
    except ValueError:
        return None


def figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def empty(fig: Figure, title: str, message: str) -> Figure:
    """``fig`` as a small panel that says why there is nothing to draw."""
    fig.set_size_inches(6.5, 2.5)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()
    return fig


def numeric(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)


def wide(values: np.ndarray | tuple[float, ...], ratio: float = LOG_RATIO) -> bool:
    """Whether positive values span enough (max/min >= ratio) to deserve a log axis."""
    values = np.asarray(values, dtype=float)
    v = values[np.isfinite(values) & (values > 0)]
    return len(v) > 1 and v.max() / v.min() >= ratio


def plain_log_ticks(ax, axis: str = "x", fmt: str = "{:g}", values: np.ndarray | tuple[float, ...] = ()) -> None:
    """Readable ticks on a log axis: 1, 2, 5 per decade, written as plain numbers (or ``fmt``), not as powers of ten.

    With ``values`` spanning less than that gives two ticks for, three ticks spread over their range instead.
    """
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(FuncFormatter(lambda v, _: fmt.format(v)))
    target.set_minor_formatter(NullFormatter())
    target.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    values = np.asarray(values, dtype=float)
    v = values[np.isfinite(values) & (values > 0)]
    if len(v):
        lo, hi = float(v.min()), float(v.max())
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        nice = [m * 10.0**d for d in decades for m in (1, 2, 5) if lo <= m * 10.0**d <= hi]
        if len(nice) < 2 and hi > lo:
            ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(lo, hi, 3)})
            target.set_major_locator(FixedLocator(ticks))
            return
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))


def memory_label(df: pd.DataFrame) -> str:
    """The memory axis label, saying what was measured (``memory_kind``)."""
    kinds = sorted({str(k) for k in df.get("memory_kind", pd.Series(dtype=str)).dropna()})
    what = ", ".join(MEMORY_KINDS.get(k, k) for k in kinds)
    return f"peak memory (MB{', ' + what if what else ''})"


def metric_label(column: str) -> str:
    return "validation accuracy" if column == "val_accuracy" else column.replace("_", " ")


def literal_text(value: object) -> str:
    """``value`` as literal plot text: a ``$`` from a trial name must not start matplotlib mathtext."""
    return str(value).replace("$", r"\$")
