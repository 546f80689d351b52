"""The confirm stage (``--confirm K``): the best configs retrained on every non-test slide with K more seeds.

The search chose by validation (the mean over its folds); what a paper reports is the chosen config's test score,
with its uncertainty. The confirm stage trains the top ``confirm_top`` configs (by the ranking rule) again on all
non-test items (``evaluation.refit``: no validation) with seeds ``seed + 1 .. seed + K``, as trials of their own Tune
experiment in ``<experiment>/confirm/`` (on the dashboard, resumable like the search); each run scores the held-out
test set once. ``confirm.csv``, ``trials.csv`` and the Optuna study's user attributes get each config's test mean and
standard deviation over its runs and a bootstrap 95% interval that resamples test patients
(:func:`ips_search.scores.bootstrap_interval`). The test figures never change the ranking.

A stage interrupted in another folder (the experiment was copied or moved since) is not restored, as Ray's state
names that folder: its finished runs are kept and the others start over in the resumed folder.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from ips_search.experiment import (
    CONFIRM_CSV,
    CONFIRM_DIR,
    JOURNAL_FILE,
    PARAMS_FILE,
    TRIALS_CSV,
    SearchSettings,
    Status,
    attach,
    coerce,
    predictions_file,
    rank,
    splits_file,
    summarize,
)
from ips_search.experiment.confirmation import RUN, SEED, SOURCE
from ips_search.experiment.settings import trial_fixed
from ips_search.scores import bootstrap_interval
from ips_search.search.results import TrialsCsvCallback, trial_dirname


def confirm_runs(settings: SearchSettings, trials: pd.DataFrame) -> list[dict[str, Any]]:
    """The configs to run: each of the top trials' own config (its ``params.json``) with seeds seed+1 .. seed+K."""
    runs = []
    # the experiment's own splits file: a trial's config names the folder the search ran in, which a copied or moved
    # experiment must not depend on (moved, it is gone)
    splits = splits_file(settings.experiment_dir)
    own = {"splits": str(splits)} if splits is not None else {}
    for row in rank(trials).head(settings.confirm_top).to_dict("records"):
        config = json.loads((Path(str(row["path"])) / PARAMS_FILE).read_text())
        for seed in confirm_seeds(settings):
            run = copy.deepcopy(config)  # each run its own config: Tune may change one in place
            run["fixed"] = trial_fixed(config["fixed"], settings, seed=seed)
            run["fixed"]["evaluation"] = {**run["fixed"]["evaluation"], **own, "refit": True}
            run[SOURCE], run[SEED] = str(row["trial_id"]), seed
            runs.append(run)
    return runs


def confirm_seeds(settings: SearchSettings) -> list[int]:
    """The seeds of each config's confirm runs: the ``confirm`` seeds after the search's."""
    return [settings.seed + k for k in range(1, settings.confirm + 1)]


def confirm_cpus(settings: SearchSettings, n_runs: int, cluster_cpus: float) -> float:
    """CPUs per confirm run: the search's slots (``concurrency`` x ``cpus_per_trial``, at most the cluster's CPUs)
    shared by the runs that fit in them at once. One run after a 2-slot search gets both CPUs (torch threads follow),
    not one CPU with the other idle."""
    at_once = max(1, min(n_runs, settings.concurrency))
    pool = min(settings.cpus_per_trial * settings.concurrency, cluster_cpus)
    return max(settings.cpus_per_trial, float(int(pool // at_once)))


def _trainable(settings: SearchSettings, n_runs: int, trainable: Any) -> Any:
    cluster_cpus = float(ray.cluster_resources().get("CPU", settings.cpus_per_trial))
    resources = {"cpu": confirm_cpus(settings, n_runs, cluster_cpus), "gpu": settings.gpus_per_trial}
    return tune.with_resources(trainable, resources)


class KeptRunsCsvCallback(TrialsCsvCallback):
    """``confirm/trials.csv`` of a stage started over: the finished runs it kept (``kept``, their rows as read, their
    paths in this stage) above the rows of its own runs, so a stage interrupted again still keeps them."""

    def __init__(self, path: str | os.PathLike, kept: pd.DataFrame) -> None:
        super().__init__(path)
        self.kept = kept

    def table(self, trials: list) -> pd.DataFrame:
        own = super().table(trials)
        table = pd.concat([self.kept, own], ignore_index=True)
        return table[[*self.kept.columns, *(c for c in own.columns if c not in self.kept.columns)]]


def make_confirm_tuner(
    settings: SearchSettings, runs: list[dict[str, Any]], trainable: Any, kept: pd.DataFrame | None = None
) -> tune.Tuner:
    """The stage's Tune experiment over ``runs``; ``kept``: the rows of finished runs it keeps in its ``trials.csv``
    (a stage started over after a copy or move)."""
    folder = settings.experiment_dir / CONFIRM_DIR
    csv = folder / TRIALS_CSV
    callback = TrialsCsvCallback(csv) if kept is None else KeptRunsCsvCallback(csv, kept)
    return tune.Tuner(
        _trainable(settings, len(runs), trainable),
        param_space={RUN: tune.grid_search(runs)},
        tune_config=tune.TuneConfig(
            scheduler=FIFOScheduler(),
            num_samples=1,
            max_concurrent_trials=settings.concurrency,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=CONFIRM_DIR,
            storage_path=str(settings.experiment_dir),
            # one kept checkpoint: Tune then snapshots the experiment after every checkpoint, so a killed stage
            # resumes without training a finished run again (its one epoch may be the whole run)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[callback],
        ),
    )


def run_confirm(settings: SearchSettings, trainable: Any) -> pd.DataFrame:
    """Run (or resume) the confirm stage with ``trainable`` (``search.trainable.confirm_ips``) and record its
    figures; returns ``confirm.csv``'s table."""
    folder = settings.experiment_dir
    trials = coerce(pd.read_csv(folder / TRIALS_CSV, dtype={"trial_id": str}))
    stage = folder / CONFIRM_DIR
    runs = confirm_runs(settings, trials.drop(columns=["confirm_val_mean"], errors="ignore"))
    if runs and _finished_runs(stage / TRIALS_CSV) >= len(runs):
        # a finished stage is recorded again, not restored: Ray's restored state names the folder the experiment
        # ran in, which a copied or moved experiment must not write to
        return record(settings, trials)
    if tune.Tuner.can_restore(str(stage)) and _ran_in(stage):  # interrupted here: finished runs are kept
        tune.Tuner.restore(
            str(stage),
            trainable=_trainable(settings, len(runs), trainable),
            resume_unfinished=True,
            resume_errored=True,
        ).fit()
    elif runs:
        # A stage interrupted in another folder is not restored either: Ray's state names that folder, which a copied
        # or moved experiment must not write to. Its finished runs are kept; the others start over here.
        kept = _kept_runs(stage, runs)
        done = set(zip(kept[SOURCE], kept[SEED], strict=True))
        todo = [r for r in runs if (str(r[SOURCE]), int(r[SEED])) not in done]
        if todo:
            make_confirm_tuner(settings, todo, trainable, kept if len(kept) else None).fit()
    else:
        return pd.DataFrame()
    return record(settings, trials)


def intervals(summary: pd.DataFrame, runs: pd.DataFrame, metric: str) -> dict[str, list[float | None]]:
    """Each confirmed config's bootstrap 95% interval of its runs' mean test score (patients resampled), from the
    runs' ``test_predictions.csv``; None where no run left predictions."""
    low, high = [], []
    done = runs[runs["status"].astype(str) == Status.COMPLETED] if not runs.empty else runs
    for source in summary["trial_id"].astype(str):
        paths = [predictions_file(str(p)) for p in done.loc[done[SOURCE].astype(str) == source, "path"]]
        tables = [pd.read_csv(p, dtype={"label": str, "slide": str, "patient": str}) for p in paths if p is not None]
        bounds = bootstrap_interval(tables, metric) if tables else (None, None)
        low.append(bounds[0])
        high.append(bounds[1])
    return {"confirm_test_ci_low": low, "confirm_test_ci_high": high}


def _stage_runs(stage: Path) -> pd.DataFrame:
    """The stage's ``trials.csv`` (empty before the stage), each run's ``path`` in ``stage`` where its folder is there:
    a copied or moved experiment's rows still name the folder the stage ran in."""
    csv = stage / TRIALS_CSV
    if not csv.is_file():
        return pd.DataFrame(columns=["trial_id", "status", "path", SOURCE, SEED])
    runs = pd.read_csv(csv, dtype={"trial_id": str, SOURCE: str})
    here = [stage.resolve() / Path(str(p)).name for p in runs["path"]]
    runs["path"] = [str(h) if h.is_dir() else p for h, p in zip(here, runs["path"], strict=True)]
    return runs


def _ran_in(stage: Path) -> bool:
    """Whether the stage's runs so far ran in ``stage`` (not in the folder a copied or moved experiment came from).
    No run reported yet: none has a checkpoint to restore, so starting over loses nothing."""
    csv = stage / TRIALS_CSV
    if not csv.is_file():
        return False
    paths = pd.read_csv(csv, usecols=["path"])["path"].astype(str)
    return len(paths) > 0 and all(Path(p).parent.resolve() == stage.resolve() for p in paths)


def _kept_runs(stage: Path, runs: list[dict[str, Any]]) -> pd.DataFrame:
    """The stage's finished runs of ``runs`` (by config and seed), one each, their paths in ``stage``."""
    table = _stage_runs(stage)
    table = table[table["status"].astype(str) == Status.COMPLETED].astype({SOURCE: str, SEED: int})
    wanted = {(str(r[SOURCE]), int(r[SEED])) for r in runs}
    mine = pd.Series([key in wanted for key in zip(table[SOURCE], table[SEED], strict=True)], table.index, bool)
    return table[mine].drop_duplicates([SOURCE, SEED]).reset_index(drop=True)


def _finished_runs(csv: Path) -> int:
    """How many of the stage's runs completed (0 before the stage)."""
    if not csv.is_file():
        return 0
    return int((pd.read_csv(csv, usecols=["status"])["status"].astype(str) == Status.COMPLETED).sum())


def record(settings: SearchSettings, trials: pd.DataFrame) -> pd.DataFrame:
    """Write the confirm figures to ``confirm.csv``, into ``trials.csv`` and into the study's user attributes."""
    folder = settings.experiment_dir
    runs = _stage_runs(folder / CONFIRM_DIR)  # a copied or moved stage reads its predictions where it is now
    summary = summarize(trials, runs)
    summary = summary.assign(**intervals(summary, runs, settings.metric))
    summary.assign(metric=settings.metric).to_csv(folder / CONFIRM_CSV, index=False)
    merged = attach(trials, summary)
    tmp = folder / f"{TRIALS_CSV}.tmp"
    merged.to_csv(tmp, index=False)
    tmp.replace(folder / TRIALS_CSV)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / JOURNAL_FILE)))
    names = optuna.get_all_study_names(storage)  # a copied or renamed experiment's study keeps its first name
    study = optuna.load_study(study_name=settings.name if settings.name in names else names[0], storage=storage)
    figures = {
        row["trial_id"]: {k: None if pd.isna(row[k]) else float(row[k]) for k in summary.columns if k != "trial_id"}
        for row in summary.to_dict("records")
    }
    study.set_user_attr("confirm", figures)  # by the search's Ray trial id
    study.set_user_attr("confirm_seeds", confirm_seeds(settings))
    return summary
