"""Forty 4096 x 4096 RGB PNGs in a 2-trial search, as ``folder`` (resized to ``image_size: 4096``) and as ``slides``:
total resident memory of every process of the search, and the share of each trial that is not training.

    python benchmarks/bench_big_images.py [--images 40] [--side 4096]      # about 10-15 minutes on 2 CPUs

The images are generated once (textured noise; class 1 has a few bright squares), then each search runs in a
subprocess while this script samples the RSS of the driver and all its descendants (Ray's raylet, workers, ...)
every half second. Decoding happens once per machine into the shared memory-mapped cache, before the trials;
a trial's time outside its epochs (dataset open, model build, memory estimate) bounds what it could spend decoding.
Writes ``benchmarks/results/big-images-<machine>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from PIL import Image

SPACE = """\
description: {n} RGB {side} px images, {dataset}
data: {data}
model: {{encoder: small-cnn, dim: 32, heads: 2, d_k: 16, d_v: 16, d_inner: 64, orient_scores: false}}
train: {{epochs: 1, batch_size: 2, warm_start: false}}
search:
  memory_size: {{low: 4, high: 8}}
  iteration_size: {{low: 8, high: 16}}
  lr: {{low: 1.0e-3, high: 3.0e-3, log: true}}
"""


def write_images(root: Path, n: int, side: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        label = i % 2
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 255, (side // 64, side // 64, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR)).copy()
        img += rng.integers(0, 24, img.shape, dtype=np.uint8)  # texture
        if label:
            for y, x in rng.integers(0, side - 200, (3, 2)):
                img[y : y + 160, x : x + 160] = 250
        path = folder / f"img{i:03d}.png"
        Image.fromarray(img).save(path, compress_level=1)
        total += path.stat().st_size
    return total


def sample_memory(pid: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    """(RSS, PSS) in MB summed over ``pid`` and its descendants, every half second. RSS counts a page shared by
    several processes (the memory-mapped decoded images, the page cache they map) once per process; PSS splits it
    among them, so its sum is the memory the search really holds."""
    root = psutil.Process(pid)
    while not stop.wait(0.5):
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        for p in procs:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            rss, pss = rss + info.rss, pss + info.pss
        samples.append((rss / 2**20, pss / 2**20))


def search(space: Path, results: Path, name: str) -> dict:
    cmd = [sys.executable, "-m", "ips_search.run", "--space", str(space), "--trials", "2", "--name", name]
    cmd += ["--results-dir", str(results), "--no-dashboard", "--scheduler", "fifo"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, stop, samples))
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"search {name} failed: {err[-2000:]}")
    df = pd.read_csv(results / name / "trials.csv", dtype={"trial_id": str})
    trials = []
    for path in df["path"]:
        rows = [json.loads(x) for x in (Path(path) / "result.json").read_text().splitlines() if x.strip()]
        last = rows[-1]
        epochs = sum(r.get("epoch_seconds", 0.0) for r in rows) + last.get("test_seconds", 0.0)
        trials.append(
            {
                "trial_s": last["time_total_s"],
                "epochs_s": epochs,
                "outside_epochs_share": 1 - epochs / last["time_total_s"],
                "data_share": last["data_seconds"] / last["time_total_s"],
                "status": last["status"],
                "val_accuracy": last["val_accuracy"],
            }
        )
    return {
        "wall_s": time.perf_counter() - start,
        "peak_total_rss_mb": max(r for r, _ in samples),
        "peak_total_pss_mb": max(p for _, p in samples),
        "trials": trials,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--side", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results/")
    p.add_argument("--machine", default=f"cpu{os.cpu_count()}")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["IPS_SEARCH_CACHE"] = str(tmp / "cache")  # cold: the first run decodes
        start = time.perf_counter()
        disk = write_images(tmp / "images", args.images, args.side)
        written_s = time.perf_counter() - start
        datas = {
            "folder": f"{{dataset: folder, root: {tmp / 'images'}, image_size: {args.side}, n_chan: 3, "
            f"patch_size: 256, n_test: 8}}",
            "slides": f"{{dataset: slides, root: {tmp / 'images'}, level: 0, min_foreground: 0, n_chan: 3, "
            f"patch_size: 256, n_test: 8}}",
        }
        runs = {}
        for dataset, data in datas.items():
            space = tmp / f"{dataset}.yaml"
            space.write_text(SPACE.format(n=args.images, side=args.side, dataset=dataset, data=data))
            runs[dataset] = search(space, tmp / "results", dataset)
    result = {
        "machine": args.machine,
        "command": "python benchmarks/bench_big_images.py",
        "images": args.images,
        "side": args.side,
        "png_mb": disk / 2**20,
        "write_s": written_s,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"big-images-{args.machine}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# {args.images} RGB {args.side} px PNGs in a 2-trial search ({args.machine})",
        "",
        f"`{result['command']}`: {result['png_mb']:.0f} MB of PNG; 256 px patches (N = 256), small-cnn, M 4-8, I 8-16,",
        "batch 2, 1 epoch, FIFO; the cache starts empty (the driver decodes once).",
        "",
        "| dataset | search wall s | peak total PSS, all processes (MB) | peak total RSS (MB) | trial s "
        "| trial's dataset build | outside its epochs |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for dataset, r in runs.items():
        trial_s = ", ".join(f"{t['trial_s']:.0f}" for t in r["trials"])
        data = ", ".join(f"{t['data_share']:.1%}" for t in r["trials"])
        share = ", ".join(f"{t['outside_epochs_share']:.1%}" for t in r["trials"])
        lines.append(
            f"| {dataset} | {r['wall_s']:.0f} | {r['peak_total_pss_mb']:.0f} | {r['peak_total_rss_mb']:.0f} "
            f"| {trial_s} | {data} | {share} |"
        )
    lines += [
        "",
        "Targets: total memory at most 4 GB (4096 MB); no trial spends more than 10% of its time decoding (a trial",
        "opens the shared decoded cache: its dataset build is the column above). PSS shares each page among the",
        "processes that map it; RSS counts the memory-mapped images once per process that touched them.",
    ]
    (out / f"big-images-{args.machine}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
