"""dataset: folder decodes each image once per machine into a shared, memory-mapped array."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ips_search.config import DataConfig
from ips_search.data import build_datasets
from ips_search.data import folder as folder_mod
from ips_search.data.cache import cached_memmap, npy_path


@pytest.fixture
def image_root(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "root" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, size=(40 + 8 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "root" / cls / f"{i}.png")
    return tmp_path / "root"


def _config(root: Path, cache: Path) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), image_size=64, patch_size=16, cache_dir=str(cache))


def _forbid_decoding(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("an image was decoded again")

    monkeypatch.setattr(folder_mod, "load_image", fail)


def test_decoded_images_are_memory_mapped_and_match_load_image(image_root, tmp_path):
    paths = sorted(image_root.rglob("*.png"))
    array = folder_mod.decode_cached(paths, 64, 3, str(tmp_path / "cache"))
    assert isinstance(array, np.memmap) and not array.flags.writeable
    assert array.shape == (8, 3, 64, 64)
    for i in (0, 5):
        assert np.array_equal(array[i], folder_mod.load_image(paths[i], 64, 3))


def test_second_build_maps_the_cache_instead_of_decoding(image_root, tmp_path, monkeypatch):
    first = build_datasets(_config(image_root, tmp_path / "cache"))
    folder_mod._DECODED.clear()  # a new process: nothing in memory
    _forbid_decoding(monkeypatch)
    again = build_datasets(_config(image_root, tmp_path / "cache"))
    assert torch.equal(again.train[0][0], first.train[0][0])
    assert torch.equal(again.test[1][0], first.test[1][0])


def test_another_process_shares_the_decoded_file(image_root, tmp_path):
    build_datasets(_config(image_root, tmp_path / "cache"))
    files = list((tmp_path / "cache" / "folder-decoded").glob("*.npy"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    script = textwrap.dedent(
        f"""
        from ips_search.config import DataConfig
        from ips_search.data import build_datasets
        from ips_search.data import folder

        def fail(*args, **kwargs):
            raise SystemExit("decoded again")

        folder.load_image = fail
        cfg = DataConfig(dataset="folder", root={str(image_root)!r}, image_size=64, patch_size=16,
                         cache_dir={str(tmp_path / "cache")!r})
        print(len(build_datasets(cfg).train))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert files[0].stat().st_mtime_ns == stamp  # read, not rewritten


def test_an_edited_image_is_decoded_again(image_root, tmp_path):
    cfg = _config(image_root, tmp_path / "cache")
    build_datasets(cfg)
    folder_mod._DECODED.clear()
    changed = image_root / "cats" / "0.png"
    Image.new("RGB", (48, 48), (255, 0, 0)).save(changed)
    splits = build_datasets(cfg)
    found = [(ds, i) for ds in (splits.train, splits.val, splits.test) for i, p in enumerate(ds.paths) if p == changed]
    ((ds, i),) = found
    image = ds.image(i)  # (3, 64, 64): the new red square, padded
    assert image[0, 32, 32] == 1.0 and image[1, 32, 32] == 0.0
    assert len(list((tmp_path / "cache" / "folder-decoded").glob("*.npy"))) == 2


def test_cached_memmap_fills_once_and_is_read_only(tmp_path):
    calls = []

    def fill(out):
        calls.append(1)
        out[:] = np.arange(12, dtype=np.int32).reshape(3, 4)

    a = cached_memmap("demo", {"x": 1}, (3, 4), np.int32, fill, str(tmp_path))
    b = cached_memmap("demo", {"x": 1}, (3, 4), np.int32, fill, str(tmp_path))
    assert calls == [1] and np.array_equal(a, b) and isinstance(b, np.memmap)
    assert npy_path("demo", {"x": 1}, str(tmp_path)).exists()
    with pytest.raises(ValueError):
        b[0, 0] = 5


def test_a_failed_fill_leaves_no_file(tmp_path):
    def broken(out):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cached_memmap("demo", {"x": 2}, (2,), np.uint8, broken, str(tmp_path))
    assert not npy_path("demo", {"x": 2}, str(tmp_path)).exists()
    assert not list((tmp_path / "demo").glob("*.tmp"))
