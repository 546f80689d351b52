"""Region readers for whole-slide images and big ordinary images.

:func:`open_slide` picks, in this order (docs/slides.md says why):

1. :class:`OpenSlideReader` for every vendor format OpenSlide detects (Aperio SVS, Hamamatsu, MIRAX, Leica,
   Ventana, Philips, ...): it knows each vendor's quirks (which TIFF pages are levels and which are labels,
   overlaps, sparse tiles) and decodes only the tiles a region touches.
2. :class:`TiffReader` (``tifffile`` + ``imagecodecs``) for generic tiled TIFF and OME-TIFF, which OpenSlide
   either reads as "generic-tiff" or rejects: it finds OME-TIFF SubIFD pyramids that OpenSlide's generic driver
   does not see, and delivered 256 px patches 2.7-2.8x faster than a bare loop of OpenSlide's ``read_region``
   on the same files (``benchmarks/bench_slides.py``, docs/slides.md).
3. :class:`MemmapReader` for everything else Pillow or tifffile can decode (PNG, JPEG, strip TIFF, ...): these
   formats cannot be read by region, so the image is decoded once into a memory-mapped ``.npy`` pyramid under
   the cache directory that every trial on the machine then maps (decoded once per machine, not per trial). Its
   size is read from the header first: one over ``data.max_pixels`` is refused before decoding
   (:mod:`ips_search.data.images`, which also scales 16-bit samples and reorders separate TIFF colour planes).

Every reader answers ``read_region(level, x, y, width, height) -> (height, width, C) uint8`` in *that level's*
pixels, so reading a patch costs its region, never the whole slide. Opening reads headers only; a file that
cannot be opened, or whose tiles point past its end (truncated), is a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ips_search.data.cache import cache_key, cache_root, file_lock, save_npy_atomic
from ips_search.data.images import open_image, pil_high_depth_to_uint8, read_header, read_tiff, to_uint8
from ips_search.errors import ConfigError

SLIDE_EXTS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
PLAIN_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".gif")
READABLE_EXTS = SLIDE_EXTS + PLAIN_EXTS
DECODE_VERSION = 2  # bump when the decoded-image cache layout or decoding changes (2: 16-bit, planar TIFF)
MIN_DECODED_SIDE = 512  # the decoded pyramid halves until its longer side is below 2x this


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:100] or type(exc).__name__


class SlideReader:
    """What every reader offers. ``dimensions[level] = (width, height)``; ``downsamples[level]`` is the level's
    scale relative to level 0; ``mpp`` is microns per pixel at level 0, or ``None`` when the file does not say."""

    path: Path
    dimensions: list[tuple[int, int]]
    downsamples: list[float]
    mpp: float | None
    n_chan: int
    kind: str

    @property
    def level_count(self) -> int:
        return len(self.dimensions)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``(height, width, n_chan)`` uint8 of ``level`` starting at level pixel ``(x, y)``."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- OpenSlide


class OpenSlideReader(SlideReader):
    kind = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise ConfigError(f"cannot open slide {path} ({_reason(exc)}); replace or remove the file") from None
        self.dimensions = [tuple(map(int, d)) for d in self._slide.level_dimensions]
        self.downsamples = [float(d) for d in self._slide.level_downsamples]
        mpp = self._slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        self.n_chan = 3

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self.downsamples[level]
        region = self._slide.read_region((round(x * ds), round(y * ds)), level, (width, height))  # RGBA, premultiplied
        rgba = np.asarray(region)
        if rgba[..., 3].min() == 255:
            return rgba[..., :3]
        # outside the scanned area OpenSlide returns transparent black: show it as white glass instead
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        return np.clip(rgba[..., :3] + 255.0 * (1.0 - alpha), 0, 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


# ---------------------------------------------------------------- tifffile


def _tiff_levels(tif: Any) -> list[Any]:
    """The keyframe page of each pyramid level of the first series."""
    series = tif.series[0]
    return [level.keyframe for level in series.levels]


def check_tiff_complete(path: Path) -> None:
    """Raise :class:`ConfigError` when a TIFF's tiles/strips point past the end of the file (a truncated copy).

    Reads only the headers (IFDs); the pixel data are not touched."""
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [p for s in tif.series for level in s.levels for p in level.pages if p is not None]
            for page in pages:
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n]
                if ends and max(ends) > size:
                    raise ConfigError(
                        f"slide {path} is truncated (its image data run past the end of the {size}-byte file); "
                        "copy the file again or remove it"
                    )
    except tifffile.TiffFileError as exc:
        raise ConfigError(f"cannot read slide {path} ({_reason(exc)}); replace or remove the file") from None


class TiffReader(SlideReader):
    """Tiled (pyramidal) TIFF / OME-TIFF through tifffile: each region decodes only the tiles it overlaps."""

    kind = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
            self._pages = _tiff_levels(self._tif)
        except (tifffile.TiffFileError, ValueError, IndexError) as exc:
            raise ConfigError(f"cannot read slide {path} ({_reason(exc)}); replace or remove the file") from None
        first = self._pages[0]
        if not all(p.is_tiled for p in self._pages):
            raise ConfigError(f"{path} is not a tiled TIFF")  # caller falls back to MemmapReader
        if first.planarconfig == 2 and first.samplesperpixel > 1:  # separate planes: no cheap region reads
            raise ConfigError(f"{path} stores colour planes separately")
        self.dimensions = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
        self.downsamples = [self.dimensions[0][0] / w for w, _ in self.dimensions]
        self.n_chan = int(first.samplesperpixel)
        self.mpp = self._read_mpp(first)
        self._lock = threading.Lock()  # one file handle: seek + read must not interleave

    @staticmethod
    def _read_mpp(page: Any) -> float | None:
        tag, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
        if tag is None or unit is None:
            return None
        num, den = tag.value
        per_unit = num / den if den else 0.0
        microns = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))
        return microns / per_unit if per_unit and microns else None

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        tile_h, tile_w = int(page.tilelength), int(page.tilewidth)
        img_w, img_h = self.dimensions[level]
        across = math.ceil(img_w / tile_w)
        out = np.full((height, width, self.n_chan), 255, dtype=np.uint8)
        decode = page.decode
        fh = self._tif.filehandle
        for ty in range(max(0, y // tile_h), min(math.ceil(img_h / tile_h), (y + height - 1) // tile_h + 1)):
            for tx in range(max(0, x // tile_w), min(across, (x + width - 1) // tile_w + 1)):
                index = ty * across + tx
                with self._lock:
                    fh.seek(page.dataoffsets[index])
                    data = fh.read(page.databytecounts[index])
                tile, _, _ = decode(data, index, jpegtables=page.jpegtables)
                tile = np.asarray(tile).reshape(tile_h, tile_w, -1)  # (th, tw, C)
                # overlap of this tile with the requested region, in region and tile pixels
                x0, y0 = max(x, tx * tile_w), max(y, ty * tile_h)
                x1, y1 = min(x + width, (tx + 1) * tile_w, img_w), min(y + height, (ty + 1) * tile_h, img_h)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = to_uint8(
                    tile[y0 - ty * tile_h : y1 - ty * tile_h, x0 - tx * tile_w : x1 - tx * tile_w]
                )
        return out

    def close(self) -> None:
        self._tif.close()


# ---------------------------------------------------------------- decoded once, memory-mapped


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _decode_plain(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode a whole ordinary image to ``(H, W, C)`` uint8 (C = 1 or 3); the one time the image is in memory.

    Its size is read from the header first and refused above ``max_pixels`` (:mod:`ips_search.data.images`);
    16-bit samples are scaled by their range and TIFF colour planes stored separately are put last."""
    if path.suffix.lower() in (".tif", ".tiff"):
        array = read_tiff(path, max_pixels)  # (H, W, S) in the file's dtype
        return to_uint8(array[..., :3] if array.shape[-1] >= 3 else array[..., :1])
    with open_image(path, max_pixels) as im:
        im.load()
        im = pil_high_depth_to_uint8(im)  # 16/32-bit grey: scaled by its range, where convert("L") clips at 255
        im = im.convert("L" if im.mode in ("1", "L") else "RGB")
        array = np.asarray(im)
    return array if array.ndim == 3 else array[..., None]


def _halve(array: np.ndarray) -> np.ndarray:
    h, w = array.shape[0] // 2 * 2, array.shape[1] // 2 * 2
    blocks = array[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).astype(np.uint16)
    return (blocks.sum(axis=(1, 3)) // 4).astype(np.uint8)


def decoded_pyramid(path: Path, cache_dir: str | None = None, max_pixels: int | None = None) -> list[np.ndarray]:
    """The image decoded once into ``<cache>/slides-decoded/<key>/level<i>.npy`` (2x pyramid), memory-mapped.

    The key is the file's identity (resolved path, size, mtime), so a replaced file is decoded again; an image
    over ``max_pixels`` is refused from its header (:func:`_decode_plain`)."""
    folder = cache_root(cache_dir) / "slides-decoded" / cache_key({"v": DECODE_VERSION, **_file_identity(path)})
    done = folder / "levels.txt"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / "decode"):
            if not done.exists():
                level = _decode_plain(path, max_pixels)
                count = 0
                while True:
                    save_npy_atomic(level, folder / f"level{count}.npy")
                    count += 1
                    if max(level.shape[:2]) < 2 * MIN_DECODED_SIDE:
                        break
                    level = _halve(level)
                tmp = folder / "levels.txt.part"
                tmp.write_text(str(count))
                os.replace(tmp, done)
    count = int(done.read_text())
    return [np.load(folder / f"level{i}.npy", mmap_mode="r") for i in range(count)]


class MemmapReader(SlideReader):
    kind = "memmap"

    def __init__(self, path: Path, cache_dir: str | None = None, max_pixels: int | None = None) -> None:
        self.path = path
        self._levels = decoded_pyramid(path, cache_dir, max_pixels)
        self.dimensions = [(int(a.shape[1]), int(a.shape[0])) for a in self._levels]
        self.downsamples = [self.dimensions[0][0] / w for w, _ in self.dimensions]
        self.n_chan = int(self._levels[0].shape[2])
        self.mpp = None

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        array = self._levels[level]
        img_h, img_w = array.shape[:2]
        if x >= 0 and y >= 0 and x + width <= img_w and y + height <= img_h:
            return np.array(array[y : y + height, x : x + width])  # copies just this region's pages
        out = np.full((height, width, self.n_chan), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, img_w), min(y + height, img_h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = array[y0:y1, x0:x1]
        return out


# ---------------------------------------------------------------- choosing a reader


def detect(path: Path, max_pixels: int | None = None) -> str:
    """Which reader :func:`open_slide` uses for ``path``: ``openslide``, ``tifffile`` or ``memmap``.

    Reads headers only. Raises :class:`ConfigError` for a missing, unsupported, unreadable or truncated file, or
    for a plain image (decoded whole: ``memmap``) with more than ``max_pixels`` pixels."""
    if not path.is_file():
        raise ConfigError(f"slide {path} does not exist; fix its path or remove it from the list")
    suffix = path.suffix.lower()
    if suffix not in READABLE_EXTS:
        raise ConfigError(
            f"unsupported slide format {path.suffix or '(no extension)'} for {path}; "
            f"convert it to one of {', '.join(READABLE_EXTS)}"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    is_tiff = magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if is_tiff:
        check_tiff_complete(path)
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        vendor = None
    if vendor is not None and vendor != "generic-tiff":
        return "openslide"
    if is_tiff:  # generic or OME tiled TIFF: tifffile reads it faster, and sees SubIFD pyramids
        try:
            TiffReader(path).close()
            return "tifffile"
        except ConfigError as exc:
            if "not a tiled" not in str(exc) and "separately" not in str(exc):
                raise
        if vendor is not None:
            return "openslide"
    if suffix in SLIDE_EXTS and not is_tiff:
        raise ConfigError(f"cannot open slide {path} (OpenSlide does not recognise it); replace or remove the file")
    _check_image_header(path, max_pixels)
    return "memmap"


def _check_image_header(path: Path, max_pixels: int | None = None) -> None:
    """The header can be read (TIFF by tifffile, the rest by Pillow: nothing decoded) and its size is within
    ``max_pixels`` (the image will be decoded whole)."""
    read_header(path, max_pixels)


def open_slide(
    path: str | os.PathLike[str], kind: str | None = None, cache_dir: str | None = None, max_pixels: int | None = None
) -> SlideReader:
    """A reader for ``path`` (``kind`` from :func:`detect` when not given); ``max_pixels`` limits a plain image
    decoded whole (``memmap``; default :data:`ips_search.data.images.DEFAULT_MAX_PIXELS`)."""
    path = Path(path)
    kind = kind or detect(path, max_pixels)
    if kind == "openslide":
        return OpenSlideReader(path)
    if kind == "tifffile":
        return TiffReader(path)
    return MemmapReader(path, cache_dir, max_pixels)
