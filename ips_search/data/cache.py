"""On-disk and in-process caches for generated data and warm-start weights.

Files live in ``DataConfig.cache_dir``, else ``$IPS_SEARCH_CACHE``, else
``~/.cache/ips-search``. A file's name is a hash of every field that changes its
content (plus a format version), so a changed config never loads a stale file.
Files hold plain tensors/dicts written with ``torch.save`` and are read back with
``torch.load(weights_only=True)`` (no pickled code runs on load). Writes go to a
temporary file that is then ``os.replace``-d into place, so a crash never leaves a
half-written file, and a lock file makes concurrent Ray workers that need the same
file wait for the first one instead of all computing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips_search.errors import ConfigError

try:  # POSIX only; elsewhere concurrent builders just compute the same file twice
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# Ray reuses worker processes: a second build of the same config in one process is free.
_MEMORY: dict[str, Any] = {}


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$IPS_SEARCH_CACHE``, else ``~/.cache/ips-search``."""
    root = cache_dir or os.environ.get("IPS_SEARCH_CACHE") or Path.home() / ".cache" / "ips-search"
    return Path(root).expanduser()


def cache_key(fields: dict[str, Any]) -> str:
    """A short stable hash of ``fields`` (JSON with sorted keys)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary file next to ``path``, then rename it into place (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it into place."""
    _write_atomic(path, lambda f: torch.save(obj, f))


def load(path: Path) -> Any:
    """Load a cache file written by :func:`save_atomic` (``weights_only=True``).

    Memory-mapped: a trial reads only the pages it touches, and trials on one machine share them through the page
    cache instead of each holding a copy (the paper-scale canvases are about 13 GB)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_file(kind: str, fields: dict[str, Any], cache_dir: str | None = None) -> Path:
    """Where :func:`cached` keeps the object for ``fields`` (whether or not it was built yet)."""
    return cache_root(cache_dir) / f"{kind}-{cache_key({'kind': kind, **fields})}.pt"


def cached(kind: str, fields: dict[str, Any], build: Callable[[], Any], cache_dir: str | None = None) -> Any:
    """Return the object for ``fields``: from memory, else from disk, else ``build()`` and save it.

    ``kind`` prefixes the file name (``<kind>-<hash>.pt``); ``build`` must return
    something ``torch.load(weights_only=True)`` can read back (tensors, dicts,
    lists, numbers, strings).
    """
    path = cache_file(kind, fields, cache_dir)
    root = path.parent
    key = str(path.absolute())
    if key in _MEMORY:
        return _MEMORY[key]
    _make_root(root)
    with _file_lock(path):
        obj = None
        if path.exists():
            try:
                obj = load(path)
            except Exception as exc:  # noqa: BLE001 - an unreadable file is rebuilt, not fatal
                warnings.warn(
                    f"ignoring unreadable cache file {path} ({type(exc).__name__}); rebuilding it", stacklevel=2
                )
        if obj is None:
            obj = build()
            save_atomic(obj, path)
    _MEMORY[key] = obj
    return obj


def clear_memory_cache() -> None:
    """Forget everything cached in this process (the files on disk stay)."""
    _MEMORY.clear()


# ---------------------------------------------------------------- numpy arrays (memory-mapped on load)


def file_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on ``path`` (through ``<path>.lock``): concurrent builders of one file wait for the first."""
    return _file_lock(path)


def save_npy_atomic(array: np.ndarray, path: Path) -> None:
    """``np.save`` to a temporary file next to ``path``, then rename it into place."""
    _write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def _make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create cache directory {root} ({exc.strerror}); set cache_dir to a writable folder"
        ) from None


def _load_npy(path: Path, mmap: bool) -> np.ndarray | None:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring unreadable cache file {path} ({type(exc).__name__}); rebuilding it", stacklevel=3)
        return None


def npy_path(kind: str, fields: dict[str, Any], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`cached_npy` / :func:`cached_memmap` keep the array for ``kind`` and ``fields``."""
    return cache_root(cache_dir) / kind / f"{kind}-{cache_key({'kind': kind, **fields})}.npy"


def cached_npy(
    kind: str, fields: dict[str, Any], build: Callable[[], np.ndarray], cache_dir: str | None = None
) -> np.ndarray:
    """A small array: from disk (``<cache>/<kind>/<kind>-<hash>.npy``), else ``build()`` and save it.

    Read fully into memory (no memmap): meant for per-image metadata such as patch coordinates."""
    path = npy_path(kind, fields, cache_dir)
    _make_root(path.parent)
    if path.exists():  # the common case: no lock needed to read a file that is only ever renamed into place
        array = _load_npy(path, mmap=False)
        if array is not None:
            return array
    with _file_lock(path):
        array = _load_npy(path, mmap=False) if path.exists() else None
        if array is None:
            array = np.ascontiguousarray(build())
            save_npy_atomic(array, path)
    return array


def cached_memmap(
    kind: str,
    fields: dict[str, Any],
    shape: tuple[int, ...],
    dtype: Any,
    fill: Callable[[np.ndarray], None],
    cache_dir: str | None = None,
) -> np.ndarray:
    """A large array shared by every process on the machine, read-only and memory-mapped.

    The first caller creates ``<cache>/<kind>/<kind>-<hash>.npy`` as a writable memmap of ``shape``/``dtype``,
    lets ``fill`` write into it (so the array never has to fit in memory twice), and renames it into place;
    everyone else (other trials, later runs) maps the finished file: pages are shared through the page cache.
    """
    path = npy_path(kind, fields, cache_dir)
    _make_root(path.parent)
    with _file_lock(path):
        array = _load_npy(path, mmap=True) if path.exists() else None
        if array is not None and (array.shape != tuple(shape) or array.dtype != np.dtype(dtype)):
            array = None
        if array is None:
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
                fill(out)
                out.flush()
                del out
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    return array
