"""The plan of a search, printed before it runs (and by ``--dry-run``), and the data it prepares once in the driver.

Imports neither Ray nor the search: the command line prints the plan before Ray starts.
"""

from __future__ import annotations

import dataclasses

import torch

from ips_search.config import DataConfig
from ips_search.data import build_datasets, data_geometry
from ips_search.data.preview import human_duration
from ips_search.experiment import SearchSettings, asha_rungs
from ips_search.extraction import preview as preview_datasets
from ips_search.extraction import resolve_data
from ips_search.space import SearchSpace, memory_iteration_ranges, validate_space
from ips_search.train import build_model
from ips_search.warmstart import pretrain_seconds, supports_warm_start, warm_start_cached


def plan_lines(space: SearchSpace, settings: SearchSettings, gpus_auto: bool = False) -> list[str]:
    """What the search will run: the folder, trials and resources, objective, and each parameter's range.

    ``gpus_auto``: ``settings.gpus_per_trial`` was resolved from the cluster (no ``--gpus-per-trial``), which the
    plan says with the flag that keeps trials on the CPU; None (a dry run, before any cluster) says what auto does.
    """
    rungs = asha_rungs(settings) if settings.scheduler == "asha" else []
    gpus = "auto" if settings.gpus_per_trial is None else f"{settings.gpus_per_trial:g}"
    lines = [
        f"experiment   {settings.experiment_dir}",
        f"space        {space.name}: {space.description}".rstrip(": "),
        f"trials       {settings.trials} ({settings.concurrency} at once, {settings.cpus_per_trial:g} CPU"
        f" + {gpus} GPU each), {settings.epochs} epochs max",
        f"objective    {settings.objective}, sampler {settings.sampler}, scheduler {settings.scheduler}"
        + (f" (rungs at {', '.join(map(str, rungs))} epochs on {settings.rung_metric}" if rungs else "")
        + (f", {settings.brackets} brackets" if rungs and settings.brackets > 1 else "")
        + (")" if rungs else "")
        + (f", budget {settings.max_memory_mb:g} MB" if settings.max_memory_mb else ""),
    ]
    if settings.gpus_per_trial is None:
        lines.append("GPUs         auto: 1 per trial when the cluster has GPUs, else the CPU (--gpus-per-trial 0: CPU)")
    elif gpus_auto and settings.gpus_per_trial > 0:
        lines.append(
            f"GPUs         {settings.gpus_per_trial:g} per trial (auto; pass --gpus-per-trial 0 to keep trials on "
            "the CPU)"
        )
    if settings.confirm:
        lines.append(
            f"confirm      the best {settings.confirm_top} configs again with {settings.confirm} more seeds each; "
            "the winner by mean validation accuracy"
        )
    for p in space.params.values():
        rng = f"choices {p.choices}" if p.choices is not None else f"[{p.low}, {p.high}]{' log' if p.log else ''}"
        lines.append(f"  {p.name:<16} {rng}")
    if "memory_size" in space.params:
        for ps in space.patch_sizes():
            n = space.n_patches(ps)
            if n is None:
                lines.append(f"  P={ps:<4} N from the files (the smallest item's), once the data is built")
                continue
            (mlo, mhi), _ = memory_iteration_ranges(space, n)
            lines.append(f"  P={ps:<4} N={n:<5} M in [{mlo:g}, {mhi:g}], I up to N - M")
    base = space.base_config()
    if base.train.warm_start and not supports_warm_start(base.data):
        lines.append(
            f"note         warm_start is for megapixel canvases; {base.data.dataset} starts from scratch"
            + ("" if base.model.pretrained else " (model.pretrained: true loads ImageNet weights)")
        )
    return lines


def prepare_data(space: SearchSpace) -> None:
    """Build the dataset cache (and the warm-start encoders) once in the driver, with progress bars,
    so trials only load them."""
    base = space.base_config()
    counts = {}
    for patch_size in space.patch_sizes():
        data = resolve_data(data_at(base.data, patch_size))
        splits = build_datasets(data)
        counts[patch_size] = splits.n_patches
        exp = dataclasses.replace(base, data=data)
        if exp.train.warm_start:
            build_model(exp, splits, device=torch.device("cpu"), progress=True)
    _record_counts(space, counts)  # slides, features: the M and I ranges follow the smallest item's N


def dry_run_lines(space: SearchSpace) -> list[str]:
    """What the first real run builds, checked without building it: data caches and warm-start encoders.

    The warm start's cost is timed on two pretraining steps at the smallest patch size and scaled by patch area for
    the others, so a dry run of the paper-scale space stays in seconds."""
    base = space.base_config()
    lines: list[str] = []
    timed: tuple[int, float] | None = None  # (P, seconds) of the one timed pretraining
    for patch_size in sorted(space.patch_sizes()):
        data = data_at(base.data, patch_size)
        line = f"data         {preview_datasets(data).line()}"
        if line not in lines:  # once for data that does not depend on P (the canvases)
            lines.append(line)
        if base.train.warm_start and supports_warm_start(data):
            # the warm start's encoder sees this data's patches, as the trials' model does
            model = data_geometry(data).model_config(base.model)
            what = f"warm start   {model.encoder} encoder for P={patch_size}"
            if warm_start_cached(model, data):
                lines.append(f"{what}: cached")
                continue
            if timed is None:
                timed = (patch_size, pretrain_seconds(model, data, sample=2))
            seconds = timed[1] * (patch_size / timed[0]) ** 2
            lines.append(f"{what}: pretrained on the first run (about {human_duration(seconds)} of CPU)")
    return lines


def data_at(data: DataConfig, patch_size: int) -> DataConfig:
    """``data`` cut into ``patch_size`` patches (the stride follows the patch size)."""
    return dataclasses.replace(data, patch_size=patch_size, patch_stride=None)


def count_patches(space: SearchSpace) -> None:
    """Fill ``space.patch_counts`` for slides and features by building their data (cached), then check the M and I
    ranges against them: a no-op for datasets whose N follows from the config."""
    if not space.counts_from_files:
        return
    base = space.base_config().data
    counts = {p: build_datasets(resolve_data(data_at(base, p))).n_patches for p in space.patch_sizes()}
    _record_counts(space, counts)


def _record_counts(space: SearchSpace, counts: dict[int, int]) -> None:
    """Keep the built data's N per patch size in the space (slides, features) and check M and I against them."""
    if not space.counts_from_files:
        return
    space.patch_counts.update(counts)
    validate_space(space, f"space {space.name} (N from its files)")
