"""The report of cross-validated, patient-level selection: the confirm stage's test figures with their interval, the
per-fold scores, the spread and the full-bag reference on the accuracy-vs-memory plot, the chosen config's ROC curve.

Experiments here are written by hand (trial folders, ``confirm.csv``, ``confirm/``, ``reference/trials.csv`` and
``test_predictions.csv``): no search runs. An experiment from before cross-validation still reports as it did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from sklearn.metrics import roc_auc_score
from test_report_notebook import visible_cells
from test_report_sources import epoch, make_experiment

from ips_search.report import (
    chosen_predictions,
    evaluation_of,
    fold_table,
    load_experiment,
    write_report,
)
from ips_search.report.notebook import write_notebook
from ips_search.report.plots import accuracy_vs_memory_data, draw_accuracy_vs_memory, draw_roc, roc_data
from ips_search.report.selection import TEST_NOT_RANKED

K = 5
# trial -> (M, peak memory MB, per-fold validation AUC, test AUC)
TRIALS = {
    "small": (2, 30.0, [0.70, 0.74, 0.66, 0.72, 0.68], 0.69),
    "mid": (4, 50.0, [0.80, 0.82, 0.78, 0.85, 0.81], 0.95),  # the best test score: it must not decide anything
    "big": (8, 90.0, [0.86, 0.84, 0.88, 0.83, 0.87], 0.75),  # the best mean over folds: the chosen config
}
CHOSEN = "big"
CONFIRM = {"confirm_runs": 3, "confirm_test_mean": 0.8123, "confirm_test_std": 0.021}
CONFIRM |= {"confirm_test_ci_low": 0.775, "confirm_test_ci_high": 0.846, "metric": "auc"}
SEEDS = (11, 12, 13)


def cv_epochs(m: int, memory: float, folds: list[float], test: float) -> list[dict[str, Any]]:
    """A cross-validated trial's result.json: one line per fold (its score once the fold finished), then the test."""
    lines = []
    for k in range(1, len(folds) + 1):
        done = folds[:k]
        lines.append(
            epoch(
                k,
                "running",
                memory_size=m,
                peak_memory_mb=memory,
                metric="auc",
                folds=K,
                folds_done=k,
                val_score=done[-1],
                val_score_mean=float(np.mean(done)),
                val_score_std=float(np.std(done, ddof=1)) if k > 1 else None,
                **{f"val_score_fold{i}": v for i, v in enumerate(done)},
            )
        )
    last = {key: v for key, v in lines[-1].items() if key != "training_iteration"}
    lines[-1] = {**last, "training_iteration": len(folds), "status": "completed", "test_score": test, "test_auc": test}
    return lines


def predictions(n: int, seed: int, classes: int = 2) -> pd.DataFrame:
    """``test_predictions.csv`` of ``n`` test slides (two per patient): probabilities that lean to the true class."""
    rng = np.random.default_rng(seed)
    label = np.arange(n) % classes
    logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[label]  # (n, classes)
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame({"slide": [f"s{i:03d}" for i in range(n)], "patient": [f"p{i // 2:03d}" for i in range(n)]})
    frame = frame.assign(task="diagnosis", label=label)
    return pd.concat([frame, pd.DataFrame(prob, columns=[f"p{c}" for c in range(classes)])], axis=1)


def trial_dir(folder: Path, trial_id: str) -> Path:
    return next(folder.glob(f"train_ips_{trial_id}_*"))


@pytest.fixture
def cv_experiment(tmp_path: Path) -> Path:
    """A finished 5-fold AUC search: three trials (predictions in the chosen one's folder), a confirm stage of the
    chosen config (three seeds, each with its predictions) and a full-bag reference run."""
    folder = make_experiment(
        tmp_path / "cv-search", {t: cv_epochs(*spec) for t, spec in TRIALS.items()}, max_memory_mb=500
    )
    predictions(40, seed=0).to_csv(trial_dir(folder, CHOSEN) / "test_predictions.csv", index=False)
    pd.DataFrame([{"trial_id": CHOSEN, **CONFIRM}]).to_csv(folder / "confirm.csv", index=False)
    runs = []
    for i, seed in enumerate(SEEDS):
        run = folder / "confirm" / f"train_ips_r{i}_00000"
        run.mkdir(parents=True)
        predictions(40, seed=seed).to_csv(run / "test_predictions.csv", index=False)
        runs.append({"trial_id": f"r{i}", "status": "completed", "confirm_of": CHOSEN, "confirm_seed": seed})
        runs[-1]["path"] = str(run)
    pd.DataFrame(runs).to_csv(folder / "confirm" / "trials.csv", index=False)
    (folder / "reference").mkdir()
    reference = {"trial_id": "ref", "status": "completed", "memory_size": 64, "iteration_size": 8, "n_patches": 64}
    reference |= {"patch_size": 32, "lr": 1e-3, "metric": "auc", "folds": K, "folds_done": K}
    reference |= {"val_score_mean": 0.9, "val_score_std": 0.03, "test_score": 0.88, "peak_memory_mb": 400.0}
    run = folder / "reference" / "train_ips_ref_00000"  # the reference run's own folder, as Tune leaves it
    run.mkdir()
    (run / "result.json").write_text(json.dumps({**reference, "training_iteration": 2}) + "\n")
    pd.DataFrame([{**reference, "epochs": 2, "path": str(run)}]).to_csv(
        folder / "reference" / "trials.csv", index=False
    )
    return folder


def test_the_new_columns_load_from_trial_folders_confirm_csv_and_the_reference(cv_experiment):
    exp = load_experiment(cv_experiment)
    ev = exp.evaluation
    assert (ev.metric, ev.folds, ev.legacy, ev.cross_validated) == ("auc", K, False, True)
    assert ev.score_label == "validation AUC, mean of 5 patient-level folds"
    big = exp.trials.set_index("trial_id").loc[CHOSEN]
    assert [big[f"val_score_fold{k}"] for k in range(K)] == pytest.approx(TRIALS[CHOSEN][2])
    assert big["val_score_mean"] == pytest.approx(np.mean(TRIALS[CHOSEN][2]))
    assert big["val_score_std"] == pytest.approx(np.std(TRIALS[CHOSEN][2], ddof=1))
    assert big["test_score"] == pytest.approx(0.75) and big["folds_done"] == K
    confirm = exp.confirm.iloc[0]
    assert confirm["trial_id"] == CHOSEN and confirm["memory_size"] == 8 and confirm["patch_size"] == 32
    assert confirm["confirm_test_ci_low"] == pytest.approx(0.775) and confirm["confirm_runs"] == 3
    assert len(exp.reference) == 1 and exp.reference.iloc[0]["val_score_mean"] == pytest.approx(0.9)
    assert exp.reference.iloc[0]["path"].endswith("train_ips_ref_00000")
    assert [n for n in exp.notes if not n.startswith("trials.csv is missing")] == []  # the reference read cleanly


def test_the_fold_table_ranks_by_the_mean_and_marks_test_as_not_ranked(cv_experiment):
    table = fold_table(load_experiment(cv_experiment).trials)
    assert list(table["trial_id"]) == ["big", "mid", "small"]  # "mid" has the best test score: it ranks second
    assert [c for c in table.columns if c.startswith("val_score_fold")] == [f"val_score_fold{k}" for k in range(K)]
    assert TEST_NOT_RANKED in table and "test_score" not in table
    assert table.loc[1, TEST_NOT_RANKED] == pytest.approx(0.95)


def test_summary_opens_with_the_confirm_stage_and_shows_folds_and_the_roc_curve(cv_experiment):
    result = write_report(cv_experiment, notebook=False)
    out = result["dir"]
    summary = (out / "summary.md").read_text()
    confirm = summary.index("## Confirm stage")
    assert confirm < summary.index("## Best configuration") < summary.index("## Cross-validation of the top trials")
    line = next(ln for ln in summary.splitlines() if ln.startswith("- Trial big"))
    assert "M=8 I=2 P=32" in line and "test AUC **0.8123 ± 0.0210** over 3 runs" in line
    assert "95% bootstrap interval [0.7750, 0.8460]" in line
    folds = summary.split("## Cross-validation of the top trials")[1].split("\n## ")[0]
    header = next(ln for ln in folds.splitlines() if ln.startswith("| rank"))
    assert all(f"fold {k}" in header for k in range(K)) and "test (not used for ranking)" in header
    big = next(ln for ln in folds.splitlines() if "| big |" in ln)
    assert "| 0.8600 | 0.8400 | 0.8800 | 0.8300 | 0.8700 | 0.8560 |" in big
    assert "validation AUC, mean of 5 patient-level folds" in summary and "Full bag (M = N), N = 64" in summary
    assert (out / "roc.png").is_file() and "](roc.png)" in summary
    assert (out / "folds.csv").is_file() and (out / "confirmed.csv").is_file()
    assert not [n for n in result["notes"] if n.startswith("ROC curve")]


def test_the_accuracy_memory_plot_has_fold_error_bars_and_the_full_bag_reference(cv_experiment):
    exp = load_experiment(cv_experiment)
    data = accuracy_vs_memory_data(exp.trials, exp.max_memory_mb, reference=exp.reference)
    assert data.y_label == "validation AUC, mean of 5 patient-level folds"
    assert data.title == "Validation AUC vs peak memory"
    (done,) = data.points
    by_id = dict(zip(done.trial_ids, done.spread, strict=True))
    assert by_id[CHOSEN] == pytest.approx(np.std(TRIALS[CHOSEN][2], ddof=1))
    assert data.front_ids == ("small", "mid", "big")  # the front as before: memory against the mean
    assert data.reference.memory_mb == 400.0 and data.reference.spread == pytest.approx(0.03)
    assert data.x_values[-1] == 400.0  # the reference is on the memory axis too

    ax = draw_accuracy_vs_memory(data).axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    trials, reference = bars[0], next(c for c in bars if c.get_label() == "full bag (M = N)")
    segments = trials.lines[2][0].get_segments()  # one vertical bar per trial: (mean - std, mean + std)
    heights = sorted(round(seg[1][1] - seg[0][1], 6) for seg in segments)
    assert heights == sorted(round(2 * s, 6) for s in done.spread)
    marker = reference.lines[0]
    assert marker.get_marker() == "*" and list(marker.get_xdata()) == [400.0] and list(marker.get_ydata()) == [0.9]
    assert reference.has_yerr
    assert "full bag (M = N)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_ylabel() == "validation AUC, mean of 5 patient-level folds"


def test_the_roc_curve_is_drawn_per_confirm_seed_and_else_from_the_chosen_trial(cv_experiment):
    exp = load_experiment(cv_experiment)
    chosen = chosen_predictions(exp)
    assert chosen.trial_id == CHOSEN and list(chosen.frames) == [f"seed {s}" for s in SEEDS]
    assert "3 confirm runs of trial big" in chosen.source
    data = roc_data(chosen.frames, chosen.source)
    (panel,) = data.panels
    assert panel.task == "diagnosis" and panel.slides == 40 and len(panel.curves) == 3
    for seed, curve in zip(SEEDS, panel.curves, strict=True):
        frame = predictions(40, seed)
        assert curve.auc == pytest.approx(roc_auc_score(frame["label"], frame["p1"]))
        assert curve.label.startswith(f"seed {seed}: positive class p1 (AUC ")
    fig = draw_roc(data)
    assert len([ln for ln in fig.axes[0].lines if ln.get_label().startswith("seed")]) == 3

    for run in (cv_experiment / "confirm").glob("train_ips_r*"):  # confirm runs without predictions: the trial's own
        (run / "test_predictions.csv").unlink()
    own = chosen_predictions(load_experiment(cv_experiment))
    assert list(own.frames) == [f"trial {CHOSEN}"] and own.note is None


def test_multi_class_roc_is_one_vs_rest_with_a_macro_average_and_one_class_is_skipped():
    frame = predictions(60, seed=3, classes=3)
    (panel,) = roc_data({"trial x": frame}).panels
    macro, *per_class = panel.curves
    assert macro.main and macro.label.startswith("macro average of 3 classes") and panel.classes == 3
    for c, curve in enumerate(per_class):
        assert not curve.main and curve.auc == pytest.approx(roc_auc_score(frame["label"] == c, frame[f"p{c}"]))
    multilabel = frame.assign(label=["".join("1" if c == v else "0" for c in range(3)) for v in frame["label"]])
    assert roc_data({"x": multilabel.astype({"label": str})}).panels[0].curves[0].label.startswith("macro average")
    one_class = frame[frame["label"] == 0].drop(columns="p2").assign(label=0)
    data = roc_data({"x": one_class})
    assert data.panels == () and "one class" in data.message


def test_an_experiment_from_before_cross_validation_reports_as_before(tmp_path):
    folder = make_experiment(
        tmp_path / "old-search",
        {
            "low": [epoch(1), epoch(2, "completed", val_accuracy=0.6, peak_memory_mb=50.0, test_accuracy=0.55)],
            "high": [epoch(1), epoch(2, "completed", val_accuracy=0.8, peak_memory_mb=90.0, test_accuracy=0.7)],
        },
        max_memory_mb=500,
    )
    old_confirm = {"trial_id": "high", "confirm_runs": 2, "confirm_val_mean": 0.79, "confirm_val_std": 0.01}
    old_confirm |= {"confirm_test_mean": 0.97, "confirm_test_std": 0.01}
    pd.DataFrame([old_confirm]).to_csv(folder / "confirm.csv", index=False)
    exp = load_experiment(folder)
    assert exp.evaluation.legacy and not exp.evaluation.cross_validated and exp.reference.empty
    assert list(exp.trials["val_score_mean"]) == list(exp.trials["val_accuracy"])  # the accuracy is the score
    data = accuracy_vs_memory_data(exp.trials)
    assert data.y_label == "validation accuracy (last epoch)" and data.title == "Validation accuracy vs peak memory"
    assert all(g.spread == () for g in data.points) and data.reference is None
    ax = draw_accuracy_vs_memory(data).axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert fold_table(exp.trials).empty and evaluation_of(exp.trials).legacy

    result = write_report(folder, notebook=False)
    summary = (result["dir"] / "summary.md").read_text()
    assert "Trial high (completed)" in summary and "by validation accuracy (ties:" in summary
    assert "- validation accuracy 0.8000, test accuracy 0.7000" in summary
    line = next(ln for ln in summary.splitlines() if ln.startswith("- Trial high"))
    assert "test accuracy **0.9700 ± 0.0100** over 2 runs; validation accuracy 0.7900 ± 0.0100" in line
    assert "recorded no bootstrap interval" in summary and "One validation split" in summary
    assert not (result["dir"] / "roc.png").exists()
    assert [n for n in result["notes"] if n.startswith("ROC curve: the chosen trial high has no test predictions")]


def test_the_notebook_opens_with_the_confirm_stage_and_draws_folds_and_roc(cv_experiment):
    paths, error = write_notebook(cv_experiment, cv_experiment / "report", execute=True, html=True)
    assert error is None
    cells, _ = visible_cells(paths["html"].read_text(encoding="utf-8"))
    assert cells[0].startswith("Best configuration") and "Trial big (completed)" in cells[0]
    assert "Confirm stage" in cells[0] and "0.8123 ± 0.0210" in cells[0] and "[0.7750, 0.8460]" in cells[0]
    assert any(c.startswith("Cross-validation of the top trials") and "fold 4" in c for c in cells)
    nb = nbformat.read(paths["notebook"], as_version=4)
    roc = next(i for i, c in enumerate(nb.cells) if c.source.startswith("## ROC curve"))
    assert "image/png" in nb.cells[roc + 1].outputs[-1].get("data", {})
