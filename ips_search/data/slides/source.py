"""One slide as a lazy *patch source*: its N patch coordinates, and the pixels of only the patches asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ips_search.data.slides.readers import SlideReader, open_slide


class SlidePatchSource:
    """The N patches of one slide, read on demand.

    ``coords`` ``(N, 2)`` int64 are the ``(x, y)`` top-left corners of the patches at level 0; each patch is
    ``read_size`` pixels square at ``level`` (``patch_size`` unless a target mpp asks for resampling) and comes
    back as ``patch_size`` square. ``read(index)`` reads just those regions, so host memory depends on how many
    patches are read at once, not on the slide's size. The file is opened on first read in each process (a
    source pickles without its open handle, for DataLoader workers and Ray).
    """

    def __init__(
        self,
        path: str | Path,
        coords: np.ndarray,
        patch_size: int,
        level: int = 0,
        read_size: int | None = None,
        n_chan: int = 3,
        kind: str | None = None,
        cache_dir: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.patch_size = patch_size
        self.level = level
        self.read_size = read_size or patch_size
        self.n_chan = n_chan
        self.kind = kind
        self.cache_dir = cache_dir
        self.max_pixels = max_pixels  # a plain image decoded again (cache cleared) meets the limit it was built with
        self.patch_shape = (n_chan, patch_size, patch_size)
        self._reader: SlideReader | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __repr__(self) -> str:
        return f"SlidePatchSource({self.path.name!r}, N={len(self)}, level={self.level}, P={self.patch_size})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # open file handles do not cross processes
        return state

    @property
    def reader(self) -> SlideReader:
        if self._reader is None:
            self._reader = open_slide(self.path, self.kind, self.cache_dir, self.max_pixels)
        return self._reader

    @property
    def patch_size_level0(self) -> float:
        """The side of one patch in level-0 pixels (for drawing patches on a thumbnail)."""
        return self.read_size * self.reader.downsamples[self.level]

    def _regions(self, index: np.ndarray):
        """``(j, region)`` for each patch in ``index``: ``(read_size, read_size, C_file)`` uint8 at ``level``."""
        reader = self.reader
        downsample = reader.downsamples[self.level]
        size = self.read_size
        for j, (x, y) in enumerate(self.coords[np.asarray(index, dtype=np.int64).reshape(-1)]):
            yield j, reader.read_region(self.level, round(x / downsample), round(y / downsample), size, size)

    def read_uint8(self, index: np.ndarray) -> np.ndarray:
        """``(k, read_size, read_size, C_file)`` uint8 regions of the patches ``index`` ``(k,)``."""
        k = len(np.asarray(index).reshape(-1))
        out = np.empty((k, self.read_size, self.read_size, self.reader.n_chan), dtype=np.uint8)
        for j, region in self._regions(index):
            out[j] = region
        return out

    def read(self, index: np.ndarray) -> torch.Tensor:
        """float32 ``(k, C, P, P)`` in [0, 1] for int64 patch indices ``(k,)``."""
        k = len(np.asarray(index).reshape(-1))
        if self.reader.n_chan == self.n_chan and self.read_size == self.patch_size:
            # the common case: each region goes straight into the float batch, channels first, in one numpy pass
            # (4-8x quicker than staging uint8 and converting with torch on a busy 2-core machine)
            out = np.empty((k, *self.patch_shape), dtype=np.float32)
            for j, region in self._regions(index):
                np.divide(region.transpose(2, 0, 1), np.float32(255), out=out[j])
            return torch.from_numpy(out)
        patches = torch.from_numpy(self.read_uint8(index)).permute(0, 3, 1, 2).float().div_(255)  # (k, C_file, R, R)
        if patches.shape[1] != self.n_chan:
            patches = patches.mean(1, keepdim=True) if self.n_chan == 1 else patches[:, :1].expand(-1, 3, -1, -1)
        if self.read_size != self.patch_size and len(patches):
            shrink = self.read_size > self.patch_size
            size = (self.patch_size, self.patch_size)
            patches = F.interpolate(patches, size=size, mode="bilinear", align_corners=False, antialias=shrink)
            patches = patches.clamp_(0, 1)
        return patches.contiguous()  # (k, C, P, P)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
