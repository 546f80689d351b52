"""The side-by-side benchmark against the original IPS code (benchmarks/bench_original.py), without the original
checkout: a missing checkout is one line and exit 2; the adapter feeds the original the same patches, labels and
canvas order as our loader feeds ours; the multi-label accuracy is the original's exact-match one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from repo_scripts import load_script

from ips_search.config import DataConfig, TrainConfig
from ips_search.data import build_datasets
from ips_search.train import make_loader


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_original.py")


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    cfg = DataConfig(
        dataset="megapixel",
        canvas_size=160,
        patch_size=40,
        n_noise=2,
        n_train=12,
        n_test=2,
        tasks=("majority", "max", "top", "multilabel"),
        digits="mnist",
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    return build_datasets(cfg)


@pytest.mark.parametrize("argv", [[], ["--original", "/nonexistent/ips"], ["--original", "EMPTY"]])
def test_a_missing_original_checkout_is_one_line_and_exit_2(bench, argv, tmp_path, capsys):
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]  # a folder without architecture/ips_net.py
    assert bench.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "git clone https://github.com/benbergner/ips" in err
    assert not (tmp_path / "out").exists()


def test_a_checkout_is_recognised_by_its_model_file(bench, tmp_path):
    (tmp_path / "architecture").mkdir()
    assert bench.check_original(str(tmp_path)) is None
    (tmp_path / "architecture" / "ips_net.py").write_text("")
    assert bench.check_original(str(tmp_path)) == tmp_path.resolve()


def test_the_adapter_yields_our_patches_and_labels_in_the_original_format(bench, splits):
    adapted = bench.OriginalFormat(splits.train)
    assert len(adapted) == len(splits.train)
    for i in (0, len(adapted) - 1):
        patches, targets = splits.train[i]
        item = adapted[i]
        assert set(item) == {"input", "majority", "max", "top", "multi"}
        assert item["input"].shape == (16, 1, 40, 40)  # (N, C, P, P)
        assert torch.equal(item["input"], patches)
        assert torch.equal(item["multi"], targets["multilabel"])
        for task in ("majority", "max", "top"):
            assert item[task].dtype == torch.int64 and item[task] == targets[task]


def test_the_original_sees_the_canvases_in_our_loaders_order(bench, splits):
    for seed in (0, 1):
        ours = make_loader(splits.train, TrainConfig(batch_size=4, seed=seed), shuffle=True, device=torch.device("cpu"))
        theirs = bench.original_loader(splits.train, 4, shuffle=True, seed=seed)
        for _epoch in range(2):  # each epoch draws a new order from the same seeded generator
            pairs = list(zip(ours, theirs, strict=True))
            assert len(pairs) == 3
            for (patches, targets), batch in pairs:
                assert torch.equal(batch["input"], patches)
                assert torch.equal(batch["top"], targets["top"])
    first = [b["majority"] for b in bench.original_loader(splits.train, 4, shuffle=True, seed=0)]
    other = [b["majority"] for b in bench.original_loader(splits.train, 4, shuffle=True, seed=1)]
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_multi_label_accuracy_counts_a_canvas_right_only_when_every_label_is(bench):
    labels = np.array([[1, 0, 1], [0, 1, 0]], dtype=np.float32)
    prob = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.6]])  # the second canvas has one label wrong
    assert bench.task_accuracy(prob, labels, multi_label=True) == 0.5
    assert bench.task_accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]), multi_label=False) == 0.5
    assert bench.task_accuracy(np.array([1, 0]), np.array([1, 1]), multi_label=False) == 0.5  # the original's argmax
