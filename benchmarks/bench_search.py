"""Search strategies against random search + FIFO: trial-seconds to reach random search's best accuracy.

Runs ``python -m ips_search.run`` once per strategy and seed on the same space and trial count,
then reads each experiment's ``trials.csv`` and trial ``result.json`` files: trials
are ordered by when they finished, their ``time_total_s`` summed, and we report the
trial-seconds after which each strategy's best validation accuracy first reaches
the best one random search found (with the same seed).

    python benchmarks/bench_search.py --space default-features --trials 50 --seeds 0 1 2

Every strategy starts from the space's same ``first:`` configs and the same seed. The target a
strategy must reach is random + FIFO's final best validation accuracy with that seed (the best last
epoch of a completed trial: what a search chooses by); ``fraction_final`` is the trial-seconds it
needed, over random + FIFO's total. ``fraction_any_epoch`` does the same for the best epoch of any
trial. ``chosen_val`` / ``chosen_test`` are the config the search picks (validation first).
For random + FIFO, ``winner_rank_epochE`` is where its best trial stood among all its trials after
epoch E: the rank an early-stopping rung at that epoch judges it by.
``--extend-to-fraction 0.5`` resumes each early-stopping search with as many more trials as fit into
half of random + FIFO's trial-seconds, the budget the target allows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from ips_search.experiment import renamed

STRATEGIES = {
    "random+fifo": ["--sampler", "random", "--scheduler", "fifo"],
    "tpe+asha": ["--sampler", "tpe", "--scheduler", "asha"],  # Ray's ASHA defaults: rungs at 1, 4 of 10 epochs
    "tpe+asha-best-g2r3": [  # rungs at 2, 6 on each trial's best epoch so far
        *("--sampler", "tpe", "--scheduler", "asha", "--grace-period", "2", "--reduction-factor", "3"),
        *("--rung-metric", "val_accuracy_best"),
    ],
    "tpe+asha-hyperband": [  # asynchronous Hyperband: brackets with grace 1 and 3
        *("--sampler", "tpe", "--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "3"),
        *("--brackets", "2", "--rung-metric", "val_accuracy_best"),
    ],
    "tpe+fifo": ["--sampler", "tpe", "--scheduler", "fifo"],
    # the sampler alone within the target's budget: full-length trials, half as many (later --trials wins)
    "tpe+fifo-half": ["--sampler", "tpe", "--scheduler", "fifo", "--trials", "25"],
}


def experiment_name(space: str, strategy: str, seed: int, stamp: str) -> str:
    """The experiment folder of one strategy and seed (``--stamp`` finds it again)."""
    return f"{space}-{strategy.replace('+', '-')}-s{seed}-{stamp}"


def finish_times(df: pd.DataFrame) -> pd.DataFrame:
    """Each trial's finish timestamp from its last result.json line."""
    stamps = []
    for path in df["path"]:
        lines = [x for x in (Path(path) / "result.json").read_text().splitlines() if x.strip()]
        stamps.append(json.loads(lines[-1])["timestamp"] if lines else float("inf"))
    return df.assign(finished=stamps).sort_values("finished")


def seconds_to_reach(df: pd.DataFrame, target: float, column: str, completed_only: bool) -> float | None:
    """Trial-seconds (summed in the order trials finished) until a trial's ``column`` first reaches ``target``."""
    ordered = finish_times(df)
    spent = ordered["time_total_s"].cumsum()
    values = ordered[column].where(ordered["status"] == "completed") if completed_only else ordered[column]
    reached = values.fillna(-1.0).cummax() >= target - 1e-9
    return float(spent[reached].iloc[0]) if reached.any() else None


def winner_ranks(folder: Path, df: pd.DataFrame, epochs: tuple[int, ...] = (1, 4)) -> dict[str, int | None]:
    """Where the trial that ended best (completed, last validation accuracy) stood among all trials after each of
    ``epochs``: the rank an early-stopping rung at that epoch would have judged it by (1 = best)."""
    from ips_search.report import load_curves

    done = df[df["status"] == "completed"]
    if done.empty:
        return {f"winner_rank_epoch{e}": None for e in epochs}
    winner = done.loc[done["val_accuracy"].idxmax(), "trial_id"]
    curves = load_curves(folder)  # one row per trial and epoch
    ranks = {}
    for e in epochs:
        at = curves[curves["epoch"] == e].set_index("trial_id")["val_accuracy"].dropna()
        ranks[f"winner_rank_epoch{e}"] = 1 + int((at > at[winner]).sum()) if winner in at.index else None
    return ranks


def chosen(df: pd.DataFrame) -> pd.Series | None:
    """The config the search picks (ips_search.experiment.rank: completed, by validation accuracy, then memory)."""
    from ips_search.experiment import best

    return best(df)


def run_one(space: str, trials: int, seed: int, name: str, results: Path, extra: list[str]):
    """Run one search (or read it back when ``results/name`` already finished: ``--stamp`` reuses runs)."""
    folder = results / name
    if (folder / "wall.json").is_file():
        wall = json.loads((folder / "wall.json").read_text())["wall_seconds"]
        return renamed(pd.read_csv(folder / "trials.csv")), wall
    cmd = [sys.executable, "-m", "ips_search.run", "--space", space, "--trials", str(trials), "--seed", str(seed)]
    cmd += ["--name", name, "--results-dir", str(results), "--no-dashboard", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    (folder / "wall.json").write_text(json.dumps({"wall_seconds": wall}))
    return renamed(pd.read_csv(folder / "trials.csv")), wall


def extend(results: Path, name: str, df: pd.DataFrame, budget: float) -> pd.DataFrame:
    """Resume a finished search with as many more trials as its mean trial cost fits into ``budget`` trial-seconds
    (``--resume NAME --trials N``: the same Optuna study and scheduler go on)."""
    spent, per_trial = float(df["time_total_s"].sum()), float(df["time_total_s"].mean())
    more = int((budget - spent) / per_trial)
    if more < 1:
        return df
    cmd = [sys.executable, "-m", "ips_search.run", "--resume", name, "--trials", str(len(df) + more)]
    subprocess.run([*cmd, "--results-dir", str(results), "--no-dashboard"], check=True, stdout=subprocess.DEVNULL)
    return renamed(pd.read_csv(results / name / "trials.csv"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="default")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES)[:3])
    parser.add_argument("--results-dir", default="results/bench-search")
    parser.add_argument("--stamp", default=None, help="reuse the finished runs of an earlier call with this stamp")
    parser.add_argument(
        "--extend-to-fraction",
        type=float,
        default=None,
        help="resume each strategy's finished search with the trials its mean cost fits into this fraction of random "
        "+ FIFO's trial-seconds (e.g. 0.5: the budget the target allows)",
    )
    parser.add_argument("--tag", default="", help="appended to the results file names (e.g. 'extended')")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    stamp = args.stamp or time.strftime("%Y%m%d-%H%M%S")
    for seed in args.seeds:
        runs = {}
        for strategy in dict.fromkeys(["random+fifo", *args.strategies]):
            name = experiment_name(args.space, strategy, seed, stamp)
            runs[strategy] = run_one(args.space, args.trials, seed, name, results, STRATEGIES[strategy])
        baseline = runs["random+fifo"][0]
        random_budget = float(baseline["time_total_s"].sum())
        if args.extend_to_fraction:
            for strategy, (df, wall) in list(runs.items()):
                name = experiment_name(args.space, strategy, seed, stamp)
                if strategy != "random+fifo" and len(df) == args.trials:
                    runs[strategy] = (extend(results, name, df, args.extend_to_fraction * random_budget), wall)
        # "final": what the search chooses by (a completed trial's last validation accuracy); "any": any epoch
        target_final = float(baseline.loc[baseline["status"] == "completed", "val_accuracy"].max())
        target_any = float(baseline["val_accuracy_best"].max())
        baseline_ranks = winner_ranks(results / experiment_name(args.space, "random+fifo", seed, stamp), baseline)
        for strategy, (df, wall) in runs.items():
            final = seconds_to_reach(df, target_final, "val_accuracy", completed_only=True)
            any_epoch = seconds_to_reach(df, target_any, "val_accuracy_best", completed_only=False)
            pick = chosen(df)
            rows.append(
                {
                    "seed": seed,
                    "strategy": strategy,
                    "trials": len(df),
                    "completed": int((df["status"] == "completed").sum()),
                    "chosen_val": None if pick is None else float(pick["val_accuracy"]),
                    "chosen_test": None if pick is None else float(pick["test_accuracy"]),
                    "target_final": target_final,
                    "seconds_to_final": final,
                    "fraction_final": math.inf if final is None else final / random_budget,
                    "target_any_epoch": target_any,
                    "fraction_any_epoch": math.inf if any_epoch is None else any_epoch / random_budget,
                    "total_trial_seconds": float(df["time_total_s"].sum()),
                    "wall_seconds": wall,
                    **(baseline_ranks if strategy == "random+fifo" else {}),
                }
            )
    table = pd.DataFrame(rows)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    summary = table.groupby("strategy", sort=False).agg(
        seeds_reaching_final=("seconds_to_final", "count"),
        median_fraction_final=("fraction_final", "median"),
        median_fraction_any_epoch=("fraction_any_epoch", "median"),
        median_chosen_val=("chosen_val", "median"),
        median_chosen_test=("chosen_test", "median"),
        median_total_trial_seconds=("total_trial_seconds", "median"),
        median_wall_seconds=("wall_seconds", "median"),
    )
    md = (
        f"Space `{args.space}`, {args.trials} trials, seeds {args.seeds}; {machine}\n\n"
        f"Command: `python benchmarks/bench_search.py {' '.join(sys.argv[1:])}`\n\n"
        + summary.to_markdown(floatfmt=".3f")
        + "\n\nPer seed:\n\n"
        + table.to_markdown(index=False, floatfmt=".3f")
    )
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"search-{args.space}-{stamp}" + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.md").write_text(md + "\n")
    table.to_json(out / f"{stem}.json", orient="records", indent=2)


if __name__ == "__main__":
    main()
