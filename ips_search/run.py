"""``python -m ips_search.run`` (``ips-search``): the search. The command lives in :mod:`ips_search.search.cli`."""

import sys
import warnings

from ips_search.cli import interrupt_exits

with interrupt_exits():  # torch and Ray load here: seconds in which Ctrl-C must still be one line
    from ips_search.search.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    sys.exit(main())
