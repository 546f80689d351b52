"""Trial folders (``train_ips_<id>/``): ``params.json`` (the sampled config) and ``result.json`` (one line per epoch).

A folder is read as it is: a truncated last line of ``result.json`` is skipped, a missing file reads as empty.
The trial's status is left to :mod:`ips_search.report.merge`, which knows Ray's side too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ips_search.experiment import PARAMS_FILE, REPORT_DIR, RESULT_FILE, TRAINABLE_NAME, best_of, trial_record
from ips_search.report.selection import is_selection_column
from ips_search.report.sources.json_files import read_json, read_json_lines

CURVE_COLUMNS = [
    "val_accuracy",
    "val_loss",
    "train_loss",
    "train_accuracy",
    "peak_memory_mb",
    "epoch_seconds",
    "time_total_s",
    "status",
]
_TRIAL_DIR = re.compile(rf"^{TRAINABLE_NAME}_([0-9a-zA-Z]+?)(?:_|$)")


@dataclass
class TrialFolder:
    """One trial folder as read: its row (no status yet), its last report and its per-epoch curve."""

    path: Path
    trial_id: str
    row: dict[str, Any]  # trial_record's row without status and ray_status
    last: dict[str, Any]  # the last epoch's report; {} before the first
    curve: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per epoch: trial_id, epoch, CURVE_COLUMNS
    has_params: bool = False

    @property
    def readable(self) -> bool:
        """Whether anything was read: a report, or at least the sampled config."""
        return bool(self.last) or self.has_params


def trial_folders(folder: str | Path) -> list[Path]:
    """The trial folders of an experiment: sub-folders with a ``result.json`` or ``params.json``."""
    out = []
    for child in sorted(Path(folder).iterdir()):
        if (
            child.is_dir()
            and child.name != REPORT_DIR
            and ((child / RESULT_FILE).is_file() or (child / PARAMS_FILE).is_file())
        ):
            out.append(child)
    return out


def read_trial_folder(path: str | Path) -> TrialFolder:
    """A trial's row and its per-epoch curve, from ``params.json`` and ``result.json``."""
    path = Path(path)
    results = read_json_lines(path / RESULT_FILE)
    trial_id = _trial_id(path, results)
    last = results[-1] if results else {}
    row = trial_record(
        last,
        trial_id=trial_id,
        ray_status=None,
        config=read_json(path / PARAMS_FILE),
        val_accuracy_best=best_of([r.get("val_accuracy") for r in results]),  # the record's best epoch, as before
        path=str(path),
    )
    del row["status"], row["ray_status"]  # the merge decides them, with Ray's status from trials.csv or its state
    row.update(_selection(results, row))
    curve = pd.DataFrame(
        [
            {
                "trial_id": trial_id,
                "epoch": r.get("training_iteration", r.get("epoch", i + 1)),
                **{k: r.get(k) for k in CURVE_COLUMNS},
            }
            for i, r in enumerate(results)
        ]
    )
    return TrialFolder(
        path=path, trial_id=trial_id, row=row, last=last, curve=curve, has_params=(path / PARAMS_FILE).is_file()
    )


def _selection(results: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any]:
    """The cross-validation columns the row lacks, each its newest value over the reports: a fold's score stays
    known after later reports (a failed or pruned fold, the test epoch) leave it out."""
    found: dict[str, Any] = {}
    for report in results:
        found.update({k: v for k, v in report.items() if v is not None and is_selection_column(k)})
    return {k: v for k, v in found.items() if row.get(k) is None}


def _trial_id(folder: Path, results: list[dict[str, Any]]) -> str:
    for row in reversed(results):
        if row.get("trial_id"):
            return str(row["trial_id"])
    match = _TRIAL_DIR.match(folder.name)
    return match.group(1) if match else folder.name
