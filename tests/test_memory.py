"""PeakMemory measures real allocations, region by region; IPS's step memory is flat in N.

Nothing here is timed. The IPS-vs-N checks run each point in a fresh interpreter,
with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so that large
tensors are mapped and unmapped on allocation and free: peak RSS then follows the
live tensors rather than what malloc happens to cache, and the comparison is
robust to allocator history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ips_search.memory import PeakMemory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-region peak RSS needs Linux /proc")


def _touch(mb: int) -> torch.Tensor:
    return torch.ones(mb * 2**20 // 4)  # float32, every page written


@linux_only
def test_cpu_region_sees_a_big_allocation():
    with PeakMemory("cpu") as mem:
        big = _touch(200)
        inside = mem.read()
    assert mem.kind == "cpu-rss"
    assert mem.peak_mb >= 150, mem.peak_mb
    assert inside >= 150  # read() works inside the region too
    del big


@linux_only
def test_regions_are_measured_independently():
    with PeakMemory("cpu") as big:
        x = _touch(200)
        del x
    with PeakMemory("cpu") as small:
        y = torch.ones(1000)
        del y
    with PeakMemory("cpu") as medium:  # below the earlier peak: a lifetime peak would report 0 here
        z = _touch(60)
        del z
    assert big.peak_mb >= 150, big.peak_mb
    assert small.peak_mb < 20, small.peak_mb
    assert 40 <= medium.peak_mb < 150, medium.peak_mb
    assert small.kind == medium.kind == "cpu-rss"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_region_measures_a_cuda_allocation():
    device = torch.device("cuda")
    keep = torch.ones(2**20, device=device)  # allocated before: not counted
    with PeakMemory(device) as mem:
        x = torch.ones(64 * 2**20 // 4, device=device)  # 64 MB
        del x
    with PeakMemory(device) as small:
        y = torch.ones(1000, device=device)
        del y
    assert mem.kind == small.kind == "cuda"
    assert 60 <= mem.peak_mb < 80, mem.peak_mb
    assert small.peak_mb < 1, small.peak_mb
    del keep


# One training step (``train.train_step``: ips + forward + backward + AdamW, no clipping) in a fresh interpreter,
# after a warm-up step (which allocates the one-off AdamW state, gradients and folded encoder); the patches exist
# before the region. Prints {"step": MB, "kind": ...}.
_WORKER = r"""
import json, sys
import torch
from ips_search import IPSConfig, IPSNet
from ips_search.config import TrainConfig
from ips_search.memory import PeakMemory
from ips_search.train import train_step

torch.set_num_threads(1)  # memory does not need speed; one thread is immune to a busy machine
n, full = int(sys.argv[1]), sys.argv[2] == "full"
B = 2
cfg = IPSConfig(encoder="small-cnn", dim=64, d_inner=128, n_chan=1, patch_size=32, memory_size=n if full else 4,
                iteration_size=4, encode_chunk=64)
torch.manual_seed(0)
net = IPSNet(cfg)
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
train = TrainConfig(lr=1e-4, grad_clip=None)
patches, targets = torch.rand(B, n, 1, 32, 32), {"label": torch.randint(0, 10, (B,))}
cpu = torch.device("cpu")
net.train()
train_step(net, patches, targets, opt, train, cpu)
with PeakMemory("cpu") as mem:
    train_step(net, patches, targets, opt, train, cpu)
print(json.dumps({"step": mem.peak_mb, "kind": mem.kind}))
"""


def _step_mb(n: int, mode: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "262144", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(n), mode], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kind"] == "cpu-rss"
    return out["step"]


@linux_only
def test_ips_step_memory_is_flat_in_n_while_full_batch_grows():
    ips_64, ips_1024 = _step_mb(64, "ips"), _step_mb(1024, "ips")
    full_16, full_256 = _step_mb(16, "full"), _step_mb(256, "full")
    assert ips_64 > 0
    assert ips_1024 <= 1.3 * ips_64 + 15, (ips_64, ips_1024)  # 16x the patches, about the same memory
    assert full_256 > 2 * full_16, (full_16, full_256)  # every patch kept with its activations
    assert full_256 > 4 * ips_1024 + 10, (full_256, ips_1024)  # a quarter of the patches, far more memory
