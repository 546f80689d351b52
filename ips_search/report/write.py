"""``write_report``: every table, plot, ``summary.md`` and the executed notebook of an experiment, into its folder."""

from __future__ import annotations

import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ips_search.errors import ConfigError
from ips_search.report.importance import param_importances
from ips_search.report.load import Experiment, load_experiment
from ips_search.report.predictions import chosen_predictions
from ips_search.report.selection import fold_table
from ips_search.report.sources import read_study
from ips_search.report.tables import build_tables

PLOT_FILES = {
    "accuracy_vs_memory": "accuracy_vs_memory.png",
    "parameters": "parameters.png",
    "learning_curves": "learning_curves.png",
    "importance": "importance.png",
    "attention": "attention.png",
    "roc": "roc.png",
}


def write_report(
    path: str | Path,
    notebook: bool = True,
    html: bool = True,
    top: int = 10,
    n_images: int = 4,
    budgets: list[float] | None = None,
    log=None,
) -> dict[str, Any]:
    """Write every table, plot, ``summary.md`` and (unless ``notebook=False``) the executed notebook.

    Returns ``{"dir": report folder, "files": {name: path}, "notes": [...], "error": str | None}``;
    ``error`` is set when a notebook cell failed. Raises :class:`ConfigError` for a
    path that is not an ips-search experiment or an experiment without trials yet.

    The report is written into a new folder beside ``<experiment>/report`` and swapped in whole at the end, so the
    report folder holds the old report or the new one, never a mix; on any error or Ctrl-C the new folder is
    removed and the old report is left as it was. (Files of one's own put into ``report/`` go with the old report.)
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed

    say = log or (lambda msg: None)
    exp = load_experiment(path)
    if exp.trials.empty:
        raise ConfigError(
            f"experiment {exp.path} has no trials yet; wait for the first trial to start, then run the report again"
        )
    out = exp.report_dir
    staging = _staging_dir(out)
    try:
        with _interrupts_remembered() as interrupted:
            files, notes, error = _write_into(staging, exp, notebook, html, top, n_images, budgets, say)
            if interrupted:  # a Ctrl-C that a finaliser swallowed: the old report stays
                raise KeyboardInterrupt
            _swap_in(staging, out)
    except BaseException:  # Ctrl-C included: the old report stays as it was, and nothing half-written is left
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = {name: out / p.relative_to(staging) for name, p in files.items()}
    return {"dir": out, "files": files, "notes": notes, "error": error, "experiment": exp}


def _write_into(
    out: Path,
    exp: Experiment,
    notebook: bool,
    html: bool,
    top: int,
    n_images: int,
    budgets: list[float] | None,
    say: Callable[[str], None],
) -> tuple[dict[str, Path], list[str], str | None]:
    """Write the whole report into the empty folder ``out``: ``(files, notes, notebook error)``."""
    from ips_search.report import plots
    from ips_search.report.markdown import summary_markdown
    from ips_search.report.tables import write_tables

    notes = list(exp.notes)
    df = exp.trials
    tables = build_tables(df, exp.max_memory_mb, top=top, budgets=budgets)
    tables["folds"] = fold_table(df, top)  # empty with one validation split
    tables["confirmed"] = exp.confirm  # confirm.csv with each config's M, I, P, lr; empty without a confirm stage
    study, journal_note = read_study(exp.path)
    if journal_note:
        notes.append(journal_note)
    importances, note = param_importances(study)
    if note:
        notes.append(f"importance: {note}")
    tables["importance"] = importances
    files: dict[str, Path] = {f"{k}.csv": p for k, p in write_tables(tables, out).items()}
    say("tables written")

    figures = {
        "accuracy_vs_memory": lambda: plots.plot_accuracy_vs_memory(df, exp.max_memory_mb, reference=exp.reference),
        "parameters": lambda: plots.plot_parameters(df),
        "learning_curves": lambda: plots.plot_learning_curves(exp.curves, df, top=5),
    }
    if not importances.empty:
        figures["importance"] = lambda: plots.plot_importance(importances)
    chosen = chosen_predictions(exp)
    roc = plots.roc_data(chosen.frames, chosen.source)
    if chosen.note or roc.message:  # nothing to draw: one line says why, the rest of the report goes on
        notes.append(f"ROC curve: {chosen.note or roc.message}")
    else:
        figures["roc"] = lambda: plots.draw_roc(roc)
        notes += [f"ROC curve: not drawn for {why}" for why in roc.skipped]
    for name, make in figures.items():
        try:
            files[PLOT_FILES[name]] = _save(make(), out / PLOT_FILES[name])
        except Exception as exc:  # noqa: BLE001 - odd data in one plot must not cost the rest of the report
            notes.append(f"{PLOT_FILES[name]} could not be drawn ({type(exc).__name__}: {exc})")
    attention_note = _attention(exp, out, n_images, files)
    if attention_note:
        notes.append(f"attention maps: {attention_note}")
    say("plots written")

    summary = out / "summary.md"
    summary.write_text(summary_markdown(exp, tables, files, notes), encoding="utf-8")
    files["summary.md"] = summary
    error = None
    if notebook:
        from ips_search.report.notebook import write_notebook

        say("executing the notebook")
        nb_files, error = write_notebook(exp.path, out, execute=True, html=html)
        files.update({p.name: p for p in nb_files.values()})
    return files, notes, error


@contextmanager
def _interrupts_remembered() -> Iterator[list[int]]:
    """Ctrl-C still raises ``KeyboardInterrupt``, and is also remembered in the list this yields.

    A ``KeyboardInterrupt`` raised while Python runs a finaliser or weakref callback (garbage collection in
    matplotlib, pandas, ZMQ) is printed as "Exception ignored in ..." and dropped, and the report would then be
    swapped in as if nothing happened; the list lets :func:`write_report` see it anyway, and those messages are
    kept off stderr. Only in the main thread with Python's own handler in place; elsewhere nothing changes.
    """
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield seen
        return

    def on_interrupt(signum: int, frame: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    def unraisable(info: Any) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            previous_hook(info)

    previous_hook = sys.unraisablehook
    signal.signal(signal.SIGINT, on_interrupt)
    sys.unraisablehook = unraisable
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook


def _staging_dir(out: Path) -> Path:
    """A new empty folder beside ``out`` (same file system, so the swap is two renames), named so it is never
    taken for a trial folder and so a leftover is recognisable (``.report-new-<hex>``)."""
    for _ in range(100):
        staging = out.with_name(f".{out.name}-new-{secrets.token_hex(4)}")
        try:
            staging.mkdir()  # not mkdtemp: the report folder gets the usual permissions, not 0700
            return staging
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"cannot write the report into {out.parent} ({exc.strerror or exc}); "
                "make the experiment folder writable or report on a copy of it"
            ) from None
    raise ConfigError(f"cannot find a free temporary folder name beside {out}; remove the .{out.name}-new-* folders")


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` whole: the old report is renamed away, the new one renamed in, the old deleted.

    A reader sees the old report or the new one, never a mix (for the instant between the renames, none).
    """
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}-old-{secrets.token_hex(4)}")
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)  # put the old report back
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _attention(exp: Experiment, out: Path, n_images: int, files: dict[str, Path]) -> str | None:
    from ips_search.report.attention import attention_or_note, plot_attention

    trial, maps, note = attention_or_note(exp, n_images=n_images)
    if note is None:
        files[PLOT_FILES["attention"]] = _save(plot_attention(maps, trial), out / PLOT_FILES["attention"])
    return note
