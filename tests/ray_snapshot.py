"""For tests that kill a search's driver: start one as its own process, and read what Ray's experiment snapshot
(``experiment_state-*.json``) records of its trials (a resume restores trials from it, not from ``trials.csv``, so
these tests wait on it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def start_driver(cluster, argv: list[str], log: Path) -> subprocess.Popen:
    """``python -m ips_search.run argv`` on the shared test cluster as its own process (a test may SIGKILL it),
    its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ips_search.run", *argv, "--address", cluster.address_info["gcs_address"]],
            env={**os.environ, "RAY_AUTH_MODE": "token"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


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
