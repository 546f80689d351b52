"""Memory-estimate benchmark: how fast ``ips_search.estimate`` predicts, and (on a GPU) how close it comes.

* **CPU (default).** Seconds to estimate: a first config in the process (with torch's one-off setup of fake tensors);
  one config of the ``default`` space (cold: the first of its model, which builds the fake model and runs its warm-up
  step; warm: another M / I of the same model); one config of the paper's Megapixel MNIST setting; and the
  ``default`` space's grid as ``python -m ips_search.estimate --space default`` shows it (60 configs spread over it;
  ``--full-grid`` adds the whole grid). Targets: <= 2 s per config, <= 30 s for the grid. Writes
  ``memory-estimate-<machine>.json`` / ``.md``.
* **CUDA (``--device cuda``, on a GPU).** For each config in ``CUDA_CONFIGS`` the prediction against
  ``torch.cuda.max_memory_allocated`` of a real training step (``prediction.measure_step_memory``: random weights, a
  warm-up step, then the measured one), with and without the cuBLAS workspaces; then seconds per training step of the
  paper config with ``ips_impl="reference"`` against the default ``streaming``. Writes
  ``memory-cuda-<machine>.json`` / ``.md``. Needs no Ray; meant as one command with a timeout::

      timeout 540 python benchmarks/bench_memory.py --device cuda --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ips_search import estimate, prediction
from ips_search.config import ExperimentConfig, Task
from ips_search.data import data_geometry
from ips_search.space import load_space, trial_config

TARGET_ONE_S, TARGET_GRID_S = 2.0, 30.0
PAPER_MODEL = {"encoder": "resnet18-2", "dim": 128, "heads": 8}  # the paper's Megapixel MNIST encoder and head
# name -> (space, sampled params, model overrides); "default best" is the default space's best config, the "paper"
# ones the IPS paper's Megapixel MNIST setting (1500 px canvas, P = 50: N = 900, M = I = 100, batch 16)
CUDA_CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "default best (P 32, M 8, I 8, B 16)": (
        "default", {"patch_size": 32, "memory_size": 8, "iteration_size": 8, "batch_size": 16}, {}
    ),
    "default (P 64, M 8, I 8, B 16)": (
        "default", {"patch_size": 64, "memory_size": 8, "iteration_size": 8, "batch_size": 16}, {}
    ),
    "default (P 32, M 16, I 32, B 8)": ("default", {"patch_size": 32, "memory_size": 16, "iteration_size": 32}, {}),
    "paper (resnet18-2, P 50, M 100, I 100, B 16)": (
        "megapixel_mnist", {"patch_size": 50, "memory_size": 100, "iteration_size": 100}, PAPER_MODEL
    ),
    "paper, ips_impl reference": (
        "megapixel_mnist", {"patch_size": 50, "memory_size": 100, "iteration_size": 100},
        {**PAPER_MODEL, "ips_impl": "reference"},
    ),
    "paper, M 20, I 50": ("megapixel_mnist", {"patch_size": 50, "memory_size": 20, "iteration_size": 50}, PAPER_MODEL),
    "megapixel_mnist space (resnet18, D 512, P 50, M 100, I 100)": (
        "megapixel_mnist", {"patch_size": 50, "memory_size": 100, "iteration_size": 100}, {}
    ),
    "megapixel_mnist space (resnet18, D 512, P 100, M 50, I 50)": (
        "megapixel_mnist", {"patch_size": 100, "memory_size": 50, "iteration_size": 50}, {}
    ),
}  # fmt: skip
PAPER = "paper (resnet18-2, P 50, M 100, I 100, B 16)"


def config(name: str) -> tuple[ExperimentConfig, int, int, tuple[Task, ...]]:
    """(experiment, N, channels, tasks) of a named config."""
    space_name, params, model = CUDA_CONFIGS[name]
    space = load_space(space_name)
    fixed = {**space.fixed, "model": {**space.fixed.get("model", {}), **model}}
    exp = trial_config(fixed, params)
    geometry = data_geometry(exp.data)
    return exp, space.n_patches(exp.data.patch_size), geometry.n_chan, geometry.tasks


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else [],
    }


def _timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# -- CPU: speed of the estimate --------------------------------------------------------------------------------------
def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    space = load_space("default")
    best = {"patch_size": 32, "memory_size": 8, "iteration_size": 8}
    prediction.clear_cache()
    smoke = {"patch_size": 32, "memory_size": 4, "iteration_size": 4}  # another model: torch's one-off setup
    _, first_s = _timed(lambda: estimate.estimate_config(load_space("smoke"), smoke))
    cold, cold_s = _timed(lambda: estimate.estimate_config(space, best))
    _, warm_s = _timed(lambda: estimate.estimate_config(space, {**best, "memory_size": 9}))
    exp, n, n_chan, tasks = config(PAPER)
    paper, paper_s = _timed(lambda: prediction.estimate_step_memory(exp, n, n_chan, tasks))
    grid = estimate.space_grid(space)
    sample = estimate.even_sample(grid, 60)
    prediction.clear_cache()
    _, sample_s = _timed(lambda: [estimate.estimate_config(space, p) for p in sample])
    res: dict[str, Any] = {
        "first_in_process_s": first_s,
        "one_config": {"config": best, "peak_mb": cold.peak_mb, "cold_s": cold_s, "warm_s": warm_s},
        "paper_config": {"config": PAPER, "peak_mb": paper.peak_mb, "cold_s": paper_s},
        "grid": {"configs": len(grid), "sampled": len(sample), "sample_s": sample_s},
    }
    if args.full_grid:
        prediction.clear_cache()
        _, full_s = _timed(lambda: [estimate.estimate_config(space, p) for p in grid])
        res["grid"]["full_s"] = full_s
    res["targets"] = {
        "first config in a process <= 2 s": {"seconds": first_s, "met": first_s <= TARGET_ONE_S},
        "one config <= 2 s (cold)": {"seconds": cold_s, "met": cold_s <= TARGET_ONE_S},
        "paper config <= 2 s (cold)": {"seconds": paper_s, "met": paper_s <= TARGET_ONE_S},
        "default grid (60 shown) <= 30 s": {"seconds": sample_s, "met": sample_s <= TARGET_GRID_S},
    }
    if "full_s" in res["grid"]:
        full_s = res["grid"]["full_s"]
        res["targets"][f"default grid (all {len(grid)}) <= 30 s"] = {"seconds": full_s, "met": full_s <= TARGET_GRID_S}
    return res


def cpu_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    one, paper, grid = res["one_config"], res["paper_config"], res["grid"]
    lines = [
        "# Memory estimate: speed",
        "",
        f"`{res['command']}` on {m['cpu']} ({m['usable_cores']} usable of {m['cores']} cores, torch {m['torch']}, "
        f"{m['torch_threads']} threads), {res['when']}; load average {m['load_average']} at the start, "
        f"{res['load_end']} at the end (the machine is shared).",
        "",
        "| what | seconds | predicted peak MB |",
        "|---|---|---|",
        f"| smoke space, first estimate in the process (torch's one-off setup) | {res['first_in_process_s']:.2f} | |",
        f"| default space, P 32 M 8 I 8 B 8, first of its model | {one['cold_s']:.2f} | {one['peak_mb']:.1f} |",
        f"| same model, M 9 (fake model reused) | {one['warm_s']:.2f} | |",
        f"| {paper['config']}, first of its model | {paper['cold_s']:.2f} | {paper['peak_mb']:.1f} |",
        f"| default grid: {grid['sampled']} of {grid['configs']} configs (the CLI's) | {grid['sample_s']:.1f} | |",
    ]
    if "full_s" in grid:
        lines.append(f"| default grid: all {grid['configs']} configs | {grid['full_s']:.1f} | |")
    lines += ["", "| target | seconds | met |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.2f} | {'yes' if v['met'] else 'NO'} |" for k, v in res["targets"].items()]
    return "\n".join(lines) + "\n"


# -- CUDA: prediction against the allocator ---------------------------------------------------------------------------
def time_steps(exp: ExperimentConfig, n: int, n_chan: int, tasks: tuple[Task, ...], steps: int) -> dict[str, float]:
    """Seconds per training step on the GPU (after one warm-up step), each step synchronised."""
    import dataclasses

    from ips_search.model import IPSNet
    from ips_search.train import make_optimizer, train_step

    dev = torch.device("cuda")
    model_cfg = dataclasses.replace(exp.model, tasks=tasks, n_chan=n_chan, patch_size=exp.data.patch_size)
    torch.manual_seed(0)
    model = IPSNet(model_cfg).to(dev)
    optimizer = make_optimizer(model, exp.train)
    side, batch = model_cfg.patch_size, exp.train.batch_size
    patches = torch.rand(batch, n, n_chan, side, side).pin_memory()
    targets = {
        t.name: torch.randint(0, 2, (batch, t.n_class), device=dev).float()
        if t.multi_label
        else torch.randint(0, t.n_class, (batch,), device=dev)
        for t in tasks
    }
    model.train()
    train_step(model, patches, targets, optimizer, exp.train, dev)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize(dev)
        start = time.perf_counter()
        train_step(model, patches, targets, optimizer, exp.train, dev)
        torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "steps": steps}


def run_cuda(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("error: --device cuda needs a CUDA GPU; run the CPU part without --device")
    rows = []
    for name in CUDA_CONFIGS:
        exp, n, n_chan, tasks = config(name)
        est, est_s = _timed(lambda exp=exp, n=n, n_chan=n_chan, tasks=tasks: prediction.estimate_step_memory(
            exp, n, n_chan, tasks))  # fmt: skip
        try:
            measured = prediction.measure_step_memory(exp, n, n_chan, tasks)
        except RuntimeError as exc:  # e.g. out of memory: the row says so
            measured = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        row = {"config": name, "n_patches": n, "predicted_mb": est.peak_mb, "estimate_s": est_s, **measured}
        if "tensors_mb" in measured:
            row["error_pct"] = 100 * (est.peak_mb - measured["tensors_mb"]) / measured["tensors_mb"]
            row["error_vs_peak_pct"] = 100 * (est.peak_mb - measured["peak_mb"]) / measured["peak_mb"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    exp, n, n_chan, tasks = config(PAPER)
    import dataclasses

    speed = {}
    for impl in ("streaming", "reference"):
        impl_exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, ips_impl=impl))
        speed[impl] = time_steps(impl_exp, n, n_chan, tasks, args.steps)
    speed["speedup"] = speed["reference"]["median_s"] / speed["streaming"]["median_s"]
    errors = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    return {"rows": rows, "speed": speed, "max_abs_error_pct": max(errors) if errors else None}


def cuda_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Memory estimate against a real CUDA step",
        "",
        f"`{res['command']}` on {m['gpu']} (torch {m['torch']}), {res['when']}.",
        "",
        "predicted: `estimate_step_memory` (fake tensors, no GPU used); measured: `max_memory_allocated` of the "
        "second training step; tensors = measured minus the cuBLAS workspaces alive after it.",
        "",
        "| config | N | predicted MB | measured MB | workspaces MB | tensors MB | error vs tensors | vs measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['n_patches']} | {r['predicted_mb']:.1f} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['config']} | {r['n_patches']} | {r['predicted_mb']:.1f} | {r['peak_mb']:.1f} | "
            f"{r['workspace_mb']:.1f} | {r['tensors_mb']:.1f} | {r['error_pct']:+.1f}% | "
            f"{r['error_vs_peak_pct']:+.1f}% |"
        )
    s = res["speed"]
    lines += [
        "",
        f"Training step of `{PAPER}` (median of {s['streaming']['steps']} steps): streaming "
        f"{s['streaming']['median_s'] * 1000:.1f} ms, reference {s['reference']['median_s'] * 1000:.1f} ms "
        f"(streaming {s['speedup']:.2f}x faster).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: speed; cuda: accuracy on a GPU")
    p.add_argument("--out", default="benchmarks/results/", help="folder for the results files")
    p.add_argument("--machine", default=None, help="name in the results files (default: cpu<cores> or the GPU's)")
    p.add_argument("--full-grid", action="store_true", help="also time the whole default grid (CPU part)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per ips_impl (CUDA part)")
    args = p.parse_args(argv)
    info = machine_info()
    res: dict[str, Any] = {
        "command": "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": info,
    }
    if args.device == "cuda":
        res.update(run_cuda(args))
        stem, md = "memory-cuda", cuda_markdown
        machine = args.machine or (info["gpu"] or "gpu").lower().replace("nvidia ", "").replace(" ", "-")
    else:
        res.update(run_cpu(args))
        stem, md = "memory-estimate", cpu_markdown
        machine = args.machine or f"cpu{info['usable_cores']}"
    res["load_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = md(res)
    print(text)
    (out / f"{stem}-{machine}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}-{machine}.md").write_text(text)
    print(f"wrote {out / stem}-{machine}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
