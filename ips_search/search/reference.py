"""The full-bag reference run: the search's best config trained once more with M = N, every patch through the
aggregator and none selected.

It answers what the selection costs or gains: the reference differs from the winner only in M (same sampled
values, same fixed sections, same seed). For whole images N is the same for every image, so M = N keeps them all.
Where the items' N differ (slides, features of different sizes) the reference trains with batch size 1 and M = the
largest N: a batch of one image keeps all of a smaller image's patches (``IPSNet._ips_sources``), so every image of
every split goes whole through the aggregator.

Its predicted CUDA peak (:func:`ips_search.prediction.estimate_memory`, at the largest image) is checked first: over
``--max-memory-mb``, the run is skipped with a one-line note. Otherwise it is one trial of its own Tune experiment in
``<experiment>/reference/`` (on the dashboard, resumable like the search), recorded in ``reference/trials.csv`` with
the search's columns.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from ips_search.config import IPSConfig
from ips_search.data import DataGeometry
from ips_search.experiment import (
    PARAMS_FILE,
    REFERENCE_DIR,
    TRIALS_CSV,
    SearchSettings,
    Status,
    best,
    coerce,
    sampled,
)
from ips_search.experiment.settings import trial_fixed
from ips_search.extraction import built_geometry
from ips_search.prediction import estimate_memory
from ips_search.search.confirm import confirm_cpus
from ips_search.search.results import TrialsCsvCallback, trial_dirname
from ips_search.space import SearchSpace, trial_config


def reference_config(fixed: Mapping[str, Any], n_max: int, varies: bool = False) -> dict[str, dict[str, Any]]:
    """The fixed sections of the reference run: ``fixed`` with model.memory_size = ``n_max`` (the largest N) and, where
    the items' N differ (``varies``: slides, features of different sizes), train.batch_size 1. model.iteration_size
    is kept (at most ``n_max``): with M = N nothing is iterated, so it is never used."""
    sections = copy.deepcopy({k: dict(v or {}) for k, v in fixed.items()})
    model = sections.setdefault("model", {})
    model["memory_size"] = int(n_max)
    model["iteration_size"] = min(int(model.get("iteration_size", IPSConfig.iteration_size)), int(n_max))
    if varies:
        sections.setdefault("train", {})["batch_size"] = 1
    return sections


def n_varies(geometry: DataGeometry) -> bool:
    """The items' N differ (slides, features of different sizes): a batch of several would need M <= the smallest.
    Features of equal N (embeddings of same-size images) keep the search's batch: batch 1 would make the reference
    several times slower than the trials it is drawn beside."""
    return geometry.item_counts is not None and len(set(geometry.item_counts)) > 1


def largest_n(geometry: DataGeometry) -> int:
    """The largest N of the data: every image's where N is the same for all, else the largest item's of any split."""
    return max(geometry.item_counts) if geometry.item_counts else geometry.n_patches


def reference_run(space: SearchSpace, settings: SearchSettings, params: Mapping[str, Any]) -> dict[str, Any]:
    """The run config of the reference (what the trainable receives): the best trial's sampled values (``params``,
    its ``params.json``: lr, patch size...) over the search's fixed sections and seed, with M = the largest N at its
    patch size (and batch size 1 where N varies, also where the search sampled the batch size)."""
    values = sampled(params)
    fixed = trial_fixed(space.fixed, settings)
    geometry = built_geometry(trial_config(fixed, values).data)
    n_max, varies = largest_n(geometry), n_varies(geometry)
    fixed = reference_config(fixed, n_max, varies)
    values["memory_size"] = n_max  # a sampled value outranks the fixed sections
    if varies and "batch_size" in values:
        values["batch_size"] = 1
    return {"fixed": fixed, "max_memory_mb": settings.max_memory_mb, **values}


def predicted_peak_mb(run: Mapping[str, Any]) -> float | None:
    """The reference's predicted CUDA peak of a training step (at its largest image), or None where the estimator
    can't predict it (the run then measures its memory, as a trial does)."""
    exp = trial_config(run["fixed"], run)
    try:
        return estimate_memory(exp, built_geometry(exp.data), "cuda").peak_mb
    except Exception:  # noqa: BLE001 - an estimator gap must not cost the run
        return None


def _trainable(settings: SearchSettings, trainable: Any) -> Any:
    cluster_cpus = float(ray.cluster_resources().get("CPU", settings.cpus_per_trial))
    return tune.with_resources(
        trainable, {"cpu": confirm_cpus(settings, 1, cluster_cpus), "gpu": settings.gpus_per_trial}
    )


def make_reference_tuner(settings: SearchSettings, run: dict[str, Any], trainable: Any) -> tune.Tuner:
    folder = settings.experiment_dir / REFERENCE_DIR
    return tune.Tuner(
        _trainable(settings, trainable),
        param_space=run,
        tune_config=tune.TuneConfig(
            scheduler=FIFOScheduler(), num_samples=1, reuse_actors=False, trial_dirname_creator=trial_dirname
        ),
        run_config=tune.RunConfig(
            name=REFERENCE_DIR,
            storage_path=str(settings.experiment_dir),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # a killed run resumes at its last epoch
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[TrialsCsvCallback(folder / TRIALS_CSV)],
        ),
    )


def run_reference(
    settings: SearchSettings, space: SearchSpace, trainable: Any, file: TextIO | None = None
) -> pd.DataFrame | None:
    """Run the reference with ``trainable`` (the search's ``search.trainable.train_ips``, unwrapped: the
    resources are set here) and return ``reference/trials.csv``'s table; ``None``, with a one-line note on ``file``
    (stdout by default), when no trial completed or its prediction is over the budget."""
    out = file or sys.stdout
    folder = settings.experiment_dir
    stage = folder / REFERENCE_DIR
    done = _finished(stage / TRIALS_CSV)
    if done is not None:  # a resumed search keeps its reference run: never trained again, nothing rewritten
        return done
    # An unfinished reference run starts over rather than restoring Ray's state: that state names the folder the
    # experiment ran in, which a copied or moved experiment must not write to (and the run is one trial)
    top = best(coerce(pd.read_csv(folder / TRIALS_CSV, dtype={"trial_id": str})))
    if top is None:
        print("reference run skipped: no trial completed, so there is no config to run with M = N", file=out)
        return None
    run = reference_run(space, settings, json.loads((Path(str(top["path"])) / PARAMS_FILE).read_text()))
    peak = predicted_peak_mb(run)
    if settings.max_memory_mb is not None and peak is not None and peak > settings.max_memory_mb:
        print(
            f"reference run skipped: M = N = {run['memory_size']} (every patch) is predicted at {peak:.0f} MB, "
            f"over the {settings.max_memory_mb:g} MB budget",
            file=out,
        )
        return None
    tuner = make_reference_tuner(settings, run, trainable)
    tuner.fit()
    return pd.read_csv(stage / TRIALS_CSV, dtype={"trial_id": str})


def _finished(csv: Path) -> pd.DataFrame | None:
    """The reference stage's table when its run completed, else None."""
    if not csv.is_file():
        return None
    table = pd.read_csv(csv, dtype={"trial_id": str})
    return table if (table.get("status", pd.Series(dtype=str)).astype(str) == Status.COMPLETED).any() else None
