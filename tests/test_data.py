"""Datasets and patch utilities: shapes, patch order, labels, splits, caching, user errors."""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from ips_search.config import DataConfig
from ips_search.data import build_datasets, megapixel, patch_grid, patch_map, patchify, patchify_batch, unpatchify
from ips_search.data import cache as cache_mod
from ips_search.data import folder as folder_mod
from ips_search.data.digits import digit_pools, split_validation
from ips_search.errors import ConfigError


def notebook_patchify(img, patch_size, patch_stride):
    """Copied verbatim from the reference notebook: defines the patch index order."""
    patches = img.unfold(1, patch_size, patch_stride).unfold(2, patch_size, patch_stride).permute(1, 2, 0, 3, 4)
    patches = patches.reshape(-1, *patches.shape[2:])
    return patches


# ---------------------------------------------------------------- patches


@pytest.mark.parametrize(
    ("shape", "size", "stride"),
    [((1, 500, 500), 100, 100), ((3, 64, 96), 32, 32), ((3, 64, 96), 32, 16), ((2, 40, 40), 10, 15)],
)
def test_patchify_matches_notebook(shape, size, stride):
    img = torch.rand(shape)
    ours = patchify(img, size, stride)
    assert torch.equal(ours, notebook_patchify(img, size, stride))
    rows, cols = patch_grid(shape[1], shape[2], size, stride)
    assert ours.shape == (rows * cols, shape[0], size, size)


def test_patch_order_is_row_major():
    img = torch.arange(4 * 6, dtype=torch.float32).reshape(1, 4, 6)  # 2x3 grid of 2x2 patches
    patches = patchify(img, 2)
    assert patches.shape == (6, 1, 2, 2)
    assert [int(p[0, 0, 0]) for p in patches] == [0, 2, 4, 12, 14, 16]  # top-left pixel of each patch


@pytest.mark.parametrize(
    ("size", "stride", "H", "W"), [(16, 16, 64, 64), (16, 8, 64, 48), (16, 12, 64, 52), (8, 12, 56, 44)]
)
def test_unpatchify_round_trip(size, stride, H, W):
    img = torch.rand(3, H, W)
    patches = patchify(img, size, stride)
    back = unpatchify(patches, (H, W), stride)
    if stride <= size:
        torch.testing.assert_close(back, img)
    else:  # gaps between patches come back as 0, the rest exactly
        covered = patch_map(torch.ones(len(patches)), (H, W), size, stride) > 0
        torch.testing.assert_close(back[:, covered], img[:, covered])
        assert (back[:, ~covered] == 0).all() and (~covered).any()


def test_batched_variants_match_single():
    imgs = torch.rand(4, 3, 48, 48)
    batched = patchify_batch(imgs, 16, 8)
    assert batched.shape == (4, 25, 3, 16, 16)
    assert torch.equal(patchify(imgs, 16, 8), batched)
    for b in range(4):
        assert torch.equal(batched[b], patchify(imgs[b], 16, 8))
    torch.testing.assert_close(unpatchify(batched, (48, 48), 8), imgs)


def test_patch_map_paints_scores():
    scores = torch.arange(6, dtype=torch.float32).reshape(1, 6)  # 2x3 grid of 4x4 patches on 8x12
    m = patch_map(scores, (8, 12), 4)
    assert m.shape == (1, 8, 12)
    for n in range(6):
        r, c = divmod(n, 3)
        assert (m[0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] == n).all()
    # Overlap: the pixel shared by patches 0 and 1 (stride 2, size 4) gets their mean.
    m2 = patch_map(torch.tensor([1.0, 3.0]), (4, 6), 4, stride=2)
    assert m2.shape == (4, 6)
    assert m2[0, 0] == 1 and m2[0, 3] == 2 and m2[0, 5] == 3


def test_patch_too_large_is_config_error():
    with pytest.raises(ConfigError, match=r"patch_size 64 is larger than the 32x32 image; use a patch_size <= 32"):
        patchify(torch.zeros(1, 32, 32), 64)


@pytest.mark.parametrize(("hw", "size", "stride"), [((256, 256), 30, 30), ((500, 500), 32, 32), ((64, 64), 16, 10)])
def test_non_tiling_is_config_error_with_working_fix(hw, size, stride):
    with pytest.raises(ConfigError) as err:
        patch_grid(*hw, size, stride)
    msg = str(err.value)
    assert "\n" not in msg and "left over" in msg
    fix = int(re.search(r"e\.g\. (\d+)", msg).group(1))
    if "patch_stride" in msg:
        patch_grid(*hw, size, fix)  # the suggested stride tiles
    else:
        patch_grid(*hw, fix, fix)  # the suggested size tiles


# ---------------------------------------------------------------- digits


def test_sklearn_pools_are_disjoint_and_deterministic():
    train, test = digit_pools("sklearn", 28, seed=0)
    assert train.images.shape[1:] == (28, 28) and train.images.dtype == np.float32
    assert 0 <= train.images.min() and train.images.max() <= 1
    assert not set(train.ids.tolist()) & set(test.ids.tolist())
    assert len(train) + len(test) == 1797 and 0.7 < len(train) / 1797 < 0.8
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    train_b, _ = digit_pools("sklearn", 28, seed=1)
    assert set(train.ids.tolist()) != set(train_b.ids.tolist())  # the split follows the seed


# ---------------------------------------------------------------- megapixel

SMALL = dict(n_train=40, n_test=20, n_noise=10, tasks=("majority", "max", "top", "multilabel"))


@pytest.fixture(scope="module")
def mp_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("mp-cache"))


@pytest.fixture(scope="module")
def mp_splits(mp_cache):
    return build_datasets(DataConfig(cache_dir=mp_cache, **SMALL))


def test_megapixel_shapes_and_collate(mp_splits):
    s = mp_splits
    assert (len(s.train), len(s.val), len(s.test)) == (32, 8, 20)
    assert s.grid == (8, 8) and s.n_patches == 64 and s.n_chan == 1 and s.image_hw == (256, 256)
    assert [t.name for t in s.tasks] == ["majority", "max", "top", "multilabel"]
    assert [t.multi_label for t in s.tasks] == [False, False, False, True]
    patches, targets = s.train[0]
    assert patches.shape == (64, 1, 32, 32) and patches.dtype == torch.float32
    assert 0 <= patches.min() and patches.max() <= 1 and patches.max() > 0.5
    assert targets["majority"].dtype == torch.int64 and targets["majority"].dim() == 0
    assert targets["multilabel"].dtype == torch.float32 and targets["multilabel"].shape == (10,)
    x, y = next(iter(torch.utils.data.DataLoader(s.train, batch_size=4)))
    assert x.shape == (4, 64, 1, 32, 32)
    assert y["max"].shape == (4,) and y["multilabel"].shape == (4, 10)
    img = s.test.image(3)
    assert img.shape == (1, 256, 256)
    assert torch.equal(unpatchify(s.test[3][0], (256, 256)), img)


def test_megapixel_labels_from_metadata(mp_splits):
    for ds in (mp_splits.train, mp_splits.val, mp_splits.test):
        for i in range(len(ds)):
            classes = ds.meta["classes"][i].tolist()
            boxes = ds.meta["boxes"][i].tolist()
            _, t = ds[i]
            counts = {c: classes.count(c) for c in set(classes)}
            major = max(counts, key=counts.get)
            assert sorted(counts.values()) == [1, 1, 3]  # 3 of the target, 2 different others
            assert int(t["majority"]) == major
            assert int(t["max"]) == max(classes)
            tops = [b[0] for b in boxes]
            assert len(set(tops)) == 5  # top-most digit is unambiguous
            assert int(t["top"]) == classes[tops.index(min(tops))]
            assert t["multilabel"].tolist() == [float(c in classes) for c in range(10)]


def test_megapixel_digits_do_not_overlap_and_match_sources(mp_splits, mp_cache):
    train_pool, test_pool = digit_pools("sklearn", 28, seed=0)
    train_pool, val_pool = split_validation(train_pool, 0.2, seed=0)
    for ds, pool in ((mp_splits.train, train_pool), (mp_splits.val, val_pool), (mp_splits.test, test_pool)):
        by_id = {int(i): k for k, i in enumerate(pool.ids)}
        for i in range(len(ds)):
            canvas = (ds.image(i)[0] * 255).round()
            boxes = ds.meta["boxes"][i].tolist()
            for a in range(5):
                y0, x0, y1, x1 = boxes[a]
                assert (y1 - y0, x1 - x0) == (28, 28) and 0 <= y0 and y1 <= 256 and 0 <= x0 and x1 <= 256
                for b in range(a + 1, 5):
                    Y0, X0, Y1, X1 = boxes[b]
                    assert y1 <= Y0 or Y1 <= y0 or x1 <= X0 or X1 <= x0, "digit boxes overlap"
                # The box holds exactly its source digit (no other digit, no stroke on top), with its label.
                src = by_id[int(ds.meta["source_ids"][i, a])]
                expected = torch.from_numpy(np.rint(pool.images[src] * 255))
                assert torch.equal(canvas[y0:y1, x0:x1], expected)
                assert pool.labels[src] == ds.meta["classes"][i, a]


def test_megapixel_train_validation_and_test_digits_are_disjoint(mp_splits):
    train_pool, test_pool = digit_pools("sklearn", 28, seed=0)
    ids = {
        name: set(getattr(mp_splits, name).meta["source_ids"].flatten().tolist()) for name in ("train", "val", "test")
    }
    assert not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert not ids["train"] & ids["val"], "validation canvases must hold digits training never saw"
    assert ids["train"] | ids["val"] <= set(train_pool.ids.tolist()) and ids["test"] <= set(test_pool.ids.tolist())
    # Validation is carved out of n_train: val_fraction of the canvases.
    assert (len(mp_splits.train), len(mp_splits.val), len(mp_splits.test)) == (32, 8, 20)


def test_split_validation_holds_out_a_fraction_of_each_class():
    pool, _ = digit_pools("sklearn", 28, seed=0)
    train, val = split_validation(pool, 0.2, seed=0)
    assert not set(train.ids.tolist()) & set(val.ids.tolist()) and len(train) + len(val) == len(pool)
    for c in range(10):
        n_c = int((pool.labels == c).sum())
        assert int((val.labels == c).sum()) == round(0.2 * n_c)
    again, _ = split_validation(pool, 0.2, seed=0)
    other, _ = split_validation(pool, 0.2, seed=1)
    assert np.array_equal(train.ids, again.ids) and not np.array_equal(train.ids, other.ids)


def test_megapixel_noise_present(mp_splits):
    ds = mp_splits.test
    img = ds.image(0)[0]
    ink_outside = img.clone()
    for y0, x0, y1, x1 in ds.meta["boxes"][0].tolist():
        ink_outside[y0:y1, x0:x1] = 0
    assert (ink_outside > 0.3).sum() > 50  # scribble strokes outside the digit boxes


def test_megapixel_determinism():
    cfg = DataConfig(**SMALL, seed=3)
    a, b = megapixel.generate(cfg), megapixel.generate(cfg)
    c = megapixel.generate(DataConfig(**SMALL, seed=4))
    for split in ("train", "val", "test"):
        for key in a[split]:
            assert torch.equal(a[split][key], b[split][key])
        assert not torch.equal(a[split]["canvases"], c[split]["canvases"])


def test_megapixel_disk_and_memory_cache(tmp_path, monkeypatch):
    cfg = DataConfig(cache_dir=str(tmp_path), **SMALL)
    first = build_datasets(cfg)
    files = list(tmp_path.glob("megapixel-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    def boom(*args, **kwargs):
        raise AssertionError("regenerated instead of using the cache")

    monkeypatch.setattr(megapixel, "generate", boom)
    cache_mod.clear_memory_cache()
    second = build_datasets(cfg)  # from disk
    assert torch.equal(first.test.images, second.test.images)
    monkeypatch.setattr(cache_mod, "load", boom)
    third = build_datasets(cfg)  # from memory: neither generated nor read
    assert third.test.images.data_ptr() == second.test.images.data_ptr()  # the same stored canvases
    # A field that changes generation must not hit the cache.
    with pytest.raises(AssertionError, match="regenerated"):
        build_datasets(DataConfig(cache_dir=str(tmp_path), **{**SMALL, "n_noise": 11}))
    with pytest.raises(AssertionError, match="regenerated"):  # validation digits and canvases follow it
        build_datasets(DataConfig(cache_dir=str(tmp_path), **{**SMALL, "val_fraction": 0.5}))
    # Tasks and patch size don't change the canvases: still cached.
    build_datasets(DataConfig(cache_dir=str(tmp_path), **{**SMALL, "tasks": ("max",), "patch_size": 64}))


def test_megapixel_default_config_is_fast(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), n_noise=20)
    digit_pools("sklearn", 28, 0)  # exclude the one-off scikit-learn import
    start = time.perf_counter()
    data = megapixel.generate(cfg)
    assert time.perf_counter() - start < 20  # ~2 s here
    assert data["train"]["canvases"].shape == (1200, 256, 256) and data["train"]["canvases"].dtype == torch.uint8
    assert data["val"]["canvases"].shape == (300, 256, 256)
    # 5 digits cover < 10% of the canvas.
    assert 5 * 28 * 28 / 256**2 < 0.1


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        (dict(n_digits=30), "n_digits must be between"),
        (dict(canvas_size=64, n_digits=5), "do not fit"),
        (dict(digit_size=300), "larger than canvas_size"),
        (dict(tasks=()), "tasks is empty"),
        (dict(patch_size=30), "does not tile"),
    ],
)
def test_megapixel_config_errors(tmp_path, fields, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_datasets(DataConfig(cache_dir=str(tmp_path), **{**SMALL, **fields}))


# ---------------------------------------------------------------- MNIST


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's big-endian idx format (uint8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path) -> str:
    """A tiny MNIST on disk: train images are filled with 10 + label, test images with 200 + label."""
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for prefix, n, base in (("train", 60, 10), ("t10k", 30, 200)):
        labels = rng.integers(0, 10, n)
        labels[:10] = np.arange(10)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 4:24, 8:20] = (base + labels)[:, None, None]
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return str(tmp_path)


def test_mnist_resized_uses_real_test_split(fake_mnist):
    cfg = DataConfig(
        dataset="mnist-resized", cache_dir=fake_mnist, image_size=100, patch_size=20, n_train=40, n_test=30
    )
    s = build_datasets(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (32, 8, 30)
    assert s.grid == (5, 5) and s.n_patches == 25 and [t.name for t in s.tasks] == ["label"]
    patches, t = s.test[0]
    assert patches.shape == (25, 1, 20, 20) and t["label"].dtype == torch.int64
    for ds, base in ((s.train, 10), (s.val, 10), (s.test, 200)):
        for i in range(len(ds)):
            img = ds.image(i)
            assert img.shape == (1, 100, 100)
            # The centre pixel identifies the source split and must agree with the label.
            assert round(float(img[0, 50, 50]) * 255) == base + int(ds[i][1]["label"])


def test_mnist_missing_without_download(tmp_path):
    cfg = DataConfig(dataset="mnist-resized", cache_dir=str(tmp_path), patch_size=100)
    with pytest.raises(ConfigError, match="MNIST is not on disk.*download: true"):
        build_datasets(cfg)
    with pytest.raises(ConfigError, match="use digits: mnist \\(5,000 packaged, offline\\)"):
        build_datasets(DataConfig(digits="mnist-full", cache_dir=str(tmp_path), **SMALL))


def test_mnist_offline_download_is_config_error(tmp_path, monkeypatch):
    from torchvision.datasets import mnist as tv_mnist

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    cfg = DataConfig(dataset="mnist-resized", cache_dir=str(tmp_path), patch_size=100, download=True)
    with pytest.raises(ConfigError) as err:
        build_datasets(cfg)
    msg = str(err.value)
    assert msg.startswith("could not download MNIST") and "connect to the internet" in msg and "\n" not in msg


def test_megapixel_from_mnist_digits(fake_mnist):
    cfg = DataConfig(digits="mnist-full", cache_dir=fake_mnist, n_train=6, n_test=4, n_noise=0, tasks=("majority",))
    s = build_datasets(cfg)
    train_ids = set(s.train.meta["source_ids"].flatten().tolist()) | set(s.val.meta["source_ids"].flatten().tolist())
    test_ids = set(s.test.meta["source_ids"].flatten().tolist())
    assert max(train_ids) < 60 and min(test_ids) >= 60_000  # MNIST train split vs its test split


# ---------------------------------------------------------------- folder

COLORS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 200)}


def _write_folder(root: Path, per_class: int = 4) -> None:
    for k, (name, color) in enumerate(COLORS.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (40 + 7 * i, 20 + 3 * k)  # varied sizes and aspect ratios
            Image.new("RGB", size, color).save(root / name / f"{i}.png")
    Image.new("L", (30, 30), 180).save(root / "cat" / "gray.jpg")  # grayscale image in an RGB folder
    (root / "dog" / "notes.txt").write_text("not an image")


def test_folder_dataset(tmp_path):
    _write_folder(tmp_path)
    s = build_datasets(DataConfig(dataset="folder", root=str(tmp_path), image_size=64, patch_size=16, n_chan=3))
    assert s.tasks[0].name == "label" and s.tasks[0].n_class == 3
    assert s.n_chan == 3 and s.grid == (4, 4) and s.n_patches == 16
    assert len(s.train) + len(s.val) + len(s.test) == 13 and len(s.test) == 3  # 20% of 13, rounded
    for ds in (s.train, s.val, s.test):
        for i in range(len(ds)):
            patches, t = ds[i]
            assert patches.shape == (16, 3, 16, 16)
            img, path = ds.image(i), ds.paths[i]
            assert ds.classes[int(t["label"])] == path.parent.name
            centre = (img[:, 32, 32] * 255).round().tolist()
            if path.name == "gray.jpg":
                assert centre[0] == centre[1] == centre[2]  # grey repeated over RGB
            else:
                assert centre == list(COLORS[path.parent.name])
            assert img[:, 0, 0].sum() == 0 or img[:, 63, 63].sum() == 0 or path.name == "gray.jpg"  # padding


def _png_text(text: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("id", text)
    return info


def test_folder_keeps_aspect_and_pads(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for cls in "ab":
        for i in range(3):  # the same pixels, distinct files (one file in two splits is refused)
            Image.new("L", (80, 40), 255).save(tmp_path / cls / f"{i}.png", pnginfo=_png_text(cls + str(i)))
    s = build_datasets(DataConfig(dataset="folder", root=str(tmp_path), image_size=32, patch_size=16, n_chan=1))
    img = s.train.image(0)[0]
    assert img.shape == (32, 32)
    assert (img[8:24] == 1).all() and (img[:8] == 0).all() and (img[24:] == 0).all()  # 80x40 -> 32x16, centred


def test_folder_train_test_layout(tmp_path):
    for split, n in (("train", 5), ("test", 2)):
        for cls in ("x", "y"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (i, ord(cls), len(split))).save(tmp_path / split / cls / f"{i}.png")
    s = build_datasets(DataConfig(dataset="folder", root=str(tmp_path), image_size=20, patch_size=10, n_chan=1))
    assert (len(s.train), len(s.val), len(s.test)) == (8, 2, 4)
    assert all(p.parts[-3] == "test" for p in s.test.paths)
    assert all(p.parts[-3] == "train" for p in s.train.paths + s.val.paths)


def _folder_cfg(root) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), image_size=32, patch_size=16)


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_datasets(_folder_cfg(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no class folders"):
        build_datasets(_folder_cfg(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (i, 0, 0)).save(tmp_path / "a" / f"{i}.png")
    with pytest.raises(ConfigError, match=r"class folder .*b has no images"):
        build_datasets(_folder_cfg(tmp_path))
    good = tmp_path / "b" / "ok.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    Image.new("RGB", (64, 64), (4, 5, 6)).save(tmp_path / "b" / "ok2.png")  # train holds both classes
    build_datasets(_folder_cfg(tmp_path))  # now fine
    bad = tmp_path / "b" / "broken.png"
    bad.write_bytes(good.read_bytes()[:60])  # truncated
    with pytest.raises(ConfigError, match=r"cannot read image .*broken\.png") as err:
        build_datasets(_folder_cfg(tmp_path))
    assert "\n" not in str(err.value)
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(ConfigError, match=r"broken\.png"):
        build_datasets(_folder_cfg(tmp_path))


def test_folder_truncated_jpeg(tmp_path):
    for cls in "ab":
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (16, 16), (i, ord(cls), 0)).save(tmp_path / cls / f"{i}.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a" / "photo.jpg")
    data = (tmp_path / "a" / "photo.jpg").read_bytes()
    (tmp_path / "a" / "photo.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"photo\.jpg"):
        folder_mod.build(_folder_cfg(tmp_path))


def test_folder_needs_root():
    with pytest.raises(ConfigError, match="needs root"):
        build_datasets(DataConfig(dataset="folder", image_size=32, patch_size=16))


def test_augmented_digits_change_only_train_canvases():
    plain = megapixel.generate(DataConfig(**SMALL))
    jittered = megapixel.generate(DataConfig(**SMALL, augment_digits=True))
    assert torch.equal(jittered["train"]["classes"], plain["train"]["classes"])  # same scenes, labels and boxes
    assert torch.equal(jittered["train"]["boxes"], plain["train"]["boxes"])
    assert not torch.equal(jittered["train"]["canvases"], plain["train"]["canvases"])
    for split in ("val", "test"):  # evaluation canvases hold the digits as they are
        assert torch.equal(jittered[split]["canvases"], plain[split]["canvases"])
    again = megapixel.generate(DataConfig(**SMALL, augment_digits=True))
    assert torch.equal(again["train"]["canvases"], jittered["train"]["canvases"])  # still deterministic


def test_augment_shift_moves_only_training_images(mp_cache):
    shifted = build_datasets(DataConfig(cache_dir=mp_cache, augment_shift=8, **SMALL))
    plain = build_datasets(DataConfig(cache_dir=mp_cache, **SMALL))
    for split in ("val", "test"):  # evaluation stays deterministic and equal to the unshifted data
        assert torch.equal(getattr(shifted, split)[0][0], getattr(plain, split)[0][0])
    torch.manual_seed(0)
    reads = [shifted.train[3][0] for _ in range(4)]  # (N, C, P, P) each
    assert any(not torch.equal(r, reads[0]) for r in reads[1:])  # each read cuts the canvas differently
    image, side = plain.train.image(3), plain.image_hw[0]  # (C, H, W)
    for patches in reads:  # every read is the canvas translated by at most 8 px, zero filled
        moved = unpatchify(patches, plain.image_hw)
        matches = [
            (dy, dx)
            for dy in range(-8, 9)
            for dx in range(-8, 9)
            if torch.equal(moved, _translate(image, dy, dx, side))
        ]
        assert len(matches) == 1
    assert torch.equal(shifted.train.image(3), image)  # maps and previews draw the image where it is
    assert torch.equal(shifted.train[3][1]["majority"], plain.train[3][1]["majority"])


def _translate(image: torch.Tensor, dy: int, dx: int, side: int) -> torch.Tensor:
    """``image`` moved down by dy and right by dx, zero filled."""
    out = torch.zeros_like(image)
    src = image[:, max(0, -dy) : side - max(0, dy), max(0, -dx) : side - max(0, dx)]
    out[:, max(0, dy) : max(0, dy) + src.shape[1], max(0, dx) : max(0, dx) + src.shape[2]] = src
    return out


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        (dict(augment_shift=-1), "augment_shift must be 0 or a positive"),
        (dict(augment_shift=True), "augment_shift must be 0 or a positive"),
        (dict(dataset="slides", augment_shift=4), "augment_shift applies to whole images"),
    ],
)
def test_augment_shift_errors(fields, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_datasets(DataConfig(**fields))  # what a dataset kind accepts is checked before anything is built


def test_jitter_keeps_a_digit_recognisably_in_place():
    pool, _ = digit_pools("sklearn", 28, seed=0)
    rng = np.random.default_rng(0)
    for image in pool.images[:20]:
        out = megapixel.jitter_digit(image, rng)
        assert out.shape == image.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        assert not np.array_equal(out, image)
        assert np.corrcoef(out.ravel(), image.ravel())[0, 1] > 0.4  # a distortion, not a different picture


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="RSS meter needs Linux")
def test_cache_files_are_memory_mapped_not_read_whole(tmp_path):
    """A trial reads only the canvases it touches: loading a 160 MB cache file adds little resident memory."""
    from ips_search.memory import PeakMemory

    path = tmp_path / "big.pt"
    cache_mod.save_atomic({"images": torch.full((160, 1000, 1000), 7, dtype=torch.uint8)}, path)
    with PeakMemory("cpu") as mem:
        images = cache_mod.load(path)["images"]
        first = int(images[0, 0, 0])
    assert first == 7 and images.shape == (160, 1000, 1000)
    assert mem.peak_mb < 40, mem.peak_mb  # read whole, it would be 160 MB
