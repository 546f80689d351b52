"""A search over slides end to end: lazy patch sources in Ray trials, N from the files, the report's slide maps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ips_search import run

SPACE = """\
description: a tiny generated slide cohort
data: {dataset: slides, cohort_size: 12, slide_size: 768, level: 0, min_foreground: 0.3, n_chan: 3, n_test: 2}
model: {encoder: small-cnn, dim: 16, heads: 2, d_k: 8, d_v: 8, d_inner: 32, orient_scores: false}
train: {epochs: 1, batch_size: 4, warm_start: false}
search:
  patch_size: {choices: [64]}
  memory_size: {low: 2, high: 4}
  iteration_size: {low: 2, high: 4}
  lr: {low: 1.0e-3, high: 3.0e-3, log: true}
"""


@pytest.mark.ray
def test_a_slides_search_trains_on_lazy_sources_and_reports_slide_maps(ray_cluster, tmp_path, cache_dir):
    space = tmp_path / "slides.yaml"
    space.write_text(SPACE)
    results = tmp_path / "results"
    argv = ["--space", str(space), "--trials", "2", "--name", "wsi", "--results-dir", str(results), "--no-dashboard"]
    assert run.main(argv) == 0
    df = pd.read_csv(results / "wsi" / "trials.csv", dtype={"trial_id": str})
    assert len(df) == 2 and (df["status"] == "completed").all()
    assert (df["memory_size"] < df["n_patches"]).all() and (df["memory_kind"] == "predicted-cuda").all()
    saved = pd.read_json(results / "wsi" / "experiment.json", typ="series")
    assert int(saved["space"]["patch_counts"]["64"]) == df["n_patches"].iloc[0]  # N from the files, kept on disk

    from ips_search.report import write_report

    out = write_report(results / "wsi", notebook=False)
    assert out["error"] is None and Path(out["dir"], "attention.png").is_file()
    assert "Attention maps" in Path(out["dir"], "summary.md").read_text()


FEATURES_SPACE = """\
description: the tiny cohort's patch embeddings (a seeded frozen CNN), extracted on first use
data:
  dataset: features
  extract:
    from: {dataset: slides, cohort_size: 12, slide_size: 768, level: 1, min_foreground: 0.3, n_chan: 3, n_test: 2,
           patch_size: 32}
    encoder: random-init
    model: {encoder: small-cnn, dim: 16}
model: {encoder: projector, dim: 16, heads: 2, d_k: 8, d_v: 8, d_inner: 32, fold_bn: false, orient_scores: false}
train: {epochs: 1, batch_size: 4, warm_start: false}
search:
  memory_size: {low: 2, high: 4}
  iteration_size: {low: 2, high: 4}
  lr: {low: 1.0e-3, high: 3.0e-3, log: true}
"""


@pytest.mark.ray
def test_a_search_over_slide_features_draws_its_attention_on_the_slides(ray_cluster, tmp_path, cache_dir):
    import h5py

    from ips_search.report.attention import attention_maps

    space = tmp_path / "slides-features.yaml"
    space.write_text(FEATURES_SPACE)
    results = tmp_path / "results"
    argv = ["--space", str(space), "--trials", "1", "--name", "feat", "--results-dir", str(results), "--no-dashboard"]
    assert run.main(argv) == 0
    df = pd.read_csv(results / "feat" / "trials.csv", dtype={"trial_id": str})
    assert (df["status"] == "completed").all()
    trial, maps = attention_maps(results / "feat", n_images=2)
    assert len(maps) == 2
    for m in maps:  # each test file's kept patches over its own generated slide, at level-0 places
        assert Path(m.source.path).suffix == ".tif" and Path(m.source.path).is_file()
        assert m.source.patch_size_level0 == 64  # 32 px at level 1 (downsample 2)
        assert m.indices.max() < len(m.source.coords)
    h5 = next(Path(p) for p in trial.splits.test.paths)
    with h5py.File(h5, "r") as f:  # TRIDENT's attributes, in level-0 pixels
        assert f["coords"].attrs["patch_size_level0"] == 64 and f["coords"].attrs["patch_level"] == 1

    from ips_search.report import write_report

    out = write_report(results / "feat", notebook=False)
    assert out["error"] is None and Path(out["dir"], "attention.png").is_file()
