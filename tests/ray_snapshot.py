"""What Ray's experiment snapshot (``experiment_state-*.json``) records of an experiment's trials: a resume restores
trials from it, not from ``trials.csv``, so tests that kill a driver wait on it."""

from __future__ import annotations

import json
from pathlib import Path


def trial_statuses(folder: Path) -> dict[str, str]:
    """Trial id -> Ray status (``PENDING``, ``RUNNING``, ``TERMINATED``...) in ``folder``'s snapshots; a snapshot
    being rewritten right now is skipped."""
    statuses = {}
    for path in sorted(folder.glob("experiment_state-*.json")):
        try:
            entries = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue
        for entry in entries:
            trial = json.loads(entry[0])
            statuses[str(trial["trial_id"])] = str(trial.get("status"))
    return statuses
