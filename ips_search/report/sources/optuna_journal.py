"""The Optuna study of an experiment, read from a private copy of ``optuna.journal`` so it is never written to."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ips_search.experiment import EXPERIMENT_FILE, JOURNAL_FILE
from ips_search.report.sources.json_files import read_json


def load_study(path: str | Path, name: str | None = None):
    """The Optuna study of an experiment, read from a private copy of ``optuna.journal`` (or ``None``).

    See :func:`read_study`, which also says in words what could not be read.
    """
    return read_study(path, name)[0]


def read_study(path: str | Path, name: str | None = None) -> tuple[object | None, str | None]:
    """``(study, note)``: the Optuna study of an experiment (or ``None``) and one line on what was skipped.

    The study is read from a private copy of ``optuna.journal`` that keeps the experiment's journal untouched (no
    lock file, no writes) even while the search is appending to it. The copy holds only the journal's readable
    lines: a half-written last line (the search is writing it) is left out silently; a corrupt line elsewhere,
    which Optuna's reader refuses with a traceback, is left out too and counted in ``note``. A journal that still
    cannot be replayed gives ``None`` and a note, never an exception.
    """
    import optuna

    folder = Path(path)
    journal = folder / JOURNAL_FILE
    if not journal.is_file():
        return None, None
    if name is None:
        name = (read_json(folder / EXPERIMENT_FILE).get("settings") or {}).get("name") or folder.name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="ips-report-") as tmp:
        copy = Path(tmp) / JOURNAL_FILE
        try:
            skipped = _copy_readable_lines(journal, copy)
        except OSError as exc:
            return None, f"{JOURNAL_FILE} could not be read ({exc.strerror or exc}); no parameter importance"
        note = f"{JOURNAL_FILE}: skipped {skipped} unreadable line(s); the study was read without them"
        note = note if skipped else None
        try:
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(copy)))
            names = optuna.get_all_study_names(storage)
            if not names:
                return None, note
            study = optuna.load_study(study_name=name if name in names else names[0], storage=storage)
            return _in_memory(study), note  # read everything now: the copy goes away with the folder
        except Exception as exc:  # noqa: BLE001 - a damaged study costs the importance section, not the report
            why = f"{JOURNAL_FILE} could not be replayed ({type(exc).__name__}: {exc})"
            return None, f"{note}; {why}" if note else why


def _copy_readable_lines(journal: Path, copy: Path) -> int:
    """Copy the lines of ``journal`` that are whole JSON objects into ``copy``; the number of others skipped.

    A last line without its newline is being written by the search right now: it is left out but not counted.
    """
    skipped = 0
    with journal.open("rb") as src, copy.open("wb") as dst:
        for line in src:
            if not line.endswith(b"\n"):
                break
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError both
                ok = False
            if ok:
                dst.write(line)
            elif line.strip():
                skipped += 1
    return skipped


def _in_memory(study):
    """A loaded study moved into in-memory storage, so it outlives the temporary journal copy."""
    import optuna

    copy = optuna.create_study(directions=study.directions, study_name=study.study_name)
    copy.add_trials(study.get_trials(deepcopy=False))
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    return copy
