"""A deterministic meter of live tensor memory: the peak bytes of tensor storages alive during a region.

``PeakMemory`` (``memory.py``) reads the allocator or the process (RSS), which depends on allocator history and
on what the rest of the process does. :class:`StorageMeter` instead watches every ATen op (a
``TorchDispatchMode``): each storage an op returns is counted once, when first seen, and uncounted when the storage
dies (a weak reference on the storage object, which PyTorch keeps alive exactly as long as the storage). Views share
their base's storage, so they cost nothing; in-place ops allocate nothing. The same code and inputs give the same
bytes in every run and process.

What exists before the region (weights, gradients, optimiser state, the folded encoder copy, the batch) is counted
only if registered with :meth:`StorageMeter.register` (:func:`training_state` lists a model's and optimiser's). Memory
that is not a tensor (oneDNN / cuDNN / cuBLAS workspaces, the CUDA context, allocator fragmentation) is not seen.

``rounding`` maps a storage's bytes to what it costs: :func:`tensor_bytes` (exact) or :func:`cuda_block_bytes`, the
CUDA caching allocator's accounting of ``allocated_bytes`` (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MB = 1024 * 1024
CUDA_MIN_BLOCK = 512  # kMinBlockSize in c10/cuda/CUDACachingAllocator.cpp


def tensor_bytes(nbytes: int) -> int:
    """A storage costs its bytes."""
    return nbytes


def cuda_block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator books in ``allocated_bytes`` for a request of ``nbytes``.

    ``round_size`` in c10/cuda/CUDACachingAllocator.cpp: below 512 bytes, one 512-byte block; else up to the next
    multiple of 512 (with the default ``roundup_power2_divisions`` unset). An empty storage allocates nothing.
    """
    if nbytes <= 0:
        return 0
    return CUDA_MIN_BLOCK * -(-nbytes // CUDA_MIN_BLOCK)


def _storage_of(tensor: torch.Tensor) -> Any | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested / some subclasses have no single storage
        return None


class StorageMeter(TorchDispatchMode):
    """``with StorageMeter("cuda", cuda_block_bytes) as meter: ...`` then ``meter.peak_bytes`` / ``meter.peak_mb``.

    Counts storages on ``device`` (a device type such as ``cpu`` or ``cuda``; None: every device but ``meta``).
    ``current_bytes`` is what is alive now, ``peak_bytes`` the most alive at once since entry (or
    :meth:`reset_peak`). Usable again after exit: counts carry over, so a second region can start from the first's
    survivors. Python's cyclic garbage collector is paused inside the region (after a collection at entry): a tensor
    held in a reference cycle then dies at the same point in every run, not whenever the collector happens to run.
    """

    def __init__(self, device: str | torch.device | None = None, rounding: Callable[[int], int] = tensor_bytes) -> None:
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type
        self.rounding = rounding
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}  # storage id (its C++ address while alive) -> counted bytes
        self._finalizers: dict[int, weakref.finalize] = {}
        self._gc_was_enabled: list[bool] = []

    def __enter__(self) -> StorageMeter:
        gc.collect()
        self._gc_was_enabled.append(gc.isenabled())
        gc.disable()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._gc_was_enabled.pop():
            gc.enable()

    # -- counting ------------------------------------------------------------------------------------------------
    def _counts(self, tensor: torch.Tensor) -> bool:
        kind = tensor.device.type
        return kind != "meta" if self.device_type is None else kind == self.device_type

    def _track(self, tensor: torch.Tensor) -> None:
        if not self._counts(tensor):
            return
        storage = _storage_of(tensor)
        if storage is None:
            return
        key, cost = storage._cdata, self.rounding(storage.nbytes())
        old = self._live.get(key)
        if old == cost:
            return
        if old is None:  # a new storage: uncount it when it dies
            self._finalizers[key] = weakref.finalize(storage, self._free, key)
        self._live[key] = cost  # new, or resized in place (an out= op)
        self.current_bytes += cost - (old or 0)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _free(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)
        self._finalizers.pop(key, None)

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that exist already (each storage once, however many tensors view it)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak_bytes = self.current_bytes

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MB

    @property
    def current_mb(self) -> float:
        return self.current_bytes / MB

    def close(self) -> None:
        """Stop following the storages counted so far (their deaths no longer change the counts)."""
        for fin in self._finalizers.values():
            fin.detach()
        self._finalizers.clear()

    # -- the dispatch hook ---------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


def module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """A module's parameters, their gradients, its buffers, and tensors its submodules keep as attributes (caches
    such as :class:`~ips_search.model.fold.SmallMapConv2d`'s dense matrix)."""
    for param in module.parameters():
        yield param
        if param.grad is not None:
            yield param.grad
    yield from module.buffers()
    for mod in module.modules():
        for value in vars(mod).values():
            if isinstance(value, torch.Tensor):
                yield value
            elif isinstance(value, dict):
                yield from (v for v in value.values() if isinstance(v, torch.Tensor))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The optimiser's state (AdamW: step counts and both moments)."""
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """Everything a training step finds alive: the model's tensors, IPSNet's BatchNorm-folded encoder copy (made on
    the first selection pass), and the optimiser's state."""
    tensors = list(module_tensors(model))
    folded = getattr(model, "_folded", None)  # an IPSNet's FoldedEncoder; not a submodule, so listed here
    if folded is not None:
        tensors += module_tensors(folded.module)
    if optimizer is not None:
        tensors += optimizer_tensors(optimizer)
    return tensors
