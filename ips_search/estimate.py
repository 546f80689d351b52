"""``python -m ips_search.estimate`` (``ips-search-estimate``): the predicted peak GPU memory of a search space's
patch size x M x I grid, without a GPU. The prediction of one step is :mod:`ips_search.prediction`; here a space's
configs are turned into steps (for slides and features, N comes from the files)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from tabulate import tabulate

from ips_search.cli import OneLineParser, exit_code_of, interrupt_exits
from ips_search.errors import ConfigError

with interrupt_exits():  # torch loads here: seconds in which Ctrl-C must still be one line
    from ips_search.data import build_datasets, data_geometry
    from ips_search.extraction import resolve_data
    from ips_search.prediction import LEAVES_OUT, MemoryEstimate, estimate_memory
    from ips_search.search.plan import count_patches
    from ips_search.space import SearchSpace, load_space, memory_iteration_ranges, trial_config


def estimate_config(space: SearchSpace, params: dict[str, Any], device: str = "cuda") -> MemoryEstimate:
    """:func:`estimate_memory` of one config of ``space``: ``params`` holds the sampled values (patch_size,
    memory_size, iteration_size, lr, ...; quantile parameters are ignored), as a trial receives them."""
    exp = trial_config(space.fixed, params)
    # whole images: the geometry from the config alone; slides, features: N (and the channels) from the files
    geometry = data_geometry(exp.data) or build_datasets(resolve_data(exp.data)).geometry
    return estimate_memory(exp, geometry, device)


def space_grid(space: SearchSpace) -> list[dict[str, int]]:
    """Every feasible (patch_size, memory_size, iteration_size) of a space, in order."""
    grid = []
    for patch_size in space.patch_sizes():
        n = space.n_patches(patch_size)
        (m_low, m_high), _ = memory_iteration_ranges(space, n)
        for memory_size in range(math.ceil(m_low), int(m_high) + 1):
            _, (i_low, i_high) = memory_iteration_ranges(space, n, memory_size)
            for iteration_size in range(math.ceil(i_low), int(i_high) + 1):
                grid.append({"patch_size": patch_size, "memory_size": memory_size, "iteration_size": iteration_size})
    return grid


def even_sample(items: list[Any], k: int) -> list[Any]:
    """At most ``k`` items spread evenly over ``items`` (first and last included)."""
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m ips_search.estimate",
        description="Predict the peak GPU memory of one training step for a search space's patch size x M x I grid, "
        "without a GPU (fake tensors: nothing is computed).",
    )
    p.add_argument("--space", default="default", help="search space: a name in search_spaces/ or a YAML path")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the space's)")
    p.add_argument("--max-memory-mb", type=float, default=None, help="memory budget: mark which configs fit")
    p.add_argument("--sample", type=int, default=60, help="at most this many configs, spread evenly over the grid")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="predict a CUDA or a CPU step")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.max_memory_mb is not None and not (args.max_memory_mb > 0 and math.isfinite(args.max_memory_mb)):
        raise ConfigError(f"--max-memory-mb must be a positive number of MB, got {args.max_memory_mb}")
    if args.sample < 1:
        raise ConfigError(f"--sample must be a positive integer, got {args.sample}")
    space = load_space(args.space)
    count_patches(space)  # slides, features: N comes from the (cached) data
    extra = {} if args.batch_size is None else {"batch_size": args.batch_size}
    grid = space_grid(space)
    configs = even_sample(grid, args.sample)
    start = time.perf_counter()
    rows = []
    for params in configs:
        est = estimate_config(space, {**params, **extra}, args.device)
        row = [params["patch_size"], space.n_patches(params["patch_size"]), params["memory_size"]]
        row += [params["iteration_size"], f"{est.peak_mb:.1f}", f"{est.state_mb:.1f}"]
        if args.max_memory_mb is not None:
            row.append("yes" if est.peak_mb <= args.max_memory_mb else "NO")
        rows.append(row)
    seconds = time.perf_counter() - start
    headers = ["P", "N", "M", "I", "peak MB", "of which state MB"]
    if args.max_memory_mb is not None:
        headers.append(f"fits {args.max_memory_mb:g} MB")
    batch = args.batch_size or space.base_config().train.batch_size
    shown = "all" if len(configs) == len(grid) else f"{len(configs)} spread evenly over"
    print(f"space {space.name}: {shown} {len(grid)} configs, batch {batch}, predicted {args.device} step peak")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    if args.max_memory_mb is not None:
        fit = sum(r[-1] == "yes" for r in rows)
        print(f"{fit} of {len(rows)} fit {args.max_memory_mb:g} MB")
    print(f"MB = 2**20 bytes of live tensors as the allocator books them; {LEAVES_OUT}.")
    print(f"estimated in {seconds:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return exit_code_of(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
