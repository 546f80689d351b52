"""How often does one config learn, and does a model setting help? One search-space config over several seeds.

Trains one config of a space (by default the ``default`` space's first ``first:`` config, its best) outside Ray, as
a trial would (``build_model``, ``train_one_epoch``, ``evaluate``), once per seed and variant, and reports final
validation and test accuracy and training time. A variant is a name and model settings (default: attention heads
oriented or not); a seed sets the transformer's initial weights and the data order; the warm-started encoder is the
same for all.

    python benchmarks/bench_seeds.py --seeds 0 1 2 3 4 5
    python benchmarks/bench_seeds.py --seeds 0 1 2 --variant fp32:ips_dtype=float32 --variant bf16:ips_dtype=bfloat16
    python benchmarks/bench_seeds.py --seeds 0 1 --variant base: --variant aug:data.augment_digits=true
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

from ips_search.data import build_datasets
from ips_search.space import load_space
from ips_search.train import fit


def run_one(space_name: str, point: dict, seed: int, variant: str, settings: dict) -> dict:
    """Final validation / test accuracy of ``point`` trained with ``seed`` and the model ``settings``."""
    base = load_space(space_name).base_config()
    by_section = {"data": {}, "model": {}, "train": {}}
    for key, value in settings.items():
        section, _, name = key.rpartition(".")
        by_section[section or "model"][name] = value  # a bare key is a model setting
    exp = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, patch_size=point["patch_size"], **by_section["data"]),
        model=dataclasses.replace(
            base.model,
            memory_size=point["memory_size"],
            iteration_size=point["iteration_size"],
            **by_section["model"],
        ),
        train=dataclasses.replace(base.train, lr=point["lr"], seed=seed, **by_section["train"]),
    )
    start = time.perf_counter()
    out = fit(exp, build_datasets(exp.data), torch.device("cpu"))
    return {
        "seed": seed,
        "variant": variant,
        "settings": settings,
        "val_accuracy": out["val"]["accuracy"],
        "test_accuracy": out["test"]["accuracy"],
        "train_accuracy_by_epoch": [round(epoch["accuracy"], 3) for epoch in out["epochs"]],
        "seconds": sum(epoch["seconds"] for epoch in out["epochs"]),  # training only
        "wall_seconds": time.perf_counter() - start,
    }


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,...`` -> (name, settings); values are YAML scalars (``true``, ``4``, ``bfloat16``).

    A key is a model setting (``shuffle``) or names its section (``data.augment_digits``, ``train.epochs``).
    """
    name, _, pairs = text.partition(":")
    settings = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    return name, settings


def to_markdown(res: dict) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in res["runs"]))
    lines = [
        "# Seeds: does the config learn, and does a setting help?",
        "",
        f"Space `{res['space']}`, config {res['config']}, {res['epochs']} epochs; {res['machine']}.",
        f"Command: `{res['command']}`." if res.get("command") else "",
        "",
        "| seed | " + " | ".join(f"{v}: val | test | train s" for v in variants) + " |",
        "|---:|" + "---:|---:|---:|" * len(variants),
    ]
    by = {(r["seed"], r["variant"]): r for r in res["runs"]}
    for seed in res["seeds"]:
        cells = []
        for v in variants:
            r = by[(seed, v)]
            cells += [f"{r['val_accuracy']:.3f}", f"{r['test_accuracy']:.3f}", f"{r['seconds']:.0f}"]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    mean = []
    for v in variants:
        rs = [r for r in res["runs"] if r["variant"] == v]
        mean += [f"{sum(r[k] for r in rs) / len(rs):.3f}" for k in ("val_accuracy", "test_accuracy")]
        mean.append(f"{sum(r['seconds'] for r in rs) / len(rs):.0f}")
    lines.append("| mean | " + " | ".join(mean) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--space", default="default")
    p.add_argument("--first", type=int, default=0, help="which of the space's first: configs (0-based)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--variant",
        action="append",
        metavar="NAME:KEY=VALUE,...",
        help="settings to compare; data.KEY / train.KEY for those sections "
        "(default: oriented:orient_scores=true and not-oriented:orient_scores=false)",
    )
    p.add_argument("--out", default="benchmarks/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    point = load_space(args.space).first[args.first]  # in absolute units: P, M, I, lr
    variants = [
        parse_variant(v) for v in args.variant or ("oriented:orient_scores=true", "not-oriented:orient_scores=false")
    ]
    runs = []
    for seed in args.seeds:
        for name, settings in variants:
            runs.append(run_one(args.space, point, seed, name, settings))
            r = runs[-1]
            print(
                f"seed {seed} {name}: val {r['val_accuracy']:.3f} test {r['test_accuracy']:.3f} "
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
        "command": "python benchmarks/bench_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
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
