"""Ray Tune's snapshot of an experiment, ``experiment_state-*.json``: Ray's status of trials ``trials.csv`` lacks.

This is Ray's private format, read as **Ray 2.60** (``ray[tune]`` 2.60.x) writes it::

    {"trial_data": [[<trial JSON string>, <run metadata JSON string>], ...], "runner_data": ..., "stats": ...}

where each trial JSON holds ``trial_id``, ``status`` (``PENDING``, ``RUNNING``, ``PAUSED``, ``TERMINATED``,
``ERROR``), ``relative_logdir`` and ``config``. Only those plain fields are read; fields that hold pickles are
never decoded. Any other shape (another Ray version, a torn file) reads as unknown: a trial whose entry can't be
read is left out, a status not listed above is ``None``, and a file with no readable entry gives no states at all, so
the report rebuilds trials from their folders alone. This module is the only one that knows the format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ips_search.report.sources.json_files import read_json

RAY_VERSION = "2.60"  # the Ray release whose snapshot format this reads
STATE_GLOB = "experiment_state-*.json"
RAY_STATUSES = ("PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR")
NOT_STARTED = ("PENDING", "PAUSED", "RUNNING")  # a trial in one of these may have no folder yet


@dataclass(frozen=True)
class RayTrialState:
    """What Ray's snapshot says of one trial."""

    trial_id: str
    ray_status: str | None  # one of RAY_STATUSES; None: unknown
    relative_logdir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


def read_ray_states(folder: str | Path) -> dict[str, RayTrialState]:
    """trial_id -> state, from the newest snapshot in ``folder`` that has a readable entry; ``{}`` when none has."""
    paths = sorted(Path(folder).glob(STATE_GLOB), key=_mtime, reverse=True)
    for path in paths:
        states = parse_ray_state(read_json(path))
        if states:
            return states
    return {}


def parse_ray_state(doc: Any) -> dict[str, RayTrialState]:
    """The trial states of one snapshot document (see the module docstring); ``{}`` for any other shape."""
    items = doc.get("trial_data") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return {}
    out = {}
    for item in items:
        state = _trial_state(item)
        if state is not None:
            out[state.trial_id] = state
    return out


def _trial_state(item: Any) -> RayTrialState | None:
    if not isinstance(item, (list, tuple)) or not item:
        return None
    state = item[0]
    if isinstance(state, str):
        try:
            state = json.loads(state)
        except ValueError:
            return None
    if not isinstance(state, dict) or not isinstance(state.get("trial_id"), (str, int)):
        return None
    status = state.get("status")
    logdir = state.get("relative_logdir")
    config = state.get("config")
    return RayTrialState(
        trial_id=str(state["trial_id"]),
        ray_status=status if status in RAY_STATUSES else None,
        relative_logdir=logdir if isinstance(logdir, str) else None,
        config=config if isinstance(config, dict) else {},
    )


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
