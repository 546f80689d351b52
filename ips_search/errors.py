"""User-facing errors: one line that names the problem and the fix.

Everything a user can get wrong (a config value, a path, a search space) raises
:class:`ConfigError`; the command-line entry points print its message and exit 2
instead of showing a traceback (:mod:`ips_search.cli`).
"""


class ConfigError(ValueError):
    """A bad input. The message is one line: what is wrong and how to fix it."""


EXIT_BAD_INPUT = 2
