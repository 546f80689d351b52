"""Cutting images into patches and putting per-patch values back on the image.

Patch order is row-major over the patch grid (left to right, then top to bottom),
exactly the order of the reference notebook's ``unfold``-based ``patchify``; the
IPS patch index ``n`` is ``row * cols + col``.

A patch size/stride must tile the image exactly: the notebook's ``unfold`` silently
drops leftover pixels at the right/bottom edge, which can hide part of an object
from IPS, so here leftover pixels are a :class:`ConfigError` naming a size that tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ips_search.errors import ConfigError


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(candidates: list[int], target: int) -> int:
    return min(candidates, key=lambda c: (abs(c - target), -c))


def patch_grid(h: int, w: int, patch_size: int, stride: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid of an ``h x w`` image; N = rows * cols patches.

    Raises :class:`ConfigError` when a patch is larger than the image, or when the
    patches leave pixels uncovered at the right/bottom edge: ``(h - P) % S`` and
    ``(w - P) % S`` must be 0 (with S == P: P divides h and w).
    """
    stride = stride or patch_size
    if patch_size < 1 or stride < 1:
        raise ConfigError(f"patch_size and patch_stride must be positive, got {patch_size} and {stride}")
    if patch_size > h or patch_size > w:
        raise ConfigError(f"patch_size {patch_size} is larger than the {h}x{w} image; use a patch_size <= {min(h, w)}")
    left_h, left_w = (h - patch_size) % stride, (w - patch_size) % stride
    if left_h or left_w:
        if stride == patch_size:  # suggest a patch size that divides both sides
            fix = _nearest(_divisors(math.gcd(h, w)), patch_size)
            hint = f"use a patch_size that divides {h} and {w}, e.g. {fix}"
        else:  # keep the patch size, suggest a stride that steps exactly to the edge
            fix = _nearest(_divisors(math.gcd(h - patch_size, w - patch_size) or 1), stride)
            hint = f"use a patch_stride that divides {math.gcd(h - patch_size, w - patch_size)}, e.g. {fix}"
        raise ConfigError(
            f"patch_size {patch_size} with stride {stride} does not tile the {h}x{w} image "
            f"({left_h} rows and {left_w} columns left over); {hint}"
        )
    return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def patchify_batch(imgs: torch.Tensor, patch_size: int, stride: int | None = None) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, C, P, P)``, N patches in row-major grid order."""
    stride = stride or patch_size
    B, C, H, W = imgs.shape
    patch_grid(H, W, patch_size, stride)
    patches = imgs.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # (B, C, rows, cols, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5)  # (B, rows, cols, C, P, P)
    return patches.reshape(B, -1, C, patch_size, patch_size)


def patchify(img: torch.Tensor, patch_size: int, stride: int | None = None) -> torch.Tensor:
    """``(C, H, W) -> (N, C, P, P)`` (or ``(B, C, H, W) -> (B, N, C, P, P)``), row-major grid order.

    Same result as the reference notebook's ``patchify`` whenever the patches tile
    the image; see :func:`patch_grid` for the tiling rule.
    """
    if img.dim() == 4:
        return patchify_batch(img, patch_size, stride)
    if img.dim() != 3:
        raise ValueError(f"patchify expects (C, H, W) or (B, C, H, W), got shape {tuple(img.shape)}")
    return patchify_batch(img.unsqueeze(0), patch_size, stride).squeeze(0)


def _fold(cols: torch.Tensor, image_hw: tuple[int, int], patch_size: int, stride: int) -> torch.Tensor:
    """Sum ``(B, K*P*P, N)`` patch columns onto ``(B, K, H, W)`` and divide by the coverage count."""
    H, W = image_hw
    total = F.fold(cols, (H, W), patch_size, stride=stride)
    ones = torch.ones(1, patch_size * patch_size, cols.shape[-1], dtype=cols.dtype, device=cols.device)
    count = F.fold(ones, (H, W), patch_size, stride=stride)  # (1, 1, H, W): patches covering each pixel
    return total / count.clamp(min=1)  # pixels in no patch (stride > P) stay 0


def unpatchify(patches: torch.Tensor, image_hw: tuple[int, int], stride: int | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(N, C, P, P) -> (C, H, W)`` or ``(B, N, C, P, P) -> (B, C, H, W)``.

    Where patches overlap (stride < P) their pixels are averaged; pixels that no
    patch covers (stride > P) are 0.
    """
    batched = patches.dim() == 5
    if not batched:
        patches = patches.unsqueeze(0)
    B, N, C, P, _ = patches.shape
    stride = stride or P
    rows, cols = patch_grid(*image_hw, P, stride)
    if rows * cols != N:
        raise ValueError(f"{N} patches do not match the {rows}x{cols} grid of a {image_hw} image")
    columns = patches.reshape(B, N, C * P * P).transpose(1, 2)  # (B, C*P*P, N)
    out = _fold(columns, image_hw, P, stride)  # (B, C, H, W)
    return out if batched else out.squeeze(0)


def patch_map(
    values: torch.Tensor, image_hw: tuple[int, int], patch_size: int, stride: int | None = None
) -> torch.Tensor:
    """Paint one value per patch onto the image: ``(B, N) -> (B, H, W)`` or ``(N,) -> (H, W)``.

    Used for attention maps: every pixel gets the score of the patch it lies in
    (the mean score where patches overlap, 0 where no patch covers it).
    """
    batched = values.dim() == 2
    if not batched:
        values = values.unsqueeze(0)
    B, N = values.shape
    stride = stride or patch_size
    rows, cols = patch_grid(*image_hw, patch_size, stride)
    if rows * cols != N:
        raise ValueError(f"{N} values do not match the {rows}x{cols} patch grid of a {image_hw} image")
    columns = values.float().unsqueeze(1).expand(B, patch_size * patch_size, N)  # (B, P*P, N)
    out = _fold(columns.contiguous(), image_hw, patch_size, stride).squeeze(1)  # (B, H, W)
    return out if batched else out.squeeze(0)
