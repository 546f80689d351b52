"""Datasets for IPS: synthetic Megapixel MNIST, the notebook's resized MNIST, image folders, slides and
pre-extracted patch embeddings.

``build_datasets(cfg)`` returns train/val/test datasets whose items are
``(patches (N, C, P, P) float32 in [0, 1], {task: target})`` plus the geometry the model
receives (:class:`DataGeometry`: patch size, stride, channels, tasks, patch counts).
Each dataset kind registers itself in :data:`DATASETS` (:mod:`ips_search.data.registry`). For ``slides`` an item's
first element is instead a lazy patch source (:class:`~ips_search.data.slides.SlidePatchSource`)
whose N differs from slide to slide; for ``features`` a source of (N, D) embeddings or an (N, D) tensor.
Imports nothing above ``ips_search.config`` / ``ips_search.errors``: ``features`` with ``extract`` settings are
extracted first by :func:`ips_search.extraction.resolve_data`, which needs an encoder.
"""

from __future__ import annotations

from ips_search.config import DataConfig

# each module registers its dataset kind; a new kind is one module and its name here
from ips_search.data import features, folder, megapixel, mnist, slides  # noqa: F401
from ips_search.data.dataset import PatchDataset
from ips_search.data.patches import patch_grid, patch_map, patchify, patchify_batch, unpatchify
from ips_search.data.preview import DataPreview
from ips_search.data.registry import (
    DATASETS,
    DataGeometry,
    DatasetKind,
    DataSplits,
    data_geometry,
    dataset_kind,
    dataset_names,
    image_splits,
)

__all__ = [
    "DATASETS",
    "DataGeometry",
    "DataPreview",
    "DataSplits",
    "DatasetKind",
    "PatchDataset",
    "build_datasets",
    "data_geometry",
    "dataset_kind",
    "dataset_names",
    "image_splits",
    "preview_datasets",
    "patch_grid",
    "patch_map",
    "patchify",
    "patchify_batch",
    "unpatchify",
]


def build_datasets(cfg: DataConfig) -> DataSplits:
    """Build (or load from cache) the datasets ``cfg.dataset`` names, with their geometry; see each module."""
    return dataset_kind(cfg).build(cfg)


def preview_datasets(cfg: DataConfig) -> DataPreview:
    """What :func:`build_datasets` will build for ``cfg``, checked cheaply (cache files, headers, a small sample)."""
    kind = dataset_kind(cfg)
    data_geometry(cfg)  # whole images: the patch grid and layout checked as the build will
    return kind.preview(cfg)
