"""Plots of a search, each a matplotlib :class:`~matplotlib.figure.Figure` (no pyplot state; save or display it).

Each plot is computed first, as a small frozen data object, and then drawn: ``plot_x(df) == draw_x(x_data(df))``.
The data objects say what a plot shows (points per status, the front, the budget, axis scales) and can be checked
without drawing.

* :func:`plot_accuracy_vs_memory`: every trial (with its spread over the folds), the Pareto front, the memory budget,
  the full-bag reference run;
* :func:`plot_parameters`: accuracy against M, I, patch size and learning rate;
* :func:`plot_learning_curves`: validation accuracy and training loss per epoch of the top trials;
* :func:`plot_importance`: Optuna's parameter importances for accuracy and for peak memory;
* :func:`plot_roc`: the ROC curve of the chosen config on the test set (one curve per confirm seed).

The attention maps are in :mod:`ips_search.report.attention`.
"""

from ips_search.report.plots.accuracy_memory import (
    AccuracyMemoryPlot,
    ReferencePoint,
    StatusPoints,
    accuracy_vs_memory_data,
    draw_accuracy_vs_memory,
    plot_accuracy_vs_memory,
)
from ips_search.report.plots.curves import (
    Curve,
    LearningCurvesPlot,
    draw_learning_curves,
    learning_curves_data,
    plot_learning_curves,
)
from ips_search.report.plots.importance import (
    ImportancePanel,
    ImportancePlot,
    draw_importance,
    importance_data,
    plot_importance,
)
from ips_search.report.plots.parameters import (
    ParameterPanel,
    ParametersPlot,
    draw_parameters,
    parameters_data,
    plot_parameters,
)
from ips_search.report.plots.roc import RocCurve, RocPanel, RocPlot, draw_roc, plot_roc, roc_data
from ips_search.report.plots.style import OVER_BUDGET_STYLE, STATUS_STYLE, MarkerStyle, literal_text

__all__ = [
    "OVER_BUDGET_STYLE",
    "STATUS_STYLE",
    "AccuracyMemoryPlot",
    "Curve",
    "ImportancePanel",
    "ImportancePlot",
    "LearningCurvesPlot",
    "MarkerStyle",
    "ParameterPanel",
    "ParametersPlot",
    "ReferencePoint",
    "RocCurve",
    "RocPanel",
    "RocPlot",
    "StatusPoints",
    "accuracy_vs_memory_data",
    "draw_accuracy_vs_memory",
    "draw_importance",
    "draw_learning_curves",
    "draw_parameters",
    "draw_roc",
    "importance_data",
    "learning_curves_data",
    "literal_text",
    "parameters_data",
    "plot_accuracy_vs_memory",
    "plot_importance",
    "plot_learning_curves",
    "plot_parameters",
    "plot_roc",
    "roc_data",
]
