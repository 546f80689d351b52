"""Bad cohorts refused before anything runs: one class, one file in two splits, manifest paths outside
their folder, NaN / Inf features, 16-bit and planar images decoded right, and a pixel limit read from the header.

Every refusal is a one-line :class:`ConfigError` raised when the datasets are built or previewed (``--dry-run``).
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from ips_search import run
from ips_search.config import DataConfig
from ips_search.data import build_datasets, checks, preview_datasets
from ips_search.data.images import DEFAULT_MAX_PIXELS, read_header
from ips_search.data.slides import make_source, readers
from ips_search.errors import ConfigError


def one_line_error(call, *args) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def both(cfg: DataConfig) -> str:
    """The error that building and previewing (``--dry-run``) the datasets both raise: the same line."""
    built = one_line_error(build_datasets, cfg)
    assert one_line_error(preview_datasets, cfg) == built
    return built


# ---------------------------------------------------------------- cohorts on disk


def noise_png(path: Path, seed: int, size: int = 64) -> Path:
    """A distinct RGB image (random pixels: every file's content differs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    """``root/<class>/<i>.png`` with ``counts[class]`` distinct images each."""
    seed = 0
    for cls, n in counts.items():
        for i in range(n):
            seed += 1
            noise_png(root / cls / f"{i}.png", seed)
    return root


def folder_cfg(root: Path, **overrides) -> DataConfig:
    values = dict(dataset="folder", root=str(root), image_size=32, patch_size=16, n_chan=3)
    return DataConfig(**{**values, "cache_dir": str(root.parent / "cache"), **overrides})


def slides_cfg(tmp: Path, **overrides) -> DataConfig:
    values = dict(dataset="slides", patch_size=32, level=0, min_foreground=0.0, cache_dir=str(tmp / "cache"))
    return DataConfig(**{**values, **overrides})


def manifest(path: Path, rows: list[str], header: str = "path,label,split") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def write_features(path: Path, values: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=values)
    return path


def features_cohort(root: Path, labels: list[str], splits: list[str] | None = None, n: int = 6) -> Path:
    """``root/slideNN.h5`` (random distinct features) and ``root/labels.csv``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["slide,label" + (",split" if splits else "")]
    for i, label in enumerate(labels):
        write_features(root / f"slide{i:02d}.h5", rng.standard_normal((n, 4)).astype(np.float32))
        lines.append(f"slide{i:02d},{label}" + (f",{splits[i]}" if splits else ""))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def features_cfg(root: Path, **overrides) -> DataConfig:
    return DataConfig(
        **{"dataset": "features", "root": str(root), "cache_dir": str(root.parent / "cache"), **overrides}
    )


# ---------------------------------------------------------------- 1. one class


def test_a_folder_with_one_class_is_refused(tmp_path):
    root = image_folder(tmp_path / "images", {"only": 6})
    assert "has one class ('only') in all its 6 item(s)" in both(folder_cfg(root))


def test_a_folder_whose_test_folder_holds_one_class_is_refused(tmp_path):
    root = tmp_path / "images"
    image_folder(root / "train", {"a": 4, "b": 4})
    image_folder(root / "test", {"a": 3})
    for i, path in enumerate(sorted((root / "test").rglob("*.png"))):  # distinct from train's images
        noise_png(path, 100 + i)
    assert "the test split's 3 items are all of class 'a'" in both(folder_cfg(root))


def test_a_seeded_split_of_two_classes_builds(tmp_path):
    """The checks let a good cohort through: both classes in train, the seeded draws as they fall."""
    splits = build_datasets(folder_cfg(image_folder(tmp_path / "images", {"a": 5, "b": 5})))
    assert set(splits.train.targets["label"].tolist()) == {0, 1}


def test_a_slides_manifest_with_one_label_is_refused(tmp_path):
    paths = [noise_png(tmp_path / "s" / f"{i}.png", i) for i in range(4)]
    rows = [f"{p.name},tumour,{'test' if i == 3 else 'train'}" for i, p in enumerate(paths)]
    cfg = slides_cfg(tmp_path, manifest=str(manifest(tmp_path / "s" / "cohort.csv", rows)))
    assert "has one class ('tumour') in all its 4 item(s)" in both(cfg)


def test_a_slides_training_split_of_one_class_is_refused(tmp_path):
    paths = [noise_png(tmp_path / "s" / f"{i}.png", i) for i in range(5)]
    labels = ["a", "a", "a", "b", "a"]
    splits = ["train", "train", "train", "test", "test"]
    rows = [f"{p.name},{lab},{s}" for p, lab, s in zip(paths, labels, splits, strict=True)]
    cfg = slides_cfg(tmp_path, manifest=str(manifest(tmp_path / "s" / "cohort.csv", rows)))
    assert "the training split's 2 item(s) are all of class 'a'" in both(cfg)


def test_features_with_one_label_are_refused(tmp_path):
    """Numeric labels: "1" alone makes two classes (0 and 1) of which only one has slides."""
    root = features_cohort(tmp_path, ["1"] * 6, ["train", "train", "val", "val", "test", "test"])
    assert "has one class ('1') in all its 6 item(s)" in both(features_cfg(root))


def test_features_with_a_given_test_split_of_one_class_are_refused(tmp_path):
    labels = ["a", "b", "a", "b", "a", "a"]
    root = features_cohort(tmp_path, labels, ["train", "train", "val", "val", "test", "test"])
    assert "the test split's 2 items are all of class 'a'" in both(features_cfg(root))


def test_one_class_is_one_line_and_exit_2_before_ray(tmp_path, cache_dir, capsys, monkeypatch):
    """Through the command, with and without --dry-run: the driver refuses the data before Ray starts."""
    import ray

    def started(*args, **kwargs):
        pytest.fail("Ray was started")

    monkeypatch.setattr("ips_search.search.launch.start_ray", started)
    monkeypatch.setattr(ray, "init", started)
    root = image_folder(tmp_path / "images", {"only": 6})
    space = {
        "data": {"dataset": "folder", "root": str(root), "image_size": 64, "n_chan": 3},
        "model": {"encoder": "small-cnn", "dim": 32, "heads": 2, "d_k": 16, "d_v": 16, "d_inner": 64},
        "train": {"epochs": 1, "batch_size": 4, "warm_start": False},
        "search": {"patch_size": {"choices": [16]}, "memory_size": {"low": 2, "high": 4}, "lr": {"choices": [1e-3]}},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    for extra in (["--dry-run"], []):
        argv = ["--space", str(tmp_path / "space.yaml"), "--results-dir", str(tmp_path / "results"), "--no-dashboard"]
        assert run.main(argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and "one class" in err, err


# ---------------------------------------------------------------- 2. one file in two splits


def test_a_slides_manifest_naming_one_file_in_train_and_test_is_refused(tmp_path):
    paths = [noise_png(tmp_path / "s" / f"{i}.png", i) for i in range(4)]
    rows = ["0.png,a,train", "1.png,b,train", "2.png,a,train", "3.png,b,test", "./0.png,a,test"]
    cfg = slides_cfg(tmp_path, manifest=str(manifest(tmp_path / "s" / "cohort.csv", rows)))
    message = both(cfg)
    assert "are the same file" in message and str(paths[0]) in message and "0.png and test item" in message


def test_a_copy_in_another_split_is_refused_by_content(tmp_path):
    paths = [noise_png(tmp_path / "s" / f"{i}.png", i) for i in range(4)]
    shutil.copy(paths[0], tmp_path / "s" / "copy.png")
    rows = ["0.png,a,train", "1.png,b,train", "2.png,a,train", "3.png,b,test", "copy.png,a,test"]
    message = both(slides_cfg(tmp_path, manifest=str(manifest(tmp_path / "s" / "cohort.csv", rows))))
    assert "have the same content" in message and "0.png" in message and "copy.png" in message


def test_a_link_in_another_split_is_the_same_file(tmp_path):
    root = tmp_path / "images"
    image_folder(root / "train", {"a": 3, "b": 3})
    image_folder(root / "test", {"a": 1, "b": 1})
    for i, path in enumerate(sorted((root / "test").rglob("*.png"))):
        noise_png(path, 50 + i)
    os.link(root / "train" / "a" / "0.png", root / "test" / "a" / "linked.png")
    message = both(folder_cfg(root))
    assert "are the same file" in message and "linked.png" in message


def test_a_copied_feature_file_in_another_split_is_refused(tmp_path):
    root = features_cohort(tmp_path, ["a", "b", "a", "b", "a", "b"], ["train", "train", "val", "val", "test", "test"])
    shutil.copy(root / "slide00.h5", root / "slide04.h5")
    message = both(features_cfg(root))
    assert "slide00.h5" in message and "slide04.h5" in message and "same content" in message


def test_only_files_of_equal_size_are_hashed_and_a_passed_cohort_is_remembered(tmp_path, monkeypatch):
    """Sizes are compared first: a cohort of distinct sizes reads no file; above HASH_LIMIT nothing is hashed; a
    cohort that passed is not read again by the next build (every trial builds its datasets)."""
    hashed = []
    real = checks._digest
    monkeypatch.setattr(checks, "_digest", lambda path, size: hashed.append(path) or real(path, size))
    a, b, c = (tmp_path / f"{n}.bin" for n in "abc")
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 11)
    c.write_bytes(b"z" * 10)
    checks.check_disjoint({"train": [a], "test": [b]}, "cohort", str(tmp_path / "cache1"))
    assert hashed == []
    checks.check_disjoint({"train": [a], "test": [c]}, "cohort", str(tmp_path / "cache1"))  # same size: hashed
    assert sorted(hashed) == [a, c]
    hashed.clear()
    checks.check_disjoint({"train": [a], "test": [c]}, "cohort", str(tmp_path / "cache1"))  # remembered
    assert hashed == []
    c.write_bytes(b"x" * 10)
    with pytest.raises(ConfigError, match="same content"):
        checks.check_disjoint({"train": [a], "test": [c]}, "cohort", str(tmp_path / "cache2"))
    monkeypatch.setattr(checks, "HASH_LIMIT", 5)
    hashed.clear()
    checks.check_disjoint({"train": [a], "test": [c]}, "cohort", str(tmp_path / "cache3"))  # big: identity only
    assert hashed == []


# ---------------------------------------------------------------- 3. NaN / Inf features


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("items", ["tensor", "source"])
def test_non_finite_features_stop_the_read_naming_the_file(tmp_path, bad, items):
    root = features_cohort(tmp_path, ["a", "b", "a", "b", "a", "b"], ["train", "train", "val", "val", "test", "test"])
    values = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float16)
    values[3, 2] = bad
    write_features(root / "slide01.h5", values)
    splits = build_datasets(features_cfg(root, feature_items=items))  # headers only: not read yet
    good, _ = splits.train[0]
    assert torch.isfinite(good if items == "tensor" else good.read(np.arange(6))).all()
    message = one_line_error(
        (lambda: splits.train[1]) if items == "tensor" else (lambda: splits.train[1][0].read(np.array([3, 0])))
    )
    assert "slide01.h5" in message and "NaN or infinite" in message
    if items == "source":  # rows without the bad value read as before
        assert splits.train[1][0].read(np.array([0, 1])).shape == (2, 4)


# ---------------------------------------------------------------- 4. 16-bit and planar images


def test_a_16_bit_png_slide_is_scaled_not_clipped_to_white(tmp_path):
    """A dark square on bright glass, in 16 bits: convert("L") made both 255 and the slide had "no foreground"."""
    pixels = np.full((256, 256), 60000, dtype=np.uint16)
    pixels[64:192, 64:192] = 20000
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == "I;16"
    decoded = readers._decode_plain(path)
    assert decoded.shape == (256, 256, 1) and decoded.dtype == np.uint8
    assert decoded[0, 0, 0] == 60000 >> 8 and decoded[128, 128, 0] == 20000 >> 8
    source = make_source(path, slides_cfg(tmp_path, min_foreground=0.5, patch_size=64))
    assert len(source) == 4  # the 4 patches of the dark square are foreground


@pytest.mark.parametrize("tiled", [False, True])
def test_a_planar_rgb_tiff_slide_is_decoded_with_its_samples_last(tmp_path, tiled):
    rgb = np.random.default_rng(3).integers(0, 256, (3, 96, 128), dtype=np.uint8)  # (S, H, W)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, rgb, planarconfig="separate", photometric="rgb", tile=(32, 32) if tiled else None)
    assert tifffile.TiffFile(path).pages[0].planarconfig == 2
    # separate planes: OpenSlide reads them tiled; a strip TIFF (or where OpenSlide can't) is decoded whole
    assert readers.detect(path) == ("openslide" if tiled else "memmap")
    assert np.array_equal(readers._decode_plain(path), rgb.transpose(1, 2, 0))  # (H, W, 3), not (3, H, 3)
    source = make_source(path, slides_cfg(tmp_path))
    assert source.reader.dimensions[0] == (128, 96)
    x, y = source.coords[5]
    expected = torch.from_numpy(rgb[:, y : y + 32, x : x + 32].astype(np.float32) / 255)
    assert torch.equal(source.read([5])[0], expected)


def test_a_16_bit_planar_tiff_is_scaled_by_its_range(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 65536, (3, 40, 50), dtype=np.uint16)
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, rgb, planarconfig="separate", photometric="rgb")
    assert np.array_equal(readers._decode_plain(path), (rgb >> 8).astype(np.uint8).transpose(1, 2, 0))


def test_a_tiff_of_several_images_is_refused_by_name(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((4, 32, 32), dtype=np.uint8), photometric="minisblack")
    message = one_line_error(readers._decode_plain, path)
    assert "stack.tif" in message and "several images" in message


def test_a_float_image_in_0_1_is_not_black_in_a_folder(tmp_path):
    from ips_search.data.folder import load_image

    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.full((16, 16), 0.5, dtype=np.float32))
    assert Image.open(path).mode == "F"
    assert load_image(path, 16, 1)[0, 8, 8] == 127


def test_a_16_bit_png_in_a_folder_is_scaled(tmp_path):
    from ips_search.data.folder import load_image

    path = tmp_path / "deep.png"
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(path)
    assert load_image(path, 16, 1)[0, 8, 8] == 40000 >> 8  # scaled by the 16-bit range, not clipped to 255


# ---------------------------------------------------------------- 5. manifest paths outside their folder


def test_a_relative_manifest_path_escaping_its_folder_is_refused(tmp_path):
    for i in range(5):
        noise_png(tmp_path / "cohort" / f"{i}.png", i)
    outside = noise_png(tmp_path / "elsewhere.png", 9)
    rows = [
        "0.png,a,train",
        "1.png,b,train",
        "2.png,a,train",
        "3.png,b,train",
        "4.png,a,test",
        "../elsewhere.png,b,test",
    ]
    cfg = slides_cfg(tmp_path, manifest=str(manifest(tmp_path / "cohort" / "m.csv", rows)))
    message = both(cfg)
    assert "line 7" in message and "'../elsewhere.png'" in message and "outside" in message
    rows[-1] = f"{outside},b,test"  # the same file, given absolute: the user's choice
    manifest(tmp_path / "cohort" / "m.csv", rows)
    assert len(build_datasets(cfg).test) == 2


@pytest.mark.parametrize("name", ["../outside", "sub/../../outside", "ABSOLUTE"])
def test_a_feature_slide_name_outside_root_is_refused(tmp_path, name):
    root = features_cohort(tmp_path / "root", ["a", "b", "a", "b", "a", "b"])
    outside = write_features(tmp_path / "outside.h5", np.ones((6, 4), dtype=np.float32))
    name = str(outside.with_suffix("")) if name == "ABSOLUTE" else name
    lines = (root / "labels.csv").read_text().splitlines()
    lines[-1] = f"{name},b"
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    message = both(features_cfg(root))
    assert "outside" in message and repr(name + ".h5") in message


# ---------------------------------------------------------------- 6. the pixel limit


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` with a tiny (wrong) image body: it cannot be decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    body = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if Pillow decodes any pixel."""
    from PIL import ImageFile

    def load(self):
        pytest.fail("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_a_png_claiming_a_huge_size_is_refused_from_its_header(tmp_path, no_decoding):
    path = png_header_only(tmp_path / "bomb.png", 200_000, 200_000)  # 40 gigapixels, a 100-byte file
    assert path.stat().st_size < 200
    limit = Image.MAX_IMAGE_PIXELS
    message = one_line_error(readers._decode_plain, path)
    assert "bomb.png" in message and "max_pixels" in message and "not decoded" in message
    assert "has 40,000,000,000 pixels, over data.max_pixels = 1,000,000,000" in one_line_error(read_header, path)
    small = png_header_only(tmp_path / "wide.png", 50_000, 30_000)  # within Pillow's 2x: refused by our check
    assert "50000x30000 = 1,500,000,000 pixels" in one_line_error(read_header, small)
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's own limit is left as it was


def test_the_limit_is_read_from_the_header_in_a_folder_and_a_slides_manifest(tmp_path, no_decoding):
    """A limit lower than real images: refused in the dry run and in the build, before any pixel is decoded."""
    root = image_folder(tmp_path / "images", {"a": 3, "b": 3})  # 64 x 64 = 4096 pixels each
    message = both(folder_cfg(root, max_pixels=4000))
    assert "64x64 = 4,096 pixels, over data.max_pixels = 4,000" in message
    rows = ["a/0.png,a,train", "b/0.png,b,train", "a/1.png,a,train", "b/1.png,b,test"]
    cfg = slides_cfg(tmp_path, manifest=str(manifest(root / "m.csv", rows)), max_pixels=4000)
    assert "over data.max_pixels = 4,000" in both(cfg)
    tifffile.imwrite(tmp_path / "strip.tif", np.zeros((64, 64, 3), dtype=np.uint8), photometric="rgb")
    assert "over data.max_pixels" in one_line_error(readers.detect, tmp_path / "strip.tif", 4000)


def test_an_image_above_pillows_default_limit_but_within_ours_is_not_refused(tmp_path):
    """225 megapixels: Pillow alone refuses it (twice its 89 M default); with max_pixels 1 G the header passes and
    the decode is attempted (and fails here only because the crafted body is wrong)."""
    path = png_header_only(tmp_path / "big.png", 15_000, 15_000)
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert 15_000**2 < DEFAULT_MAX_PIXELS and read_header(path) == (15_000, 15_000)
    message = one_line_error(readers._decode_plain, path)
    assert "cannot read image" in message and "max_pixels" not in message
    assert Image.MAX_IMAGE_PIXELS == limit


def test_max_pixels_must_be_positive():
    from ips_search.data.images import pixel_limit

    with pytest.raises(ConfigError, match="max_pixels"):
        DataConfig(dataset="folder", max_pixels=0)
    with pytest.raises(ConfigError, match="max_pixels must be a positive number"):
        pixel_limit(-5)
    assert pixel_limit(None) == DEFAULT_MAX_PIXELS == DataConfig().max_pixels
