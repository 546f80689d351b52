"""TPE + ASHA against random search + FIFO: trial-seconds to reach random search's best accuracy.

Runs ``python -m ips_search.run`` twice per seed on the same space and trial count,
then reads each experiment's ``trials.csv`` and trial ``result.json`` files: trials
are ordered by when they finished, their ``time_total_s`` summed, and we report the
trial-seconds after which each strategy's best validation accuracy first reaches
the best one random search found (with the same seed).

    python benchmarks/bench_search.py --space default --trials 20 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

STRATEGIES = {
    "tpe+asha": ["--sampler", "tpe", "--scheduler", "asha"],
    "random+fifo": ["--sampler", "random", "--scheduler", "fifo"],
}


def finish_times(df: pd.DataFrame) -> pd.DataFrame:
    """Each trial's finish timestamp from its last result.json line."""
    stamps = []
    for path in df["path"]:
        lines = [x for x in (Path(path) / "result.json").read_text().splitlines() if x.strip()]
        stamps.append(json.loads(lines[-1])["timestamp"] if lines else float("inf"))
    return df.assign(finished=stamps).sort_values("finished")


def seconds_to_reach(df: pd.DataFrame, target: float) -> float | None:
    ordered = finish_times(df)
    spent = ordered["time_total_s"].cumsum()
    reached = ordered["best_val_accuracy"].cummax() >= target - 1e-9
    return float(spent[reached].iloc[0]) if reached.any() else None


def run_one(space: str, trials: int, seed: int, name: str, results: Path, extra: list[str]):
    cmd = [
        sys.executable,
        "-m",
        "ips_search.run",
        "--space",
        space,
        "--trials",
        str(trials),
        "--seed",
        str(seed),
        "--name",
        name,
        "--results-dir",
        str(results),
        "--no-dashboard",
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return pd.read_csv(results / name / "trials.csv"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="default")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--results-dir", default="results/bench-search")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for seed in args.seeds:
        runs = {}
        for strategy, extra in STRATEGIES.items():
            name = f"{args.space}-{strategy.replace('+', '-')}-s{seed}-{stamp}"
            runs[strategy] = run_one(args.space, args.trials, seed, name, results, extra)
        target = float(runs["random+fifo"][0]["best_val_accuracy"].max())
        for strategy, (df, wall) in runs.items():
            spent = seconds_to_reach(df, target)
            rows.append(
                {
                    "seed": seed,
                    "strategy": strategy,
                    "trials": len(df),
                    "best_val_accuracy": float(df["best_val_accuracy"].max()),
                    "target": target,
                    "trial_seconds_to_target": spent,
                    "total_trial_seconds": float(df["time_total_s"].sum()),
                    "wall_seconds": wall,
                }
            )
    table = pd.DataFrame(rows)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    md = f"Space `{args.space}`, {args.trials} trials, seeds {args.seeds}; {machine}\n\n" + table.to_markdown(
        index=False, floatfmt=".3f"
    )
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"search-{args.space}-{stamp}.md").write_text(md + "\n")
    table.to_json(out / f"search-{args.space}-{stamp}.json", orient="records", indent=2)


if __name__ == "__main__":
    main()
