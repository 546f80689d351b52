"""How often does one config learn? The same search-space config over several seeds, heads oriented or not.

Trains one config of a space (by default the ``default`` space's first ``first:`` config, its best) outside Ray, as
a trial would (``build_model``, ``train_one_epoch``, ``evaluate``), once per seed with ``orient_scores`` on and once
off, and reports final validation and test accuracy. A seed sets the transformer's initial weights and the data
order; the warm-started encoder is the same for all.

    python benchmarks/bench_seeds.py --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from ips_search.data import build_datasets
from ips_search.space import load_space
from ips_search.train import fit


def run_one(space_name: str, point: dict, seed: int, orient: bool) -> dict:
    """Final validation / test accuracy of ``point`` trained with ``seed``."""
    base = load_space(space_name).base_config()
    exp = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, patch_size=point["patch_size"]),
        model=dataclasses.replace(
            base.model,
            memory_size=point["memory_size"],
            iteration_size=point["iteration_size"],
            orient_scores=orient,
        ),
        train=dataclasses.replace(base.train, lr=point["lr"], seed=seed),
    )
    start = time.perf_counter()
    out = fit(exp, build_datasets(exp.data), torch.device("cpu"))
    return {
        "seed": seed,
        "orient_scores": orient,
        "val_accuracy": out["val"]["accuracy"],
        "test_accuracy": out["test"]["accuracy"],
        "train_accuracy_by_epoch": [round(epoch["accuracy"], 3) for epoch in out["epochs"]],
        "seconds": sum(epoch["seconds"] for epoch in out["epochs"]),  # training only
        "wall_seconds": time.perf_counter() - start,
    }


def to_markdown(res: dict) -> str:
    lines = [
        "# Seeds: does the config learn?",
        "",
        f"Space `{res['space']}`, config {res['config']}, {res['epochs']} epochs; {res['machine']}.",
        "",
        "| seed | oriented: val | test | not oriented: val | test |",
        "|---:|---:|---:|---:|---:|",
    ]
    by = {(r["seed"], r["orient_scores"]): r for r in res["runs"]}
    for seed in res["seeds"]:
        on, off = by[(seed, True)], by[(seed, False)]
        cells = [f"{on['val_accuracy']:.3f}", f"{on['test_accuracy']:.3f}"]
        cells += [f"{off['val_accuracy']:.3f}", f"{off['test_accuracy']:.3f}"]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--space", default="default")
    p.add_argument("--first", type=int, default=0, help="which of the space's first: configs (0-based)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    point = load_space(args.space).first[args.first]  # in absolute units: P, M, I, lr
    runs = []
    for seed in args.seeds:
        for orient in (True, False):
            runs.append(run_one(args.space, point, seed, orient))
            r = runs[-1]
            print(
                f"seed {seed} orient={orient}: val {r['val_accuracy']:.3f} test {r['test_accuracy']:.3f} "
                f"({r['seconds']:.0f} s) train acc by epoch {r['train_accuracy_by_epoch']}",
                flush=True,
            )
    res = {
        "space": args.space,
        "config": point,
        "epochs": load_space(args.space).base_config().train.epochs,
        "seeds": args.seeds,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"seeds-{args.space}-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
