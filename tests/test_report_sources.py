"""The report's readers, one per source, and the merge of ``trials.csv``, trial folders and Ray's snapshot.

Experiments here are written by hand (a few JSON files and a CSV): no search runs, nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from ips_search.experiment import Status, write_experiment
from ips_search.report import load_experiment
from ips_search.report.merge import merge_trials
from ips_search.report.sources import (
    read_json_lines,
    read_ray_states,
    read_trial_folder,
    read_trials_csv,
    trial_folders,
)
from ips_search.report.sources.ray_state import RAY_VERSION, parse_ray_state

SPACE = {"search": {"patch_size": {}, "lr": {}, "memory_size_quantile": {}}}


def epoch(n: int, status: str = "running", **metrics: Any) -> dict[str, Any]:
    """One line of a trial's result.json."""
    row = {"training_iteration": n, "status": status, "val_accuracy": 0.1 * n, "peak_memory_mb": 100.0 + n}
    return (
        row
        | {"memory_size": 4, "iteration_size": 2, "n_patches": 16, "memory_kind": "cuda", "feasible": True}
        | (metrics)
    )


def write_trial(folder: Path, trial_id: str, epochs: list[dict[str, Any]], lr: float = 1e-3) -> Path:
    """A trial folder as Ray Tune leaves it: params.json and one result.json line per epoch."""
    path = folder / f"train_ips_{trial_id}_00000_lr={lr}"
    path.mkdir(parents=True)
    params = {"fixed": {"train": {"epochs": 2}}, "patch_size": 32, "lr": lr, "memory_size_quantile": 0.5}
    (path / "params.json").write_text(json.dumps(params))
    (path / "result.json").write_text("".join(json.dumps({"trial_id": trial_id, **e}) + "\n" for e in epochs))
    return path


def make_experiment(folder: Path, trials: dict[str, list[dict[str, Any]]], max_memory_mb: float | None = None) -> Path:
    """An experiment folder with ``experiment.json`` and one trial folder per entry of ``trials`` (no trials.csv)."""
    settings = {"name": folder.name, "results_dir": str(folder.parent), "space": "smoke", "trials": len(trials)}
    write_experiment(folder, settings | {"max_memory_mb": max_memory_mb, "epochs": 2}, SPACE)
    for i, (trial_id, epochs) in enumerate(trials.items()):
        write_trial(folder, trial_id, epochs, lr=10 ** -(2 + i))
    return folder


def ray_snapshot(*trials: tuple[str, str]) -> dict[str, Any]:
    """``experiment_state-*.json`` as Ray 2.60 writes it: each trial a JSON string beside its run metadata."""
    data = [
        [json.dumps({"trial_id": t, "status": s, "relative_logdir": f"train_ips_{t}", "config": {"lr": 0.01}}), "{}"]
        for t, s in trials
    ]
    return {"trial_data": data, "runner_data": {}, "stats": {}}


# -- Ray's snapshot ----------------------------------------------------------------------------------------------------
def test_ray_snapshot_of_the_version_it_names_is_read():
    assert RAY_VERSION == "2.60"
    states = parse_ray_state(ray_snapshot(("a1", "TERMINATED"), ("b2", "PENDING")))
    assert {t: s.ray_status for t, s in states.items()} == {"a1": "TERMINATED", "b2": "PENDING"}
    assert states["b2"].config == {"lr": 0.01} and states["b2"].relative_logdir == "train_ips_b2"


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"trials": []},
        {"trial_data": {"a1": {"status": "RUNNING"}}},  # a mapping, not a list of pairs
        {"trial_data": [["{not json"], [], "a1", [{"status": "RUNNING"}]]},  # torn, empty, a bare id, no trial_id
    ],
)
def test_ray_snapshot_of_another_shape_reads_as_unknown(doc):
    assert parse_ray_state(doc) == {}


def test_ray_snapshot_status_it_does_not_know_is_none(tmp_path):
    doc = ray_snapshot(("a1", "SOMETHING_NEW"))
    doc["trial_data"][0][0] = json.loads(doc["trial_data"][0][0]) | {"config": "pickled"}  # a dict, not a string
    states = parse_ray_state(doc)
    assert states["a1"].ray_status is None and states["a1"].config == {}
    (tmp_path / "experiment_state-1.json").write_text(json.dumps(ray_snapshot(("old", "RUNNING"))))
    (tmp_path / "experiment_state-2.json").write_text("{torn")  # newer and unreadable: the older one is used
    assert list(read_ray_states(tmp_path)) == ["old"]
    assert read_ray_states(tmp_path / "missing") == {}


# -- trial folders and trials.csv --------------------------------------------------------------------------------------
def test_trial_folder_reads_params_and_epochs_and_skips_a_torn_line(tmp_path):
    path = write_trial(tmp_path, "abc12", [epoch(1), epoch(2, "completed", test_accuracy=0.5)])
    with (path / "result.json").open("a") as f:
        f.write('{"training_iteration": 3, "val_acc')  # the trial died mid-write
    assert len(read_json_lines(path / "result.json")) == 2
    trial = read_trial_folder(path)
    assert trial.trial_id == "abc12" and trial.readable and trial.has_params
    assert trial.row["epochs"] == 2 and trial.row["lr"] == 1e-3 and trial.row["memory_size"] == 4
    assert trial.row["val_accuracy_best"] == pytest.approx(0.2) and "status" not in trial.row
    assert "memory_size_quantile" not in trial.row and "fixed" not in trial.row
    assert list(trial.curve["epoch"]) == [1, 2] and list(trial.curve["status"]) == ["running", "completed"]
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "params.json").write_text("{}")  # the report's own folder is not a trial
    empty = tmp_path / "train_ips_zz9_0"
    empty.mkdir()
    (empty / "result.json").write_text("")
    assert trial_folders(tmp_path) == [path, empty]
    unreadable = read_trial_folder(empty)
    assert unreadable.trial_id == "zz9" and not unreadable.readable


def test_trials_csv_missing_torn_or_foreign_says_why(tmp_path):
    assert read_trials_csv(tmp_path) == (None, "trials.csv is missing: trials were rebuilt from their folders")
    (tmp_path / "trials.csv").write_text("name,score\nx,1\n")
    df, why = read_trials_csv(tmp_path)
    assert df is None and "no trial_id column" in why
    (tmp_path / "trials.csv").write_text("trial_id,status\n007,completed\n")
    df, why = read_trials_csv(tmp_path)
    assert why is None and list(df["trial_id"]) == ["007"]  # ids stay text


# -- the merge ---------------------------------------------------------------------------------------------------------
def test_newer_folder_wins_over_a_stale_csv_row_but_a_stopped_trial_stays_stopped(tmp_path):
    folder = make_experiment(tmp_path / "exp", {"aaa": [epoch(1), epoch(2)], "bbb": [epoch(1), epoch(2)]})
    csv = pd.DataFrame(
        [
            {"trial_id": "aaa", "status": "running", "ray_status": "RUNNING", "epochs": 1, "val_accuracy": 0.01},
            {"trial_id": "bbb", "status": "early-stopped", "ray_status": "TERMINATED", "epochs": 1},
        ]
    )
    folders = [read_trial_folder(p) for p in trial_folders(folder)]
    df, notes = merge_trials(csv, folders, {}, SPACE)
    row = df.set_index("trial_id")
    assert row.loc["aaa", "epochs"] == 2 and row.loc["aaa", "val_accuracy"] == pytest.approx(0.2)  # the folder's
    assert row.loc["aaa", "status"] == Status.RUNNING
    assert row.loc["bbb", "status"] == Status.EARLY_STOPPED  # Ray stopped it after its last report
    assert notes == []
    params = ["memory_size", "iteration_size", "patch_size", "lr"]  # M, I, P, lr first; the quantile is not shown
    assert list(df.columns[:7]) == ["trial_id", "status", "ray_status", *params]


def test_without_trials_csv_ray_snapshot_and_error_file_give_the_status(tmp_path):
    folder = make_experiment(
        tmp_path / "exp",
        {"done1": [epoch(1), epoch(2, "completed")], "stop2": [epoch(1)], "err3": [epoch(1)], "run4": [epoch(1)]},
    )
    (next(folder.glob("train_ips_err3_*")) / "error.txt").write_text("Traceback ...")
    snapshot = ray_snapshot(
        ("done1", "TERMINATED"),
        ("stop2", "TERMINATED"),
        ("err3", "RUNNING"),
        ("run4", "RUNNING"),
        ("new5", "PENDING"),  # not started: no folder yet
        ("gone6", "TERMINATED"),  # finished, folder removed
    )
    (folder / "experiment_state-2026.json").write_text(json.dumps(snapshot))
    exp = load_experiment(folder)
    status = exp.trials.set_index("trial_id")["status"].to_dict()
    assert status == {
        "done1": Status.COMPLETED,
        "stop2": Status.EARLY_STOPPED,
        "err3": Status.FAILED,
        "run4": Status.RUNNING,
        "new5": Status.PENDING,
    }
    assert list(exp.trials["trial_id"])[0] == "done1"  # completed first
    assert exp.trials.set_index("trial_id").loc["new5", "lr"] == 0.01  # its sampled config, from Ray's state
    assert any("trials.csv is missing" in n for n in exp.notes)
    assert any("1 finished trial(s) that Ray lists have no folder" in n for n in exp.notes)
    assert set(exp.curves["trial_id"]) == {"done1", "stop2", "err3", "run4"}


def test_snapshot_of_another_ray_version_leaves_trials_to_their_folders(tmp_path):
    folder = make_experiment(tmp_path / "exp", {"done1": [epoch(1), epoch(2, "completed")], "run2": [epoch(1)]})
    (folder / "experiment_state-2026.json").write_text(json.dumps({"trials": {"run2": "RUNNING"}}))
    exp = load_experiment(folder)
    status = exp.trials.set_index("trial_id")
    assert status.loc["done1", "status"] == Status.COMPLETED  # its own report says so
    assert status.loc["run2", "status"] == Status.RUNNING and pd.isna(status.loc["run2", "ray_status"])  # unknown
