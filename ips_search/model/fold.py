"""A BatchNorm-folded inference copy of an encoder, for IPS's no-grad pass.

In eval mode a BatchNorm after a conv is an affine map, so it folds into the
conv's weight and bias: one op instead of two, the same result up to float
rounding. The copy is traced once with ``torch.fx`` and keeps its own weights in
the chosen dtype (bfloat16 runs natively, without autocast re-casting the weights
at every call) and in channels-last layout; ``refresh()`` re-derives them from the
live encoder before each IPS pass, since the optimiser moves them every step.
Convs on maps of at most 4 pixels run as one dense matmul (:class:`SmallMapConv2d`).
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn


class SmallMapConv2d(nn.Conv2d):
    """A Conv2d that runs as one dense matmul on maps of at most ``max_pixels`` pixels.

    On a tiny map a conv is a linear map from the flattened ``(H, W, C_in)`` input to the flattened
    ``(H_out, W_out, C_out)`` output; its matrix holds the kernel taps (zeros where a tap falls on padding).
    ResNet-18 on 32-px patches runs layer3 on 2x2 maps and layer4 on 1x1 maps, where oneDNN's conv kernels are
    slow (most of all in bfloat16: ~100x the matmul) and mostly multiply padding. The matrix is rebuilt when the
    weight changes (its version counter moves, or ``invalidate()`` is called), so once per IPS pass. Exact up to
    float rounding.
    """

    def __init__(self, *args, max_pixels: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels
        self._key: tuple | None = None
        self._taps: dict[tuple[int, int, torch.device], torch.Tensor] = {}  # per map size and device

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, max_pixels: int = 4) -> SmallMapConv2d:
        """A SmallMapConv2d sharing ``conv``'s weight and bias."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta", max_pixels=max_pixels,
        )  # fmt: skip
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def invalidate(self) -> None:
        """Forget the dense matrix (the weight was changed in place)."""
        self._key = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H * W > self.max_pixels or self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        # Inference tensors (weights copied under inference_mode) have no version counter: refresh() invalidates.
        version = None if self.weight.is_inference() else self.weight._version
        key = (H, W, version, self.weight.data_ptr(), self.weight.dtype, self.weight.device)
        if self._key != key:
            self._dense, self._dense_bias, self._out_hw = self._expand(H, W)
            self._key = key
        (Ho, Wo), n = self._out_hw, x.shape[0]
        y = F.linear(x.permute(0, 2, 3, 1).reshape(n, -1), self._dense, self._dense_bias)  # (n, Ho*Wo*C_out)
        return y.view(n, Ho, Wo, -1).permute(0, 3, 1, 2)  # (n, C_out, Ho, Wo), channels-last strides

    @torch.no_grad()
    def _expand(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        co, ci, kh, kw = self.weight.shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        taps = self._taps.get((H, W, self.weight.device))
        if taps is None:  # the kernel tap linking each (output pixel, input pixel) pair; kh*kw = none (a zero)
            taps = torch.full((Ho * Wo, H * W), kh * kw, dtype=torch.long)
            for oy, ox, ty, tx in itertools.product(range(Ho), range(Wo), range(kh), range(kw)):
                iy, ix = oy * sh - ph + ty * dh, ox * sw - pw + tx * dw
                if 0 <= iy < H and 0 <= ix < W:
                    taps[oy * Wo + ox, iy * W + ix] = ty * kw + tx
            taps = self._taps[(H, W, self.weight.device)] = taps.flatten().to(self.weight.device)
        w = torch.cat([self.weight.reshape(co, ci, kh * kw), self.weight.new_zeros(co, ci, 1)], dim=2)
        # (co, ci, Ho*Wo * H*W) -> (Ho*Wo * co, H*W * ci): rows are output (pixel, channel), columns input ones
        dense = w[:, :, taps].view(co, ci, Ho * Wo, H * W).permute(2, 0, 3, 1).reshape(Ho * Wo * co, H * W * ci)
        bias = None if self.bias is None else self.bias.repeat(Ho * Wo)
        return dense.contiguous(), bias, (Ho, Wo)


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
        """Two exact speed-ups: every conv becomes a :class:`SmallMapConv2d` (a matmul on tiny maps), and the
        output of a one-channel stem conv is made channels-last (for one channel ``contiguous(channels_last)`` of
        the input is a no-op, so the stem and its max-pool would otherwise run in the slow NCHW layout)."""
        graph = graph_module.graph
        for node in list(graph.nodes):
            conv = graph_module.get_submodule(node.target) if node.op == "call_module" else None
            if type(conv) is not nn.Conv2d:
                continue
            parent, _, leaf = node.target.rpartition(".")
            setattr(graph_module.get_submodule(parent), leaf, SmallMapConv2d.from_conv(conv))
            if self.channels_last and conv.in_channels == 1:
                with graph.inserting_after(node):
                    to_cl = graph.call_method("contiguous", (node,), {"memory_format": torch.channels_last})
                node.replace_all_uses_with(to_cl)
                to_cl.args = (node,)

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
            if isinstance(mod, SmallMapConv2d):
                mod.invalidate()
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
