"""``write_report``: every table, plot, ``summary.md`` and the executed notebook of an experiment, into its folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ips_search.errors import ConfigError
from ips_search.report.importance import param_importances
from ips_search.report.load import Experiment, load_experiment
from ips_search.report.sources import load_study
from ips_search.report.tables import build_tables

PLOT_FILES = {
    "accuracy_vs_memory": "accuracy_vs_memory.png",
    "parameters": "parameters.png",
    "learning_curves": "learning_curves.png",
    "importance": "importance.png",
    "attention": "attention.png",
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
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    from ips_search.report import plots
    from ips_search.report.markdown import summary_markdown
    from ips_search.report.tables import write_tables

    say = log or (lambda msg: None)
    exp = load_experiment(path)
    if exp.trials.empty:
        raise ConfigError(
            f"experiment {exp.path} has no trials yet; wait for the first trial to start, then run the report again"
        )
    out = exp.report_dir
    out.mkdir(parents=True, exist_ok=True)
    notes = list(exp.notes)
    df = exp.trials
    tables = build_tables(df, exp.max_memory_mb, top=top, budgets=budgets)
    study = load_study(exp.path)
    importances, note = param_importances(study)
    if note:
        notes.append(f"importance: {note}")
    tables["importance"] = importances
    files: dict[str, Path] = {f"{k}.csv": p for k, p in write_tables(tables, out).items()}
    say("tables written")

    figures = {
        "accuracy_vs_memory": lambda: plots.plot_accuracy_vs_memory(df, exp.max_memory_mb),
        "parameters": lambda: plots.plot_parameters(df),
        "learning_curves": lambda: plots.plot_learning_curves(exp.curves, df, top=5),
    }
    if not importances.empty:
        figures["importance"] = lambda: plots.plot_importance(importances)
    stale = [PLOT_FILES[n] for n in ("importance",) if n not in figures]
    for name, make in figures.items():
        try:
            files[PLOT_FILES[name]] = _save(make(), out / PLOT_FILES[name])
        except Exception as exc:  # noqa: BLE001 - odd data in one plot must not cost the rest of the report
            notes.append(f"{PLOT_FILES[name]} could not be drawn ({type(exc).__name__}: {exc})")
            stale.append(PLOT_FILES[name])
    attention_note = _attention(exp, out, n_images, files)
    if attention_note:
        notes.append(f"attention maps: {attention_note}")
        stale.append(PLOT_FILES["attention"])
    for name in stale:  # a figure from an earlier run of the report would no longer match the tables
        (out / name).unlink(missing_ok=True)
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
    return {"dir": out, "files": files, "notes": notes, "error": error, "experiment": exp}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _attention(exp: Experiment, out: Path, n_images: int, files: dict[str, Path]) -> str | None:
    from ips_search.report.attention import attention_or_note, plot_attention

    trial, maps, note = attention_or_note(exp, n_images=n_images)
    if note is None:
        files[PLOT_FILES["attention"]] = _save(plot_attention(maps, trial), out / PLOT_FILES["attention"])
    return note
