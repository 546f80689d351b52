"""Share of a search's trial slot-seconds spent training and evaluating (vs Ray, start-up, I/O).

    python benchmarks/bench_overhead.py results/<experiment>

Slot-seconds = (last result - first trial start) x concurrency. Work = the sum of
every epoch's train + validation seconds and the final test evaluation, as the
trials measured them with ``time.perf_counter``. Everything else (worker start-up,
imports, data and warm-start loading, checkpoints, Ray's scheduling, idle slots)
is overhead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def training_share(folder: Path) -> dict[str, float]:
    settings = json.loads((folder / "experiment.json").read_text())["settings"]
    work, starts, ends, trials = 0.0, [], [], 0
    for result in folder.glob("*/result.json"):
        rows = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        if not rows:
            continue
        trials += 1
        starts.append(rows[0]["timestamp"] - rows[0]["time_total_s"])
        ends.append(rows[-1]["timestamp"])
        work += sum(r.get("epoch_seconds", 0.0) + r.get("test_seconds", 0.0) for r in rows)
    slots = (max(ends) - min(starts)) * settings["concurrency"]
    return {
        "trials": trials,
        "work_seconds": work,
        "slot_seconds": slots,
        "training_share": work / slots,
        "concurrency": settings["concurrency"],
        "wall_seconds": max(ends) - min(starts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    stats = training_share(parser.parse_args().experiment)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
