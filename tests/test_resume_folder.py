"""``--resume`` of a copied, renamed or moved experiment folder: the search writes only into the folder it was given.

Ray's saved state (``tuner.pkl``, the searcher's state) names the folder the experiment was started in: its Optuna
journal, its ``trials.csv`` callback and the place new trials go. A resume of a copy must not follow those names back
to the original, which is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from ray_snapshot import start_driver, trial_statuses

from ips_search import run
from ips_search.experiment import predictions_file

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
    newest = json.loads((Path(df["path"].iloc[-1]) / "params.json").read_text())
    assert newest["fixed"]["evaluation"]["splits"] == str(folder.resolve() / "splits.csv")  # not the original's


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


def kill_during_confirm(cluster, results: Path, name: str) -> set[str]:
    """A search (2 trials, then 3 confirm runs one at a time) killed once its first confirm run finished; the ids of
    the confirm runs that finished."""
    argv = ["--space", "smoke", "--trials", "2", "--epochs", "1", "--confirm", "3", "--confirm-top", "1"]
    argv += ["--concurrency", "1", "--no-reference", "--results-dir", str(results), "--name", name, "--no-dashboard"]
    log = results.parent / f"{name}.log"
    driver = start_driver(cluster, argv, log)
    csv = results / name / "confirm" / "trials.csv"
    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None:
        if csv.exists() and (pd.read_csv(csv)["status"] == "completed").sum() >= 1:
            break
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert csv.exists(), log.read_text()[-3000:]
    runs = pd.read_csv(csv, dtype={"trial_id": str})
    done = set(runs.loc[runs["status"] == "completed", "trial_id"])
    assert 1 <= len(done) < 3, "the confirm stage must be killed unfinished"
    return done


def check_confirmed_in(folder: Path, kept: set[str]) -> None:
    """``folder``'s confirm stage finished there: all 3 runs inside it, the ones ``kept`` not trained again, its
    interval bootstrapped from the predictions inside it."""
    stage = (folder / "confirm").resolve()
    runs = pd.read_csv(folder / "confirm" / "trials.csv", dtype={"trial_id": str})
    assert len(runs) == 3 and (runs["status"] == "completed").all(), runs
    assert kept <= set(runs["trial_id"])
    assert all(Path(p).parent == stage and predictions_file(p) is not None for p in runs["path"]), list(runs["path"])
    for path in runs.loc[runs["trial_id"].isin(kept), "path"]:
        lines = [json.loads(x) for x in (Path(path) / "result.json").read_text().splitlines() if x.strip()]
        assert [r["training_iteration"] for r in lines] == [1], "a finished confirm run ran again"
    for path in runs.loc[~runs["trial_id"].isin(kept), "path"]:  # the runs started here read this folder's splits
        splits = json.loads((Path(path) / "params.json").read_text())["run"]["fixed"]["evaluation"]["splits"]
        assert Path(splits).resolve() == (folder / "splits.csv").resolve()
    summary = pd.read_csv(folder / "confirm.csv")
    assert summary["confirm_runs"].tolist() == [3] and summary["confirm_test_ci_low"].notna().all()


def test_a_search_killed_during_its_confirm_stage_finishes_it_in_place_in_a_copy_and_when_moved(
    ray_cluster, tmp_path, capsys
):
    """An unfinished confirm stage resumed in a copy (its original still there), in place, and in a moved
    experiment (its original gone): its finished runs are kept, the rest run in the resumed folder, and no other
    folder is written."""
    results = tmp_path / "results"
    kept = kill_during_confirm(ray_cluster, results, "halt")
    original = results / "halt"
    shutil.copytree(original, results / "copy")
    shutil.copytree(original, results / "moved")
    before = tree(original)
    assert run.main(["--resume", "copy", "--results-dir", str(results), "--no-dashboard"]) == 0, capsys.readouterr()
    assert tree(original) == before
    check_confirmed_in(results / "copy", kept)

    assert run.main(["--resume", "halt", "--results-dir", str(results), "--no-dashboard"]) == 0, capsys.readouterr()
    check_confirmed_in(original, kept)
    assert (original / "confirm.csv").is_file()

    after = tree(original)
    away = tmp_path / "away"
    original.rename(away)  # the moved copy's saved state names a folder that no longer exists
    assert run.main(["--resume", "moved", "--results-dir", str(results), "--no-dashboard"]) == 0, capsys.readouterr()
    assert not original.exists() and tree(away) == after
    check_confirmed_in(results / "moved", kept)


def test_resume_of_a_moved_folder_finishes_its_unfinished_trials_there(ray_cluster, tmp_path, capsys):
    """A search killed while Ray's snapshot holds an unfinished trial, its folder then moved (the original gone):
    the restored trial, whose saved config names the original's ``splits.csv``, trains on the moved folder's."""
    results = tmp_path / "results"
    argv = ["--space", "smoke", "--trials", "2", "--epochs", "3", "--concurrency", "1", "--no-reference"]
    argv += ["--results-dir", str(results), "--name", "halt", "--no-dashboard"]
    log = tmp_path / "halt.log"
    driver = start_driver(ray_cluster, argv, log)
    folder = results / "halt"
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if any(status != "TERMINATED" for status in trial_statuses(folder).values()):
            break
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    unfinished = {t for t, status in trial_statuses(folder).items() if status != "TERMINATED"}
    assert unfinished, log.read_text()[-3000:]

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    folder.rename(moved)
    assert run.main(["--resume", str(moved), "--no-dashboard"]) == 0, capsys.readouterr()
    df = pd.read_csv(moved / "trials.csv", dtype={"trial_id": str})
    assert len(df) == 2 and (df["status"] == "completed").all(), df[["trial_id", "status"]]
    assert unfinished <= set(df["trial_id"])
    assert all(Path(p).parent == moved.resolve() for p in df["path"]), list(df["path"])
    assert not folder.exists()
