"""dataset: slides: lazy patch sources over generated pyramidal TIFFs, foreground, caching, bad inputs, memory."""

from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from ips_search.config import DataConfig
from ips_search.data import build_datasets
from ips_search.data.slides import generate, make_source, tissue
from ips_search.data.slides.generate import BACKGROUND, generate_cohort, make_layout, render, write_slide
from ips_search.data.slides.readers import detect
from ips_search.errors import ConfigError

SIDE = 1024


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="module")
def tumour_slide(slide_dir) -> Path:
    return write_slide(slide_dir / "tumour.tif", make_layout(SIDE, seed=7, tumour=True))


@pytest.fixture(scope="module")
def svs_slide(slide_dir) -> Path:
    return write_slide(slide_dir / "tumour.svs", make_layout(SIDE, seed=7, tumour=True), flavour="svs")


@pytest.fixture(scope="module")
def ome_slide(slide_dir) -> Path:
    """An OME-TIFF whose pyramid is in SubIFDs: OpenSlide sees one level, tifffile three."""
    image = render(make_layout(SIDE, seed=8, tumour=True), 0, 0, SIDE, SIDE)
    path = slide_dir / "scene.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        opts = dict(tile=(128, 128), compression="jpeg", photometric="rgb")
        tif.write(image, subifds=2, metadata={"axes": "YXS"}, **opts)
        tif.write(image[::2, ::2], subfiletype=1, **opts)
        tif.write(image[::4, ::4], subfiletype=1, **opts)
    return path


@pytest.fixture(scope="module")
def png_scene(slide_dir) -> Path:
    path = slide_dir / "scene.png"
    Image.fromarray(render(make_layout(SIDE, seed=9, tumour=False), 0, 0, SIDE, SIDE)).save(path)
    return path


def config(tmp_path: Path, **overrides) -> DataConfig:
    values = dict(dataset="slides", patch_size=64, level=1, cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return DataConfig(**values)


# ---------------------------------------------------------------- reading


def test_patch_equals_openslide_region(svs_slide, tmp_path):
    import openslide

    source = make_source(svs_slide, config(tmp_path))
    assert source.kind == "openslide" and source.patch_shape == (3, 64, 64)
    index = np.array([0, len(source) // 2, len(source) - 1])
    patches = source.read(index)
    assert patches.dtype == torch.float32 and patches.shape == (3, 3, 64, 64)
    with openslide.OpenSlide(str(svs_slide)) as slide:
        for patch, (x, y) in zip(patches, source.coords[index], strict=True):
            direct = np.array(slide.read_region((int(x), int(y)), 1, (64, 64)))[..., :3]
            assert torch.equal(patch, torch.from_numpy(direct).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("name", ["ome_slide", "tumour_slide"])
def test_tiff_reader_patch_equals_tifffile_level(name, request, tmp_path):
    path = request.getfixturevalue(name)
    source = make_source(path, config(tmp_path))
    assert source.kind == "tifffile"  # generic tiled TIFF and OME-TIFF (OpenSlide sees one level of the latter)
    level1 = tifffile.imread(path, level=1)  # (512, 512, 3)
    index = np.arange(0, len(source), 3)
    for patch, (x, y) in zip(source.read(index), source.coords[index], strict=True):
        direct = level1[y // 2 : y // 2 + 64, x // 2 : x // 2 + 64]
        assert torch.equal(patch, torch.from_numpy(direct).permute(2, 0, 1).float() / 255)


def test_plain_image_is_decoded_once_and_read_from_the_memory_map(png_scene, tmp_path, monkeypatch):
    from ips_search.data.slides import readers

    cfg = config(tmp_path, level=0, min_foreground=0.0)
    source = make_source(png_scene, cfg)
    assert source.kind == "memmap" and len(source) == (SIDE // 64) ** 2
    pixels = np.asarray(Image.open(png_scene))
    x, y = source.coords[37]
    assert torch.equal(
        source.read([37])[0], torch.from_numpy(np.array(pixels[y : y + 64, x : x + 64])).permute(2, 0, 1) / 255
    )
    assert isinstance(source.reader._levels[0], np.memmap)

    def no_decode(path):
        raise AssertionError("decoded again")

    monkeypatch.setattr(readers, "_decode_plain", no_decode)
    again = make_source(png_scene, cfg)  # a new reader: maps the cached pyramid
    assert torch.equal(again.read([37]), source.read([37]))


@pytest.mark.parametrize("name", ["svs_slide", "tumour_slide"])  # mpp from the description / resolution tags
def test_mpp_picks_the_level_and_resamples_between_levels(name, request, tmp_path):
    path = request.getfixturevalue(name)
    at_level1 = make_source(path, config(tmp_path, level=None, mpp=1.0))  # level 0 is 0.5 um/px
    assert (at_level1.level, at_level1.read_size) == (1, 64)
    between = make_source(path, config(tmp_path, level=None, mpp=0.75))
    assert (between.level, between.read_size) == (0, 96)  # 96 px at 0.5 um = 64 px at 0.75 um
    assert between.read([0, 1]).shape == (2, 3, 64, 64)


def test_source_pickles_without_its_file_handle(tumour_slide, tmp_path):
    source = make_source(tumour_slide, config(tmp_path))
    first = source.read([2, 4])
    copy = pickle.loads(pickle.dumps(source))
    assert copy._reader is None and torch.equal(copy.read([2, 4]), first)


# ---------------------------------------------------------------- foreground and the coordinate cache


def test_foreground_keeps_tissue_and_drops_background(tmp_path):
    layout = make_layout(2048, seed=3, tumour=False)
    path = write_slide(tmp_path / "s.tif", layout)
    source = make_source(path, config(tmp_path, min_foreground=0.5))
    everything = tissue.grid_coords(1024, 1024, 64, 64) * 2  # level-0 corners of every level-1 patch
    kept = {tuple(c) for c in source.coords.tolist()}
    n_tissue = n_glass = 0
    for x, y in everything.tolist():
        region = render(layout, x // 2, y // 2, 64, 64, scale=2.0)  # the patch as drawn, no JPEG
        glass = np.all(region == BACKGROUND, axis=-1).mean()
        if glass == 1.0:
            n_glass += 1
            assert (x, y) not in kept, f"background patch at {(x, y)} kept"
        elif glass == 0.0:
            n_tissue += 1
            assert (x, y) in kept, f"tissue patch at {(x, y)} dropped"
    assert n_tissue > 20 and n_glass > 20
    assert len(make_source(path, config(tmp_path, min_foreground=0.0))) == len(everything)


def test_second_build_reuses_cached_coordinates(tumour_slide, tmp_path, monkeypatch):
    first = make_source(tumour_slide, config(tmp_path))
    calls = []
    real = tissue.compute_coords
    monkeypatch.setattr(tissue, "compute_coords", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = make_source(tumour_slide, config(tmp_path))
    assert calls == [] and np.array_equal(again.coords, first.coords)
    make_source(tumour_slide, config(tmp_path, min_foreground=0.8))  # other settings: computed once
    assert len(calls) == 1


def test_build_datasets_from_a_generated_manifest(tmp_path):
    manifest = generate_cohort(tmp_path / "cohort", n=8, size=768, seed=1)
    rows = list(csv.DictReader(open(manifest)))
    assert {r["label"] for r in rows} == {"normal", "tumor"} and {r["split"] for r in rows} == {"train", "test"}
    splits = build_datasets(config(tmp_path, manifest=str(manifest), patch_size=32))
    assert len(splits.train) + len(splits.val) == sum(r["split"] == "train" for r in rows)
    assert len(splits.test) == sum(r["split"] == "test" for r in rows)
    assert splits.tasks[0].n_class == 2 and splits.n_chan == 3
    source, targets = splits.train[0]
    assert targets["label"].dtype == torch.int64 and targets["label"].dim() == 0
    names = [r["label"] for r in rows if Path(r["path"]).name == source.path.name]
    assert splits.train.classes[int(targets["label"])] == names[0]
    assert splits.n_patches == min(min(ds.n_patches) for ds in (splits.train, splits.val, splits.test))


def test_imagefolder_layout_and_seeded_split(tumour_slide, png_scene, tmp_path):
    root = tmp_path / "root"
    for cls, src in (("a", tumour_slide), ("b", png_scene)):
        (root / cls).mkdir(parents=True)
        for i in range(3):  # distinct files (trailing bytes): one file in two splits is refused
            (root / cls / f"{i}{src.suffix}").write_bytes(src.read_bytes() + bytes(i))
    splits = build_datasets(config(tmp_path, root=str(root), level=0, min_foreground=0.0, patch_size=256))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 6
    assert splits.train.classes == ["a", "b"] and splits.n_patches == 16


# ---------------------------------------------------------------- bad inputs


def _write_manifest(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _bad_input(kind: str, tmp: Path, tumour_slide: Path, png_scene: Path) -> tuple[DataConfig, str]:
    """A config that must fail, and a word its message must contain."""
    if kind == "corrupt":
        bad = tmp / "corrupt.svs"
        bad.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
        return config(tmp, root=None, manifest=str(_write_manifest(tmp / "m.csv", "path,label", [f"{bad},x"]))), str(
            bad
        )
    if kind == "corrupt-png":
        bad = tmp / "corrupt.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
        return config(tmp, manifest=str(_write_manifest(tmp / "m.csv", "path,label", [f"{bad},x"]))), str(bad)
    if kind == "no-test-split":
        manifest = _write_manifest(
            tmp / "m.csv", "path,label,split", [f"{tumour_slide},x,train", f"{png_scene},x,train"]
        )
        return config(tmp, manifest=str(manifest)), "test"
    if kind == "truncated":
        bad = tmp / "truncated.tif"
        data = tumour_slide.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        return config(tmp, manifest=str(_write_manifest(tmp / "m.csv", "path,label", [f"{bad},x"]))), "truncated"
    if kind == "unsupported":
        bad = tmp / "slide.xyz"
        bad.write_bytes(b"hello")
        return config(tmp, manifest=str(_write_manifest(tmp / "m.csv", "path,label", [f"{bad},x"]))), "unsupported"
    if kind == "missing-file":
        return config(tmp, manifest=str(_write_manifest(tmp / "m.csv", "path,label", ["nope.tif,x"]))), "nope.tif"
    if kind == "no-label-column":
        manifest = _write_manifest(tmp / "m.csv", "path,class", [f"{tumour_slide},x"])
        return config(tmp, manifest=str(manifest)), "label"
    if kind == "smaller-than-a-patch":
        manifest = _write_manifest(tmp / "m.csv", "path,label", [f"{tumour_slide},x"])
        return config(tmp, manifest=str(manifest), patch_size=600), "smaller than one"
    if kind == "no-foreground":
        blank = tmp / "blank.png"
        Image.new("RGB", (512, 512), (250, 250, 250)).save(blank)
        manifest = _write_manifest(tmp / "m.csv", "path,label", [f"{blank},x"])
        return config(tmp, manifest=str(manifest), level=0), "foreground"
    if kind == "missing-level":
        manifest = _write_manifest(tmp / "m.csv", "path,label", [f"{tumour_slide},x"])
        return config(tmp, manifest=str(manifest), level=9), "no level 9"
    if kind == "mpp-unknown":
        manifest = _write_manifest(tmp / "m.csv", "path,label", [f"{png_scene},x"])
        return config(tmp, manifest=str(manifest), level=None, mpp=0.5), "microns"
    raise AssertionError(kind)


BAD_INPUTS = [
    "corrupt",
    "corrupt-png",
    "no-test-split",
    "truncated",
    "unsupported",
    "missing-file",
    "no-label-column",
    "smaller-than-a-patch",
    "no-foreground",
    "missing-level",
    "mpp-unknown",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_line_config_error(kind, tmp_path, tumour_slide, png_scene, monkeypatch):
    cfg, needle = _bad_input(kind, tmp_path, tumour_slide, png_scene)
    monkeypatch.setattr(tissue, "thumbnail", _counting_thumbnail(tissue.thumbnail))
    with pytest.raises(ConfigError) as info:
        build_datasets(cfg)
    message = str(info.value)
    assert "\n" not in message and needle in message, message
    if kind not in ("no-foreground", "no-test-split"):  # found from headers, before any pixels are read
        assert _counting_thumbnail.calls == 0


def _counting_thumbnail(real):
    _counting_thumbnail.calls = 0

    def wrapper(*args, **kwargs):
        _counting_thumbnail.calls += 1
        return real(*args, **kwargs)

    return wrapper


def test_truncated_tiff_is_found_from_headers(tumour_slide, tmp_path):
    bad = tmp_path / "cut.tif"
    bad.write_bytes(tumour_slide.read_bytes()[:-1000])
    with pytest.raises(ConfigError, match="truncated"):
        detect(bad)
    assert detect(tumour_slide) == "tifffile"


def test_bad_slide_settings_are_config_errors():
    with pytest.raises(ConfigError, match="not both"):
        DataConfig(dataset="slides", level=1, mpp=0.5)
    with pytest.raises(ConfigError, match="min_foreground"):
        DataConfig(dataset="slides", min_foreground=1.5)
    with pytest.raises(ConfigError, match="root"):
        build_datasets(DataConfig(dataset="slides"))


# ---------------------------------------------------------------- memory


def test_reading_every_patch_of_a_16k_slide_keeps_host_memory_flat(tmp_path):
    """Peak RSS (VmHWM) while reading all patches of a 16k x 16k slide, 8 at a time, grows by far less than the
    768 MB the decoded level 0 would take (what it does grow by: OpenSlide's 32 MB tile cache, one batch)."""
    path = write_slide(tmp_path / "big.tif", make_layout(16384, seed=5, tumour=True, tissue_fraction=0.06))
    script = textwrap.dedent(
        f"""
        import json, numpy as np
        from ips_search.config import DataConfig
        from ips_search.data.slides import make_source

        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024

        cfg = DataConfig(dataset="slides", patch_size=256, level=0, cache_dir={str(tmp_path / "cache")!r})
        source = make_source({str(path)!r}, cfg)
        source.read(np.arange(4))
        before = hwm()
        total = 0.0
        for start in range(0, len(source), 8):
            total += float(source.read(np.arange(start, min(start + 8, len(source)))).mean())
        print(json.dumps({{"n": len(source), "before": before, "after": hwm()}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    grown_mb = (result["after"] - result["before"]) / 2**20
    assert result["n"] > 150  # a real slide's worth of patches was read
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB reading {result['n']} patches"


def test_generation_is_deterministic():
    a = render(make_layout(512, seed=4, tumour=True), 0, 0, 512, 512)
    b = render(make_layout(512, seed=4, tumour=True), 0, 0, 512, 512)
    assert np.array_equal(a, b) and not np.array_equal(a, render(make_layout(512, 5, True), 0, 0, 512, 512))
    assert generate.level_sizes(4096, 4096)[-1] == (256, 256)


# ---------------------------------------------------------------- report


def test_plot_slide_attention_outlines_the_kept_patches(tumour_slide, tmp_path):
    from matplotlib.patches import Rectangle

    from ips_search.report.slide_maps import plot_slide_attention

    source = make_source(tumour_slide, config(tmp_path))
    kept = np.array([0, 3, len(source) - 1])
    fig = plot_slide_attention(
        tumour_slide, source.coords, kept, source.patch_size_level0, scores=[0.1, 0.5, 0.9], thumbnail_size=256
    )
    ax = fig.axes[0]
    thick = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_linewidth() > 1]
    assert len(thick) == 3 and len(ax.patches) == len(source)
    scale = SIDE / ax.images[0].get_array().shape[1]  # level-0 pixels per thumbnail pixel
    assert thick[2].get_xy() == pytest.approx(tuple(source.coords[kept[2]] / scale))
    assert thick[0].get_width() == pytest.approx(128 / scale)  # 64 px at level 1
    with pytest.raises(ValueError, match="index"):
        plot_slide_attention(tumour_slide, source.coords, [len(source)], source.patch_size_level0)


def test_report_attention_draws_a_slide_trials_kept_patches_on_the_thumbnail(tmp_path):
    from matplotlib.patches import Rectangle

    from ips_search.config import ExperimentConfig, IPSConfig, TrainConfig
    from ips_search.report.attention import TrialModel, compute_attention, plot_attention
    from ips_search.train import build_model

    manifest = generate_cohort(tmp_path / "cohort", n=6, size=768, seed=2)
    data = config(tmp_path, manifest=str(manifest), patch_size=32)
    splits = build_datasets(data)
    model_cfg = IPSConfig(encoder="small-cnn", dim=16, heads=2, d_k=8, d_v=8, d_inner=32, memory_size=3,
                          iteration_size=4)  # fmt: skip
    exp = ExperimentConfig(data=data, model=model_cfg, train=TrainConfig(warm_start=False))
    model = build_model(exp, splits, torch.device("cpu"))  # orients its heads on a few slides' sources
    trial = TrialModel("t1", model, splits, exp, tmp_path / "checkpoint.pt", 0)
    maps = compute_attention(trial, n_images=2)
    assert len(maps) == 2 and all(m.source is not None and len(m.indices) == 3 for m in maps)
    kept = maps[0].source.read(maps[0].indices.numpy())  # the kept patches are read from the slide
    assert kept.shape == (3, 3, 32, 32)
    fig = plot_attention(maps, trial)
    for ax, m in zip(fig.axes, maps, strict=False):
        thick = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_linewidth() > 1]
        assert len(thick) == 3 and ax.images  # the M kept patches over the slide's thumbnail
        assert ax.get_title().startswith(f"test slide {m.index}")
