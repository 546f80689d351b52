"""The on-disk layout of an experiment, shared by the search that writes it and the report that reads it.

``results/<name>/`` holds Ray Tune's experiment folder (one ``train_ips_<id>/`` per
trial with ``params.json``, ``result.json`` and ``checkpoint_*/checkpoint.pt``),
``experiment.json`` (ours: settings and space), ``trials.csv`` and ``optuna.journal``.
Imports nothing heavy, so the report can use it without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ips_search.errors import ConfigError

TOOL = "ips-search"  # experiment.json's "tool": folders without it are not ours
EXPERIMENT_FILE = "experiment.json"
TRIALS_CSV = "trials.csv"
JOURNAL_FILE = "optuna.journal"
RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
CHECKPOINT_FILE = "checkpoint.pt"

# Statuses of a trial: the trainable reports the first four itself; the rest follow from Ray's state
STATUSES = ("completed", "early-stopped", "infeasible", "nan-loss", "out-of-memory", "failed", "running", "pending")
FINAL_STATUSES = ("infeasible", "nan-loss", "out-of-memory")


def trial_status(ray_status: str | None, last: dict[str, Any]) -> str:
    """Our status name from Ray's trial status and the trial's last result."""
    reported = last.get("status")
    if reported in FINAL_STATUSES or reported == "completed":
        return reported
    if ray_status == "ERROR":
        return "failed"
    if ray_status == "TERMINATED":
        return "early-stopped" if reported == "running" else "failed"
    return "running" if ray_status == "RUNNING" or last else "pending"


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
