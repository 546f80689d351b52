"""Defects found while building cross-validated selection: a training batch of one embedding in the projector, and
tensor feature items of unequal N."""

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
from ips_search.model.encoders import Projector


def test_projector_trains_on_a_single_embedding_with_the_running_statistics():
    """M = 1 and a batch of one slide give the projector's BatchNorm one value per channel."""
    torch.manual_seed(0)
    proj = Projector(24, 16).train()
    proj(torch.randn(32, 24) * 3 + 1)  # running statistics away from their init (0, 1)
    stats = (proj.bn.running_mean.clone(), proj.bn.running_var.clone(), int(proj.bn.num_batches_tracked))
    x = torch.randn(1, 24, requires_grad=True)  # (n = 1, D_in)
    out = proj(x)  # (1, D)
    out.sum().backward()
    assert out.shape == (1, 16) and x.grad is not None and proj.linear.weight.grad is not None
    assert torch.equal(proj.bn.running_mean, stats[0]) and torch.equal(proj.bn.running_var, stats[1])
    assert int(proj.bn.num_batches_tracked) == stats[2]
    with torch.no_grad():
        assert torch.allclose(out, copy.deepcopy(proj).eval()(x))  # normalized as evaluation normalizes it


def test_projector_normalizes_batches_of_two_or_more_as_batchnorm_does():
    torch.manual_seed(1)
    proj = Projector(24, 16).train()
    plain = nn.Sequential(copy.deepcopy(proj.norm), copy.deepcopy(proj.linear), copy.deepcopy(proj.bn), nn.ReLU())
    for n in (2, 5):
        x = torch.randn(n, 24)
        assert torch.allclose(proj(x), plain(x))
    assert torch.equal(proj.bn.running_mean, plain[2].running_mean)
    assert torch.equal(proj.bn.running_var, plain[2].running_var)


@pytest.mark.parametrize("B", [1, 3])
def test_a_training_step_with_one_kept_patch_of_one_slide(B):
    """M = 1: a batch of one slide (B = 1), or the last batch of an epoch whose train set size % B == 1."""
    torch.manual_seed(2)
    cfg = IPSConfig(
        encoder="projector", n_chan=24, dim=16, heads=2, d_k=8, d_v=8, d_inner=32, memory_size=1, iteration_size=1
    )
    net = IPSNet(cfg).train()
    for batch in (B, 1):  # a full batch, then the epoch's last one of one slide
        mem_patch, mem_idx = net.ips(torch.randn(batch, 7, 24))  # (batch, N = 7, D_in) -> (batch, M = 1, D_in)
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
