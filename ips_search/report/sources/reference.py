"""The full-bag reference run: ``reference/`` beside the search, a Tune experiment of its own whose ``trials.csv``
holds one row with the search's columns (M = N: every patch kept, no selection), so the report can show what IPS's
memory saving costs. Read like the search's trials (:mod:`.trials_csv`, :mod:`.trial_folders`)."""

from __future__ import annotations

from pathlib import Path

from ips_search.experiment import REFERENCE_DIR

REFERENCE_LABEL = "full bag (M = N)"  # how plots and tables name it


def reference_folder(folder: str | Path) -> Path | None:
    """``<experiment>/reference`` when the experiment has a reference run, else ``None``."""
    path = Path(folder) / REFERENCE_DIR
    return path if path.is_dir() else None
