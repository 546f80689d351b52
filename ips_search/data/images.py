"""Plain images (PNG, JPEG, BMP, strip TIFF, ...) decoded whole, safely.

* **Pixel limit.** A file's width x height is read from its header before any pixel is decoded and refused above
  ``data.max_pixels`` (default 1 gigapixel, about 3 GB of RAM for RGB), so a small crafted file that claims a huge
  size cannot exhaust memory. Pillow's own limit (``Image.MAX_IMAGE_PIXELS``) is never changed for the process: it
  is set to ours only while one of our images is opened and decoded (:func:`open_image`), then restored. Big slide
  formats read lazily (OpenSlide, tiled TIFF) are never decoded whole and need no limit.
* **Bit depth.** 16-bit samples are scaled by their range (``>> 8``), not clipped at 255 (Pillow's ``convert("L")``
  turns every 16-bit value above 255 white); floats are taken as [0, 1] when they lie in it.
* **TIFF planes.** A TIFF with separate colour planes (``planarconfig`` SEPARATE, ``(S, H, W)``) gets its sample axis
  moved last; a TIFF holding several images or planes of another kind (Z, time, pages) is refused by name.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ips_search.config import DataConfig
from ips_search.errors import ConfigError

DEFAULT_MAX_PIXELS: int = DataConfig.max_pixels
_PIL_LIMIT_LOCK = threading.Lock()  # Pillow's limit is one global: our opens set and restore it one at a time


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:100] or type(exc).__name__


def pixel_limit(max_pixels: Any = None) -> int:
    """``max_pixels`` checked (None: the default)."""
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ConfigError(f"data.max_pixels must be a positive number of pixels, got {max_pixels!r}; e.g. 1000000000")
    return max_pixels


def _too_big(path: Path, pixels: int | None, size: str, limit: int) -> ConfigError:
    claimed = f"{size} = {pixels:,} pixels" if size and pixels else f"{pixels:,} pixels" if pixels else "too large"
    return ConfigError(
        f"image {path} has {claimed}, over data.max_pixels = {limit:,}; it was not decoded: raise data.max_pixels "
        "if you trust the file, or convert it to a tiled pyramidal TIFF (dataset: slides reads those lazily)"
    )


def check_pixels(path: Path, width: int, height: int, max_pixels: int | None = None) -> None:
    """Refuse an image whose header claims more than ``max_pixels`` pixels."""
    limit = pixel_limit(max_pixels)
    if width * height > limit:
        raise _too_big(path, width * height, f"{width}x{height}", limit)


@contextlib.contextmanager
def _pil_limit(limit: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to ours for the ``with`` body only (restored after, even on error)."""
    from PIL import Image

    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse those sizes ourselves
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


@contextlib.contextmanager
def open_image(path: Path, max_pixels: int | None = None) -> Iterator[Any]:
    """``PIL.Image.open(path)`` (header only) with its size checked against ``max_pixels``; decode in the body
    (``im.load()``) while Pillow's own limit is ours. An unreadable file or one over the limit is a ConfigError."""
    from PIL import Image

    limit = pixel_limit(max_pixels)
    with _pil_limit(limit):
        try:
            with Image.open(path) as im:
                width, height = im.size
                check_pixels(path, width, height, limit)
                yield im
        except ConfigError:
            raise
        except Image.DecompressionBombError as exc:  # Pillow refuses at twice its limit, before we see the size
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise _too_big(path, int(found[1]) if found else None, "", limit) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ConfigError(f"cannot read image {path} ({_reason(exc)}); replace or remove the file") from None


def read_header(path: Path, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from the header (TIFF by tifffile, the rest by Pillow), checked against ``max_pixels``."""
    if path.suffix.lower() in (".tif", ".tiff"):
        with _open_tiff(path) as tif:
            _, width, height = _tiff_layout(path, tif, max_pixels)
        return width, height
    with open_image(path, max_pixels) as im:
        return im.size


@contextlib.contextmanager
def _open_tiff(path: Path) -> Iterator[Any]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            yield tif
    except ConfigError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:
        raise ConfigError(f"cannot read image {path} ({_reason(exc)}); replace or remove the file") from None


def _tiff_layout(path: Path, tif: Any, max_pixels: int | None) -> tuple[Any, int, int]:
    """The first series' full-resolution level, its width and height, checked (headers only)."""
    series = tif.series[0]
    level = series.levels[0] if series.levels else series
    axes, shape = level.axes, level.shape
    extra = [(a, n) for a, n in zip(axes, shape, strict=True) if a not in "YX" and n > 1]
    if len(extra) > 1 or (extra and extra[0][0] not in "SC"):  # one sample axis at most (colour, alpha)
        what = ", ".join(f"{n} along {a}" for a, n in extra)
        raise ConfigError(
            f"image {path} holds several images or planes ({what}; shape {shape}); only one 2-D image (grey or "
            "colour) per file is supported: save the one to use as its own file"
        )
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    check_pixels(path, width, height, max_pixels)
    return level, width, height


def read_tiff(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """A TIFF's first image as ``(H, W, S)`` in its own dtype; the size is checked before decoding."""
    import tifffile

    with _open_tiff(path) as tif:
        level, _, _ = _tiff_layout(path, tif, max_pixels)
        try:
            array = np.asarray(level.asarray())
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:
            raise ConfigError(f"cannot read image {path} ({_reason(exc)}); replace or remove the file") from None
    axes = level.axes
    array = array.reshape(level.shape)
    rest = [i for i, a in enumerate(axes) if a not in "YX"]  # S or C (planar colour) and axes of length 1
    array = array.transpose([axes.index("Y"), axes.index("X"), *rest])  # samples last: (H, W, ...)
    return array.reshape(array.shape[0], array.shape[1], -1)  # (H, W, S)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Samples scaled to uint8 by their dtype's range: 16-bit ``>> 8``, other integers by their maximum, booleans to
    0 / 255, floats in [0, 1] times 255 (floats beyond 1 by their largest value)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return (array >> 8).astype(np.uint8)
    if array.dtype.kind in "ui":
        top = float(np.iinfo(array.dtype).max)
        return np.clip(array.astype(np.float32) / (top / 255.0), 0, 255).astype(np.uint8)
    top = float(np.nanmax(array)) if array.size else 1.0
    top = 1.0 if top <= 1.0 else top
    return np.clip(np.nan_to_num(array.astype(np.float32)) / top * 255.0, 0, 255).astype(np.uint8)


def pil_high_depth_to_uint8(im: Any) -> Any:
    """A 16- or 32-bit single-channel Pillow image (modes ``I;16*``, ``I``, ``F``) as an 8-bit ``L`` image scaled by
    its range (``convert("L")`` would clip every value above 255 to white); other images unchanged.

    ``I;16*`` is 16-bit by its mode; ``I`` (32-bit, e.g. a 16-bit PGM) is taken as 16-bit when a value exceeds 255,
    8-bit otherwise; ``F`` as [0, 1] when it lies in it, else 0-255 or 16-bit like ``I``."""
    from PIL import Image

    if im.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return im
    array = np.asarray(im)
    if im.mode.startswith("I;16"):
        return Image.fromarray(to_uint8(array.astype(np.uint16)), "L")
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    top = float(finite.max()) if finite.size else 0.0
    if im.mode == "F" and top <= 1.0:
        scale = 1.0
    else:
        scale = 65535.0 if top > 255 else 255.0
    scaled = np.nan_to_num(array.astype(np.float32) * np.float32(255.0 / scale))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
