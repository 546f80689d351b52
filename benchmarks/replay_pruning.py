"""Replay a pruning rule on finished 5-fold searches of ``bench_selection.py``: what it would have saved and chosen.

Each trial's recorded reports (``result.json``) are fed, in the order they were written, to
``ips_search.search.pruner.FoldPruner`` with another ``--prune-interval`` or margin. A trial the replayed rule stops
keeps the trial-seconds up to that report; the rest is as recorded. A rule can only stop trials earlier than the
recorded one did (a recorded pruned trial has no later reports), so replay only rules at least as strict. The
searcher would have proposed other configs after a different pruning; a live search (``bench_selection.py``) is the
measurement, the replay chooses which rule to measure.

    python benchmarks/replay_pruning.py --work /tmp/bench-selection --trials 30 --epochs 12 --intervals 0 6 4 3 1

Prints, per rule, the median over seeds of the cost (trial-seconds against the seed's one-split search), the
completed trials, the Spearman rank correlation of validation mean and test AUC over them, and the regret.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ips_search.experiment import METRIC, Status, best, coerce, completed
from ips_search.search.pruner import FoldPruner


def reports(folder: Path) -> list[tuple[str, dict]]:
    """(trial id, report) for every report of every trial in ``folder``, in the order they were written."""
    rows = []
    for path in folder.glob("train_ips_*/result.json"):
        rows += [(path.parent.name, json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda row: (row[1]["timestamp"], row[1]["time_total_s"]))


def replay(folder: Path, folds: int, epochs: int, interval: int, margin: float) -> dict:
    pruner = FoldPruner(folds, margin, epochs, interval)
    stopped: set[str] = set()
    last: dict[str, dict] = {}
    for trial, report in reports(folder):
        if trial in stopped:
            continue
        last[trial] = report
        if pruner(trial, report):
            stopped.add(trial)
    # each trial's last report as a trials.csv row; one the replayed rule stopped is early-stopped there
    table = coerce(
        pd.DataFrame(
            [
                {
                    **report,
                    "trial_id": trial,
                    "status": Status.EARLY_STOPPED.value if trial in stopped else report["status"],
                }
                for trial, report in last.items()
            ]
        ).drop(columns=["config"])
    )
    done = completed(table)
    chosen = best(table)  # the search's own ranking: validation mean, then spread, memory, seconds
    rho = done[METRIC].corr(done["test_score"], method="spearman") if len(done) >= 3 else np.nan
    return {
        "seconds": table["time_total_s"].sum(),
        "completed": len(done),
        "spearman": rho,
        "chosen_test": chosen["test_score"],
        "regret": done["test_score"].max() - chosen["test_score"],
    }


def one_split_seconds(folder: Path) -> float:
    """The trial-seconds of a one-split search: each trial's last report's ``time_total_s``."""
    paths = folder.glob("train_ips_*/result.json")
    return sum(json.loads(path.read_text().splitlines()[-1])["time_total_s"] for path in paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="bench_selection.py's --work folder")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--intervals", type=int, nargs="+", default=[0, 6, 4, 3, 1])
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--arm", default="folds5", help="the recorded 5-fold arm (its rule must not be stricter)")
    args = parser.parse_args(argv)
    experiments = Path(args.work) / "experiments"
    tail = f"t{args.trials}-e{args.epochs}"
    for interval in args.intervals:
        rows = []
        for seed in args.seeds:
            row = replay(experiments / f"{args.arm}-s{seed}-{tail}", 5, args.epochs, interval, args.margin)
            row["cost"] = row["seconds"] / one_split_seconds(experiments / f"folds1-s{seed}-{tail}")
            rows.append(row)
        t = pd.DataFrame(rows)
        print(
            f"interval {interval}: cost {t['cost'].round(2).tolist()} (median {t['cost'].median():.2f}x), completed "
            f"{t['completed'].tolist()}, Spearman {t['spearman'].round(2).tolist()} (median "
            f"{t['spearman'].median():.2f}), chosen test {t['chosen_test'].round(3).tolist()}, regret "
            f"{t['regret'].round(3).tolist()}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
