"""What the first real run will build for a dataset, found without building it (``--dry-run``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataPreview:
    """A dataset's cost before it is built: whether its cache exists, the disk it will take, a rough build time."""

    what: str  # e.g. "megapixel canvases (1500 train + 500 test, 256 px)"
    cached: bool
    disk_bytes: int = 0  # what the first run writes to the cache (0 when cached)
    build_seconds: float | None = None  # extrapolated from a small sample; None when unknown
    detail: str = ""  # checks done, e.g. "40 files, headers read"

    def line(self) -> str:
        if self.cached:
            state = "cached"
        else:
            cost = [f"{human_bytes(self.disk_bytes)} of disk"] if self.disk_bytes else []
            if self.build_seconds is not None:
                cost.append(f"about {human_duration(self.build_seconds)}")
            state = "built on the first run" + (f" ({', '.join(cost)})" if cost else "")
        return f"{self.what}: {state}" + (f"; {self.detail}" if self.detail else "")


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def human_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def preview_folder(cfg) -> DataPreview:
    """``dataset: folder``: the class folders scanned and every file's header read (nothing decoded)."""
    from pathlib import Path

    from PIL import Image

    from ips_search.data import folder
    from ips_search.errors import ConfigError

    if not cfg.root:
        raise ConfigError("dataset: folder needs root; set root to a folder with one sub-folder per class")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data root {root} does not exist or is not a folder; set root to a folder of class folders")
    splits = [root / "train", root / "test"] if (root / "train").is_dir() else [root]
    paths = [p for split in splits for p in folder.scan(split)[1]]
    for path in paths:
        try:
            with Image.open(path) as im:  # reads the header only
                im.size  # noqa: B018
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = " ".join(str(exc).split())[:100] or type(exc).__name__
            raise ConfigError(f"cannot read image {path} ({reason}); replace or remove the file") from None
    what = f"folder {root} ({len(paths)} images at {cfg.image_size} px)"
    size = len(paths) * cfg.n_chan * cfg.image_size**2
    return DataPreview(what, cached=False, detail=f"headers read; decoded on the first run ({human_bytes(size)})")


def preview_mnist(cfg) -> DataPreview:
    """``dataset: mnist-resized``: MNIST on disk, or ``download: true``."""
    from ips_search.data.cache import cache_root
    from ips_search.data.mnist import HINT
    from ips_search.errors import ConfigError

    what = f"MNIST digits resized to {cfg.image_size} px"
    if (cache_root(cfg.cache_dir) / "mnist" / "MNIST" / "raw").is_dir():
        return DataPreview(what, cached=True)
    if not cfg.download:
        raise ConfigError(
            f"MNIST is not on disk under {cache_root(cfg.cache_dir) / 'mnist'}; set download: true to fetch it "
            f"(needs internet) or {HINT}"
        )
    return DataPreview(what, cached=False, disk_bytes=55_000_000, detail="download: true fetches MNIST once")
