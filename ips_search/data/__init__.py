"""Datasets for IPS: synthetic Megapixel MNIST, the notebook's resized MNIST, image folders, slides and
pre-extracted patch embeddings.

``build_datasets(cfg)`` returns train/val/test datasets whose items are
``(patches (N, C, P, P) float32 in [0, 1], {task: target})`` plus what the model
needs to know (tasks, channels, image size, patch grid). For ``slides`` an item's
first element is instead a lazy patch source (:class:`~ips_search.data.slides.SlidePatchSource`)
whose N differs from slide to slide; for ``features`` a source of (N, D) embeddings or an (N, D) tensor.
Imports nothing above ``ips_search.config`` / ``ips_search.errors``: ``features`` with ``extract`` settings are
extracted first by :func:`ips_search.extraction.resolve_data`, which needs an encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from ips_search.config import DataConfig, Task
from ips_search.data import features, folder, megapixel, mnist, slides
from ips_search.data.dataset import PatchDataset
from ips_search.data.patches import patch_grid, patch_map, patchify, patchify_batch, unpatchify
from ips_search.data.preview import DataPreview, preview_folder, preview_mnist
from ips_search.errors import ConfigError

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
    n_chan: int  # C; for features the embedding width D_in
    image_hw: tuple[int, int]
    grid: tuple[int, int]  # patch rows, cols; slides and features: (1, N of the largest item)
    n_patches: int  # N; slides and features: the smallest N of any item (M must stay below it)


def build_datasets(cfg: DataConfig) -> DataSplits:
    """Build (or load from cache) the datasets ``cfg.dataset`` names; see each module for details."""
    if cfg.dataset == "slides":
        return _build_slides(cfg)
    if cfg.dataset == "features":
        return _build_features(cfg)
    side = cfg.canvas_size if cfg.dataset == "megapixel" else cfg.image_size
    grid = patch_grid(side, side, cfg.patch_size, cfg.patch_stride)  # fail fast, before any generation
    builder = {"megapixel": megapixel.build, "mnist-resized": mnist.build, "folder": folder.build}[cfg.dataset]
    train, val, test, tasks = builder(cfg)
    train.augment_shift(cfg.augment_shift)
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


def _build_slides(cfg: DataConfig) -> DataSplits:
    """Slides differ in size: ``image_hw`` is (0, 0) and ``n_patches`` the smallest N over all three splits."""
    train, val, test, tasks = slides.build(cfg)
    n_min = min(min(ds.n_patches, default=0) for ds in (train, val, test) if len(ds))
    return DataSplits(
        train=train,  # type: ignore[arg-type]
        val=val,  # type: ignore[arg-type]
        test=test,  # type: ignore[arg-type]
        tasks=tasks,
        n_chan=cfg.n_chan,
        image_hw=(0, 0),
        grid=(1, n_min),
        n_patches=n_min,
    )


def _build_features(cfg: DataConfig) -> DataSplits:
    if cfg.extract is not None:  # extraction needs an encoder: it runs above this package
        raise ConfigError(
            "features with extract settings must be extracted first; call ips_search.extraction.resolve_data(cfg) "
            "or run python -m ips_search.extract"
        )
    train, val, test, tasks = features.build(cfg)
    counts = [f.n for split in (train, val, test) for f in split.files]
    return DataSplits(
        train=train,
        val=val,
        test=test,
        tasks=tasks,
        n_chan=train.n_chan,
        image_hw=(1, max(counts)),
        grid=(1, max(counts)),
        n_patches=min(counts),
    )


def preview_datasets(cfg: DataConfig) -> DataPreview:
    """What :func:`build_datasets` will build for ``cfg``, checked cheaply (cache files, headers, a small sample)."""
    if cfg.dataset == "slides":
        return slides.preview(cfg)
    if cfg.dataset == "features":
        return _preview_features(cfg)
    side = cfg.canvas_size if cfg.dataset == "megapixel" else cfg.image_size
    patch_grid(side, side, cfg.patch_size, cfg.patch_stride)
    previews = {"megapixel": megapixel.preview, "mnist-resized": preview_mnist, "folder": preview_folder}
    return previews[cfg.dataset](cfg)


def _preview_features(cfg: DataConfig) -> DataPreview:
    """Feature files: their headers read (shapes, widths, the manifest). Extraction settings are previewed by
    :func:`ips_search.extraction.preview` (it needs the extractor)."""
    train, val, test, _ = features.build(cfg)  # headers only: shapes, widths and the manifest's rows
    files = [f for split in (train, val, test) for f in split.files]
    return DataPreview(f"{len(files)} feature files ({files[0].dim}-d)", cached=True, detail="headers read")
