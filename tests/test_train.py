"""The training loop's parts: optimiser, learning-rate schedule, one epoch on a learnable task."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from reference import bar_batch, bar_net
from sklearn.metrics import roc_auc_score
from torch import nn

from ips_search.config import Task, TrainConfig
from ips_search.data import build_datasets
from ips_search.space import load_space
from ips_search.train import (
    _Metrics,
    evaluate,
    fit,
    make_optimizer,
    make_scheduler,
    task_losses,
    train_one_epoch,
)


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


def _short_default_run(seed: int, orient: bool) -> float:
    """3 epochs of the default space's best config (P=32, M=I=8, lr 1.2e-3) on 600 of its canvases, warm-started;
    the validation accuracy after the last epoch (10 classes: chance is 0.1)."""
    base = load_space("default").base_config()
    exp = dataclasses.replace(
        base,
        # unshifted, as when the seeds' figures below were measured
        data=dataclasses.replace(base.data, patch_size=32, n_train=600, n_test=100, augment_shift=0),
        model=dataclasses.replace(base.model, memory_size=8, iteration_size=8, orient_scores=orient),
        train=dataclasses.replace(base.train, epochs=3, lr=1.2e-3, seed=seed),
    )
    return fit(exp, build_datasets(exp.data), torch.device("cpu"))["val"]["accuracy"]


def test_short_training_on_the_default_data_learns_and_needs_oriented_heads(cache_dir):
    """Seed 1 is one of the 4 in 8 whose random heads score the blank canvas first (docs/ips.md): unoriented it stays at
    chance, oriented it learns like the others (0.64-0.75 for seeds 0-7 when measured)."""
    assert _short_default_run(seed=1, orient=True) >= 0.45
    assert _short_default_run(seed=1, orient=False) <= 0.2


def test_metrics_per_task_accuracy_multilabel_and_auc():
    """Accuracy for a softmax task, element-wise accuracy and macro AUC for a multi-label one, AUC for a binary one,
    on predictions whose answers are worked out by hand."""
    tasks = (Task("digit", 3), Task("binary", 2), Task("tags", 2, multi_label=True))
    metrics = _Metrics(tasks)
    logits = {
        "digit": torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]]),  # predicts 0, 1, 2, 0
        "binary": torch.tensor([[0.0, 0.1], [0, 0.9], [0, 0.4], [0, 0.2]]),  # all predict 1; P(1) ranks 4, 1, 2, 3
        "tags": torch.tensor([[3.0, -3], [3, 3], [-3, -3], [-3, 3]]),
    }
    targets = {
        "digit": torch.tensor([0, 1, 2, 1]),  # 3 of 4 right
        "binary": torch.tensor([0, 1, 0, 1]),  # positives rank 1st and 3rd of 4 by P(1): 3 of 4 pairs right
        "tags": torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1]]),  # 7 of 8 label bits right
    }
    metrics.update(logits, targets, loss=2.0)
    out = metrics.result()
    assert out["digit/accuracy"] == 0.75
    assert out["digit/balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)  # recall per class: 1, 1/2, 1
    digit_prob = torch.softmax(logits["digit"], -1).numpy()
    assert out["digit/auc"] == pytest.approx(
        roc_auc_score(targets["digit"].numpy(), digit_prob, multi_class="ovr", average="macro")
    )
    assert out["binary/accuracy"] == 0.5 and out["binary/auc"] == pytest.approx(0.75)
    assert out["tags/accuracy"] == 0.875
    assert out["tags/auc"] == pytest.approx((1.0 + 5 / 6) / 2)  # tag 0 separable; tag 1: 2 pairs right, 1 tied
    assert out["accuracy"] == pytest.approx((0.75 + 0.5 + 0.875) / 3) and out["loss"] == 2.0
    losses = task_losses(logits, targets, tasks)
    assert losses["tags"] == pytest.approx(F.binary_cross_entropy_with_logits(logits["tags"], targets["tags"].float()))
    assert losses["digit"] == pytest.approx(F.cross_entropy(logits["digit"], targets["digit"]))
