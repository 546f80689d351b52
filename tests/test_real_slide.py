"""A real slide, made by nobody here: CMU-1-Small-Region (Aperio SVS, CC0) through the slides reader, the tissue
mask, the patch grid, a short trial, an attention map over it, and ``python -m ips_search.extract`` to TRIDENT's
layout. Fetched by ``make install`` / ``make test-slide`` (tests/real_slide.py); without it these tests skip,
naming the target. The TRIDENT attributes are also checked on generated slides, which need no download."""

from __future__ import annotations

import csv
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import torch
import yaml
from matplotlib.patches import Rectangle
from real_slide import HEIGHT, MPP, SKIP_REASON, WIDTH, crop_cohort, find_slide, real_data_config, short_trial

from ips_search.config import DataConfig
from ips_search.data.slides import make_source, tissue
from ips_search.data.slides.generate import make_layout, write_slide
from ips_search.data.slides.readers import detect, open_slide
from ips_search.extraction import ExtractConfig, extract, magnification
from ips_search.report.attention import compute_attention
from ips_search.report.slide_maps import plot_slide_attention

# what TRIDENT's coords_to_h5 writes on coords (trident/IO.py), and on features (trident WSI.extract_features)
TRIDENT_COORDS = {
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "savetodir",
    "level0_width",
    "level0_height",
}
TRIDENT_FEATURES = {"name", "savetodir", "encoder"}


@pytest.fixture(scope="module")
def real_slide() -> Path:
    path = find_slide()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(scope="module")
def real_cohort(real_slide, tmp_path_factory) -> Path:
    return crop_cohort(real_slide, tmp_path_factory.mktemp("real-cohort"))


# ---------------------------------------------------------------- reading


def test_the_reader_takes_levels_and_mpp_from_the_files_own_properties(real_slide):
    assert detect(real_slide) == "openslide"  # Aperio: OpenSlide's vendor driver, not the generic TIFF path
    reader = open_slide(real_slide)
    with openslide.OpenSlide(str(real_slide)) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "aperio" and props["aperio.MPP"] == "0.4990"
        assert reader.level_count == 1 and reader.dimensions == [(WIDTH, HEIGHT)] and reader.downsamples == [1.0]
        assert reader.mpp == float(props["openslide.mpp-x"]) == pytest.approx(MPP)
        # a region across the 240 px JPEG tiles' borders, pixel for pixel OpenSlide's
        region = reader.read_region(0, 230, 470, 300, 200)
        direct = np.asarray(slide.read_region((230, 470), 0, (300, 200)))[..., :3]
    reader.close()
    assert region.shape == (200, 300, 3) and np.array_equal(region, direct)


def test_the_thumbnail_is_the_block_mean_of_the_slide(real_slide):
    reader = open_slide(real_slide)
    image, scale = tissue.thumbnail(reader, 8.0)
    reader.close()
    assert scale == 8.0 and image.shape == (HEIGHT // 8, WIDTH // 8, 3)
    with openslide.OpenSlide(str(real_slide)) as slide:
        full = np.asarray(slide.read_region((0, 0), 0, (WIDTH, HEIGHT)))[..., :3].astype(np.float64)
        theirs = np.asarray(slide.get_thumbnail((WIDTH // 8, HEIGHT // 8)).convert("RGB"), dtype=np.float64)
    h, w = image.shape[:2]
    block_mean = full[: h * 8, : w * 8].reshape(h, 8, w, 8, 3).mean(axis=(1, 3))
    assert np.abs(block_mean - image).max() <= 0.5 + 1e-9  # rounded to uint8, nothing else
    assert theirs.shape == image.shape and np.abs(theirs.mean((0, 1)) - image.mean((0, 1))).max() < 1.0


def test_otsu_separates_stained_tissue_from_glass(real_slide):
    reader = open_slide(real_slide)
    image, _ = tissue.thumbnail(reader, 8.0)
    reader.close()
    mask = tissue.foreground_mask(image)
    assert 0.2 < mask.mean() < 0.45  # the tissue strip, not the glass around it (30% when measured)
    tissue_colour, glass_colour = image[mask].mean(0), image[~mask].mean(0)  # (3,) RGB each
    assert (glass_colour > 225).all()  # bright, grey-white glass
    red, green, blue = tissue_colour
    assert green < red - 30 and green < blue - 20  # eosin and haematoxylin both absorb green: pink-purple
    grey = image.max(-1) - image.min(-1) < 8  # unstained pixels
    bright_grey = grey & (image.min(-1) > 225)
    assert bright_grey.sum() > 1000 and not mask[bright_grey].any()


def test_patch_grid_keeps_tissue_patches_at_whole_tile_steps_and_reads_them_as_openslide(real_slide, tmp_path):
    cfg = DataConfig(dataset="slides", patch_size=256, level=0, min_foreground=0.5, cache_dir=str(tmp_path))
    source = make_source(real_slide, cfg)
    grid = tissue.grid_coords(WIDTH, HEIGHT, 256, 256)  # (88, 2): 8 x 11 whole patches
    kept = {tuple(c) for c in source.coords.tolist()}
    assert kept <= {tuple(c) for c in grid.tolist()} and 15 <= len(source) <= 45  # 27 when measured
    assert (source.coords[:, 0] + 256 <= WIDTH).all() and (source.coords[:, 1] + 256 <= HEIGHT).all()
    index = np.array([0, len(source) // 2, len(source) - 1])
    with openslide.OpenSlide(str(real_slide)) as slide:
        for patch, (x, y) in zip(source.read(index), source.coords[index], strict=True):
            direct = np.asarray(slide.read_region((int(x), int(y)), 0, (256, 256)))[..., :3]
            assert torch.equal(patch, torch.from_numpy(direct.copy()).permute(2, 0, 1).float() / 255)
    # mpp: 0.998 um/px is twice the scan's, read as 512 px at level 0 and shrunk to the 256 px patch
    coarse = make_source(real_slide, dataclasses.replace(cfg, level=None, mpp=0.998))
    assert (coarse.level, coarse.read_size, coarse.patch_size_level0) == (0, 512, 512.0)
    assert coarse.read([0]).shape == (1, 3, 256, 256)


# ---------------------------------------------------------------- a trial and its attention map


def test_a_short_trial_on_real_tissue_draws_its_attention_over_the_real_slide(real_slide, real_cohort, tmp_path):
    trial, history, test = short_trial(real_cohort, tmp_path / "cache", epochs=2, memory_size=4)
    assert [h["images"] for h in history] == [len(trial.splits.train)] * 2
    assert all(math.isfinite(h["loss"]) for h in history) and math.isfinite(test["loss"])
    assert test["images"] == 3  # two crops and the slide itself
    maps = compute_attention(trial, n_images=3)
    (on_slide,) = [m for m in maps if Path(m.source.path) == real_slide]
    n = len(on_slide.source)
    assert on_slide.source.kind == "openslide" and n > 300  # 64 px tissue patches of the whole slide at 20x
    assert len(set(on_slide.indices.tolist())) == 4 and int(on_slide.indices.max()) < n
    fig = plot_slide_attention(
        real_slide,
        on_slide.source.coords,
        on_slide.indices.numpy(),
        on_slide.source.patch_size_level0,
        on_slide.scores.numpy(),
    )
    ax = fig.axes[0]
    thick = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_linewidth() > 1]
    height, width = ax.images[0].get_array().shape[:2]
    assert len(thick) == 4 and len(ax.patches) == n
    assert all(0 <= r.get_x() < width and 0 <= r.get_y() < height for r in thick)  # on the slide's thumbnail
    fig.savefig(tmp_path / "attention.png")
    assert (tmp_path / "attention.png").stat().st_size > 10_000


# ---------------------------------------------------------------- TRIDENT's layout


def _trident_checks(h5: Path, folder: Path, patch_size: int) -> dict:
    """The attributes TRIDENT writes are there and agree with each other as in TRIDENT; returns coords' attrs."""
    with h5py.File(h5, "r") as f:
        coords, features = dict(f["coords"].attrs), dict(f["features"].attrs)
        n = len(f["coords"])
        assert f["features"].shape[0] == n and f["coords"].shape == (n, 2)
    assert TRIDENT_COORDS <= set(coords) and TRIDENT_FEATURES <= set(features)
    assert coords["name"] == features["name"] == h5.stem and coords["savetodir"] == features["savetodir"] == str(folder)
    assert coords["patch_size"] == patch_size and coords["overlap"] == 0
    # trident coords_to_h5: patch_size_level0 = patch_size * src_mag // target_mag
    assert coords["patch_size_level0"] == patch_size * coords["level0_magnification"] // coords["target_magnification"]
    return coords


def test_extraction_writes_tridents_attributes_for_generated_slides(tmp_path):
    """No download needed: generated Aperio slides (0.5 um/px: 20x) read at level 1 (10x)."""
    rows = [("path", "label", "split")]
    for i in range(6):
        name = f"s{i}.svs"
        write_slide(tmp_path / name, make_layout(512, seed=i, tumour=i % 2 == 1), flavour="svs")
        rows.append((name, "ab"[i % 2], "test" if i >= 4 else "train"))
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    source = DataConfig(
        dataset="slides", manifest=str(tmp_path / "manifest.csv"), patch_size=32, level=1, min_foreground=0.3
    )
    cfg = ExtractConfig(source=source, encoder="random-init", model={"encoder": "small-cnn", "dim": 8})
    folder = extract(cfg, str(tmp_path / "cache"), progress=False, device="cpu")
    files = sorted(folder.glob("*.h5"))
    assert len(files) == 6
    for h5 in files:
        coords = _trident_checks(h5, folder, 32)
        assert (coords["level0_magnification"], coords["target_magnification"]) == (20, 10)
        assert (coords["patch_size_level0"], coords["level0_width"], coords["level0_height"]) == (64, 512, 512)
        assert coords["patch_level"] == 1  # CLAM's, beside TRIDENT's
    with h5py.File(files[0], "r") as f:
        assert f["features"].attrs["encoder"] == "random-init"


def test_magnification_is_tridents_nominal_objective():
    assert [magnification(m) for m in (0.125, 0.25, 0.499, 0.5, 1.0, 2.0)] == [80, 40, 20, 20, 10, 5]
    assert magnification(None) is None and magnification(4.0) is None  # TRIDENT gives none: the attrs are left out


def test_extract_cli_writes_the_real_slide_in_tridents_layout(real_slide, real_cohort, tmp_path):
    data = dataclasses.asdict(real_data_config(real_cohort, tmp_path / "cache"))
    keys = ("dataset", "manifest", "patch_size", "level", "min_foreground")
    spec = tmp_path / "data.yaml"
    spec.write_text(yaml.safe_dump({"data": {k: data[k] for k in keys}}))
    argv = ["--data-yaml", str(spec), "--encoder", "random-init", "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(
        [sys.executable, "-m", "ips_search.extract", *argv, "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    found = []
    for h5 in sorted(folder.glob("*.h5")):
        with h5py.File(h5, "r") as f:
            if f["coords"].attrs["level0_width"] == WIDTH:
                found.append(h5)
    (h5,) = found  # the slide itself; the others are its crops
    coords = _trident_checks(h5, folder, 64)
    assert (coords["level0_magnification"], coords["target_magnification"], coords["patch_size_level0"]) == (20, 20, 64)
    assert (coords["level0_width"], coords["level0_height"]) == (WIDTH, HEIGHT)
    reference = make_source(real_slide, DataConfig(**{k: data[k] for k in keys}, cache_dir=str(tmp_path)))
    with h5py.File(h5, "r") as f:
        assert np.array_equal(f["coords"][:], reference.coords)  # level-0 corners of the slide's tissue patches
        assert np.isfinite(f["features"][:]).all()
