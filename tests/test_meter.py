"""StorageMeter counts live tensor storages exactly, deterministically, with CPU or CUDA-allocator rounding."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

from ips_search.meter import StorageMeter, cuda_block_bytes, tensor_bytes, training_state

F32 = 4  # bytes per float32


def _linear_sgd_step(meter_rounding) -> tuple[StorageMeter, int]:
    """The meter of one step, and the bytes alive at its end (the model dies, and is uncounted, on return)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, foreach=False)  # plain SGD: updates in place, no state
    x = torch.randn(2, 4)
    with StorageMeter("cpu", meter_rounding) as meter:
        meter.register([lin.weight, lin.bias, x])
        loss = lin(x).sum()
        loss.backward()
        opt.step()
        del loss
        return meter, meter.current_bytes


def test_linear_sgd_step_matches_the_hand_count():
    meter, end = _linear_sgd_step(tensor_bytes)
    weight, bias, x = 12 * F32, 3 * F32, 8 * F32  # (3, 4), (3,), (2, 4): registered at entry
    y, loss, seed_grad = 6 * F32, 1 * F32, 1 * F32  # addmm output (2, 3); the sum; backward's ones_like(loss)
    grads = weight + bias  # (3, 4) from the mm, (3,) from the sum over the batch; the step updates in place
    # y dies once the sum is taken (the sum's backward keeps only its shape); at the end of backward the loss, its
    # seed gradient and both new gradients are alive together: the peak
    assert meter.peak_bytes == weight + bias + x + loss + seed_grad + grads
    assert meter.peak_bytes > weight + bias + x + y + loss  # the forward's high point is lower
    assert end == weight + bias + x + grads  # the loss freed; the gradients stay
    assert meter.current_bytes == 0  # after return: all of it died


def test_cuda_rounding_books_every_storage_as_whole_512_byte_blocks():
    meter, end = _linear_sgd_step(cuda_block_bytes)
    assert end == 5 * 512  # weight, bias, x and two gradients: each under 512 bytes
    assert meter.peak_bytes == 7 * 512  # + the loss and its seed gradient


def test_cuda_block_bytes_reproduces_the_caching_allocators_round_size():
    assert cuda_block_bytes(0) == 0  # an empty tensor allocates nothing
    assert [cuda_block_bytes(n) for n in (1, 4, 511, 512)] == [512] * 4
    assert [cuda_block_bytes(n) for n in (513, 1024, 1025)] == [1024, 1024, 1536]
    assert cuda_block_bytes(10 * 2**20 + 1) == 10 * 2**20 + 512


def test_views_and_in_place_ops_cost_nothing_and_freed_storages_are_uncounted():
    with StorageMeter("cpu") as meter:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:].view(-1, 10)
        a.add_(1)
        view.mul_(2)
        assert meter.current_bytes == 4000
        b = a * 2  # a new storage
        assert meter.current_bytes == 8000
        del a, view
        assert meter.current_bytes == 4000  # a's storage died with its last view
    assert meter.peak_bytes == 8000
    del b


def test_the_device_filter_ignores_other_devices():
    with StorageMeter("cuda") as meter:
        torch.ones(100)  # a CPU tensor: not what this meter watches
    assert meter.peak_bytes == 0


def test_training_state_lists_weights_gradients_optimiser_state_and_caches():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(net.parameters(), foreach=False)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    net[0].cache = torch.zeros(7)  # a tensor a module keeps as an attribute
    meter = StorageMeter("cpu")
    meter.register(training_state(net, opt))
    params = (12 + 3) + (3 + 3)  # linear weight and bias, BatchNorm weight and bias
    buffers = 3 * F32 + 3 * F32 + 8  # running mean and var, num_batches_tracked (int64)
    adam = 2 * params * F32 + 4 * F32  # two moments, one float32 step count per parameter tensor
    assert meter.current_bytes == 2 * params * F32 + buffers + adam + 7 * F32  # weights + grads + ... + cache


# One metered CPU training step of a tiny IPSNet after a warm-up step, and one fake-tensor estimate.
_WORKER = r"""
import json, torch
from ips_search import IPSConfig, IPSNet
from ips_search.config import ExperimentConfig, DataConfig, TrainConfig
from ips_search.prediction import estimate_step_memory
from ips_search.meter import StorageMeter, training_state
from ips_search.train import make_optimizer, train_step

torch.set_num_threads(1)
cfg = IPSConfig(encoder="small-cnn", dim=32, heads=2, d_k=16, d_v=16, d_inner=64, n_chan=1, patch_size=32,
                memory_size=4, iteration_size=4, encode_chunk=32)
torch.manual_seed(0)
net = IPSNet(cfg)
train = TrainConfig(batch_size=4)
opt = make_optimizer(net, train)
patches, targets = torch.rand(4, 32, 1, 32, 32), {"label": torch.randint(0, 10, (4,))}
cpu = torch.device("cpu")
net.train()
train_step(net, patches, targets, opt, train, cpu)
with StorageMeter("cpu") as meter:
    meter.register(training_state(net, opt))
    meter.register([patches, *targets.values()])
    train_step(net, patches, targets, opt, train, cpu)
exp = ExperimentConfig(data=DataConfig(patch_size=32), model=cfg, train=train)
est = estimate_step_memory(exp, 32, 1, cfg.tasks, "cuda")
print(json.dumps({"cpu_step": meter.peak_bytes, "estimate": est.peak_mb}))
"""


def _worker() -> dict:
    proc = subprocess.run([sys.executable, "-c", _WORKER], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_same_step_gives_the_same_bytes_in_two_processes():
    first, second = _worker(), _worker()
    assert first["cpu_step"] > 0 and first["estimate"] > 0
    assert first == second
