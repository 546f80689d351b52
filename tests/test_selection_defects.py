"""Defects found while building cross-validated selection: a training batch of one patch (BatchNorm with one value
per channel), and tensor feature items of unequal N."""

from __future__ import annotations

import copy
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ips_search import IPSConfig, IPSNet
from ips_search.config import DataConfig
from ips_search.data import build_datasets, preview_datasets
from ips_search.data.features import H5FeatureSource
from ips_search.errors import ConfigError

ONE_PATCH = {  # encoder -> (IPSConfig extras, the shape of one patch): one value per channel at some BatchNorm
    "projector": ({"n_chan": 24}, (24,)),
    "resnet18": ({"n_chan": 3, "patch_size": 32, "patch_stride": 32}, (3, 32, 32)),  # layer4 runs on 1 x 1 maps
    "small-cnn": ({"n_chan": 1, "patch_size": 8, "patch_stride": 8}, (1, 8, 8)),
}


def one_patch_net(encoder: str, **extra) -> tuple[IPSNet, tuple[int, ...]]:
    settings, shape = ONE_PATCH[encoder]
    cfg = IPSConfig(encoder=encoder, dim=16, heads=2, d_k=8, d_v=8, d_inner=32, **settings, **extra)
    return IPSNet(cfg).train(), shape


def norms(encoder: nn.Module) -> list[nn.Module]:
    return [m for m in encoder.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]


@pytest.mark.parametrize("encoder", list(ONE_PATCH))
def test_a_training_batch_of_one_patch_is_normalized_with_the_running_statistics(encoder):
    """M = 1 and a batch of one image give the encoder's BatchNorms one value per channel (the projector's, a
    ResNet's 1 x 1 maps), where torch raises: that one patch is normalized as evaluation does it."""
    torch.manual_seed(0)
    net, shape = one_patch_net(encoder)
    net.encode(torch.randn(16, *shape) * 3 + 1)  # running statistics away from their init (0, 1)
    before = [copy.deepcopy(m.state_dict()) for m in norms(net.encoder)]
    x = torch.randn(1, *shape, requires_grad=True)
    out = net.encode(x)  # (1, D)
    out.sum().backward()
    assert out.shape == (1, 16) and x.grad is not None
    assert all(p.grad is not None for p in net.encoder.parameters() if p.requires_grad)
    for m, state in zip(norms(net.encoder), before, strict=True):
        assert m.training, "the BatchNorms train again after the one-patch batch"
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items()), "running statistics moved"
    with torch.no_grad():
        assert torch.allclose(out, copy.deepcopy(net).eval().encode(x), atol=1e-5)


@pytest.mark.parametrize("encoder", ["projector", "resnet18"])
def test_batches_of_two_or_more_patches_are_normalized_with_their_own_statistics(encoder):
    torch.manual_seed(1)
    net, shape = one_patch_net(encoder)
    plain = copy.deepcopy(net.encoder)  # the encoder as torch runs it in training mode
    for n in (2, 5):
        x = torch.randn(n, *shape)
        assert torch.allclose(net.encode(x), plain(x), atol=1e-5)
    for mine, theirs in zip(norms(net.encoder), norms(plain), strict=True):
        assert torch.allclose(mine.running_mean, theirs.running_mean)
        assert torch.allclose(mine.running_var, theirs.running_var)


@pytest.mark.parametrize("encoder", list(ONE_PATCH))
@pytest.mark.parametrize("B", [1, 3])
def test_a_training_step_with_one_kept_patch_of_one_image(encoder, B):
    """M = 1: a batch of one image (B = 1), or the last batch of an epoch whose train set size % B == 1."""
    torch.manual_seed(2)
    net, shape = one_patch_net(encoder, memory_size=1, iteration_size=1)
    for batch in (B, 1):  # a full batch, then the epoch's last one of one image
        mem_patch, mem_idx = net.ips(torch.randn(batch, 7, *shape))  # (batch, N = 7, *shape) -> (batch, M = 1, ...)
        logits = net(mem_patch, mem_idx)  # (batch, n_class)
        nn.functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.long)).backward()
        assert logits.shape[0] == batch and torch.isfinite(logits).all()


def write_slides(root: Path, sizes: list[int], dim: int = 8) -> None:
    """Feature files of ``sizes`` patches and a manifest whose train, val and test splits each hold both labels."""
    rng = np.random.default_rng(0)
    lines = ["slide,label,split"]
    for i, n in enumerate(sizes):
        with h5py.File(root / f"s{i}.h5", "w") as f:
            f.create_dataset("features", data=rng.standard_normal((n, dim)).astype(np.float32))
        lines.append(f"s{i},{i % 2},{('train', 'val', 'test')[i // 2 % 3]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def test_tensor_items_of_unequal_n_are_one_config_error_when_the_data_are_built(tmp_path):
    write_slides(tmp_path, [120, 1500, 300, 300, 700, 400])
    cfg = DataConfig(dataset="features", root=str(tmp_path), feature_items="tensor")
    with pytest.raises(ConfigError) as info:
        build_datasets(cfg)
    message = str(info.value)
    assert "\n" not in message and "N 120..1500" in message and "feature_items: source" in message
    with pytest.raises(ConfigError, match="N 120..1500"):
        preview_datasets(cfg)  # the dry run says it too
    for items in ("source", "auto"):  # the fix named: every slide a lazy source, of any N
        splits = build_datasets(DataConfig(dataset="features", root=str(tmp_path), feature_items=items))
        assert len(splits.train) == 2 and isinstance(splits.train[0][0], H5FeatureSource)


def test_tensor_items_of_one_n_still_batch(tmp_path):
    write_slides(tmp_path, [50] * 6)
    splits = build_datasets(DataConfig(dataset="features", root=str(tmp_path), feature_items="tensor"))
    patches, target = next(iter(DataLoader(splits.train, batch_size=2)))
    assert patches.shape == (2, 50, 8) and target["label"].tolist() == [0, 1]
