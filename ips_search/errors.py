"""User-facing errors: one line that names the problem and the fix.

Everything a user can get wrong (a config value, a path, a search space) raises
:class:`ConfigError`; the command-line entry points print its message and exit 2
instead of showing a traceback.
"""

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad input. The message is one line: what is wrong and how to fix it."""


EXIT_BAD_INPUT = 2


def exit_code_of(body: Callable[[T], int], args: T) -> int:
    """Run a command's body; a :class:`ConfigError` becomes ``error: <one line>`` on stderr and exit code 2."""
    try:
        return body(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
