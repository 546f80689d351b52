"""A long search of tiny trials: does the driver's memory or the disk grow per trial?

    python benchmarks/bench_load.py --trials 200

Runs ``python -m ips_search.run --space smoke --trials N --epochs 1`` and samples the
driver's resident memory (VmRSS) every second together with the number of finished
trials in ``trials.csv``. Reports the driver's RSS growth per trial (least-squares slope
over the second half of the run, after start-up and warm caches) and the experiment
folder's disk use per trial.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def finished(csv: Path) -> int:
    try:
        return int((~pd.read_csv(csv)["status"].isin(["running", "pending"])).sum())
    except (OSError, ValueError, KeyError, pd.errors.EmptyDataError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--results-dir", default="results/bench-load")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    name = f"load-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(args.results_dir).resolve() / name
    cmd = [
        sys.executable,
        "-m",
        "ips_search.run",
        "--space",
        "smoke",
        "--trials",
        str(args.trials),
        "--epochs",
        "1",
        "--name",
        name,
        "--results-dir",
        args.results_dir,
        "--no-dashboard",
    ]
    start = time.time()
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []
    while driver.poll() is None:
        mb = rss_mb(driver.pid)
        if mb is not None:
            samples.append((time.time() - start, finished(folder / "trials.csv"), mb))
        time.sleep(1.0)
    df = pd.DataFrame(samples, columns=["seconds", "finished", "rss_mb"])
    # the second half of the trials, while they finish: after the last one the driver writes the summary and
    # shuts Ray down, which is not growth per trial
    late = df[(df["finished"] >= args.trials // 2) & (df["finished"] < args.trials)]
    slope = (
        float(np.polyfit(late["finished"], late["rss_mb"], 1)[0]) if late["finished"].nunique() > 2 else float("nan")
    )
    disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1024 / 1024
    stats = {
        "trials": args.trials,
        "exit_code": driver.returncode,
        "wall_seconds": time.time() - start,
        "driver_rss_start_mb": float(df["rss_mb"].iloc[0]),
        "driver_rss_peak_mb": float(df["rss_mb"].max()),
        "driver_rss_end_mb": float(df["rss_mb"].iloc[-1]),
        "driver_rss_mb_per_trial_second_half": slope,
        "disk_mb": disk,
        "disk_mb_per_trial": disk / args.trials,
        "checkpoints": sum(1 for p in folder.rglob("checkpoint_*") if p.is_dir()),
    }
    print(json.dumps(stats, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(stats, indent=2))
    df.to_csv(out / f"{name}-samples.csv", index=False)


if __name__ == "__main__":
    main()
