"""Registries: a dataset kind or an encoder is one entry in its own module, and the rest of the code asks the registry.

A new dataset is registered here, in the test file alone (no other source file edited), and then loads as a space,
passes a dry run, is built, has its geometry read from the config, and trains, all through the normal paths.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from ips_search import run
from ips_search.config import DataConfig, Task
from ips_search.data import (
    DATASETS,
    DataGeometry,
    DataPreview,
    DatasetKind,
    PatchDataset,
    build_datasets,
    data_geometry,
    dataset_names,
    image_splits,
)
from ips_search.errors import ConfigError
from ips_search.model.encoders import ENCODERS
from ips_search.space import load_space, trial_config
from ips_search.train import fit, resolve_device

TINY = "tiny-squares"


def _tiny_layout(cfg: DataConfig) -> tuple[int, tuple[Task, ...]]:
    return 1, (Task("label", 2),)


def _tiny_splits(cfg: DataConfig) -> tuple[PatchDataset, PatchDataset, PatchDataset]:
    """Black ``image_size`` images; class 1 has one white square somewhere."""
    g = torch.Generator().manual_seed(cfg.seed)
    n, side, square = 24, cfg.image_size, cfg.image_size // 4
    images = torch.zeros(n, 1, side, side, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    for i in torch.nonzero(labels).flatten().tolist():
        y, x = torch.randint(0, side - square + 1, (2,), generator=g).tolist()
        images[i, :, y : y + square, x : x + square] = 255
    parts = (torch.arange(0, 16), torch.arange(16, 20), torch.arange(20, 24))
    return tuple(  # type: ignore[return-value]
        PatchDataset(images, {"label": labels}, cfg.patch_size, cfg.patch_stride, indices=idx) for idx in parts
    )


def _tiny_preview(cfg: DataConfig) -> DataPreview:
    return DataPreview(f"{TINY} ({cfg.image_size} px)", cached=False, detail="drawn on the first run")


@pytest.fixture
def tiny():
    """A whole-image dataset kind, registered for the test only."""
    kind = DATASETS.register(
        DatasetKind(
            TINY,
            build=lambda cfg: image_splits(cfg, _tiny_splits),
            preview=_tiny_preview,
            image_side=lambda cfg: cfg.image_size,
            layout=_tiny_layout,
        )
    )
    yield kind
    DATASETS.unregister(TINY)


TINY_SPACE = {
    "data": {"dataset": TINY, "image_size": 32},
    "model": {"encoder": "small-cnn", "dim": 16, "heads": 2, "d_k": 8, "d_v": 8, "d_inner": 32},
    "train": {"epochs": 1, "batch_size": 4, "warm_start": False, "device": "cpu"},
    "search": {"patch_size": {"choices": [8, 16]}, "memory_size": {"low": 1, "high": 2}},
}


def test_a_dataset_registered_outside_the_package_runs_through_the_normal_paths(tiny, tmp_path, monkeypatch, capsys):
    assert TINY in dataset_names()
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(TINY_SPACE))
    space = load_space(str(path))
    assert space.n_patches(8) == 16 and space.n_patches(16) == 4  # N from the kind's image side
    assert not space.counts_from_files

    monkeypatch.setenv("IPS_SEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("ips_search.search.launch.start_ray", lambda *a: pytest.fail("Ray was started"))
    assert run.main(["--space", str(path), "--results-dir", str(tmp_path / "results"), "--dry-run"]) == 0
    assert f"data         {TINY} (32 px): built on the first run" in capsys.readouterr().out

    exp = trial_config(space.fixed, {"patch_size": 8, "memory_size": 2})
    splits = build_datasets(exp.data)
    assert splits.geometry == data_geometry(exp.data)  # the builder and the cheap path agree
    assert splits.geometry == DataGeometry(8, 8, 1, (Task("label", 2),), 16, (4, 4), (32, 32))
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [16, 4, 4]
    result = fit(exp, splits, resolve_device("cpu"))
    assert 0.0 <= result["test"]["accuracy"] <= 1.0


def test_the_data_decides_the_models_geometry(tiny):
    cfg = DataConfig(dataset=TINY, image_size=32, patch_size=16)
    geometry = data_geometry(cfg)
    exp = trial_config({"data": {"dataset": TINY, "image_size": 32}, "model": {"encoder": "small-cnn"}}, {})
    model = geometry.model_config(exp.model)
    assert (model.patch_size, model.patch_stride, model.n_chan, model.tasks) == (16, 16, 1, (Task("label", 2),))


def test_what_a_kind_refuses_and_unknown_names_are_one_line(tiny):
    with pytest.raises(ConfigError, match=r"^unknown dataset 'imagenet' in data.dataset; choose one of .*tiny-squares"):
        build_datasets(DataConfig(dataset="imagenet"))
    slides = DATASETS["slides"]
    with pytest.raises(ConfigError, match=rf"augment_shift applies to whole images \(.*{TINY}.*\), not to slides"):
        slides.check(DataConfig(dataset="slides", augment_shift=2))
    with pytest.raises(ValueError, match="registered twice"):
        DATASETS.register(tiny)


@pytest.mark.parametrize("name", list(dataset_names()))
def test_every_registered_dataset_is_accepted_by_the_space_loader(name, tmp_path):
    doc = {"data": {"dataset": name}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    space = load_space(str(path))
    kind = DATASETS[name]
    assert space.base_config().data.dataset == name and space.counts_from_files == kind.variable_n
    assert space.base_config().model.encoder == (kind.default_encoder or "resnet18")


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_registered_encoder_is_accepted_by_the_space_loader(name, tmp_path):
    reads_features = ENCODERS[name].reads_features
    dataset = next(k.name for k in DATASETS.entries() if k.features == reads_features)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": dataset}, "model": {"encoder": name}}))
    assert load_space(str(path)).base_config().model.encoder == name


def test_the_registries_are_what_validation_names(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"model": {"encoder": "vgg"}}))
    with pytest.raises(ConfigError, match=r"unknown encoder 'vgg' in model.encoder; choose one of resnet18, "):
        load_space(str(path))
    assert ", ".join(ENCODERS) in str(pytest.raises(ConfigError, ENCODERS.get, "vgg").value)
