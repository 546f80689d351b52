"""Training loop for IPSNet: no Ray here (the trainable wraps it).

AdamW with linear warm-up then cosine decay, stepped per batch; one loss per task
(cross-entropy, or BCE for multi-label tasks), summed; metrics per task. Every
epoch returns a flat dict with ``loss``, ``accuracy``, ``balanced_accuracy`` and ``auc`` (means over tasks),
``score`` (the one the evaluation ranks by), per-task ``<task>/<metric>`` (AUC where defined),
``peak_memory_mb`` with its ``memory_kind``, ``seconds`` and ``images_per_s``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ips_search.config import METRICS, ExperimentConfig, Task, TrainConfig
from ips_search.data import DataSplits
from ips_search.data.source import collate_sources, is_patch_source
from ips_search.memory import PeakMemory
from ips_search.model import IPSNet
from ips_search.scores import mean_score, score
from ips_search.step import NonFiniteLossError, as_task_dict, autocast, make_optimizer, task_losses, train_step
from ips_search.warmstart import apply_warm_start, pretrained_encoder_state, supports_warm_start

ORIENT_IMAGES = 16  # training images whose patches orient the attention heads before training


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_loader(dataset: Dataset, cfg: TrainConfig, shuffle: bool, device: torch.device) -> DataLoader:
    """Batches of ``(patches (B, N, C, P, P), {task: (B, ...)})``, or, for a dataset whose items are lazy patch
    sources (detected from its first item), ``(list of B sources, {task: (B, ...)})``: N may then differ per
    image, and ``IPSNet.ips`` reads (and pins) the patches chunk by chunk, so the loader pins nothing."""
    generator = torch.Generator().manual_seed(cfg.seed)
    sources = len(dataset) > 0 and is_patch_source(dataset[0][0])
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        num_workers=cfg.num_workers,
        collate_fn=collate_sources if sources else None,
        pin_memory=device.type == "cuda" and not sources,
        generator=generator,
        drop_last=False,
    )


def build_model(
    exp: ExperimentConfig, splits: DataSplits, device: torch.device, warm_start: bool = True, progress: bool = False
) -> IPSNet:
    """IPSNet for this dataset (tasks, channels and patch size come from the data's geometry), warm-started if asked.

    ``progress`` shows a bar while the warm-start encoder is pretrained (the driver's one-off build; trials only
    load the cached result, so they stay quiet)."""
    model_cfg = splits.geometry.model_config(exp.model)
    torch.manual_seed(exp.train.seed)
    model = IPSNet(model_cfg)
    if warm_start and exp.train.warm_start and supports_warm_start(exp.data):
        apply_warm_start(model.encoder, pretrained_encoder_state(model_cfg, exp.data, progress=progress))
    model.to(device)
    if model_cfg.orient_scores:  # after the warm start: the heads are oriented on the embeddings training starts from
        sample = [splits.train[i][0] for i in range(min(ORIENT_IMAGES, len(splits.train)))]
        model.orient_scores(sample if is_patch_source(sample[0]) else torch.stack(sample))
    return model


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step LR: linear warm-up for ``warmup_epochs``, then cosine decay to ``min_lr_ratio * lr``."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Metrics:
    """Accumulates predictions per task; every metric of :mod:`ips_search.scores` per task at the end, their means
    over tasks, and ``score``: the mean of ``metric``, what the search ranks by."""

    def __init__(self, tasks: tuple[Task, ...], metric: str = "accuracy") -> None:
        self.tasks, self.metric = tasks, metric
        self.scores: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
        self.labels: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
        self.loss_sum, self.n = 0.0, 0

    def update(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], loss: float) -> None:
        batch = next(iter(targets.values())).shape[0]
        self.loss_sum += loss * batch
        self.n += batch
        for task in self.tasks:
            z = logits[task.name].detach().float()
            prob = torch.sigmoid(z) if task.multi_label else torch.softmax(z, -1)
            self.scores[task.name].append(prob.cpu().numpy())
            self.labels[task.name].append(targets[task.name].cpu().numpy())

    def predictions(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{task: (probabilities (n, C), labels (n,) or (n, K))}`` in the order the items came."""
        return {
            t.name: (np.concatenate(self.scores[t.name]), np.concatenate(self.labels[t.name]))
            for t in self.tasks
            if self.scores[t.name]
        }

    def result(self) -> dict[str, float]:
        out = {"loss": self.loss_sum / max(1, self.n)}
        per_metric: dict[str, list[float | None]] = {name: [] for name in METRICS}
        for task in self.tasks:
            if not self.scores[task.name]:
                continue
            prob, y = np.concatenate(self.scores[task.name]), np.concatenate(self.labels[task.name])
            for name in METRICS:
                value = score(name, prob, y, task.multi_label)
                per_metric[name].append(value)
                if value is not None:
                    out[f"{task.name}/{name}"] = value
        for name, values in per_metric.items():
            out[name] = mean_score(values)
        out["score"] = out[self.metric]
        return out


def _to(targets: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in targets.items()}


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    device: torch.device,
    max_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """One pass over ``loader`` (or its first ``max_steps`` batches): IPS, forward, backward, step."""
    metrics = _Metrics(model.cfg.tasks)
    model.train()
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        for step, (patches, targets) in enumerate(loader):
            if max_steps is not None and step >= max_steps:
                break
            targets = _to(targets, device)
            try:
                logits, loss = train_step(model, patches, targets, optimizer, cfg, device)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(f"{exc} (step {step})") from None
            scheduler.step()
            metrics.update(logits, targets, loss)
            if on_step is not None:
                on_step(step, mem.read())
    seconds = time.perf_counter() - start
    return {
        **metrics.result(),
        "peak_memory_mb": mem.peak_mb,
        "memory_kind": mem.kind,
        "seconds": seconds,
        "images_per_s": metrics.n / seconds if seconds > 0 else 0.0,
        "images": metrics.n,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp: bool = True,
    metric: str = "accuracy",
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Loss and metrics of ``model`` on ``loader`` (IPS then forward, eval mode); ``score`` is ``metric``'s.
    ``keep_predictions`` adds ``predictions``: ``{task: (probabilities, labels)}`` in the loader's order."""
    tasks = model.cfg.tasks
    metrics = _Metrics(tasks, metric)
    model.eval()
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        for patches, targets in loader:
            targets = _to(targets, device)
            mem_patch, mem_idx = model.ips(patches)  # outside autocast: the same selection as in training
            with autocast(device, amp):
                logits = as_task_dict(model(mem_patch, mem_idx), tasks)
                loss = sum(task_losses(logits, targets, tasks).values())
            metrics.update(logits, targets, float(loss))
    seconds = time.perf_counter() - start
    return {
        **metrics.result(),
        "peak_memory_mb": mem.peak_mb,
        "memory_kind": mem.kind,
        "seconds": seconds,
        "images_per_s": metrics.n / seconds if seconds > 0 else 0.0,
        "images": metrics.n,
        **({"predictions": metrics.predictions()} if keep_predictions else {}),
    }


@dataclass
class Training:
    """One config's training, set up once: the model, the three loaders, the optimiser and its LR schedule."""

    model: IPSNet
    train_loader: DataLoader
    val_loader: DataLoader | None  # None when refitting on every non-test item
    test_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue training where it stopped."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def setup(exp: ExperimentConfig, splits: DataSplits, device: torch.device) -> Training:
    """The model (warm-started and oriented as configured), loaders, AdamW and its per-step schedule for ``exp``."""
    model = build_model(exp, splits, device)
    train_loader = make_loader(splits.train, exp.train, shuffle=True, device=device)
    optimizer = make_optimizer(model, exp.train)
    return Training(
        model=model,
        train_loader=train_loader,
        val_loader=make_loader(splits.val, exp.train, shuffle=False, device=device) if splits.val is not None else None,
        test_loader=make_loader(splits.test, exp.train, shuffle=False, device=device),
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, exp.train, len(train_loader)),
    )


def fit(exp: ExperimentConfig, splits: DataSplits, device: torch.device) -> dict[str, Any]:
    """Train one config for ``exp.train.epochs`` outside Ray (as a trial does, without reports or checkpoints),
    then evaluate: ``{"epochs": [train_one_epoch dicts], "val": ..., "test": ...}``."""
    run = setup(exp, splits, device)
    epochs = [
        train_one_epoch(run.model, run.train_loader, run.optimizer, run.scheduler, exp.train, device)
        for _ in range(exp.train.epochs)
    ]
    return {
        "epochs": epochs,
        "val": evaluate(run.model, run.val_loader, device, exp.train.amp, exp.evaluation.metric)
        if run.val_loader is not None
        else None,
        "test": evaluate(run.model, run.test_loader, device, exp.train.amp, exp.evaluation.metric),
    }
