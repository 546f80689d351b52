"""Memory figures inside a search: one config run as three trials gives one ``peak_memory_mb``; a config predicted
over the budget is rejected before any training step.

    python benchmarks/bench_memory_search.py            # about a minute on 2 CPUs

Writes ``benchmarks/results/memory-search-<machine>.{json,md}``. Without a GPU a trial's ``peak_memory_mb`` is the
estimator's CUDA peak (``memory_kind`` ``predicted-cuda``), so the three trials must agree exactly, while the
process's resident-set growth (``host_rss_mb``, the figure this column held before) is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

CONFIG = {"patch_size": 32, "memory_size": 6, "iteration_size": 5, "lr": 1.0e-3}


def search(results: Path, name: str, space: Path, *extra: str) -> pd.DataFrame:
    cmd = [sys.executable, "-m", "ips_search.run", "--space", str(space), "--results-dir", str(results)]
    cmd += ["--name", name, "--no-dashboard", "--sampler", "random", "--scheduler", "fifo", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return pd.read_csv(results / name / "trials.csv", dtype={"trial_id": str})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/")
    p.add_argument("--machine", default=f"cpu{os.cpu_count()}")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        smoke = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "smoke.yaml").read_text())
        smoke["first"] = [dict(CONFIG)] * 3  # one config, three trials
        space = Path(tmp) / "one-config.yaml"
        space.write_text(yaml.safe_dump(smoke))
        same = search(Path(tmp) / "results", "same", space, "--trials", "3")
        over = search(Path(tmp) / "results", "over", space, "--trials", "2", "--max-memory-mb", "1")
    cols = ["trial_id", "memory_size", "iteration_size", "patch_size", "peak_memory_mb", "memory_kind", "host_rss_mb"]
    result = {
        "machine": args.machine,
        "platform": platform.platform(),
        "command": "python benchmarks/bench_memory_search.py",
        "config": CONFIG,
        "same_config_trials": same[cols].to_dict("records"),
        "peak_memory_mb_spread": float(same["peak_memory_mb"].max() - same["peak_memory_mb"].min()),
        "host_rss_mb_spread": float(same["host_rss_mb"].max() - same["host_rss_mb"].min()),
        "over_budget": over[["trial_id", "status", "peak_memory_mb", "time_total_s"]].to_dict("records"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory-search-{args.machine}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Memory figures in a search ({args.machine})",
        "",
        f"`{result['command']}`: the `smoke` space, config {CONFIG}, run as three trials; then two trials under a",
        "1 MB budget.",
        "",
        "| trial | peak_memory_mb | memory_kind | host_rss_mb |",
        "|---|---|---|---|",
        *(
            f"| {r['trial_id']} | {r['peak_memory_mb']:.3f} | {r['memory_kind']} | {r['host_rss_mb']:.1f} |"
            for r in result["same_config_trials"]
        ),
        "",
        f"Spread of `peak_memory_mb`: {result['peak_memory_mb_spread']:.3f} MB (target 0); of host RSS: "
        f"{result['host_rss_mb_spread']:.1f} MB.",
        "",
        "Over the budget: "
        + "; ".join(
            f"{r['trial_id']} {r['status']} (predicted {r['peak_memory_mb']:.1f} MB, {r['time_total_s']:.2f} s)"
            for r in result["over_budget"]
        ),
    ]
    (out / f"memory-search-{args.machine}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
