"""Patch encoders: ``(n, C, P, P) -> (n, D)``.

* ``resnet18`` / ``resnet50``: torchvision ResNets from scratch as in the reference
  notebook (conv1 adapted to ``n_chan``, fc removed), or ImageNet weights with
  ``pretrained=True`` (downloads, opt-in).
* ``resnet18-2``, ``resnet18-3``, ``resnet50-2``, ``resnet50-3``: ResNets truncated
  after stage 2 or 3, as the original IPS code does for small patches.
* ``small-cnn``: four conv blocks, fast enough for a CPU search.
* ``projector``: for pre-extracted patch embeddings (``dataset: features``),
  ``(n, D_in) -> (n, D)``; ``n_chan`` holds D_in (the files' feature width).

When the encoder's native width differs from D a linear projection is appended. Each encoder registers a name and
a builder in :data:`ENCODERS` (:func:`build_encoder` asks it; ``model.encoder`` names an entry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ips_search.config import IPSConfig, Registry
from ips_search.errors import ConfigError

_RESNET_WIDTHS = {"resnet18": (64, 128, 256, 512), "resnet50": (256, 512, 1024, 2048)}


class SmallCNN(nn.Module):
    """A stride-2 stem and three more 3x3 conv-BN-ReLU blocks, each after a 2x2 max-pool; global average pool.

    The stem halves the resolution at once: patches of digit-scale images carry little
    detail at full resolution, and it cuts the cost of IPS's no-grad pass over all N
    patches by about 4x. ``(n, C, P, P) -> (n, D)``.
    """

    def __init__(self, n_chan: int, dim: int, width: int = 32) -> None:
        super().__init__()
        chans = [n_chan, width, 2 * width, 4 * width, dim]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            if i > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            stride = 2 if i == 0 else 1
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)  # (n, D, P/16, P/16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, C, P, P) -> (n, D)
        return self.pool(self.features(x)).flatten(1)


class Projector(nn.Module):
    """LayerNorm(D_in) -> Linear(D_in, D) -> BatchNorm1d(D) -> ReLU: ``(n, D_in) -> (n, D)``.

    The IPS paper's CAMELYON16 encoder over frozen embeddings; the embeddings come from
    the feature files, so this is all that trains besides the transformer and heads. (A training
    batch of one embedding: :meth:`ips_search.model.ips.IPSNet.encode`.)
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.act = nn.ReLU(inplace=True)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, D_in) -> (n, D)
        # The check also keeps torch.fx from tracing the projector, so IPS runs it unfolded (try_fold warns once):
        # BatchNorm1d has nothing to fold into a conv, and the folded copy's Linear fails under inference_mode.
        if x.shape[-1] != self.norm.normalized_shape[0]:
            raise ValueError(f"projector expects {self.norm.normalized_shape[0]}-wide features, got {x.shape[-1]}")
        return self.act(self.bn(self.linear(self.norm(x))))  # (n, D)


def _load_imagenet_weights(model: nn.Module, arch: str) -> None:
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # noqa: BLE001 - any download failure becomes one clear line
        raise ConfigError(
            f"could not download ImageNet weights for {arch} ({type(exc).__name__}); "
            "connect to the internet once or set pretrained: false"
        ) from None
    model.load_state_dict(state)


def _resnet(arch: str, stages: int, n_chan: int, pretrained: bool) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, arch)()
    if pretrained:
        _load_imagenet_weights(net, arch)
    if n_chan != 3:
        rgb = net.conv1.weight.data
        net.conv1 = nn.Conv2d(n_chan, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained:  # keep the pretrained filters: average over RGB, repeat for each channel
            net.conv1.weight.data.copy_(rgb.mean(1, keepdim=True).repeat(1, n_chan, 1, 1) * 3 / n_chan)
    net.fc = nn.Identity()
    for i in range(stages + 1, 5):
        setattr(net, f"layer{i}", nn.Identity())
    return net, _RESNET_WIDTHS[arch][stages - 1]


@dataclass(frozen=True)
class EncoderKind:
    """One patch encoder: ``build(cfg)`` gives ``(n, C, P, P) -> (n, cfg.dim)`` (``(n, D_in) -> (n, D)`` when it
    ``reads_features``)."""

    name: str
    build: Callable[[IPSConfig], nn.Module]
    reads_features: bool = False  # pre-extracted patch embeddings (a features dataset), not pixels


ENCODERS: Registry[EncoderKind] = Registry("encoder", "model.encoder")


def build_encoder(cfg: IPSConfig) -> nn.Module:
    """The patch encoder named by ``cfg.encoder``, projecting to ``cfg.dim`` when needed."""
    return ENCODERS[cfg.encoder].build(cfg)


def _projector(cfg: IPSConfig) -> nn.Module:
    if cfg.pretrained:
        raise ConfigError("the projector has no ImageNet weights; set pretrained: false")
    return Projector(cfg.n_chan, cfg.dim)


def _small_cnn(cfg: IPSConfig) -> nn.Module:
    if cfg.pretrained:
        raise ConfigError("small-cnn has no ImageNet weights; set pretrained: false or use a resnet encoder")
    return SmallCNN(cfg.n_chan, cfg.dim, width=max(8, cfg.dim // 4))


def _resnet_encoder(arch: str, stages: int) -> Callable[[IPSConfig], nn.Module]:
    def build(cfg: IPSConfig) -> nn.Module:
        net, width = _resnet(arch, stages, cfg.n_chan, cfg.pretrained)
        return net if width == cfg.dim else nn.Sequential(net, nn.Linear(width, cfg.dim))

    return build


for _arch in _RESNET_WIDTHS:
    ENCODERS.register(EncoderKind(_arch, _resnet_encoder(_arch, 4)))
for _arch in _RESNET_WIDTHS:
    for _stages in (2, 3):
        ENCODERS.register(EncoderKind(f"{_arch}-{_stages}", _resnet_encoder(_arch, _stages)))
ENCODERS.register(EncoderKind("small-cnn", _small_cnn))
ENCODERS.register(EncoderKind("projector", _projector, reads_features=True))
