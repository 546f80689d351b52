"""The Optuna study of an experiment, read from a private copy of ``optuna.journal`` so it is never written to."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ips_search.experiment import EXPERIMENT_FILE, JOURNAL_FILE
from ips_search.report.sources.json_files import read_json


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
        name = (read_json(folder / EXPERIMENT_FILE).get("settings") or {}).get("name") or folder.name
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
