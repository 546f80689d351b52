"""Datasets for IPS: synthetic Megapixel MNIST, the notebook's resized MNIST, and image folders.

``build_datasets(cfg)`` returns train/val/test datasets whose items are
``(patches (N, C, P, P) float32 in [0, 1], {task: target})`` plus what the model
needs to know (tasks, channels, image size, patch grid). Imports nothing above
``ips_search.config`` / ``ips_search.errors``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ips_search.config import DataConfig, Task
from ips_search.data import folder, megapixel, mnist
from ips_search.data.dataset import PatchDataset
from ips_search.data.patches import patch_grid, patch_map, patchify, patchify_batch, unpatchify
from ips_search.data.preview import DataPreview, preview_folder, preview_mnist

__all__ = [
    "DataPreview",
    "DataSplits",
    "PatchDataset",
    "build_datasets",
    "preview_datasets",
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
    n_chan: int
    image_hw: tuple[int, int]
    grid: tuple[int, int]  # patch rows, cols
    n_patches: int  # N


def build_datasets(cfg: DataConfig) -> DataSplits:
    """Build (or load from cache) the datasets ``cfg.dataset`` names; see each module for details."""
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


def preview_datasets(cfg: DataConfig) -> DataPreview:
    """What :func:`build_datasets` will build for ``cfg``, checked cheaply (cache files, headers, a small sample)."""
    side = cfg.canvas_size if cfg.dataset == "megapixel" else cfg.image_size
    patch_grid(side, side, cfg.patch_size, cfg.patch_stride)
    previews = {"megapixel": megapixel.preview, "mnist-resized": preview_mnist, "folder": preview_folder}
    return previews[cfg.dataset](cfg)
