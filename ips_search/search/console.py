"""The terminal during a search: a progress bar of finished trials and one line per trial; Ray's output to a log.

Without ``--verbose`` the process's stdout and stderr (file descriptors 1 and 2, so Ray's C++ and worker-startup
output too) go to ``search.log`` in the experiment folder while Ray runs; only ips-search's own lines reach the
terminal, through a duplicate of its original descriptor. The progress follows ``trials.csv`` (which the driver
rewrites as trials report), so it needs nothing from Ray and works the same for a resumed search.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from tqdm.auto import tqdm

from ips_search.experiment import METRIC, Status, coerce

POLL_SECONDS = 1.0


@contextlib.contextmanager
def terminal_only_ours(log_path: Path, verbose: bool) -> Iterator[TextIO]:
    """Send fds 1 and 2 to ``log_path`` (unless ``verbose``); yields the stream that still reaches the terminal."""
    if verbose:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield terminal
    finally:
        for stream in (sys.stdout, sys.stderr, terminal):
            with contextlib.suppress(ValueError, OSError):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        terminal.close()


def trial_line(row: dict[str, Any]) -> str:
    """``<id>  M=8 I=8 P=32 lr=1.2e-03  completed  val 0.925  mem 91 MB  412 s``."""

    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return format(int(value) if fmt == "d" else value, fmt) if _is_number(value) else "-"

    return (
        f"{row['trial_id']}  M={num('memory_size', 'd')} I={num('iteration_size', 'd')} P={num('patch_size', 'd')} "
        f"lr={num('lr', '.1e')}  {row['status']:<13}  val {num(METRIC, '.3f')}  "
        f"mem {num('peak_memory_mb', '.0f')} MB  {num('time_total_s', '.0f')} s"
    )


class TrialProgress:
    """A progress bar of finished trials with the best validation accuracy so far, and a line per finished trial.

    ``with TrialProgress(csv_path, total, stream):`` polls ``csv_path`` in a thread; trials already finished when it
    starts (a resumed search) count towards the bar without a line.
    """

    def __init__(self, csv_path: Path, total: int, stream: TextIO, desc: str = "trials") -> None:
        self.csv_path, self.total, self.stream, self.desc = csv_path, total, stream, desc
        self.seen: set[str] = set()
        self.best: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ips-search-progress", daemon=True)
        self.bar: Any = None

    def __enter__(self) -> TrialProgress:
        finished = self._finished_rows()
        self._note(finished, show=False)
        self.bar = tqdm(total=self.total, initial=len(self.seen), file=self.stream, desc=self.desc, unit="trial")
        self._show_best()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the final statuses, written when the experiment ended
        self.bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll()

    def _finished_rows(self) -> pd.DataFrame:
        try:
            df = coerce(pd.read_csv(self.csv_path, dtype={"trial_id": str}))
        except (OSError, ValueError, pd.errors.EmptyDataError):  # not written yet, or being replaced
            return pd.DataFrame()
        final = df["status"].map(lambda s: s in Status._value2member_map_ and Status(s).is_final)
        return df[final & ~df["trial_id"].isin(self.seen)]

    def _note(self, rows: pd.DataFrame, show: bool) -> None:
        for row in rows.to_dict("records"):
            self.seen.add(row["trial_id"])
            if row["status"] == Status.COMPLETED and _is_number(row.get(METRIC)):
                self.best = max(self.best or 0.0, float(row[METRIC]))
            if show:
                self.bar.write(trial_line(row), file=self.stream)
                self.bar.update(1)

    def poll(self) -> None:
        """Print the trials that finished since the last poll."""
        rows = self._finished_rows()
        if not rows.empty:
            self._note(rows, show=True)
            self._show_best()

    def _show_best(self) -> None:
        if self.best is not None:
            self.bar.set_postfix_str(f"best val {self.best:.3f}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
