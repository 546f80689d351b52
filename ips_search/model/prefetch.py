"""A small read-ahead: run a function over a sequence of jobs in a background thread, a bounded number ahead.

IPS over a :class:`~ips_search.data.source.PatchSource` reads the next chunk of patches while the encoder runs
on the current one. The encoder's kernels release the GIL, so the read (file I/O, decoding, a copy) overlaps it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

J = TypeVar("J")
T = TypeVar("T")

_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher(Generic[T]):
    """Iterates ``fn(job)`` for each of ``jobs`` in order, computed in a thread up to ``depth`` results ahead.

    ``depth=0`` runs ``fn`` in the caller's thread (no thread; the same results). An exception raised by
    ``fn`` (or by iterating ``jobs``) is raised again, as the same object, by the ``next()`` that would have
    returned its result; the thread has stopped by then. Leaving early: ``close()`` (or the ``with`` block's
    end) stops the thread, after at most the one ``fn`` call in flight, and drops the results read ahead.
    """

    def __init__(self, fn: Callable[[J], T], jobs: Iterable[J], depth: int = 2) -> None:
        if depth < 0:
            raise ValueError(f"depth must be 0 or more, got {depth}")
        self._fn, self._jobs = fn, iter(jobs)
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._finished = False
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._work, name="ips-prefetch", daemon=True)
            self._thread.start()

    def _put(self, item: object) -> bool:
        """Queue ``item``, waiting for room; False once stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for job in self._jobs:
                if self._stop.is_set() or not self._put(self._fn(job)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            self._put(_Failed(exc))
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        if self._thread is None:
            try:
                return self._fn(next(self._jobs))
            except BaseException:
                self._finished = True
                raise
        item = self._queue.get()
        if item is _DONE or isinstance(item, _Failed):
            self.close()
            if isinstance(item, _Failed):
                raise item.exc
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread and drop what it read ahead; safe to call more than once."""
        self._finished = True
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # make room, in case the thread waits to put a result
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
            self._thread = None
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
