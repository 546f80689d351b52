"""The search's ``splits.csv``: the held-out test set and the folds every trial of the search uses, decided once by
the driver before the first trial (a user's splits file, or drawn from the data) and kept by a resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ips_search.data import build_datasets
from ips_search.data.cohort import items, make_splits, read_splits, write_splits
from ips_search.experiment import SPLITS_FILE, SearchSettings
from ips_search.extraction import resolve_data
from ips_search.space import SearchSpace


def draw_splits(space: SearchSpace, settings: SearchSettings) -> pd.DataFrame:
    """The search's splits table: from ``evaluation.splits`` when the space names a file, else drawn with the
    search's seed; checked (one ConfigError line) before anything starts. The items are the same at every patch
    size, so the data is built (from its cache) at the first."""
    base = space.base_config()
    splits = build_datasets(resolve_data(base.data, progress=False))
    given = base.evaluation.splits
    if given:
        return read_splits(Path(given).expanduser().resolve(), items(splits), base.evaluation)
    return make_splits(splits, base.evaluation, settings.seed)


def save_splits(space: SearchSpace, settings: SearchSettings, table: pd.DataFrame) -> None:
    """Write ``table`` as the experiment's ``splits.csv`` and point the space's trials at it (saved with the space
    in ``experiment.json``, so a resume or an extension reads the same file)."""
    path = settings.experiment_dir / SPLITS_FILE
    write_splits(table, path)
    space.fixed["evaluation"] = {**space.fixed.get("evaluation", {}), "splits": str(path)}


def splits_line(table: pd.DataFrame, settings: SearchSettings) -> str:
    """The plan's line on how configs are scored: the metric, the folds and what they hold, the test set."""
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    how = (
        f"{settings.folds} patient-level folds of {len(train)} slides ({train['patient'].nunique()} patients)"
        if settings.folds > 1
        else f"one validation split of {int((train['fold'] == 0).sum())} of {len(train)} slides"
    )
    return (
        f"evaluation   {settings.metric} on {how}; test {len(test)} slides ({test['patient'].nunique()} patients), "
        "scored once per fold model, never ranks"
    )
