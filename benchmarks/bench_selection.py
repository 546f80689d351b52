"""How well a search chooses configs: 5 patient-level folds against one validation split, and slide-level leakage.

A generated cohort (:func:`make_cohort`): ~40 patients with 2-4 slides each, one binary label per patient (~35%
positive), TRIDENT-layout ``.h5`` features (``features`` (N, D = 32) float32, N 100-400 per slide, ``coords``). The
signal sits in a few patches: a positive slide holds 8-16 patches (``--signal-patches``) shifted by 8 noise sds
(``--shift``) along one direction; every patch of a patient's slides also carries that patient's random offset, so
slides of one patient look alike (what makes slide-level splits leak). The defaults sit near the edge of what a
12-epoch trial learns: with weaker signals (``--shift 3 --signal-patches 3 8`` up to ``--shift 6 --signal-patches 4
10``) no one-split trial of 4-6 reached a test AUC above 0.62, although a reader of the true direction (each slide's
largest projection) scores 0.95-1.0 there.
The manifest is ``slide,label,patient,split``: a third of the patients are held out as test (the same test slides
for every search), a fifth of the rest are the one-split searches' validation patients.

Searches (``python -m ips_search.run`` subprocesses, TPE + FIFO, one trial at a time on 1 CPU, metric AUC), per search
seed: ``folds=1`` and ``folds=5`` over the patient manifest, and ``leaky`` (5 folds over the same manifest without
its patient column: slide-level folds); on request ``folds5-noprune`` (5 folds, ``--prune-margin 1.0``: no trial is
pruned) and ``folds5-foldends`` (5 folds, ``--prune-interval 0``: checked at fold ends only). Per search, from its
``trials.csv``:

* ``spearman``: rank correlation of the completed trials' ``val_score_mean`` with their ``test_score`` (test AUC:
  the mean over the trial's fold models, each scoring the test set once at its fold's end);
* ``spearman_all``: the same over every trial that finished a fold, pruned ones with their partial means (the
  validation mean the searcher learned, and the test mean of the same fold models);
* ``chosen_test``: test AUC of the config the search picks (``ips_search.experiment.best``: validation only);
* ``regret``: the best test AUC among the search's completed trials minus ``chosen_test``;
* ``trial_seconds``: the sum of ``time_total_s`` of all its trials, pruned ones included (cost 5 folds / 1 fold);
* ``pruned``: trials stopped after a fold (status ``early-stopped``, or ``pruned``);
* ``learned``: completed trials whose test AUC is at least 0.9 (the model found the signal patches);
* ``gap``: mean over completed trials of ``val_score_mean - test_score`` (optimism of validation).

    python benchmarks/bench_selection.py                        # 3 seeds x {1, 5 folds, leaky} x 30 trials
    python benchmarks/bench_selection.py --trials 20 --seeds 0 1 2 --leaky-seeds 1
    python benchmarks/bench_selection.py --trials 20 --arms folds1 folds5 leaky folds5-noprune --noprune-seeds 1
    python benchmarks/bench_selection.py --quick                # smoke run: 1 seed, 4 trials, 5 folds only

Writes ``selection-<date>.md``, ``.csv`` (one row per search) and ``.json`` to ``--out``; the experiments stay in
``--work`` (``--work`` again reuses the finished ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from ips_search.data.split import group_holdout
from ips_search.experiment import TRIALS_CSV, best, coerce
from ips_search.experiment.record import TEST_FOLD_SCORE, fold_columns
from ips_search.extraction import write_slide

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 32  # D: the features' width
PATCH = 256  # coords step: one patch every 256 px at level 0, on a square grid
LEARNED = 0.9  # a test AUC at least this: the model found the signal patches (the patient offsets alone give ~0.5)
PRUNED = ("early-stopped", "pruned")  # a fold-pruned trial's status (the contract's name, and today's)
ARMS = {  # arm -> (folds, manifest, more flags)
    "folds1": (1, "labels.csv", ()),
    "folds5": (5, "labels.csv", ()),
    "leaky": (5, "labels-no-patient.csv", ()),
    # 5 folds without pruning (no fold mean is 1.0 below another's): every trial completes and has a test score
    "folds5-noprune": (5, "labels.csv", ("--prune-margin", "1.0")),
    # 5 folds, pruned at fold ends only (no checks inside a fold)
    "folds5-foldends": (5, "labels.csv", ("--prune-interval", "0")),
}


# -- the cohort -------------------------------------------------------------------------------------------------------
def make_cohort(
    root: Path,
    n_patients: int = 40,
    slides_per_patient: tuple[int, int] = (2, 4),
    positive: float = 0.35,
    n_patches: tuple[int, int] = (100, 400),
    signal_patches: tuple[int, int] = (8, 16),
    shift: float = 8.0,
    patient_scale: float = 0.3,
    test_fraction: float = 0.33,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """Write the cohort's ``<slide>.h5`` files, ``labels.csv`` (``slide,label,patient,split``) and
    ``labels-no-patient.csv`` (the same without ``patient``) into ``root``; returns the manifest with each slide's
    ``n`` (patches) and ``signal`` (its shifted patches: 0 on negative slides).

    A patch is ``N(0, I_D) + offset_patient`` and, for the ``signal`` patches of a positive slide, ``+ shift * u``:
    ``u`` a unit direction with zero mean over its D entries (the projector's LayerNorm keeps it), ``offset_patient``
    ``~ N(0, patient_scale^2 I_D)`` shared by all of a patient's slides. Exactly ``round(positive * n_patients)``
    patients are positive. Test and validation patients are whole, stratified by label (``group_holdout``)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(DIM)
    direction -= direction.mean()
    direction /= np.linalg.norm(direction)
    labels = np.zeros(n_patients, dtype=int)
    labels[rng.permutation(n_patients)[: round(positive * n_patients)]] = 1
    rows = []
    for p in range(n_patients):
        offset = rng.normal(0.0, patient_scale, DIM)  # (D,)
        for s in range(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1)):
            n = int(rng.integers(n_patches[0], n_patches[1] + 1))
            features = rng.standard_normal((n, DIM)) + offset  # (N, D)
            k = int(rng.integers(signal_patches[0], signal_patches[1] + 1)) if labels[p] else 0
            features[rng.choice(n, size=k, replace=False)] += shift * direction
            side = int(np.ceil(np.sqrt(n)))
            coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * PATCH  # (N, 2)
            name = f"p{p:03d}-s{s}"
            attrs = {"patch_size": PATCH, "patch_size_level0": PATCH, "level0_magnification": 20}
            write_slide(root / f"{name}.h5", iter([torch.from_numpy(features)]), n, coords, "float32", attrs)
            rows.append({"slide": name, "label": int(labels[p]), "patient": f"p{p:03d}", "n": n, "signal": k})
    cohort = pd.DataFrame(rows)
    test = group_holdout(cohort["patient"].tolist(), cohort["label"].tolist(), test_fraction, seed)
    rest = cohort[~test]
    val = pd.Series(False, index=cohort.index)
    val[rest.index] = group_holdout(rest["patient"].tolist(), rest["label"].tolist(), val_fraction, seed + 1)
    cohort["split"] = np.where(test, "test", np.where(val, "val", "train"))
    cohort[["slide", "label", "patient", "split"]].to_csv(root / "labels.csv", index=False)
    cohort[["slide", "label", "split"]].to_csv(root / "labels-no-patient.csv", index=False)
    return cohort


def cohort_settings(seed: int, shift: float, signal_patches: tuple[int, int]) -> str:
    """The cohort's generator settings in one line: what ``settings.json`` and the results file record."""
    low, high = signal_patches
    return f"shift {shift:g}, patient offset sd 0.3, {low}-{high} signal patches, seed {seed}"


def cohort_once(root: Path, seed: int, shift: float = 8.0, signal_patches: tuple[int, int] = (8, 16)) -> pd.DataFrame:
    """The cohort of :func:`make_cohort` with ``seed``, ``shift`` and ``signal_patches``, generated once: a later call
    (another seed's searches, run beside this one) reads it back instead of rewriting files that running trials
    read; a call with other settings regenerates it."""
    table, settings = root / "cohort.csv", {"settings": cohort_settings(seed, shift, signal_patches)}
    if table.is_file() and (root / "settings.json").is_file():
        if json.loads((root / "settings.json").read_text()) == settings:
            return pd.read_csv(table)
    cohort = make_cohort(root, signal_patches=signal_patches, shift=shift, seed=seed)
    cohort.to_csv(table, index=False)
    (root / "settings.json").write_text(json.dumps(settings))
    return cohort


# -- the space --------------------------------------------------------------------------------------------------------
def space(root: Path, manifest: str, epochs: int) -> dict:
    """The search space over the cohort: the projector and a small transformer; M, I and the learning rate searched.

    M reaches down to 2: with the scorer untrained, 2 of a slide's 100-400 patches rarely hold one of its 8-16 signal
    patches (M = 1 is left out: a last training batch of one slide gives the projector's BatchNorm a single value).
    I starts at 8 (I = 2 makes a trial several times slower). The learning rate is held (no warm-up, no decay): with
    a few epochs, a decaying rate stops more configs before they find the signal."""
    return {
        "description": "bench_selection's generated cohort: weak patch signal, patient offsets",
        "data": {"dataset": "features", "root": str(root), "manifest": str(root / manifest)},
        "model": {
            "encoder": "projector",
            "dim": 32,
            "heads": 2,
            "d_k": 16,
            "d_v": 16,
            "d_inner": 64,
            "fold_bn": False,
            # flip the heads that score the common patch above the unusual one: without it, half of the random
            # inits rank the signal patches last and no config learns in a few epochs
            "orient_scores": True,
        },
        "train": {
            "epochs": epochs,
            "batch_size": 4,
            "warm_start": False,
            "warmup_epochs": 0.0,
            "min_lr_ratio": 1.0,
        },
        "search": {
            "memory_size": {"low": 2, "high": 64, "log": True},
            "iteration_size": {"low": 8, "high": 64, "log": True},
            "lr": {"low": 3.0e-4, "high": 1.0e-2, "log": True},
        },
    }


def write_space(folder: Path, manifest: str, epochs: int) -> Path:
    """The space of :func:`space` over ``folder/cohort`` as a YAML file in ``folder`` (one per manifest)."""
    path = folder / f"space-{Path(manifest).stem}.yaml"
    path.write_text(yaml.safe_dump(space(folder / "cohort", manifest, epochs), sort_keys=False))
    return path


# -- the searches -----------------------------------------------------------------------------------------------------
def search_command(
    space_path: Path, folds: int, trials: int, seed: int, work: Path, name: str, extra: tuple[str, ...] = ()
) -> list[str]:
    """One search: TPE + FIFO, metric AUC, one trial at a time on one CPU, no full-bag reference run after it."""
    return [
        *(sys.executable, "-m", "ips_search.run", "--space", str(space_path), "--folds", str(folds)),
        *("--metric", "auc", "--trials", str(trials), "--seed", str(seed), "--sampler", "tpe", "--scheduler", "fifo"),
        *("--concurrency", "1", "--cpus-per-trial", "1", "--results-dir", str(work / "experiments"), "--name", name),
        *("--no-dashboard", "--no-reference", *extra),
    ]


def run_search(cmd: list[str], folder: Path, log: Path, call: str) -> tuple[float, str]:
    """Run ``cmd`` (unless ``folder`` holds a finished run: its ``wall.json``); returns its wall seconds and the
    benchmark command (``call``) that ran it, this one or an earlier one with the same ``--work``."""
    done = folder / "wall.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        return float(saved["wall_seconds"]), str(saved.get("call", "an earlier call"))
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"search failed (exit {proc.returncode}): {shlex.join(cmd)}; see {log}")
    wall = time.perf_counter() - start
    done.write_text(json.dumps({"wall_seconds": wall, "call": call}))
    return wall, call


def measure(folder: Path) -> dict:
    """The selection figures of one finished search (see the module docstring)."""
    trials = coerce(pd.read_csv(folder / TRIALS_CSV))
    splits = pd.read_csv(folder / "splits.csv", dtype=str)
    done = trials[trials["status"] == "completed"].dropna(subset=["val_score_mean", "test_score"])
    chosen = best(trials)
    rho = done["val_score_mean"].corr(done["test_score"], method="spearman") if len(done) >= 3 else float("nan")
    tests = fold_columns(trials, TEST_FOLD_SCORE)
    partial = trials.assign(test_mean=trials[tests].mean(axis=1) if tests else np.nan)
    partial = partial.dropna(subset=["val_score_mean", "test_mean"])
    rho_all = partial["val_score_mean"].corr(partial["test_mean"], method="spearman") if len(partial) >= 3 else np.nan
    chosen_test = float(chosen["test_score"]) if chosen is not None else float("nan")
    train = splits[splits["split"] == "train"]
    return {
        "trials": len(trials),
        "completed": len(done),
        "pruned": int(trials["status"].isin(PRUNED).sum()),
        "learned": int((done["test_score"] >= LEARNED).sum()),
        "failed": int((~trials["status"].isin(("completed", *PRUNED))).sum()),
        "spearman": float(rho),
        "spearman_all": float(rho_all),
        "chosen_val": float(chosen["val_score_mean"]) if chosen is not None else float("nan"),
        "chosen_test": chosen_test,
        "chosen_config": None
        if chosen is None
        else f"M={int(chosen['memory_size'])} I={int(chosen['iteration_size'])} lr={float(chosen['lr']):.2g}",
        "best_test": float(done["test_score"].max()) if len(done) else float("nan"),
        "regret": float(done["test_score"].max() - chosen_test) if len(done) else float("nan"),
        "gap": float((done["val_score_mean"] - done["test_score"]).mean()),
        "chosen_gap": float(chosen["val_score_mean"] - chosen_test) if chosen is not None else float("nan"),
        "test_spread": float(done["test_score"].max() - done["test_score"].min()) if len(done) else float("nan"),
        "trial_seconds": float(trials["time_total_s"].sum()),
        "completed_trial_seconds": float(done["time_total_s"].median()) if len(done) else float("nan"),
        "fold_units": f"{train['patient'].nunique()} patients / {len(train)} slides",
    }


def leakage(patient_level: Path, slide_level: Path) -> dict:
    """Validation of the same configs under patient-level and slide-level folds (one seed): the trials both searches
    drew with the same M, I and lr (TPE's first, random, draws are the same for one seed), their mean
    ``val_score_mean`` (pruned trials: over their finished folds) in each, and the test AUC of each one's completed
    trials."""
    key = ["memory_size", "iteration_size", "lr"]
    a, b = (coerce(pd.read_csv(f / TRIALS_CSV)) for f in (patient_level, slide_level))
    shared = a.merge(b, on=key, suffixes=("_patient", "_slide"))
    return {
        "shared_configs": len(shared),
        "val_patient_level": float(shared["val_score_mean_patient"].mean()),
        "val_slide_level": float(shared["val_score_mean_slide"].mean()),
        "test_patient_level": float(a.loc[a["status"] == "completed", "test_score"].mean()),
        "test_slide_level": float(b.loc[b["status"] == "completed", "test_score"].mean()),
    }


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per arm: medians over seeds, and the cost of 5 folds over 1 (trial-seconds, per seed, then the median)."""
    summary = rows.groupby("arm", sort=False).agg(
        searches=("seed", "count"),
        spearman_median=("spearman", "median"),
        spearman_min=("spearman", "min"),
        spearman_all_median=("spearman_all", "median"),
        regret_median=("regret", "median"),
        chosen_test_median=("chosen_test", "median"),
        gap_median=("gap", "median"),
        pruned_total=("pruned", "sum"),
        trials_total=("trials", "sum"),
        trial_seconds_median=("trial_seconds", "median"),
    )
    per_seed = rows.pivot_table(index="seed", columns="arm", values="trial_seconds")
    if "folds1" in per_seed:  # each arm's trial-seconds over the one-split search's of the same seed
        summary["cost_vs_folds1"] = [(per_seed[arm] / per_seed["folds1"]).median() for arm in summary.index]
    return summary


def verdicts(rows: pd.DataFrame) -> list[str]:
    """The targets, each met or missed, from the per-search rows."""
    arm = {name: frame for name, frame in rows.groupby("arm")}
    if not {"folds1", "folds5"} <= set(arm):
        return ["targets need both the folds1 and folds5 arms"]
    rho5, rho1 = arm["folds5"]["spearman"].median(), arm["folds1"]["spearman"].median()
    regret5, regret1 = arm["folds5"]["regret"].median(), arm["folds1"]["regret"].median()
    cost = (
        arm["folds5"].set_index("seed")["trial_seconds"] / arm["folds1"].set_index("seed")["trial_seconds"]
    ).median()
    met = {True: "met", False: "missed"}
    seeds5 = int(arm["folds5"]["spearman"].notna().sum())
    paired = _paired(arm["folds5"], arm["folds1"])
    lines = [
        f"Spearman (median over the {seeds5} seeds where it is defined: 3 or more completed trials, not all tied) "
        f"{rho5:.2f} with 5 folds, {rho1:.2f} with one split: target >= 0.7 and above one split: "
        f"{met[bool(rho5 >= 0.7 and rho5 > rho1)]}",
        f"Spearman, paired by seed: 5 folds above one split in {int((paired > 0).sum())} of {len(paired)} seeds "
        f"(median difference {paired.median():+.2f})",
        f"regret (median over seeds) {regret5:.3f} with 5 folds ({regret1:.3f} with one split): target <= 0.02: "
        f"{met[bool(regret5 <= 0.02)]}",
        f"cost, trial-seconds 5 folds / one split (median over seeds) {cost:.2f}x: target <= 2.5x: "
        f"{met[bool(cost <= 2.5)]}",
        f"Spearman over every trial that finished a fold, pruned ones by their partial means (median over seeds): "
        f"{arm['folds5']['spearman_all'].median():.2f} with 5 folds, {arm['folds1']['spearman_all'].median():.2f} "
        "with one split",
    ]
    if "folds5-noprune" in arm:
        free = arm["folds5-noprune"].set_index("seed")
        ratio = (free["trial_seconds"] / arm["folds1"].set_index("seed")["trial_seconds"]).dropna().median()
        above = _paired(arm["folds5-noprune"], arm["folds1"])
        lines.append(
            f"without pruning (seeds {', '.join(map(str, free.index))}): Spearman {free['spearman'].median():.2f}, "
            f"regret {free['regret'].median():.3f}, cost {ratio:.2f}x (medians); Spearman above one split in "
            f"{int((above > 0).sum())} of {len(above)} seeds (median difference {above.median():+.2f})"
        )
    return lines


def _paired(arm: pd.DataFrame, one_split: pd.DataFrame) -> pd.Series:
    """Spearman of ``arm`` minus one split's, per seed both searched and both have one: a search whose completed
    trials all tie (every one at validation and test AUC 1.0) has no rank correlation."""
    return (arm.set_index("seed")["spearman"] - one_split.set_index("seed")["spearman"]).dropna()


def machine() -> str:
    """The machine in one line (CPU model, cores, memory, load when the run ended)."""
    cpu = platform.processor() or platform.machine()
    try:
        model = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        cpu = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu} ({platform.machine()}), {os.cpu_count()} CPUs, {mem:.0f} GiB, no GPU; load average at the end {load}"


def to_markdown(res: dict, rows: pd.DataFrame, summary: pd.DataFrame) -> str:
    cols = ["arm", "seed", "trials", "completed", "pruned", "learned", "spearman", "chosen_config", "chosen_val"]
    cols += ["chosen_test", "best_test", "regret", "gap", "trial_seconds", "wall_seconds", "fold_units"]
    lines = [
        f"# Model selection: 5 patient-level folds vs one split ({res['date']})",
        "",
        f"Machine: {res['machine']}. torch {res['torch']}, Python {res['python']}, commit {res['commit']}.",
        "",
        f"Command: `{res['command']}` ({res['wall_minutes']:.0f} min wall). The searches were run by "
        + "; ".join(f"`{call}` ({n})" for call, n in res["calls"].items())
        + " (one `--work` folder: a later call reads back the searches an earlier one finished; each search's wall "
        "seconds are below).",
        "",
        f"Cohort: {res['cohort']['slides']} slides of {res['cohort']['patients']} patients "
        f"({res['cohort']['positive_patients']} positive), N {res['cohort']['n_min']}-{res['cohort']['n_max']} "
        f"patches of D = {DIM}; test {res['cohort']['test_slides']} slides of {res['cohort']['test_patients']} "
        f"patients; generator settings {res['cohort']['settings']}.",
        "",
        f"Space (`{res['space_file']}`, {res['epochs']} epochs per fold): M in [2, 64], I in [8, 64], lr in "
        "[3e-4, 1e-2] (log); TPE + FIFO, one trial at a time on one CPU, metric AUC, pruning margin "
        f"{res['prune_margin']}.",
        "",
        "## Targets",
        "",
        *[f"- {v}" for v in res["verdicts"]],
        "",
        "## Per arm",
        "",
        summary.reset_index().to_markdown(index=False, floatfmt=".3f"),
        "",
        "## Leakage: the same configs under slide-level and patient-level folds",
        "",
        "Trials both searches of a seed drew with the same M, I and lr; their mean validation AUC (a pruned trial's "
        "over its finished folds), and the mean test AUC of each search's completed trials.",
        "",
        pd.DataFrame.from_dict(res["leakage"], orient="index")
        .rename_axis("seed")
        .reset_index()
        .to_markdown(index=False, floatfmt=".3f")
        if res["leakage"]
        else "(no seed ran both the folds5 and the leaky arm)",
        "",
        "## Per search",
        "",
        rows[cols].to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS), help="folder of the results files")
    parser.add_argument("--work", default="/tmp/bench-selection", help="cohort and experiments (kept, reused)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["folds1", "folds5", "leaky"])
    parser.add_argument("--leaky-seeds", type=int, nargs="*", default=None, help="seeds of the leaky arm (default all)")
    parser.add_argument(
        "--noprune-seeds", type=int, nargs="*", default=None, help="seeds of the folds5-noprune arm (default all)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fold (default 12; --quick: 2)")
    parser.add_argument("--cohort-seed", type=int, default=0)
    parser.add_argument(
        "--shift", type=float, default=8.0, help="signal patches' shift along the direction, in noise sds (default 8)"
    )
    parser.add_argument(
        "--signal-patches",
        type=int,
        nargs=2,
        default=(8, 16),
        metavar=("LOW", "HIGH"),
        help="signal patches per positive slide, drawn in [LOW, HIGH] (default 8 16)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 trials, 5 folds only, 2 epochs")
    parser.add_argument("--tag", default="", help="appended to the results files' names")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.seeds, args.arms = 4, args.seeds[:1], ["folds5"]
        args.epochs, args.tag = args.epochs or 2, args.tag or "quick"
    args.epochs = args.epochs or 12
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cohort = cohort_once(work / "cohort", args.cohort_seed, args.shift, tuple(args.signal_patches))
    spaces = {manifest: write_space(work, manifest, args.epochs) for _, manifest, _ in ARMS.values()}
    only = {"leaky": args.leaky_seeds, "folds5-noprune": args.noprune_seeds}
    log = work / "searches.log"
    call = shlex.join(["python", "benchmarks/bench_selection.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            if only.get(arm) is not None and seed not in only[arm]:
                continue
            folds, manifest, extra = ARMS[arm]
            name = f"{arm}-s{seed}-t{args.trials}-e{args.epochs}"
            cmd = search_command(spaces[manifest], folds, args.trials, seed, work, name, extra)
            print(f"{arm} seed {seed}: {shlex.join(cmd)}", flush=True)
            wall, ran_by = run_search(cmd, work / "experiments" / name, log, call)
            row = {"arm": arm, "seed": seed, **measure(work / "experiments" / name), "wall_seconds": wall}
            row["call"] = ran_by
            rows.append(row)
            print(
                f"  {row['completed']} completed, {row['pruned']} pruned, Spearman {row['spearman']:.2f}, chosen "
                f"test {row['chosen_test']:.3f}, regret {row['regret']:.3f}, {row['trial_seconds']:.0f} trial-s, "
                f"{wall:.0f} s wall",
                flush=True,
            )
    table = pd.DataFrame(rows)
    summary = summarize(table)
    leaks = {
        seed: leakage(work / "experiments" / f"folds5-{tail}", work / "experiments" / f"leaky-{tail}")
        for seed in args.seeds
        for tail in [f"s{seed}-t{args.trials}-e{args.epochs}"]
        if (work / "experiments" / f"folds5-{tail}" / "wall.json").is_file()
        and (work / "experiments" / f"leaky-{tail}" / "wall.json").is_file()
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    test = cohort[cohort["split"] == "test"]
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit.stdout.strip() or "unknown",
        "command": call,
        "calls": table.groupby("call", sort=False)["arm"].count().to_dict(),
        "wall_minutes": (time.perf_counter() - start) / 60,
        "epochs": args.epochs,
        "prune_margin": (
            "0.05 plus one standard error of the best trial's fold scores, checked every 3 epochs of a fold and at "
            "its end (the default rule; the folds5-foldends arm: at fold ends only; the folds5-noprune arm: margin "
            "1.0, which never prunes)"
        ),
        "space_file": "space-labels.yaml, written by the script",
        "space": space(work / "cohort", "labels.csv", args.epochs),
        "cohort": {
            "slides": len(cohort),
            "patients": cohort["patient"].nunique(),
            "positive_patients": int(cohort.groupby("patient")["label"].first().sum()),
            "n_min": int(cohort["n"].min()),
            "n_max": int(cohort["n"].max()),
            "test_slides": len(test),
            "test_patients": test["patient"].nunique(),
            "settings": cohort_settings(args.cohort_seed, args.shift, tuple(args.signal_patches)),
        },
        "verdicts": verdicts(table),
        "leakage": leaks,
        "summary": summary.reset_index().to_dict(orient="records"),
        "searches": rows,
    }
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print("\n".join(res["verdicts"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"selection-{time.strftime('%Y%m%d')}" + (f"-{args.tag}" if args.tag else "")
    table.to_csv(out / f"{stem}.csv", index=False)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(res, table, summary))
    print(f"wrote {out / stem}.md, .csv, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
