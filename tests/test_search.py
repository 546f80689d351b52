"""The search end to end on CPU (the `smoke` space), and its input checks."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from ray_snapshot import start_driver, trial_statuses

from ips_search import run
from ips_search.experiment import METRIC
from ips_search.search.plan import plan_lines
from ips_search.search.tuner import SearchSettings, asha_rungs, make_scheduler, trial_constraints
from ips_search.space import define_space, load_space, searcher_space

pytestmark = pytest.mark.ray


def _study(folder: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal")))
    return optuna.load_study(study_name=folder.name, storage=storage)


def _search(results_dir: Path, name: str, *extra: str) -> int:
    return run.main(["--space", "smoke", "--results-dir", str(results_dir), "--name", name, "--no-dashboard", *extra])


def test_smoke_search_end_to_end(ray_cluster, results_dir, capsys):
    assert _search(results_dir, "e2e", "--trials", "4") == 0
    folder = results_dir / "e2e"
    df = pd.read_csv(folder / "trials.csv")
    assert len(df) == 4 and set(df["status"]) <= {"completed", "early-stopped"}
    assert df["val_accuracy"].notna().all() and (df["peak_memory_mb"] > 0).all()
    # without a GPU the memory is the estimator's CUDA peak (deterministic); the process's RSS has its own column
    assert set(df["memory_kind"]) == {"predicted-cuda"} and (df["predicted_memory_mb"] == df["peak_memory_mb"]).all()
    assert (df["host_rss_mb"] >= 0).all()
    assert ((df["memory_size"] < df["n_patches"]) & (df["iteration_size"] <= df["n_patches"] - df["memory_size"])).all()
    study = _study(folder)
    assert len(study.trials) == 4
    assert all("peak_memory_mb" in t.user_attrs for t in study.trials)
    completed = df[df["status"] == "completed"]
    assert completed["test_accuracy"].notna().all()
    saved = json.loads((folder / "experiment.json").read_text())
    assert saved["tool"] == "ips-search" and saved["settings"]["trials"] == 4
    # the default scheduler is FIFO: every trial runs its full budget
    assert saved["settings"]["scheduler"] == "fifo" and (df["status"] == "completed").all()
    out = capsys.readouterr().out
    assert "best: patch_size=" in out and f"python -m ips_search.report {folder}" in out


def test_multi_objective_search_yields_a_pareto_set(ray_cluster, results_dir, capsys):
    assert (
        _search(
            results_dir,
            "pareto",
            "--trials",
            "4",
            "--objective",
            "accuracy-memory",
            "--sampler",
            "nsga2",
            "--gpus-per-trial",
            "0.5",
        )
        == 0
    )
    study = _study(results_dir / "pareto")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert 1 <= len(study.best_trials) <= 4
    captured = capsys.readouterr()
    assert "Pareto set" in captured.out
    assert "no GPU" in captured.err  # the GPU request fell back to CPU with a warning
    df = pd.read_csv(results_dir / "pareto" / "trials.csv")
    assert (df["status"] == "completed").all()  # FIFO: every trial ran its full budget


def test_memory_budget_marks_trials_infeasible(ray_cluster, results_dir):
    # val_loss as the rung metric: a trial stopped before any epoch must still report it (Ray checks every result)
    args = ("--trials", "2", "--max-memory-mb", "1", "--scheduler", "asha", "--rung-metric", "val_loss")
    assert _search(results_dir, "budget", *args) == 0
    df = pd.read_csv(results_dir / "budget" / "trials.csv")
    assert (df["status"] == "infeasible").all() and (df["peak_memory_mb"] > 1).all()
    assert (df["memory_kind"] == "predicted-cuda").all() and (df["epochs"] == 1).all()
    for path in df["path"]:  # rejected on the prediction: not one training step
        (last,) = [json.loads(line) for line in (Path(path) / "result.json").read_text().splitlines() if line.strip()]
        assert last["epoch"] == 0 and "train_seconds" not in last and last["time_this_iter_s"] < 30
    study = _study(results_dir / "budget")
    assert all(len(trial_constraints(t)) == 1 and trial_constraints(t)[0] > 0 for t in study.trials)


def _completed(csv: Path) -> set[str]:
    return set(pd.read_csv(csv, dtype={"trial_id": str}).query("status == 'completed'")["trial_id"])


def _terminated_in_ray_snapshot(folder: Path) -> set[str]:
    """Trials Ray's experiment snapshot records as finished. A resume restores trials from that snapshot: a trial
    killed after its last report but before the snapshot caught up resumes from its last snapshotted checkpoint and
    reports its last epoch again (its earlier lines stay in result.json)."""
    return {trial for trial, status in trial_statuses(folder).items() if status == "TERMINATED"}


def test_killed_driver_resumes_without_rerunning_finished_trials(ray_cluster, results_dir):
    argv = ["--space", "smoke", "--trials", "3", "--epochs", "1", "--concurrency", "1", "--no-reference"]
    argv += ["--results-dir", str(results_dir), "--name", "killed", "--no-dashboard"]
    driver = start_driver(ray_cluster, argv, results_dir.parent / "killed.log")
    csv = results_dir / "killed" / "trials.csv"
    deadline = time.time() + 240
    while time.time() < deadline:  # a trial completed in trials.csv and in Ray's snapshot, which a resume restores
        if csv.exists() and _completed(csv) & _terminated_in_ray_snapshot(csv.parent):
            break
        time.sleep(0.5)
    else:
        driver.kill()
        pytest.fail("no trial finished in time")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished_before = _completed(csv) & _terminated_in_ray_snapshot(csv.parent)

    assert run.main(["--resume", "killed", "--results-dir", str(results_dir), "--no-dashboard"]) == 0
    df = pd.read_csv(csv)
    assert len(df) == 3 and (df["status"] == "completed").all()
    assert finished_before <= set(df["trial_id"])
    for path in df[df["trial_id"].isin(finished_before)]["path"]:
        lines = [json.loads(x) for x in (Path(path) / "result.json").read_text().splitlines() if x.strip()]
        iterations = [r["training_iteration"] for r in lines]
        assert iterations == sorted(set(iterations)), f"a finished trial ran again: {iterations}"


def test_resume_with_more_trials_extends_the_same_study(ray_cluster, results_dir, capsys):
    assert _search(results_dir, "grow", "--trials", "2", "--epochs", "1", "--no-reference") == 0
    folder = results_dir / "grow"
    first = set(pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})["trial_id"])
    argv = ["--resume", "grow", "--results-dir", str(results_dir), "--no-dashboard"]
    assert run.main([*argv, "--trials", "4"]) == 0
    df = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    assert len(df) == 4 and first < set(df["trial_id"])  # exactly the two extra trials, the first two kept
    assert len(_study(folder).trials) == 4  # the sampler's study holds all of them
    assert json.loads((folder / "experiment.json").read_text())["settings"]["trials"] == 4
    capsys.readouterr()
    assert run.main([*argv, "--trials", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--trials 3 is below the 4 trials experiment 'grow' already has" in err and len(err.splitlines()) == 1


def test_space_keeps_memory_below_patch_count():
    space = load_space("default")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    fn = searcher_space(space)
    for _ in range(200):
        trial = study.ask()
        derived = fn(trial)
        n = space.n_patches(trial.params["patch_size"])
        assert 1 <= derived["memory_size"] < n
        assert 1 <= derived["iteration_size"] <= n - derived["memory_size"]
        study.tell(trial, 0.0)
    assert define_space.__module__ == "ips_search.space"  # importable by name: Ray can pickle it for resume


BAD_YAML = "data: {dataset: megapixel\nsearch: ["
CASES = {
    "bad-yaml": (BAD_YAML, "is not valid YAML"),
    "unknown-param": ("search:\n  momentum: {low: 0.1, high: 0.9}\n", "unknown parameter 'momentum'"),
    "impossible-m": (
        "data: {canvas_size: 64}\nsearch:\n  patch_size: {choices: [32]}\n"
        "  memory_size: {low: 8, high: 16}\n  iteration_size: {low: 1, high: 2}\n",
        "memory_size low=8",
    ),
    "unknown-dataset": ("data: {dataset: imagenet}\n", "unknown dataset 'imagenet'"),
    "unknown-key": ("model: {encodr: resnet18}\n", "unknown key(s) encodr"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_space_is_one_line_and_exit_2_before_ray(case, tmp_path, results_dir, capsys, monkeypatch):
    text, message = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    monkeypatch.setattr("ips_search.search.launch.start_ray", lambda *a: pytest.fail("Ray was started"))
    assert run.main(["--space", str(path), "--results-dir", str(results_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "0"], "--trials must be at least 1"),
        (["--max-memory-mb", "-5"], "--max-memory-mb must be > 0"),
        (["--space", "nope"], "search space 'nope' not found"),
        (["--resume", "ghost"], "no experiment 'ghost'"),
        (["--results-dir", "/sys/ips-results"], "cannot create results folder"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, message, results_dir, capsys, monkeypatch):
    monkeypatch.setattr("ips_search.search.launch.start_ray", lambda *a: pytest.fail("Ray was started"))
    full = ["--results-dir", str(results_dir), *args] if "--results-dir" not in args else args
    assert run.main(full) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_results_folder_without_write_permission(results_dir, capsys, monkeypatch):
    # root ignores file modes, so the permission answer is simulated; the check itself is the real one
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert run.main(["--results-dir", str(results_dir), "--dry-run"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_resume_refuses_a_folder_from_another_tool(results_dir, capsys):
    (results_dir / "foreign").mkdir()
    (results_dir / "foreign" / "experiment.json").write_text('{"tool": "something-else"}')
    assert run.main(["--resume", "foreign", "--results-dir", str(results_dir)]) == 2
    assert "was not written by ips-search" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_starts_nothing(results_dir, capsys, monkeypatch, cache_dir):
    monkeypatch.setattr("ips_search.search.launch.start_ray", lambda *a: pytest.fail("Ray was started"))
    assert run.main(["--space", "smoke", "--results-dir", str(results_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "P=32" in out and "N=16" in out and not any(results_dir.iterdir())


@pytest.mark.parametrize("name", ["default", "smoke", "mnist_notebook", "megapixel_mnist"])
def test_shipped_spaces_are_valid(name):
    space = load_space(name)
    assert {"patch_size", "memory_size", "iteration_size", "lr"} <= set(space.params)
    space.base_config()  # every fixed section builds its dataclass
    for patch_size in space.patch_sizes():
        assert space.n_patches(patch_size) >= 2


def test_default_space_keeps_the_task_honest():
    space = load_space("default")
    data = space.base_config().data
    assert data.canvas_size >= 256
    assert data.n_digits * data.digit_size**2 / data.canvas_size**2 < 0.10
    assert space.n_patches(min(space.patch_sizes())) >= 64


def test_notebook_space_evaluates_the_notebook_config_first():
    from ips_search.space import first_points

    space = load_space("mnist_notebook")
    point = first_points(space)[0]
    study = optuna.create_study()
    study.enqueue_trial(point)
    derived = searcher_space(space)(study.ask())
    assert derived == {"memory_size": 5, "iteration_size": 5}


def test_memory_searched_with_a_fixed_iteration_size_caps_i_at_n_minus_m(tmp_path):
    text = (Path(__file__).parent.parent / "search_spaces" / "smoke.yaml").read_text()
    text = text.replace("  iteration_size: {low: 2, high: 8, log: true}\n", "")
    path = tmp_path / "m-only.yaml"
    path.write_text(text.replace("model:\n", "model:\n  iteration_size: 15\n"))
    space = load_space(str(path))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        derived = searcher_space(space)(study.ask())
        assert derived["iteration_size"] == 16 - derived["memory_size"]  # the fixed 15, capped at N - M


@pytest.mark.parametrize(("epochs", "grace", "factor"), [(8, 1, 4), (8, 2, 3), (12, 1, 3), (4, 1, 4), (3, 5, 2)])
def test_asha_rungs_are_the_ones_ray_uses(epochs, grace, factor):
    settings = SearchSettings(
        name="x",
        results_dir="/tmp/x",
        space="smoke",
        scheduler="asha",
        epochs=epochs,
        grace_period=grace,
        reduction_factor=factor,
    )
    scheduler = make_scheduler(settings)
    scheduler.set_search_properties(METRIC, "max")
    # Ray may also list a rung at max_t itself; a trial there has finished anyway, so it decides nothing.
    ray_rungs = sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs if milestone < epochs)
    assert asha_rungs(settings) == ray_rungs
    assert "rungs at" in "\n".join(plan_lines(load_space("smoke"), settings)) or not ray_rungs


@pytest.mark.parametrize(
    ("metric", "mode", "brackets"),
    [("val_accuracy", "max", 1), ("val_accuracy_best", "max", 2), ("val_loss", "min", 3)],
)
def test_scheduler_compares_what_the_flags_say(metric, mode, brackets):
    settings = SearchSettings(
        name="x",
        results_dir="/tmp/x",
        space="smoke",
        scheduler="asha",
        epochs=9,
        rung_metric=metric,
        brackets=brackets,
        grace_period=1,
        reduction_factor=3,
    )
    scheduler = make_scheduler(settings)
    assert (scheduler.metric, scheduler._mode, len(scheduler._brackets)) == (metric, mode, brackets)
    # bracket s starts at grace * factor**s: asynchronous Hyperband's spread of early-stopping aggressiveness
    firsts = [min(m for m, _ in b._rungs) for b in scheduler._brackets]
    assert sorted(firsts) == [3**s for s in range(brackets)]
    plan = "\n".join(plan_lines(load_space("smoke"), settings))
    assert f"on {metric}" in plan and (brackets == 1 or f"{brackets} brackets" in plan)


def test_rung_metric_best_so_far_is_each_trials_running_best(ray_cluster, results_dir):
    args = ("--trials", "2", "--scheduler", "asha", "--rung-metric", "val_accuracy_best", "--reduction-factor", "2")
    args += ("--no-reference",)
    assert _search(results_dir, "best-rung", *args) == 0
    saved = json.loads((results_dir / "best-rung" / "experiment.json").read_text())
    assert saved["settings"]["rung_metric"] == "val_accuracy_best"
    df = pd.read_csv(results_dir / "best-rung" / "trials.csv")
    for path in df["path"]:
        rows = [json.loads(line) for line in (Path(path) / "result.json").read_text().splitlines() if line.strip()]
        running = [max(r["val_accuracy"] for r in rows[: i + 1]) for i in range(len(rows))]
        assert [r["val_accuracy_best"] for r in rows] == running
