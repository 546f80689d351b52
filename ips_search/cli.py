"""What the four command-line entry points share: a parser whose errors are one line, and a runner that turns a
bad input into exit 2 and Ctrl-C into exit 130, each with one line on stderr."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

from ips_search.errors import EXIT_BAD_INPUT, ConfigError

T = TypeVar("T")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (not the whole usage block) and exit code 2; ``--help`` unchanged."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message}; see --help\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones (None / False), whose help text already says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def exit_code_of(body: Callable[[T], int], args: T, interrupted: str = "interrupted") -> int:
    """Run a command's body: a :class:`ConfigError` becomes ``error: <one line>`` and exit 2, Ctrl-C becomes
    ``<interrupted>`` and exit 130 (never a traceback)."""
    try:
        return body(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def interrupt_exits(message: str = "interrupted") -> Iterator[None]:
    """While a command imports what it runs on (torch, Ray, pandas: seconds), Ctrl-C ends it at once with one line
    and exit 130. Nothing has been written yet, and a ``KeyboardInterrupt`` raised inside an extension module's
    import can abort the interpreter instead of unwinding. The previous handler is back afterwards, so the command's
    own work gets ``KeyboardInterrupt`` (and :func:`exit_code_of`) as usual."""

    def stop(signum: int, frame: object) -> None:
        os.write(sys.stderr.fileno(), f"\n{message}\n".encode())
        os._exit(EXIT_INTERRUPTED)

    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread (an embedding application): its own handling stays
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
