"""Which folder is an experiment: ``experiment.json`` says so; the newest one in a results folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ips_search.errors import ConfigError
from ips_search.experiment import EXPERIMENT_FILE, read_experiment


def read_experiment_json(path: str | Path) -> dict[str, Any]:
    """``experiment.json`` of the folder ``path``; :class:`ConfigError` unless it is an ips-search experiment."""
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"{folder} does not exist; pass an experiment folder such as results/<name>, or --latest")
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; pass an experiment folder such as results/<name>")
    return read_experiment(folder, "pass a folder the search created, e.g. results/<name>")


def latest_experiment(results_dir: str | Path = "results") -> Path:
    """The most recently started ips-search experiment in ``results_dir``."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ConfigError(f"results folder {root} does not exist; pass --results-dir or an experiment path")
    found = []
    for child in root.iterdir():
        marker = child / EXPERIMENT_FILE
        if child.is_dir() and marker.is_file():
            try:
                read_experiment(child, hint="")  # skips folders another tool wrote
                found.append((marker.stat().st_mtime, child))
            except (ConfigError, OSError):
                continue
    if not found:
        raise ConfigError(f"no ips-search experiment in {root}; run a search first or pass an experiment path")
    return max(found)[1]
