"""The cohort's split into a held-out test set and K patient-level cross-validation folds: ``splits.csv``.

One row per item (slide, image, canvas): ``slide,patient,label,split,fold``. ``split`` is ``train`` or ``test``;
``fold`` (train rows) is the fold in which the item is validation, 0..K-1; with one fold it is 0 on the validation
items and empty on the items that only train. Every patient's items share a split and a fold, and each fold's labels
follow the cohort's as far as whole patients allow (:func:`ips_search.data.split.group_folds`).

The dataset kinds decide the test set and, with one fold, the validation items (patient-level where a manifest
names patients); :func:`make_splits` turns their split into the table and draws K > 1 folds over the non-test items.
A search writes the table into its experiment folder once and points every trial at it (``evaluation.splits``), so a
resumed or extended search sees the same folds; :func:`read_splits` also takes a folder of CLAM's ``splits_{k}.csv``
(columns ``train,val,test`` of slide ids, one file per fold). :func:`fold_splits` cuts the built data by the table:
one :class:`DataSplits` per fold, over one copy of the data (loaded once per trial, not once per fold).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import ConcatDataset, Dataset, Subset

from ips_search.config import EvaluationConfig
from ips_search.data.registry import DataSplits
from ips_search.data.split import group_folds
from ips_search.errors import ConfigError

__all__ = ["cohort_splits", "fold_splits", "make_splits", "read_splits", "test_items", "write_splits"]
SPLITS_COLUMNS = ("slide", "patient", "label", "split", "fold")
TRAIN, TEST = "train", "test"
PARTS = ("train", "val", "test")  # DataSplits' datasets, in the order their items are numbered
CLAM_SPLIT = re.compile(r"splits_(\d+)\.csv")


def _ids(dataset: Any, part: str) -> list[str]:
    ids = getattr(dataset, "item_ids", None)
    return [str(i) for i in ids] if ids is not None else [f"{part}-{i:05d}" for i in range(len(dataset))]


def _labels(dataset: Any) -> list[str]:
    """Each item's label as text, for stratifying: the first task's (a multi-label vector as its 0/1 string)."""
    target = next(iter(dataset.targets.values()))
    if target.dim() > 1:
        return ["".join(str(int(v > 0.5)) for v in row) for row in target.tolist()]
    return [str(int(v)) for v in target.tolist()]


def items(splits: DataSplits) -> pd.DataFrame:
    """Every item of ``splits``: ``slide, patient, label`` and where the kind put it (``part``: train, val or test),
    in the order :func:`fold_splits` numbers them (train's, then val's, then test's)."""
    frames = []
    for part in PARTS:
        dataset = getattr(splits, part)
        ids = _ids(dataset, part)
        patients = getattr(dataset, "patients", None)
        frames.append(
            pd.DataFrame(
                {
                    "slide": ids,
                    "patient": [str(p) for p in patients] if patients is not None else ids,
                    "label": _labels(dataset),
                    "part": part,
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    dupes = table["slide"][table["slide"].duplicated()]
    if len(dupes):
        raise ConfigError(f"item {dupes.iloc[0]!r} is listed twice in the data; give every slide one row")
    return table


def make_splits(splits: DataSplits, evaluation: EvaluationConfig, seed: int) -> pd.DataFrame:
    """The splits table of the built data: the kind's test set, and K folds over the rest (K = 1: the kind's
    validation items are fold 0). Checked as :func:`check_splits` does."""
    table = items(splits)
    table["split"] = np.where(table["part"] == "test", TEST, TRAIN)
    train = table["split"] == TRAIN
    if evaluation.folds == 1:
        table["fold"] = pd.array(np.where(table["part"] == "val", 0, -1), dtype="Int64")
    else:
        pool = table[train]
        _check_patients(pool, evaluation.folds, "the non-test items")
        folds = group_folds(pool["patient"].tolist(), pool["label"].tolist(), evaluation.folds, seed)
        table["fold"] = pd.array(np.full(len(table), -1), dtype="Int64")
        table.loc[train, "fold"] = folds
    table.loc[table["fold"] == -1, "fold"] = pd.NA
    table = table[list(SPLITS_COLUMNS)]
    check_splits(table, evaluation, "the drawn splits")
    return table


def _check_patients(pool: pd.DataFrame, folds: int, where: str) -> None:
    n = pool["patient"].nunique()
    if n < folds:
        raise ConfigError(
            f"{where} hold {n} patients, fewer than evaluation.folds = {folds}; lower folds to at most {n} "
            "or add patients"
        )


def check_splits(table: pd.DataFrame, evaluation: EvaluationConfig, where: str) -> None:
    """One ConfigError line for a table no search should use: a blank patient, a patient in train and test, a
    patient in two folds, a fold missing, a fold whose training items hold one class, or whose validation items do
    (where the metric needs both classes: AUC, balanced accuracy; for accuracy, a fold of two or more items)."""
    folds = evaluation.folds
    if table["patient"].isna().any() or (table["patient"].astype(str).str.strip() == "").any():
        slide = table.loc[table["patient"].isna() | (table["patient"].astype(str).str.strip() == ""), "slide"].iloc[0]
        raise ConfigError(f"{where}: slide {slide!r} has no patient; fill in its patient (or drop the column)")
    splits_of = table.groupby("patient")["split"].nunique()
    if (splits_of > 1).any():
        patient = splits_of[splits_of > 1].index[0]
        raise ConfigError(
            f"{where}: patient {patient!r} has slides in both train and test, which leaks the patient into the test "
            "score; put all of a patient's slides in one split"
        )
    train = table[table["split"] == TRAIN]
    if train.empty or (table["split"] == TEST).sum() == 0:
        raise ConfigError(f"{where}: needs both train and test rows; hold out some patients for test")
    folds_of = train.groupby("patient")["fold"].nunique(dropna=False)
    if (folds_of > 1).any():
        raise ConfigError(
            f"{where}: patient {folds_of[folds_of > 1].index[0]!r} has slides in two folds; keep a patient's slides "
            "in one fold"
        )
    present = set(train["fold"].dropna().astype(int))
    if present != set(range(folds)):
        missing = sorted(set(range(folds)) - present)
        raise ConfigError(
            f"{where}: {folds} folds expected, but fold {missing[0] if missing else sorted(present)[-1]} has no "
            f"validation slides; set evaluation.folds to the folds the file holds ({len(present)})"
        )
    _check_patients(train, folds, where)
    if train["label"].nunique() < 2:
        return  # a one-class cohort is named by the dataset's own checks
    held = train["fold"].fillna(-1).astype(int)
    for fold in range(folds):
        for role, rows in (("validation", train[held == fold]), ("training", train[held != fold])):
            if role == "validation" and evaluation.metric == "accuracy" and (folds == 1 or len(rows) < 2):
                continue  # accuracy is defined on one class; the kinds check a validation split a user gave
            if rows["label"].nunique() < 2:
                raise ConfigError(
                    f"{where}: fold {fold}'s {role} slides are all of class {rows['label'].iloc[0]!r}, so AUC and "
                    "balanced accuracy are undefined there; use fewer folds or add patients of the other class"
                )


def read_splits(path: str | Path, data: pd.DataFrame, evaluation: EvaluationConfig) -> pd.DataFrame:
    """The splits table in ``path`` (a ``splits.csv``, or a folder of CLAM's ``splits_{k}.csv``) for the items
    ``data`` (:func:`items`): patients and labels from the data where the file lacks them. Checked."""
    path = Path(path)
    if path.is_dir():
        table = _read_clam(path, data)
    elif path.is_file():
        table = pd.read_csv(path, dtype={"slide": str, "patient": str, "label": str, "split": str})
        missing = [c for c in ("slide", "split") if c not in table]
        if missing:
            raise ConfigError(
                f"splits file {path} lacks column(s) {', '.join(missing)}; give slide,patient,label,split,fold"
            )
        if "fold" not in table:
            table["fold"] = pd.NA
    else:
        raise ConfigError(f"splits file {path} does not exist; give a splits.csv or a folder of CLAM splits_k.csv")
    table = _join_data(table, data, path)
    table["fold"] = pd.to_numeric(table["fold"], errors="coerce").astype("Int64")
    check_splits(table, evaluation, f"splits file {path}")
    return table


def _read_clam(folder: Path, data: pd.DataFrame) -> pd.DataFrame:
    """CLAM's folds: ``splits_{k}.csv`` with columns ``train,val,test`` of slide ids (one fold per file). They must
    hold out the same test slides (a search scores one test set); slide k's fold is the file listing it as val."""
    files = sorted((f for f in folder.iterdir() if CLAM_SPLIT.fullmatch(f.name)), key=lambda f: int(f.stem[7:]))
    if not files:
        raise ConfigError(f"{folder} has no CLAM splits_0.csv ...; give a folder of splits_{{k}}.csv or a splits.csv")
    rows: dict[str, dict[str, Any]] = {}
    tests = []
    for fold, file in enumerate(files):
        frame = pd.read_csv(file, dtype=str)
        for column in ("train", "val", "test"):
            if column not in frame:
                raise ConfigError(f"{file} lacks column {column!r}; CLAM's splits have columns train,val,test")
        tests.append(set(frame["test"].dropna()))
        for slide in frame["val"].dropna():
            rows[slide] = {"slide": slide, "split": TRAIN, "fold": fold}
        for slide in frame["train"].dropna():
            rows.setdefault(slide, {"slide": slide, "split": TRAIN, "fold": pd.NA})
    if any(t != tests[0] for t in tests[1:]):
        raise ConfigError(
            f"the CLAM splits in {folder} hold out a different test set in each file; ips-search scores one held-out "
            "test set: give files with the same test column (or a splits.csv)"
        )
    for slide in tests[0]:
        rows[slide] = {"slide": slide, "split": TEST, "fold": pd.NA}
    return pd.DataFrame(list(rows.values()))


def _join_data(table: pd.DataFrame, data: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``table`` in the data's item order, its patients and labels filled from the data where it has none."""
    table["slide"] = table["slide"].astype(str).map(lambda s: Path(s).stem if s.endswith(".h5") else s)
    unknown = sorted(set(table["slide"]) - set(data["slide"]))
    if unknown:
        raise ConfigError(
            f"splits file {path} names {len(unknown)} slide(s) the data lacks (first: {unknown[0]!r}); "
            "make its slide column match the data's slide names"
        )
    missing = sorted(set(data["slide"]) - set(table["slide"]))
    if missing:
        raise ConfigError(
            f"{len(missing)} slide(s) of the data are not in splits file {path} (first: {missing[0]!r}); give every "
            "slide a row"
        )
    bad = ~table["split"].isin([TRAIN, TEST, "val"])
    if bad.any():
        raise ConfigError(
            f"splits file {path}: split {table.loc[bad, 'split'].iloc[0]!r} is not train or test; use train or test"
        )
    table.loc[table["split"] == "val", "split"] = TRAIN  # a val row is a train row with its fold
    known = data[["slide", "patient", "label"]].rename(columns={"patient": "patient_data", "label": "label_data"})
    merged = known.merge(table, on="slide", how="left")
    for column in ("patient", "label"):
        given = merged[column].astype("string") if column in merged else pd.Series(pd.NA, index=merged.index)
        merged[column] = given.fillna(merged[f"{column}_data"]).astype(str)
    return merged[list(SPLITS_COLUMNS)]


def write_splits(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` to ``path`` whole (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)


def cohort_splits(splits: DataSplits, evaluation: EvaluationConfig, seed: int) -> pd.DataFrame:
    """The table a trial uses: ``evaluation.splits`` when the search wrote (or a user gave) one, else drawn."""
    if evaluation.splits:
        return read_splits(evaluation.splits, items(splits), evaluation)
    return make_splits(splits, evaluation, seed)


def _shifted(dataset: Dataset, shift: Any) -> Dataset:
    """``dataset`` read with ``shift`` (the training augmentation of whole-image kinds), sharing its storage."""
    if not hasattr(dataset, "shift") or dataset.shift is shift:
        return dataset
    view = copy.copy(dataset)
    view.shift = shift
    return view


def fold_splits(splits: DataSplits, table: pd.DataFrame, evaluation: EvaluationConfig) -> list[DataSplits]:
    """One :class:`DataSplits` per fold (``refit``: one, training on every non-test item, no validation), cut
    from ``splits`` by ``table`` (rows in :func:`items` order) without copying the data. Training items are read
    with the training augmentation, validation and test items without it."""
    order = items(splits)["slide"].tolist()
    position = {slide: i for i, slide in enumerate(order)}
    index = table["slide"].map(position).to_numpy()
    shift = getattr(splits.train, "shift", None)
    parts = [getattr(splits, p) for p in PARTS]
    training = ConcatDataset([_shifted(d, shift) for d in parts])
    plain = ConcatDataset([_shifted(d, None) for d in parts])
    train_rows = (table["split"] == TRAIN).to_numpy()
    test = Subset(plain, index[(table["split"] == TEST).to_numpy()].tolist())
    fold = table["fold"].to_numpy(dtype=float, na_value=np.nan)

    def cut(train_mask: np.ndarray, val_mask: np.ndarray | None) -> DataSplits:
        val = None if val_mask is None else Subset(plain, index[val_mask].tolist())
        return DataSplits(Subset(training, index[train_mask].tolist()), val, test, splits.geometry)

    if evaluation.refit:
        return [cut(train_rows, None)]
    if evaluation.folds == 1:
        return [cut(train_rows & np.isnan(fold), train_rows & (fold == 0))]
    return [cut(train_rows & (fold != k), train_rows & (fold == k)) for k in range(evaluation.folds)]


def test_items(table: pd.DataFrame) -> pd.DataFrame:
    """The test rows' ``slide, patient, label`` in the order the test split of :func:`fold_splits` reads them."""
    return table.loc[table["split"] == TEST, ["slide", "patient", "label"]].reset_index(drop=True)
