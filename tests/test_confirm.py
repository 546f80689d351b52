"""The confirm stage: the best configs retrained on every non-test slide with more seeds, their test mean, spread
and patient bootstrap interval; an older (validating) stage's figures still read and rank; resumable mid-stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from ips_search import run
from ips_search.experiment import (
    CONFIRM_CSV,
    CONFIRM_DIR,
    TRIALS_CSV,
    best,
    coerce,
    predictions_file,
    rank,
    summarize,
)


def _trials() -> pd.DataFrame:
    return coerce(
        pd.DataFrame(
            [
                dict(trial_id="a", status="completed", val_accuracy=0.90, test_accuracy=0.9, peak_memory_mb=10.0),
                dict(trial_id="b", status="completed", val_accuracy=0.88, test_accuracy=0.8, peak_memory_mb=10.0),
                dict(trial_id="c", status="completed", val_accuracy=0.95, test_accuracy=0.9, peak_memory_mb=10.0),
            ]
        )
    )


def test_an_older_validating_stage_counts_the_search_run_and_completed_confirm_runs_only():
    runs = pd.DataFrame(
        [
            dict(trial_id="r1", confirm_of="a", status="completed", val_accuracy=0.80, test_accuracy=0.7),
            dict(trial_id="r2", confirm_of="a", status="completed", val_accuracy=0.70, test_accuracy=0.7),
            dict(trial_id="r3", confirm_of="b", status="completed", val_accuracy=0.92, test_accuracy=0.9),
            dict(trial_id="r4", confirm_of="b", status="failed", val_accuracy=0.0, test_accuracy=None),
        ]
    )
    summary = summarize(_trials(), runs).set_index("trial_id")
    assert summary.loc["a", "confirm_runs"] == 3 and summary.loc["a", "confirm_val_mean"] == pytest.approx(0.8)
    assert summary.loc["a", "confirm_val_std"] == pytest.approx(0.1)  # sample standard deviation of .9, .8, .7
    assert summary.loc["b", "confirm_runs"] == 2 and summary.loc["b", "confirm_val_mean"] == pytest.approx(0.9)


def test_summary_of_refit_runs_is_their_test_scores_alone():
    runs = pd.DataFrame(
        [
            dict(trial_id="r1", confirm_of="a", status="completed", test_score=0.8),
            dict(trial_id="r2", confirm_of="a", status="completed", test_score=0.6),
            dict(trial_id="r3", confirm_of="a", status="failed", test_score=None),
        ]
    )
    summary = summarize(_trials(), runs).set_index("trial_id")
    assert summary.loc["a", "confirm_runs"] == 2 and summary.loc["a", "confirm_test_mean"] == pytest.approx(0.7)
    assert summary.loc["a", "confirm_test_std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert pd.isna(summary.loc["a", "confirm_val_mean"])  # no validation: the ranking stays the search's


def test_an_older_stage_ranks_the_winner_by_the_confirmed_mean():
    from ips_search.experiment import attach

    runs = pd.DataFrame(
        [
            dict(trial_id="r1", confirm_of="a", status="completed", val_accuracy=0.80, test_accuracy=0.7),
            dict(trial_id="r2", confirm_of="b", status="completed", val_accuracy=0.92, test_accuracy=0.9),
        ]
    )
    df = coerce(attach(_trials(), summarize(_trials(), runs)))
    assert best(df)["trial_id"] == "b"  # mean .90 beats a's .85; c (.95, one run, unconfirmed) comes after both


def _search(results_dir: Path, name: str) -> list[str]:
    return [
        "--space",
        "smoke",
        "--trials",
        "3",
        "--epochs",
        "1",
        "--confirm",
        "2",
        "--confirm-top",
        "2",
        "--concurrency",
        "1",
        "--results-dir",
        str(results_dir),
        "--name",
        name,
        "--no-dashboard",
    ]


@pytest.mark.parametrize(
    ("cpus_per_trial", "concurrency", "n_runs", "cluster_cpus", "expected"),
    [
        (1, 2, 1, 2, 2.0),  # one run after a 2-slot search: both CPUs, not one idle
        (1, 2, 2, 2, 1.0),  # two runs share the two slots
        (1, 2, 6, 2, 1.0),  # more runs than slots: they queue, one slot each
        (1, 4, 1, 2, 2.0),  # never more than the cluster has (a run asking more would wait forever)
        (2, 3, 2, 16, 3.0),
        (0.5, 2, 1, 2, 1.0),
    ],
)
def test_confirm_runs_share_the_search_slots(cpus_per_trial, concurrency, n_runs, cluster_cpus, expected):
    from ips_search.experiment import SearchSettings
    from ips_search.search.confirm import confirm_cpus

    settings = SearchSettings("x", "results", "default", cpus_per_trial=cpus_per_trial, concurrency=concurrency)
    assert confirm_cpus(settings, n_runs, cluster_cpus) == expected


@pytest.mark.ray
def test_confirm_stage_retrains_k_seeds_per_top_config_and_records_test_mean_std_and_interval(
    ray_cluster, results_dir, capsys
):
    assert run.main(_search(results_dir, "sure")) == 0
    folder = results_dir / "sure"
    runs = pd.read_csv(folder / CONFIRM_DIR / TRIALS_CSV, dtype={"trial_id": str, "confirm_of": str})
    assert len(runs) == 4 and runs.groupby("confirm_of").size().tolist() == [2, 2]
    assert sorted(runs["confirm_seed"]) == [1, 1, 2, 2]
    summary = pd.read_csv(folder / CONFIRM_CSV, dtype={"trial_id": str})
    assert set(summary["trial_id"]) == set(runs["confirm_of"])
    assert summary["confirm_test_ci_low"].notna().all() and summary["metric"].eq("accuracy").all()
    assert (summary["confirm_test_ci_low"] <= summary["confirm_test_mean"] + 1e-9).all()
    assert (summary["confirm_test_mean"] <= summary["confirm_test_ci_high"] + 1e-9).all()
    trials = coerce(pd.read_csv(folder / TRIALS_CSV, dtype={"trial_id": str}))
    confirmed = trials[trials["confirm_test_mean"].notna()]
    assert len(confirmed) == 2 and (confirmed["confirm_runs"] == 2).all()
    ranked_before = rank(trials.drop(columns=[c for c in trials if c.startswith("confirm_")]))["trial_id"].tolist()
    assert rank(trials)["trial_id"].tolist() == ranked_before  # test figures never reorder the search's ranking
    for path in runs["path"]:  # each run trained on every non-test slide and scored the test set once
        params = json.loads((Path(path) / "params.json").read_text())
        assert params["run"]["fixed"]["evaluation"]["refit"] is True
        assert predictions_file(path) is not None
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal")))
    study = optuna.load_study(study_name="sure", storage=storage)
    assert set(study.user_attrs["confirm"]) == set(summary["trial_id"])
    assert "retrained on every non-test slide with 2 seeds" in capsys.readouterr().out
