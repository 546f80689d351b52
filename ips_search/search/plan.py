"""The plan of a search, printed before it runs (and by ``--dry-run``), and the data it prepares once in the driver:
the dataset caches, and the M range a memory budget allows (:func:`budget_memory_range`).

Imports neither Ray nor the search: the command line prints the plan before Ray starts.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ips_search.config import DataConfig
from ips_search.data import DataGeometry, build_datasets, data_geometry
from ips_search.data.preview import human_duration
from ips_search.errors import ConfigError
from ips_search.experiment import SearchSettings, asha_rungs
from ips_search.extraction import built_geometry, resolve_data
from ips_search.extraction import preview as preview_datasets
from ips_search.prediction import estimate_memory
from ips_search.space import (
    DERIVED,
    PARAM_SECTIONS,
    Param,
    SearchSpace,
    memory_iteration_ranges,
    trial_config,
    validate_space,
)
from ips_search.train import build_model
from ips_search.warmstart import pretrain_seconds, supports_warm_start, warm_start_cached

BUDGET_LOW_M = 2  # the budget's M range starts here, or at the space's own model.memory_size where that is smaller


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
        f" + {gpus} GPU each), {settings.epochs} epochs max"
        + (f" per fold, {settings.folds} folds" if settings.folds > 1 else ""),
        f"objective    {settings.objective} (validation {settings.metric}), sampler {settings.sampler}, "
        f"scheduler {settings.scheduler}"
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
            f"confirm      the best {settings.confirm_top} configs retrained on every non-test slide with "
            f"{settings.confirm} new seeds each: test mean, spread and bootstrap interval (never used to choose)"
        )
    for p in space.params.values():
        rng = f"choices {p.choices}" if p.choices is not None else f"[{p.low}, {p.high}]{' log' if p.log else ''}"
        lines.append(f"  {p.name:<16} {rng}")
    pending = budget_applies(space, settings.max_memory_mb)  # a dry run: the budget's M range is estimated later
    if pending:
        lines.append(
            f"  {'memory_size':<16} [{budget_low(space)}, the largest M predicted under {settings.max_memory_mb:g} MB "
            "at each P] log, estimated when the search starts"
        )
    if "memory_size" in space.params or pending:
        for ps in space.patch_sizes():
            n = space.n_patches(ps)
            if n is None:
                lines.append(f"  P={ps:<4} N from the files (the smallest item's), once the data is built")
                continue
            if pending:
                lines.append(f"  P={ps:<4} N={n:<5} M up to the budget's largest (at most N - 1), I up to N - M")
                continue
            (mlo, mhi), _ = memory_iteration_ranges(space, n, patch_size=ps)
            lines.append(f"  P={ps:<4} N={n:<5} M in [{mlo:g}, {mhi:g}], I up to N - M{_budget_note(space, ps)}")
    base = space.base_config()
    if base.train.warm_start and not supports_warm_start(base.data):
        lines.append(
            f"note         warm_start is for megapixel canvases; {base.data.dataset} starts from scratch"
            + ("" if base.model.pretrained else " (model.pretrained: true loads ImageNet weights)")
        )
    return lines


def _budget_note(space: SearchSpace, patch_size: int) -> str:
    if patch_size not in space.memory_highs:
        return ""
    if space.memory_highs[patch_size] == 0:
        return " (not even this M is predicted under the memory budget: these trials are infeasible)"
    return " (the top: the largest M predicted under the memory budget)"


def prepare_data(space: SearchSpace) -> dict[int, DataGeometry]:
    """Build the dataset cache (and the warm-start encoders) once in the driver, with progress bars,
    so trials only load them. Returns the data's geometry per patch size (for :func:`budget_memory_range`)."""
    base = space.base_config()
    counts, geometries = {}, {}
    for patch_size in space.patch_sizes():
        data = resolve_data(data_at(base.data, patch_size))
        splits = build_datasets(data)
        counts[patch_size], geometries[patch_size] = splits.n_patches, splits.geometry
        exp = dataclasses.replace(base, data=data)
        if exp.train.warm_start:
            build_model(exp, splits, device=torch.device("cpu"), progress=True)
    _record_counts(space, counts)  # slides, features: the M and I ranges follow the smallest item's N
    return geometries


# -- the M range a memory budget allows --------------------------------------------------------------------------------
def budget_applies(space: SearchSpace, max_memory_mb: float | None) -> bool:
    """The memory budget decides the M range: there is one, and the space has no M range of its own (nor one an
    earlier :func:`budget_memory_range` set, which a saved space holds as a ``memory_size`` parameter)."""
    return max_memory_mb is not None and "memory_size" not in space.params


def budget_low(space: SearchSpace, smallest_n: int | None = None) -> int:
    """The bottom of the budget's M range: ``BUDGET_LOW_M``, or the space's model.memory_size where that is smaller
    (the space asked for so few), below the smallest N."""
    low = min(BUDGET_LOW_M, int(space.fixed.get("model", {}).get("memory_size", BUDGET_LOW_M)))
    return max(1, min(low, smallest_n - 1)) if smallest_n else max(1, low)


def budget_memory_range(
    space: SearchSpace, max_memory_mb: float | None, geometries: Mapping[int, DataGeometry] | None = None
) -> SearchSpace:
    """Search M over what the memory budget allows, when the space searches no M of its own.

    At each patch size, M runs from :func:`budget_low` up to the largest M whose predicted CUDA peak of a training
    step (:func:`ips_search.prediction.estimate_memory`, the trials' own infeasibility test) is within
    ``max_memory_mb``, at most N - 1 (M < N; M = N is the full-bag reference run). Each M is predicted with its
    largest I, and at the heaviest combination of the other searched model and training settings (batch size,
    width...), so every config the range allows is predicted to fit. The space gains a ``memory_size`` parameter
    (``[low, the largest top]``, log scale) and ``memory_highs`` (the top per patch size: 0 where not even the
    smallest M fits, whose trials are infeasible), both saved with the space. A no-op without a budget, for a space
    with an M range of its own, and for a resumed space (which saved the range). Mutates and returns ``space``.

    ``geometries``: the data's geometry per patch size (what :func:`prepare_data` returns); built where missing. Run
    it in the driver after :func:`prepare_data`, before the space is saved and the trials start. A budget that no
    config fits is a ConfigError.
    """
    if not budget_applies(space, max_memory_mb):
        return space
    base = space.base_config().data
    given = dict(geometries or {})
    sizes = space.patch_sizes()
    geos = {ps: given.get(ps) or built_geometry(data_at(base, ps)) for ps in sizes}
    low = budget_low(space, min(g.n_patches for g in geos.values()))
    peaks = {ps: _peak_function(space, ps, geos[ps]) for ps in sizes}
    highs = {ps: _top_memory_size(peaks[ps], low, geos[ps].n_patches, max_memory_mb) for ps in sizes}
    if not any(highs.values()):
        smallest, ps = min((peaks[ps](low), ps) for ps in sizes)
        raise ConfigError(
            f"--max-memory-mb {max_memory_mb:g} fits no config of space {space.name}: even M={low} at patch_size {ps} "
            f"is predicted at {smallest:.0f} MB; raise --max-memory-mb or make the model or batch smaller"
        )
    space.params["memory_size"] = Param("memory_size", low=low, high=max(highs.values()), log=True, integer=True)
    space.memory_highs = highs
    validate_space(space, f"space {space.name} (M range from the memory budget)")
    return space


def _top_memory_size(peak: Any, low: int, n: int, max_memory_mb: float) -> int:
    """The largest M in ``[low, n - 1]`` whose ``peak(M)`` is within the budget (peaks grow with M), or 0."""
    fits = bisect.bisect_right(range(low, n), max_memory_mb, key=peak)  # how many M from low up fit
    return low + fits - 1 if fits else 0


def _peak_function(space: SearchSpace, patch_size: int, geometry: DataGeometry) -> Any:
    """``peak(M)``: the predicted peak MB of a training step at this patch size with M kept, the largest I the range
    allows with it, at the heaviest corner of the other searched settings. An estimator gap (an exception) counts as
    fitting: the trials then measure their memory instead, as they do for a config the estimator can't predict."""
    corners = _corners(space)
    n = geometry.n_patches

    def peak(memory_size: int) -> float:
        _, (_, i_high) = memory_iteration_ranges(space, n, memory_size)
        worst = {"patch_size": patch_size, "memory_size": memory_size, "iteration_size": max(1, int(i_high))}
        try:
            return max(estimate_memory(trial_config(space.fixed, {**c, **worst}), geometry).peak_mb for c in corners)
        except Exception as exc:  # noqa: BLE001 - an estimator gap must not stop the search (trials measure)
            warnings.warn(f"no memory estimate for M={memory_size} ({type(exc).__name__}: {exc})", stacklevel=2)
            return 0.0

    return peak


def _corners(space: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of the extremes (choices, or low and high) of the searched model and training settings
    other than P, M and I. Those the step's tensors don't depend on (lr, weight decay...) share one cached
    estimate."""
    axes = {
        p.name: p.choices if p.choices is not None else [p.low, p.high]
        for p in space.params.values()
        if p.name not in ("patch_size", *DERIVED) and PARAM_SECTIONS.get(p.name, ("",))[0] in ("model", "train")
    }
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


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
