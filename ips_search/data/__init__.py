"""Datasets for IPS: synthetic Megapixel MNIST, the notebook's resized MNIST, image folders, and
pre-extracted patch embeddings.

``build_datasets(cfg)`` returns train/val/test datasets whose items are
``(patches (N, C, P, P) float32 in [0, 1], {task: target})`` -- for ``features``,
``(source or (N, D) tensor, {"label": target})`` -- plus what the model needs to know
(tasks, channels, image size, patch grid). Imports nothing above
``ips_search.config`` / ``ips_search.errors``, with one exception: ``features`` with
``extract`` settings runs :mod:`ips_search.extract` (it needs an encoder) on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

from ips_search.config import DataConfig, Task
from ips_search.data import features, folder, megapixel, mnist
from ips_search.data.dataset import PatchDataset
from ips_search.data.patches import patch_grid, patch_map, patchify, patchify_batch, unpatchify

__all__ = [
    "DataSplits",
    "PatchDataset",
    "build_datasets",
    "patch_grid",
    "patch_map",
    "patchify",
    "patchify_batch",
    "unpatchify",
]


@dataclass
class DataSplits:
    """The three splits and their shapes: N = ``n_patches`` = rows * cols of ``grid``."""

    train: PatchDataset
    val: PatchDataset
    test: PatchDataset
    tasks: tuple[Task, ...]
    n_chan: int  # C; for features the embedding width D_in
    image_hw: tuple[int, int]
    grid: tuple[int, int]  # patch rows, cols; features: (1, N of the largest slide)
    n_patches: int  # N; features: the largest slide's


def build_datasets(cfg: DataConfig) -> DataSplits:
    """Build (or load from cache) the datasets ``cfg.dataset`` names; see each module for details."""
    if cfg.dataset == "features":
        return _build_features(cfg)
    side = cfg.canvas_size if cfg.dataset == "megapixel" else cfg.image_size
    grid = patch_grid(side, side, cfg.patch_size, cfg.patch_stride)  # fail fast, before any generation
    builder = {"megapixel": megapixel.build, "mnist-resized": mnist.build, "folder": folder.build}[cfg.dataset]
    train, val, test, tasks = builder(cfg)
    return DataSplits(
        train=train,
        val=val,
        test=test,
        tasks=tasks,
        n_chan=train.n_chan,
        image_hw=(side, side),
        grid=grid,
        n_patches=grid[0] * grid[1],
    )


def _build_features(cfg: DataConfig) -> DataSplits:
    if cfg.extract is not None:
        from ips_search.extract import extracted_data_config  # needs the model and warm start: lazily

        cfg = extracted_data_config(cfg)
    train, val, test, tasks = features.build(cfg)
    n_max = max(f.n for split in (train, val, test) for f in split.files)
    return DataSplits(
        train=train,
        val=val,
        test=test,
        tasks=tasks,
        n_chan=train.n_chan,
        image_hw=(1, n_max),
        grid=(1, n_max),
        n_patches=n_max,
    )
