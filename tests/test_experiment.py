"""The experiment contract: one-way imports, the ranking rule everywhere, statuses, the trial record."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import ips_search
from ips_search.experiment import (
    COLUMN_NAMES,
    CONFIRM_COLUMNS,
    EpochReport,
    Status,
    best,
    coerce,
    pareto_front,
    rank,
    trial_record,
    trial_status,
)

PACKAGE = Path(ips_search.__file__).parent
# The pipeline, lowest first: a module may import only from its own layer or below
LAYERS = [
    {"errors", "cli", "config", "experiment"},
    {"data", "memory", "meter", "scores"},
    {"model"},
    {"warmstart", "space", "step", "train"},
    {"prediction", "extraction"},
    {"search"},
    {"report"},
    {"run", "estimate", "extract"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every ips_search module and the ips_search modules it imports (at any depth of its body)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("ips_search"):
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("ips_search"))
        graph[name] = found
    return {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle_between_modules():
    graph = _imports()
    # a package's __init__ re-exports its own submodules: that is not a cycle
    edges = {
        m: {d for d in deps if not (m == d.rsplit(".", 1)[0] or d.startswith(m + "."))} for m, deps in graph.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in edges.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, dep]))
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_imports_run_one_way_down_the_pipeline():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = []
    for module, deps in _imports().items():
        here = layer.get(_top(module))
        if here is None:
            continue
        for dep in deps:
            there = layer.get(_top(dep))
            if there is not None and there > here:
                upward.append(f"{module} imports {dep}")
    assert not upward, upward


def _group(module: str) -> str:
    """A module's level in the drawing: the package for data, model, experiment and report; the module otherwise."""
    parts = module.split(".")[1:]
    return parts[0] if parts and parts[0] in {"data", "model", "experiment", "report"} else ".".join(parts)


def test_the_search_command_is_at_most_9_levels_above_the_bottom():
    """The longest chain of imports from the search's CLI down, a package counting as one level: the pipeline, not a
    tower (data -> model -> step/train -> search -> CLI)."""
    edges: dict[str, set[str]] = {}
    for module, deps in _imports().items():
        edges.setdefault(_group(module), set()).update(_group(d) for d in deps if _group(d) != _group(module))

    def longest(node: str, trail: tuple[str, ...]) -> list[str]:
        paths = [longest(dep, (*trail, node)) for dep in edges.get(node, ()) if dep not in trail]
        return [node, *max(paths, key=len, default=[])]

    chain = longest("search.cli", ())
    assert len(chain) <= 9, " -> ".join(chain)


# Imports inside a function on purpose, each for a reason other than a cycle
IMPORTED_LATE = {
    # Ray reads RAY_AUTH_MODE when first imported; the search command sets it from its flags, then imports Ray's side
    "ips_search.search.cli._main",
}


def test_project_imports_sit_at_the_top_of_modules():
    """No ips_search import hides inside a function (to dodge a cycle, the design would be wrong). The report is one
    exception, on purpose: its plotting, notebook and attention modules load on first use, so reading an
    experiment's tables stays a light import (pandas only); ``IMPORTED_LATE`` names the others, with why."""
    inside = []
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path).startswith("ips_search.report"):
            continue
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
                if isinstance(node, (ast.Import, ast.ImportFrom)) and any(n.startswith("ips_search") for n in names):
                    inside.append(f"{_module_name(path)}.{func.name}")
    assert set(inside) <= IMPORTED_LATE, sorted(set(inside) - IMPORTED_LATE)


def test_model_data_training_and_contract_know_nothing_of_ray():
    files = [*PACKAGE.glob("model/*.py"), *PACKAGE.glob("data/**/*.py"), *PACKAGE.glob("experiment/*.py")]
    files += [PACKAGE / "train.py", PACKAGE / "search" / "plan.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path.name} imports Ray"
    code = (
        "import sys, ips_search.experiment, ips_search.search.plan, ips_search.report.load; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _trials() -> pd.DataFrame:
    """Two completed trials tied on validation accuracy; the second has higher test accuracy AND higher memory."""
    return coerce(
        pd.DataFrame(
            [
                dict(
                    trial_id="low",
                    status="completed",
                    val_accuracy=0.9,
                    test_accuracy=0.80,
                    peak_memory_mb=100.0,
                    time_total_s=50.0,
                    feasible=True,
                    memory_size=4,
                    iteration_size=4,
                    patch_size=32,
                    lr=1e-3,
                ),
                dict(
                    trial_id="high",
                    status="completed",
                    val_accuracy=0.9,
                    test_accuracy=0.99,
                    peak_memory_mb=200.0,
                    time_total_s=10.0,
                    feasible=True,
                    memory_size=8,
                    iteration_size=8,
                    patch_size=32,
                    lr=1e-3,
                ),
                dict(
                    trial_id="partial",
                    status="early-stopped",
                    val_accuracy=0.95,
                    test_accuracy=None,
                    peak_memory_mb=50.0,
                    time_total_s=5.0,
                    feasible=True,
                    memory_size=2,
                    iteration_size=2,
                    patch_size=32,
                    lr=1e-3,
                ),
                dict(
                    trial_id="over",
                    status="completed",
                    val_accuracy=0.97,
                    test_accuracy=0.97,
                    peak_memory_mb=900.0,
                    time_total_s=5.0,
                    feasible=False,
                    memory_size=9,
                    iteration_size=9,
                    patch_size=32,
                    lr=1e-3,
                ),
            ]
        )
    )


def test_a_validation_tie_is_broken_by_memory_never_by_test_accuracy():
    df = _trials()
    assert list(rank(df)["trial_id"]) == ["low", "high"]
    assert best(df)["trial_id"] == "low"


def test_a_tie_on_accuracy_and_memory_goes_to_fewer_trial_seconds():
    df = _trials()
    df.loc[df["trial_id"] == "high", "peak_memory_mb"] = 100.0
    assert best(df)["trial_id"] == "high"  # 10 s against 50 s


def test_ranking_takes_only_completed_feasible_trials():
    ranked = rank(_trials())
    assert "partial" not in set(ranked["trial_id"]) and "over" not in set(ranked["trial_id"])
    assert best(_trials().iloc[2:3]) is None
    assert best(_trials().iloc[2:3], provisional=True)["trial_id"] == "partial"


def test_report_tables_and_attention_rank_by_the_same_rule(tmp_path):
    from ips_search.report import attention, tables

    df = _trials()
    assert tables.best_trial(df)["trial_id"] == "low"
    assert list(tables.top_trials(df)["trial_id"]) == ["low", "high"]
    for trial_id in ("low", "high"):  # both have a checkpoint: the attention maps take the better ranked one
        ckpt = tmp_path / trial_id / "checkpoint_000000"
        ckpt.mkdir(parents=True)
        (ckpt / "checkpoint.pt").write_bytes(b"")
    df["path"] = [str(tmp_path / t) for t in df["trial_id"]]
    assert attention.best_trial_with_checkpoint(df)["trial_id"] == "low"
    budget = tables.budget_table(df, budgets=[1000.0])
    assert budget.loc[0, "trial_id"] == "low"


def test_cli_summary_picks_by_the_same_rule(tmp_path, capsys):
    from ips_search.experiment import TRIALS_CSV, SearchSettings
    from ips_search.search.launch import print_summary

    settings = SearchSettings(name="tie", results_dir=str(tmp_path), space="smoke")
    settings.experiment_dir.mkdir(parents=True)
    _trials().to_csv(settings.experiment_dir / TRIALS_CSV, index=False)
    print_summary(settings)
    out = capsys.readouterr().out
    assert "memory_size=4 " in out and "test accuracy 0.8000" in out


def test_pareto_front_keeps_completed_feasible_non_dominated_trials():
    front = pareto_front(_trials())
    assert list(front["trial_id"]) == ["low"]  # "high" is dominated (same accuracy, more memory)


def test_status_from_report_and_ray():
    assert trial_status("TERMINATED", {"status": "running"}) is Status.EARLY_STOPPED
    assert trial_status("TERMINATED", {"status": "completed"}) is Status.COMPLETED
    assert trial_status("ERROR", {"status": "running"}) is Status.FAILED
    assert trial_status("RUNNING", {"status": "infeasible"}) is Status.INFEASIBLE
    assert trial_status(None, {}) is Status.PENDING
    assert Status.COMPLETED == "completed" and json.dumps({"s": Status.NAN_LOSS}) == '{"s": "nan-loss"}'


def test_epoch_report_round_trips_into_the_trial_record():
    report = EpochReport(
        status=Status.COMPLETED,
        epoch=3,
        val_accuracy=0.5,
        peak_memory_mb=12.5,
        memory_kind="predicted-cuda",
        feasible=True,
        memory_size=4,
        iteration_size=2,
        patch_size=32,
        n_patches=64,
        test_accuracy=0.4,
        per_task={"val_label/accuracy": 0.5},
    )
    metrics = report.to_metrics()
    assert metrics["status"] == "completed" and "host_rss_mb" not in metrics and metrics["val_label/accuracy"] == 0.5
    row = trial_record(
        {**metrics, "training_iteration": 3},
        trial_id="t1",
        ray_status="TERMINATED",
        config={"lr": 1e-3},
        val_accuracy_best=0.6,
        path="/x",
    )
    assert set(COLUMN_NAMES) - set(CONFIRM_COLUMNS) <= set(row)  # the confirm stage fills the rest
    assert row["status"] == "completed" and row["epochs"] == 3 and row["memory_size"] == 4 and row["lr"] == 1e-3
    df = coerce(pd.DataFrame([row]).astype(str))  # as read back from CSV
    assert df["feasible"].iloc[0] is True or bool(df["feasible"].iloc[0]) is True
    assert df["epochs"].iloc[0] == 3 and df["peak_memory_mb"].iloc[0] == pytest.approx(12.5)
