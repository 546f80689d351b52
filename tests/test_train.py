"""The training loop's parts: optimiser, learning-rate schedule, one epoch on a learnable task."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import bar_batch, bar_net
from torch import nn

from ips_search.config import TrainConfig
from ips_search.train import evaluate, make_optimizer, make_scheduler, train_one_epoch


def test_make_optimizer_uses_the_fused_adamw_and_steps_like_the_plain_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = make_optimizer(model, cfg)
    plain = torch.optim.AdamW(twin.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=False, foreach=False)
    if torch.__version__ >= "2.4":  # fused CPU kernels arrived in torch 2.4; older versions fall back
        assert fused.defaults["fused"] is True
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(5):
        for net, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_warms_up_then_decays_to_the_floor():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = TrainConfig(epochs=4, lr=1.0, warmup_epochs=1, min_lr_ratio=0.01)
    sched = make_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0  # linear warm-up over the first epoch
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then monotone cosine decay
    assert lrs[-1] == pytest.approx(0.01, abs=0.01)


def test_one_epoch_learns_a_task_carried_by_one_patch():
    """Label = whether the one bright patch among 16 noise patches is a horizontal or a vertical bar."""
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, lr=3e-3, warmup_epochs=0.1, weight_decay=0.0)
    train, test = [bar_batch(16) for _ in range(120)], [bar_batch(64)]
    net = bar_net()
    opt = make_optimizer(net, cfg)
    before = evaluate(net, test, torch.device("cpu"))
    out = train_one_epoch(net, train, opt, make_scheduler(opt, cfg, len(train)), cfg, torch.device("cpu"))
    after = evaluate(net, test, torch.device("cpu"))
    assert out["images"] == 1920 and out["seconds"] > 0 and out["peak_memory_mb"] >= 0
    assert after["loss"] < before["loss"] and after["accuracy"] >= 0.9, (before, after)
