"""Peak memory of a region of code, on CUDA or on the CPU.

``with PeakMemory(device) as mem: ...`` then ``mem.peak_mb`` and ``mem.kind``:

* ``cuda``: peak allocated by PyTorch's caching allocator during the region
  (``reset_peak_memory_stats`` + ``max_memory_allocated``), minus what was
  allocated when it began.
* ``cpu-rss``: growth of the process's peak resident set size. On Linux the peak
  (VmHWM) is reset at entry by writing 5 to ``/proc/self/clear_refs``, so each
  region is measured on its own; where that is impossible (other OSes, or a
  kernel that refuses), ``resource.getrusage`` gives the lifetime peak, which only
  shows growth beyond every earlier peak, and ``kind`` says ``cpu-rss-lifetime``.
"""

from __future__ import annotations

import resource
import sys
from types import TracebackType

import torch

_MB = 1024 * 1024


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so memory a previous region freed
    but malloc kept does not hide this region's growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _lifetime_peak_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Context manager measuring the peak memory (MB) a region adds on ``device``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.kind = ""
        self.peak_mb = 0.0
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self.kind = "cuda"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif _reset_peak_rss() and _read_status_kb("VmHWM") is not None:
            self.kind = "cpu-rss"
            self._start = (_read_status_kb("VmRSS") or 0) * 1024
        else:
            self.kind = "cpu-rss-lifetime"
            self._start = _lifetime_peak_kb() * 1024
        return self

    def read(self) -> float:
        """Peak MB added since entry, so far (usable inside the region)."""
        if self.kind == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "cpu-rss":
            peak = (_read_status_kb("VmHWM") or 0) * 1024
        else:
            peak = _lifetime_peak_kb() * 1024
        return max(0.0, (peak - self._start) / _MB)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
        self.peak_mb = self.read()


def process_peak_mb(device: torch.device | str = "cpu") -> tuple[float, str]:
    """The whole process's peak so far: CUDA max allocated, or peak RSS. Returns (MB, kind)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MB, "cuda"
    hwm = _read_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024, "cpu-rss"
    return _lifetime_peak_kb() / 1024, "cpu-rss-lifetime"
