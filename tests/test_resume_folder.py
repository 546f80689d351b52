"""``--resume`` of a copied, renamed or moved experiment folder: the search writes only into the folder it was given.

Ray's saved state (``tuner.pkl``, the searcher's state) names the folder the experiment was started in: its Optuna
journal, its ``trials.csv`` callback and the place new trials go. A resume of a copy must not follow those names back
to the original, which is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest

from ips_search import run

pytestmark = pytest.mark.ray


def tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its content hash and modification time (a rewrite with equal bytes shows too)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def study_trials(folder: Path) -> int:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal")))
    (name,) = optuna.get_all_study_names(storage)
    return len(optuna.load_study(study_name=name, storage=storage).trials)


@pytest.fixture(scope="module")
def original(ray_cluster, tmp_path_factory) -> Path:
    """A finished 2-trial smoke search, 1 epoch each."""
    results = tmp_path_factory.mktemp("resume-folder") / "results"
    argv = ["--space", "smoke", "--trials", "2", "--epochs", "1", "--results-dir", str(results), "--name", "orig"]
    assert run.main([*argv, "--no-dashboard"]) == 0
    return results / "orig"


def check_extended_in(folder: Path, trials: int) -> None:
    """``folder`` holds all ``trials``, each trial folder inside it, and names itself in ``experiment.json``."""
    df = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    assert len(df) == trials, df
    assert all(Path(p).parent == folder.resolve() for p in df["path"]), list(df["path"])
    assert all((Path(p) / "result.json").is_file() for p in df["path"])
    assert study_trials(folder) == trials
    saved = json.loads((folder / "experiment.json").read_text())["settings"]
    assert saved["name"] == folder.name and saved["trials"] == trials
    assert Path(saved["results_dir"]).resolve() == folder.parent.resolve()


def test_resume_of_a_copy_by_name_writes_only_into_the_copy(original, capsys):
    results = original.parent
    copy = results / "copy"
    shutil.copytree(original, copy)
    before = tree(original)
    argv = ["--resume", "copy", "--trials", "3", "--results-dir", str(results), "--no-dashboard"]
    assert run.main(argv) == 0, capsys.readouterr().err
    assert tree(original) == before
    check_extended_in(copy, 3)
    assert study_trials(original) == 2


def test_resume_by_path_of_a_moved_folder_writes_only_there(original, tmp_path, monkeypatch, capsys):
    """Resumed by path twice: a copy of the original, then that copy moved away (its saved state now names a
    folder that no longer exists, which must not come back)."""
    before = tree(original)
    monkeypatch.chdir(tmp_path)  # --results-dir keeps its default, "results": a path resume must not create it
    first = tmp_path / "first"
    shutil.copytree(original, first)
    assert run.main(["--resume", str(first), "--trials", "3", "--no-dashboard"]) == 0, capsys.readouterr().err
    check_extended_in(first, 3)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    first.rename(moved)
    assert run.main(["--resume", str(moved), "--trials", "4", "--no-dashboard"]) == 0, capsys.readouterr().err
    check_extended_in(moved, 4)
    assert not first.exists()
    assert tree(original) == before
    assert not (tmp_path / "results").exists()
