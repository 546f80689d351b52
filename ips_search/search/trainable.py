"""The Ray Tune trainable: one trial = train and evaluate IPSNet for one config.

A plain function, as in Ray Tune's examples: it calls ``tune.report`` once per
epoch with validation metrics, peak memory and speed, and a checkpoint (model,
optimiser, scheduler, fold and epoch), so a paused, early-stopped-then-resumed or
restored trial continues where it was. With ``evaluation.folds`` K > 1 it trains
once per patient-level fold of ``splits.csv`` (the data built once) and reports
the mean and spread of the folds' validation scores. Each fold's model scores
the test set once, at the fold's end; the last report adds the mean of those
test figures, and the last model's test predictions in the last checkpoint.

Statuses a trial can end with (the ``status`` metric): ``running`` (an epoch
report), ``completed`` (all epochs of all folds), ``infeasible`` (the predicted CUDA peak of a training step is
over ``max_memory_mb``, so it never trains; or, on a GPU, its first measured step went over), ``nan-loss`` and
``out-of-memory``. An infeasible or failed trial reports a validation score and accuracy of 0 so the searcher
ranks it last; the ``status`` column says why.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from ray import tune

from ips_search.config import ExperimentConfig
from ips_search.data import DataSplits, build_datasets
from ips_search.data.cohort import cohort_splits, fold_splits, test_items
from ips_search.experiment import (
    CHECKPOINT_FILE,
    PREDICTIONS_FILE,
    EpochReport,
    MemoryKind,
    SearchSettings,
    Status,
    splits_file,
)
from ips_search.experiment.confirmation import RUN
from ips_search.extraction import resolve_data
from ips_search.prediction import estimate_memory, estimate_phases
from ips_search.space import trial_config
from ips_search.train import NonFiniteLossError, Training, evaluate, resolve_device, setup, train_one_epoch


class OverBudgetError(RuntimeError):
    """The memory probe (first training step) exceeded the trial's memory budget."""

    def __init__(self, peak_mb: float, budget_mb: float) -> None:
        super().__init__(f"first step used {peak_mb:.0f} MB, over the {budget_mb:.0f} MB budget")
        self.peak_mb = peak_mb


def _trial_resources() -> tuple[int, float]:
    """(CPUs, GPUs) this trial was given; (1, 0) outside Ray Tune."""
    try:
        resources = tune.get_context().get_trial_resources().required_resources
    except Exception:  # noqa: BLE001 - not inside a Tune session (e.g. called directly in a test)
        return max(1, os.cpu_count() or 1), 0.0
    return max(1, int(resources.get("CPU", 1))), float(resources.get("GPU", 0.0))


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _save_checkpoint(directory: str, run: Training, progress: Progress, epoch: int) -> tune.Checkpoint:
    state = {
        **run.state_dict(),
        "epoch": epoch,
        "next_fold": progress.fold,
        "next_epoch": progress.epoch,
        "fold_scores": list(progress.fold_scores),
        "fold_tests": [dict(t) for t in progress.fold_tests],
        "running_score": progress.running,
        "peak_memory_mb": progress.peak_mb,
        "host_rss_mb": progress.host_rss_mb,
        "val_accuracy_best": progress.best_val,
    }
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    return tune.Checkpoint.from_directory(directory)


def load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint this trainable wrote; tensors and plain types only (``weights_only=True``)."""
    try:
        return torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file is this trial's problem, in one line
        reason = _one_line_reason(exc)
        raise RuntimeError(
            f"checkpoint {path} is unreadable or not ours ({type(exc).__name__}: {reason[:200]}); "
            "delete it to restart this trial from scratch"
        ) from None


def _one_line_reason(exc: Exception) -> str:
    """The informative line of an exception (torch's unpickling errors put advice first), without ANSI codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line] or [type(exc).__name__]
    return next((line for line in lines if "unsupported global" in line.lower()), lines[0])[:200]


def train_ips(config: dict[str, Any], experiment_dir: str | None = None) -> None:
    """Tune trainable. ``config``: ``fixed`` (the space's fixed sections), ``max_memory_mb`` and sampled values;
    ``experiment_dir``: the search's folder, whose ``splits.csv`` the trial reads (:func:`follow_splits`).

    With ``evaluation.folds`` K > 1 the config trains K times, once per patient-level fold of the non-test items
    (the data built once), reporting after every epoch; ``val_score_mean`` is the mean over the finished folds and
    the running one's latest epoch, so the last report's is the K-fold mean the searcher ranks by. The test set is
    scored once by each fold's model at the fold's end (``test_score_fold{k}``; ``evaluation.refit``: once, by the
    model trained on every non-test item); ``test_score`` is their mean. Test never ranks."""
    exp = follow_splits(trial_config(config["fixed"], config), experiment_dir)
    budget = config.get("max_memory_mb")
    cpus, gpus = _trial_resources()
    torch.set_num_threads(cpus)
    device = resolve_device(exp.train.device)
    if device.type == "cuda" and 0 < gpus < 1:
        torch.cuda.set_per_process_memory_fraction(gpus, device)

    # cached on disk and in-process: reused actors don't rebuild it (features: extracted once, by the driver)
    data_start = time.perf_counter()
    splits = build_datasets(resolve_data(exp.data, progress=False))
    table = cohort_splits(splits, exp.evaluation, exp.train.seed)
    folds = fold_splits(splits, table, exp.evaluation)
    data_seconds = time.perf_counter() - data_start
    predicted = predict_peak_mb(exp, splits)
    gradient = predict_gradient_mb(exp, splits) if predicted is not None else None
    base = {
        "n_patches": splits.n_patches,
        "memory_size": exp.model.memory_size,
        "iteration_size": exp.model.iteration_size,
        "patch_size": exp.data.patch_size,
        "device": device.type,
        "node_id": _node_id(),
        "predicted_memory_mb": predicted,
        "predicted_gradient_mb": gradient,
        "data_seconds": data_seconds,
        "metric": exp.evaluation.metric,
        "folds": len(folds),
    }
    if budget and predicted is not None and predicted > budget:  # told to Optuna as infeasible, never trained
        return _report_stopped(base, Status.INFEASIBLE, predicted, MemoryKind.PREDICTED_CUDA.value, epoch=-1)
    # On a GPU the caching allocator's peak is exact and the first step is probed against the budget; on the CPU
    # the process's RSS is noise, so the deterministic prediction stands for the memory and RSS gets its own column
    measured = device.type == "cuda" or predicted is None

    progress = Progress()
    checkpoint = tune.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
        progress = Progress.from_state(state)

    def probe(step: int, mem_mb: float) -> None:
        if budget and measured and step == 0 and mem_mb > budget:
            raise OverBudgetError(mem_mb, budget)

    for fold in range(progress.fold, len(folds)):
        run = setup(exp, folds[fold], device)
        if state is not None and progress.epoch > 0:
            run.load_state_dict(state)  # the checkpoint is within this fold: continue it
        for epoch in range(progress.epoch, exp.train.epochs):
            first = fold == 0 and epoch == 0
            try:
                train = train_one_epoch(
                    run.model,
                    run.train_loader,
                    run.optimizer,
                    run.scheduler,
                    exp.train,
                    device,
                    on_step=probe if first else None,
                )
            except OverBudgetError as exc:
                return _report_stopped(base, Status.INFEASIBLE, exc.peak_mb, _kind(device), epoch)
            except NonFiniteLossError as exc:
                kind = _kind(device) if measured else MemoryKind.PREDICTED_CUDA.value
                peak = progress.peak_mb if measured else predicted
                return _report_stopped(base, Status.NAN_LOSS, peak, kind, epoch, error=str(exc))
            except torch.cuda.OutOfMemoryError:
                return _report_stopped(base, Status.OUT_OF_MEMORY, math.inf, MemoryKind.CUDA.value, epoch)
            metric = exp.evaluation.metric
            val = None if run.val_loader is None else evaluate(run.model, run.val_loader, device, exp.train.amp, metric)
            if device.type == "cpu":
                progress.host_rss_mb = max(progress.host_rss_mb, train["peak_memory_mb"])
            progress.peak_mb = max(progress.peak_mb, train["peak_memory_mb"]) if measured else predicted
            fold_end = epoch == exp.train.epochs - 1
            last = fold_end and fold == len(folds) - 1
            report = EpochReport(
                **base,
                status=Status.COMPLETED if last else Status.RUNNING,
                epoch=epoch + 1,
                fold=fold,
                train_loss=train["loss"],
                train_accuracy=train["accuracy"],
                peak_memory_mb=progress.peak_mb,
                memory_kind=train["memory_kind"] if measured else MemoryKind.PREDICTED_CUDA.value,
                host_rss_mb=progress.host_rss_mb if device.type == "cpu" else None,
                feasible=budget is None or progress.peak_mb <= budget,
                epoch_seconds=train["seconds"] + (val["seconds"] if val else 0.0),
                train_seconds=train["seconds"],
                images_per_s=train["images_per_s"],
            )
            if val is not None:
                progress.validated(val, fold_end)
                progress.fill(report, val)
            if fold_end:  # each fold's model scores the test set once (CLAM's convention); never per epoch
                test = evaluate(run.model, run.test_loader, device, exp.train.amp, metric, keep_predictions=last)
                progress.tested(test)
                report.test_fold_scores = [t["score"] for t in progress.fold_tests]
                if last:
                    progress.fill_test(report)
            progress.fold, progress.epoch = (fold + 1, 0) if fold_end else (fold, epoch + 1)
            with tempfile.TemporaryDirectory() as directory:
                if last:
                    write_predictions(directory, test["predictions"], test_items(table))
                checkpoint_out = _save_checkpoint(directory, run, progress, epoch)
                tune.report(report.to_metrics(), checkpoint=checkpoint_out)
        state = None
        progress.epoch = 0


@dataclass
class Progress:
    """Where a trial stands across its folds, and what its checkpoint carries besides the model: the next fold and
    epoch to run, each finished fold's score, the running fold's latest, and the memory and best figures so far."""

    fold: int = 0
    epoch: int = 0
    fold_scores: list[float] = field(default_factory=list)
    fold_tests: list[dict[str, float]] = field(default_factory=list)  # each finished fold's model's test figures
    running: float | None = None
    peak_mb: float = 0.0
    host_rss_mb: float = 0.0
    best_val: float = 0.0

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        fold, epoch = int(state.get("fold", 0)), int(state["epoch"])
        return cls(
            fold=int(state.get("next_fold", fold)),
            epoch=int(state.get("next_epoch", epoch + 1)),
            fold_scores=[float(v) for v in state.get("fold_scores", [])],
            fold_tests=[{k: float(v) for k, v in t.items()} for t in state.get("fold_tests", [])],
            running=state.get("running_score"),
            peak_mb=float(state["peak_memory_mb"]),
            host_rss_mb=float(state.get("host_rss_mb", 0.0)),
            best_val=float(state.get("val_accuracy_best", 0.0)),
        )

    def validated(self, val: dict[str, Any], fold_end: bool) -> None:
        self.best_val = max(self.best_val, val["accuracy"])
        self.running = None if fold_end else float(val["score"])
        if fold_end:
            self.fold_scores.append(float(val["score"]))

    def tested(self, test: dict[str, Any]) -> None:
        """Keep a fold model's test figures: the scalar ones (scores, loss, per-task metrics, seconds)."""
        keep = ("score", "accuracy", "auc", "balanced_accuracy", "loss", "seconds")
        figures = {k: v for k, v in test.items() if k in keep or "/" in k}
        self.fold_tests.append({k: math.nan if v is None else float(v) for k, v in figures.items()})

    def fill_test(self, report: EpochReport) -> None:
        """The test figures of the last report: each the mean over the fold models (one model when refitting), so
        a config's test score doesn't hang on one fold's luck; ``test_seconds`` is one scoring's."""
        tests = pd.DataFrame(self.fold_tests)
        mean = tests.mean(skipna=True)  # an undefined AUC (one class in a task) is NaN: left out of the mean
        report.test_score, report.test_accuracy = float(mean["score"]), float(mean["accuracy"])
        report.test_loss = float(mean["loss"])
        report.test_seconds = float(tests["seconds"].iloc[-1])
        report.test_auc, report.test_balanced_accuracy = _defined(mean["auc"]), _defined(mean["balanced_accuracy"])
        report.per_task.update({f"test_{k}": float(v) for k, v in mean.items() if "/" in k})

    def scores(self) -> list[float]:
        """The finished folds' scores and the running fold's latest."""
        return [*self.fold_scores, *([] if self.running is None else [self.running])]

    def fill(self, report: EpochReport, val: dict[str, Any]) -> None:
        """The validation figures of ``report``: this epoch's, and the mean and spread over folds."""
        report.val_accuracy, report.val_loss, report.val_accuracy_best = val["accuracy"], val["loss"], self.best_val
        report.val_score, report.val_auc = val["score"], _defined(val["auc"])
        report.val_balanced_accuracy = _defined(val["balanced_accuracy"])
        report.val_score_mean = float(np.mean(self.scores()))
        report.val_score_std = float(np.std(self.fold_scores, ddof=1)) if len(self.fold_scores) > 1 else None
        report.folds_done, report.fold_scores = len(self.fold_scores), list(self.fold_scores)
        report.per_task.update({f"val_{k}": v for k, v in val.items() if "/" in k})


def _defined(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def write_predictions(
    directory: str, predictions: dict[str, tuple[np.ndarray, np.ndarray]], rows: pd.DataFrame
) -> None:
    """The test set's probabilities into the checkpoint ``directory`` (:data:`PREDICTIONS_FILE`): one row per test
    item and task, ``slide, patient, task, label, p0, p1, ..`` (multi-label: ``label`` the 0/1 string, ``p<k>``
    each label's), for the confirm stage's interval and the report's ROC curve."""
    frames = []
    for task, (prob, y) in predictions.items():
        frame = rows[["slide", "patient"]].copy()
        frame.insert(2, "task", task)
        frame.insert(3, "label", ["".join(str(int(v)) for v in t) if np.ndim(t) else int(t) for t in y])
        frames.append(pd.concat([frame, pd.DataFrame(prob, columns=[f"p{k}" for k in range(prob.shape[1])])], axis=1))
    if frames:
        pd.concat(frames, ignore_index=True).to_csv(Path(directory) / PREDICTIONS_FILE, index=False)


def predict_peak_mb(exp: ExperimentConfig, splits: DataSplits) -> float | None:
    """The estimator's CUDA peak of one training step of ``exp`` (:mod:`ips_search.prediction`), or ``None`` if it
    can't estimate this config (the trial then reports measured memory, as before the estimator)."""
    try:
        return estimate_memory(exp, splits.geometry, "cuda").peak_mb
    except Exception as exc:  # noqa: BLE001 - an estimator gap must not cost the trial
        warnings.warn(f"no memory estimate for this config ({type(exc).__name__}: {exc}); measuring", stacklevel=2)
        return None


def predict_gradient_mb(exp: ExperimentConfig, splits: DataSplits) -> float | None:
    """The part of the predicted peak that M (and P) move: the gradient pass over the kept patches, above the model
    state (:func:`ips_search.prediction.estimate_phases`); ``None`` where the phases can't be split."""
    try:
        return estimate_phases(exp, splits.geometry, "cuda").gradient_mb
    except Exception as exc:  # noqa: BLE001 - a plot's extra panel must not cost the trial
        warnings.warn(f"no phase split for this config ({type(exc).__name__}: {exc})", stacklevel=2)
        return None


def _report_stopped(base: dict, status: Status, peak_mb: float, kind: str, epoch: int, **extra: Any) -> None:
    """The last report of a trial that can't go on: accuracy 0 (loss infinite) so every rung metric ranks it last."""
    feasible = status == Status.NAN_LOSS  # it fit in memory; it diverged
    report = EpochReport(
        **base,
        status=status,
        epoch=epoch + 1,
        val_accuracy=0.0,
        val_score=0.0,
        val_score_mean=0.0,
        val_accuracy_best=0.0,
        val_loss=math.inf,
        peak_memory_mb=peak_mb,
        memory_kind=kind,
        feasible=feasible,
        **extra,
    )
    tune.report(report.to_metrics())


def _kind(device: torch.device) -> str:
    return (MemoryKind.CUDA if device.type == "cuda" else MemoryKind.CPU_RSS).value


def follow_splits(exp: ExperimentConfig, experiment_dir: str | None) -> ExperimentConfig:
    """``exp`` reading the ``splits.csv`` of ``experiment_dir`` (the folder the search runs in) when it has one.

    A trial's saved config names the splits file of the folder the search was started in; a trial Ray restores in
    a copied or moved experiment keeps that config, and the original may be gone or differ."""
    here = splits_file(experiment_dir) if experiment_dir is not None and exp.evaluation.splits else None
    if here is None:
        return exp
    return dataclasses.replace(exp, evaluation=dataclasses.replace(exp.evaluation, splits=str(here)))


def make_trainable(settings: SearchSettings) -> Any:
    """``train_ips`` bound to the search's folder, with the resources a trial asks Ray for (one bundle of CPUs and
    GPUs). A resume binds the folder it resumes, so restored trials read that folder's splits."""
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    bound = tune.with_parameters(train_ips, experiment_dir=str(settings.experiment_dir))
    return tune.with_resources(bound, resources)


def confirm_ips(config: dict[str, Any]) -> None:
    """Tune trainable of a confirm run: the search's trainable on one stored config with another seed."""
    train_ips(config[RUN])
