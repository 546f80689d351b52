"""``python -m ips_search.run``: search M, I, patch size and learning rate with Ray Tune + Optuna.

Every input problem is reported as one line with exit code 2 before Ray starts.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ips_search.cli import DefaultsHelpFormatter, OneLineParser, exit_code_of
from ips_search.errors import ConfigError
from ips_search.experiment import EXPERIMENT_FILE, SearchSettings, check_settings, read_experiment, settings_from_saved
from ips_search.experiment.files import check_trusted, experiment_lock, find_experiment
from ips_search.experiment.settings import (
    NON_NEGATIVE,
    Flag,
    check_applies,
    check_name,
    check_resume,
    flags_of,
    new_settings,
    setting,
    trial_fixed,
    trials_at_once,
)
from ips_search.search.plan import dry_run_lines, plan_lines
from ips_search.space import SearchSpace, load_space, saved_space

RESUME_FIX = "start a new experiment with --name, or restore the file"


@dataclass
class RunOptions:
    """The flags of one run that are not saved settings: which experiment, how Ray starts, what is printed."""

    space: str = setting("default", "search space: a name in search_spaces/ or a YAML path")
    name: str | None = setting(None, "experiment name (default: <space>-<timestamp>)")
    results_dir: str = setting("results", "folder that holds experiments")
    address: str | None = setting(
        None, "an existing Ray cluster, e.g. 'auto' or 'HOST:6379' (default: start a local one)"
    )
    num_gpus: float | None = setting(
        None, "GPUs the local Ray instance advertises (default: detected)", rules=NON_NEGATIVE
    )
    no_dashboard: bool = setting(False, "don't start the Ray dashboard")
    dashboard_host: str = setting(
        "127.0.0.1", "interface the dashboard binds; anything but localhost exposes it (a warning is printed)"
    )
    resume: str | None = setting(
        None,
        "continue experiment NAME in --results-dir, or the experiment folder at path NAME (a copied or moved one: the "
        "search writes only there); finished trials are kept",
        metavar="NAME",
    )
    verbose: bool = setting(
        False, "show Ray's own output (progress tables, logs) here instead of only in the experiment's search.log"
    )
    dry_run: bool = setting(
        False,
        "validate the space, the flags and the data (headers, one sample), print the plan and what the first run will "
        "build (time, disk); builds and trains nothing",
    )


class SettingsHelpFormatter(DefaultsHelpFormatter):
    """Shows each flag's default, also a saved setting's (whose argparse default is SUPPRESS, so that the one parse
    tells which settings the command line names), except where the help already says it ("(default ...")."""

    def _expand_help(self, action: argparse.Action) -> str:
        if hasattr(action, "shown_default"):
            action = copy.copy(action)
            action.default = action.shown_default
        return super()._expand_help(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(schema: type = SearchSettings) -> argparse.ArgumentParser:
    """The command line: ``schema``'s settings (saved; left out, absent from the parsed namespace), then the run
    options."""
    p = OneLineParser(
        prog="python -m ips_search.run",
        description="Find the IPS memory size M, iteration size I, patch size P and learning rate that give the best "
        "validation accuracy for a dataset and a memory budget. Results land in RESULTS_DIR/NAME/.",
        formatter_class=SettingsHelpFormatter,
    )
    for flag in flags_of(schema):
        add_flag(p, flag, default=argparse.SUPPRESS).shown_default = flag.default
    for flag in flags_of(RunOptions):
        add_flag(p, flag, default=flag.default)
    return p


def add_flag(parser: argparse.ArgumentParser, flag: Flag, default: Any) -> argparse.Action:
    s = flag.setting
    if flag.kind is bool:
        return parser.add_argument(flag.flag, action="store_true", default=default, help=s.help)
    kind = {"choices": list(s.choices)} if s.choices else {"type": flag.kind}
    return parser.add_argument(flag.flag, default=default, metavar=s.metavar, help=s.help, **kind)


def given_settings(args: argparse.Namespace, schema: type = SearchSettings) -> dict[str, Any]:
    """The saved settings the command line names, with their values (a flag given with its default value counts)."""
    return {f.name: getattr(args, f.name) for f in flags_of(schema) if hasattr(args, f.name)}


def check_results_dir(path: str) -> Path:
    """Create the results folder if needed and make sure we can write into it."""
    results = Path(path)
    try:
        results.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create results folder {results} ({exc.strerror}); pass a writable --results-dir"
        ) from None
    if os.access(results, os.W_OK | os.X_OK):
        try:  # a real write: os.access can't see a full or read-only disk
            with tempfile.NamedTemporaryFile(dir=results, prefix=".ips-search-write-probe-") as probe:
                probe.write(b"\0" * 65536)
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            raise ConfigError(
                f"cannot write to results folder {results} ({exc.strerror}); free space or pass another --results-dir"
            ) from None
    else:
        raise ConfigError(
            f"results folder {results} is not writable; fix its permissions or pass another --results-dir"
        )
    return results


def validate_args(args: argparse.Namespace, given: dict[str, Any]) -> None:
    """Every flag's own rule, before anything starts (``given``: the saved settings the command line names)."""
    if not args.resume:  # a resume compares them with what it saved instead
        check_applies(given)
    if args.name is not None:
        check_name(args.name)
    check_settings(given)
    check_settings(vars(args), RunOptions)
    check_dashboard_host(args.dashboard_host)


def check_dashboard_host(host: str) -> None:
    """``--dashboard-host``: ``localhost`` or an IP address (Ray binds the dashboard to it; anything else fails only
    once the data is built and Ray starts)."""
    if host == "localhost":
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"--dashboard-host {host!r} is not an IP address; pass 127.0.0.1 (this machine only, the default), "
            "an address of one of its interfaces, or 0.0.0.0 (all of them)"
        ) from None


def load_experiment(results_dir: Path, name: str) -> tuple[SearchSettings, SearchSpace]:
    """The saved settings and space of experiment ``name`` (a folder in ``results_dir``, or the path of one); a
    one-line error if it isn't ours or is damaged.

    The settings name the folder they were read from, whatever name ``experiment.json`` saved: a copied, renamed or
    moved experiment runs, and writes, where it is now, never in the folder it was started in.
    """
    folder = find_experiment(results_dir, name)
    if folder is None:
        known = sorted(p.name for p in results_dir.iterdir() if (p / EXPERIMENT_FILE).is_file())
        raise ConfigError(f"no experiment {name!r} in {results_dir}; existing: {', '.join(known) or 'none'}")
    saved = read_experiment(folder, "pass the name of a folder this tool created", damaged_hint=RESUME_FIX)
    try:
        settings = settings_from_saved(saved.get("settings"))
        space = saved_space(saved.get("space"))  # what the experiment ran with, even if the file changed since
    except ConfigError as exc:  # any problem in the file: name the file, then the one fix that always works
        raise ConfigError(f"{folder / EXPERIMENT_FILE} is damaged ({exc}); {RESUME_FIX}") from None
    settings.results_dir, settings.name = str(folder.parent), folder.name
    return settings, space


def check_local_cpus(settings: SearchSettings, args: argparse.Namespace) -> None:
    """A trial that needs more CPUs than this machine has would never run: say so before starting a local Ray.

    Only when we start Ray here: a cluster we join (``--address``, or one already running in this process) may be
    bigger, and ``launch.fit_resources`` checks it once it is known.
    """
    import ray

    cpus = os.cpu_count()
    if args.address or ray.is_initialized() or not cpus:
        return
    if trials_at_once(settings, cpus) < 1:
        raise ConfigError(
            f"a trial needs {settings.cpus_per_trial:g} CPU but this machine has {cpus}; "
            f"lower --cpus-per-trial to at most {cpus}"
        )


def main(argv: list[str] | None = None) -> int:
    return exit_code_of(_main, build_parser().parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    if not args.address:
        # Ray reads this when it is first imported, so it is set before anything imports ray (launch does, below)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    given = given_settings(args)
    validate_args(args, given)
    if args.resume:
        # a path to an experiment folder resumes it where it is, without creating or writing --results-dir
        folder = find_experiment(Path(args.results_dir), args.resume)
        results_dir = check_results_dir(str(folder.parent) if folder else args.results_dir)
        settings, space = load_experiment(results_dir, folder.name if folder else args.resume)
        check_resume(given, settings)
    else:
        results_dir = check_results_dir(args.results_dir)
        space = load_space(args.space)
        name = args.name or f"{space.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        if (results_dir / name).exists():
            raise ConfigError(
                f"experiment {name!r} already exists in {results_dir}; pick another --name or "
                f"continue it with --resume {name}"
            )
        base = space.base_config()
        settings = new_settings(
            given,
            name=name,
            results_dir=str(results_dir),
            space=space.name,
            epochs=base.train.epochs,
            metric=base.evaluation.metric,
            folds=base.evaluation.folds,
        )
        space.fixed = trial_fixed(space.fixed, settings)
    check_local_cpus(settings, args)
    if args.dry_run:
        checks = dry_run_lines(space)  # raises on bad data before anything is printed
        if settings.concurrency is None:  # what this machine fits: a real run fits the cluster it gets
            settings.concurrency = max(1, trials_at_once(settings, os.cpu_count() or 1))
        print("\n".join(["dry run: the space, the flags and the data are valid; this search would run:"]))
        print("\n".join(plan_lines(space, settings) + ["the first run builds (nothing was built now):", *checks]))
        return 0
    # Imported here, not at the top: Ray reads RAY_AUTH_MODE when first imported, and the flags decide it (above).
    from ips_search.search import launch

    if not args.resume:
        return launch.run_search(space, settings, args, resume=False)
    check_trusted(settings.experiment_dir)  # Ray unpickles the folder's state files: they must be this user's alone
    with experiment_lock(settings.experiment_dir, settings.name):
        return launch.run_search(space, settings, args, resume=True)
