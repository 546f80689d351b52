"""Scribble noise: short random-walk pen strokes, about digit-sized, that are not digits.

A stroke is a random walk whose heading drifts smoothly (so it curves like a pen
line), rendered as a soft 2-3 px wide line inside a ``size x size`` box. Strokes are
drawn once into a bank and pasted with a random flip/transpose, which is far
cheaper than rasterising every stroke of every canvas.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

STROKE_WIDTH = 1.0  # scales the pen width (1.6-3.2 px; MNIST strokes are ~2-3 px wide)


def stroke_bank(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` stroke images, float32 ``(n, size, size)`` in [0, 1]."""
    steps = 24
    # Total length ~ 0.8-1.8 digit sizes, split into equal steps; heading random-walks.
    length = rng.uniform(0.8, 1.8, size=(n, 1)) * size
    step = length / steps
    # Curvature changes linearly along the stroke (arcs, hooks and S-curves) with a little
    # jitter; total turning stays under ~pi so strokes rarely close into 0/6/9-like loops.
    t = np.linspace(-1.0, 1.0, steps)
    curv = rng.uniform(-0.12, 0.12, (n, 1)) + rng.uniform(-0.15, 0.15, (n, 1)) * t + rng.normal(0, 0.04, (n, steps))
    heading = rng.uniform(0, 2 * np.pi, size=(n, 1)) + np.cumsum(curv, axis=1)
    xy = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], -1) * step[..., None], axis=1)  # (n, steps, 2)
    xy = np.concatenate([np.zeros((n, 1, 2)), xy], axis=1)
    # Centre each stroke in its box and shrink it if it would leave the box.
    lo, hi = xy.min(1, keepdims=True), xy.max(1, keepdims=True)
    extent = (hi - lo).max(-1, keepdims=True)
    scale = np.minimum(1.0, (size - 5 * STROKE_WIDTH) / np.maximum(extent, 1e-6))
    xy = (xy - (lo + hi) / 2) * scale + (size - 1) / 2
    intensity = rng.uniform(0.7, 1.0, size=n)
    width = rng.uniform(1.6, 3.2, size=n) * STROKE_WIDTH  # pen width, px

    # PIL draws each polyline at 4x resolution; shrinking it back antialiases the edges and a
    # light blur gives the soft profile of a scanned pen stroke (cheap: ~50 us per stroke).
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        img = Image.new("L", (4 * size, 4 * size))
        pts = [(4 * x + 2, 4 * y + 2) for x, y in xy[i]]
        ImageDraw.Draw(img).line(pts, fill=round(255 * intensity[i]), width=round(4 * width[i]), joint="curve")
        img = img.resize((size, size), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(0.5))
        out[i] = np.asarray(img, dtype=np.float32) / 255
    return out


def with_dihedral(bank: np.ndarray) -> np.ndarray:
    """``(n, s, s) -> (8n, s, s)``: each stroke in all 8 flips/rotations, so a bank stroke looks new each time."""
    views = [np.rot90(b, k, axes=(1, 2)) for b in (bank, bank.transpose(0, 2, 1)) for k in range(4)]
    return np.ascontiguousarray(np.concatenate(views))
