"""A BatchNorm-folded inference copy of an encoder, for IPS's no-grad pass.

In eval mode a BatchNorm after a conv is an affine map, so it folds into the
conv's weight and bias: one op instead of two, the same result up to float
rounding. The copy is traced once with ``torch.fx`` and keeps its own weights in
the chosen dtype (bfloat16 runs natively, without autocast re-casting the weights
at every call) and in channels-last layout; ``refresh()`` re-derives them from the
live encoder before each IPS pass, since the optimiser moves them every step.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn


class FoldedEncoder:
    """``(n, C, P, P) -> (n, D)`` like the encoder, with conv+BN pairs fused. Inference only."""

    def __init__(self, encoder: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = True) -> None:
        self.encoder, self.dtype, self.channels_last = encoder, dtype, channels_last
        graph_module = fx.symbolic_trace(copy.deepcopy(encoder)).requires_grad_(False)
        modules = dict(graph_module.named_modules())
        self.folds: dict[str, str] = {}  # conv name -> the BatchNorm name folded into it
        for node in list(graph_module.graph.nodes):
            bn = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
                continue
            prev = node.args[0]
            conv = modules.get(prev.target) if isinstance(prev, fx.Node) and prev.op == "call_module" else None
            if not isinstance(conv, nn.Conv2d) or len(prev.users) != 1:
                continue
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels), requires_grad=False)
            node.replace_all_uses_with(prev)
            graph_module.graph.erase_node(node)
            self.folds[prev.target] = node.target
        graph_module.graph.lint()
        graph_module.recompile()
        graph_module.delete_all_unused_submodules()
        self.module = graph_module.eval()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy (and fold) the encoder's current weights, following its device."""
        live = dict(self.encoder.named_modules())
        for name, mod in self.module.named_modules():
            src = live[name]
            for key, tensor in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                value = getattr(src, key, None)
                if name in self.folds:
                    bn = live[self.folds[name]]
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
                    if key == "weight":
                        value = src.weight * scale.view(-1, 1, 1, 1)
                    else:  # bias
                        bias = src.bias if src.bias is not None else torch.zeros_like(bn.running_mean)
                        value = (bias - bn.running_mean) * scale + bn.bias
                value = value.detach()
                if value.is_floating_point():
                    value = value.to(self.dtype)
                if self.channels_last and value.dim() == 4:
                    value = value.contiguous(memory_format=torch.channels_last)
                tensor.data = value

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (n, C, P, P) -> (n, D) float32
        x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x).float()


def try_fold(encoder: nn.Module, dtype: torch.dtype = torch.float32) -> FoldedEncoder | None:
    """A folded copy of ``encoder``, or None (with a warning) when it can't be traced."""
    try:
        return FoldedEncoder(encoder, dtype)
    except Exception as exc:  # noqa: BLE001 - an untraceable custom encoder just runs unfolded
        warnings.warn(f"BatchNorm folding disabled for this encoder ({type(exc).__name__}: {exc})", stacklevel=2)
        return None
