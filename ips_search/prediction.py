"""Predict a training step's peak GPU memory without a GPU: one ``train.train_step`` on fake tensors, metered.

:func:`estimate_step_memory` builds the model and runs :func:`ips_search.train.train_step` under PyTorch's
``FakeTensorMode``: every op computes only shapes and dtypes, so nothing is allocated or computed, and
:class:`~ips_search.meter.StorageMeter` adds up the live storages with the CUDA caching allocator's rounding. The
figure is the peak of the second step (the first allocates the optimiser state, the gradients and the folded
encoder copy, which every later step finds alive), as ``torch.cuda.max_memory_allocated`` would see it.

Fake CUDA tensors need a real CUDA context for the backward pass, so the fake step runs on a CPU stand-in on every
machine (the same bytes everywhere); the batch waits on ``meta`` (the host) and is copied to the stand-in as
``IPSNet.ips`` copies it to the GPU. For ``device="cuda"`` with ``amp`` the gradient pass runs under CPU bfloat16
autocast in place of CUDA's, whose op lists agree on what dominates (convolutions and matmuls in bfloat16).

``python -m ips_search.estimate --space default`` prints the prediction for a space's patch size x M x I grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ips_search.config import DataConfig, ExperimentConfig, IPSConfig, Task, TrainConfig
from ips_search.data import DataGeometry
from ips_search.errors import ConfigError
from ips_search.meter import MB, StorageMeter, cuda_block_bytes, optimizer_tensors, tensor_bytes
from ips_search.model import IPSNet
from ips_search.model.encoders import ENCODERS
from ips_search.step import make_optimizer, train_step

STAND_IN = "cpu"  # the fake device the model lives on
HOST = "meta"  # the fake device of the batch before the step (the DataLoader's host memory: not counted)
LEAVES_OUT = (
    "leaves out: the CUDA context (~300-600 MB per process), cuDNN/cuBLAS workspaces, "
    "allocator fragmentation and cached-but-free blocks (what nvidia-smi shows on top)"
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak of one steady-state training step, in MiB (2**20 bytes), as the allocator books it.

    ``state_mb`` is what the step finds alive (weights, gradients, optimiser state, the folded encoder copy, caches,
    the targets); ``activations_mb`` = ``peak_mb - state_mb`` is what the step adds at its peak (the batch on the
    device, activations saved for backward, the new gradients while the old ones are still alive...).
    """

    peak_mb: float
    weights_mb: float
    grads_mb: float
    optimizer_mb: float
    state_mb: float
    activations_mb: float
    device: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- fake model ------------------------------------------------------------------------------------------------------
def _fake_module(module: nn.Module, device: str) -> None:
    """Swap every parameter and buffer for an empty tensor of the same shape, strides and dtype on ``device``
    (fake under the caller's FakeTensorMode). ``Module.to`` can't: it swaps tensors in place, which fake tensors
    refuse."""
    # by the original's id (the original kept alive, so no id is reused): a tensor shared by two modules stays shared
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def like(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            made[id(t)] = (t, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)
        return made[id(t)][1]

    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                mod._parameters[name] = like(p)
        for name, b in mod._buffers.items():
            if b is not None:
                mod._buffers[name] = like(b)


def _fake_batch(batch: int, n_patches: int, n_chan: int, patch: int, tasks: tuple[Task, ...], features: bool = False):
    # (B, N, D) pre-extracted embeddings (n_chan is their width D), else (B, N, C, P, P) pixels
    shape = (batch, n_patches, n_chan) if features else (batch, n_patches, n_chan, patch, patch)
    patches = torch.empty(*shape, device=HOST)
    targets = {
        t.name: torch.zeros(batch, t.n_class, device=STAND_IN)
        if t.multi_label
        else torch.zeros(batch, dtype=torch.long, device=STAND_IN)
        for t in tasks
    }
    return patches, targets


class _FakeScalars(TorchDispatchMode):
    """A fake tensor has no values: ``loss.item()`` answers 1.0 (finite, so ``train_step`` carries on)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].is_floating_point() else 1
        return func(*args, **(kwargs or {}))


class _FakeTrainer:
    """A fake model and optimiser of one structure, kept in steady state: after a first (warm-up) step every step
    finds the same weights, gradients, optimiser state and folded encoder copy alive, whatever M, I, B and N the
    previous step had, so one trainer serves every such config (M and I are read from ``model.cfg`` at run time)."""

    def __init__(self, model_cfg: IPSConfig, train_cfg: TrainConfig, device: str) -> None:
        self.train_cfg = train_cfg
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.meter = StorageMeter(STAND_IN, cuda_block_bytes if device == "cuda" else tensor_bytes)
        self.scalars = _FakeScalars()
        with torch.device("meta"):  # shapes only: no initialisation work
            self.model = IPSNet(model_cfg)
        with self._modes():
            _fake_module(self.model, STAND_IN)
            self.optimizer = make_optimizer(self.model, train_cfg)
        self.model.train()
        if device == "cuda" and train_cfg.amp:  # train_step only autocasts on a CUDA device: do it for the stand-in
            forward = self.model.forward

            def autocast_forward(*args: Any, **kwargs: Any) -> Any:
                with torch.autocast(STAND_IN, dtype=torch.bfloat16):
                    return forward(*args, **kwargs)

            self.model.forward = autocast_forward
        # warm-up: two images (BatchNorm1d trains on no fewer samples), N = 2, M = I = 1 allocate the gradients, the
        # optimiser state and the folded encoder copy (a config with M >= N would never fold: its estimate keeps the
        # copy, a slight excess)
        self.step(dataclasses.replace(model_cfg, memory_size=1, iteration_size=1), batch=2, n_patches=2)
        rounding = self.meter.rounding
        params = {p.untyped_storage()._cdata: p for p in self.model.parameters()}
        self.weights_bytes = sum(rounding(p.untyped_storage().nbytes()) for p in params.values())
        self.grads_bytes = sum(
            rounding(p.grad.untyped_storage().nbytes()) for p in params.values() if p.grad is not None
        )
        self.optimizer_bytes = sum(rounding(t.untyped_storage().nbytes()) for t in optimizer_tensors(self.optimizer))

    def _modes(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # fake tensors warn about data_ptr(), which the folded copy reads as a key
        for mode in (self.fake_mode, self.meter, self.scalars):  # entered last = dispatched first
            stack.enter_context(mode)
        return stack

    def step(self, model_cfg: IPSConfig, batch: int, n_patches: int) -> tuple[int, int]:
        """(peak bytes, bytes alive at entry) of one training step with this M, I, batch size and N."""
        self.model.cfg = model_cfg
        with self._modes():
            patches, targets = _fake_batch(
                batch,
                n_patches,
                model_cfg.n_chan,
                model_cfg.patch_size,
                model_cfg.tasks,
                ENCODERS[model_cfg.encoder].reads_features,
            )
            self.meter.reset_peak()
            state = self.meter.current_bytes
            train_step(self.model, patches, targets, self.optimizer, self.train_cfg, torch.device(STAND_IN))
            peak = self.meter.peak_bytes
            del patches, targets  # freed before the next step, as the training loop's batch is
        return peak, state


def _structure_key(model_cfg: IPSConfig, train_cfg: TrainConfig, device: str) -> str:
    """What decides the weights, gradients, optimiser state and the ops of a step, but not M, I, B or N."""
    shape = dataclasses.asdict(dataclasses.replace(model_cfg, memory_size=1, iteration_size=1))
    train = {"amp": train_cfg.amp, "grad_clip": train_cfg.grad_clip, "weight_decay": train_cfg.weight_decay}
    return json.dumps([shape, train, device], sort_keys=True, default=str)


_TRAINERS: dict[str, _FakeTrainer] = {}  # per model structure
_ESTIMATES: dict[str, MemoryEstimate] = {}  # per full config: a trial's repeated calls are free


def clear_cache() -> None:
    """Forget every estimate and fake model of this process (the next estimate of each model starts cold)."""
    _ESTIMATES.clear()
    _PHASES.clear()
    _TRAINERS.clear()


def _estimate(key: str, model_cfg: IPSConfig, train_cfg: TrainConfig, device: str, n_patches: int) -> MemoryEstimate:
    if key in _ESTIMATES:
        return _ESTIMATES[key]
    structure = _structure_key(model_cfg, train_cfg, device)
    if structure not in _TRAINERS:
        _TRAINERS[structure] = _FakeTrainer(model_cfg, train_cfg, device)
    trainer = _TRAINERS[structure]
    peak, state = trainer.step(model_cfg, train_cfg.batch_size, n_patches)
    _ESTIMATES[key] = MemoryEstimate(
        peak_mb=peak / MB,
        weights_mb=trainer.weights_bytes / MB,
        grads_mb=trainer.grads_bytes / MB,
        optimizer_mb=trainer.optimizer_bytes / MB,
        state_mb=state / MB,
        activations_mb=(peak - state) / MB,
        device=device,
    )
    return _ESTIMATES[key]


def estimate_step_memory(
    exp: ExperimentConfig, n_patches: int, n_chan: int, tasks: tuple[Task, ...], device: str = "cuda"
) -> MemoryEstimate:
    """Predicted peak memory of one steady-state training step of ``exp`` on images of ``n_patches`` patches of
    ``n_chan`` channels (``tasks``: empty keeps the model's); :func:`estimate_memory` of that geometry."""
    for name, value in (("n_patches", n_patches), ("n_chan", n_chan)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    geometry = given_geometry(exp.data, n_patches, n_chan, tuple(tasks) or exp.model.tasks)
    return estimate_memory(exp, geometry, device)


def given_geometry(data: DataConfig, n_patches: int, n_chan: int, tasks: tuple[Task, ...]) -> DataGeometry:
    """The geometry of ``data``'s patches with a given N, channels and tasks (no data read)."""
    stride = data.patch_stride or data.patch_size
    return DataGeometry(data.patch_size, stride, n_chan, tuple(tasks), n_patches, (1, n_patches))


def estimate_memory(exp: ExperimentConfig, geometry: DataGeometry, device: str = "cuda") -> MemoryEstimate:
    """Predicted peak memory of one steady-state training step of ``exp`` on data of this ``geometry`` (N =
    ``geometry.n_patches``, the smallest item's where items differ; where M is above it, which only a batch of one
    image allows, the step that keeps the most patches is the peak: N = M, at most the largest item's).

    ``device="cuda"``: as ``torch.cuda.max_memory_allocated`` books it (512-byte blocks, bfloat16 autocast when
    ``exp.train.amp``); ``device="cpu"``: the exact bytes of the live tensors (a CPU step, no autocast). Cached per
    process: the same config again costs nothing.
    """
    kind = device.split(":")[0] if isinstance(device, str) else device
    if kind not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, got {device!r}")
    key, model_cfg, n_patches = _step_of(exp, geometry, kind)
    return _estimate(key, model_cfg, exp.train, kind, n_patches)


def _step_of(exp: ExperimentConfig, geometry: DataGeometry, kind: str) -> tuple[str, IPSConfig, int]:
    """The step an estimate fakes: its cache key, its model config and its N."""
    # the values don't matter, and ImageNet weights would be downloaded
    model_cfg = dataclasses.replace(geometry.model_config(exp.model), pretrained=False)
    n_patches, train = step_patches(geometry, model_cfg.memory_size), exp.train  # lr, seed...: one key
    key = json.dumps(
        [dataclasses.asdict(model_cfg), train.batch_size, train.amp, train.grad_clip, kind, n_patches], default=str
    )
    return key, model_cfg, n_patches


def step_patches(geometry: DataGeometry, memory_size: int) -> int:
    """N of the training step with the highest peak: the smallest item's, which streams through the selection like
    any other; or, with M above it (a batch of one image keeps all of a smaller image's patches), the item that
    keeps the most, M patches or the largest item's N."""
    if geometry.item_counts is None or memory_size <= geometry.n_patches:
        return geometry.n_patches
    return min(memory_size, max(geometry.item_counts))


@dataclass(frozen=True)
class StepPhases:
    """A training step's predicted peak split by phase, in MiB, as :func:`estimate_phases` finds it.

    ``state_mb``: what the step finds alive (weights, gradients, optimiser state, the folded encoder copy), which
    no IPS setting moves. Above it, ``selection_mb``: the peak of the no-grad pass over all N patches (the batch on
    the device, ``encode_chunk`` patches through the encoder at a time, the scores): set by P, N, B and the chunk,
    while M and I only size the small kept set. ``gradient_mb``: the peak of the rest (the B x M kept patches'
    activations saved for backward, the new gradients, the optimiser step): the part that grows with M (and P).
    The step's peak is ``state_mb + max(selection_mb, gradient_mb)``.
    """

    peak_mb: float
    state_mb: float
    selection_mb: float
    gradient_mb: float
    device: str

    @property
    def phase(self) -> str:
        """Which phase sets the peak: ``selection`` or ``gradient``."""
        return "selection" if self.selection_mb >= self.gradient_mb else "gradient"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "phase": self.phase}


_PHASES: dict[str, StepPhases] = {}  # per full config, as _ESTIMATES


def _phase_step(trainer: _FakeTrainer, model_cfg: IPSConfig, batch: int, n_patches: int) -> tuple[int, int, int]:
    """(bytes alive at entry, selection peak, gradient peak) of one fake step: the meter's peak is read and
    restarted when ``model.ips`` returns, so what follows (the kept patches, forward, backward, the optimiser step)
    has its own peak."""
    marks: dict[str, int] = {}
    select = trainer.model.ips

    def metered(*args: Any, **kwargs: Any) -> Any:
        out = select(*args, **kwargs)
        marks["selection"] = trainer.meter.peak_bytes
        trainer.meter.reset_peak()
        return out

    trainer.model.ips = metered  # an instance attribute: train_step calls it in place of the method
    try:
        gradient, state = trainer.step(model_cfg, batch, n_patches)
    finally:
        del trainer.model.ips
    return state, marks["selection"], gradient


def estimate_phases(exp: ExperimentConfig, geometry: DataGeometry, device: str = "cuda") -> StepPhases:
    """:func:`estimate_memory` split into the step's state, its no-grad selection pass and its gradient pass
    (:class:`StepPhases`); the same fake step, cached per process like it."""
    total = estimate_memory(exp, geometry, device)  # validates the device and builds the fake trainer
    kind, train = total.device, exp.train
    key, model_cfg, n_patches = _step_of(exp, geometry, kind)
    if key not in _PHASES:
        trainer = _TRAINERS[_structure_key(model_cfg, train, kind)]
        state, selection, gradient = _phase_step(trainer, model_cfg, train.batch_size, n_patches)
        _PHASES[key] = StepPhases(
            peak_mb=max(selection, gradient) / MB,
            state_mb=state / MB,
            selection_mb=(selection - state) / MB,
            gradient_mb=(gradient - state) / MB,
            device=kind,
        )
    return _PHASES[key]


def measure_step_memory(
    exp: ExperimentConfig, n_patches: int, n_chan: int, tasks: tuple[Task, ...], device: str = "cuda"
) -> dict[str, float]:
    """What :func:`estimate_step_memory` predicts, measured on a real CUDA device: a model with random weights, one
    warm-up training step, then one step of a random batch (pinned on the host, as the training loader gives it).

    Returns ``peak_mb`` (``torch.cuda.max_memory_allocated`` during the step), ``workspace_mb`` (cuBLAS workspaces
    alive after it, which the allocator books too but are no tensor) and ``tensors_mb`` (their difference).
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"measuring needs an available CUDA device, got {device!r}; run it on a GPU machine")
    model_cfg = given_geometry(exp.data, n_patches, n_chan, tuple(tasks)).model_config(exp.model)
    torch.manual_seed(exp.train.seed)
    model = IPSNet(model_cfg).to(dev)
    optimizer = make_optimizer(model, exp.train)
    batch, side = exp.train.batch_size, model_cfg.patch_size
    patches = torch.rand(batch, n_patches, n_chan, side, side).pin_memory()  # (B, N, C, P, P)
    targets = {
        t.name: torch.randint(0, 2, (batch, t.n_class), device=dev).float()
        if t.multi_label
        else torch.randint(0, t.n_class, (batch,), device=dev)
        for t in model_cfg.tasks
    }
    model.train()
    train_step(model, patches, targets, optimizer, exp.train, dev)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    train_step(model, patches, targets, optimizer, exp.train, dev)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    before = torch.cuda.memory_allocated(dev)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    workspace = before - torch.cuda.memory_allocated(dev)
    del model, optimizer, patches, targets
    torch.cuda.empty_cache()
    return {"peak_mb": peak / MB, "workspace_mb": workspace / MB, "tensors_mb": (peak - workspace) / MB}


# -- command line ----------------------------------------------------------------------------------------------------
