"""The report on a real `smoke` experiment: files, notebook, Pareto front, crashed and half-finished experiments.

The experiment is made once per session by running the search in a subprocess (5
trials of the smoke space: enough for parameter importances). Set ``IPS_REPORT_FIXTURE=/path/to/results/<name>`` to
use an existing experiment instead (it is copied, never written to).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from test_report_notebook import visible_cells

from ips_search.errors import EXIT_BAD_INPUT
from ips_search.experiment import METRIC, best
from ips_search.report import (
    load_experiment,
    load_results,
    param_importances,
    pareto_front,
    plot_accuracy_vs_memory,
    plot_importance,
    plot_learning_curves,
    plot_parameters,
    write_report,
)
from ips_search.report.__main__ import main as report_main
from ips_search.report.importance import MIN_IMPORTANCE_TRIALS
from ips_search.report.notebook import build_notebook, path_literal
from ips_search.report.tables import _bins, budget_table, build_tables, parameter_effects

STATUSES = {"completed", "early-stopped", "infeasible", "nan-loss", "out-of-memory", "failed", "running", "pending"}
TABLES = ["all_trials.csv", "top.csv", "pareto.csv", "budgets.csv", "effects.csv", "status.csv", "importance.csv"]
PLOTS = ["accuracy_vs_memory.png", "parameters.png", "learning_curves.png", "attention.png"]
N_TRIALS = 5  # MIN_IMPORTANCE_TRIALS: the smoke trials all complete, so importance.png is drawn


@pytest.fixture(scope="session")
def smoke_experiment(tmp_path_factory, cache_dir) -> Path:
    """A finished 5-trial smoke search (run once per session), or $IPS_REPORT_FIXTURE."""
    given = os.environ.get("IPS_REPORT_FIXTURE")
    if given:
        assert (Path(given) / "experiment.json").is_file(), f"IPS_REPORT_FIXTURE={given} is not an experiment"
        return Path(given)
    results = tmp_path_factory.mktemp("report-results")
    env = {**os.environ, "IPS_SEARCH_CACHE": cache_dir, "RAY_AUTH_MODE": "token"}
    cmd = [
        sys.executable,
        "-m",
        "ips_search.run",
        "--space",
        "smoke",
        "--trials",
        str(N_TRIALS),
        "--results-dir",
        str(results),
        "--name",
        "smoke",
        "--no-dashboard",
    ]
    proc = subprocess.run(cmd, env=env, cwd=results, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the smoke search failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return results / "smoke"


def _copy(experiment: Path, dest: Path) -> Path:
    """A private copy of the experiment (without an earlier report) to damage or write into."""
    shutil.copytree(experiment, dest, ignore=shutil.ignore_patterns("report"))
    return dest


def _trial_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "result.json").is_file())


# -- the full report ---------------------------------------------------------------------------------------------------
def test_report_writes_every_file_and_the_notebook_runs(smoke_experiment, tmp_path):
    folder = _copy(smoke_experiment, tmp_path / "smoke")
    result = write_report(folder, notebook=True, html=True)
    out = folder / "report"
    assert result["dir"] == out and result["error"] is None
    for name in [*TABLES, *PLOTS, "summary.md", "report.ipynb", "report.html"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing"
    summary = (out / "summary.md").read_text()
    df = pd.read_csv(out / "all_trials.csv")
    assert len(df) == N_TRIALS and set(df["status"]) <= STATUSES
    assert N_TRIALS >= MIN_IMPORTANCE_TRIALS and (df["status"] == "completed").sum() >= MIN_IMPORTANCE_TRIALS
    importance = pd.read_csv(out / "importance.csv")
    done = df[df["status"] == "completed"]
    # Smoke trials sit at chance accuracy, and their predicted memory is one figure for every M and I of this tiny
    # model: importance needs a target that varies (test_parameter_importance_and_its_plot covers one that does)
    varies = done[METRIC].nunique() > 1 or done["peak_memory_mb"].nunique() > 1
    if varies:
        assert not importance.empty and set(importance["target"]) <= {METRIC, "peak_memory_mb"}
        assert (out / "importance.png").is_file() and "](importance.png)" in summary
    else:
        assert importance.empty and "every trial has the same value" in summary
    for section in (
        "## Top trials",
        "## Accuracy vs peak memory",
        "## Best trial under each memory budget",
        "## Parameter effects",
        "## Learning curves",
        "## Parameter importance",
        "## Attention maps",
    ):
        assert section in summary
    for png in PLOTS:
        assert f"]({png})" in summary

    nb = nbformat.read(out / "report.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4 + varies  # memory, parameters, curves, attention (and importance)
    # the notebook reads the experiment from disk: the path appears once, as a JSON string, and no numbers are pasted
    source = "\n".join(c.source for c in code)
    assert source.count(json.dumps(json.dumps(str(folder.resolve())))) == 1
    assert "load_experiment(EXPERIMENT)" in source
    top_id = str(pd.read_csv(out / "top.csv", dtype={"trial_id": str})["trial_id"].iloc[0])
    assert top_id not in source
    html = (out / "report.html").read_text()
    assert "<html" in html[:2000].lower()
    cells, code_inputs = visible_cells(html)  # the page opens with the best configuration and shows no code
    assert code_inputs == 0 and cells[0].startswith("Best configuration")
    assert f"Trial {best(load_results(folder))['trial_id']} (completed)" in cells[0]


def test_library_api_returns_frames_and_figures(smoke_experiment):
    df = load_results(smoke_experiment)
    assert isinstance(df, pd.DataFrame) and len(df) == N_TRIALS
    for col in (
        "trial_id",
        "status",
        "memory_size",
        "iteration_size",
        "patch_size",
        "lr",
        "val_accuracy",
        "val_accuracy_best",
        "test_accuracy",
        "peak_memory_mb",
        "memory_kind",
        "time_total_s",
        "path",
    ):
        assert col in df, col
    assert ((df["memory_size"] < df["n_patches"]) & (df["iteration_size"] >= 1)).all()
    exp = load_experiment(smoke_experiment)
    assert set(exp.curves["trial_id"]) == set(df["trial_id"])
    assert not exp.notes
    for fig in (
        plot_accuracy_vs_memory(df, max_memory_mb=200),
        plot_parameters(df),
        plot_learning_curves(exp.curves, df),
    ):
        assert isinstance(fig, Figure) and fig.axes
    assert not (smoke_experiment / "optuna.journal.lock").exists()  # the study was read from a copy


def _budget_lines(fig: Figure) -> list:
    return [line for line in fig.axes[0].get_lines() if line.get_label().startswith("memory budget")]


def test_accuracy_vs_memory_draws_the_budget_line_only_with_a_budget(smoke_experiment):
    df = load_results(smoke_experiment)
    fig = plot_accuracy_vs_memory(df, max_memory_mb=200)
    lines = _budget_lines(fig)
    assert len(lines) == 1
    assert set(np.asarray(lines[0].get_xdata(), dtype=float)) == {200.0}  # a vertical line at the budget
    assert fig.axes[0].get_xlim()[1] >= 200  # and in view
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "memory budget (200 MB)" in legend
    no_budget = plot_accuracy_vs_memory(df)
    assert not _budget_lines(no_budget)
    assert not [t for t in no_budget.axes[0].get_legend().get_texts() if "budget" in t.get_text()]


def _best_first(pool: pd.DataFrame) -> list[str]:
    """Trial ids by the ranking rule: validation accuracy (higher first), then peak memory, then trial-seconds (lower
    first); never test accuracy."""
    rows = sorted(pool.itertuples(), key=lambda r: (-r.val_accuracy, r.peak_memory_mb, r.time_total_s))
    return [r.trial_id for r in rows]


def _in_label(value: float, label: str) -> bool:
    """Whether an integer parameter value falls in an effects-table label ("5" or "3–7")."""
    lo, _, hi = label.partition("–")
    return int(lo) <= value <= int(hi or lo)


def test_tables_hold_the_right_trials(smoke_experiment):
    df = load_results(smoke_experiment)
    done = df[(df["status"] == "completed") & (df["feasible"].astype(str) != "False") & df["val_accuracy"].notna()]
    assert len(done) >= 2
    mem = done["peak_memory_mb"].astype(float)
    budgets = [float(mem.min()) - 1, float(mem.median()), float(mem.max())]
    tables = build_tables(df, top=3, budgets=budgets)

    top = tables["top"]
    assert list(top["rank"]) == list(range(1, min(3, len(done)) + 1))
    assert list(top["trial_id"]) == _best_first(done)[:3]
    by_id = df.set_index("trial_id")
    for row in top.itertuples():
        for col in ("val_accuracy", "test_accuracy", "peak_memory_mb", "memory_size", "lr"):
            assert getattr(row, col) == by_id.loc[row.trial_id, col], (row.trial_id, col)

    table = tables["budgets"]
    assert list(table["budget_mb"]) == budgets
    for row in table.itertuples():
        within = done[mem <= row.budget_mb]
        assert row.trials_within == len(within)
        if within.empty:
            assert pd.isna(row.trial_id)
        else:
            assert row.trial_id == _best_first(within)[0]
            assert row.peak_memory_mb <= row.budget_mb
            assert row.val_accuracy == by_id.loc[row.trial_id, "val_accuracy"]
    assert table["trials_within"].iloc[0] == 0 and table["trials_within"].iloc[-1] == len(done)
    default = budget_table(df)  # quartiles of peak memory: the largest budget holds every completed trial
    assert default["trials_within"].iloc[-1] == len(done) and default["trial_id"].iloc[-1] == _best_first(done)[0]

    effects = tables["effects"]
    assert set(effects["parameter"]) == {"memory_size", "iteration_size", "patch_size", "lr"}
    for name, rows in effects.groupby("parameter"):
        assert rows["trials"].sum() == len(done), name
        assert np.isclose((rows["trials"] * rows["mean_val_score"]).sum() / len(done), done["val_accuracy"].mean())
        if name == "lr":
            continue
        for row in rows.itertuples():  # M, I, P: whole-number labels, and the trials in each are the right ones
            members = done[[_in_label(v, row.value) for v in done[name]]]
            assert row.trials == len(members), (name, row.value)
            assert np.isclose(row.mean_val_score, members["val_accuracy"].mean())
            assert row.best_val_score == members["val_accuracy"].max()
            assert np.isclose(row.mean_peak_memory_mb, members["peak_memory_mb"].mean())
    assert effects[effects["parameter"] == "patch_size"]["value"].tolist() == ["32"]


def test_integer_parameters_get_whole_number_bins():
    values = list(range(1, 13)) * 2  # 12 values of M: binned
    df = pd.DataFrame(
        {
            "trial_id": [str(i) for i in range(len(values))],
            "status": "completed",
            "memory_size": values,
            "iteration_size": [3 * v for v in values],
            "lr": np.geomspace(1e-4, 3e-3, len(values)),
            "val_accuracy": [v / 100 for v in values],
        }
    )
    effects = parameter_effects(df)
    for name in ("memory_size", "iteration_size"):
        rows = effects[effects["parameter"] == name]
        assert 1 < len(rows) <= 5
        spans = [tuple(int(x) for x in (label.split("–") * 2)[:2]) for label in rows["value"]]  # ValueError if 2.999
        assert spans[0][0] == df[name].min() and spans[-1][1] == df[name].max()
        assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:], strict=False)), spans  # no gap, no overlap
        for (lo, hi), trials in zip(spans, rows["trials"], strict=True):
            assert trials == df[name].between(lo, hi).sum()
    lr = effects[effects["parameter"] == "lr"]["value"]
    assert all("e-0" in label for label in lr)  # floats keep their scientific edges
    assert _bins(pd.Series([0.5, 1.5, 2.5, 3.5]), "dropout", 2).str.contains(r"\.").all()  # non-integers too


def test_parameter_importance_and_its_plot():
    import optuna

    study = optuna.create_study(directions=["maximize"])
    rng = np.random.default_rng(0)
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "memory_size_quantile": optuna.distributions.FloatDistribution(0, 1),
        "patch_size": optuna.distributions.CategoricalDistribution([32]),
    }
    for _ in range(12):
        lr, q = float(10 ** rng.uniform(-4, -2)), float(rng.uniform())
        trial = optuna.trial.create_trial(
            params={"lr": lr, "memory_size_quantile": q, "patch_size": 32},
            distributions=dists,
            value=-abs(np.log10(lr) + 3),
            user_attrs={"peak_memory_mb": 100 + 500 * q},
        )
        study.add_trial(trial)
    table, note = param_importances(study)
    assert note == ""
    acc = table[table["target"] == METRIC].set_index("parameter")["importance"]
    mem = table[table["target"] == "peak_memory_mb"].set_index("parameter")["importance"]
    assert "patch_size" not in set(table["parameter"])  # a single value explains nothing
    assert acc["lr"] > acc["memory_size_quantile"] and mem["memory_size_quantile"] > mem["lr"]
    assert isinstance(plot_importance(table), Figure)
    few, note = param_importances(optuna.create_study())
    assert few.empty and "at least" in note
    assert param_importances(None)[0].empty


# -- Pareto front on constructed data ----------------------------------------------------------------------------------
def _frame(rows):
    return pd.DataFrame(rows, columns=["trial_id", "status", "feasible", "peak_memory_mb", "val_accuracy"])


def test_pareto_front_on_constructed_data():
    df = _frame(
        [
            ("a", "completed", True, 100.0, 0.50),  # front: least memory
            ("b", "completed", True, 200.0, 0.70),  # front
            ("c", "completed", True, 250.0, 0.65),  # dominated by b
            ("d", "completed", True, 300.0, 0.90),  # front
            ("e", "completed", True, 300.0, 0.90),  # equal to d: kept too
            ("f", "completed", True, 400.0, 0.90),  # dominated by d (same accuracy, more memory)
            ("g", "early-stopped", True, 50.0, 0.99),  # not full budget: ignored
            ("h", "infeasible", False, 60.0, 0.95),  # over budget: ignored
            ("i", "completed", False, 70.0, 0.95),  # completed but over budget: ignored
            ("j", "completed", True, float("inf"), 1.0),  # no finite memory: ignored
            ("k", "completed", True, 80.0, float("nan")),  # no accuracy: ignored
            ("l", "completed", True, 100.0, 0.40),  # same memory as a, worse: dominated
        ]
    )
    front = pareto_front(df)
    assert list(front["trial_id"]) == ["a", "b", "d", "e"]
    assert list(pareto_front(df, completed_only=False)["trial_id"]) == ["g"]  # dominates everything
    # other axes and directions
    maxmax = pareto_front(df, x="peak_memory_mb", y="val_accuracy", minimize_x=False)
    assert set(maxmax["trial_id"]) == {"f"}
    assert pareto_front(df.iloc[0:0]).empty
    assert pareto_front(df.drop(columns=["status", "feasible"]).iloc[[0, 1, 2]])["trial_id"].tolist() == ["a", "b"]
    # brute force on random data
    rng = np.random.default_rng(1)
    rand = _frame(
        [
            (str(i), "completed", True, float(m), float(a))
            for i, (m, a) in enumerate(zip(rng.integers(1, 20, 200), rng.integers(0, 20, 200) / 20, strict=True))
        ]
    )
    front = set(pareto_front(rand)["trial_id"])
    m, a = rand["peak_memory_mb"].to_numpy(), rand["val_accuracy"].to_numpy()
    expected = {str(i) for i in range(len(rand)) if not ((m <= m[i]) & (a >= a[i]) & ((m < m[i]) | (a > a[i]))).any()}
    assert front == expected


# -- crashed, half-finished, hostile -----------------------------------------------------------------------------------
PAYLOAD = '"); import os; os.system("touch PWNED"); ("'
PAYLOAD_SQ = "'); import os; os.system('touch PWNED'); ('"


def test_crashed_experiment_with_hostile_names_reports_and_runs_nothing(smoke_experiment, tmp_path):
    folder = _copy(smoke_experiment, tmp_path / PAYLOAD / PAYLOAD_SQ / "smoke")
    trials = _trial_dirs(folder)
    (folder / "trials.csv").unlink()  # the driver died before (re)writing it
    shutil.rmtree(trials[0])  # a trial folder lost
    lines = (trials[1] / "result.json").read_text().splitlines()
    (trials[1] / "result.json").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    # a trial folder and a trial id that look like code (and like matplotlib mathtext)
    hostile_dir = trials[2].with_name(trials[2].name + "_" + PAYLOAD)
    trials[2].rename(hostile_dir)
    rows = [json.loads(x) for x in (hostile_dir / "result.json").read_text().splitlines() if x.strip()]
    for row in rows:
        row["trial_id"] = "$x$" + PAYLOAD
    (hostile_dir / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    result = write_report(folder, notebook=True, html=False, n_images=2)
    assert result["error"] is None
    out = folder / "report"
    for name in [*TABLES, *PLOTS[:3], "summary.md", "report.ipynb"]:
        assert (out / name).is_file(), name
    df = load_results(folder)
    assert len(df) == N_TRIALS - 1 and set(df["status"]) <= STATUSES
    assert "$x$" + PAYLOAD in set(df["trial_id"])
    truncated = df[df["path"] == str(trials[1])].iloc[0]
    assert truncated["epochs"] == len(lines) - 1  # the half-written last line was skipped
    assert any("trials.csv is missing" in n for n in result["notes"])
    nb = nbformat.read(out / "report.ipynb", as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()
    # the notebook holds the path only as data: one string constant, decoded by json.loads, no other code
    assert eval(path_literal(str(folder)), {"json": json}) == str(folder)  # noqa: S307 - the literal under test
    setup = next(c.source for c in build_notebook(folder).cells if "EXPERIMENT = Path(" in c.source)
    tree = ast.parse(setup.replace("%matplotlib inline", ""))
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "os.system" not in calls and "system" not in calls
    hostile = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and "PWNED" in str(n.value)]
    assert len(hostile) == 1 and json.loads(hostile[0].value) == str(folder.resolve())


def test_half_finished_experiment_is_a_snapshot(smoke_experiment, tmp_path):
    folder = _copy(smoke_experiment, tmp_path / "running")
    csv = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    first = csv.iloc[0]
    trial_dir = folder / Path(first["path"]).name
    lines = (trial_dir / "result.json").read_text().splitlines()
    (trial_dir / "result.json").write_text(lines[0] + "\n")  # only its first epoch so far
    for ckpt in sorted(trial_dir.glob("checkpoint_*"))[1:]:
        shutil.rmtree(ckpt)
    csv.loc[0, ["status", "ray_status", "epochs"]] = ["running", "RUNNING", 1]
    pending = {c: None for c in csv.columns} | {"trial_id": "fffff000", "status": "pending", "ray_status": "PENDING"}
    csv = pd.concat([csv, pd.DataFrame([pending])], ignore_index=True)
    csv.to_csv(folder / "trials.csv", index=False)

    result = write_report(folder, notebook=False)
    df = result["experiment"].trials
    status = df.set_index("trial_id")["status"]
    assert status[first["trial_id"]] == "running" and status["fffff000"] == "pending"
    assert len(df) == N_TRIALS + 1
    summary = (folder / "report" / "summary.md").read_text()
    assert "still running or pending" in summary
    assert first["trial_id"] not in set(
        pd.read_csv(folder / "report" / "pareto.csv", dtype={"trial_id": str}).get("trial_id", pd.Series(dtype=str))
    )


def test_just_started_experiment_without_any_result(smoke_experiment, tmp_path):
    folder = _copy(smoke_experiment, tmp_path / "started")
    csv = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    metrics = [c for c in csv.columns if c not in ("trial_id", "patch_size", "lr", "path")]
    csv[metrics] = None
    csv["status"], csv["ray_status"] = "running", "RUNNING"
    csv.to_csv(folder / "trials.csv", index=False)
    for trial_dir in _trial_dirs(folder):  # started: params.json written, no epoch reported yet
        (trial_dir / "result.json").unlink()
        (trial_dir / "progress.csv").unlink(missing_ok=True)
        for ckpt in trial_dir.glob("checkpoint_*"):
            shutil.rmtree(ckpt)
    (folder / "optuna.journal").unlink()
    result = write_report(folder, notebook=False)
    df = result["experiment"].trials
    assert len(df) == N_TRIALS and set(df["status"]) == {"running"}
    assert (folder / "report" / "summary.md").is_file() and (folder / "report" / "accuracy_vs_memory.png").is_file()
    assert any("attention maps" in n for n in result["notes"])
    assert any("optuna.journal" in n for n in result["notes"])


def test_report_when_the_best_trials_data_cannot_be_rebuilt(smoke_experiment, tmp_path, capsys):
    """A folder dataset that moved: no attention maps, the same one-line note in summary.md and the notebook,
    and the rest of the report (the executed notebook and its HTML too), exit 0."""
    folder = _copy(smoke_experiment, tmp_path / "moved")
    data = {"dataset": "folder", "root": str(tmp_path / "images-that-moved"), "image_size": 128, "n_chan": 1}
    experiment = json.loads((folder / "experiment.json").read_text())
    experiment["space"]["data"] = data
    (folder / "experiment.json").write_text(json.dumps(experiment))
    for trial_dir in _trial_dirs(folder):
        params = json.loads((trial_dir / "params.json").read_text())
        params["fixed"]["data"] = data
        (trial_dir / "params.json").write_text(json.dumps(params))

    assert report_main([str(folder), "--images", "1"]) == 0
    out = folder / "report"
    for name in ["summary.md", "report.ipynb", "report.html", *PLOTS[:3]]:
        assert (out / name).is_file(), name
    assert not (out / "attention.png").exists()
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: attention maps:")]
    assert len(notes) == 1 and "could not be rebuilt" in notes[0] and "images-that-moved" in notes[0]
    nb = nbformat.read(out / "report.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = [ln for o in outputs if o.output_type == "stream" for ln in o.text.splitlines()]
    assert notes[0] in printed  # the notebook cell prints the same note
    assert notes[0].removeprefix("note: ") in (out / "summary.md").read_text().replace("\\_", "_")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_nothing_is_unpickled(smoke_experiment, tmp_path):
    folder = _copy(smoke_experiment, tmp_path / "evil")
    marker = tmp_path / "UNPICKLED"
    evil = pickle.dumps(_Evil(marker))
    for pkl in folder.rglob("*.pkl"):
        pkl.write_bytes(evil)
    best = load_results(folder)
    for path in best["path"]:
        newest = sorted(Path(path).glob("checkpoint_*"))[-1] / "checkpoint.pt"
        newest.write_bytes(evil)  # torch.load(weights_only=True) refuses it; the older checkpoint is used
    write_report(folder, notebook=False, n_images=1)
    assert not marker.exists()
    assert (folder / "report" / "attention.png").is_file()


# -- command line ------------------------------------------------------------------------------------------------------
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert report_main([]) == EXIT_BAD_INPUT
    _one_line_error(capsys)
    assert report_main([str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    assert "does not exist" in _one_line_error(capsys)
    (tmp_path / "plain").mkdir()
    assert report_main([str(tmp_path / "plain")]) == EXIT_BAD_INPUT
    assert "not an ips-search experiment" in _one_line_error(capsys)
    other = tmp_path / "other"
    other.mkdir()
    (other / "experiment.json").write_text(json.dumps({"tool": "something-else"}))
    assert report_main([str(other)]) == EXIT_BAD_INPUT
    assert "not an ips-search experiment" in _one_line_error(capsys)
    empty = tmp_path / "results" / "empty"
    empty.mkdir(parents=True)
    (empty / "experiment.json").write_text(json.dumps({"tool": "ips-search", "version": 1, "settings": {}}))
    assert report_main([str(empty)]) == EXIT_BAD_INPUT
    assert "no trials" in _one_line_error(capsys)
    assert report_main(["--latest", "--results-dir", str(tmp_path / "nowhere")]) == EXIT_BAD_INPUT
    _one_line_error(capsys)
    assert report_main(["--latest", "--results-dir", str(tmp_path / "plain")]) == EXIT_BAD_INPUT
    assert "no ips-search experiment" in _one_line_error(capsys)
    assert not (empty / "report").exists() or not any((empty / "report").iterdir())


def test_cli_latest_without_notebook(smoke_experiment, tmp_path, capsys):
    folder = _copy(smoke_experiment, tmp_path / "results" / "smoke")
    assert report_main(["--latest", "--results-dir", str(tmp_path / "results"), "--no-notebook"]) == 0
    out = capsys.readouterr().out
    assert str(folder / "report" / "summary.md") in out and "report.ipynb" not in out
    assert not (folder / "report" / "report.ipynb").exists()


def test_report_package_does_not_import_ray():
    code = (
        "import sys, ips_search.report as r, ips_search.report.__main__, ips_search.report.attention, "
        "ips_search.report.notebook, ips_search.report.plots\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
