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
