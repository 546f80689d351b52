"""``python -m ips_search.run``: search M, I, patch size and learning rate with Ray Tune + Optuna.

Every input problem is reported as one line with exit code 2 before Ray starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import ipaddress
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from ips_search.cli import DefaultsHelpFormatter, OneLineParser, exit_code_of
from ips_search.errors import ConfigError
from ips_search.experiment import (
    ASHA_FLAGS,
    EXPERIMENT_FILE,
    RUNG_METRICS,
    SearchSettings,
    check_positive,
    check_settings,
    read_experiment,
    settings_from_saved,
)
from ips_search.experiment.files import check_trusted, experiment_lock, find_experiment
from ips_search.experiment.settings import check_name
from ips_search.search.plan import dry_run_lines, plan_lines
from ips_search.space import SearchSpace, load_space, saved_space

RESUME_FIX = "start a new experiment with --name, or restore the file"
# the settings a resumed experiment keeps as it saved them (--trials alone may change: it extends the search)
RESUME_KEEPS = (
    "objective",
    "sampler",
    "scheduler",
    *ASHA_FLAGS,
    "max_memory_mb",
    "cpus_per_trial",
    "gpus_per_trial",
    "concurrency",
    "seed",
    "epochs",
    "confirm",
    "confirm_top",
)
DEFAULT_TRIALS = 50


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m ips_search.run",
        description="Find the IPS memory size M, iteration size I, patch size P and learning rate that give the best "
        "validation accuracy for a dataset and a memory budget. Results land in RESULTS_DIR/NAME/.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help=f"number of trials (configs) to run (default {DEFAULT_TRIALS}); with --resume, a higher number extends "
        "the finished search with more trials of the same Optuna study",
    )
    p.add_argument("--space", default="default", help="search space: a name in search_spaces/ or a YAML path")
    p.add_argument("--name", default=None, help="experiment name (default: <space>-<timestamp>)")
    p.add_argument("--results-dir", default="results", help="folder that holds experiments")
    p.add_argument(
        "--objective",
        choices=["accuracy", "accuracy-memory"],
        default="accuracy",
        help="maximise validation accuracy, or find the Pareto front of accuracy vs peak memory",
    )
    p.add_argument(
        "--max-memory-mb",
        type=float,
        default=None,
        help="memory budget: a trial whose first training step exceeds it is marked infeasible and stops",
    )
    p.add_argument("--sampler", choices=["tpe", "gp", "nsga2", "random"], default="tpe", help="Optuna sampler")
    p.add_argument(
        "--scheduler",
        choices=["asha", "fifo"],
        default=None,
        help="trial scheduler: fifo runs every trial to its last epoch (the default); asha stops trials early "
        "(faster, but its early rungs stop configs that would have won: docs/benchmarks.md)",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: epochs every trial runs before it can be stopped (default 1, Ray's ASHAScheduler default)",
    )
    p.add_argument(
        "--reduction-factor",
        type=int,
        default=None,
        help="ASHA: each rung keeps the best 1/reduction-factor of trials; rungs at grace-period * "
        "reduction-factor^k epochs (default 4, Ray's ASHAScheduler default)",
    )
    p.add_argument(
        "--rung-metric",
        choices=list(RUNG_METRICS),
        default=None,
        help="ASHA: what trials are compared on at a rung: this epoch's validation accuracy, the trial's best so far, "
        "or validation loss (default: this epoch's validation accuracy)",
    )
    p.add_argument(
        "--brackets",
        type=int,
        default=None,
        help="ASHA: brackets of different grace periods (default 1; above 1: asynchronous Hyperband)",
    )
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (also torch's thread count)")
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPUs per trial, fractional allowed (0.25 packs four trials per GPU); 0 keeps every trial on the CPU. "
        "Default: auto, 1 per trial when the cluster has GPUs, else 0 (the resolved value is saved and kept by "
        "--resume). A value above 0 falls back to CPU with a warning when the cluster has no GPU",
    )
    p.add_argument(
        "--concurrency", type=int, default=None, help="trials at once (default: as many as the cluster's CPUs/GPUs fit)"
    )
    p.add_argument(
        "--address",
        default=None,
        help="an existing Ray cluster, e.g. 'auto' or 'HOST:6379' (default: start a local one)",
    )
    p.add_argument(
        "--num-gpus", type=float, default=None, help="GPUs the local Ray instance advertises (default: detected)"
    )
    p.add_argument("--no-dashboard", action="store_true", help="don't start the Ray dashboard")
    p.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="interface the dashboard binds; anything but localhost exposes it (a warning is printed)",
    )
    p.add_argument(
        "--resume",
        metavar="NAME",
        default=None,
        help="continue experiment NAME in --results-dir, or the experiment folder at path NAME (a copied or moved "
        "one: the search writes only there); finished trials are kept",
    )
    p.add_argument(
        "--confirm",
        type=int,
        default=0,
        metavar="K",
        help="after the search, train the best --confirm-top configs again with K more seeds and pick the winner by "
        "mean validation accuracy (0: off)",
    )
    p.add_argument("--confirm-top", type=int, default=3, help="how many of the best configs --confirm retrains")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every trial")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (overrides the space's train.epochs)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output (progress tables, logs) here instead of only in the experiment's search.log",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the space, the flags and the data (headers, one sample), print the plan and what the first "
        "run will build (time, disk); builds and trains nothing",
    )
    return p


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


def resolve_asha_flags(args: argparse.Namespace) -> None:
    """ASHA's own flags take ASHA's defaults when left out; given to a search without ASHA they would be silently
    ignored, so they are a bad input."""
    given = [flag for key, flag in ASHA_FLAGS.items() if getattr(args, key) is not None]
    scheduler = args.scheduler or SearchSettings.scheduler
    if given and not args.resume and scheduler != "asha":
        raise ConfigError(
            f"{given[0]} only applies to --scheduler asha, and this search uses {scheduler}; add --scheduler asha "
            f"or leave {given[0]} out"
        )
    defaults = {field.name: field.default for field in dataclasses.fields(SearchSettings)}
    for key in ASHA_FLAGS:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])


def given_settings(argv: list[str] | None) -> dict[str, Any]:
    """The kept settings (``RESUME_KEEPS``) the command line names, with their values: parsed again with None as
    their default (a value no flag gives), so a flag given with its default value counts too."""
    parser = build_parser()
    parser.set_defaults(**dict.fromkeys(RESUME_KEEPS))
    parsed = vars(parser.parse_args(argv))
    return {key: parsed[key] for key in RESUME_KEEPS if parsed[key] is not None}


def check_resume_flags(given: dict[str, Any], settings: SearchSettings) -> None:
    """A resumed search keeps the settings it started with; a flag asking for another one would be silently ignored,
    so it is a bad input (the same value is harmless)."""

    def shown(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else "none" if value is None else str(value)

    for key, value in given.items():
        if value != getattr(settings, key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{flag} {shown(value)} differs from experiment {settings.name!r}, which runs with "
                f"{shown(getattr(settings, key))}; a resumed search keeps the settings it started with: leave {flag} "
                "out, or start a new experiment with --name"
            )


def validate_args(args: argparse.Namespace) -> None:
    """Every flag's own rule, before anything starts."""
    resolve_asha_flags(args)
    if args.name is not None:
        check_name(args.name)
    check_settings(args)
    check_positive(args.num_gpus, "--num-gpus", allow_zero=True)
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
    if settings.cpus_per_trial > cpus:
        raise ConfigError(
            f"a trial needs {settings.cpus_per_trial:g} CPU but this machine has {cpus}; "
            f"lower --cpus-per-trial to at most {cpus}"
        )


def extend(settings: SearchSettings, trials: int) -> None:
    """``--resume NAME --trials N``: raise the experiment's trial count to N (saved, so the restored search runs the
    extra trials); fewer than it already has is a bad input."""
    if trials < settings.trials:
        raise ConfigError(
            f"--trials {trials} is below the {settings.trials} trials experiment {settings.name!r} already has; "
            f"pass --trials {settings.trials} or more to extend it, or leave --trials out to continue it"
        )
    settings.trials = trials


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code_of(partial(_main, given=given_settings(argv)), args)


def _main(args: argparse.Namespace, given: dict[str, Any]) -> int:
    if not args.address:
        # Ray reads this when it is first imported, so it is set before anything imports ray
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    validate_args(args)
    if args.resume:
        # a path to an experiment folder resumes it where it is, without creating or writing --results-dir
        folder = find_experiment(Path(args.results_dir), args.resume)
        results_dir = check_results_dir(str(folder.parent) if folder else args.results_dir)
        settings, space = load_experiment(results_dir, folder.name if folder else args.resume)
        check_resume_flags(given, settings)
        if args.trials is not None:
            extend(settings, args.trials)
    else:
        results_dir = check_results_dir(args.results_dir)
        args.trials = args.trials or DEFAULT_TRIALS
        space = load_space(args.space)
        if args.epochs:
            space.fixed.setdefault("train", {})["epochs"] = args.epochs
        base = space.base_config()
        name = args.name or f"{space.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        if (results_dir / name).exists():
            raise ConfigError(
                f"experiment {name!r} already exists in {results_dir}; pick another --name or "
                f"continue it with --resume {name}"
            )
        settings = SearchSettings(
            name=name,
            results_dir=str(results_dir),
            space=space.name,
            trials=args.trials,
            objective=args.objective,
            sampler=args.sampler,
            scheduler=args.scheduler or SearchSettings.scheduler,
            max_memory_mb=args.max_memory_mb,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            seed=args.seed,
            epochs=base.train.epochs,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            rung_metric=args.rung_metric,
            brackets=args.brackets,
            confirm=args.confirm,
            confirm_top=args.confirm_top,
            concurrency=args.concurrency or max(1, min(args.trials, int((os.cpu_count() or 1) // args.cpus_per_trial))),
        )
        space.fixed.setdefault("train", {})["seed"] = args.seed
    check_local_cpus(settings, args)
    if args.dry_run:
        checks = dry_run_lines(space)  # raises on bad data before anything is printed
        print("\n".join(["dry run: the space, the flags and the data are valid; this search would run:"]))
        print("\n".join(plan_lines(space, settings) + ["the first run builds (nothing was built now):", *checks]))
        return 0
    from ips_search.search.launch import run_search

    if not args.resume:
        return run_search(space, settings, args, resume=False)
    check_trusted(settings.experiment_dir)  # Ray unpickles the folder's state files: they must be this user's alone
    with experiment_lock(settings.experiment_dir, settings.name):
        return run_search(space, settings, args, resume=True)
