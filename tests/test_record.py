"""The trial record is one contract: the search's ``trials.csv`` writer and the report's trial-folder reader build the
same row of the same trial, and an experiment written under older column names still loads under today's.

Trials here are written by hand (a stand-in for Ray's trial object, a few JSON files and a CSV): no search runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from ips_search import space
from ips_search.experiment import (
    COLUMN_NAMES,
    IDENTITY,
    QUANTILE_SUFFIX,
    RENAMED,
    RUNG_METRICS,
    TRIALS_CSV,
    EpochReport,
    Status,
    coerce,
    renamed,
    sampled,
    write_experiment,
)
from ips_search.experiment.confirmation import RUN
from ips_search.report import load_experiment, merge
from ips_search.report import sources as report_sources
from ips_search.report.sources import read_trial_folder, read_trials_csv
from ips_search.search.results import trial_row, write_trials_csv

CONFIG = {
    "fixed": {"train": {"epochs": 3}},  # the space's fixed sections
    "max_memory_mb": 500.0,  # the budget
    "patch_size": 32,
    "memory_size_quantile": 0.25,  # M is used as derived from N: the row takes it from the result
    "iteration_size_quantile": 0.5,
    "lr": 1.2e-3,
    "optimizer": "adamw",
}


def reports(epochs: int, trial_id: str = "abc12") -> list[dict[str, Any]]:
    """What the trainable hands ``tune.report`` each epoch, with the keys Ray adds, as ``result.json`` holds them."""
    accuracies = [0.5, 0.8, 0.7][:epochs]
    return [
        {
            "trial_id": trial_id,
            "training_iteration": i + 1,
            "time_total_s": 10.0 * (i + 1),
            **EpochReport(
                status=Status.COMPLETED if i == 2 else Status.RUNNING,
                epoch=i + 1,
                val_accuracy=acc,
                val_accuracy_best=max(accuracies[: i + 1]),
                peak_memory_mb=120.0,
                memory_kind="cuda",
                feasible=True,
                memory_size=4,
                iteration_size=2,
                patch_size=32,
                n_patches=16,
                test_accuracy=0.75 if i == 2 else None,
            ).to_metrics(),
        }
        for i, acc in enumerate(accuracies)
    ]


def write_trial(folder: Path, config: dict[str, Any], results: list[dict[str, Any]], trial_id: str = "abc12") -> Path:
    """A trial folder as Ray Tune leaves it: ``params.json`` (the trial's config) and one ``result.json`` line each."""
    path = folder / f"train_ips_{trial_id}_00000"
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(config))
    (path / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    return path


def ray_trial(path: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> SimpleNamespace:
    """What ``trial_row`` reads of a ``ray.tune.experiment.Trial``."""
    return SimpleNamespace(
        trial_id=results[-1]["trial_id"],
        status="TERMINATED",
        config=config,
        last_result=results[-1],
        metric_analysis={"val_accuracy": {"max": max(r["val_accuracy"] for r in results)}},
        path=str(path),
    )


@pytest.mark.parametrize("wrapped", [False, True], ids=["search-trial", "confirm-run"])
def test_the_search_writer_and_the_report_reader_give_a_trial_the_same_row(tmp_path, wrapped):
    results = reports(3)
    path = write_trial(tmp_path, CONFIG, results)
    trial = ray_trial(path, {RUN: CONFIG} if wrapped else CONFIG, results)
    written, read = trial_row(trial), read_trial_folder(path).row
    assert {k: v for k, v in written.items() if k not in ("status", "ray_status")} == read
    params = {k: read[k] for k in read if k not in COLUMN_NAMES}
    assert params == {"patch_size": 32, "lr": 1.2e-3, "optimizer": "adamw", "memory_size": 4, "iteration_size": 2}
    assert read["val_accuracy_best"] == pytest.approx(0.8)  # the best epoch, not the last

    write_trials_csv([trial], tmp_path / TRIALS_CSV)  # and back from the CSV, as the report reads it
    csv, why = read_trials_csv(tmp_path)
    assert why is None and csv.iloc[0][list(params)].to_dict() == params


def test_the_parameter_filter_leaves_out_what_was_not_sampled():
    assert sampled(CONFIG) == {"patch_size": 32, "lr": 1.2e-3, "optimizer": "adamw"}
    assert sampled({"nested": {"a": 1}, "listed": [1, 2], "lr": 0.1}) == {"lr": 0.1}


def test_the_record_has_one_name_per_column_and_one_definition_of_each_rule():
    assert "val_accuracy_best" in COLUMN_NAMES and "val_accuracy_best" in RUNG_METRICS  # as reported, as compared
    assert not set(RENAMED) & set(COLUMN_NAMES) and set(RENAMED.values()) <= set(COLUMN_NAMES)
    assert COLUMN_NAMES[: len(IDENTITY)] == IDENTITY and merge.IDENTITY is IDENTITY
    assert report_sources.sampled is sampled and space.QUANTILE_SUFFIX is QUANTILE_SUFFIX


def old_experiment(folder: Path, with_folder: bool) -> Path:
    """An experiment as an older version wrote it: ``trials.csv`` names the best epoch's accuracy
    ``best_val_accuracy``, and (``with_folder``) the trial's ``result.json`` has no ``val_accuracy_best``."""
    write_experiment(folder, {"name": folder.name, "results_dir": str(folder.parent), "space": "smoke"}, {})
    results = [{k: v for k, v in r.items() if k != "val_accuracy_best"} for r in reports(3)]
    if with_folder:
        write_trial(folder, CONFIG, results)
    row = {"trial_id": "abc12", "status": "completed", "ray_status": "TERMINATED", "lr": 1.2e-3}
    row |= {"val_accuracy": 0.7, "best_val_accuracy": 0.8, "epochs": 3, "path": str(folder / "gone")}
    pd.DataFrame([row]).to_csv(folder / TRIALS_CSV, index=False)
    return folder


@pytest.mark.parametrize("with_folder", [False, True], ids=["csv-only", "csv-and-folder"])
def test_an_older_experiment_loads_under_todays_column_name(tmp_path, with_folder):
    folder = old_experiment(tmp_path / "old", with_folder)
    trials = load_experiment(folder).trials  # the report
    assert "best_val_accuracy" not in trials and trials["val_accuracy_best"].tolist() == [pytest.approx(0.8)]
    df = coerce(pd.read_csv(folder / TRIALS_CSV, dtype={"trial_id": str}))  # the search's readers (resume, confirm)
    assert "best_val_accuracy" not in df and df["val_accuracy_best"].tolist() == [pytest.approx(0.8)]


def test_an_older_result_json_gives_the_best_epoch_from_its_lines(tmp_path):
    results = [{k: v for k, v in r.items() if k != "val_accuracy_best"} for r in reports(2)]
    assert read_trial_folder(write_trial(tmp_path, CONFIG, results)).row["val_accuracy_best"] == pytest.approx(0.8)


def test_rows_of_both_versions_keep_todays_value_and_fill_the_gaps_from_the_old():
    df = pd.DataFrame({"trial_id": ["new", "old"], "val_accuracy_best": [0.9, None], "best_val_accuracy": [0.1, 0.8]})
    out = renamed(df)
    assert list(out.columns) == ["trial_id", "val_accuracy_best"] and out["val_accuracy_best"].tolist() == [0.9, 0.8]
    assert "best_val_accuracy" in df  # the caller's frame is left as it is
