"""Lazy patch sources: an image's N patches, read on demand instead of held as one tensor.

A whole-slide image has up to ~250k patches and every image its own N, so a batch of them can't be a
``(B, N, C, P, P)`` tensor. :meth:`IPSNet.ips <ips_search.model.IPSNet.ips>` takes a list of B
:class:`PatchSource` objects instead and reads each image's patches chunk by chunk. Any object with the
protocol's four members works (duck typing); :class:`TensorPatchSource` and :class:`ArrayPatchSource` are the
two this module provides. Imports nothing above ``ips_search.errors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import default_collate

from ips_search.errors import ConfigError


@runtime_checkable
class PatchSource(Protocol):
    """One image's N patches, readable by index.

    ``patch_shape`` is ``(C, P, P)`` for image patches and ``(D,)`` for pre-extracted features. ``read`` takes
    int64 indices ``(k,)`` (IPS asks in ascending order, mostly contiguous runs) and returns float32
    ``(k, *patch_shape)`` on the CPU; it may be called from a background thread. ``coords`` is ``(N, 2)`` int64,
    each patch's top-left ``(x, y)`` at level 0, or None where unknown.
    """

    patch_shape: tuple[int, ...]
    coords: np.ndarray | None

    def __len__(self) -> int: ...

    def read(self, index: np.ndarray) -> torch.Tensor: ...


def is_patch_source(obj: Any) -> bool:
    """Whether ``obj`` looks like a :class:`PatchSource` (a tensor never does)."""
    return not isinstance(obj, torch.Tensor) and isinstance(obj, PatchSource)


def _check_coords(coords: np.ndarray | None, n: int) -> np.ndarray | None:
    if coords is None:
        return None
    coords = np.asarray(coords, dtype=np.int64)
    if coords.shape != (n, 2):
        raise ConfigError(f"coords must have shape ({n}, 2), one (x, y) per patch, got {coords.shape}")
    return coords


class TensorPatchSource:
    """Patches already in RAM: ``patches`` ``(N, *patch_shape)``, converted to float32 once."""

    def __init__(self, patches: torch.Tensor, coords: np.ndarray | None = None) -> None:
        if patches.dim() < 2:
            raise ConfigError(f"patches must be (N, *patch_shape), got shape {tuple(patches.shape)}")
        self.patches = patches.detach().cpu().float()
        self.patch_shape = tuple(self.patches.shape[1:])
        self.coords = _check_coords(coords, len(self.patches))

    def __len__(self) -> int:
        return len(self.patches)

    def read(self, index: np.ndarray) -> torch.Tensor:
        return self.patches[torch.from_numpy(np.asarray(index, dtype=np.int64))]


class ArrayPatchSource:
    """Patches in a numpy array ``(N, *patch_shape)`` of any real dtype, e.g. ``np.load(path, mmap_mode="r")``:
    a memory-mapped file is read from disk a chunk at a time, so RAM holds only what IPS asked for.

    ``scale`` multiplies what is read (``1 / 255`` for uint8 pixels).
    """

    def __init__(self, array: np.ndarray, coords: np.ndarray | None = None, scale: float = 1.0) -> None:
        if array.ndim < 2:
            raise ConfigError(f"array must be (N, *patch_shape), got shape {array.shape}")
        self.array = array
        self.scale = scale
        self.patch_shape = tuple(array.shape[1:])
        self.coords = _check_coords(coords, len(array))

    def __len__(self) -> int:
        return len(self.array)

    def read(self, index: np.ndarray) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        # a contiguous run is one slice: a single sequential read of the file instead of a gather
        contiguous = len(index) > 0 and index[-1] - index[0] == len(index) - 1 and bool(np.all(np.diff(index) == 1))
        rows = self.array[index[0] : index[-1] + 1] if contiguous else self.array[index]
        out = torch.from_numpy(np.asarray(rows, dtype=np.float32))  # a copy for memmaps and non-float32 arrays
        return out.mul_(self.scale) if self.scale != 1.0 else out


def read_patches(source: PatchSource, index: np.ndarray) -> torch.Tensor:
    """``source.read(index)``, checked: float32 ``(k, *patch_shape)`` or a ValueError naming the source."""
    out = source.read(index)
    expected = (len(index), *source.patch_shape)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != expected:
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{type(source).__name__}.read returned {got}; a PatchSource must return float32 {expected}")
    return out


def collate_sources(items: Sequence[tuple[PatchSource, dict[str, torch.Tensor]]]):
    """DataLoader collate for items ``(source, {task: target})``: ``(list of B sources, {task: stacked targets})``.

    The sources stay lazy (``IPSNet.ips`` reads them); targets are stacked as the default collate does.
    """
    sources = [source for source, _ in items]
    return sources, default_collate([targets for _, targets in items])
