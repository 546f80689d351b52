"""IPS benchmark: peak memory of a training step vs N, and speed against the reference loop.

Setting (the issue's): ResNet-18 encoder, batch 8, 1-channel 32x32 patches,
M = I = 4, 2 torch threads; a training step is what ``train.train_one_epoch``
does per batch: ``ips`` + forward + backward + gradient clipping + the AdamW step
of ``train.make_optimizer``.

* **Memory vs N.** Each point runs in a fresh interpreter (``--worker``), so no
  allocator history leaks between points; the batch is allocated before any
  measured region. ``PeakMemory`` measures a first step on its own (it also
  allocates one-off state: AdamW moments, gradients, the folded encoder copy), then
  three steady-state steps, each its own region; *step* = their median. Two
  allocator settings: glibc as it comes, and ``MALLOC_MMAP_THRESHOLD_=262144``
  (blocks of 256 KiB or more mapped and unmapped on every allocation and free, so
  RSS follows the live tensors and the numbers are deterministic). The full-batch
  baseline sets ``memory_size = N``: ``ips`` keeps every patch and the forward pass
  encodes all N with gradients.
* **Speed.** Modes are timed round-robin (a load change hits them all),
  ``--repeats`` rounds of ``--steps`` steps after a warm-up step. s/step = the
  fastest round; the speed-up is given both as fastest / fastest and as the median
  of the per-round ratios. Each round records how many cores other processes used;
  ``--quiet-wait`` waits for an idle CPU and re-measures disturbed rounds.
  Reference = the notebook's per-iteration loop (``ips_impl="reference"``,
  ``fold_bn=False``).
* **Agreement** of selections (per image, ``|A & B| / M`` of the kept index sets)
  between modes with the same weights: random init (near-uniform attention, so
  near-ties flip) and a model trained briefly on a synthetic task in which a few
  patches per image carry the label.
* **Exploration** of the no-grad pass (``ips()`` alone): ``encode_chunk`` x
  channels-last x dtype, and the parts of a step (optimiser variants included).

The "default" modes use the library's ``FoldedEncoder`` as shipped: BatchNorm folded
into the convs, and every conv an ``ips_search.model.fold.SmallMapConv2d``, which runs
as one dense matmul on maps of at most 4 pixels (ResNet-18's layer3 and layer4 on
32-px patches).

``python benchmarks/bench_ips.py [--quick] [--out benchmarks/results/]`` prints
Markdown tables and writes ``bench_ips[_quick].json`` / ``.md`` to ``--out``;
``--only memory,speed,...`` reruns some parts and merges them into the files there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ips_search import IPSConfig, IPSNet, TrainConfig
from ips_search.memory import PeakMemory
from ips_search.model.fold import FoldedEncoder
from ips_search.train import make_optimizer
from ips_search.train import train_step as library_train_step

BATCH, PATCH, M, I = 8, 32, 4, 4
THREADS = 2
PINNED_MMAP_THRESHOLD = 256 * 1024
QUIET_CORES, QUIET_RETRIES = 0.15, 3  # a round during which others used more cores is re-measured (--quiet-wait)
TRAIN_CFG = TrainConfig(lr=1e-4)  # the training loop's optimiser (AdamW) and gradient clipping
UNCLIPPED = TrainConfig(lr=3e-4, grad_clip=None)  # the briefly trained model's steps (its own AdamW, no clipping)

# mode -> IPSConfig overrides (on top of the benchmark's base config)
MODES: dict[str, dict[str, Any]] = {
    "reference": {"ips_impl": "reference", "fold_bn": False},
    "streaming, no fold": {"fold_bn": False},
    "default": {},
    "default + bfloat16": {"ips_dtype": "bfloat16"},
}
MODE_NOTES = {
    "reference": "the notebook's loop: one encoder call per iteration (ips_impl=reference, fold_bn=False)",
    "streaming, no fold": "chunked encoding (encode_chunk=256), fold_bn=False",
    "default": "IPSConfig defaults: streaming + fold_bn (convs on maps of <= 4 pixels as one matmul), float32",
    "default + bfloat16": "defaults with ips_dtype=bfloat16",
}
# (mode, what it is compared with) for the selection agreement
AGREE_PAIRS = (
    ("default", "reference"),
    ("default + bfloat16", "default"),
)
SPEED_TARGETS = {"default": 1.5, "default + bfloat16": 2.5}


def _split(spec: dict[str, Any]) -> tuple[dict[str, Any], bool | None]:
    """(IPSConfig overrides, channels_last override) of a mode spec."""
    spec = dict(spec)
    return spec, spec.pop("channels_last", None)


# -- building blocks ---------------------------------------------------------------------------------------------------
def base_config(encoder: str = "resnet18", n_class: int = 10, **overrides: Any) -> IPSConfig:
    kw: dict[str, Any] = {
        "encoder": encoder,
        "n_chan": 1,
        "patch_size": PATCH,
        "memory_size": M,
        "iteration_size": I,
        "n_class": n_class,
    }
    kw.update(overrides)
    return IPSConfig(**kw)


def make_model(cfg: IPSConfig, channels_last: bool | None = None, seed: int = 0, state: dict | None = None):
    """IPSNet + the training loop's optimiser; ``channels_last`` overrides the folded encoder's layout (None: the
    library's)."""
    torch.manual_seed(seed)
    net = IPSNet(cfg)
    if state is not None:
        net.load_state_dict(state)
    if channels_last is not None and cfg.fold_bn:
        dtype = torch.bfloat16 if cfg.ips_dtype == "bfloat16" else torch.float32
        net._folded, net._fold_tried = FoldedEncoder(net.encoder, dtype, channels_last=channels_last), True
    return net, make_optimizer(net, TRAIN_CFG)


def train_step(net: IPSNet, opt: torch.optim.Optimizer, patches: torch.Tensor, labels: torch.Tensor) -> float:
    """One training step as ``train.train_one_epoch`` does it (``train.train_step``): IPS, forward (bfloat16
    autocast on CUDA), backward, clip, AdamW step."""
    net.train()
    return library_train_step(net, patches, {"label": labels}, opt, TRAIN_CFG, net.device)[1]


def random_batch(n: int, batch: int = BATCH, seed: int = 0, n_class: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, 1, PATCH, PATCH, generator=g), torch.randint(0, n_class, (batch,), generator=g)


def machine_info() -> dict[str, Any]:
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def _busy_seconds() -> float | None:
    """CPU-seconds all processes have used (user + nice + system + irq + softirq + steal), from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            f = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


class OthersLoad:
    """How many cores other processes kept busy during a region (machine busy time minus this process's)."""

    def __enter__(self) -> OthersLoad:
        self.cores = 0.0
        self._busy, self._self, self._wall = _busy_seconds(), _self_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, wall = _busy_seconds(), time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            self.cores = max(0.0, (busy - self._busy) - (_self_seconds() - self._self)) / wall


def _self_seconds() -> float:
    t = os.times()
    return t.user + t.system


def wait_quiet(max_wait: float, threshold: float = QUIET_CORES) -> float:
    """Sleep until other processes use under ``threshold`` cores (sampled over 0.3 s), at most ``max_wait`` s."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        with OthersLoad() as load:
            time.sleep(0.3)
        if load.cores < threshold:
            break
    return time.perf_counter() - start


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# -- memory (one point per fresh subprocess) ------------------------------------------------------------------------
def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the fresh subprocess: a first step, then three steady-state steps, each its own region."""
    torch.set_num_threads(spec.get("threads", THREADS))
    device = torch.device(spec.get("device", "cpu"))
    n, full = spec["n"], spec["mode"] == "full-batch"
    overrides = dict(spec.get("overrides", {}))
    if full:
        overrides["memory_size"] = n
    cfg = base_config(spec.get("encoder", "resnet18"), **overrides)
    net, opt = make_model(cfg)
    net.to(device)
    patches, labels = random_batch(n, spec.get("batch", BATCH))
    patches, labels = patches.to(device), labels.to(device)  # 'eager' loading: the batch is on the device already
    with PeakMemory(device) as first:
        train_step(net, opt, patches, labels)
    steady = []
    for _ in range(spec.get("steady_steps", 3)):
        with PeakMemory(device) as mem:
            train_step(net, opt, patches, labels)
        steady.append(mem.peak_mb)
    return {
        "mode": spec["mode"],
        "n": n,
        "malloc": spec.get("malloc", "default"),
        "kind": first.kind,
        "first_step_mb": round(first.peak_mb, 1),
        "step_mb": round(statistics.median(steady), 1),
        "step_max_mb": round(max(steady), 1),
        "steady_mb": [round(x, 1) for x in steady],
        "input_mb": round(patches.numel() * patches.element_size() / 2**20, 1),
    }


def measure_memory(spec: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """One memory point in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", THREADS))}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if spec.get("malloc") == "pinned":  # glibc maps/unmaps every block >= 256 KiB: RSS follows the live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = str(PINNED_MMAP_THRESHOLD)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed for {spec}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(
    ns_ips: list[int],
    ns_full: list[int],
    encoder: str,
    device: str,
    mallocs: tuple[str, ...] = ("default", "pinned"),
    chunks: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Memory points, each in a fresh process: IPS and full-batch for every allocator setting, and IPS vs
    ``encode_chunk`` (pinned allocator) at the largest N."""
    specs = []
    for malloc in mallocs if device == "cpu" else ("default",):
        specs += [{"mode": "ips", "n": n, "malloc": malloc} for n in ns_ips]
        specs += [{"mode": "full-batch", "n": n, "malloc": malloc} for n in ns_full]
    for c in chunks or []:  # memory vs encode_chunk at the largest N
        specs.append({"mode": "ips", "n": max(ns_ips), "malloc": "pinned", "overrides": {"encode_chunk": c}})
    rows = []
    for spec in specs:
        r = measure_memory({**spec, "encoder": encoder, "device": device})
        r["encode_chunk"] = spec.get("overrides", {}).get("encode_chunk")
        rows.append(r)
        print(
            f"  memory [{r['malloc']}] {r['mode']:18s} N={r['n']:5d} chunk {r['encode_chunk'] or 'default'}: "
            f"step {r['step_mb']:7.1f} MB {r['steady_mb']}",
            file=sys.stderr,
            flush=True,
        )
    return rows


# -- speed -------------------------------------------------------------------------------------------------------
def time_modes(
    modes: dict[str, dict[str, Any]],
    n: int,
    steps: int,
    repeats: int,
    encoder: str = "resnet18",
    what: str = "step",
    device: str = "cpu",
    quiet_wait: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Seconds per training step (``what="step"``) or per ``ips`` call (``"ips"``), min over rounds of round means."""
    patches, labels = random_batch(n)
    patches, labels = patches.to(device), labels.to(device)
    models = {}
    for name, spec in modes.items():
        overrides, channels_last = _split(spec)
        net, opt = make_model(base_config(encoder, **overrides), channels_last=channels_last)
        net.to(device)
        if what == "step":  # warm-up: one-off allocations, folding, oneDNN kernel choice
            train_step(net, opt, patches, labels)
        else:
            net.ips(patches)
        models[name] = (net, opt)
    rounds: dict[str, list[float]] = {name: [] for name in modes}
    others: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, (net, opt) in models.items():
            for _attempt in range(QUIET_RETRIES + 1 if quiet_wait > 0 else 1):
                if quiet_wait > 0:
                    wait_quiet(quiet_wait)
                if device != "cpu":
                    torch.cuda.synchronize()
                with OthersLoad() as load:
                    start = time.perf_counter()
                    for _ in range(steps):
                        if what == "step":
                            train_step(net, opt, patches, labels)
                        else:
                            net.ips(patches)
                    if device != "cpu":
                        torch.cuda.synchronize()
                    seconds = (time.perf_counter() - start) / steps
                if load.cores < QUIET_CORES:  # else disturbed: measure again (up to QUIET_RETRIES times)
                    break
            rounds[name].append(seconds)
            others[name].append(round(load.cores, 2))
    out = {}
    for name, ts in rounds.items():
        best = min(range(len(ts)), key=ts.__getitem__)
        out[name] = {
            "s": ts[best],
            "median_s": statistics.median(ts),
            "images_per_s": BATCH / ts[best],
            "rounds": ts,
            "others_cores": others[name],  # cores other processes used during each round
            "others_cores_best": others[name][best],
        }
    return out


# -- selection agreement -------------------------------------------------------------------------------------------
def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean per-image ``|A & B| / M`` of the index sets, fraction of images with identical sets)."""
    shared, same = [], []
    for ra, rb in zip(a.tolist(), b.tolist(), strict=True):
        sa, sb = set(ra), set(rb)
        shared.append(len(sa & sb) / len(sa))
        same.append(sa == sb)
    return sum(shared) / len(shared), sum(same) / len(same)


def synthetic_batch(n: int, batch: int, n_signal: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(patches, labels, signal_idx (B, n_signal))``: a few random patches per image carry the label.

    Every patch is uniform noise in [0, 0.5); a signal patch adds a bright bar,
    horizontal (label 0) or vertical (label 1), at a random offset.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, 1, PATCH, PATCH, generator=g) * 0.5
    y = torch.randint(0, 2, (batch,), generator=g)
    where = torch.stack([torch.randperm(n, generator=g)[:n_signal] for _ in range(batch)])
    for b in range(batch):
        for p in where[b].tolist():
            o = int(torch.randint(4, PATCH - 10, (1,), generator=g))
            if y[b] == 0:
                x[b, p, 0, o : o + 6, 4:-4] += 0.5
            else:
                x[b, p, 0, 4:-4, o : o + 6] += 0.5
    return x, y, where


def train_briefly(steps: int, n: int, n_signal: int, encoder: str = "resnet18") -> tuple[dict, float, float]:
    """Train the default model on the synthetic task; returns (state dict, accuracy of the last 20 steps, seconds)."""
    net, _ = make_model(base_config(encoder, n_class=2))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.01)
    hits: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        x, y, _ = synthetic_batch(n, BATCH, n_signal, seed=1000 + step)
        net.train()
        logits = library_train_step(net, x, {"label": y}, opt, UNCLIPPED, net.device)[0]["label"]
        hits.append(float((logits.argmax(1) == y).float().mean()))
    return net.state_dict(), sum(hits[-20:]) / len(hits[-20:]), time.perf_counter() - start


def selections(state: dict | None, n_class: int, batches: list[torch.Tensor], encoder: str) -> dict[str, torch.Tensor]:
    """Kept indices ``(images, M)`` of every mode in ``AGREE_PAIRS``, all with the same weights."""
    out = {}
    for name in dict.fromkeys(m for pair in AGREE_PAIRS for m in pair):
        overrides, channels_last = _split(MODES[name])
        cfg = base_config(encoder, n_class=n_class, **overrides)
        net, _ = make_model(cfg, channels_last=channels_last, state=state)
        net.train()  # as in a training step; ips() switches to eval mode itself
        out[name] = torch.cat([net.ips(x)[1] for x in batches])
    return out


def _agree_row(weights: str, sel: dict[str, torch.Tensor], signal: torch.Tensor | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"weights": weights, "pairs": {}}
    for a, b in AGREE_PAIRS:
        shared, same = agreement(sel[a], sel[b])
        row["pairs"][f"{a} vs {b}"] = {"shared": shared, "identical": same}
    if signal is not None:  # fraction of the label-carrying patches each mode keeps
        row["signal_recall"] = {}
        for name, kept in sel.items():
            found = [len(set(s) & set(k)) / len(s) for s, k in zip(signal.tolist(), kept.tolist(), strict=True)]
            row["signal_recall"][name] = sum(found) / len(found)
    return row


def agreement_table(n: int, n_images: int, train_steps: int, encoder: str = "resnet18") -> dict[str, Any]:
    n_batches = max(1, n_images // BATCH)
    result: dict[str, Any] = {"n": n, "images": n_batches * BATCH, "rows": []}
    batches = [random_batch(n, BATCH, seed=100 + i)[0] for i in range(n_batches)]
    result["rows"].append(_agree_row("random init, uniform-noise patches", selections(None, 10, batches, encoder)))
    if train_steps > 0:
        n_train, n_signal = 16, 2
        state, acc, seconds = train_briefly(train_steps, n_train, n_signal, encoder)
        result["training"] = {
            "steps": train_steps,
            "n": n_train,
            "n_signal": n_signal,
            "train_accuracy_last20": acc,
            "seconds": round(seconds, 1),
        }
        for k in (n_signal, M):
            data = [synthetic_batch(n, BATCH, k, seed=5000 + i) for i in range(n_batches)]
            sel = selections(state, 2, [x for x, _, _ in data], encoder)
            signal = torch.cat([w for _, _, w in data])
            result["rows"].append(_agree_row(f"trained, {k} signal patches / image", sel, signal))
    return result


# -- exploration -------------------------------------------------------------------------------------------------------
def explore(n: int, chunks: list[int], steps: int, repeats: int, encoder: str, quiet_wait: float) -> list[dict]:
    """Seconds per ``ips()`` call of the library's FoldedEncoder over dtype x channels_last x encode_chunk."""
    modes: dict[str, dict[str, Any]] = {}
    for dtype, cl, c in itertools.product(("float32", "bfloat16"), (True, False), chunks):
        modes[f"{dtype}|{cl}|{c}"] = {"ips_dtype": dtype, "channels_last": cl, "encode_chunk": c}
    times = time_modes(modes, n, steps, repeats, encoder, what="ips", quiet_wait=quiet_wait)
    rows = []
    for name, t in times.items():
        dtype, cl, c = name.split("|")
        rows.append({"ips_dtype": dtype, "channels_last": cl == "True", "encode_chunk": int(c), **t})
    return rows


def components(n: int, repeats: int, encoder: str) -> dict[str, float]:
    """Seconds of each part of a training step (fastest of ``repeats``), and of AdamW variants."""
    patches, labels = random_batch(n)

    def best(fn) -> float:
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
        return min(ts)

    out: dict[str, float] = {}
    for name in ("reference", "default", "default + bfloat16"):
        overrides, channels_last = _split(MODES[name])
        net, opt = make_model(base_config(encoder, **overrides), channels_last=channels_last)
        train_step(net, opt, patches, labels)
        out[f"ips(): {name}"] = best(lambda net=net: net.ips(patches))
    net.train()
    mem_patch, mem_idx = net.ips(patches)

    def fwd_bwd() -> None:
        loss = F.cross_entropy(net(mem_patch, mem_idx), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    out["forward + backward on the M kept patches"] = best(fwd_bwd)
    out["clip_grad_norm_"] = best(lambda: torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0))
    out["optimizer.step() of train.make_optimizer"] = best(opt.step)
    for label, kw in (("foreach=False", {"foreach": False}), ("foreach=True", {"foreach": True}), ("fused=True", {})):
        kw = {"fused": True} if label == "fused=True" else kw
        other = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.1, **kw)
        other.step()
        out[f"AdamW({label}).step()"] = best(other.step)
    return out


# -- report ---------------------------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _mb(r: dict[str, Any] | None, key: str = "step_mb") -> str:
    return "-" if r is None else f"{r[key]:.1f}"


def _memory_md(res: dict[str, Any]) -> list[str]:
    out = [
        "## Peak memory of a training step vs N",
        "",
        "MB a step adds to the process's peak (`PeakMemory`: growth of peak RSS on the CPU), each point in a fresh "
        "process, the input batch allocated before. *step* = median of three steady-state steps that follow a first "
        "step; *first* = that first step, which also allocates the one-off AdamW moments, gradients and folded "
        "encoder copy. *glibc* = the default allocator, which keeps freed blocks and so carries some history (the "
        "three steps can differ by 10-20 MB); *pinned* = `MALLOC_MMAP_THRESHOLD_="
        f"{PINNED_MMAP_THRESHOLD}`: every block of 256 KiB or more is mapped on allocation and unmapped on free, "
        "so RSS follows the live tensors (deterministic). Full-batch = `memory_size = N` (every patch encoded with "
        "gradients).",
        "",
    ]
    by = {(r["malloc"], r["mode"], r["n"]): r for r in res["memory"]}
    mallocs = [a for a in ("default", "pinned") if any(r["malloc"] == a for r in res["memory"])]
    ns = sorted({r["n"] for r in res["memory"]})
    label = {"default": "glibc", "pinned": "pinned"}
    header = ["N", "input MB"]
    for a in mallocs:
        header += [f"IPS step ({label[a]})", f"IPS first ({label[a]})", f"full-batch step ({label[a]})"]
    rows = []
    for n in ns:
        any_row = next(r for r in res["memory"] if r["n"] == n)
        row = [n, f"{any_row['input_mb']:.1f}"]
        for a in mallocs:
            ips = by.get((a, "ips", n))
            row += [_mb(ips), _mb(ips, "first_step_mb"), _mb(by.get((a, "full-batch", n)))]
        rows.append(row)
    out += [_md_table(header, rows), ""]
    if res.get("memory_vs_chunk"):
        rows = [[r["encode_chunk"], f"{r['step_mb']:.1f}"] for r in res["memory_vs_chunk"]]
        n = res["memory_vs_chunk"][0]["n"]
        out += [f"IPS step memory vs encode_chunk at N = {n} (pinned allocator, MB):", ""]
        out += [_md_table(["encode_chunk", "IPS step MB"], rows), ""]
    for name, t in res["memory_target"].items():
        out.append(
            f"* IPS N={t['n_hi']} / N={t['n_lo']} ({name}): {t['ratio']:.2f}x "
            f"(target <= 1.15x: {'met' if t['met'] else 'NOT met'})."
        )
    return out


def _speed_md(res: dict[str, Any]) -> list[str]:
    sp = res["speed"]
    out = [
        f"## Speed of a training step at N = {sp['n']}",
        "",
        f"{sp['steps']} steps per round, {sp['repeats']} rounds, modes round-robin, after a warm-up step; s/step = "
        "the fastest round (median in brackets); speed-up = reference's fastest round / the mode's (in brackets: "
        "median over rounds of the ratio within a round, robust to the machine's speed drifting between rounds); "
        "*others* = cores other processes kept busy during that round. "
        "Agreement = shared fraction of kept indices with the mode in brackets, random init / trained model "
        "(2 signal patches).",
        "",
    ]
    rows_by_weight = res["agreement"]["rows"] if "agreement" in res else []
    rows = []
    for name, t in sp["modes"].items():
        agree = "-"
        for a, b in AGREE_PAIRS:
            if a == name:
                vals = [f"{r['pairs'][f'{a} vs {b}']['shared']:.3f}" for r in rows_by_weight[:2]]
                agree = (" / ".join(vals) + f" ({b})") if vals else "-"
        rows.append(
            [
                name,
                f"{t['s']:.3f} ({t['median_s']:.3f})",
                f"{t['images_per_s']:.1f}",
                f"{t['speedup']:.2f}x ({t['speedup_paired']:.2f}x)",
                f"{t['others_cores_best']:.2f}",
                agree,
            ]
        )
    out += [_md_table(["mode", "s/step", "images/s", "speed-up", "others", "agreement"], rows), ""]
    if res["quick"]:
        out.append("(Smoke run: N = 64, one round; the targets below are defined for the full run at N = 256.)")
    for name, t in res["speed_targets"].items():
        out.append(
            f"* {name} >= {t['target']}x reference: {t['speedup']:.2f}x, paired {t['speedup_paired']:.2f}x "
            f"({'met' if t['met'] else 'NOT met'})."
        )
    out += ["", "Modes:", ""] + [f"* *{k}*: {v}" for k, v in MODE_NOTES.items() if k in sp["modes"]]
    return out


def _agreement_md(res: dict[str, Any]) -> list[str]:
    ag = res["agreement"]
    out = [
        f"## Selection agreement at N = {ag['n']} ({ag['images']} images)",
        "",
        "*shared* = mean over images of |A & B| / M of the kept index sets; *identical* = fraction of images whose "
        "sets are equal. Random-init attention scores are nearly uniform, so near-ties flip under bfloat16 rounding; "
        "the trained rows are the realistic case.",
        "",
    ]
    pairs = [f"{a} vs {b}" for a, b in AGREE_PAIRS]
    rows = [
        [r["weights"]] + [f"{r['pairs'][p]['shared']:.3f} / {r['pairs'][p]['identical']:.3f}" for p in pairs]
        for r in ag["rows"]
    ]
    out += [_md_table(["weights"] + [f"{p} (shared / identical)" for p in pairs], rows)]
    if "training" in ag:
        t = ag["training"]
        recall = [
            f"{r['weights']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["signal_recall"].items())
            for r in ag["rows"]
            if "signal_recall" in r
        ]
        out += [
            "",
            f"Trained model: {t['steps']} AdamW steps (lr 3e-4, batch {BATCH}) of the default model at N = {t['n']} "
            f"with {t['n_signal']} signal patches per image (noise plus a bright bar whose orientation is the label, "
            f"2 classes), {t['seconds']} s; training accuracy over the last 20 steps "
            f"{t['train_accuracy_last20']:.2f}. Evaluated on fresh images at N = {ag['n']}. Signal recall (fraction "
            "of the label-carrying patches kept): " + "; ".join(recall) + ".",
        ]
    return out


def _explore_md(res: dict[str, Any]) -> list[str]:
    ex = res["explore"]
    # rows of the library's fold only (a results file merged by --only may hold rows of an older prototype)
    ex_rows = [r for r in ex["rows"] if r.get("fold", "library") == "library"]
    chunks = sorted({r["encode_chunk"] for r in ex_rows})
    table = {(r["ips_dtype"], r["channels_last"], r["encode_chunk"]): r for r in ex_rows}
    out = [
        f"## The no-grad pass: s per ips() call at N = {ex['n']}",
        "",
        "encode_chunk = patches per encoder call in total across the batch (batch 8: chunk / 8 per image); "
        "`FoldedEncoder` as shipped (channels_last is its constructor argument). Fastest of the rounds.",
        "",
    ]
    rows = []
    for dtype, cl in sorted({k[:2] for k in table}, key=lambda k: (k[0] != "float32", not k[1])):
        rows.append([dtype, "on" if cl else "off"] + [f"{table[(dtype, cl, c)]['s']:.3f}" for c in chunks])
    out += [_md_table(["ips_dtype", "channels_last"] + [str(c) for c in chunks], rows)]
    busiest = max(r["others_cores_best"] for r in ex_rows)
    out += ["", f"Other processes used at most {busiest:.2f} cores during the rounds reported."]
    return out


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = [
        f"# IPS benchmark{' (quick)' if res['quick'] else ''}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {', '.join(m['isa']) or '-'}; "
        f"torch {m['torch']}, {m['threads']} threads; device {res['device']}"
        + (f" ({m['cuda']})" if m["cuda"] and res["device"] != "cpu" else "")
        + f"; {res['seconds']:.0f} s in all.",
        "",
        "Parts: "
        + "; ".join(
            f"{k} at {v['when']} ({v['seconds']:.0f} s, load average {v['load_start'][:1]} -> {v['load_end'][:1]})"
            for k, v in res.get("parts", {}).items()
        )
        + ".",
        "",
        f"Setting: {res['encoder']} encoder, batch {BATCH}, 1x{PATCH}x{PATCH} patches, M = I = {M}; a training step = "
        "ips + forward + backward + gradient clipping + AdamW step, as `ips_search.train.train_one_epoch` does it "
        "(`make_optimizer`, `grad_clip=1.0`).",
        "",
    ]
    if "memory" in res:
        out += _memory_md(res) + [""]
    if "speed" in res:
        out += _speed_md(res) + [""]
    if "agreement" in res:
        out += _agreement_md(res) + [""]
    if res.get("explore"):
        out += [""] + _explore_md(res)
    if res.get("components"):
        out += ["", f"## Parts of a step (s, fastest of {res['components_repeats']}, N = {res['speed']['n']})", ""]
        out += [_md_table(["part", "s"], [[k, f"{v:.4f}"] for k, v in res["components"].items()])]
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    res: dict[str, Any] = {
        "quick": args.quick,
        "device": args.device,
        "encoder": args.encoder,
        "machine": machine_info(),
        "load_start": load_average(),
    }
    if args.quick:
        ns_ips, ns_full, mallocs = [16, 64, 256], [16, 64], ("pinned",)
        n_speed, steps, repeats, train_steps, n_images, chunks = 64, 1, 1, 0, 8, []
        modes = {k: MODES[k] for k in ("reference", "default", "default + bfloat16")}
    else:
        ns_ips = [16, 32, 64, 128, 256, 512, 1024]
        ns_full, mallocs = [n for n in ns_ips if n <= args.full_max], ("default", "pinned")
        n_speed, steps, repeats, train_steps, n_images = 256, args.steps, args.repeats, args.train_steps, 64
        chunks = [] if args.no_explore else [32, 64, 128, 256, 512, 2048]
        modes = MODES
    wait = 0.0 if args.quick else args.quiet_wait

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {msg}", file=sys.stderr, flush=True)

    parts = args.only.split(",") if args.only else ["memory", "speed", "agreement", "explore"]
    res["parts"] = {}
    for part in parts:
        if part == "explore" and not chunks:
            continue
        say(f"{part} ...")
        load0, t0 = load_average(), time.perf_counter()
        if part == "memory":
            run_memory(res, ns_ips, ns_full, args, mallocs, chunks)
        elif part == "speed":
            run_speed(res, modes, n_speed, steps, repeats, args, wait)
        elif part == "agreement":
            res["agreement"] = agreement_table(n_speed, n_images, train_steps, args.encoder)
        elif part == "explore":
            rows = explore(n_speed, chunks, max(1, steps // 2), repeats, args.encoder, wait)
            res["explore"] = {"n": n_speed, "rows": rows}
            res["components"], res["components_repeats"] = components(n_speed, repeats, args.encoder), repeats
        else:
            raise SystemExit(f"unknown part {part!r}; choose from memory, speed, agreement, explore")
        res["parts"][part] = {
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": round(time.perf_counter() - t0, 1),
            "load_start": load0,
            "load_end": load_average(),
        }
    res["load_end"] = load_average()
    res["seconds"] = time.perf_counter() - start
    say("done")
    return res


def run_memory(
    res: dict[str, Any],
    ns_ips: list[int],
    ns_full: list[int],
    args: argparse.Namespace,
    mallocs: tuple[str, ...],
    chunks: list[int],
) -> None:
    rows = memory_table(ns_ips, ns_full, args.encoder, args.device, mallocs, chunks)
    res["memory"] = [r for r in rows if r["encode_chunk"] is None]
    res["memory_vs_chunk"] = [r for r in rows if r["encode_chunk"] is not None]
    res["memory_target"] = {}
    for a in mallocs:
        ips = {r["n"]: r["step_mb"] for r in res["memory"] if r["mode"] == "ips" and r["malloc"] == a}
        if 64 not in ips or len(ips) < 2:
            continue
        n_lo, n_hi = 64, max(ips)
        ratio = ips[n_hi] / ips[n_lo] if ips[n_lo] > 0 else float("inf")
        name = f"ips, {'glibc' if a == 'default' else 'pinned'}"
        res["memory_target"][name] = {"n_lo": n_lo, "n_hi": n_hi, "ratio": ratio, "met": ratio <= 1.15}


def run_speed(
    res: dict[str, Any],
    modes: dict[str, dict[str, Any]],
    n_speed: int,
    steps: int,
    repeats: int,
    args: argparse.Namespace,
    wait: float,
) -> None:
    times = time_modes(modes, n_speed, steps, repeats, args.encoder, device=args.device, quiet_wait=wait)
    res["speed"] = {"n": n_speed, "steps": steps, "repeats": repeats, "modes": times}
    ref = times["reference"]
    for t in times.values():  # the fastest rounds' ratio, and the median of the per-round ratios (robust to drift)
        t["speedup"] = ref["s"] / t["s"]
        t["speedup_paired"] = statistics.median(r / m for r, m in zip(ref["rounds"], t["rounds"], strict=True))
    res["speed_targets"] = {
        name: {
            "target": target,
            "speedup": times[name]["speedup"],
            "speedup_paired": times[name]["speedup_paired"],
            "met": min(times[name]["speedup"], times[name]["speedup_paired"]) >= target,
        }
        for name, target in SPEED_TARGETS.items()
        if name in times
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (< 60 s), for a smoke test")
    p.add_argument("--out", default="benchmarks/results/", help="folder for bench_ips[_quick].json and .md")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (the fastest is reported)")
    p.add_argument("--train-steps", type=int, default=150, help="steps of the briefly trained model (0: skip)")
    p.add_argument("--full-max", type=int, default=256, help="largest N for the full-batch baseline")
    p.add_argument("--no-explore", action="store_true", help="skip the encode_chunk / channels_last sweep")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each timed round wait up to this many s for an idle CPU, and re-measure disturbed rounds",
    )
    p.add_argument("--only", help="comma-separated parts to run: memory,speed,agreement,explore (default: all)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(json.loads(args.worker))))
        return 0
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_ips_quick" if args.quick else "bench_ips"
    if args.only and (out / f"{stem}.json").exists():  # update those parts of the earlier run
        merged = json.loads((out / f"{stem}.json").read_text())
        parts = {**merged.get("parts", {}), **res["parts"]}
        merged.update(res)
        merged["parts"], merged["seconds"] = parts, sum(p["seconds"] for p in parts.values())
        res = merged
    md = to_markdown(res)
    print(md)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
