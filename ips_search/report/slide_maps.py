"""Where IPS looked on a whole slide: the kept patches drawn over a thumbnail of the slide.

A slide is far too large to show at full resolution, so the figure reads one low-resolution view
(:func:`ips_search.data.slides.tissue.thumbnail`, strip by strip, memory-flat) and draws each kept patch as a
rectangle at its level-0 position, coloured by its attention score when scores are given.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ips_search.data.slides.readers import open_slide
from ips_search.data.slides.tissue import thumbnail

TITLE_SIZE = 10  # points
CHAR_WIDTH = 0.62  # a title character's mean width, in units of the font size (DejaVu Sans, mixed text)


def plot_slide_attention(
    source_path: str | os.PathLike[str],
    coords: np.ndarray,
    kept_indices: Sequence[int] | np.ndarray,
    patch_size_level0: float,
    scores: Sequence[float] | np.ndarray | None = None,
    thumbnail_size: int = 1024,
    title: str | None = None,
    show_all: bool = True,
    cache_dir: str | None = None,
) -> Figure:
    """A figure of the slide at ``source_path`` with the patches ``kept_indices`` outlined.

    ``coords`` ``(N, 2)`` are every patch's level-0 ``(x, y)`` top-left corner (a source's ``coords``);
    ``kept_indices`` ``(M,)`` index into them; ``patch_size_level0`` is a patch's side in level-0 pixels
    (``SlidePatchSource.patch_size_level0``). ``scores`` ``(M,)``, if given, colour the kept patches (viridis,
    with a colour bar). ``show_all`` outlines the other N - M candidate patches faintly. The thumbnail's longer
    side is about ``thumbnail_size`` pixels.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    kept = np.asarray(kept_indices, dtype=np.int64).reshape(-1)
    if len(kept) and (kept.min() < 0 or kept.max() >= len(coords)):
        raise ValueError(f"kept_indices must index the {len(coords)} coords, got {kept.min()}..{kept.max()}")
    if scores is not None and len(scores) != len(kept):
        raise ValueError(f"{len(scores)} scores for {len(kept)} kept patches; give one score per kept patch")
    reader = open_slide(source_path, cache_dir=cache_dir)
    try:
        width, height = reader.dimensions[0]
        image, _ = thumbnail(reader, max(1.0, max(width, height) / thumbnail_size))  # (h, w, C)
    finally:
        reader.close()
    fig = Figure(figsize=(7.0, 7.0 * image.shape[0] / image.shape[1] + 0.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    mappable = draw_slide_attention(
        ax, source_path, coords, kept, patch_size_level0, scores, thumbnail_size, show_all, cache_dir, image
    )
    if mappable is not None:
        fig.colorbar(mappable, ax=ax, shrink=0.7, label="attention score")
    name = os.path.basename(os.fspath(source_path))
    text = title or f"{name}\n{len(kept)} of {len(coords)} patches kept"
    fig.suptitle(fit_title(text, 0.9 * fig.get_figwidth()), fontsize=TITLE_SIZE)  # centred on the figure, not the axes
    return fig


def fit_title(text: str, width_inches: float, fontsize: float = TITLE_SIZE) -> str:
    """``text``'s lines wrapped to fit ``width_inches``; a word longer than a line (a slide's file name, often 60
    characters and more) keeps its start and end around an ellipsis."""
    chars = max(12, int(width_inches * 72 / (fontsize * CHAR_WIDTH)))
    head, tail = chars // 2 - 1, chars - chars // 2
    lines = []
    for line in text.splitlines():
        words = [w if len(w) <= chars else f"{w[:head]}…{w[-tail:]}" for w in line.split()]
        lines += textwrap.wrap(" ".join(words), chars, break_long_words=False)
    return "\n".join(lines)


def draw_slide_attention(
    ax,
    source_path: str | os.PathLike[str] | None,
    coords: np.ndarray,
    kept_indices: Sequence[int] | np.ndarray,
    patch_size_level0: float,
    scores: Sequence[float] | np.ndarray | None = None,
    thumbnail_size: int = 1024,
    show_all: bool = True,
    cache_dir: str | None = None,
    image: np.ndarray | None = None,
    norm: Normalize | None = None,
) -> ScalarMappable | None:
    """Draw :func:`plot_slide_attention`'s view into ``ax`` (the report's grid of test slides); returns the colour
    scale of the scores (``norm`` shared across slides when given), or ``None`` without scores. Without a
    ``source_path`` (features whose slide isn't on this machine) the patches are drawn at their places alone."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    kept = np.asarray(kept_indices, dtype=np.int64).reshape(-1)
    if source_path is None:  # features whose slide isn't here: the patches' places alone, in level-0 pixels
        scale, side = 1.0, patch_size_level0
        ax.set_xlim(coords[:, 0].min() - side, coords[:, 0].max() + 2 * side)
        ax.set_ylim(coords[:, 1].max() + 2 * side, coords[:, 1].min() - side)  # y down, as on a slide
        ax.set_aspect("equal")
        for x, y in np.delete(coords, kept, axis=0):
            ax.add_patch(Rectangle((x, y), side, side, fill=True, lw=0, fc="0.85"))
        show_all = False
    else:
        reader = open_slide(source_path, cache_dir=cache_dir)
        try:
            width, height = reader.dimensions[0]
            if image is None:  # (h, w, C); scale: level-0 pixels per thumbnail pixel
                image, scale = thumbnail(reader, max(1.0, max(width, height) / thumbnail_size))
            else:
                scale = max(width / image.shape[1], height / image.shape[0])
        finally:
            reader.close()
        ax.imshow(image if image.shape[-1] == 3 else image[..., 0], cmap=None if image.shape[-1] == 3 else "gray")
    side = patch_size_level0 / scale
    if show_all:
        for x, y in np.delete(coords, kept, axis=0) / scale:
            ax.add_patch(Rectangle((x, y), side, side, fill=False, lw=0.3, ec="0.55", alpha=0.6))
    colours = matplotlib.colormaps["viridis"]
    if norm is None and scores is not None and len(kept):
        norm = Normalize(float(np.min(scores)), float(np.max(scores)))
    for j, (x, y) in enumerate(coords[kept] / scale):
        colour = colours(norm(scores[j])) if norm is not None and scores is not None else "tab:red"
        ax.add_patch(Rectangle((x, y), side, side, fill=False, lw=1.6, ec=colour))
    ax.set_axis_off()
    return ScalarMappable(norm=norm, cmap=colours) if norm is not None else None
