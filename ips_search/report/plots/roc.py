"""The ROC curve of the chosen config on the held-out test set, from ``test_predictions.csv``.

One panel per task. A binary task's curve is ``p1`` (the positive class) against the label; a multi-class task's is
one-vs-rest per class and their macro average (the per-class curves interpolated onto one false-positive grid and
averaged, as scikit-learn's examples do). Several sources (the chosen config's confirm runs, one per seed) give one
curve each: a binary task's curve, or a multi-class task's macro average; the per-class curves are drawn only for a
single source, where they stay readable. Curves and areas are :func:`sklearn.metrics.roc_curve` and
:func:`sklearn.metrics.auc`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from ips_search.report.plots.style import empty, figure, literal_text
from ips_search.report.sources import probability_columns

TITLE = "ROC curve of the chosen config on the test set"
PLURAL = {"class": "classes", "label": "labels"}  # what a multi-class / multi-label task's curves are of
MAX_PANELS = 4  # tasks drawn; a megapixel task list longer than this is cut, with a note


@dataclass(frozen=True)
class RocCurve:
    """One ROC curve; ``main``: the panel's headline curve (binary, or the macro average), else one class's."""

    label: str
    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    auc: float
    main: bool = True


@dataclass(frozen=True)
class RocPanel:
    """One task: its curves and what they were drawn from."""

    task: str
    classes: int
    slides: int  # test slides of the (first) source
    curves: tuple[RocCurve, ...]

    @property
    def main_aucs(self) -> tuple[float, ...]:
        return tuple(c.auc for c in self.curves if c.main)


@dataclass(frozen=True)
class RocPlot:
    """What :func:`plot_roc` draws; ``message`` (when set) says why it draws nothing; ``skipped``: tasks left out,
    each with its reason."""

    title: str
    source: str = ""  # what the curves come from, in words
    panels: tuple[RocPanel, ...] = ()
    skipped: tuple[str, ...] = ()
    message: str | None = None


def roc_data(predictions: Mapping[str, pd.DataFrame], source: str = "", title: str = TITLE) -> RocPlot:
    """The panels of :func:`plot_roc` from ``predictions`` (curve label -> ``test_predictions.csv``'s table)."""
    frames = {label: df for label, df in predictions.items() if df is not None and not df.empty}
    if not frames:
        return RocPlot(title, source, message="no test predictions to draw")
    tasks = list(dict.fromkeys(t for df in frames.values() for t in _tasks(df)))
    panels, skipped = [], []
    for task in tasks[:MAX_PANELS]:
        panel, why = _panel(task, frames)
        if panel is None:
            skipped.append(f"{task or 'the task'}: {why}")
        else:
            panels.append(panel)
    if len(tasks) > MAX_PANELS:
        skipped.append(f"{len(tasks) - MAX_PANELS} more task(s) not drawn")
    if not panels:
        return RocPlot(title, source, skipped=tuple(skipped), message="; ".join(skipped) or "nothing to draw")
    return RocPlot(title, source, tuple(panels), tuple(skipped))


def _tasks(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["task"].fillna("").astype(str))) if "task" in df else [""]


def _rows(df: pd.DataFrame, task: str) -> pd.DataFrame:
    return df[df["task"].fillna("").astype(str) == task] if "task" in df else df


def _panel(task: str, frames: Mapping[str, pd.DataFrame]) -> tuple[RocPanel | None, str]:
    """One task's panel, or ``None`` and why it can't be drawn."""
    several = len(frames) > 1
    curves: list[RocCurve] = []
    why, classes, slides = "", 0, 0
    for label, df in frames.items():
        rows = _rows(df, task)
        found, why = _curves(rows, label if several else "")
        if found:
            classes = classes or len(probability_columns(rows.dropna(axis=1, how="all")))
            slides = slides or len(rows)
            curves += [c for c in found if c.main or not several]
    if not curves:
        return None, why
    return RocPanel(task, classes, slides, tuple(curves)), ""


def _curves(rows: pd.DataFrame, source: str) -> tuple[list[RocCurve], str]:
    """The curves of one source on one task: binary, or one-vs-rest per class (multi-label: per label) and their
    macro average."""
    probs = rows[probability_columns(rows)].apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")
    keep = probs.notna().all(axis=1) & rows["label"].notna()
    probs, labels = probs[keep].to_numpy(dtype=float), rows.loc[keep, "label"].astype(str).str.strip()  # (n, C), (n,)
    if len(labels) == 0:
        return [], "no test slide with a label and class probabilities"
    truth, kind = _truth(labels, probs.shape[1])  # (n, C) booleans; binary, class or label
    if truth is None:
        return [], kind  # why, in words
    prefix = f"{source}: " if source else ""
    if kind == "binary":
        if truth[:, 1].all() or not truth[:, 1].any():
            return [], "the test set holds one class only, so no ROC curve exists"
        fpr, tpr, _ = roc_curve(truth[:, 1], probs[:, 1])
        return [_curve(f"{prefix}positive class p1", fpr, tpr)], ""
    per_class = []
    for c in range(probs.shape[1]):
        if truth[:, c].all() or not truth[:, c].any():  # one-vs-rest needs both sides
            continue
        fpr, tpr, _ = roc_curve(truth[:, c], probs[:, c])
        per_class.append(_curve(f"{prefix}{kind} {c}{' vs rest' if kind == 'class' else ''}", fpr, tpr, main=False))
    if len(per_class) == 1 and probs.shape[1] == 1:  # one label: its curve is the task's
        return [replace(per_class[0], main=True)], ""
    if len(per_class) < 2:
        return [], f"fewer than two {PLURAL[kind]} have test slides on both sides"
    grid = np.unique(np.concatenate([c.fpr for c in per_class]))
    mean_tpr = np.mean([np.interp(grid, c.fpr, c.tpr) for c in per_class], axis=0)
    macro = _curve(f"{prefix}macro average of {len(per_class)} {PLURAL[kind]}", grid, mean_tpr)
    return [macro, *per_class], ""


def _truth(labels: pd.Series, k: int) -> tuple[np.ndarray | None, str]:
    """The (n, C) truth of ``labels`` and the task's kind (``binary``, ``class``, ``label``), or ``None`` and why:
    a class index per slide, or (multi-label) a string of C zeros and ones."""
    # C zeros and ones can't be a class index: with C >= 2 such an index is out of range, and one class is no task
    if (labels.str.fullmatch(r"[01]+") & (labels.str.len() == k)).all():
        return np.array([[ch == "1" for ch in text] for text in labels]), "label"
    index = pd.to_numeric(labels, errors="coerce")
    if index.isna().any() or (index != index.round()).any():
        return None, f"labels that are neither class indices nor {k} zeros and ones"
    index = index.astype(int).to_numpy()
    if index.min() < 0 or index.max() >= k:
        return None, f"labels outside the {k} classes of p0 .. p{k - 1}"
    return np.eye(k, dtype=bool)[index], "binary" if k == 2 else "class"


def _curve(label: str, fpr: np.ndarray, tpr: np.ndarray, main: bool = True) -> RocCurve:
    area = float(auc(fpr, tpr))
    return RocCurve(f"{label} (AUC {area:.3f})", tuple(map(float, fpr)), tuple(map(float, tpr)), area, main)


def draw_roc(data: RocPlot) -> Figure:
    """The figure of ``data``: one square panel per task, the chance diagonal dashed."""
    n = len(data.panels)
    fig = figure(4.6 * max(n, 1) + 0.6, 4.8)
    if data.message:
        return empty(fig, data.title, data.message)
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, panel in zip(axes, data.panels, strict=True):
        for i, curve in enumerate(panel.curves):
            width, alpha = (1.8, 1.0) if curve.main else (0.9, 0.6)
            ax.plot(
                curve.fpr, curve.tpr, color=f"C{i % 10}", linewidth=width, alpha=alpha, label=literal_text(curve.label)
            )
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance (AUC 0.5)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        aucs = panel.main_aucs
        spread = f"AUC {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f} over {len(aucs)}" if len(aucs) > 1 else ""
        name = f"task {literal_text(panel.task)}" if panel.task else "test set"
        ax.set_title(f"{name}: {panel.slides} slides{', ' + spread if spread else ''}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7 if len(panel.curves) <= 6 else 5.5, loc="lower right")
    fig.suptitle(f"{data.title}\n{literal_text(data.source)}" if data.source else data.title, fontsize=10)
    return fig


def plot_roc(predictions: Mapping[str, pd.DataFrame], source: str = "", title: str = TITLE) -> Figure:
    """The ROC curve of each source in ``predictions`` (curve label -> ``test_predictions.csv``'s table)."""
    return draw_roc(roc_data(predictions, source, title))
