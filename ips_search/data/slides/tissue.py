"""Foreground (tissue) detection and the patch grid of one slide.

On a low-resolution view of the slide (:func:`thumbnail`: the pyramid level closest to a few thumbnail pixels
per patch, read in strips and block-averaged, so memory stays flat in slide size) Otsu's threshold
(scikit-image ``threshold_otsu``) splits tissue from glass: on saturation for RGB (stained tissue is coloured,
glass is grey-white), on inverted grey for one channel (tissue is darker). A patch is kept when its foreground
fraction is at least ``min_foreground`` (0 keeps every patch). Patches form a grid of ``patch_size`` /
``stride`` pixels at the reading level starting at (0, 0); pixels past the last whole patch at the right and
bottom edges are not read (slides have no meaningful edge, unlike the fixed-size datasets).
"""

from __future__ import annotations

import math

import numpy as np

from ips_search.data.slides.readers import SlideReader

THUMB_PIXELS_PER_PATCH = 8  # thumbnail pixels along one patch side: enough for a foreground fraction
STRIP_ROWS = 1024  # rows of the source level read at once while building the thumbnail


def thumbnail(reader: SlideReader, factor: float) -> tuple[np.ndarray, float]:
    """A ``(h, w, C)`` uint8 view of the slide about ``factor`` times smaller than level 0, and its exact factor.

    Reads the deepest level whose downsample is at most ``factor``, then averages ``k x k`` blocks to get close
    to ``factor``; reading goes in strips of rows so only one strip is in memory."""
    level = max((i for i, d in enumerate(reader.downsamples) if d <= factor * 1.001), default=0)
    block = max(1, int(factor / reader.downsamples[level]))
    width, height = reader.dimensions[level]
    out_w, out_h = max(1, width // block), max(1, height // block)
    out = np.empty((out_h, out_w, reader.n_chan), dtype=np.uint8)
    rows = max(block, STRIP_ROWS // block * block)
    for y in range(0, out_h * block, rows):
        h = min(rows, out_h * block - y)
        strip = reader.read_region(level, 0, y, out_w * block, h).astype(np.float32)  # (h, W, C)
        strip = strip.reshape(h // block, block, out_w, block, -1).mean(axis=(1, 3))
        out[y // block : (y + h) // block] = np.round(strip).astype(np.uint8)
    return out, reader.downsamples[level] * block


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """``(h, w)`` bool: Otsu on saturation (RGB) or on inverted grey (one channel) of a ``(h, w, C)`` uint8 image.

    A uniform image (one value everywhere) has no foreground."""
    from skimage.filters import threshold_otsu

    if image.shape[-1] >= 3:  # uint8 max/min first: one float32 plane, not three (a 64k slide's view is 2k x 2k)
        top, low = image[..., :3].max(-1), image[..., :3].min(-1)
        signal = (top - low).astype(np.float32)
        signal /= np.maximum(top, 1).astype(np.float32)  # HSV saturation; 0 where the pixel is black
    else:
        signal = 1.0 - image[..., 0].astype(np.float32) / 255.0
    if float(signal.max() - signal.min()) < 0.02:  # nothing to separate (all glass, or all tissue)
        return np.zeros(signal.shape, dtype=bool) if float(signal.mean()) < 0.1 else np.ones(signal.shape, bool)
    return signal > threshold_otsu(signal)


def grid_coords(width: int, height: int, patch_size: int, stride: int) -> np.ndarray:
    """``(N, 2)`` int64 ``(x, y)`` top-left corners of the whole patches of a ``width x height`` level, row-major."""
    xs = np.arange(0, width - patch_size + 1, stride, dtype=np.int64)
    ys = np.arange(0, height - patch_size + 1, stride, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def patch_foreground(mask: np.ndarray, coords: np.ndarray, size: float, scale: float) -> np.ndarray:
    """Foreground fraction ``(N,)`` of patches at ``coords`` (level pixels, ``size`` wide) on a ``mask`` that is
    ``scale`` times smaller than that level (a summed-area table: cost independent of the patch size)."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / scale).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / scale).astype(np.int64), 0, h)
    x1 = np.clip(np.maximum(x0 + 1, np.ceil((coords[:, 0] + size) / scale).astype(np.int64)), 0, w)
    y1 = np.clip(np.maximum(y0 + 1, np.ceil((coords[:, 1] + size) / scale).astype(np.int64)), 0, h)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return inside / area


def compute_coords(reader: SlideReader, level: int, read_size: int, stride: int, min_foreground: float) -> np.ndarray:
    """``(N, 2)`` int64 level-0 ``(x, y)`` of the patches kept at ``level`` (``read_size`` pixels there, stepped
    by ``stride``), in row-major order; with ``min_foreground`` > 0 only patches with that much tissue."""
    width, height = reader.dimensions[level]
    coords = grid_coords(width, height, read_size, stride)  # level pixels
    if min_foreground > 0 and len(coords):
        factor = reader.downsamples[level] * read_size / THUMB_PIXELS_PER_PATCH
        image, thumb_scale = thumbnail(reader, max(factor, 1.0))
        mask = foreground_mask(image)
        keep = patch_foreground(mask, coords, read_size, thumb_scale / reader.downsamples[level]) >= min_foreground
        coords = coords[keep]
    return np.round(coords * reader.downsamples[level]).astype(np.int64)


def pick_level(reader: SlideReader, level: int | None, mpp: float | None) -> tuple[int, float]:
    """``(level, resample)``: the level to read and how much larger than ``patch_size`` to read there
    (1.0 unless ``mpp`` asks for a resolution between levels). ``None`` and ``None`` mean level 0."""
    if mpp is None:
        return (level or 0), 1.0
    assert reader.mpp is not None
    level_mpps = [reader.mpp * d for d in reader.downsamples]
    # the coarsest level at least as fine as the target (never upsample when a finer level exists)
    finer = [i for i, m in enumerate(level_mpps) if m <= mpp * 1.001]
    chosen = max(finer) if finer else 0
    resample = mpp / level_mpps[chosen]
    return chosen, 1.0 if math.isclose(resample, 1.0, rel_tol=1e-3) else resample
