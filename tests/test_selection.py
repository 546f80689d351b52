"""Selection you can publish: the metrics, patient-level splits and folds, the fold pruner, and a ranking the test
set never touches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from test_cohort_checks import noise_png, write_features

from ips_search.config import DataConfig, EvaluationConfig, ExperimentConfig, IPSConfig, Task, TrainConfig
from ips_search.data import build_datasets
from ips_search.data.cohort import check_splits, fold_splits, items, make_splits, read_splits
from ips_search.data.registry import DataGeometry, DataSplits
from ips_search.errors import ConfigError
from ips_search.experiment import best, coerce, rank
from ips_search.scores import auc, balanced_accuracy, bootstrap_interval, prediction_score
from ips_search.search.pruner import FoldPruner
from ips_search.train import fit


class Items(torch.utils.data.Dataset):
    """A stand-in split: items are their global number, one binary label each."""

    def __init__(self, ids: list[str], patients: list[str], labels: list[int]) -> None:
        self.item_ids, self.patients = ids, patients
        self.targets = {"label": torch.tensor(labels)}

    def __len__(self) -> int:
        return len(self.item_ids)

    def __getitem__(self, i: int):
        return self.item_ids[i], {"label": self.targets["label"][i]}


def cohort(rng: np.random.Generator, n_patients: int, positive: float = 0.35, val: bool = False) -> DataSplits:
    """Random slides per patient (1-4), a label per patient, a tenth of the patients for test (``val``: every
    fifth other patient for validation, as a kind's own split)."""
    ids, patients, labels = [], [], []
    for p in range(n_patients):
        label = int(rng.random() < positive)
        for s in range(int(rng.integers(1, 5))):
            ids.append(f"p{p}-s{s}")
            patients.append(f"p{p}")
            labels.append(label)
    test = set(rng.choice(n_patients, max(2, n_patients // 10), replace=False).tolist())
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, patient in enumerate(patients):
        number = int(patient[1:])
        parts["test" if number in test else "val" if val and number % 5 == 0 else "train"].append(i)

    def split(rows: list[int]) -> Items:
        return Items([ids[i] for i in rows], [patients[i] for i in rows], [labels[i] for i in rows])

    geometry = DataGeometry(1, 1, 1, (Task("label", 2),), 1, (1, 1))
    return DataSplits(split(parts["train"]), split(parts["val"]), split(parts["test"]), geometry)


# -- metrics ---------------------------------------------------------------------------------------------------------


def test_auc_and_balanced_accuracy_match_scikit_learn_on_fixed_predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p1 = np.clip(0.3 * y + rng.random(50) * 0.7, 0, 1)
    prob = np.stack([1 - p1, p1], 1)
    assert auc(prob, y) == pytest.approx(roc_auc_score(y, p1))
    assert balanced_accuracy(prob, y) == pytest.approx(balanced_accuracy_score(y, (p1 > 0.5).astype(int)))
    y3 = rng.integers(0, 3, 60)
    prob3 = rng.dirichlet(np.ones(3), 60)
    assert auc(prob3, y3) == pytest.approx(roc_auc_score(y3, prob3, multi_class="ovr", average="macro"))
    assert balanced_accuracy(prob3, y3) == pytest.approx(balanced_accuracy_score(y3, prob3.argmax(1)))
    assert auc(prob[:10], np.zeros(10, dtype=int)) is None  # one class: undefined, not an error


def test_the_bootstrap_interval_resamples_patients_and_brackets_the_score():
    rng = np.random.default_rng(1)
    rows = []
    for p in range(30):
        label = p % 2
        for s in range(3):
            p1 = float(np.clip(0.35 * label + 0.65 * rng.random(), 0, 1))
            rows.append(dict(slide=f"{p}-{s}", patient=f"p{p}", task="label", label=str(label), p0=1 - p1, p1=p1))
    table = pd.DataFrame(rows)
    low, high = bootstrap_interval([table], "auc", resamples=300)
    assert low < prediction_score("auc", table) < high
    assert 0.05 < high - low < 0.5
    # one patient's slides are one unit: a cohort of 3 identical copies per patient gives the same interval
    assert bootstrap_interval([table], "auc", resamples=300) == (low, high)


# -- splits ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("folds", [1, 5])
def test_folds_keep_patients_whole_and_labels_stratified(seed, folds):
    rng = np.random.default_rng(seed)
    splits = cohort(rng, int(rng.integers(40, 80)), val=folds == 1)
    table = make_splits(splits, EvaluationConfig(folds=folds), seed)
    assert table.groupby("patient")["split"].nunique().max() == 1
    train = table[table["split"] == "train"]
    assert train.groupby("patient")["fold"].nunique(dropna=False).max() == 1
    if folds > 1:
        share = train["label"].astype(int).mean()
        for k in range(folds):
            held = train[train["fold"] == k]
            assert set(held["label"]) == {"0", "1"}
            assert abs(held["label"].astype(int).mean() - share) < 0.25
    cut = fold_splits(splits, table, EvaluationConfig(folds=folds))
    assert len(cut) == folds
    validated: list[str] = []
    for fold in cut:
        train_ids = {fold.train[i][0] for i in range(len(fold.train))}
        val_ids = {fold.val[i][0] for i in range(len(fold.val))}
        assert not train_ids & val_ids
        validated += val_ids
        assert {fold.test[i][0] for i in range(len(fold.test))} == set(table.loc[table["split"] == "test", "slide"])
    if folds > 1:  # every non-test slide is validated exactly once over the folds
        assert sorted(validated) == sorted(train["slide"])


def test_refit_trains_on_every_non_test_slide_without_validation():
    splits = cohort(np.random.default_rng(3), 40)
    table = make_splits(splits, EvaluationConfig(folds=4), 0)
    (whole,) = fold_splits(splits, table, EvaluationConfig(folds=4, refit=True))
    assert whole.val is None and len(whole.train) == (table["split"] == "train").sum()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.assign(patient=t["patient"].where(t.index != 3, " ")), "has no patient"),
        (lambda t: t.assign(fold=t["fold"].where(t["label"] != "1", 0)), "are all of class"),
        (lambda t: t.assign(split=t["split"].where(t.index != t.index[t["split"] == "test"][0], "train")), "both"),
    ],
)
def test_a_splits_table_no_search_should_use_is_one_line(change, message):
    splits = cohort(np.random.default_rng(4), 50)
    table = make_splits(splits, EvaluationConfig(folds=3), 0)
    if message == "both":  # a test slide moved to train, its patient's other test slides left in test
        patient_of = table.groupby("patient").size()
        first = table.index[(table["split"] == "test") & table["patient"].map(patient_of).gt(1)][0]
        bad = table.copy()
        bad.loc[first, "split"], bad.loc[first, "fold"] = "train", 0
    else:
        bad = change(table.copy())
    with pytest.raises(ConfigError, match=message) as error:
        check_splits(bad, EvaluationConfig(folds=3), "test")
    assert "\n" not in str(error.value)


def test_fewer_patients_than_folds_is_one_line():
    splits = cohort(np.random.default_rng(5), 12)
    with pytest.raises(ConfigError, match="fewer than evaluation.folds = 20"):
        make_splits(splits, EvaluationConfig(folds=20), 0)


def test_a_clam_splits_folder_is_read_as_the_folds(tmp_path):
    splits = cohort(np.random.default_rng(6), 40)
    ours = make_splits(splits, EvaluationConfig(folds=3), 0)
    train, test = ours[ours["split"] == "train"], ours[ours["split"] == "test"]
    for k in range(3):
        val = train.loc[train["fold"] == k, "slide"].tolist()
        rest = train.loc[train["fold"] != k, "slide"].tolist()
        n = max(len(val), len(rest), len(test))
        pd.DataFrame(
            {
                "train": pd.Series(rest).reindex(range(n)),
                "val": pd.Series(val).reindex(range(n)),
                "test": pd.Series(test["slide"].tolist()).reindex(range(n)),
            }
        ).to_csv(tmp_path / f"splits_{k}.csv")
    table = read_splits(tmp_path, items(splits), EvaluationConfig(folds=3))
    merged = table.merge(ours, on="slide", suffixes=("", "_ours"))
    assert (merged["split"] == merged["split_ours"]).all()
    assert (merged["fold"].fillna(-1) == merged["fold_ours"].fillna(-1)).all()
    (tmp_path / "splits_1.csv").write_text("train,val,test\n" + f"{test['slide'].iloc[0]},,\n")
    with pytest.raises(ConfigError, match="different test set"):
        read_splits(tmp_path, items(splits), EvaluationConfig(folds=3))


# -- pruning and ranking ---------------------------------------------------------------------------------------------


EPOCHS = 12  # per fold


def _fold_report(fold: int, scores: list[float], status: str = "running") -> dict:
    """The report at the end of ``fold``, its finished folds' ``scores``."""
    done = {f"val_score_fold{k}": v for k, v in enumerate(scores)}
    return {
        **dict(status=status, fold=fold, epoch=EPOCHS, folds_done=len(scores), val_score_mean=np.mean(scores)),
        **done,
    }


def _epoch_report(fold: int, epoch: int, finished: list[float], now: float) -> dict:
    """A report inside ``fold`` after ``epoch`` epochs: the finished folds' scores and the running fold's ``now``."""
    done = {f"val_score_fold{k}": v for k, v in enumerate(finished)}
    mean = np.mean([*finished, now])
    return dict(status="running", fold=fold, epoch=epoch, folds_done=len(finished), val_score_mean=mean, **done)


def _finish(pruner: FoldPruner, trial: str, scores: list[float], inside: list[float]) -> None:
    """Report ``trial``'s whole run to ``pruner``: in each fold the ``inside`` scores, one per epoch before the
    last, and at the fold's end that fold's score."""
    for fold in range(len(scores)):
        for epoch, now in enumerate(inside, start=1):
            assert not pruner(trial, _epoch_report(fold, epoch, scores[:fold], now))
        status = "completed" if fold == len(scores) - 1 else "running"
        assert not pruner(trial, _fold_report(fold, scores[: fold + 1], status=status))


def test_the_pruner_stops_a_clearly_worse_trial_after_a_fold_but_never_the_last_fold_or_a_close_one():
    pruner = FoldPruner(folds=5, margin=0.05, epochs=EPOCHS)
    assert not pruner("first", _fold_report(0, [0.5]))  # nothing to compare with yet
    _finish(pruner, "best", [0.9, 0.8, 0.85, 0.9, 0.8], inside=[])
    assert pruner("bad", _fold_report(0, [0.7]))  # 0.70 < 0.90 - 0.05 - sd 0.05 after fold 0
    assert not pruner("close", _fold_report(0, [0.86]))
    assert not pruner("close", _fold_report(1, [0.86, 0.78]))  # mean 0.82 vs the best's 0.85 over the same folds
    assert pruner("close", _fold_report(2, [0.86, 0.78, 0.6]))
    assert not pruner("mid", _epoch_report(1, 6, [0.6], 0.3))  # inside a fold, with no interval: no decision
    assert pruner.pruned == {"bad", "close"}


def test_the_pruner_widens_its_bar_by_the_best_trials_fold_spread():
    """Where one fold's score swings by luck (AUC 1.0 or 0.3 on a few patients), a trial one fold behind the best
    by more than the margin but less than that swing goes on; by its third fold the bar has narrowed."""
    pruner = FoldPruner(folds=5, margin=0.05, epochs=EPOCHS)
    _finish(pruner, "best", [1.0, 0.3, 1.0, 1.0, 0.4], inside=[])  # sd 0.36
    assert not pruner("unlucky", _fold_report(0, [0.7]))  # 1.0 - 0.05 - 0.36 = 0.59 after one fold
    assert pruner("chance", _fold_report(0, [0.5]))
    assert not pruner("unlucky", _fold_report(1, [0.7, 0.3]))  # 0.50 vs 0.65 - 0.05 - 0.26
    assert pruner("unlucky", _fold_report(2, [0.7, 0.3, 0.4]))  # 0.47 vs 0.77 - 0.05 - 0.21


def test_checks_inside_a_fold_stop_a_trial_that_has_not_learned_by_then_at_the_interval_only():
    pruner = FoldPruner(folds=5, margin=0.05, epochs=EPOCHS, interval=3)
    _finish(pruner, "best", [0.9, 0.8, 0.9, 0.9, 0.8], inside=[0.5, 0.6, 0.8, *[0.85] * 8])  # sd 0.055
    assert not pruner("slow", _epoch_report(0, 2, [], 0.3))  # not a check: epoch 2 of 12
    assert not pruner("slow", _epoch_report(0, 3, [], 0.7))  # 0.70 vs 0.80 - 0.05 - 0.055 at epoch 3: on
    assert pruner("slow", _epoch_report(0, 6, [], 0.6))  # 0.60 vs 0.85 - 0.05 - 0.055 at epoch 6
    # in a later fold the running mean counts the finished folds: (0.9 + 0.5) / 2 vs (0.9 + 0.85) / 2 - 0.05 - 0.039
    assert pruner("later", _epoch_report(1, 9, [0.9], 0.5))
    assert not pruner("last", _epoch_report(4, 3, [0.9, 0.8, 0.9, 0.9], 0.0))  # the last fold is never pruned
    assert pruner.pruned == {"slow", "later"}
    at_fold_ends = FoldPruner(folds=5, margin=0.05, epochs=EPOCHS, interval=0)
    _finish(at_fold_ends, "best", [0.9, 0.8, 0.9, 0.9, 0.8], inside=[0.5, 0.6, 0.8, *[0.85] * 8])
    assert not at_fold_ends("slow", _epoch_report(0, 6, [], 0.6))
    assert at_fold_ends("slow", _fold_report(0, [0.6]))


def test_the_test_score_never_changes_the_ranking():
    rows = [
        dict(trial_id="a", status="completed", val_score_mean=0.80, val_score_std=0.05, peak_memory_mb=10.0),
        dict(trial_id="b", status="completed", val_score_mean=0.80, val_score_std=0.02, peak_memory_mb=20.0),
        dict(trial_id="c", status="completed", val_score_mean=0.70, val_score_std=0.01, peak_memory_mb=5.0),
    ]
    order = None
    for test in ([0.6, 0.7, 0.99], [0.99, 0.1, 0.5]):
        df = coerce(pd.DataFrame([{**r, "test_score": t, "test_accuracy": t} for r, t in zip(rows, test, strict=True)]))
        ranked = rank(df)["trial_id"].tolist()
        assert order is None or ranked == order
        order = ranked
    assert order == ["b", "a", "c"]  # the mean first; a tie goes to the lower spread, before memory
    assert best(df)["trial_id"] == "b"


def test_an_experiment_from_before_the_folds_ranks_by_its_validation_accuracy():
    old = coerce(
        pd.DataFrame(
            [
                dict(trial_id="a", status="completed", val_accuracy=0.9, test_accuracy=0.5, peak_memory_mb=1.0),
                dict(trial_id="b", status="completed", val_accuracy=0.8, test_accuracy=0.9, peak_memory_mb=1.0),
            ]
        )
    )
    assert best(old)["trial_id"] == "a" and old["val_score_mean"].tolist() == [0.9, 0.8]


# -- every dataset kind trains on its folds --------------------------------------------------------------------------


def _kind_config(kind: str, tmp_path) -> tuple[DataConfig, dict]:
    """A small cohort of ``kind`` with patients, and the model settings its items need."""
    rng = np.random.default_rng(0)
    cache = str(tmp_path / "cache")
    if kind == "features":
        rows = [(f"s{p}-{k}", f"case{p}", "ab"[p % 2]) for p in range(12) for k in range(2)]
        root = tmp_path / "h5"
        root.mkdir()
        for slide, *_ in rows:
            write_features(root / f"{slide}.h5", rng.standard_normal((6, 8)).astype(np.float32))
        (root / "labels.csv").write_text("slide,patient,label\n" + "".join(f"{s},{p},{y}\n" for s, p, y in rows))
        cfg = DataConfig(dataset="features", root=str(root), manifest=str(root / "labels.csv"), cache_dir=cache)
        return cfg, {"encoder": "projector"}
    if kind == "slides":
        paths = [noise_png(tmp_path / "s" / f"slide{i}.png", i) for i in range(16)]
        (tmp_path / "s" / "cohort.csv").write_text(
            "path,patient,label\n"
            + "".join(f"{p.name},case{i // 2},{'ab'[(i // 2) % 2]}\n" for i, p in enumerate(paths))
        )
        cfg = DataConfig(
            dataset="slides",
            manifest=str(tmp_path / "s" / "cohort.csv"),
            patch_size=32,
            level=0,
            min_foreground=0.0,
            cache_dir=cache,
        )
        return cfg, {"encoder": "small-cnn", "orient_scores": False}
    if kind == "megapixel":  # canvases are their own patients; 10 classes of the majority digit
        cfg = DataConfig(canvas_size=96, digit_size=16, n_digits=3, n_noise=0, n_train=80, n_test=20, cache_dir=cache)
        return cfg, {"encoder": "small-cnn", "orient_scores": False}
    for cls, first in (("cat", 0), ("dog", 100)):
        for i in range(8):
            noise_png(tmp_path / "img" / cls / f"{i}.png", first + i)
    cfg = DataConfig(dataset="folder", root=str(tmp_path / "img"), image_size=32, patch_size=16, cache_dir=cache)
    return cfg, {"encoder": "small-cnn", "orient_scores": False}


@pytest.mark.parametrize("kind", ["features", "slides", "folder", "megapixel"])
def test_every_kind_trains_and_validates_on_each_fold(kind, tmp_path):
    data, model = _kind_config(kind, tmp_path)
    splits = build_datasets(data)
    table = make_splits(splits, EvaluationConfig(folds=2), 0)
    assert table.groupby("patient")["fold"].nunique(dropna=False).max() == 1
    small = dict(dim=16, heads=2, d_k=8, d_v=8, d_inner=32, memory_size=2, iteration_size=2)
    exp = ExperimentConfig(
        data=data,
        model=IPSConfig(**small, **model),
        train=TrainConfig(epochs=1, batch_size=4, warm_start=False, device="cpu"),
        evaluation=EvaluationConfig(folds=2, metric="auc"),
    )
    for fold in fold_splits(splits, table, exp.evaluation):
        out = fit(exp, fold, torch.device("cpu"))
        assert out["val"]["images"] == len(fold.val) and out["test"]["images"] == len(fold.test)
        assert 0 <= out["val"]["auc"] <= 1  # both classes in every fold's validation
