"""Where the patches of a features file lie, so that its attention map is drawn on the image or slide.

A features file holds embeddings and their ``coords``, not pixels. Its view, best first:

* features this tool extracted (``data.extract``): ``<split>-<i>.h5`` is image ``i`` of that split of the
  ``extract.from`` data, rebuilt from the cache: a canvas or picture is drawn whole, a slide as its thumbnail;
* TRIDENT/CLAM features with ``data.slides_root``: the slide ``<slide>.<ext>`` in that folder, with the patches at
  their level-0 ``coords`` (a patch's level-0 side from ``coords.attrs``: TRIDENT's ``patch_size_level0``, or
  CLAM's ``patch_size`` at ``patch_level``);
* otherwise the coords alone: every patch a grey square at its place, the kept ones coloured.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips_search.config import ExperimentConfig

EXTRACTED_NAME = re.compile(r"(train|val|test)-(\d+)")  # ips_search.extract's file names


@dataclass
class SlideView:
    """A slide on disk (``path``; ``None``: no image, the coords alone) and every patch's level-0 place: the
    attributes :func:`ips_search.report.slide_maps.draw_slide_attention` reads from a slide source."""

    path: str | None
    coords: np.ndarray  # (N, 2) level-0 (x, y) top-left corners
    patch_size_level0: float
    cache_dir: str | None = None


@dataclass
class ImageView:
    """The in-memory image the features were cut from, on the patch grid they were cut with."""

    image: torch.Tensor  # (C, H, W) in [0, 1]
    grid: tuple[int, int]  # patch rows, cols: feature row j is patch j in row-major order
    patch_size: int
    stride: int


class FeatureViews:
    """The view of each features file of one trial's data; the source data is rebuilt once, on first use."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.data = config.data
        self._source_splits: Any = None

    def __call__(self, dataset: Any, i: int) -> SlideView | ImageView:
        source = dataset.source(i)
        coords, attrs = _coords_and_attrs(source.path)
        stem = Path(source.path).stem
        match = EXTRACTED_NAME.fullmatch(stem)
        if self.data.extract is not None and match:
            view = self._extracted_view(match.group(1), int(match.group(2)), coords)
            if view is not None:
                return view
        if coords is None:
            n = len(source)
            coords = np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], axis=1)  # no places: one row of squares
            return SlideView(None, coords, 1.0)
        slide = _find_slide(self.data.slides_root, stem)
        return SlideView(
            str(slide) if slide else None, coords, _side_level0(attrs, slide, self.data.cache_dir), self.data.cache_dir
        )

    def class_names(self, classes: list[str] | None) -> list[str] | None:
        """The names of ``classes`` (the features dataset's): extraction writes class indices into its manifest, so
        features this tool extracted take the names from the data they came from (a slide manifest's
        ``normal``/``tumor``), when it has as many classes."""
        if self.data.extract is None:
            return classes
        names = getattr(self._source().train, "classes", None)
        return list(names) if names and classes and len(names) == len(classes) else classes

    def _source(self) -> Any:
        if self._source_splits is None:
            from ips_search.data import build_datasets
            from ips_search.extraction import parse_extract

            self._source_splits = build_datasets(parse_extract(self.data.extract).source)
        return self._source_splits

    def _extracted_view(self, split: str, index: int, coords: np.ndarray | None) -> SlideView | ImageView | None:
        dataset = getattr(self._source(), split)
        if index >= len(dataset):
            return None
        if hasattr(dataset, "image"):  # megapixel, folder: the whole picture, cut on a grid
            return ImageView(dataset.image(index), tuple(dataset.grid), dataset.patch_size, dataset.stride)
        slide = dataset[index][0]  # a slide source: opens nothing until read
        places = coords if coords is not None else slide.coords
        return SlideView(str(slide.path), places, float(slide.patch_size_level0), slide.cache_dir)


def _coords_and_attrs(path: str) -> tuple[np.ndarray | None, dict[str, Any]]:
    import h5py

    with h5py.File(path, "r") as f:
        if "coords" not in f:
            return None, {}
        return np.asarray(f["coords"][:], dtype=np.int64), dict(f["coords"].attrs)


def _find_slide(root: str | None, stem: str) -> Path | None:
    if not root:
        return None
    from ips_search.data.slides.readers import READABLE_EXTS

    for path in sorted(Path(root).expanduser().glob(f"{glob.escape(stem)}.*")):
        if path.suffix.lower() in READABLE_EXTS:
            return path
    return None


def _side_level0(attrs: dict[str, Any], slide: Path | None, cache_dir: str | None) -> float:
    """A patch's side in level-0 pixels from the coords' attributes (TRIDENT's, else CLAM's with the slide)."""
    if "patch_size_level0" in attrs:
        return float(attrs["patch_size_level0"])
    size = float(attrs.get("patch_size", 0) or 0)
    level = int(attrs.get("patch_level", 0) or 0)
    if size and level and slide is not None:
        from ips_search.data.slides.readers import open_slide

        reader = open_slide(slide, cache_dir=cache_dir)
        try:
            return size * float(reader.downsamples[min(level, len(reader.downsamples) - 1)])
        finally:
            reader.close()
    return size or 1.0
