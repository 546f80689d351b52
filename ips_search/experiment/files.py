"""The files of an experiment folder, and ``experiment.json``: what says a folder is ours and how it was run.

``results/<name>/`` holds Ray Tune's experiment folder (one ``train_ips_<id>/`` per trial with ``params.json``,
``result.json`` and ``checkpoint_*/checkpoint.pt``), ``experiment.json`` (ours: settings and space),
``trials.csv``, ``optuna.journal`` and ``search.log`` (Ray's console output); with a confirm stage, ``confirm/``
(its Tune experiment and ``trials.csv``) and ``confirm.csv``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ips_search.errors import ConfigError

TOOL = "ips-search"  # experiment.json's "tool": folders without it are not ours
FORMAT_VERSION = 1
EXPERIMENT_FILE = "experiment.json"
TRIALS_CSV = "trials.csv"
JOURNAL_FILE = "optuna.journal"
LOG_FILE = "search.log"
RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
CHECKPOINT_FILE = "checkpoint.pt"
REPORT_DIR = "report"
TRAINABLE_NAME = "train_ips"  # trial folders are train_ips_<trial id>
CONFIRM_DIR = "confirm"  # the confirm stage's own Tune experiment (its trials.csv inside)
CONFIRM_CSV = "confirm.csv"  # per confirmed config: runs, mean and standard deviation


def write_experiment(folder: Path, settings: dict[str, Any], space: dict[str, Any], **extra: Any) -> Path:
    """Atomically write ``folder/experiment.json`` (settings, the space as run, and ``extra`` such as argv)."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"tool": TOOL, "version": FORMAT_VERSION, **extra, "settings": settings, "space": space}
    path = folder / EXPERIMENT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)
    return path


def update_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Rewrite the settings of an existing ``experiment.json`` (e.g. a resumed search's raised trial count)."""
    meta = read_experiment(folder, "pass the name of a folder this tool created")
    extra = {k: v for k, v in meta.items() if k not in ("tool", "version", "settings", "space")}
    write_experiment(folder, settings, meta["space"], **extra)


def read_experiment(folder: Path, hint: str, damaged_hint: str | None = None) -> dict[str, Any]:
    """``folder/experiment.json``; a one-line :class:`ConfigError` ending in ``hint`` unless this tool wrote it.

    A file that exists but is not JSON is reported as damaged (ending in ``damaged_hint``, default ``hint``):
    pointing at another folder would be the wrong fix when the folder is right and its file broke.
    """
    path = folder / EXPERIMENT_FILE
    try:
        raw = path.read_bytes()
    except OSError:
        raise ConfigError(f"{folder} is not an ips-search experiment (no readable {EXPERIMENT_FILE}); {hint}") from None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bytes that are not UTF-8, absurd nesting
        raise ConfigError(f"{path} is damaged (not valid JSON: {_first_line(exc)}); {damaged_hint or hint}") from None
    if not isinstance(meta, dict) or meta.get("tool") != TOOL:
        raise ConfigError(
            f"{folder} is not an ips-search experiment ({EXPERIMENT_FILE} was not written by ips-search); {hint}"
        )
    return meta


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
