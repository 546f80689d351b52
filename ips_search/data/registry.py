"""The dataset registry and the geometry a dataset gives the model.

Each dataset kind registers one :class:`DatasetKind` in its own module (``DATASETS.register(...)``); the rest of
the code asks the registry (``DATASETS[name]``, :func:`dataset_names`) and the entry's properties instead of
branching on the dataset's name. The data decides its geometry once (:class:`DataGeometry`: patch size and stride,
channels, tasks, patch counts): the builders return it on :class:`DataSplits`, :func:`data_geometry` gives it from
the config alone where the images are of one size, and :meth:`DataGeometry.model_config` is the one place the
model's config receives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ips_search.config import DataConfig, IPSConfig, Registry, Task
from ips_search.data.patches import patch_grid
from ips_search.data.preview import DataPreview
from ips_search.errors import ConfigError


@dataclass(frozen=True)
class DataGeometry:
    """What the data gives the model: P = ``patch_size``, its stride, C = ``n_chan`` (features: the embedding width
    D_in), the tasks, and N = ``n_patches`` = rows * cols of ``grid``.

    Where every item has its own N (slides, features), ``item_counts`` holds them (train, val, test in order),
    ``n_patches`` is the smallest (M must stay below it), ``grid`` is ``(1, the largest)`` and ``image_hw`` None.
    """

    patch_size: int
    patch_stride: int
    n_chan: int
    tasks: tuple[Task, ...]
    n_patches: int
    grid: tuple[int, int]
    image_hw: tuple[int, int] | None = None
    item_counts: tuple[int, ...] | None = None

    def model_config(self, model: IPSConfig) -> IPSConfig:
        """``model`` cut to this data: the one place a model config receives the data's geometry."""
        return dataclasses.replace(
            model, tasks=self.tasks, n_chan=self.n_chan, patch_size=self.patch_size, patch_stride=self.patch_stride
        )


def image_geometry(cfg: DataConfig, side: int, n_chan: int, tasks: tuple[Task, ...]) -> DataGeometry:
    """Square ``side`` images cut into ``cfg``'s patches; a patch size that does not tile them is a ConfigError."""
    grid = patch_grid(side, side, cfg.patch_size, cfg.patch_stride)
    stride = cfg.patch_stride or cfg.patch_size
    return DataGeometry(cfg.patch_size, stride, n_chan, tasks, grid[0] * grid[1], grid, (side, side))


def item_geometry(cfg: DataConfig, n_chan: int, tasks: tuple[Task, ...], counts: Sequence[int]) -> DataGeometry:
    """Items of their own N each (``counts``, every item of every split)."""
    stride = cfg.patch_stride or cfg.patch_size
    counts = tuple(int(n) for n in counts)
    return DataGeometry(cfg.patch_size, stride, n_chan, tasks, min(counts), (1, max(counts)), None, counts)


@dataclass
class DataSplits:
    """The three splits and the geometry the data gives the model."""

    train: Any
    val: Any
    test: Any
    geometry: DataGeometry

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.geometry.tasks

    @property
    def n_chan(self) -> int:
        return self.geometry.n_chan

    @property
    def n_patches(self) -> int:
        return self.geometry.n_patches

    @property
    def grid(self) -> tuple[int, int]:
        return self.geometry.grid

    @property
    def image_hw(self) -> tuple[int, int] | None:
        return self.geometry.image_hw


@dataclass(frozen=True)
class DatasetKind:
    """One dataset kind: its name, how it is built and previewed, and what the rest of the code needs to know.

    ``build(cfg)`` returns the splits with their geometry; ``preview(cfg)`` what ``build`` will cost, checked cheaply
    (``--dry-run``). ``image_side(cfg)`` is the side of the square images every item is cut from, read from the
    config alone; None for a kind whose items each have their own N (slides, features: N comes from the files, once
    built). ``layout(cfg)`` gives ``(channels, tasks)`` from the config as cheaply (a folder's class names, no image
    decoded); image kinds need it, and their builders use the same function (:func:`data_geometry`).
    """

    name: str
    build: Callable[[DataConfig], DataSplits]
    preview: Callable[[DataConfig], DataPreview]
    image_side: Callable[[DataConfig], int] | None = None
    layout: Callable[[DataConfig], tuple[int, tuple[Task, ...]]] | None = None
    features: bool = False  # items are (N, D) patch embeddings, which only an encoder that reads features takes
    warm_start: bool = False  # the digit-pretrained encoder (ips_search.warmstart) applies to its patches
    default_encoder: str | None = None  # model.encoder when the space names none (None: IPSConfig's default)

    def __post_init__(self) -> None:
        if (self.image_side is None) != (self.layout is None):
            raise ValueError(f"dataset {self.name!r}: give both image_side and layout (whole images) or neither")

    @property
    def variable_n(self) -> bool:
        """Every item has its own N, known once the data is built."""
        return self.image_side is None

    def check(self, cfg: DataConfig) -> None:
        """What this kind refuses of a config whose fields are each valid (one ConfigError line)."""
        if cfg.augment_shift and self.variable_n:
            whole = ", ".join(k.name for k in DATASETS.entries() if not k.variable_n)
            raise ConfigError(
                f"augment_shift applies to whole images ({whole}), not to {self.name}; remove it from data:"
            )


DATASETS: Registry[DatasetKind] = Registry("dataset", "data.dataset")


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)


def dataset_kind(cfg: DataConfig, where: str | None = None) -> DatasetKind:
    """The registered kind of ``cfg.dataset``, ``cfg`` checked against it; else one ConfigError line."""
    kind = DATASETS.get(cfg.dataset, where)
    kind.check(cfg)
    return kind


def data_geometry(cfg: DataConfig) -> DataGeometry | None:
    """The geometry ``cfg`` gives the model, from the config alone (no image generated or decoded); None where N
    comes from the files (``kind.variable_n``: build the data). The image kinds' builders start from it."""
    kind = DATASETS[cfg.dataset]
    if kind.image_side is None or kind.layout is None:
        return None
    side = kind.image_side(cfg)
    patch_grid(side, side, cfg.patch_size, cfg.patch_stride)  # fail fast: before the layout reads anything
    return image_geometry(cfg, side, *kind.layout(cfg))


def image_splits(cfg: DataConfig, build: Callable[[DataConfig], tuple[Any, Any, Any]]) -> DataSplits:
    """The splits of an image kind: the geometry first (a patch size that does not tile fails before anything is
    generated or decoded), then ``build``'s three PatchDatasets, the training one shifted by ``augment_shift``."""
    geometry = data_geometry(cfg)
    assert geometry is not None, f"{cfg.dataset} is not a kind of whole images"
    train, val, test = build(cfg)
    train.augment_shift(cfg.augment_shift)
    return DataSplits(train, val, test, geometry)
