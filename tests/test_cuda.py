"""The CUDA paths, on a real GPU: selection, loading modes, bfloat16, peak memory and AMP training.

Skipped without CUDA (CI has none). Fractional GPUs under Ray are covered by
``test_scale.py::test_four_trials_share_one_logical_gpu_concurrently``, which
trains on the GPU when there is one.
"""

from __future__ import annotations

import pytest
import torch
from reference import agreement, as_sets, bar_batch, bar_net, notebook_ips

from ips_search import IPSConfig, IPSNet
from ips_search.config import TrainConfig
from ips_search.memory import PeakMemory
from ips_search.train import evaluate, make_optimizer, make_scheduler, train_one_epoch, train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 convolutions and matmuls round differently per batch shape; the notebook comparison needs float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _resnet(M: int, I: int, **kw) -> IPSNet:
    torch.manual_seed(0)
    return IPSNet(IPSConfig(memory_size=M, iteration_size=I, patch_size=32, n_chan=1, **kw)).to(CUDA)


@pytest.mark.parametrize(("N", "M", "I"), [(25, 5, 5), (30, 4, 7), (20, 5, 17), (256, 4, 4)])
@pytest.mark.parametrize("loading", ["eager", "eager-sequential", "lazy"])
def test_gpu_selection_matches_the_notebook_loop(N, M, I, loading):
    net = _resnet(M, I, loading=loading, encode_chunk=64)
    net.train()
    net.encode(torch.rand(32, 1, 32, 32, device=CUDA) * 3)  # move BatchNorm statistics off their init
    host = torch.rand(2, N, 1, 32, 32).pin_memory()
    expected = as_sets(notebook_ips(net, host.to(CUDA), M, I))
    mem_patch, mem_idx = net.ips(host)
    assert mem_patch.device.type == mem_idx.device.type == "cuda"
    assert as_sets(mem_idx) == expected
    for b in range(2):  # the returned patches are the ones the indices name
        assert torch.equal(mem_patch[b].cpu(), host[b, mem_idx[b].cpu()])


def test_gpu_and_cpu_choose_the_same_patches():
    net = _resnet(8, 8)
    patches = torch.rand(2, 128, 1, 32, 32)
    _, on_gpu = net.ips(patches)
    _, on_cpu = net.cpu().ips(patches)
    assert agreement(on_gpu, on_cpu) >= 0.99


def test_bfloat16_selection_agrees_with_float32():
    net = _resnet(4, 4)
    patches = torch.rand(8, 256, 1, 32, 32, device=CUDA)
    _, f32 = net.ips(patches)
    net.cfg.ips_dtype = "bfloat16"
    net._fold_tried, net._folded = False, None  # refold into a bfloat16 copy
    _, bf16 = net.ips(patches)
    share = agreement(f32, bf16)
    print(f"bfloat16 / float32 agreement on the GPU: {share:.3f}")
    assert share >= 0.95


def _step_mb(N: int, full: bool) -> float:
    """Peak CUDA memory of one training step (after a warm-up step), batch 8, ResNet-18, M = I = 4."""
    net = _resnet(N if full else 4, 4, encode_chunk=256)
    cfg = TrainConfig()
    opt = make_optimizer(net, cfg)
    patches, labels = torch.rand(8, N, 1, 32, 32, device=CUDA), torch.randint(0, 10, (8,), device=CUDA)

    def step() -> None:
        net.train()
        train_step(net, patches, {"label": labels}, opt, cfg, CUDA)

    step()
    with PeakMemory(CUDA) as mem:
        step()
    assert mem.kind == "cuda"
    return mem.peak_mb


def test_ips_step_memory_is_flat_in_n_on_the_gpu():
    ips_64, ips_1024 = _step_mb(64, full=False), _step_mb(1024, full=False)
    full_16, full_256 = _step_mb(16, full=True), _step_mb(256, full=True)
    print(f"CUDA step MB: ips N=64 {ips_64:.1f}, N=1024 {ips_1024:.1f}; full N=16 {full_16:.1f}, N=256 {full_256:.1f}")
    assert ips_64 > 0
    assert ips_1024 <= 1.15 * ips_64, (ips_64, ips_1024)  # the target, exact on the caching allocator
    assert full_256 > 4 * full_16 and full_256 > 4 * ips_1024, (full_16, full_256, ips_1024)


def test_amp_training_on_the_gpu_learns_and_reports_cuda_memory():
    """The one-bright-bar task of test_train.py, in bfloat16 autocast on the GPU."""
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, lr=3e-3, warmup_epochs=0.1, weight_decay=0.0, amp=True)
    train, test = [bar_batch(16) for _ in range(120)], [bar_batch(64)]
    net = bar_net().to(CUDA)
    opt = make_optimizer(net, cfg)
    out = train_one_epoch(net, train, opt, make_scheduler(opt, cfg, len(train)), cfg, CUDA)
    after = evaluate(net, test, CUDA, amp=True)
    assert out["memory_kind"] == "cuda" and out["peak_memory_mb"] > 0
    assert after["accuracy"] >= 0.9, after


def test_selection_runs_outside_amp_in_training_and_evaluation():
    """AMP covers the gradient pass only: IPS chooses patches in its own dtype (``ips_dtype``) in both loops."""
    net = _resnet(4, 4)
    seen: list[bool] = []
    ips = net.ips

    def recording_ips(patches):
        seen.append(torch.is_autocast_enabled("cuda"))
        return ips(patches)

    net.ips = recording_ips
    data = [(torch.rand(2, 16, 1, 32, 32), {"label": torch.tensor([0, 1])})]
    cfg = TrainConfig(amp=True)
    opt = make_optimizer(net, cfg)
    train_one_epoch(net, data, opt, make_scheduler(opt, cfg, 1), cfg, CUDA)
    evaluate(net, data, CUDA, amp=True)
    assert seen == [False, False]
