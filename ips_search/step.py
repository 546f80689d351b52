"""One IPS training step: no-grad selection of the M patches, the gradient pass over them, the loss of every task,
backward and the optimiser step. Shared by the training loop (:mod:`ips_search.train`) and the memory prediction
(:mod:`ips_search.prediction`), which meters this same step on fake tensors.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ips_search.config import Task, TrainConfig
from ips_search.model import IPSNet


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (usually: learning rate too high)."""


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where torch has it (CUDA; CPU since torch 2.4): on CPU the per-tensor
    loop of the default implementation cost ResNet-18 ~5x the fused step (``benchmarks/bench_ips.py``)."""
    params = list(model.parameters())
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without fused kernels
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def as_task_dict(logits: torch.Tensor | dict[str, torch.Tensor], tasks: tuple[Task, ...]) -> dict[str, torch.Tensor]:
    return logits if isinstance(logits, dict) else {tasks[0].name: logits}


def task_losses(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], tasks: tuple[Task, ...]):
    """Per-task losses: CE for softmax tasks, BCE-with-logits for multi-label ones."""
    out = {}
    for task in tasks:
        z, y = logits[task.name].float(), targets[task.name]
        out[task.name] = F.binary_cross_entropy_with_logits(z, y.float()) if task.multi_label else F.cross_entropy(z, y)
    return out


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: IPSNet,
    patches: Any,
    targets: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], float]:
    """One IPS training step: no-grad selection, gradient pass over the M kept patches, backward, optimiser step.

    ``patches`` is whatever :meth:`IPSNet.ips` takes (``(B, N, C, P, P)``); ``targets`` are on ``device``.
    Returns the per-task logits and the loss. The scheduler is the caller's (it steps per batch).
    """
    tasks = model.cfg.tasks
    mem_patch, mem_idx = model.ips(patches)  # (B, M, C, P, P), (B, M); no grad
    with autocast(device, cfg.amp):
        logits = as_task_dict(model(mem_patch, mem_idx), tasks)
        loss = sum(task_losses(logits, targets, tasks).values())
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(f"loss is {value}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return logits, value
