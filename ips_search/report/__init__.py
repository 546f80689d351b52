"""The report of a search: tables, plots, attention maps and an executed notebook, from the files on disk.

Command line: ``python -m ips_search.report results/<name>`` (or ``--latest``) writes
``results/<name>/report/``. In a notebook of one's own::

    from ips_search.report import load_results, pareto_front, plot_accuracy_vs_memory

    df = load_results("results/my-search")
    pareto_front(df)                      # completed, feasible trials no other beats on accuracy and memory
    plot_accuracy_vs_memory(df)           # a matplotlib Figure

Each plot is computed before it is drawn: ``accuracy_vs_memory_data(df)`` and its siblings return small frozen
data objects (points per status, the front, the budget, axis scales) that ``plot_*`` then draws.

Cross-validated selection (:mod:`.selection`): ``fold_table(df)`` holds the top trials' per-fold scores,
``load_experiment(path).confirm`` the confirm stage's test figures with their bootstrap interval, ``.reference`` the
full-bag run (M = N); ``chosen_predictions(exp)`` and ``plot_roc`` draw the chosen config's ROC curve on the test set.

Nothing here imports Ray or unpickles anything from the experiment folder.
Plotting and attention names are imported on first use, so ``ips_search.report.tables``
stays a light import (pandas only).
"""

from __future__ import annotations

import importlib
from typing import Any

from ips_search.report.discover import latest_experiment
from ips_search.report.importance import param_importances
from ips_search.report.load import Experiment, load_curves, load_experiment, load_results
from ips_search.report.markdown import best_config_markdown, confirm_markdown, folds_markdown, reference_markdown
from ips_search.report.predictions import ChosenPredictions, chosen_predictions
from ips_search.report.selection import Evaluation, evaluation_of, fold_table
from ips_search.report.sources import load_study
from ips_search.report.tables import (
    best_trial,
    budget_table,
    build_tables,
    parameter_effects,
    pareto_front,
    status_counts,
    top_trials,
)
from ips_search.report.write import PLOT_FILES, write_report

_LAZY = {
    "accuracy_vs_memory_data": "ips_search.report.plots",
    "parameters_data": "ips_search.report.plots",
    "learning_curves_data": "ips_search.report.plots",
    "importance_data": "ips_search.report.plots",
    "roc_data": "ips_search.report.plots",
    "plot_accuracy_vs_memory": "ips_search.report.plots",
    "plot_parameters": "ips_search.report.plots",
    "plot_learning_curves": "ips_search.report.plots",
    "plot_importance": "ips_search.report.plots",
    "plot_roc": "ips_search.report.plots",
    "attention_maps": "ips_search.report.attention",
    "attention_or_note": "ips_search.report.attention",
    "plot_attention": "ips_search.report.attention",
    "load_trial_model": "ips_search.report.attention",
    "build_notebook": "ips_search.report.notebook",
    "write_notebook": "ips_search.report.notebook",
}

__all__ = [
    "PLOT_FILES",
    "ChosenPredictions",
    "Evaluation",
    "Experiment",
    "best_config_markdown",
    "best_trial",
    "budget_table",
    "build_tables",
    "chosen_predictions",
    "confirm_markdown",
    "evaluation_of",
    "fold_table",
    "folds_markdown",
    "latest_experiment",
    "load_curves",
    "load_experiment",
    "load_results",
    "load_study",
    "param_importances",
    "parameter_effects",
    "pareto_front",
    "reference_markdown",
    "status_counts",
    "top_trials",
    "write_report",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
