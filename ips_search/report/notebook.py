"""``report.ipynb``: a notebook that loads the experiment with the library functions, executed so it opens with outputs.

The notebook holds no pasted numbers: re-running it re-reads the experiment from
disk (while the search runs too). The experiment path is the only thing from the
experiment that goes into it, and only as data: a JSON document inside a Python
string literal (``json.dumps`` twice, ASCII-only), decoded with ``json.loads`` at
run time. A path or trial name that looks like code stays a string.

It opens with what a team reads: the best configuration and the confirm stage's test figures, accuracy against peak
memory and the Pareto set, the top trials' per-fold scores and the chosen config's ROC curve; the settings, the
other tables and plots follow. The set-up cell (imports, the path) prints nothing and is folded in
Jupyter; ``report.html`` shows outputs only, without code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK_FILE = "report.ipynb"
HTML_FILE = "report.html"
KERNEL_NAME = "ips-search-report"


def path_literal(value: str) -> str:
    """A Python expression that evaluates to ``value``, built only from JSON-encoded data.

    ``json.dumps(json.dumps(value))`` is an ASCII JSON string whose only escapes are
    ``\\"`` and ``\\\\``, which mean the same in a Python string literal; ``json.loads``
    then gives back ``value`` exactly (surrogate pairs included).
    """
    return f"json.loads({json.dumps(json.dumps(value))})"


SETUP = """\
%matplotlib inline
import json
import warnings
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

# tqdm (imported by Optuna and the data modules) warns in a kernel without ipywidgets; nothing here shows a bar
warnings.filterwarnings("ignore", message="IProgress not found")

from ips_search.report import (
    attention_or_note,
    best_config_markdown,
    budget_table,
    chosen_predictions,
    confirm_markdown,
    fold_table,
    folds_markdown,
    load_experiment,
    param_importances,
    parameter_effects,
    pareto_front,
    plot_accuracy_vs_memory,
    plot_attention,
    plot_importance,
    plot_learning_curves,
    plot_parameters,
    plot_roc,
    reference_markdown,
    status_counts,
    top_trials,
)
from ips_search.report.sources import read_study

pd.set_option("display.max_columns", 40)
pd.set_option("display.width", 200)

# The experiment folder recorded when this notebook was generated (a JSON-encoded string, data only);
# if it has moved, the folder above this notebook (<experiment>/report/report.ipynb) is used.
EXPERIMENT = Path({literal})
if not (EXPERIMENT / "experiment.json").is_file() and (Path.cwd().parent / "experiment.json").is_file():
    EXPERIMENT = Path.cwd().parent
exp = load_experiment(EXPERIMENT)
df = exp.trials
HIDE = ["path", "node_ip"]  # long, and in all_trials.csv"""

# What a team reads first: the best configuration, accuracy against memory and the Pareto set; then the rest.
CELLS = [
    ("setup", SETUP),
    (
        "code",
        "display(Markdown(best_config_markdown(df, exp.max_memory_mb, heading='#', search=exp.name)\n"
        "                 + '\\n' + confirm_markdown(exp.confirm, ev=exp.evaluation)))",
    ),
    (
        "md",
        "## Accuracy vs peak memory\n\nEvery trial by status, with ± one standard deviation over the folds when "
        "there are several; the line is the Pareto front of completed feasible trials, the dashed line the memory "
        "budget, the star the full-bag reference run (M = N) when there is one.",
    ),
    (
        "code",
        "if not exp.reference.empty:\n"
        "    display(Markdown(reference_markdown(exp.reference, df)))\n"
        "plot_accuracy_vs_memory(df, exp.max_memory_mb, reference=exp.reference)",
    ),
    (
        "md",
        "### The Pareto set\n\nCompleted feasible trials that no other trial beats on both validation accuracy and "
        "peak memory.",
    ),
    ("code", "pareto_front(df).drop(columns=HIDE, errors='ignore')"),
    ("code", "display(Markdown(folds_markdown(fold_table(df, 10), exp.evaluation)))"),
    (
        "md",
        "## ROC curve of the chosen config on the test set\n\nFrom `test_predictions.csv`: the chosen config's "
        "confirm runs, one curve per seed, or the chosen trial's own run; binary tasks by the positive class `p1`, "
        "multi-class tasks one-vs-rest per class and their macro average.",
    ),
    (
        "code",
        "chosen = chosen_predictions(exp)  # chosen.note: why there are no predictions (one line)\n"
        "if chosen.note:\n    print('note: ROC curve:', chosen.note)\n"
        "plot_roc(chosen.frames, chosen.source) if chosen.frames else None",
    ),
    (
        "md",
        "## The search\n\nIterative Patch Selection (Bergner et al., ICLR 2023): a search over memory size M, "
        "iteration size I, patch size P and learning rate. Every cell reads the experiment from disk with "
        "`ips_search.report`, so *Run All* refreshes the report (also while the search is still running).",
    ),
    (
        "code",
        'print(f"experiment {exp.name!r} at {exp.path}: {len(df)} trials")\n'
        "for note in exp.notes:\n"
        '    print("note:", note)\n'
        "status_counts(df)",
    ),
    ("md", "## Settings"),
    ("code", "pd.Series(exp.settings, dtype=object).to_frame('value')"),
    ("md", "## Top 10\n\nCompleted (full-budget) trials within the memory budget, by validation accuracy."),
    ("code", "top_trials(df, 10).drop(columns=HIDE, errors='ignore')"),
    ("md", "## Best trial under each memory budget"),
    ("code", "budget_table(df, max_memory_mb=exp.max_memory_mb)"),
    (
        "md",
        "## Parameter effects\n\nValidation accuracy of completed trials by M, I, patch size and learning rate "
        "(bins where a parameter has many values).",
    ),
    ("code", "display(parameter_effects(df))\nplot_parameters(df)"),
    ("md", "## Learning curves of the top trials"),
    ("code", "plot_learning_curves(exp.curves, df, top=5)"),
    (
        "md",
        "## Parameter importance\n\nOptuna's fANOVA evaluator on the study (`optuna.journal`), for validation "
        "accuracy and for peak memory. Early-stopped trials are pruned in the study and do not count.",
    ),
    (
        "code",
        "study, journal_note = read_study(exp.path)  # journal_note: lines of optuna.journal it could not read\n"
        "importances, note = param_importances(study)\n"
        "for line in (journal_note, note):\n    if line:\n        print('note:', line)\n"
        "plot_importance(importances) if not importances.empty else None",
    ),
    (
        "md",
        "## Attention maps of the best trial\n\nThe best trial's newest checkpoint on the first test images: "
        "the M patches IPS keeps out of N, each with its attention score.",
    ),
    (
        "code",
        "trial, maps, note = attention_or_note(exp, n_images=4)  # note: why there are none (one line)\n"
        "if note:\n    print('note: attention maps:', note)\n"
        "plot_attention(maps, trial) if maps else None",
    ),
    (
        "md",
        "## All trials\n\nOne row per trial. `val_accuracy` is the last epoch's, `val_accuracy_best` the best "
        "epoch's; `test_accuracy` is measured after the last epoch of completed trials; `peak_memory_mb` is of the "
        "kind in `memory_kind` (`cuda`: peak allocated GPU memory, `cpu-rss`: process resident memory).",
    ),
    ("code", "df.drop(columns=HIDE, errors='ignore')"),
]


def build_notebook(experiment_path: str | Path) -> nbformat.NotebookNode:
    """The report notebook for the experiment at ``experiment_path`` (unexecuted)."""
    literal = path_literal(str(Path(experiment_path).resolve()))
    cells = []
    for kind, source in CELLS:
        if kind == "md":
            cells.append(new_markdown_cell(source))
        elif kind == "setup":  # imports and path handling: folded away in Jupyter, and it prints nothing
            cell = new_code_cell(source.format(literal=literal))
            cell.metadata["jupyter"] = {"source_hidden": True}
            cells.append(cell)
        else:
            cells.append(new_code_cell(source))
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def kernel_argv() -> list[str]:
    """The kernel's command line: this interpreter's ipykernel, with no folder of the experiment on its module path.

    ``-P`` (Python >= 3.11) keeps the working directory off ``sys.path`` (and IPython then adds none either), so a
    ``pandas.py`` or ``ipykernel_launcher.py`` planted in the experiment cannot run; the kernel also starts in an
    empty temporary folder (:func:`execute_notebook`), which is what protects Python 3.10, where ``-P`` is missing.
    Every other import path (the venv, ``PYTHONPATH``, user site) stays as it is.
    """
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def _kernel_manager(spec_dir: Path):
    """A kernel manager for this interpreter's ipykernel (not whatever ``python3`` kernel a user has installed)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernel_dir = spec_dir / KERNEL_NAME
    kernel_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": kernel_argv(), "display_name": "Python (ips-search report)", "language": "python"}
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]),
        transport="ipc",  # local sockets in our temporary folder: no TCP ports
        ip=str(spec_dir / "kernel"),
    )


def _client_class():
    """nbclient's ``NotebookClient`` with Ctrl-C handled here (a function so nbclient loads only when needed)."""
    from nbclient import NotebookClient

    class ReportClient(NotebookClient):
        """Without nbclient's own SIGINT handler, which shut the kernel down under the running cell and then failed
        on an ``AssertionError`` (an 80-line traceback, exit 1). Here Ctrl-C cancels the execution, the kernel is
        shut down at once on the way out, and :func:`execute_notebook` raises ``KeyboardInterrupt``."""

        interrupted = False

        @asynccontextmanager
        async def async_setup_kernel(self, **kwargs: Any) -> AsyncGenerator[None, None]:
            kwargs.pop("cleanup_kc", None)  # we made the kernel, so it always goes
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()

            def on_interrupt() -> None:
                self.interrupted = True
                self.shutdown_kernel = "immediate"
                if task is not None:
                    task.cancel()

            previous = signal.getsignal(signal.SIGINT)
            try:
                loop.add_signal_handler(signal.SIGINT, on_interrupt)
                handled = True
            except (RuntimeError, ValueError, NotImplementedError):  # not the main thread, or no signals here
                handled = False
            try:
                if self.km is None:
                    self.km = self.create_kernel_manager()
                if not self.km.has_kernel:
                    await self.async_start_new_kernel(**kwargs)
                if self.kc is None:
                    await self.async_start_new_kernel_client()
                yield
            finally:
                try:
                    if self.km is not None:
                        await self._async_cleanup_kernel()
                finally:
                    if handled:
                        loop.remove_signal_handler(signal.SIGINT)  # which puts Python's default handler back
                        if previous is not None:  # None: a handler not set from Python, which we can't restore
                            signal.signal(signal.SIGINT, previous)  # so put back the caller's

    return ReportClient


def execute_notebook(nb: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel; raises ``nbclient``'s ``CellExecutionError`` on error.

    The kernel starts in an empty temporary folder, not the report folder (the notebook reads the experiment by its
    absolute path), so no file of the experiment or its report is importable or read as configuration
    (``ipython_kernel_config.py``, ``matplotlibrc``). Ctrl-C raises ``KeyboardInterrupt`` after the kernel is gone,
    without nbclient's or ZMQ's messages.
    """
    with tempfile.TemporaryDirectory(prefix="ips-report-kernel-") as tmp:
        clean = Path(tmp) / "cwd"
        clean.mkdir()
        km = _kernel_manager(Path(tmp))
        client = _client_class()(nb, timeout=timeout, km=km, resources={"metadata": {"path": str(clean)}})
        try:
            client.execute()
        except BaseException as exc:
            if client.interrupted or _is_interrupt(exc):
                _quiet_kill(km)
                raise KeyboardInterrupt from None
            raise
        finally:
            _quiet_kill(km)
        if client.interrupted:  # Ctrl-C as the last cell finished
            raise KeyboardInterrupt
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return nb


def _is_interrupt(exc: BaseException) -> bool:
    """A ``KeyboardInterrupt`` here, or one the kernel reported from a cell (a SIGINT sent to its process group)."""
    return isinstance(exc, KeyboardInterrupt) or getattr(exc, "ename", None) == "KeyboardInterrupt"


def _quiet_kill(km) -> None:
    """Make sure the kernel process (and anything it started) is gone, without a word on stderr.

    After a clean run nbclient has shut it down and this finds nothing; after Ctrl-C landed outside the cancellable
    part (the kernel starting up, say) it is killed here. The kernel runs in its own session (jupyter_client starts
    it with ``start_new_session``), so its process group holds the kernel and its children only.
    """
    provisioner = getattr(km, "provisioner", None)
    process = getattr(provisioner, "process", None)
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        process.kill()
    with contextlib.suppress(Exception):
        process.wait(timeout=10)


def notebook_html(nb: nbformat.NotebookNode) -> str:
    """The executed notebook as HTML for reading: outputs only, no code and no ``In [n]:`` prompts.

    The ``.ipynb`` keeps the code; the HTML is what a team opens, so it starts with the best configuration.
    """
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    return body


def write_notebook(
    experiment_path: str | Path, out_dir: str | Path, execute: bool = True, html: bool = True
) -> tuple[dict[str, Path], str | None]:
    """Write ``report.ipynb`` (executed unless ``execute=False``) and ``report.html`` into ``out_dir``.

    Returns the written paths and an error line when a cell failed (the notebook is
    then saved with the outputs up to the failing cell, and no HTML is written).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = build_notebook(experiment_path)
    paths = {"notebook": out_dir / NOTEBOOK_FILE}
    error = None
    if execute:
        from nbclient.exceptions import CellExecutionError

        try:
            execute_notebook(nb)
        except CellExecutionError as exc:
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            error = f"a notebook cell failed: {lines[-1] if lines else type(exc).__name__}"
    nbformat.write(nb, paths["notebook"])
    if html and execute and error is None:
        paths["html"] = out_dir / HTML_FILE
        paths["html"].write_text(notebook_html(nb), encoding="utf-8")
    return paths, error
