"""A cross-validated search end to end: K folds per trial on splits.csv, their mean and spread recorded, the same
splits kept by a resume; bad folds refused in one line before anything runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ips_search import run
from ips_search.experiment import (
    EXPERIMENT_FILE,
    SPLITS_FILE,
    TRIALS_CSV,
    coerce,
    predictions_file,
    settings_from_saved,
)
from ips_search.search.pruner import FoldPruner
from ips_search.search.trainable import make_trainable
from ips_search.search.tuner import restore_tuner

pytestmark = pytest.mark.ray


def _search(results_dir, name: str, trials: int = 2) -> list[str]:
    return [
        "--space",
        "smoke",
        "--trials",
        str(trials),
        "--epochs",
        "1",
        "--folds",
        "3",
        "--metric",
        "balanced_accuracy",
        "--concurrency",
        "1",
        "--results-dir",
        str(results_dir),
        "--name",
        name,
        "--no-dashboard",
    ]


def test_each_trial_trains_every_fold_and_reports_their_mean_and_spread(ray_cluster, results_dir):
    assert run.main(_search(results_dir, "cv")) == 0
    folder = results_dir / "cv"
    table = pd.read_csv(folder / SPLITS_FILE)
    assert list(table.columns) == ["slide", "patient", "label", "split", "fold"]
    assert sorted(table["fold"].dropna().unique()) == [0, 1, 2]
    assert table.loc[table["split"] == "test", "fold"].isna().all()
    saved = json.loads((folder / EXPERIMENT_FILE).read_text())
    assert saved["space"]["evaluation"]["splits"] == str(folder / SPLITS_FILE)
    trials = coerce(pd.read_csv(folder / TRIALS_CSV, dtype={"trial_id": str}))
    assert len(trials) == 2 and (trials["status"] == "completed").all()
    for row in trials.to_dict("records"):
        folds = [row[f"val_score_fold{k}"] for k in range(3)]
        assert row["val_score_mean"] == pytest.approx(np.mean(folds))
        assert row["val_score_std"] == pytest.approx(np.std(folds, ddof=1))
        assert row["metric"] == "balanced_accuracy" and row["folds"] == 3 and row["epochs"] == 3  # 3 folds x 1
        assert row["predicted_gradient_mb"] > 0  # the part of the predicted peak M moves, for the report's plot
        tests = [row[f"test_score_fold{k}"] for k in range(3)]  # each fold's model scored test once, at its end
        assert row["test_score"] == pytest.approx(np.mean(tests)) and all(0 <= t <= 1 for t in tests)
        predictions = pd.read_csv(predictions_file(row["path"]))
        assert sorted(predictions["slide"]) == sorted(table.loc[table["split"] == "test", "slide"])
        lines = [json.loads(x) for x in open(f"{row['path']}/result.json") if x.strip()]
        assert [r["fold"] for r in lines] == [0, 1, 2] and [r["folds_done"] for r in lines] == [1, 2, 3]
        assert all("test_score" not in r for r in lines[:-1])  # the mean, once, at the end
        assert [len([k for k in r if k.startswith("test_score_fold")]) for r in lines] == [1, 2, 3]

    before = (folder / SPLITS_FILE).read_bytes()
    resumed = ["--resume", "cv", "--results-dir", str(results_dir), "--trials", "3", "--no-dashboard"]
    assert run.main(resumed) == 0
    assert (folder / SPLITS_FILE).read_bytes() == before  # an extended search keeps every trial on the same folds
    trials = pd.read_csv(folder / TRIALS_CSV, dtype={"trial_id": str})
    assert len(trials) == 3 and trials["val_score_fold2"].notna().all()

    # a resume prunes with this code's pruner, made from the saved settings, never the one pickled at the start
    saved = settings_from_saved(json.loads((folder / EXPERIMENT_FILE).read_text())["settings"])
    wider = dataclasses.replace(saved, prune_interval=saved.prune_interval + 4)
    stopper = restore_tuner(wider, make_trainable(wider))._local_tuner.get_run_config().stop
    assert isinstance(stopper, FoldPruner) and stopper.interval == wider.prune_interval and not stopper.curves


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--folds", "500"], "fewer than evaluation.folds = 500"),
        (["--metric", "f1"], "invalid choice"),
    ],
)
def test_bad_folds_are_one_line_and_exit_2_before_anything_runs(results_dir, flags, message):
    cmd = [sys.executable, "-m", "ips_search.run", "--space", "smoke", "--results-dir", str(results_dir)]
    out = subprocess.run([*cmd, "--name", "bad", *flags, "--no-dashboard"], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 or message == "invalid choice"
    assert not (results_dir / "bad").exists()  # refused before the experiment folder was made
