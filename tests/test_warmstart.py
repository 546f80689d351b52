"""Warm start: digit-patch pretraining of the encoder, cached on disk and in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ips_search import warmstart
from ips_search.config import DataConfig, IPSConfig
from ips_search.data import cache as cache_mod
from ips_search.data.digits import digit_pools, split_validation
from ips_search.errors import ConfigError
from ips_search.model.encoders import build_encoder

STEPS = 3


def _cfgs(tmp_path, **data):
    model_cfg = IPSConfig(encoder="small-cnn", dim=16, n_chan=1, patch_size=32)
    data_cfg = DataConfig(cache_dir=str(tmp_path), n_noise=20, **data)
    return model_cfg, data_cfg


def test_warm_start_trains_caches_and_loads_strictly(tmp_path, monkeypatch):
    model_cfg, data_cfg = _cfgs(tmp_path)
    state = warmstart.pretrained_encoder_state(model_cfg, data_cfg, steps=STEPS, progress=False, device="cpu")
    assert len(list(tmp_path.glob("warmstart-*.pt"))) == 1 and not list(tmp_path.glob("*.tmp"))
    encoder = build_encoder(model_cfg)
    fresh = {k: v.clone() for k, v in encoder.state_dict().items()}
    warmstart.apply_warm_start(encoder, state)  # strict: exactly the encoder's keys, no head
    assert set(state) == set(fresh)
    assert any(not torch.equal(fresh[k], v) for k, v in encoder.state_dict().items())  # weights changed

    def no_training(*args, **kwargs):
        raise AssertionError("retrained instead of loading the cache")

    monkeypatch.setattr(warmstart, "_pretrain", no_training)
    cache_mod.clear_memory_cache()
    again = warmstart.pretrained_encoder_state(model_cfg, data_cfg, steps=STEPS, progress=False)  # from disk
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    monkeypatch.setattr(cache_mod, "load", no_training)
    assert warmstart.pretrained_encoder_state(model_cfg, data_cfg, steps=STEPS, progress=False) is again  # memory
    with pytest.raises(AssertionError, match="retrained"):  # another patch size is another model
        warmstart.pretrained_encoder_state(IPSConfig(encoder="small-cnn", dim=16, patch_size=16), data_cfg, STEPS)


def test_warm_start_uses_only_train_pool(tmp_path, monkeypatch):
    """Neither the TEST pool nor the validation digits held out of the TRAIN pool reach pretraining."""
    train_pool, _ = digit_pools("sklearn", 28, 0)
    seen: list[set[int]] = []
    sampler_init = warmstart.DigitPatchSampler.__init__

    def recording_init(self, pool, *args, **kwargs):
        seen.append(set(pool.ids.tolist()))
        sampler_init(self, pool, *args, **kwargs)

    monkeypatch.setattr(warmstart.DigitPatchSampler, "__init__", recording_init)

    class Forbidden:
        def __getattr__(self, name):
            raise AssertionError("the TEST pool was used for pretraining")

        def __len__(self):
            raise AssertionError("the TEST pool was used for pretraining")

    monkeypatch.setattr(warmstart, "digit_pools", lambda *a, **k: (train_pool, Forbidden()))
    model_cfg, data_cfg = _cfgs(tmp_path)
    payload = warmstart._pretrain(model_cfg, data_cfg, 2, False, torch.device("cpu"))
    assert set(payload) >= {"encoder", "head", "train_acc", "seconds"}
    _, val_pool = split_validation(train_pool, data_cfg.val_fraction, data_cfg.seed)
    assert len(seen) == 1 and seen[0] and seen[0] <= set(train_pool.ids.tolist())
    assert not seen[0] & set(val_pool.ids.tolist())


def test_sampler_patches_and_labels():
    train_pool, _ = digit_pools("sklearn", 28, 0)
    data_cfg = DataConfig(n_noise=20)
    sampler = warmstart.DigitPatchSampler(train_pool, 32, data_cfg, n_chan=3, seed=0)
    x, y = sampler.sample(400)
    assert x.shape == (400, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and torch.equal(x[:, 0], x[:, 2])  # grey repeated over channels
    assert set(y.tolist()) == set(range(11))
    noise_share = (y == warmstart.NOISE_CLASS).float().mean().item()
    assert 0.1 < noise_share < 0.3
    ink = (x[:, 0] > 0.3).flatten(1).sum(1).float()
    assert ink[y < 10].mean() > 2 * ink[y == 10].mean()  # digit patches hold a digit
    # Same seed, same patches.
    again = warmstart.DigitPatchSampler(train_pool, 32, data_cfg, n_chan=3, seed=0).sample(400)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


def test_warm_start_errors(tmp_path):
    model_cfg, _ = _cfgs(tmp_path)
    folder_cfg = DataConfig(dataset="folder", root=str(tmp_path), cache_dir=str(tmp_path))
    assert not warmstart.supports_warm_start(folder_cfg)
    with pytest.raises(ConfigError, match="warm_start: false"):
        warmstart.pretrained_encoder_state(model_cfg, folder_cfg)
    with pytest.raises(ConfigError, match="do not fit this encoder"):
        state = build_encoder(IPSConfig(encoder="small-cnn", dim=8)).state_dict()
        warmstart.apply_warm_start(build_encoder(model_cfg), state)


def test_sampler_digit_mostly_inside_patch():
    # With no noise, every digit patch keeps >= ~60% of its digit's ink inside the patch.
    train_pool, _ = digit_pools("sklearn", 28, 0)
    sampler = warmstart.DigitPatchSampler(train_pool, 32, DataConfig(n_noise=0), n_chan=1, seed=1)
    x, y = sampler.sample(300)
    ink = x[y < 10, 0].flatten(1).sum(1).numpy()
    full_ink = np.median(train_pool.images.reshape(len(train_pool), -1).sum(1))
    assert np.quantile(ink, 0.05) > 0.4 * full_ink
    assert (x[y == 10] == 0).all()  # without noise, the 11th class is empty patches
