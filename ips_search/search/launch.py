"""Start (or join) Ray, run the Tuner, and print the summary of a search."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ips_search.errors import ConfigError
from ips_search.experiment import (
    CONFIRM_DIR,
    LOG_FILE,
    METRIC,
    REFERENCE_DIR,
    TRIALS_CSV,
    SearchSettings,
    best,
    coerce,
    pareto_front,
    update_settings,
    write_experiment,
)
from ips_search.experiment.files import experiment_lock
from ips_search.experiment.ranking import SPREAD
from ips_search.experiment.settings import trials_at_once
from ips_search.search.confirm import run_confirm
from ips_search.search.console import TrialProgress, terminal_only_ours
from ips_search.search.folds import draw_splits, save_splits, splits_line
from ips_search.search.plan import budget_memory_range, plan_lines, prepare_data
from ips_search.search.reference import run_reference
from ips_search.search.trainable import confirm_ips, make_trainable, train_ips
from ips_search.search.tuner import make_tuner, restore_tuner

# Tune warns when it snapshots experiment state often; with short epochs that is by design (nothing is lost)
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

AUTH_TOKEN_FILE = Path.home() / ".ray" / "auth_token"
EXIT_ALL_FAILED = 1
log = logging.getLogger("ips_search")


def start_ray(args: argparse.Namespace) -> dict[str, Any]:
    """Join ``--address`` or start a local Ray with the dashboard on localhost and token auth on."""
    import ray

    if ray.is_initialized():  # e.g. a notebook or test session that already started Ray: use it
        return ray.cluster_resources()
    if args.address:
        ctx = ray.init(address=args.address, log_to_driver=False)
    else:
        if args.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"warning: the Ray dashboard will listen on {args.dashboard_host}, reachable from other machines "
                "(token auth stays on); use the default 127.0.0.1 unless you need this",
                file=sys.stderr,
            )
        ctx = ray.init(
            include_dashboard=not args.no_dashboard,
            dashboard_host=args.dashboard_host,
            num_gpus=args.num_gpus,
            log_to_driver=False,
            object_store_memory=256 * 1024 * 1024,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    url = getattr(ctx, "dashboard_url", None)
    if url and not args.no_dashboard:
        auth = (
            f"token auth is on: paste the token from `ray get-auth-token` (stored in {AUTH_TOKEN_FILE}) "
            "when the dashboard asks"
            if os.environ.get("RAY_AUTH_MODE") == "token"
            else "token auth is off"
        )
        print(f"Ray dashboard: http://{url}  ({auth})", flush=True)
    secure_token_file(AUTH_TOKEN_FILE)
    return ray.cluster_resources()


def secure_token_file(path: Path) -> None:
    """Ray writes its dashboard token readable by everyone on the machine (0644): anyone who reads it can submit
    jobs to the cluster. Ours is made 0600; someone else's is only warned about (it is not ours to change)."""
    try:
        info = path.stat()
    except OSError:  # no token (token auth off, or Ray keeps it elsewhere): nothing to protect here
        return
    if not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return
    if info.st_uid == os.getuid():
        try:
            path.chmod(0o600)
            return
        except OSError as exc:
            reason = exc.strerror
    else:
        reason = f"it belongs to uid {info.st_uid}"
    print(
        f"warning: Ray's token file {path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o}) and "
        f"cannot be made private ({reason}); run `chmod 600 {path}` as its owner",
        file=sys.stderr,
    )


def fit_resources(settings: SearchSettings, cluster: dict[str, Any], explicit_concurrency: bool) -> None:
    """GPUs per trial left to auto (None) become 1 when the cluster has GPUs, else 0 (silently); GPU requests on a
    cluster without GPUs fall back to CPU (one warning); concurrency fits the cluster."""
    if settings.gpus_per_trial is None:
        settings.gpus_per_trial = min(1.0, float(cluster.get("GPU", 0))) if cluster.get("GPU", 0) > 0 else 0.0
    if settings.gpus_per_trial > 0 and cluster.get("GPU", 0) <= 0:
        print("warning: the Ray cluster has no GPU; trials run on CPU (--gpus-per-trial ignored)", file=sys.stderr)
        settings.gpus_per_trial = 0.0
    at_once = trials_at_once(settings, cluster.get("CPU", 1), cluster.get("GPU", 0))
    if at_once < 1:  # a bad input like any other: one line and exit 2 (run.main prints it)
        raise ConfigError(
            f"a trial needs {settings.cpus_per_trial:g} CPU and {settings.gpus_per_trial:g} GPU "
            f"but the cluster has {cluster.get('CPU', 0):g} CPU and {cluster.get('GPU', 0):g} GPU; "
            "lower --cpus-per-trial / --gpus-per-trial"
        )
    if not explicit_concurrency:
        settings.concurrency = at_once


def save_experiment(space, settings: SearchSettings, argv: list[str]) -> None:
    """``experiment.json``: the settings, the space as it runs (a resume uses it even if the file changed since)."""
    write_experiment(settings.experiment_dir, settings.to_dict(), space.to_dict(), argv=argv, space_file=space.path)


def run_search(space, settings: SearchSettings, args: argparse.Namespace, resume: bool) -> int:
    import ray

    geometries = prepare_data(space)
    if not resume:  # a resumed space holds its range already
        budget_memory_range(space, settings.max_memory_mb, geometries)
    table = None if resume else draw_splits(space, settings)  # bad folds or a bad splits file: before Ray starts
    gpus_auto = settings.gpus_per_trial is None
    joined = ray.is_initialized()  # a session someone else started (notebook, tests) stays theirs to shut down
    cluster = start_ray(args)
    try:
        fit_resources(settings, cluster, explicit_concurrency=settings.concurrency is not None)
    except ConfigError:
        if not joined:  # the cluster we just started (or joined with --address) runs nothing: leave it now
            ray.shutdown()
        raise
    with ExitStack() as held:
        if not resume:  # a resumed search holds the lock already (run.main takes it before anything starts)
            try:
                settings.experiment_dir.mkdir(parents=True)
            except FileExistsError:  # made since run.main checked: another search of the same --name
                raise ConfigError(
                    f"experiment {settings.name!r} already exists in {settings.results_dir}; pick another --name"
                ) from None
            except OSError as exc:
                raise ConfigError(
                    f"cannot create {settings.experiment_dir} ({exc.strerror}); free space or pass another "
                    "--results-dir"
                ) from None
            held.enter_context(experiment_lock(settings.experiment_dir, settings.name))
        if table is not None:
            save_splits(space, settings, table)
        return _run(space, settings, args, table, gpus_auto)


def _run(space, settings: SearchSettings, args: argparse.Namespace, table: Any, gpus_auto: bool) -> int:
    """The search itself, in a folder whose lock this process holds (``table``: a new search's splits, None when
    resuming)."""
    resume = table is None
    verbose = getattr(args, "verbose", False)
    log_path = settings.experiment_dir / LOG_FILE
    try:
        if not resume:
            save_experiment(space, settings, sys.argv)
        print("\n".join(plan_lines(space, settings, gpus_auto=gpus_auto)), flush=True)
        if table is not None:
            print(splits_line(table, settings), flush=True)
        if not verbose:
            print(f"Ray's output: {log_path} (--verbose shows it here)", flush=True)
        if resume:
            update_settings(settings.experiment_dir, settings.to_dict())  # --trials may have raised the count
            drop_empty_snapshots(settings.experiment_dir)
        with terminal_only_ours(log_path, verbose) as terminal:
            trainable = make_trainable(settings)
            tuner = restore_tuner(settings, trainable) if resume else make_tuner(space, settings, trainable)
            with TrialProgress(settings.experiment_dir / TRIALS_CSV, settings.trials, terminal):
                tuner.fit()
            if settings.confirm and first_error(settings.experiment_dir) is None:  # every trial failed: none to confirm
                runs = settings.confirm * settings.confirm_top
                print(
                    f"confirm stage: the best {settings.confirm_top} configs, {settings.confirm} more seeds each",
                    file=terminal,
                )
                with TrialProgress(settings.experiment_dir / CONFIRM_DIR / TRIALS_CSV, runs, terminal, "confirm"):
                    run_confirm(settings, confirm_ips)
            if not settings.no_reference and first_error(settings.experiment_dir) is None:
                with TrialProgress(settings.experiment_dir / REFERENCE_DIR / TRIALS_CSV, 1, terminal, "reference"):
                    run_reference(settings, space, train_ips, file=terminal)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished trials are saved; continue with --resume {settings.name}", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full or gone: finished trials and the journal stay; say how to go on
        raise ConfigError(
            f"cannot write to {settings.experiment_dir} ({exc.strerror or exc}); free space or fix the folder, "
            f"then continue with --resume {settings.name}"
        ) from None
    print_summary(settings)
    error = first_error(settings.experiment_dir)
    if error is not None:
        print(
            f"error: every trial failed; the first one's error is in {error}: fix its cause, then start a new search "
            f"(or --resume {settings.name}, which retries the failed trials)",
            file=sys.stderr,
        )
        return EXIT_ALL_FAILED
    return 0


def first_error(folder: Path) -> Path | None:
    """When every trial of ``folder/trials.csv`` failed: the first one's ``error.txt`` (its folder if Ray wrote
    none); None when any trial got further, or there is no trial at all."""
    import pandas as pd

    try:
        df = pd.read_csv(folder / TRIALS_CSV, dtype={"trial_id": str, "path": str})
    except (OSError, ValueError):
        return None
    if df.empty or not (df["status"] == "failed").all():
        return None
    trial = Path(df["path"].iloc[0])
    return trial / "error.txt" if (trial / "error.txt").is_file() else trial


def drop_empty_snapshots(folder: Path) -> None:
    """Remove Tune snapshots that a full disk left empty, so restore uses the last good one.

    Tune writes ``experiment_state-*.json``, ``search_gen_state-*.json`` and
    ``searcher-state-*.pkl`` without an atomic rename; a 0-byte one would win as the
    newest and lose every finished trial from the restored experiment.
    """
    for pattern in ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl"):
        for path in folder.glob(pattern):
            if path.stat().st_size == 0:
                path.unlink()


def print_summary(settings: SearchSettings) -> None:
    """Status counts, the best trial by the ranking rule (and the Pareto set of a two-objective search)."""
    import pandas as pd

    df = coerce(pd.read_csv(settings.experiment_dir / TRIALS_CSV, dtype={"trial_id": str}))
    print(f"\n{len(df)} trials: " + ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items()))
    top = best(df)
    if top is None:
        print("no trial completed all epochs within the budget")
    else:
        lr = top.get("lr", float("nan"))
        print(
            f"best: patch_size={top.get('patch_size')} memory_size={top.get('memory_size')} "
            f"iteration_size={top.get('iteration_size')} lr={lr:.2e}"
        )
        metric = str(top.get("metric") or settings.metric)
        spread = f" ± {top[SPREAD]:.4f} over {top['folds']} folds" if pd.notna(top.get(SPREAD)) else ""
        print(
            f"      val {metric} {top[METRIC]:.4f}{spread}, test {metric} {top['test_score']:.4f} (held out: never "
            f"used to choose), peak memory {top['peak_memory_mb']:.0f} MB ({top['memory_kind']})"
        )
        if pd.notna(top.get("confirm_val_mean")):  # an older confirm stage, which validated
            print(
                f"      confirmed over {top['confirm_runs']} seeds: val {metric} {top['confirm_val_mean']:.4f} "
                f"± {top['confirm_val_std']:.4f}, test {metric} {top['confirm_test_mean']:.4f} "
                f"± {top['confirm_test_std']:.4f}"
            )
        elif pd.notna(top.get("confirm_test_mean")):
            interval = (
                f", 95% interval [{top['confirm_test_ci_low']:.4f}, {top['confirm_test_ci_high']:.4f}] (patients "
                "resampled)"
                if pd.notna(top.get("confirm_test_ci_low"))
                else ""
            )
            print(
                f"      retrained on every non-test slide with {top['confirm_runs']} seeds: test {metric} "
                f"{top['confirm_test_mean']:.4f} ± {top['confirm_test_std']:.4f}{interval}"
            )
        if settings.multi_objective:
            front = pareto_front(df)
            print(f"Pareto set (val {metric} vs peak memory, full-budget trials):")
            cols = ["trial_id", "patch_size", "memory_size", "iteration_size", METRIC, "peak_memory_mb"]
            print(front[[c for c in cols if c in front]].to_string(index=False))
    print(f"report: python -m ips_search.report {settings.experiment_dir}")
