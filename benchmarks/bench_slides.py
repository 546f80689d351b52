"""Whole slides read lazily: does host memory stay flat as slides grow, and what does the reader cost?

    python benchmarks/bench_slides.py                       # 8k, 32k and 64k slides, tissue on about half
    python benchmarks/bench_slides.py --sizes 8192 16384    # quicker

For each size it writes a synthetic JPEG-tiled pyramidal TIFF (``ips_search.data.slides.generate``, tissue on
about half the area; the disk's free space is checked first) and measures:

* ``coords_s``: foreground coordinate computation (thumbnail + Otsu + per-patch fraction), uncached;
* ``peak_rss_mb``: host peak RSS (``/proc/self/status`` VmHWM) of a fresh process that reads *every*
  foreground patch through :class:`SlidePatchSource` (``--chunk`` patches per ``read``), next to the same
  process's VmHWM just before reading (``baseline_rss_mb``: mostly the torch import). Target: 64k <= 1.2x 8k and
  everything < 1 GB;
* reader throughput (patches/s) on up to ``--sample`` of those coordinates (the same ones for every reader):
  a bare loop of OpenSlide's own ``read_region`` (uint8 RGBA, nothing else), and ``SlidePatchSource.read``
  (float32 ``(k, C, P, P)``, the IPS input) through OpenSlide and through tifffile (the reader ``open_slide``
  picks for these files). Target: source >= 80% of the bare loop.

If ``IPSNet.ips`` accepts a list of patch sources in this checkout, the IPS selection pass over the slide is
timed too (:func:`ips_selection_pass`); otherwise the result says so and the function can be run after merging.
Writes ``benchmarks/results/slides-<date>.json`` and ``.md`` with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ips_search.config import DataConfig  # noqa: E402
from ips_search.data.slides import SlidePatchSource, make_source, tissue  # noqa: E402
from ips_search.data.slides.generate import make_layout, write_slide  # noqa: E402
from ips_search.data.slides.readers import open_slide  # noqa: E402

BYTES_PER_TISSUE_PIXEL = 0.35  # JPEG q90 of the synthetic texture, measured on a 16k slide, plus the pyramid


def torch_dataset_base() -> type:
    from torch.utils.data import Dataset

    return Dataset


RSS_SCRIPT = """
import json, sys, numpy as np
from ips_search.config import DataConfig
from ips_search.data.slides import make_source

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

path, patch, level, chunk, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
source = make_source(path, DataConfig(dataset="slides", patch_size=patch, level=level, cache_dir=cache))
source.read(np.arange(min(4, len(source))))
baseline = hwm()
checksum = 0.0
for start in range(0, len(source), chunk):
    checksum += float(source.read(np.arange(start, min(start + chunk, len(source)))).sum())
print(json.dumps({"n": len(source), "baseline_mb": baseline, "peak_mb": hwm(), "checksum": checksum}))
"""


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def peak_rss(path: Path, patch: int, level: int, chunk: int, cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-c", RSS_SCRIPT, str(path), str(patch), str(level), str(chunk), str(cache)]
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - start
    return result


def compare_readers(path: Path, source: SlidePatchSource, index: np.ndarray, chunk: int) -> dict[str, float]:
    """Patches per second of three readers over the same patches, interleaved chunk by chunk (rotating which goes
    first) so that the load of a shared machine falls on all three alike:

    * ``bare_openslide``: OpenSlide's own ``read_region`` + ``np.asarray`` (uint8 RGBA), nothing else;
    * ``source_openslide``: ``SlidePatchSource.read`` through :class:`OpenSlideReader` (float32 ``(k, C, P, P)``);
    * ``source_tifffile``: the same through :class:`TiffReader`, the reader ``open_slide`` picks for these files.
    """
    import openslide

    via_openslide = SlidePatchSource(path, source.coords, source.patch_size, source.level, kind="openslide")
    size = source.read_size
    slide = openslide.OpenSlide(str(path))

    def bare(idx: np.ndarray) -> None:
        for x, y in source.coords[idx]:
            np.asarray(slide.read_region((int(x), int(y)), source.level, (size, size)))

    readers = {"bare_openslide": bare, "source_openslide": via_openslide.read, "source_tifffile": source.read}
    seconds = dict.fromkeys(readers, 0.0)
    names = list(readers)
    for turn, start in enumerate(range(0, len(index), chunk)):
        idx = index[start : start + chunk]
        for name in names[turn % 3 :] + names[: turn % 3]:
            t0 = time.perf_counter()
            readers[name](idx)
            seconds[name] += time.perf_counter() - t0
    slide.close()
    return {f"{name}_per_s": len(index) / max(seconds[name], 1e-9) for name in readers}


def ips_selection_pass(sources: list[SlidePatchSource], memory_size: int = 16, iteration_size: int = 64) -> dict:
    """Time ``IPSNet.ips`` over lazy patch sources (needs the model side that consumes them; run after merging).

    Returns ``{"seconds": .., "n_patches": [..]}`` or ``{"skipped": reason}`` when this checkout's ``IPSNet.ips``
    takes only ``(B, N, C, P, P)`` tensors."""
    import inspect

    import torch

    from ips_search.config import IPSConfig
    from ips_search.model import IPSNet

    annotation = str(inspect.signature(IPSNet.ips).parameters.get("patches", "").annotation)
    if "Source" not in annotation and "list" not in annotation.lower() and "Sequence" not in annotation:
        return {"skipped": f"IPSNet.ips takes {annotation or 'tensors'} in this checkout, not patch sources"}
    patch = sources[0].patch_size
    cfg = IPSConfig(
        n_class=2, n_chan=3, memory_size=memory_size, iteration_size=iteration_size, patch_size=patch,
        encoder="small-cnn", dim=64, heads=4, d_k=16, d_v=16, d_inner=256, loading="lazy", orient_scores=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = IPSNet(cfg)
    start = time.perf_counter()
    model.ips(sources)
    return {"seconds": time.perf_counter() - start, "n_patches": [len(s) for s in sources]}


class _PaddedSlides(torch_dataset_base()):
    """A slides split as the current tensor IPS path takes it: each slide's N patches read once (uint8), cycled to
    the largest N so a batch stacks to ``(B, N_max, C, P, P)`` (repeating a slide's own patches adds no evidence
    that is not on the slide). Only for :func:`learnability_check`; with patch-source support IPS reads the
    sources directly."""

    def __init__(self, dataset, n_max: int) -> None:
        import torch

        self.targets = dataset.targets
        self.patches = []
        for source in dataset.sources:
            index = np.resize(np.arange(len(source)), n_max)  # cycle to n_max
            regions = torch.from_numpy(source.read_uint8(index)).permute(0, 3, 1, 2).contiguous()  # (N, C, P, P)
            self.patches.append(regions)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int):
        return self.patches[i].float().div_(255), {k: v[i] for k, v in self.targets.items()}


def learnability_check(args: argparse.Namespace) -> dict:
    """Train IPS on the ``slides`` search space's cohort with one config (``train.fit``, CPU) and report test
    accuracy: evidence that the generated label can be learned from the patches IPS keeps."""
    import dataclasses

    import torch

    from ips_search.data import DataSplits, build_datasets
    from ips_search.space import load_space
    from ips_search.train import fit

    torch.set_num_threads(2)
    space = load_space("slides")
    base = space.base_config()
    data = dataclasses.replace(base.data, patch_size=args.learn_patch_size, patch_stride=None)
    splits = build_datasets(data)
    n_max = max(max(ds.n_patches) for ds in (splits.train, splits.val, splits.test))
    padded = DataSplits(
        train=_PaddedSlides(splits.train, n_max),
        val=_PaddedSlides(splits.val, n_max),
        test=_PaddedSlides(splits.test, n_max),
        geometry=dataclasses.replace(splits.geometry, grid=(1, n_max), n_patches=n_max),
    )
    model = dataclasses.replace(
        base.model, memory_size=args.learn_memory_size, iteration_size=args.learn_iteration_size
    )
    train = dataclasses.replace(base.train, lr=args.learn_lr, epochs=args.learn_epochs, device="cpu")
    exp = dataclasses.replace(base, data=data, model=model, train=train)
    start = time.perf_counter()
    result = fit(exp, padded, torch.device("cpu"))
    return {
        "config": {
            "patch_size": data.patch_size, "memory_size": model.memory_size,
            "iteration_size": model.iteration_size, "lr": train.lr, "epochs": train.epochs,
        },
        "n_train_val_test": [len(splits.train), len(splits.val), len(splits.test)],
        "n_patches_min_max": [splits.n_patches, n_max],
        "seconds": time.perf_counter() - start,
        "train_loss_per_epoch": [e.get("loss") for e in result["epochs"]],
        "val": result["val"],
        "test": result["test"],
    }  # fmt: skip


def bench_size(size: int, args: argparse.Namespace, work: Path) -> dict:
    path = work / f"slide-{size}.tif"
    row: dict = {"size": size, "write_s": None}  # None: the slide was kept from an earlier run (--keep)
    if not path.exists():
        start = time.perf_counter()
        write_slide(path, make_layout(size, seed=size, tumour=True, tissue_fraction=args.tissue))
        row["write_s"] = time.perf_counter() - start
    row["file_mb"] = path.stat().st_size / 2**20
    reader = open_slide(path)
    row["reader"] = reader.kind
    start = time.perf_counter()
    coords = tissue.compute_coords(reader, args.level, args.patch_size, args.patch_size, args.min_foreground)
    row["coords_s"] = time.perf_counter() - start
    reader.close()
    row["n_patches"] = len(coords)
    row["grid_patches"] = (reader.dimensions[args.level][0] // args.patch_size) ** 2
    cache = work / f"cache-{size}"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = DataConfig(dataset="slides", patch_size=args.patch_size, level=args.level, cache_dir=str(cache))
    ours = make_source(path, cfg)  # caches the coordinates: the measured process only reads patches
    rss = peak_rss(path, args.patch_size, args.level, args.chunk, cache)
    row.update(
        peak_rss_mb=rss["peak_mb"], baseline_rss_mb=rss["baseline_mb"], read_all_s=rss["seconds"], read_all_n=rss["n"]
    )
    rng = np.random.default_rng(0)
    sample = np.sort(rng.permutation(len(coords))[: args.sample])
    row["sample"] = len(sample)
    row.update(compare_readers(path, ours, sample, args.chunk))
    row["openslide_ratio"] = row["source_openslide_per_s"] / row["bare_openslide_per_s"]
    row["tifffile_ratio"] = row["source_tifffile_per_s"] / row["bare_openslide_per_s"]
    if size == min(args.sizes):
        row["ips"] = ips_selection_pass([ours])
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Slides: host memory and reader throughput",
        "",
        f"`{meta['command']}` on {meta['machine']['cpu']}, {meta['machine']['cores']} cores (shared; load average "
        f"{', '.join(f'{v:.1f}' for v in meta['machine']['load_average_at_start'])} at start), "
        f"torch {meta['machine']['torch']}, {meta['date']}.",
        f"Patch {meta['patch_size']} px at level {meta['level']}, min_foreground {meta['min_foreground']}, "
        f"{meta['chunk']} patches per read; throughput over {meta['sample']} sampled foreground patches.",
        "",
        "| side | file MB | write s | coords s | N kept / grid | baseline RSS MB | peak RSS MB | read all s "
        "| bare OpenSlide /s | source (OpenSlide) /s | ratio | source (tifffile) /s | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        written = "kept" if r["write_s"] is None else f"{r['write_s']:.0f}"
        lines.append(
            f"| {r['size']} | {r['file_mb']:.0f} | {written} | {r['coords_s']:.2f} | "
            f"{r['n_patches']} / {r['grid_patches']} | {r['baseline_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['read_all_s']:.0f} | {r['bare_openslide_per_s']:.0f} | {r['source_openslide_per_s']:.0f} | "
            f"{r['openslide_ratio']:.2f} | {r['source_tifffile_per_s']:.0f} | {r['tifffile_ratio']:.2f} |"
        )
    small, large = rows[0], rows[-1]
    via_openslide = ", ".join(f"{r['openslide_ratio']:.2f}" for r in rows)
    via_tifffile = ", ".join(f"{r['tifffile_ratio']:.2f}" for r in rows)
    growth = large["peak_rss_mb"] / small["peak_rss_mb"]
    lines += [
        "",
        f"Peak RSS {large['size']} / {small['size']}: {growth:.2f}x (target <= 1.2x: "
        f"{'met' if growth <= 1.2 else 'missed'}); largest peak {max(r['peak_rss_mb'] for r in rows):.0f} MB "
        f"(target < 1024 MB: {'met' if max(r['peak_rss_mb'] for r in rows) < 1024 else 'missed'}).",
        f"Reader throughput, source / bare OpenSlide loop (target >= 0.8): through OpenSlide {via_openslide}; "
        f"through tifffile, what open_slide picks for these files, {via_tifffile}.",
        f"IPS selection pass: {json.dumps(small.get('ips'))}.",
    ]
    return "\n".join(lines) + "\n"


def render_markdown(json_path: str) -> str:
    """The ``.md`` report for an earlier run's ``.json`` (``python -c`` helper for re-rendering)."""
    data = json.loads(Path(json_path).read_text())
    return markdown(data.pop("rows"), data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--level", type=int, default=0)
    parser.add_argument("--min-foreground", type=float, default=0.5)
    parser.add_argument("--tissue", type=float, default=0.5, help="share of the slide covered by tissue")
    parser.add_argument("--chunk", type=int, default=16, help="patches per SlidePatchSource.read call")
    parser.add_argument("--sample", type=int, default=1500, help="patches timed per reader")
    parser.add_argument("--workdir", default="/tmp/bench-slides")
    parser.add_argument("--keep", action="store_true", help="keep the slides (default: delete after measuring)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--learn", action="store_true", help="instead: train one config on the slides space")
    parser.add_argument("--learn-patch-size", type=int, default=64)
    parser.add_argument("--learn-memory-size", type=int, default=8)
    parser.add_argument("--learn-iteration-size", type=int, default=16)
    parser.add_argument("--learn-lr", type=float, default=1e-3)
    parser.add_argument("--learn-epochs", type=int, default=10)
    args = parser.parse_args()
    if args.learn:
        result = {
            "command": "python benchmarks/bench_slides.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            **learnability_check(args),
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"slides-learn-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    need = max(args.sizes) ** 2 * args.tissue * BYTES_PER_TISSUE_PIXEL * 1.5
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"error: {work} has {free / 2**30:.1f} GiB free, the largest slide needs about {need / 2**30:.1f}")
    meta = {
        "command": "python benchmarks/bench_slides.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "patch_size": args.patch_size,
        "level": args.level,
        "min_foreground": args.min_foreground,
        "chunk": args.chunk,
        "sample": args.sample,
        "disk_free_gib_at_start": free / 2**30,
    }
    rows = []
    for size in sorted(args.sizes):
        rows.append(bench_size(size, args, work))
        if not args.keep:
            (work / f"slide-{size}.tif").unlink(missing_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"slides-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / f"{name}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
