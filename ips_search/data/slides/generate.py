"""Generated whole-slide images for tests, benchmarks and the ``slides`` search space.

A slide is a white background with a few tissue blobs (wavy borders) and, on *tumour* slides, a few small
"lesions": discs inside the tissue, the only thing that tells the two classes apart (as in CAMELYON16 tumour vs
normal). The layout is synthetic; the tissue's look is a *texture* (:data:`TEXTURES`): ``ihc``, the generated
cohorts' (:func:`generate_cohort`), is real tissue, scikit-image's ``data.immunohistochemistry()`` (colonic glands
with DAB and haematoxylin) turned, flipped and re-stained per slide: the counterstain alone, with DAB-positive
(brown) lesions, as in a cytokeratin-stained sentinel node, so the readers, the foreground filter and the encoders
see real tissue's colour statistics; ``synthetic`` (pink with purple nuclei, dense dark lesions) is tissue exactly
where the outline is, which tests of the foreground filter compare against. Everything is a pure function of the
level-0 position (:class:`SlideLayout` + :func:`render`), so any tile of any pyramid level can be drawn on its own:
:func:`write_slide` writes a JPEG-tiled pyramidal TIFF tile by tile (``tifffile.TiffWriter`` with a tile iterator)
and never holds more than one tile, which keeps writing a 64k x 64k slide memory-flat. Deterministic in ``seed``.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TILE = 256
BACKGROUND = 244  # near-white glass
MPP = 0.5  # microns per pixel at level 0 (a 20x scan)
MIN_LEVEL_SIDE = 256  # the pyramid halves until the longer side is below twice this

# texture "ihc": real tissue, scikit-image's ``data.immunohistochemistry()`` (a 512 x 512 photograph of colonic
# glands stained with DAB and haematoxylin, shipped in the scikit-image wheel), turned, flipped and re-stained per
# slide. As in a sentinel lymph node stained for cytokeratin (CAMELYON16's IHC), the tissue shows the counterstain
# alone and the lesions are DAB-positive (brown)
STAIN_JITTER = 0.08  # per-slide stain amounts scaled by 1 +- this (HED colour augmentation, as in Tellez et al. 2018)
STAIN_SHIFT = 0.005  # and shifted by +- this, in scikit-image's stain units (the tile's haematoxylin is about 0.02)
TISSUE_STAIN = np.array([1.0, 1.0, 0.0])  # haematoxylin, eosin, DAB amounts times these: no DAB
LESION_STAIN = np.array([1.0, 1.0, 1.0])  # lesions: the photograph's stains, plus
LESION_SHIFT = np.array([0.0, 0.0, 0.03])  # this much DAB, so a disc over the photograph's stroma is brown too
# texture "synthetic": flat colours with grain and round nuclei (tissue = the outline, exactly: the foreground oracle)
_TISSUE = np.array([228.0, 160.0, 196.0])  # eosin pink
_NUCLEUS = np.array([118.0, 62.0, 150.0])  # haematoxylin purple
_LESION = np.array([178.0, 104.0, 182.0])
_LESION_NUCLEUS = np.array([52.0, 18.0, 92.0])


@dataclass(frozen=True)
class SlideLayout:
    """Where the tissue and lesions of one slide are, in level-0 pixels."""

    width: int
    height: int
    blobs: np.ndarray  # (k, 6) float: centre x, centre y, radius x, radius y, angle, border phase
    lesions: np.ndarray  # (m, 3) float: centre x, centre y, radius
    seed: int
    texture: str = "synthetic"  # a key of TEXTURES: how the tissue looks


def make_layout(
    size: int,
    seed: int,
    tumour: bool,
    tissue_fraction: float = 0.35,
    lesion_radius: float | None = None,
    texture: str = "synthetic",
) -> SlideLayout:
    """A square ``size`` slide with blobs covering about ``tissue_fraction`` of it and, if ``tumour``, 1-3 lesions.

    ``lesion_radius`` (level-0 px) defaults to 2.5% of the side, at least 24 px; ``texture`` is a key of
    :data:`TEXTURES` (``synthetic``, or ``ihc``: real tissue)."""
    if texture not in TEXTURES:
        raise ValueError(f"texture must be one of {', '.join(TEXTURES)}, got {texture!r}")
    rng = np.random.default_rng([seed, 17])
    k = int(rng.integers(2, 5))
    share = rng.dirichlet(np.full(k, 3.0)) * tissue_fraction * size * size  # area of each blob
    blobs = []
    for area in share:
        aspect = rng.uniform(0.6, 1.0)
        ry = math.sqrt(area / (math.pi * aspect))
        rx = ry * aspect
        r = max(rx, ry) * 1.15  # the wavy border reaches 15% out
        cx = rng.uniform(min(r, size / 2), max(size - r, size / 2))
        cy = rng.uniform(min(r, size / 2), max(size - r, size / 2))
        blobs.append((cx, cy, rx, ry, rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)))
    lesions = []
    if tumour:
        radius = lesion_radius or max(24.0, 0.025 * size)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, rx, ry, angle, _phase = blobs[int(rng.integers(k))]
            t, rho = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.55)  # well inside the blob
            u, v = rho * rx * math.cos(t), rho * ry * math.sin(t)
            c, s = math.cos(angle), math.sin(angle)
            lesions.append((cx + c * u - s * v, cy + s * u + c * v, radius * rng.uniform(0.8, 1.2)))
    lesion_array = np.array(lesions, dtype=np.float64).reshape(-1, 3)
    return SlideLayout(size, size, np.array(blobs, dtype=np.float64), lesion_array, seed, texture)


BANK = 1024  # side of the periodic textures (level-0 pixels), far larger than any patch
MASK_CELL = 4  # the tissue outline is evaluated once per 4 x 4 pixels of the level being drawn


def _hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic pseudo-random uint64 per integer cell (splitmix-style mixing)."""
    h = ix.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ iy.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    h ^= np.uint64(salt * 0x165667B19E3779F9 & 0xFFFFFFFFFFFFFFFF)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    return h


def _uniform(h: np.ndarray, shift: int) -> np.ndarray:
    return ((h >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.float32) / 65536.0


def _dots(X: np.ndarray, Y: np.ndarray, period: float, radius: float, keep: float, salt: int) -> np.ndarray:
    """Round dots of ``radius`` at a jittered position in a ``keep`` share of the ``period`` grid cells."""
    ix, iy = np.floor(X / period), np.floor(Y / period)
    h = _hash(ix.astype(np.int64), iy.astype(np.int64), salt)
    cx = (ix + 0.2 + 0.6 * _uniform(h, 0)) * period
    cy = (iy + 0.2 + 0.6 * _uniform(h, 16)) * period
    return (_uniform(h, 32) < keep) & ((X - cx) ** 2 + (Y - cy) ** 2 < radius**2)


def synthetic_texture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(BANK, BANK, 3)`` uint8 periodic tissue and lesion textures: pink stroma with grain and purple nuclei;
    paler lesions dense with dark nuclei (the dot periods, 16 and 8, divide ``BANK``: seamless)."""
    Y, X = np.mgrid[0:BANK, 0:BANK].astype(np.float64) + 0.5
    grain = _uniform(_hash(np.floor(X).astype(np.int64), np.floor(Y).astype(np.int64), seed), 8) - 0.5
    tissue = _TISSUE + 14.0 * grain[..., None]  # (B, B, 3)
    nuclei = _dots(X, Y, period=16.0, radius=3.2, keep=0.4, salt=seed + 1)
    tissue[nuclei] = _NUCLEUS + 10.0 * grain[nuclei, None]
    lesion = _LESION + 10.0 * grain[..., None]
    dense = _dots(X, Y, period=8.0, radius=3.4, keep=0.9, salt=seed + 2)
    lesion[dense] = _LESION_NUCLEUS + 8.0 * grain[dense, None]
    return np.clip(tissue, 0, 255).astype(np.uint8), np.clip(lesion, 0, 255).astype(np.uint8)


@functools.cache
def _real_stains() -> np.ndarray:
    """The real tissue's ``(512, 512, 3)`` float32 stain amounts (haematoxylin, eosin, DAB), by scikit-image's
    colour deconvolution (``rgb2hed``) of its ``data.immunohistochemistry()``."""
    from skimage.color import rgb2hed  # scikit-image takes about a second to import; only generating needs it
    from skimage.data import immunohistochemistry

    return rgb2hed(immunohistochemistry()).astype(np.float32)


def ihc_texture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(BANK, BANK, 3)`` uint8 periodic tissue and lesion textures cut from real tissue.

    The real tile's stain amounts are turned and flipped (one of the square's 8 symmetries), jittered (each stain
    scaled by ``1 +- STAIN_JITTER`` and shifted by ``+- STAIN_SHIFT``, as HED colour augmentation does), multiplied
    by ``TISSUE_STAIN`` (the tissue: DAB removed) or ``LESION_STAIN`` plus ``LESION_SHIFT`` (the lesions: DAB
    kept and added), and drawn back to RGB by scikit-image's ``hed2rgb``; then laid 2 x 2 with their mirror images
    (periodic and seamless modulo ``BANK``) and rolled by a random offset. Tissue and lesions differ in stain, not
    in form."""
    from skimage.color import hed2rgb

    rng = np.random.default_rng([seed, 29])
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    scale = rng.uniform(1 - STAIN_JITTER, 1 + STAIN_JITTER, 3)
    shift = rng.uniform(-STAIN_SHIFT, STAIN_SHIFT, 3)
    offset = tuple(int(o) for o in rng.integers(BANK, size=2))
    stains = np.rot90(_real_stains(), turns)  # (512, 512, 3)
    stains = stains[:, ::-1] if flip else stains
    banks = []
    for factor, extra in ((TISSUE_STAIN, np.zeros(3)), (LESION_STAIN, LESION_SHIFT)):
        amounts = np.maximum(stains * (scale * factor) + (shift + extra), 0.0)
        tile = hed2rgb(amounts)  # (512, 512, 3) float in [0, 1]
        row = np.concatenate([tile, tile[:, ::-1]], axis=1)
        bank = np.roll(np.concatenate([row, row[::-1]], axis=0), offset, axis=(0, 1))  # (BANK, BANK, 3)
        banks.append(np.round(bank * 255.0).astype(np.uint8))
    return banks[0], banks[1]


# how a slide's tissue looks: seed -> (tissue, lesion) periodic (BANK, BANK, 3) uint8 textures
TEXTURES = {"synthetic": synthetic_texture, "ihc": ihc_texture}
COHORT_TEXTURE = "ihc"  # what generated cohorts (the slides space) are drawn with


@functools.lru_cache(maxsize=8)
def _texture(texture: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One slide's textures, drawn once: indexing a precomputed bank modulo its size instead of computing every
    pixel makes a 64k slide about ten times quicker to write."""
    return TEXTURES[texture](seed)


def _tissue_mask(layout: SlideLayout, near: list, x0: int, y0: int, width: int, height: int, scale: float):
    """``(height, width)`` bool: inside a blob, evaluated at the centre of each ``MASK_CELL`` cell of the level
    (cells anchored at the level's origin, so neighbouring tiles agree)."""
    cx0, cy0 = x0 // MASK_CELL, y0 // MASK_CELL
    cells_x = np.arange(cx0, (x0 + width - 1) // MASK_CELL + 1)
    cells_y = np.arange(cy0, (y0 + height - 1) // MASK_CELL + 1)
    X = ((cells_x + 0.5) * MASK_CELL * scale)[None, :]
    Y = ((cells_y + 0.5) * MASK_CELL * scale)[:, None]
    coarse = np.zeros((len(cells_y), len(cells_x)), dtype=bool)
    for bx, by, rx, ry, angle, phase in near:
        dx, dy = X - bx, Y - by
        c, s = math.cos(angle), math.sin(angle)
        u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
        theta = np.arctan2(v, u)
        border = 1.0 + 0.08 * np.sin(5 * theta + phase) + 0.05 * np.sin(11 * theta + 2 * phase)
        coarse |= u * u + v * v < border * border
    rows = (y0 + np.arange(height)) // MASK_CELL - cy0
    cols = (x0 + np.arange(width)) // MASK_CELL - cx0
    return coarse[rows[:, None], cols[None, :]]


def render(layout: SlideLayout, x0: int, y0: int, width: int, height: int, scale: float = 1.0) -> np.ndarray:
    """The ``(height, width, 3)`` uint8 region whose top-left pixel is ``(x0, y0)`` on the level that is ``scale``
    times smaller than level 0 (pixel ``(i, j)`` samples level-0 point ``((x0 + j + .5) s, (y0 + i + .5) s)``)."""
    out = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    lo_x, hi_x, lo_y, hi_y = x0 * scale, (x0 + width) * scale, y0 * scale, (y0 + height) * scale
    near = [
        b for b in layout.blobs
        if b[0] + 1.2 * max(b[2], b[3]) > lo_x and b[0] - 1.2 * max(b[2], b[3]) < hi_x
        and b[1] + 1.2 * max(b[2], b[3]) > lo_y and b[1] - 1.2 * max(b[2], b[3]) < hi_y
    ]  # fmt: skip
    if not near:  # most background tiles: nothing to draw
        return out
    tissue = _tissue_mask(layout, near, x0, y0, width, height, scale)
    if not tissue.any():
        return out
    xs = (x0 + np.arange(width) + 0.5) * scale  # (w,) level-0 x of each pixel
    ys = (y0 + np.arange(height) + 0.5) * scale  # (h,)
    bank, lesion_bank = _texture(layout.texture, layout.seed)
    rows, cols = ys.astype(np.int64) % BANK, xs.astype(np.int64) % BANK
    colour = bank.take(rows, axis=0).take(cols, axis=1)  # (h, w, 3)
    for lx, ly, lr in layout.lesions:
        if lx + lr < lo_x or lx - lr > hi_x or ly + lr < lo_y or ly - lr > hi_y:
            continue
        inside = (xs[None, :] - lx) ** 2 + (ys[:, None] - ly) ** 2 < lr * lr  # (h, w)
        if inside.any():
            lesion = lesion_bank.take(rows, axis=0).take(cols, axis=1)  # (h, w, 3)
            np.copyto(colour, lesion, where=inside[..., None])
    if tissue.all():  # tiles inside the tissue: no outline to cut
        return colour
    np.copyto(out, colour, where=tissue[..., None])
    return out


def level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """``(width, height)`` of each pyramid level: level 0, then halving until the longer side is below 512."""
    sizes = [(width, height)]
    while max(sizes[-1]) >= 2 * MIN_LEVEL_SIDE:
        w, h = sizes[-1]
        sizes.append((max(1, w // 2), max(1, h // 2)))
    return sizes


def _tiles(layout: SlideLayout, width: int, height: int, scale: float) -> Iterator[np.ndarray]:
    for y in range(0, height, TILE):
        for x in range(0, width, TILE):
            yield render(layout, x, y, TILE, TILE, scale)


def _aperio_description(width: int, height: int, mpp: float, level: int) -> str:
    """What Aperio scanners write in ImageDescription; OpenSlide's aperio driver keys on the leading "Aperio"."""
    head = f"Aperio Image Library v12.0.15\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) JPEG/RGB Q=90"
    return head + (f"|AppMag = 20|MPP = {mpp:.4f}" if level == 0 else "")


def write_slide(path: str | Path, layout: SlideLayout, quality: int = 90, flavour: str = "tiff") -> Path:
    """Write ``layout`` as a pyramidal, JPEG-tiled (256 px) BigTIFF.

    ``flavour`` ``tiff``: a generic tiled TIFF (OpenSlide: generic-tiff; resolution tags give the mpp);
    ``svs``: the same pixels with Aperio ImageDescriptions (OpenSlide: aperio; MPP in the description).
    Levels halve in size (:func:`level_sizes`); each is drawn tile by tile, so memory stays at one tile."""
    import tifffile

    if flavour not in ("tiff", "svs"):
        raise ValueError(f"flavour must be tiff or svs, got {flavour!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level, (w, h) in enumerate(level_sizes(layout.width, layout.height)):
            scale = layout.width / w
            extra: dict = {"subfiletype": 1 if level else 0}
            if flavour == "svs":
                extra = {"description": _aperio_description(w, h, MPP * scale, level), "subfiletype": 0}
            tif.write(
                _tiles(layout, w, h, scale),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(1e4 / (MPP * scale), 1e4 / (MPP * scale)),
                resolutionunit="CENTIMETER",
                metadata=None,
                **extra,
            )
    tmp.replace(path)
    return path


def generate_cohort(
    folder: str | Path,
    n: int,
    size: int,
    seed: int = 0,
    test_fraction: float = 0.25,
    tumour_fraction: float = 0.5,
    texture: str = COHORT_TEXTURE,
) -> Path:
    """Write ``n`` slides of side ``size`` with real tissue (``texture``, :data:`TEXTURES`) into ``folder`` and
    return ``folder/manifest.csv``.

    The manifest has columns ``path,label,split`` (labels ``normal``/``tumor``, paths relative to the folder);
    ``tumour_fraction`` of the slides carry lesions and ``test_fraction`` of each class is the test split."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 23])
    labels = rng.permutation(np.arange(n) < round(tumour_fraction * n))
    rows = []
    for label in (False, True):  # stratified test split
        members = np.flatnonzero(labels == label)
        n_test = round(test_fraction * len(members))
        for rank, i in enumerate(rng.permutation(members)):
            rows.append((int(i), "tumor" if label else "normal", "test" if rank < n_test else "train"))
    rows.sort()
    for i, label, _split in tqdm(rows, desc="generating slides", delay=2.0, leave=False):
        name = f"slide_{i:04d}.tif"
        if not (folder / name).exists():
            layout = make_layout(size, seed * 100_003 + i, tumour=label == "tumor", texture=texture)
            write_slide(folder / name, layout)
    manifest = folder / "manifest.csv"
    tmp = folder / "manifest.csv.part"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows((f"slide_{i:04d}.tif", label, split) for i, label, split in rows)
    tmp.replace(manifest)
    return manifest
