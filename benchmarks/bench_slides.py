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


def throughput(source: SlidePatchSource, index: np.ndarray, chunk: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(index), chunk):
        source.read(index[i : i + chunk])
    return len(index) / (time.perf_counter() - start)


def bare_openslide(path: Path, coords: np.ndarray, level: int, patch: int) -> float:
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        start = time.perf_counter()
        for x, y in coords:
            np.asarray(slide.read_region((int(x), int(y)), level, (patch, patch)))
        return len(coords) / (time.perf_counter() - start)


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


def bench_size(size: int, args: argparse.Namespace, work: Path) -> dict:
    path = work / f"slide-{size}.tif"
    row: dict = {"size": size}
    start = time.perf_counter()
    if not path.exists():
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
    rss = peak_rss(path, args.patch_size, args.level, args.chunk, cache)
    row.update(
        peak_rss_mb=rss["peak_mb"], baseline_rss_mb=rss["baseline_mb"], read_all_s=rss["seconds"], read_all_n=rss["n"]
    )
    rng = np.random.default_rng(0)
    sample = np.sort(rng.permutation(len(coords))[: args.sample])
    cfg = DataConfig(dataset="slides", patch_size=args.patch_size, level=args.level, cache_dir=str(cache))
    ours = make_source(path, cfg)
    via_openslide = SlidePatchSource(path, ours.coords, args.patch_size, args.level, kind="openslide")
    downsample = open_slide(path, "openslide").downsamples[args.level]
    level0 = ours.coords[sample]
    row["sample"] = len(sample)
    row["bare_openslide_per_s"] = bare_openslide(path, level0, args.level, args.patch_size)
    row["source_openslide_per_s"] = throughput(via_openslide, sample, args.chunk)
    row["source_tifffile_per_s"] = throughput(ours, sample, args.chunk)
    row["openslide_ratio"] = row["source_openslide_per_s"] / row["bare_openslide_per_s"]
    row["tifffile_ratio"] = row["source_tifffile_per_s"] / row["bare_openslide_per_s"]
    row["downsample"] = downsample
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
        lines.append(
            f"| {r['size']} | {r['file_mb']:.0f} | {r['write_s']:.0f} | {r['coords_s']:.2f} | "
            f"{r['n_patches']} / {r['grid_patches']} | {r['baseline_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['read_all_s']:.0f} | {r['bare_openslide_per_s']:.0f} | {r['source_openslide_per_s']:.0f} | "
            f"{r['openslide_ratio']:.2f} | {r['source_tifffile_per_s']:.0f} | {r['tifffile_ratio']:.2f} |"
        )
    small, large = rows[0], rows[-1]
    growth = large["peak_rss_mb"] / small["peak_rss_mb"]
    lines += [
        "",
        f"Peak RSS {large['size']} / {small['size']}: {growth:.2f}x (target <= 1.2x: "
        f"{'met' if growth <= 1.2 else 'missed'}); largest peak {max(r['peak_rss_mb'] for r in rows):.0f} MB "
        f"(target < 1024 MB: {'met' if max(r['peak_rss_mb'] for r in rows) < 1024 else 'missed'}).",
        f"IPS selection pass: {json.dumps(small.get('ips'))}.",
    ]
    return "\n".join(lines) + "\n"


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
    args = parser.parse_args()
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
