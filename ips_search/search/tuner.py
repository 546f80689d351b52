"""The search: Ray Tune runs trials, an Optuna sampler proposes them.

* ``OptunaSearch`` with a define-by-run space, its study stored in an Optuna
  ``JournalStorage`` file in the experiment folder (optuna-dashboard opens it; the
  report reads Pareto sets and importances from it).
* Trials the scheduler stops early are told to Optuna as PRUNED (with their
  per-epoch values), not as COMPLETE: partial results never pose as final.
* With a memory budget, each trial's ``peak_memory_mb - budget`` is stored as its
  constraint (``Trial.set_constraint`` from Optuna 5; a user attribute read by the
  samplers' ``constraints_func`` before), which the samplers use to steer away from
  infeasible configs.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from ips_search.errors import ConfigError
from ips_search.experiment import (
    EXPERIMENT_FILE,
    JOURNAL_FILE,
    MEMORY_METRIC,
    METRIC,
    RUNG_METRICS,
    TRIALS_CSV,
    SearchSettings,
    Status,
    asha_rungs,
    read_experiment,
    splits_file,
)
from ips_search.search.pruner import FoldPruner
from ips_search.search.results import TrialsCsvCallback, trial_dirname
from ips_search.space import SearchSpace, first_points, searcher_space

__all__ = ["SearchSettings", "asha_rungs", "make_searcher", "make_scheduler", "make_tuner", "restore_tuner"]

NATIVE_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5 deprecates constraints_func
CONSTRAINT = "memory_mb_over_budget"  # peak_memory_mb - max_memory_mb: feasible when <= 0


def _constraint(trial: optuna.trial.FrozenTrial) -> tuple[float, ...]:
    return tuple(trial.user_attrs.get(CONSTRAINT, (0.0,)))


def trial_constraints(trial: optuna.trial.FrozenTrial) -> tuple[float, ...]:
    """The constraint values a trial was told with, whichever Optuna stored them."""
    if NATIVE_CONSTRAINTS and trial.constraints:
        return tuple(trial.constraints.values())
    return tuple(trial.user_attrs.get(CONSTRAINT, ()))


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II that Ray can pickle.

    Ray pickles the searcher, sampler included (to checkpoint it and to resume). From Optuna 5.1 the GA samplers
    hold a ``threading.Lock`` (``BaseGASampler._thread_lock``, guarding their generation cache), which cannot be
    pickled: the lock is left out of the pickle and a new one is made on unpickling. A lock guards threads of one
    process, so a copy in another process needs its own, not the original's.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


# Optuna 5.1 names a GA subclass's study keys after the class ("<name>:generation"); keep NSGAIISampler's, so a
# search started with the plain sampler resumes in the same generation and the study reads as NSGA-II's.
for _key in ("_GENERATION_KEY", "_PARENT_CACHE_KEY_PREFIX"):
    if hasattr(optuna.samplers.NSGAIISampler, _key):
        setattr(PicklableNSGAIISampler, _key, getattr(optuna.samplers.NSGAIISampler, _key))


def make_sampler(name: str, seed: int, budgeted: bool) -> optuna.samplers.BaseSampler:
    constraints = _constraint if budgeted and not NATIVE_CONSTRAINTS else None
    if name == "tpe":
        # multivariate + group: P, M and I are modelled jointly, per group of co-occurring parameters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, multivariate=True, group=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=constraints)
    if name == "nsga2":
        return PicklableNSGAIISampler(seed=seed, constraints_func=constraints, population_size=10)
    return optuna.samplers.RandomSampler(seed=seed)


class IPSOptunaSearch(OptunaSearch):
    """OptunaSearch that records trial outcomes faithfully in the study.

    Early-stopped trials become PRUNED (their per-epoch values stay as intermediate
    values). Infeasible and diverged trials keep their reported values plus a
    violated constraint, so constrained samplers learn from them. Status, memory and
    test accuracy land in each Optuna trial's user attributes.
    """

    def __init__(self, *args: Any, max_memory_mb: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_memory_mb = max_memory_mb

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        if result:
            status = result.get("status", Status.RUNNING)
            peak = result.get(MEMORY_METRIC)
            for key in (
                "status",
                MEMORY_METRIC,
                "memory_kind",
                "test_accuracy",
                "memory_size",
                "iteration_size",
                "n_patches",
                "epoch",
            ):
                if (
                    key in result
                    and result[key] is not None
                    and not (isinstance(result[key], float) and math.isinf(result[key]))
                ):
                    ot_trial.set_user_attr(key, result[key])
            if self.max_memory_mb and peak is not None:
                over = float(min(peak, 1e12)) - self.max_memory_mb
                if NATIVE_CONSTRAINTS:
                    ot_trial.set_constraint(CONSTRAINT, over)
                else:
                    ot_trial.set_user_attr(CONSTRAINT, [over])
            if status == Status.RUNNING and not error:  # stopped by the scheduler before its last epoch
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return None
        return super().on_trial_complete(trial_id, result, error)


class ExtendableSearch(SearchGenerator):
    """Tune's wrapper around the searcher, whose trial count a resumed search can raise.

    Tune restores the count it started with; ``--resume NAME --trials N`` writes N into ``experiment.json`` first,
    and this wrapper takes it from there on restore, so the extra trials continue the same Optuna study.
    """

    def __init__(self, searcher: Any, experiment_file: Path) -> None:
        super().__init__(searcher)
        self.experiment_file = Path(experiment_file)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.follow_folder(self.experiment_file.parent)
        try:
            trials = int(read_experiment(self.experiment_file.parent, "")["settings"]["trials"])
        except (ConfigError, KeyError, TypeError, ValueError):  # a moved folder: run the count Tune saved
            return
        if trials > self._total_samples:
            self._total_samples, self._finished = trials, False

    def follow_folder(self, folder: Path) -> None:
        """Point the restored state at ``folder``, the experiment being resumed.

        Ray's saved state names the folder the experiment was started in: the storage new trials are created in,
        and the searcher's Optuna journal (its pickled ``JournalStorage``, and the study and trials bound to it).
        Ray re-roots the trials it restores; without this, new trials and the study of a copied or moved experiment
        would go to the original folder. New trials also read this folder's ``splits.csv``: the saved config names
        the original's, which a moved experiment no longer has.
        """
        folder = Path(folder).resolve()
        if self._experiment is not None:
            storage = copy.copy(self._experiment.storage)
            storage.storage_fs_path, storage.experiment_dir_name = folder.parent.as_posix(), folder.name
            self._experiment.storage = self._experiment.spec["storage"] = storage
            evaluation = self._experiment.spec.get("config", {}).get("fixed", {}).get("evaluation") or {}
            if evaluation.get("splits") and (own := splits_file(folder)) is not None:
                evaluation["splits"] = str(own)
        base = self.searcher
        while hasattr(base, "searcher"):  # ConcurrencyLimiter wraps the Optuna searcher
            base = base.searcher
        if getattr(base, "_ot_study", None) is None:
            return
        journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / JOURNAL_FILE)))
        study = optuna.load_study(
            study_name=base._ot_study.study_name,  # the name it was started with: the copied journal holds that one
            storage=journal,
            sampler=base._ot_study.sampler,
            pruner=base._ot_study.pruner,
        )
        base._storage, base._ot_study = journal, study
        base._ot_trials = {tid: optuna.trial.Trial(study, t._trial_id) for tid, t in base._ot_trials.items()}


def make_searcher(space: SearchSpace, settings: SearchSettings) -> IPSOptunaSearch:
    journal = settings.experiment_dir / JOURNAL_FILE
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    if settings.multi_objective:
        metric, mode = [METRIC, MEMORY_METRIC], ["max", "min"]
    else:
        metric, mode = METRIC, "max"
    return IPSOptunaSearch(
        space=searcher_space(space),
        metric=metric,
        mode=mode,
        sampler=make_sampler(settings.sampler, settings.seed, settings.max_memory_mb is not None),
        storage=storage,
        study_name=settings.name,
        points_to_evaluate=first_points(space) or None,
        max_memory_mb=settings.max_memory_mb,
    )


def make_scheduler(settings: SearchSettings):
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    # ASHA acts on the accuracy alone; with two objectives the Pareto set is built from full-budget trials only
    # with K folds a trial reports K * epochs times; every trial's reports line up (fold by fold, epoch by epoch)
    max_t = settings.epochs * settings.folds
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        metric=settings.rung_metric,
        mode=RUNG_METRICS[settings.rung_metric],
        grace_period=min(settings.grace_period, max_t),
        reduction_factor=settings.reduction_factor,
        brackets=settings.brackets,
    )


def make_run_config(settings: SearchSettings, verbose: int = 1) -> tune.RunConfig:
    return tune.RunConfig(
        name=settings.name,
        storage_path=str(Path(settings.results_dir).resolve()),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=1),
        callbacks=[TrialsCsvCallback(settings.experiment_dir / TRIALS_CSV)],
        stop=make_pruner(settings),
        verbose=verbose,
    )


def make_pruner(settings: SearchSettings) -> FoldPruner | None:
    """The fold pruner of a cross-validated single-objective search (a multi-objective search keeps every trial:
    a config below the best score may be on the Pareto front by its memory)."""
    if settings.folds < 2 or settings.multi_objective:
        return None
    return FoldPruner(settings.folds, settings.prune_margin, settings.epochs, settings.prune_interval)


def make_tuner(space: SearchSpace, settings: SearchSettings, trainable: Any, verbose: int = 1) -> tune.Tuner:
    """A new search: ``trainable`` (``search.trainable.make_trainable``) run over configs the searcher proposes."""
    param_space = {"fixed": space.fixed, "max_memory_mb": settings.max_memory_mb}
    tune_config = tune.TuneConfig(
        search_alg=ExtendableSearch(
            ConcurrencyLimiter(make_searcher(space, settings), max_concurrent=settings.concurrency),
            settings.experiment_dir / EXPERIMENT_FILE,
        ),
        scheduler=make_scheduler(settings),  # searcher and scheduler each name their own metric
        num_samples=settings.trials,
        reuse_actors=True,
        trial_dirname_creator=trial_dirname,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=make_run_config(settings, verbose),
    )


def restore_tuner(settings: SearchSettings, trainable: Any) -> tune.Tuner:
    """Continue an experiment: finished trials are kept, unfinished and errored ones resumed.

    Everything the search writes goes to ``settings.experiment_dir``, also when ``tuner.pkl`` names another folder
    (a copied, renamed or moved experiment): the ``trials.csv`` callback and the search generator (which points the
    searcher's state there once Ray restores it: ``ExtendableSearch.follow_folder``) are pointed there here. The fold
    pruner is made anew from ``settings`` (it starts empty: nothing is pruned before a resumed trial finishes).
    """
    tuner = tune.Tuner.restore(
        str(settings.experiment_dir), trainable=trainable, resume_unfinished=True, resume_errored=True
    )
    internal = tuner._local_tuner  # None only through a Ray client (ray://), which runs the tuner remotely
    if internal is not None:
        run_config = internal.get_run_config()
        csv = settings.experiment_dir / TRIALS_CSV
        run_config.callbacks = [
            TrialsCsvCallback(csv) if isinstance(c, TrialsCsvCallback) else c for c in run_config.callbacks or []
        ]
        # the pruner of this code and these settings, not the pickled one (an older version's has other fields)
        run_config.stop = make_pruner(settings)
        search_alg = internal._tune_config.search_alg
        if isinstance(search_alg, ExtendableSearch):
            search_alg.experiment_file = settings.experiment_dir / EXPERIMENT_FILE
    return tuner
