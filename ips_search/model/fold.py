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
import torch.nn.functional as F
from torch import fx, nn


def _conv_or_centre_tap(x, weight, bias, stride, padding, dilation, groups):
    """A k x k conv with stride 1 and 'same' zero padding sees only its centre tap on a 1x1 map: a matmul there.

    (ResNet-18's last stage on 32-px patches runs on 1x1 maps, where oneDNN's conv kernels cost ~100x the matmul.)
    """
    if x.shape[-2:] == (1, 1) and groups == 1:
        kh, kw = weight.shape[-2:]
        y = F.linear(x.flatten(1), weight[:, :, kh // 2, kw // 2], bias)  # (n, C_out)
        return y.view(*y.shape, 1, 1)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


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
        self._rewrite_convs(graph_module)
        graph_module.graph.lint()
        graph_module.recompile()
        graph_module.delete_all_unused_submodules()
        self.module = graph_module.eval()
        self._refreshed = False

    def _rewrite_convs(self, graph_module: fx.GraphModule) -> None:
        """Two exact speed-ups: 'same' stride-1 convs become a matmul on 1x1 maps, and the output of a
        one-channel stem conv is made channels-last (for one channel ``contiguous(channels_last)`` of the
        input is a no-op, so the stem and its max-pool would otherwise run in the slow NCHW layout)."""
        modules, graph = dict(graph_module.named_modules()), graph_module.graph
        for node in list(graph.nodes):
            conv = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(conv, nn.Conv2d):
                continue
            out, same = node, tuple(k // 2 for k in conv.kernel_size)
            if (
                all(k % 2 == 1 for k in conv.kernel_size)
                and conv.stride == (1, 1)
                and conv.padding == same
                and conv.dilation == (1, 1)
                and conv.groups == 1
                and conv.padding_mode == "zeros"
            ):
                with graph.inserting_before(node):
                    w = graph.get_attr(f"{node.target}.weight")
                    b = graph.get_attr(f"{node.target}.bias") if conv.bias is not None else None
                    out = graph.call_function(
                        _conv_or_centre_tap, (node.args[0], w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
                    )
                node.replace_all_uses_with(out)
                graph.erase_node(node)
            if self.channels_last and conv.in_channels == 1:
                with graph.inserting_after(out):
                    to_cl = graph.call_method("contiguous", (out,), {"memory_format": torch.channels_last})
                out.replace_all_uses_with(to_cl)
                to_cl.args = (out,)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy (and fold) the encoder's current weights, following its device.

        After the first call the copy is in place (no new tensors each step: that churn cost
        tens of MB of peak RSS); a device change allocates afresh.
        """
        live = dict(self.encoder.named_modules())
        mine, theirs = next(self.module.parameters(), None), next(self.encoder.parameters(), None)
        in_place = self._refreshed and (mine is None or theirs is None or mine.device == theirs.device)
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
                if in_place:
                    if tensor.data_ptr() != value.data_ptr():
                        tensor.copy_(value)  # keeps the copy's dtype and layout
                    continue
                if value.is_floating_point():
                    value = value.to(self.dtype)
                if self.channels_last and value.dim() == 4:
                    value = value.contiguous(memory_format=torch.channels_last)
                tensor.data = value
        self._refreshed = True

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
