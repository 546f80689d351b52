"""The files of an experiment folder, and ``experiment.json``: what says a folder is ours and how it was run.

``results/<name>/`` holds Ray Tune's experiment folder (one ``train_ips_<id>/`` per trial with ``params.json``,
``result.json`` and ``checkpoint_*/checkpoint.pt``), ``experiment.json`` (ours: settings and space),
``trials.csv``, ``optuna.journal`` and ``search.log`` (Ray's console output); with a confirm stage, ``confirm/``
(its Tune experiment and ``trials.csv``) and ``confirm.csv``. ``search.lock`` is held (``flock``) by the search that
runs in the folder, so a second one is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
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
SPLITS_FILE = "splits.csv"  # slide,patient,label,split,fold: the test set and folds every trial of a search uses
# a trial's test-set probabilities (slide,patient,task,label,p0,p1,..), saved in its last checkpoint: Ray persists
# checkpoints to the trial folder reliably, where files written beside them are synced only now and then
PREDICTIONS_FILE = "test_predictions.csv"
REFERENCE_DIR = "reference"  # the full-bag (M = N) reference run, a Tune experiment of its own
REPORT_DIR = "report"
TRAINABLE_NAME = "train_ips"  # trial folders are train_ips_<trial id>
CONFIRM_DIR = "confirm"  # the confirm stage's own Tune experiment (its trials.csv inside)
CONFIRM_CSV = "confirm.csv"  # per confirmed config: runs, mean and standard deviation
LOCK_FILE = "search.lock"  # flock'ed by the search running in the folder
# the files Ray unpickles when it restores an experiment (its .json state files are cloudpickle inside)
RAY_PICKLES = ("**/*.pkl", "experiment_state-*.json", "search_gen_state-*.json")


def predictions_file(trial_dir: str | os.PathLike[str]) -> Path | None:
    """A trial's :data:`PREDICTIONS_FILE`: in its latest checkpoint that has one (or in the trial folder itself);
    None when it has none (a trial that never finished, or one from before the file existed)."""
    folder = Path(trial_dir)
    found = sorted(folder.glob(f"checkpoint_*/{PREDICTIONS_FILE}"), key=lambda p: p.parent.name)
    if found:
        return found[-1]
    return folder / PREDICTIONS_FILE if (folder / PREDICTIONS_FILE).is_file() else None


def splits_file(folder: str | os.PathLike[str]) -> Path | None:
    """An experiment folder's own :data:`SPLITS_FILE`, or None when it has none. A copied or moved experiment's saved
    configs name the splits file of the folder the search started in; its runs read this one instead."""
    path = Path(folder) / SPLITS_FILE
    return path if path.is_file() else None


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


def find_experiment(results_dir: Path, name: str) -> Path | None:
    """The folder ``--resume NAME`` means: ``results_dir/NAME``, else NAME itself when it is the path of a folder
    holding ``experiment.json`` (a copied or moved experiment); None when neither exists."""
    if (results_dir / name).is_dir():
        return results_dir / name
    path = Path(name).expanduser()
    if path.is_dir() and (path / EXPERIMENT_FILE).is_file():
        return path.resolve()
    return None


@contextmanager
def experiment_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold ``folder/search.lock`` while a search runs there; a second search of the same folder is refused.

    ``flock`` is released by the kernel when the process ends however it ends, so a killed search leaves no stale
    lock to clean up (the file stays, unlocked: removing it would let two searches lock two different files).
    """
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot create {path} ({exc.strerror}); fix the folder's permissions or free space"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"experiment {name!r} is already being searched by another process (it holds {path}); wait for that "
                "search to finish, or stop it (Ctrl-C in its terminal), then run this again"
            ) from None
        yield
    finally:
        os.close(fd)


def check_trusted(folder: Path, uid: int | None = None) -> None:
    """Refuse to resume from a folder another user could have written to: Ray unpickles its state files
    (``RAY_PICKLES``), and unpickling a file runs whatever code its writer put in it.

    The folder, every folder inside it and each of those files must belong to the user running the search
    (``uid``, default this process's) and be writable by no one else (no group/other write bit).
    """
    uid = os.getuid() if uid is None else uid
    paths = [folder, *(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]
    paths += [p for pattern in RAY_PICKLES for p in sorted(folder.glob(pattern))]
    for path in paths:
        try:
            info = path.stat()  # follows a link: what Ray would read is what must be ours
        except OSError as exc:
            raise ConfigError(f"cannot read {path} ({exc.strerror}); fix its permissions, then resume") from None
        why = "resuming unpickles Ray's state files, which runs any code they hold"
        target = path.resolve() if path.is_symlink() else path
        shown = f"{path} (a link to {target})" if target != path else str(path)
        if info.st_uid != uid:
            raise ConfigError(
                f"{shown} belongs to another user (uid {info.st_uid}, you are {uid}); {why}: if you trust it, copy "
                f"the experiment into a folder of your own (cp -rL) or `chown -R` it, then resume that"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            fix = f"`chmod -R go-w {folder}`" if target == path else f"`chmod go-w {target}`"
            raise ConfigError(
                f"{shown} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}); {why}: if you trust "
                f"it, {fix}, then resume"
            )


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
