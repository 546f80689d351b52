"""IPS over pre-extracted patch embeddings (``dataset: features``): speed and host memory.

(a) ``trial``: wall time of one trial (``train.fit``: build the model, train, evaluate val + test) of the ``default``
    task on the images (``search_spaces/default.yaml``) and on its frozen warm-start embeddings
    (``search_spaces/default-features.yaml``), same M, I, learning rate and epochs, one after the other in
    this process. Target: features >= 10x faster. The one-off extraction is timed when it runs here.
(b) ``stream``: host RSS of one training step over B slides of N x D embeddings (default: the paper's
    CAMELYON16 shape, 250k x 2048 per slide, B = 16, M = I = 5000), streamed from one generated HDF5 file
    (every slide of the batch is a source on it). Uses ``IPSNet.ips`` on a list of sources when the model
    takes one; otherwise the same selection written out here against the source protocol (per slide:
    read a chunk, project it, score it with the model's transformer together with the memory, keep the
    top M), then the gradient pass on the M kept embeddings. Target: < 1 GB beyond the model.
``extract``: time to extract the default-features data (every canvas through its frozen encoder).
(c) ``cohort``: peak RSS growth of building the dataset and reading every slide once through a DataLoader,
    for 10 and for 200 small slide files. Target: flat in the number of slides.

    python benchmarks/bench_features.py                       # all parts
    python benchmarks/bench_features.py --parts stream --stream-n 20000 --stream-batch 4

Writes ``benchmarks/results/features-<timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from ips_search.config import DataConfig, IPSConfig
from ips_search.data import build_datasets
from ips_search.data.features import H5FeatureSource
from ips_search.extraction import MANIFEST, feature_folder, parse_extract, resolve_data
from ips_search.memory import PeakMemory
from ips_search.model import IPSNet
from ips_search.space import load_space, trial_config
from ips_search.train import fit, make_optimizer

RESULTS = Path(__file__).resolve().parent / "results"


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


# -- (a) trial wall time ---------------------------------------------------------------------------------------------
def bench_trial(point: dict, epochs: int, device: torch.device, repeats: int = 1) -> dict:
    """Each trial ``repeats`` times, images and features alternating; medians, and every run."""
    out: dict = {"config": point, "epochs": epochs, "repeats": repeats}
    runs: dict[str, list[dict]] = {"default": [], "default-features": []}
    for _ in range(repeats):
        for name in runs:
            space = load_space(name)
            exp = trial_config(space.fixed, point)
            exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, epochs=epochs))
            if exp.data.extract is not None and "extraction_seconds" not in out:
                cached = (feature_folder(parse_extract(exp.data.extract)) / MANIFEST).is_file()
                start = time.perf_counter()
                build_datasets(resolve_data(exp.data))  # extracts on first use
                out["extraction_seconds"] = None if cached else round(time.perf_counter() - start, 1)
            splits = build_datasets(resolve_data(exp.data, progress=False))
            start, cpu_start = time.perf_counter(), time.process_time()
            res = fit(exp, splits, device)
            run = {
                "trial_seconds": round(time.perf_counter() - start, 2),
                # CPU seconds of this process: less swayed than wall time by other jobs on a shared machine
                "trial_cpu_seconds": round(time.process_time() - cpu_start, 2),
                "train_seconds": round(sum(e["seconds"] for e in res["epochs"]), 2),
                "val_accuracy": round(res["val"]["accuracy"], 3),
                "test_accuracy": round(res["test"]["accuracy"], 3),
            }
            if exp.data.extract is not None:  # the share of the trial spent opening and reading slide files
                fresh = build_datasets(resolve_data(exp.data, progress=False))  # nothing kept yet: every file read
                start = time.perf_counter()
                for part in (fresh.train, fresh.val, fresh.test):
                    for i in range(len(part)):
                        part[i]
                run["read_every_item_once_seconds"] = round(time.perf_counter() - start, 2)
            runs[name].append(run)
    for name, rows in runs.items():
        out[name] = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        out[name]["runs"] = rows
    out["speedup"] = round(out["default"]["trial_seconds"] / out["default-features"]["trial_seconds"], 2)
    out["train_speedup"] = round(out["default"]["train_seconds"] / out["default-features"]["train_seconds"], 2)
    out["cpu_speedup"] = round(out["default"]["trial_cpu_seconds"] / out["default-features"]["trial_cpu_seconds"], 2)
    return out


# -- extraction time --------------------------------------------------------------------------------------------------
def bench_extract(folder: Path) -> dict:
    """The default-features space's extraction (every canvas, its frozen warm-start encoder) into ``folder``;
    the canvases and the warm-start weights come from the cache (built first if missing, not timed)."""
    from ips_search.extraction import build_frozen_encoder, extract_splits

    cfg = parse_extract(load_space("default-features").fixed["data"]["extract"])
    data = build_datasets(cfg.source)
    encoder = build_frozen_encoder(cfg, data.geometry, progress=False)
    splits = {"train": data.train, "val": data.val, "test": data.test}
    start, cpu_start = time.perf_counter(), time.process_time()
    extract_splits(splits, encoder, folder, cfg.dtype, cfg.batch_size, progress=False)
    return {
        "images": sum(len(s) for s in splits.values()),
        "patches_per_image": data.n_patches,
        "batch_size": cfg.batch_size,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "mb_on_disk": _mb(sum(f.stat().st_size for f in folder.glob("*.h5"))),
    }


# -- (b) one training step streaming big slides ---------------------------------------------------------------------
def _write_slide(path: Path, n: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", shape=(n, dim), dtype="float16", chunks=(min(n, 256), dim))
        for start in range(0, n, 16384):
            stop = min(n, start + 16384)
            ds[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)


@torch.no_grad()
def _select_sources(model: IPSNet, sources: list, chunk: int) -> torch.Tensor:
    """IPS selection over lazy sources, one slide at a time: mem_idx ``(B, M)``."""
    M, I = model.cfg.memory_size, model.cfg.iteration_size
    model.eval()
    out = []
    for source in sources:
        n = len(source)
        mem_emb = model.encode(source.read(np.arange(M)))[None]  # (1, M, D)
        mem_idx = torch.arange(M)[None]
        for start in range(M, n, I):
            stop = min(n, start + I)
            emb = torch.cat([model.encode(source.read(np.arange(s, min(stop, s + chunk)))) for s in
                             range(start, stop, chunk)])[None]  # fmt: skip
            all_emb, all_idx = torch.cat((mem_emb, emb), 1), torch.cat((mem_idx, torch.arange(start, stop)[None]), 1)
            top = torch.topk(model.score(all_emb), M, dim=-1).indices  # (1, M)
            mem_emb = torch.gather(all_emb, 1, top[..., None].expand(-1, -1, all_emb.shape[-1]))
            mem_idx = torch.gather(all_idx, 1, top)
        out.append(mem_idx)
    model.train()
    return torch.cat(out)


def bench_stream(n: int, dim: int, batch: int, memory_size: int, proj_dim: int, folder: Path) -> dict:
    path = folder / "slide.h5"
    start = time.perf_counter()
    _write_slide(path, n, dim)
    write_s = time.perf_counter() - start
    cfg = IPSConfig(encoder="projector", n_chan=dim, dim=proj_dim, heads=8, d_k=16, d_v=16, d_inner=4 * proj_dim,
                    memory_size=memory_size, iteration_size=memory_size, tasks=({"name": "label", "n_class": 2},),
                    orient_scores=False)  # fmt: skip
    model = IPSNet(cfg)
    optimizer = make_optimizer(model, dataclasses.replace(_train_cfg()))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sources = [H5FeatureSource(path, n, dim) for _ in range(batch)]
    targets = torch.randint(0, 2, (batch,))
    api = "IPSNet.ips(list of sources)"
    with PeakMemory("cpu") as mem:
        start = time.perf_counter()
        try:
            mem_patch, mem_idx = model.ips(sources)
            select_mb = gather_mb = mem.read()
        except (TypeError, AttributeError, ValueError):  # this IPSNet takes tensors only
            api = "selection loop in this script (IPSNet.ips takes tensors only here)"
            mem_idx = _select_sources(model, sources, chunk=4096)
            select_mb = mem.read()
            mem_patch = torch.empty(batch, memory_size, dim)  # (B, M, D): filled in place, no second copy
            for b, (source, idx) in enumerate(zip(sources, mem_idx, strict=True)):
                mem_patch[b] = source.read(idx.numpy())
            gather_mb = mem.read()
        select_s = time.perf_counter() - start
        logits = model(mem_patch, mem_idx)  # (B, 2)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_s = time.perf_counter() - start
    return {
        "slide_shape": [n, dim],
        "file_dtype": "float16",
        "batch": batch,
        "memory_size": memory_size,
        "iteration_size": memory_size,
        "projector_dim": proj_dim,
        "api": api,
        "model_mb": _mb(model_bytes),
        "kept_embeddings_mb": _mb(batch * memory_size * dim * 4),
        "selection_peak_rss_growth_mb": round(select_mb, 1),
        "kept_gather_peak_rss_growth_mb": round(gather_mb, 1),
        "step_peak_rss_growth_mb": round(mem.peak_mb, 1),
        "memory_kind": mem.kind,
        "file_write_seconds": round(write_s, 1),
        "selection_seconds": round(select_s, 1),
        "step_seconds": round(step_s, 1),
    }


def _train_cfg():
    from ips_search.config import TrainConfig

    return TrainConfig(lr=1e-3)


# -- (c) host memory vs number of slides ----------------------------------------------------------------------------
def bench_cohort(counts: list[int], n: int, dim: int, folder: Path) -> dict:
    rows = {}
    for count in counts:
        root = folder / f"cohort-{count}"
        root.mkdir()
        rng = np.random.default_rng(count)
        lines = ["slide,label,split"]
        for i in range(count):
            with h5py.File(root / f"s{i:04d}.h5", "w") as f:
                f.create_dataset("features", data=rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16))
            lines.append(f"s{i:04d},{i % 2},{('train', 'val', 'test')[i % 3]}")
        (root / "labels.csv").write_text("\n".join(lines) + "\n")
        with PeakMemory("cpu") as mem:
            start = time.perf_counter()
            splits = build_datasets(DataConfig(dataset="features", root=str(root), feature_items="source"))
            total = 0
            for part in (splits.train, splits.val, splits.test):
                for sources, _ in DataLoader(part, batch_size=16):
                    for source in sources:
                        for s in range(0, len(source), 256):  # IPS-sized chunks
                            total += len(source.read(np.arange(s, min(len(source), s + 256))))
            seconds = time.perf_counter() - start
        rows[str(count)] = {
            "peak_rss_growth_mb": round(mem.peak_mb, 1),
            "memory_kind": mem.kind,
            "patches_read": total,
            "cohort_mb_on_disk": _mb(sum(p.stat().st_size for p in root.glob("*.h5"))),
            "seconds": round(seconds, 2),
        }
    return {"slide_shape": [n, dim], "by_slides": rows}


# -- report ---------------------------------------------------------------------------------------------------------
def to_markdown(res: dict) -> str:
    lines = ["# IPS over pre-extracted features", "", f"{res['machine']}; command: `{res['command']}`", ""]
    if "trial" in res:
        t = res["trial"]
        lines += [
            f"## (a) Trial wall time, `default` task, {t['config']}, {t['epochs']} epoch(s),"
            f" median of {t.get('repeats', 1)} run(s) each",
            "",
            "| data | trial s (wall) | trial CPU s | train s (wall) | val acc | test acc |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in ("default", "default-features"):
            r = t[name]
            lines.append(
                f"| {name} | {r['trial_seconds']} | {r['trial_cpu_seconds']} | {r['train_seconds']} |"
                f" {r['val_accuracy']} | {r['test_accuracy']} |"
            )
        extraction = t.get("extraction_seconds")
        lines += [
            "",
            f"Speed-up per trial: **{t['speedup']}x** wall, {t['cpu_speedup']}x CPU time (training only:"
            f" {t['train_speedup']}x wall); target >= 10x: " + ("met." if t["speedup"] >= 10 else "missed."),
            f"One-off extraction: {extraction} s." if extraction else "Extraction was already cached.",
            f"Opening and reading every feature file once (train + val + test) takes"
            f" {t['default-features'].get('read_every_item_once_seconds')} s of the features trial's time.",
            "",
        ]
    if "stream" in res:
        first = res["stream"][0]
        lines += [
            f"## (b) One training step, B = {first['batch']} slides of N x {first['slide_shape'][1]}"
            f" ({first['file_dtype']} file), M = I = {first['memory_size']}, projector to {first['projector_dim']}",
            "",
            f"Selection: {first['api']}. Model {first['model_mb']} MB; the B x M kept embeddings alone are"
            f" {first['kept_embeddings_mb']} MB as float32. Peak RSS growth in MB, cumulative over the step:",
            "",
            "| N per slide | selection (no grad) | + kept embeddings gathered | whole step | selection s | step s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for s in res["stream"]:
            lines.append(
                f"| {s['slide_shape'][0]} | {s['selection_peak_rss_growth_mb']} | {s['kept_gather_peak_rss_growth_mb']}"
                f" | {s['step_peak_rss_growth_mb']} | {s['selection_seconds']} | {s['step_seconds']} |"
            )
        worst = max(s["step_peak_rss_growth_mb"] for s in res["stream"])
        lines += ["", f"Target < 1 GB beyond the model: {'met' if worst < 1024 else 'missed'} ({worst} MB).", ""]
    if "extract" in res:
        e = res["extract"]
        lines += [
            "## Extraction of the default-features data",
            "",
            f"{e['images']} canvases x {e['patches_per_image']} patches, {e['batch_size']} patches per encoder call:"
            f" {e['seconds']} s wall, {e['cpu_seconds']} s CPU, {e['mb_on_disk']} MB on disk.",
            "",
        ]
    if "cohort" in res:
        c = res["cohort"]
        lines += [
            f"## (c) Host memory vs number of slides ({c['slide_shape'][0]} x {c['slide_shape'][1]} each)",
            "",
            "| slides | on disk MB | peak RSS growth MB | patches read | s |",
            "|---:|---:|---:|---:|---:|",
        ]
        for count, r in c["by_slides"].items():
            lines.append(
                f"| {count} | {r['cohort_mb_on_disk']} | {r['peak_rss_growth_mb']} | {r['patches_read']} |"
                f" {r['seconds']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["extract", "trial", "stream", "cohort"]
    p.add_argument("--parts", nargs="+", default=parts, choices=parts)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--memory-size", type=int, default=8)
    p.add_argument("--iteration-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.2e-3)
    p.add_argument("--stream-n", type=int, nargs="+", default=[250_000], help="patches per slide (one run each)")
    p.add_argument("--stream-dim", type=int, default=2048)
    p.add_argument("--stream-batch", type=int, default=16)
    p.add_argument("--stream-memory", type=int, default=5000)
    p.add_argument("--stream-proj-dim", type=int, default=128)
    p.add_argument("--cohort-counts", type=int, nargs="+", default=[10, 200])
    p.add_argument("--repeats", type=int, default=3, help="trial runs per data kind (medians reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a trial gets 1 CPU by default)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="BatchNorm folding disabled")
    res: dict = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads, CPU",
        "command": " ".join(["python", "benchmarks/bench_features.py", *sys.argv[1:]]),
    }
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        if "extract" in args.parts:
            (Path(tmp) / "extract").mkdir()
            res["extract"] = bench_extract(Path(tmp) / "extract")
            print(json.dumps(res["extract"]), flush=True)
        if "cohort" in args.parts:
            res["cohort"] = bench_cohort(args.cohort_counts, n=1000, dim=512, folder=Path(tmp))
            print(json.dumps(res["cohort"]), flush=True)
        if "stream" in args.parts:
            res["stream"] = []
            for n in args.stream_n:
                folder = Path(tmp) / f"stream-{n}"
                folder.mkdir()
                row = bench_stream(
                    n, args.stream_dim, args.stream_batch, args.stream_memory, args.stream_proj_dim, folder
                )
                (folder / "slide.h5").unlink()
                res["stream"].append(row)
                print(json.dumps(row), flush=True)
    if "trial" in args.parts:
        point = {"memory_size": args.memory_size, "iteration_size": args.iteration_size, "lr": args.lr}
        res["trial"] = bench_trial(point, args.epochs, torch.device("cpu"), args.repeats)
        print(json.dumps(res["trial"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"features-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(res))
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
