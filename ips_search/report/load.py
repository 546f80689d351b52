"""Read an ips-search experiment from disk: settings, one tidy row per trial, per-epoch curves, the Optuna study.

Only what is on disk is read, so this works while a search runs, after it
finished and after it crashed:

* ``experiment.json`` (written by the search before the first trial) says it is ours;
* ``trials.csv`` (rewritten by the driver) gives Ray's status of each trial;
* each trial folder's ``result.json`` (one JSON line per epoch; a truncated last
  line is skipped) and ``params.json`` give the metrics and the config, and win
  over ``trials.csv`` when they are newer (the CSV may be stale or missing);
* ``experiment_state-*.json`` (Ray's snapshot, plain JSON) gives Ray's status of
  trials when ``trials.csv`` is missing; its pickled fields are never decoded;
* ``optuna.journal`` is read from a private copy, so the study is never written to.

Nothing here unpickles anything (Ray's ``*.pkl`` files are ignored) or imports Ray.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ips_search.errors import ConfigError
from ips_search.experiment import (
    COLUMN_NAMES,
    EXPERIMENT_FILE,
    JOURNAL_FILE,
    METRIC,
    ORDER,
    PARAMS_FILE,
    REPORT_DIR,
    RESULT_FILE,
    TRIALS_CSV,
    Status,
    best_of,
    coerce,
    read_experiment,
    trial_record,
    trial_status,
)
from ips_search.space import QUANTILE_SUFFIX

PARAM_ORDER = ("memory_size", "iteration_size", "patch_size", "lr")
METRIC_COLUMNS = [c for c in COLUMN_NAMES if c not in ("trial_id", "status", "ray_status", "node_id", "path")]
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
_TRIAL_DIR = re.compile(r"^train_ips_([0-9a-zA-Z]+?)(?:_|$)")


@dataclass
class Experiment:
    """An experiment as read from disk.

    ``trials``: one row per trial (see :func:`load_results`); ``curves``: one row
    per trial and epoch; ``notes``: what was missing or unreadable, in words.
    """

    path: Path
    meta: dict[str, Any]
    trials: pd.DataFrame
    curves: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.settings.get("name") or self.path.name)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.meta.get("settings") or {})

    @property
    def space(self) -> dict[str, Any]:
        return dict(self.meta.get("space") or {})

    @property
    def max_memory_mb(self) -> float | None:
        value = self.settings.get("max_memory_mb")
        return float(value) if value is not None else None

    @property
    def multi_objective(self) -> bool:
        return self.settings.get("objective") == "accuracy-memory"

    @property
    def max_epochs(self) -> int | None:
        epochs = self.settings.get("epochs") or (self.space.get("train") or {}).get("epochs")
        return int(epochs) if epochs else None

    @property
    def params(self) -> list[str]:
        """The searched parameters present in ``trials`` (M, I, P, lr first)."""
        return param_columns(self.trials, self.space)

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR


# -- locating ----------------------------------------------------------------------------------------------------------
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


# -- reading files -----------------------------------------------------------------------------------------------------
def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; unreadable lines (e.g. truncated by a crash) are skipped."""
    rows = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_trials_csv(folder: Path, notes: list[str]) -> pd.DataFrame | None:
    path = folder / TRIALS_CSV
    if not path.is_file():
        notes.append(f"{TRIALS_CSV} is missing: trials were rebuilt from their folders")
        return None
    try:
        df = pd.read_csv(path, dtype={"trial_id": str})
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        notes.append(f"{TRIALS_CSV} is unreadable ({type(exc).__name__}): trials were rebuilt from their folders")
        return None
    if "trial_id" not in df:
        notes.append(f"{TRIALS_CSV} has no trial_id column: trials were rebuilt from their folders")
        return None
    return df


def _ray_states(folder: Path) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, relative_logdir, config} from Ray's newest ``experiment_state-*.json`` (JSON only)."""
    states = sorted(folder.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in states:
        doc = _read_json(path)
        out = {}
        for item in doc.get("trial_data") or []:
            try:
                state = item[0]
                state = json.loads(state) if isinstance(state, str) else state
                out[str(state["trial_id"])] = {
                    "ray_status": state.get("status"),
                    "relative_logdir": state.get("relative_logdir"),
                    "config": state.get("config") if isinstance(state.get("config"), dict) else {},
                }
            except (KeyError, IndexError, TypeError, ValueError):
                continue
        if out:
            return out
    return {}


def trial_folders(folder: str | Path) -> list[Path]:
    """The trial folders of an experiment: sub-folders with a ``result.json`` or ``params.json``."""
    folder = Path(folder)
    out = []
    for child in sorted(folder.iterdir()):
        if (
            child.is_dir()
            and child.name != REPORT_DIR
            and ((child / RESULT_FILE).is_file() or (child / PARAMS_FILE).is_file())
        ):
            out.append(child)
    return out


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _sampled(params: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in params.items()
        if k not in ("fixed", "max_memory_mb") and not k.endswith(QUANTILE_SUFFIX) and not isinstance(v, (dict, list))
    }


def _trial_id(folder: Path, results: list[dict[str, Any]]) -> str:
    for row in reversed(results):
        if row.get("trial_id"):
            return str(row["trial_id"])
    match = _TRIAL_DIR.match(folder.name)
    return match.group(1) if match else folder.name


def _folder_row(folder: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """A trial's row and its per-epoch curve, from ``params.json`` and ``result.json``."""
    results = read_json_lines(folder / RESULT_FILE)
    params = _read_json(folder / PARAMS_FILE)
    trial_id = _trial_id(folder, results)
    last = results[-1] if results else {}
    row = trial_record(
        last,
        trial_id=trial_id,
        ray_status=None,
        params=_sampled(params),
        best_val_accuracy=best_of([r.get(METRIC) for r in results]),
        path=str(folder),
    )
    del row["status"], row["ray_status"]  # the merge decides them, with Ray's status from trials.csv or its state
    row["_last"] = last
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
    return row, curve


def _newer(folder_row: dict[str, Any], csv_row: dict[str, Any]) -> bool:
    """Whether the trial folder has at least as many epochs as the CSV row (the folder is then authoritative)."""
    a, b = _finite(folder_row.get("epochs")), _finite(csv_row.get("epochs"))
    return a is not None and (b is None or a >= b)


def param_columns(df: pd.DataFrame, space: dict[str, Any] | None = None) -> list[str]:
    """Searched-parameter columns of a trials table, M, I, P and lr first."""
    searched = list((space or {}).get("search") or {})
    known = set(searched) | set(PARAM_ORDER)
    cols = [c for c in PARAM_ORDER if c in df and (c in searched or not searched or df[c].notna().any())]
    cols += [c for c in searched if c in df and c not in cols]
    return [c for c in cols if c in known]


def _tidy(rows: list[dict[str, Any]], space: dict[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = coerce(df)  # early on, no trial has reported some columns: they are added empty
    params = param_columns(df, space)
    front = ["trial_id", "status", "ray_status", *params]
    rest = [c for c in METRIC_COLUMNS if c in df]
    others = [c for c in df.columns if c not in front and c not in rest and c not in ("path", "node_id")]
    order = [c for c in front if c in df] + rest + others + [c for c in ("node_id", "path") if c in df]
    df = df[order]
    df = (
        df.assign(_order=df["status"].map(ORDER).fillna(len(ORDER)))
        .sort_values(["_order", METRIC], ascending=[True, False], kind="stable")
        .drop(columns="_order")
    )
    return df.reset_index(drop=True)


# -- the API -----------------------------------------------------------------------------------------------------------
def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment folder; :class:`ConfigError` if it is not an ips-search experiment."""
    folder = Path(path).expanduser().resolve()
    meta = read_experiment_json(folder)
    notes: list[str] = []
    csv = _read_trials_csv(folder, notes)
    states = _ray_states(folder) if csv is None else {}
    csv_rows = {str(r["trial_id"]): r for r in csv.to_dict("records")} if csv is not None else {}

    rows: dict[str, dict[str, Any]] = {}
    curves = []
    skipped = 0
    for trial_dir in trial_folders(folder):
        row, curve = _folder_row(trial_dir)
        if row.get("_last") == {} and not (trial_dir / PARAMS_FILE).is_file():
            skipped += 1
            continue
        rows[row["trial_id"]] = row
        if not curve.empty:
            curves.append(curve)
    if skipped:
        notes.append(f"{skipped} trial folder(s) had no readable result.json or params.json")

    out = []
    for trial_id, csv_row in csv_rows.items():
        row = rows.pop(trial_id, None)
        clean = {k: v for k, v in csv_row.items() if not (isinstance(v, float) and math.isnan(v))}
        if row is None:  # no folder (pending, or removed): the CSV row as it is
            if "path" in clean and not Path(str(clean["path"])).is_dir():
                clean["path"] = None
            out.append(clean)
            continue
        last = row.pop("_last")
        ray_status = clean.get("ray_status")
        if _newer(row, clean):
            merged = {**clean, **{k: v for k, v in row.items() if v is not None}}
            merged["status"] = trial_status(ray_status, last) if last else clean.get("status", Status.PENDING)
            if merged["status"] == Status.RUNNING and clean.get("status") in (Status.EARLY_STOPPED, Status.FAILED):
                merged["status"] = clean["status"]  # the CSV knows Ray stopped it
        else:
            merged = {**row, **clean}
        merged["path"] = row["path"]
        out.append(merged)
    for trial_id, row in rows.items():  # folders the CSV doesn't know (CSV missing or stale)
        last = row.pop("_last")
        state = states.get(trial_id, {})
        ray_status = state.get("ray_status")
        if (Path(row["path"]) / "error.txt").is_file():
            ray_status = "ERROR"
        out.append({**row, "status": trial_status(ray_status, last), "ray_status": ray_status})
    known = {str(r["trial_id"]) for r in out}
    lost = 0
    for trial_id, state in states.items():  # trials Ray knows that have no folder
        if trial_id in known:
            continue
        if state.get("ray_status") in ("PENDING", "PAUSED", "RUNNING"):  # not started yet: no folder is normal
            row = {"trial_id": trial_id, **_sampled(state.get("config") or {})}
            out.append({**row, "status": Status.PENDING, "ray_status": state.get("ray_status")})
        else:
            lost += 1
    if lost:
        notes.append(f"{lost} finished trial(s) that Ray lists have no folder any more: left out")
    if csv is not None and len(csv_rows) < len(out):
        notes.append(
            f"{TRIALS_CSV} lists {len(csv_rows)} of {len(out)} trials (stale): the rest come from their folders"
        )

    trials = _tidy(out, meta.get("space") or {})
    curve_df = (
        pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["trial_id", "epoch", *CURVE_COLUMNS])
    )
    for col in (
        "val_accuracy",
        "val_loss",
        "train_loss",
        "train_accuracy",
        "peak_memory_mb",
        "epoch_seconds",
        "time_total_s",
        "epoch",
    ):
        curve_df[col] = pd.to_numeric(curve_df[col], errors="coerce")
    curve_df = curve_df.sort_values(["trial_id", "epoch"], kind="stable").reset_index(drop=True)
    return Experiment(path=folder, meta=meta, trials=trials, curves=curve_df, notes=notes)


def load_results(path: str | Path) -> pd.DataFrame:
    """One tidy row per trial of the experiment in ``path``.

    Columns: ``trial_id, status, ray_status``, the searched parameters (``memory_size,
    iteration_size, patch_size, lr``, ...), ``val_accuracy`` (last epoch),
    ``best_val_accuracy``, ``test_accuracy`` (after the last epoch), ``peak_memory_mb``,
    ``memory_kind``, ``feasible``, ``epochs``, ``time_total_s``, ``train_seconds``,
    ``images_per_s``, ``n_patches``, ``path`` (the trial's folder). ``status`` is one of
    completed, early-stopped, infeasible, nan-loss, out-of-memory, failed, running, pending.
    """
    return load_experiment(path).trials


def load_curves(path: str | Path) -> pd.DataFrame:
    """One row per trial and epoch: ``trial_id, epoch, val_accuracy, val_loss, train_loss, ...``."""
    return load_experiment(path).curves


def load_study(path: str | Path, name: str | None = None):
    """The Optuna study of an experiment, read from a private copy of ``optuna.journal`` (or ``None``).

    The copy keeps the experiment's journal untouched (no lock file, no writes) even
    while the search is appending to it; a half-written last line is ignored.
    """
    import optuna

    folder = Path(path)
    journal = folder / JOURNAL_FILE
    if not journal.is_file():
        return None
    if name is None:
        name = (_read_json(folder / EXPERIMENT_FILE).get("settings") or {}).get("name") or folder.name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="ips-report-") as tmp:
        copy = Path(tmp) / JOURNAL_FILE
        shutil.copyfile(journal, copy)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(copy)))
        names = optuna.get_all_study_names(storage)
        if not names:
            return None
        study = optuna.load_study(study_name=name if name in names else names[0], storage=storage)
        study.trials  # noqa: B018 - read everything now: the copy goes away with the folder
        return _in_memory(study)


def _in_memory(study):
    """A loaded study moved into in-memory storage, so it outlives the temporary journal copy."""
    import optuna

    copy = optuna.create_study(directions=study.directions, study_name=study.study_name)
    copy.add_trials(study.get_trials(deepcopy=False))
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    return copy
