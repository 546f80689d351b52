"""``python -m ips_search.report results/<name>`` (or ``--latest``): write ``results/<name>/report/``.

Reads only the files on disk, so it works while a search runs, after it finished
and after it crashed. Bad input (a missing path, a folder that is not an ips-search
experiment, an experiment without trials) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from ips_search.cli import OneLineParser, exit_code_of
from ips_search.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m ips_search.report",
        description="Tables, plots, attention maps and an executed notebook for an ips-search experiment.",
    )
    p.add_argument("path", nargs="?", help="the experiment folder, e.g. results/<name>")
    p.add_argument("--latest", action="store_true", help="report on the newest experiment in --results-dir")
    p.add_argument("--results-dir", default="results", help="where --latest looks (default: results)")
    p.add_argument("--no-notebook", action="store_true", help="skip report.ipynb / report.html (faster)")
    p.add_argument("--no-html", action="store_true", help="write report.ipynb but not report.html")
    p.add_argument("--top", type=int, default=10, help="rows of the top-trials table (default: 10)")
    p.add_argument("--images", type=int, default=4, help="test images in the attention maps (default: 4)")
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=None,
        metavar="MB",
        help="memory budgets (MB) of the best-trial-per-budget table (default: quartiles of peak memory)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return exit_code_of(_main, build_parser().parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    from ips_search.report import latest_experiment, write_report

    if args.path and args.latest:
        raise ConfigError("pass either an experiment path or --latest, not both")
    if not args.path and not args.latest:
        raise ConfigError("pass an experiment folder (e.g. results/<name>) or --latest")
    if args.top < 1 or args.images < 0:
        raise ConfigError("--top must be at least 1 and --images at least 0")
    path = latest_experiment(args.results_dir) if args.latest else args.path
    start = time.perf_counter()
    result = write_report(
        path,
        notebook=not args.no_notebook,
        html=not args.no_html,
        top=args.top,
        n_images=args.images,
        budgets=args.budgets,
        log=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True),
    )
    exp = result["experiment"]
    print(
        f"report of {exp.path} ({len(exp.trials)} trials) written to {result['dir']} "
        f"in {time.perf_counter() - start:.0f}s:"
    )
    for name in sorted(result["files"]):
        print(f"  {result['files'][name]}")
    for note in result["notes"]:
        print(f"note: {note}")
    if result["error"]:
        print(f"warning: {result['error']}; the notebook was saved with the outputs up to that cell", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    sys.exit(main())
