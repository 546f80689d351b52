"""Searches side by side: the same command in several checkouts or spaces, back to back, on one machine.

These shared machines differ by 2x and more in speed, so a search time means something only next to another one
measured in the same hour. Each run is ``python -m ips_search.run`` as a newcomer runs it (dashboard on unless
``--no-dashboard``), with its own empty cache folder unless ``--warm-cache`` (then the user's cache), and is timed
from the command's start to its exit (``wall``) and from its first trial's start to its last trial's end
(``search``, from the trials' ``result.json`` timestamps: the part data preparation doesn't cover).

    python benchmarks/bench_side_by_side.py --run old=/path/to/old/checkout:default --run new=.:default
    python benchmarks/bench_side_by_side.py --warm-cache --run e2e=.:default --run features=.:default-features

A run is ``LABEL=CHECKOUT:SPACE[:EXTRA ARGS]``; the checkout's code runs with this Python (``PYTHONPATH``). EXTRA
ARGS come after ``--trials``, so a run's own ``--trials`` wins. The best config is the experiment contract's
(``ranking.best``): with a confirm stage, a confirmed config by its mean over seeds, whose mean validation and test
accuracy are reported (``best_seeds`` runs); the confirm runs count in the search's time and trial-seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from ips_search.experiment import ranking
from ips_search.experiment.files import CONFIRM_DIR


def trial_span(experiment: Path, trials: pd.DataFrame) -> float:
    """Seconds from the first trial's start to the last trial's end."""
    starts, ends = [], []
    for path in trials["path"]:
        lines = [json.loads(x) for x in (Path(path) / "result.json").read_text().splitlines() if x.strip()]
        if lines:
            first = lines[0]
            starts.append(first["timestamp"] - first.get("time_this_iter_s", 0.0))
            ends.append(lines[-1]["timestamp"])
    return max(ends) - min(starts) if starts else float("nan")


def run_one(label: str, spec: str, trials: int, results: Path, dashboard: bool, warm_cache: bool) -> dict:
    checkout, _, rest = spec.partition(":")
    space, _, extra = rest.partition(":")
    name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "ips_search.run", "--space", space or "default", "--trials", str(trials)]
    cmd += ["--name", name, "--results-dir", str(results), *shlex.split(extra)]
    cmd += [] if dashboard else ["--no-dashboard"]
    env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
    cache = None if warm_cache else tempfile.mkdtemp(prefix=f"cold-{label}-")
    if cache:
        env["IPS_SEARCH_CACHE"] = cache
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    df = pd.read_csv(results / name / "trials.csv")
    confirm_csv = results / name / CONFIRM_DIR / "trials.csv"
    confirm = pd.read_csv(confirm_csv) if confirm_csv.exists() else df.iloc[0:0]
    best = ranking.best(df)  # the experiment contract's rule: a confirmed config by its mean over seeds
    confirmed = best is not None and pd.notna(best.get("confirm_val_mean"))
    every_run = pd.concat([df, confirm])  # the confirm stage is part of the search's time
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return {
        "label": label,
        "commit": git.stdout.strip(),
        "space": space or "default",
        "args": extra,
        "trials": len(df),
        "completed": int((df["status"] == "completed").sum()),
        "confirm_runs": len(confirm),
        "wall_s": round(wall, 1),
        "search_s": round(trial_span(results / name, every_run), 1),
        "trial_seconds": round(float(every_run["time_total_s"].sum()), 1),
        "best_val": None if best is None else float(best["confirm_val_mean" if confirmed else "val_accuracy"]),
        "best_test": None if best is None else float(best["confirm_test_mean" if confirmed else "test_accuracy"]),
        "best_seeds": 0 if best is None else int(best["confirm_runs"]) if confirmed else 1,
        "best_config": None
        if best is None
        else {k: best[k].item() for k in ("patch_size", "memory_size", "iteration_size", "lr") if k in best},
        "experiment": str(results / name),
        "cache": "warm" if warm_cache else "cold",
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=CHECKOUT:SPACE[:ARGS]")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--no-dashboard", action="store_true")
    parser.add_argument("--warm-cache", action="store_true", help="use the user's cache (default: a cold one per run)")
    parser.add_argument("--results-dir", default="results/side-by-side")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="side-by-side")
    args = parser.parse_args()
    results = Path(args.results_dir).resolve()
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in args.run:
        label, _, spec = item.partition("=")
        rows.append(run_one(label, spec, args.trials, results, not args.no_dashboard, args.warm_cache))
        print(json.dumps(rows[-1], default=str), flush=True)
    table = pd.DataFrame(rows)
    first = table.iloc[0]
    table["wall_ratio"] = (table["wall_s"] / first["wall_s"]).round(3)
    table["search_ratio"] = (table["search_s"] / first["search_s"]).round(3)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    md = (
        f"# Searches side by side ({args.tag})\n\n{machine}; back to back (trials per run in the table), "
        f"{'dashboard off' if args.no_dashboard else 'dashboard on'}, {'warm' if args.warm_cache else 'cold'} "
        f"caches. Ratios are against the first row.\n\n"
        f"Command: `python benchmarks/bench_side_by_side.py {' '.join(sys.argv[1:])}`\n\n"
        + table.drop(columns=["experiment"]).to_markdown(index=False, floatfmt=".3f")
        + "\n"
    )
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{args.tag}-{stamp}.md").write_text(md)
    table.to_json(out / f"{args.tag}-{stamp}.json", orient="records", indent=2, default_handler=str)


if __name__ == "__main__":
    main()
