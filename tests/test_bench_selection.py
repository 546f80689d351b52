"""The selection benchmark's generated cohort (benchmarks/bench_selection.py) at a tiny size: patients whole, labels
balanced as asked, the weak signal and the patient likeness present, and readable as a features dataset."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from repo_scripts import load_script
from sklearn.metrics import roc_auc_score

from ips_search.config import DataConfig
from ips_search.data import build_datasets
from ips_search.space import load_space

N_PATIENTS = 20


def _bench():
    return load_script("benchmarks/bench_selection.py")


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def cohort(bench, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("cohort")
    return root, bench.make_cohort(root, n_patients=N_PATIENTS, n_patches=(60, 100), seed=3)


def _features(root: Path, slide: str) -> np.ndarray:
    with h5py.File(root / f"{slide}.h5", "r") as f:
        assert f["coords"].shape == (f["features"].shape[0], 2)
        assert f["features"].dtype == np.float32
        return f["features"][:]


def test_patients_are_whole_and_labels_balanced(cohort):
    root, table = cohort
    manifest = pd.read_csv(root / "labels.csv")
    assert list(manifest.columns) == ["slide", "label", "patient", "split"]
    assert list(pd.read_csv(root / "labels-no-patient.csv").columns) == ["slide", "label", "split"]
    per_patient = manifest.groupby("patient")
    assert per_patient["label"].nunique().max() == 1 and per_patient["split"].nunique().max() == 1
    assert per_patient.size().between(2, 4).all() and manifest["patient"].nunique() == N_PATIENTS
    assert per_patient["label"].first().sum() == round(0.35 * N_PATIENTS)
    for split in ("train", "val", "test"):  # stratified by patient: every split holds both classes
        assert set(manifest.loc[manifest["split"] == split, "label"]) == {0, 1}
    assert manifest["split"].eq("test").sum() >= len(manifest) // 5


def test_weak_signal_in_a_few_patches_of_positive_slides(cohort):
    root, table = cohort
    positive = table["label"] == 1
    assert table.loc[positive, "signal"].between(8, 16).all() and (table.loc[~positive, "signal"] == 0).all()
    # the farthest patch from the slide's median patch finds the shifted ones; a slide's mean patch does not
    farthest, mean_norm = [], []
    for slide in table["slide"]:
        x = _features(root, slide)  # (N, D)
        assert x.shape[1] == 32 and 60 <= len(x) <= 100
        farthest.append(np.linalg.norm(x - np.median(x, axis=0), axis=1).max())
        mean_norm.append(np.linalg.norm(x.mean(axis=0)))
    assert roc_auc_score(table["label"], farthest) > 0.95
    assert roc_auc_score(table["label"], mean_norm) < 0.9


def test_slides_of_one_patient_look_alike(cohort):
    root, table = cohort
    means = np.stack([_features(root, s).mean(axis=0) for s in table["slide"]])  # (slides, D)
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    same = table["patient"].to_numpy()[:, None] == table["patient"].to_numpy()[None]
    off_diagonal = ~np.eye(len(table), dtype=bool)
    assert dist[same & off_diagonal].mean() < 0.7 * dist[~same].mean()


def test_manifest_reads_as_a_patient_level_features_dataset(bench, cohort, tmp_path):
    root, table = cohort
    splits = build_datasets(DataConfig(dataset="features", root=str(root)))
    by_slide = table.set_index("slide")
    for part, name in ((splits.train, "train"), (splits.val, "val"), (splits.test, "test")):
        assert list(part.patients) == list(by_slide.loc[list(part.item_ids), "patient"])
        assert set(by_slide.loc[list(part.item_ids), "split"]) == {name}
    (tmp_path / "cohort").symlink_to(root)
    space = load_space(str(bench.write_space(tmp_path, "labels.csv", epochs=2)))
    assert space.params["memory_size"].low == 2 and space.fixed["data"]["manifest"].endswith("labels.csv")


def test_the_verdicts_pair_spearman_by_seed_and_skip_a_search_whose_trials_all_tie(bench):
    def row(arm: str, seed: int, spearman: float, seconds: float) -> dict:
        return dict(arm=arm, seed=seed, spearman=spearman, spearman_all=spearman, regret=0.0, trial_seconds=seconds)

    rows = pd.DataFrame(
        [
            *(row("folds1", s, rho, 100.0) for s, rho in enumerate([0.9, 0.8, 0.7, 0.6])),
            row("folds5", 0, 0.95, 200.0),
            row("folds5", 1, 0.75, 220.0),
            row("folds5", 2, float("nan"), 300.0),  # every completed trial at AUC 1.0: no rank correlation
            row("folds5", 3, 0.8, 250.0),
            row("folds5-noprune", 0, 0.85, 400.0),  # seeds 0 and 1 only
            row("folds5-noprune", 1, 0.95, 500.0),
        ]
    )
    lines = bench.verdicts(rows)
    assert lines[0].startswith("Spearman (median over the 3 seeds where it is defined")
    assert "0.80 with 5 folds, 0.75 with one split: target >= 0.7 and above one split: met" in lines[0]
    assert lines[1] == "Spearman, paired by seed: 5 folds above one split in 2 of 3 seeds (median difference +0.05)"
    assert "2.35x: target <= 2.5x: met" in lines[3]
    assert lines[5] == (
        "without pruning (seeds 0, 1): Spearman 0.90, regret 0.000, cost 4.50x (medians); Spearman above one split "
        "in 1 of 2 seeds (median difference +0.05)"
    )


def test_the_cohort_is_generated_once_per_setting_and_regenerated_for_others(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "make_cohort", _small_cohort(bench.make_cohort))
    first = bench.cohort_once(tmp_path, 1, shift=4.0, signal_patches=(2, 3))
    assert first.loc[first["label"] == 1, "signal"].between(2, 3).all()
    stamp = (tmp_path / "cohort.csv").stat().st_mtime_ns
    again = bench.cohort_once(tmp_path, 1, shift=4.0, signal_patches=(2, 3))  # read back, files untouched
    pd.testing.assert_frame_equal(first, again)
    assert (tmp_path / "cohort.csv").stat().st_mtime_ns == stamp
    other = bench.cohort_once(tmp_path, 1)  # the defaults: 8-16 signal patches, regenerated
    assert other.loc[other["label"] == 1, "signal"].between(8, 16).all()
    assert "shift 8, patient offset sd 0.3, 8-16 signal patches, seed 1" in (tmp_path / "settings.json").read_text()


def _small_cohort(make):
    def small(root, **kw):
        return make(root, n_patients=N_PATIENTS, n_patches=(40, 60), **kw)

    return small
