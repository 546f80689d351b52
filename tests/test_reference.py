"""The full-bag reference run (M = N: every patch through the aggregator): a batch of one image keeps all of a smaller
image's patches, the reference's config, its memory prediction at the largest image, and the skip over budget."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_features import make_cohort

from ips_search.config import IPSConfig
from ips_search.data import build_datasets, data_geometry
from ips_search.data.source import TensorPatchSource
from ips_search.errors import ConfigError
from ips_search.experiment import MEMORY_METRIC, METRIC, PARAMS_FILE, REFERENCE_DIR, TRIALS_CSV, SearchSettings
from ips_search.model import IPSNet
from ips_search.prediction import estimate_memory
from ips_search.search.reference import predicted_peak_mb, reference_config, reference_run, run_reference
from ips_search.search.trainable import train_ips
from ips_search.space import load_space, trial_config
from ips_search.train import fit

FEATURE_SIZES = [20, 35, 50, 27, 44, 31, 60, 23, 38, 41, 29, 52]  # N per slide: 20 to 60


def net(memory_size: int) -> IPSNet:
    torch.manual_seed(0)
    cfg = IPSConfig(memory_size=memory_size, iteration_size=4, patch_size=16, n_chan=1, encoder="small-cnn", dim=32,
                    heads=2, d_k=16, d_v=16, d_inner=64)  # fmt: skip
    model = IPSNet(cfg)
    model.eval()
    return model


def test_a_batch_of_one_image_with_fewer_patches_than_m_keeps_them_all_as_m_equal_n_does():
    patches = torch.rand(6, 1, 16, 16)  # (N, C, P, P), N = 6
    big, exact = net(10), net(6)  # the same weights; M above N, and M = N
    mem_patch, mem_idx = big.ips([TensorPatchSource(patches)])
    assert torch.equal(mem_idx, torch.arange(6).unsqueeze(0)) and torch.equal(mem_patch, patches.unsqueeze(0))
    same_patch, same_idx = exact.ips([TensorPatchSource(patches)])
    assert torch.equal(same_idx, mem_idx) and torch.equal(same_patch, mem_patch)
    torch.testing.assert_close(big(mem_patch, mem_idx), exact(same_patch, same_idx))
    whole_patch, whole_idx = big.ips(patches.unsqueeze(0))  # a tensor batch with M >= N keeps all too
    assert torch.equal(whole_idx, mem_idx) and torch.equal(whole_patch, mem_patch)


def test_a_batch_of_two_images_with_one_below_m_is_still_an_error():
    sources = [TensorPatchSource(torch.rand(n, 1, 16, 16)) for n in (12, 6)]
    with pytest.raises(ConfigError, match="image 1 of the batch has 6 patches, fewer than memory_size 10") as info:
        net(10).ips(sources)
    assert "batch_size 1" in str(info.value) and "\n" not in str(info.value)


def features_space(tmp_path: Path, batch_size: int = 4, sizes: list[int] = FEATURE_SIZES):
    make_cohort(tmp_path, sizes, dim=16)
    raw = {
        "data": {"dataset": "features", "root": str(tmp_path)},
        "model": {"dim": 16, "heads": 2, "d_k": 8, "d_v": 8, "d_inner": 32, "memory_size": 6, "fold_bn": False},
        "train": {"epochs": 1, "batch_size": batch_size, "warm_start": False},
        "search": {"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}},
    }
    path = tmp_path / "features.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_space(str(path))


def test_reference_config_keeps_every_patch_and_a_batch_of_one_where_n_varies(tmp_path):
    smoke = load_space("smoke").fixed
    whole = reference_config(smoke, 16)
    assert whole["model"]["memory_size"] == 16 and whole["model"]["iteration_size"] == 5  # IPSConfig's I, <= N
    assert whole["train"]["batch_size"] == 16  # every image has N patches: the batch size stays
    assert whole["data"] == smoke["data"] and "memory_size" not in smoke.get("model", {})  # a copy
    assert reference_config({**smoke, "model": {"iteration_size": 40}}, 16)["model"]["iteration_size"] == 16
    slides = reference_config(features_space(tmp_path).fixed, 60, varies=True)
    assert slides["model"]["memory_size"] == 60 and slides["train"]["batch_size"] == 1


def test_features_of_equal_n_keep_the_searchs_batch_in_the_reference(tmp_path):
    space = features_space(tmp_path, sizes=[24] * 12)  # embeddings of same-size images: N = 24 for every item
    run = reference_run(space, settings(tmp_path), {"fixed": space.fixed, "lr": 1e-3})
    exp = trial_config(run["fixed"], run)
    assert exp.model.memory_size == 24 and exp.train.batch_size == 4


def settings(tmp_path: Path, budget: float | None = None, seed: int = 3) -> SearchSettings:
    return SearchSettings(name="exp", results_dir=str(tmp_path), space="smoke", max_memory_mb=budget, seed=seed)


def test_the_reference_is_the_best_config_with_m_equal_n(tmp_path):
    space = load_space("smoke")
    params = {"fixed": space.fixed, "patch_size": 32, "memory_size": 5, "memory_size_quantile": 0.4,
              "iteration_size": 3, "lr": 1.5e-3, "max_memory_mb": 50.0}  # fmt: skip
    run = reference_run(space, settings(tmp_path, 50.0), params)
    assert (run["patch_size"], run["lr"], run["iteration_size"], run["memory_size"]) == (32, 1.5e-3, 3, 16)
    assert "memory_size_quantile" not in run and run["max_memory_mb"] == 50.0
    exp = trial_config(run["fixed"], run)
    assert exp.model.memory_size == 16 and exp.train.batch_size == 16 and exp.train.seed == 3


def test_where_n_varies_the_reference_trains_one_whole_slide_at_a_time(tmp_path):
    space = features_space(tmp_path)
    run = reference_run(space, settings(tmp_path), {"fixed": space.fixed, "lr": 1e-3, "batch_size": 4})
    exp = trial_config(run["fixed"], run)
    assert exp.model.memory_size == max(FEATURE_SIZES) and exp.train.batch_size == 1
    splits = build_datasets(exp.data)
    out = fit(exp, splits, torch.device("cpu"))  # every slide whole through the aggregator, none refused
    assert out["epochs"][0]["images"] == len(splits.train) and np.isfinite(out["epochs"][0]["loss"])
    assert out["test"]["images"] == len(splits.test)
    # predicted at the largest slide, all of whose patches are kept, not at the smallest
    whole = dataclasses.replace(splits.geometry, n_patches=max(FEATURE_SIZES), item_counts=None)
    assert predicted_peak_mb(run) == estimate_memory(exp, whole).peak_mb
    assert predicted_peak_mb(run) > estimate_memory(exp, dataclasses.replace(whole, n_patches=20)).peak_mb


def finished_search(tmp_path: Path, rows: list[dict]) -> None:
    """An experiment folder whose trials.csv holds ``rows``, each with a trial folder and its params.json."""
    folder = tmp_path / "exp"
    space = load_space("smoke")
    for row in rows:
        trial = folder / f"train_ips_{row['trial_id']}"
        trial.mkdir(parents=True)
        params = {"fixed": space.fixed, "patch_size": 32, "memory_size": 4, "iteration_size": 4, "lr": row["lr"]}
        (trial / PARAMS_FILE).write_text(json.dumps(params))
        row["path"] = str(trial)
    pd.DataFrame(rows).to_csv(folder / TRIALS_CSV, index=False)


def test_over_the_budget_the_reference_is_skipped_with_a_note_and_nothing_runs(tmp_path, capsys):
    rows = [{"trial_id": t, "status": "completed", "feasible": True, METRIC: score, MEMORY_METRIC: 5.0, "lr": lr}
            for t, score, lr in (("a", 0.6, 1e-3), ("b", 0.9, 2e-3))]  # fmt: skip
    finished_search(tmp_path, rows)
    space = load_space("smoke")
    exp = trial_config(reference_config(space.fixed, 16), {"patch_size": 32})
    peak = estimate_memory(exp, data_geometry(exp.data)).peak_mb  # M = N = 16 at P = 32
    assert run_reference(settings(tmp_path, budget=peak - 0.5), space, lambda config: pytest.fail("trained")) is None
    note = capsys.readouterr().out.strip()
    assert note == (
        f"reference run skipped: M = N = 16 (every patch) is predicted at {peak:.0f} MB, over the {peak - 0.5:g} MB "
        "budget"
    )
    assert not (tmp_path / "exp" / REFERENCE_DIR).exists()


def test_without_a_completed_trial_there_is_no_reference(tmp_path, capsys):
    finished_search(tmp_path, [{"trial_id": "a", "status": "infeasible", "feasible": False, METRIC: 0.0, "lr": 1e-3}])
    assert run_reference(settings(tmp_path), load_space("smoke"), lambda config: pytest.fail("trained")) is None
    assert "reference run skipped: no trial completed" in capsys.readouterr().out


def test_the_reference_runs_as_one_trial_of_its_own_experiment(tmp_path, ray_cluster, cache_dir):
    rows = [{"trial_id": "b", "status": "completed", "feasible": True, METRIC: 0.9, MEMORY_METRIC: 5.0, "lr": 2e-3}]
    finished_search(tmp_path, rows)
    space = load_space("smoke")
    space.fixed = {**space.fixed, "data": {**space.fixed["data"], "n_train": 40, "n_test": 16}}
    table = run_reference(dataclasses.replace(settings(tmp_path), epochs=1), space, train_ips)
    assert len(table) == 1 and (tmp_path / "exp" / REFERENCE_DIR / TRIALS_CSV).is_file()
    row = table.iloc[0]
    assert row["status"] == "completed" and (row["memory_size"], row["patch_size"], row["lr"]) == (16, 32, 2e-3)
