"""dataset: features (per-slide HDF5 embeddings), the projector encoder, and extraction."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ips_search.config import DataConfig, IPSConfig
from ips_search.data import build_datasets
from ips_search.data.features import H5FeatureSource
from ips_search.errors import ConfigError
from ips_search.extract import main
from ips_search.extraction import ExtractConfig, extract, extract_splits, parse_extract, resolve_data
from ips_search.model import IPSNet
from ips_search.model.fold import try_fold

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript encoders are supported
SOURCE = dict(dataset="megapixel", canvas_size=96, digit_size=16, n_digits=3, n_noise=4, n_train=10, n_test=4)
SOURCE_P = 16  # N = 36 patches per canvas


def write_trident(path: Path, features: np.ndarray, coords: bool = True) -> None:
    """A slide file as TRIDENT writes it: features, coords and the attributes on coords."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f["features"].attrs["name"] = path.stem
        if coords:
            n = len(features)
            f.create_dataset("coords", data=np.stack([np.arange(n) * 256, np.zeros(n, dtype=np.int64)], 1))
            f["coords"].attrs.update(
                {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20}
            )


def make_cohort(root: Path, sizes: list[int], dim: int = 8, split: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Slides of ``sizes`` patches (random float32 features) and a manifest; returns the features by slide."""
    rng = np.random.default_rng(seed)
    out, lines = {}, ["slide,label" + (",split" if split else "")]
    splits = ["train", "val", "test"]
    for i, n in enumerate(sizes):
        name = f"slide{i:02d}"
        out[name] = rng.standard_normal((n, dim)).astype(np.float32)
        write_trident(root / f"{name}.h5", out[name])
        lines.append(f"{name},{'tumor' if i % 2 else 'normal'}" + (f",{splits[i % 3]}" if split else ""))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return out


# -- reading ---------------------------------------------------------------------------------------------------------
def test_reads_trident_layout_lazily_in_any_order(tmp_path):
    feats = make_cohort(tmp_path, [7, 12, 5, 9, 20, 3])
    splits = build_datasets(DataConfig(dataset="features", root=str(tmp_path), feature_items="source"))
    assert splits.n_chan == 8 and splits.tasks[0].n_class == 2
    assert splits.n_patches == 3 and splits.grid == (1, 20)  # the smallest N bounds M; the largest, the grid
    assert [f.slide for f in splits.train.files] == ["slide00", "slide03"]
    assert splits.train.classes == ["normal", "tumor"]  # names sorted; slide03 is tumor
    source, target = splits.train[1]
    assert isinstance(source, H5FeatureSource) and len(source) == 9 and source.patch_shape == (8,)
    assert source._file is None  # nothing opened until read
    assert int(target["label"]) == 1
    index = np.array([8, 0, 3, 3, 1])  # unsorted, repeated
    got = source.read(index)
    assert got.dtype == torch.float32 and got.shape == (5, 8)
    torch.testing.assert_close(got, torch.from_numpy(feats["slide03"][index]))
    sparse = splits.train.source(1)
    torch.testing.assert_close(sparse.read(np.array([8, 0])), torch.from_numpy(feats["slide03"][[8, 0]]))
    assert source.coords.shape == (9, 2) and source.coords.dtype == np.int64
    clone = pickle.loads(pickle.dumps(source))  # a worker's source crosses to the main process without its handle
    assert clone._file is None
    torch.testing.assert_close(clone.read(np.array([2])), torch.from_numpy(feats["slide03"][[2]]))
    with pytest.raises(IndexError):
        source.read(np.array([9]))


def test_variable_n_batches_as_lists_of_sources(tmp_path):
    make_cohort(tmp_path, [7, 12, 5, 9, 20, 3, 4, 6, 8])
    splits = build_datasets(DataConfig(dataset="features", root=str(tmp_path)))  # auto: N differ -> sources
    sources, targets = next(iter(DataLoader(splits.train, batch_size=3)))
    assert isinstance(sources, list) and [len(s) for s in sources] == [7, 9, 4]
    assert targets["label"].tolist() == [0, 1, 0]


def test_equal_n_items_are_tensors_and_seeded_split(tmp_path):
    feats = make_cohort(tmp_path, [6] * 10, split=False)
    cfg = DataConfig(dataset="features", root=str(tmp_path), manifest="labels.csv", seed=1)
    splits = build_datasets(cfg)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 10 and sizes[2] == 2 and sizes[1] == 2  # test_fraction 0.2, then val_fraction 0.2 of 8
    names = [f.slide for part in (splits.train, splits.val, splits.test) for f in part.files]
    assert sorted(names) == sorted(feats)
    assert [f.slide for f in build_datasets(cfg).test.files] == [f.slide for f in splits.test.files]  # seeded
    x, _ = splits.val[0]
    torch.testing.assert_close(x, torch.from_numpy(feats[splits.val.files[0].slide]))
    batch, _ = next(iter(DataLoader(splits.train, batch_size=4)))
    assert batch.shape == (4, 6, 8)


def test_small_tensor_items_are_read_from_disk_once_per_process(tmp_path, monkeypatch):
    from ips_search.data import features

    feats = make_cohort(tmp_path, [6] * 10, split=False)
    train = build_datasets(DataConfig(dataset="features", root=str(tmp_path))).train
    opened = []
    real_open = features.H5FeatureSource.read_all
    monkeypatch.setattr(features.H5FeatureSource, "read_all", lambda self: opened.append(self.path) or real_open(self))
    for _ in range(3):  # three epochs
        items = [train[i][0] for i in range(len(train))]
    assert len(opened) == len(train)  # the first epoch read each file; the others kept them
    torch.testing.assert_close(items[0], torch.from_numpy(feats[train.files[0].slide]))
    assert pickle.loads(pickle.dumps(train))._kept == {}  # a DataLoader worker starts empty and reads its own
    monkeypatch.setattr(features, "KEEP_BYTES", 6 * 8 * 4 * 2)  # room for two items: the rest are read each time
    small = build_datasets(DataConfig(dataset="features", root=str(tmp_path))).train
    opened.clear()
    for _ in range(2):
        [small[i] for i in range(len(small))]
    assert len(opened) == 2 * len(small) - 2


# -- bad inputs ------------------------------------------------------------------------------------------------------
def _one_line_error(tmp_path: Path, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        build_datasets(DataConfig(dataset="features", root=str(tmp_path)))
    assert "\n" not in str(info.value)


def test_file_without_features_dataset(tmp_path):
    make_cohort(tmp_path, [4, 4, 4])
    with h5py.File(tmp_path / "slide01.h5", "w") as f:
        f.create_dataset("feats", data=np.zeros((4, 8)))
    _one_line_error(tmp_path, r"slide01\.h5 has no 'features' dataset \(found: feats\)")


def test_feature_widths_differ(tmp_path):
    make_cohort(tmp_path, [4, 4, 4])
    write_trident(tmp_path / "slide02.h5", np.zeros((4, 16), np.float32))
    _one_line_error(tmp_path, r"slide02\.h5 has 16-wide features but .*slide00\.h5 has 8; extract every slide")


def test_manifest_label_without_file(tmp_path):
    make_cohort(tmp_path, [4, 4, 4])
    (tmp_path / "slide01.h5").unlink()
    _one_line_error(tmp_path, r"label for slide 'slide01' but .*slide01\.h5 does not exist; add the file or remove")


def test_file_with_zero_patches(tmp_path):
    make_cohort(tmp_path, [4, 4, 4])
    write_trident(tmp_path / "slide00.h5", np.zeros((0, 8), np.float32), coords=False)
    _one_line_error(tmp_path, r"slide00\.h5 has zero patches; remove slide 'slide00'")


def test_manifest_lacking_columns(tmp_path):
    make_cohort(tmp_path, [4, 4, 4])
    (tmp_path / "labels.csv").write_text("name,label\nslide00,1\n")
    _one_line_error(tmp_path, r"labels\.csv lacks column\(s\) slide; its header must be slide,label\[,split\]")


def test_bad_extract_settings():
    with pytest.raises(ConfigError, match="unknown key"):
        parse_extract({"from": {"dataset": "megapixel"}, "encoders": "warm-start"})
    with pytest.raises(ConfigError, match="neither one of"):
        parse_extract({"from": {"dataset": "megapixel"}, "encoder": "no-such-file.pt"})
    with pytest.raises(ConfigError, match="warm-start needs dataset: megapixel"):
        parse_extract({"from": {"dataset": "folder", "root": "x"}, "encoder": "warm-start"})


# -- projector -------------------------------------------------------------------------------------------------------
def test_projector_maps_embeddings_and_folds():
    net = IPSNet(IPSConfig(encoder="projector", n_chan=24, dim=16, heads=2, d_k=8, d_v=8, d_inner=32,
                           memory_size=3, iteration_size=4))  # fmt: skip
    assert [type(m).__name__ for m in net.encoder.children()] == ["LayerNorm", "Linear", "BatchNorm1d", "ReLU"]
    x = torch.randn(2, 11, 24)  # (B, N, D_in)
    net.train()
    net(x[:, :3]).sum().backward()  # a training step's BatchNorm1d over B*M embeddings
    assert net.encoder.linear.weight.grad is not None
    with pytest.warns(UserWarning, match="folding disabled"):
        assert try_fold(net.encoder.eval()) is None  # IPS runs the projector unfolded
    mem, idx = net.ips(x)
    assert net._fold_tried and net._folded is None
    assert mem.shape == (2, 3, 24) and idx.shape == (2, 3)
    with pytest.raises(ValueError, match="expects 24-wide features, got 12"):
        net.encoder(torch.randn(3, 12))
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        IPSNet(IPSConfig(encoder="projector", pretrained=True))


# -- extraction ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frozen_encoder(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A small-cnn image encoder (eval mode) and its TorchScript file."""
    torch.manual_seed(0)
    net = IPSNet(IPSConfig(encoder="small-cnn", n_chan=1, dim=16, patch_size=SOURCE_P))
    encoder = net.encoder.eval()
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    torch.jit.save(torch.jit.trace(encoder, torch.rand(2, 1, SOURCE_P, SOURCE_P)), str(path))
    return encoder, path


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, frozen_encoder) -> tuple[Path, dict]:
    cache = str(tmp_path_factory.mktemp("feat-cache"))
    raw = {"from": {**SOURCE, "patch_size": SOURCE_P}, "encoder": str(frozen_encoder[1]), "dtype": "float32"}
    return extract(parse_extract(raw), cache_dir=cache, progress=False, device="cpu"), {"raw": raw, "cache": cache}


def test_extraction_writes_what_a_read_gives_back(extracted, frozen_encoder):
    folder, info = extracted
    images = build_datasets(DataConfig(**{**SOURCE, "patch_size": SOURCE_P}, cache_dir=info["cache"]))
    feats = build_datasets(
        resolve_data(
            DataConfig(dataset="features", extract=info["raw"], cache_dir=info["cache"], feature_items="source")
        )
    )
    assert len(feats.train) == len(images.train) and len(feats.test) == len(images.test)
    assert feats.n_chan == 16 and feats.n_patches == 36
    for i in (0, len(images.test) - 1):
        patches, target = images.test[i]
        source, ftarget = feats.test[i]
        with torch.no_grad():
            expected = frozen_encoder[0](patches)  # (N, 16)
        torch.testing.assert_close(source.read(np.arange(36)), expected, atol=1e-5, rtol=1e-4)
        assert int(ftarget["label"]) == int(target["majority"])
        assert source.coords[7].tolist() == [1 * SOURCE_P, 1 * SOURCE_P]  # row-major 6x6 grid: patch 7 = (1, 1)
    with h5py.File(folder / "test-000000.h5", "r") as f:
        assert f["coords"].attrs["patch_size"] == SOURCE_P and f["features"].dtype == np.float32
    # the same settings reuse the folder; the CLI prints it
    assert extract(parse_extract(info["raw"]), cache_dir=info["cache"], progress=False) == folder


def test_ips_over_frozen_features_keeps_the_image_selection(extracted, frozen_encoder):
    _, info = extracted
    images = build_datasets(DataConfig(**{**SOURCE, "patch_size": SOURCE_P}, cache_dir=info["cache"]))
    feats = build_datasets(resolve_data(DataConfig(dataset="features", extract=info["raw"], cache_dir=info["cache"])))
    kwargs = dict(dim=16, heads=2, d_k=8, d_v=8, d_inner=32, memory_size=5, iteration_size=4, fold_bn=False)
    torch.manual_seed(1)
    on_images = IPSNet(IPSConfig(encoder="small-cnn", n_chan=1, patch_size=SOURCE_P, **kwargs))
    on_images.encoder.load_state_dict(frozen_encoder[0].state_dict())
    on_features = IPSNet(IPSConfig(encoder="projector", n_chan=16, **kwargs))
    on_features.transf.load_state_dict(on_images.transf.state_dict())
    on_features.encoder = nn.Identity()  # the embeddings already are the frozen encoder's
    x_img = torch.stack([images.train[i][0] for i in range(4)])  # (4, 36, 1, P, P)
    x_feat = torch.stack([feats.train[i][0] for i in range(4)])  # (4, 36, 16): tensor items (equal N)
    _, idx_img = on_images.ips(x_img)
    mem_feat, idx_feat = on_features.ips(x_feat)
    assert torch.equal(idx_img, idx_feat)
    torch.testing.assert_close(mem_feat, torch.gather(x_feat, 1, idx_feat[..., None].expand(-1, -1, 16)))


def test_extraction_resumes_without_redoing_finished_images(tmp_path, extracted):
    _, info = extracted
    images = build_datasets(DataConfig(**{**SOURCE, "patch_size": SOURCE_P}, cache_dir=info["cache"]))
    splits = {"train": images.train, "val": images.val, "test": images.test}
    total = sum(len(s) for s in splits.values())
    encoded: list[int] = []  # patches per encoder call
    weight = torch.randn(SOURCE_P * SOURCE_P, 4)
    kill_at = 6

    def encoder(x: torch.Tensor) -> torch.Tensor:  # (k, 1, P, P) -> (k, 4)
        encoded.append(len(x))
        if len(encoded) == kill_at:
            raise KeyboardInterrupt  # the process dies mid-extraction
        return x.flatten(1) @ weight

    # one image (36 patches) per call: killed while encoding the 6th image, after 5 were written
    with pytest.raises(KeyboardInterrupt):
        extract_splits(splits, encoder, tmp_path, dtype="float32", batch_size=36, progress=False)
    assert len(list(tmp_path.glob("*.h5"))) == 5 and not (tmp_path / "labels.csv").exists()
    (tmp_path / "val-000000.h5.tmp").write_bytes(b"half a file")  # what a SIGKILL mid-write leaves
    encoded.clear()
    kill_at = 0
    manifest = extract_splits(splits, encoder, tmp_path, dtype="float32", batch_size=64, progress=False)
    assert sum(encoded) == (total - 5) * 36  # the 5 finished images were not encoded again
    assert max(encoded) == 64  # small images share encoder calls (36 + 28 patches)
    lines = manifest.read_text().splitlines()
    assert len(lines) == total + 1 and lines[1].startswith("train-000000,")
    assert len(list(tmp_path.glob("*.h5"))) == total and not list(tmp_path.glob("*.tmp"))
    with h5py.File(tmp_path / "val-000000.h5", "r") as f:  # the partial file was redone, not trusted
        patches, _ = images.val[0]
        np.testing.assert_allclose(f["features"][:], (patches.flatten(1) @ weight).numpy(), rtol=1e-5, atol=1e-5)
    read_back = build_datasets(DataConfig(dataset="features", root=str(tmp_path), cache_dir=info["cache"]))
    assert len(read_back.train) == len(images.train) and read_back.n_chan == 4


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    yaml_file = tmp_path / "d.yaml"
    yaml_file.write_text("data: {dataset: folder, root: nowhere}\n")
    assert main(["--data-yaml", str(yaml_file), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "warm-start needs dataset: megapixel" in err


def test_extract_config_defaults():
    cfg = ExtractConfig(source=DataConfig())
    cfg.validate("data.extract")
    assert cfg.encoder == "warm-start" and cfg.dtype == "float16"


def test_imagenet_encoder_offline_is_one_line(monkeypatch):
    from ips_search.extraction import build_frozen_encoder
    from ips_search.model import encoders

    def offline(model, arch):
        raise ConfigError(f"could not download ImageNet weights for {arch} (URLError); connect to the internet once")

    monkeypatch.setattr(encoders, "_load_imagenet_weights", offline)
    cfg = parse_extract({"from": {"dataset": "megapixel"}, "encoder": "resnet18-imagenet"})
    with pytest.raises(ConfigError, match="ImageNet weights for resnet18; .* warm-start or a TorchScript file"):
        build_frozen_encoder(cfg, progress=False)


def test_training_step_on_features_trains_projector_transformer_and_heads(extracted):
    from ips_search.config import ExperimentConfig, TrainConfig
    from ips_search.train import build_model, make_loader, make_optimizer, train_step

    _, info = extracted
    data = resolve_data(DataConfig(dataset="features", extract=info["raw"], cache_dir=info["cache"]))
    model_cfg = IPSConfig(encoder="projector", dim=16, heads=2, d_k=8, d_v=8, d_inner=32, memory_size=4,
                          iteration_size=4, fold_bn=False)  # fmt: skip
    exp = ExperimentConfig(data=data, model=model_cfg, train=TrainConfig(batch_size=4, warm_start=True))
    splits = build_datasets(data)
    device = torch.device("cpu")
    model = build_model(exp, splits, device)  # D_in from the files; warm start does not apply to features
    assert model.cfg.n_chan == 16 and model.encoder.linear.in_features == 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = next(iter(make_loader(splits.train, exp.train, shuffle=False, device=device)))
    assert x.shape == (4, 36, 16)
    train_step(model, x, y, make_optimizer(model, exp.train), exp.train, device)
    after = model.state_dict()
    for name in ("encoder.linear.weight", "encoder.norm.weight", "heads.label.weight"):
        assert not torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("transf."))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("ips_search.data.source") is None,
    reason="IPSNet.ips takes lazy sources only with ips_search.data.source",
)
def test_variable_n_training_on_sources(tmp_path):
    from ips_search.config import ExperimentConfig, TrainConfig
    from ips_search.train import fit

    rng = np.random.default_rng(0)
    make_cohort(tmp_path, [int(n) for n in rng.integers(20, 120, size=12)], dim=16)
    data = DataConfig(dataset="features", root=str(tmp_path))
    splits = build_datasets(data)
    assert isinstance(splits.train[0][0], H5FeatureSource)  # N differs per slide: lazy sources
    model = IPSConfig(encoder="projector", dim=16, heads=2, d_k=8, d_v=8, d_inner=32, memory_size=6,
                      iteration_size=6, fold_bn=False)  # fmt: skip
    exp = ExperimentConfig(data=data, model=model, train=TrainConfig(epochs=1, batch_size=3, warm_start=False))
    out = fit(exp, splits, torch.device("cpu"))
    assert out["epochs"][0]["images"] == len(splits.train) and np.isfinite(out["epochs"][0]["loss"])
    assert out["test"]["images"] == len(splits.test)


# -- where a features file's patches lie (the report's attention maps) ------------------------------------------------
def test_extracted_features_are_drawn_on_the_image_they_came_from(extracted):
    from ips_search.config import ExperimentConfig
    from ips_search.report.feature_views import FeatureViews, ImageView

    _, info = extracted
    config = ExperimentConfig(data=DataConfig(dataset="features", extract=info["raw"], cache_dir=info["cache"]))
    feats = build_datasets(resolve_data(config.data, progress=False))
    images = build_datasets(DataConfig(**{**SOURCE, "patch_size": SOURCE_P}, cache_dir=info["cache"]))
    view = FeatureViews(config)(feats.test, 2)
    assert isinstance(view, ImageView) and view.grid == (6, 6) and view.patch_size == SOURCE_P
    assert torch.equal(view.image, images.test.image(2))  # test-000002.h5 is test image 2


def test_trident_features_are_drawn_on_their_slide_or_at_their_places(tmp_path):
    from ips_search.config import ExperimentConfig
    from ips_search.data.slides.generate import make_layout
    from ips_search.data.slides.generate import write_slide as write_generated_slide
    from ips_search.report.feature_views import FeatureViews, SlideView
    from ips_search.report.slide_maps import draw_slide_attention

    make_cohort(tmp_path, [4, 5, 6, 4, 5, 6], dim=8)
    slides = tmp_path / "slides"
    slides.mkdir()
    write_generated_slide(slides / "slide02.tif", make_layout(1024, seed=0, tumour=False))
    with h5py.File(tmp_path / "slide05.h5", "a") as f:  # CLAM's attributes: the patch size at a level
        for key in ("patch_size_level0", "level0_magnification", "target_magnification"):
            del f["coords"].attrs[key]
        f["coords"].attrs.update({"patch_size": 128, "patch_level": 0})
    data = DataConfig(dataset="features", root=str(tmp_path), slides_root=str(slides), cache_dir=str(tmp_path / "c"))
    splits = build_datasets(data)
    views = FeatureViews(ExperimentConfig(data=data))
    by_name = {
        Path(ds.paths[i]).stem: (ds, i) for ds in (splits.train, splits.val, splits.test) for i in range(len(ds))
    }
    on_slide = views(*by_name["slide02"])
    assert isinstance(on_slide, SlideView) and on_slide.path == str(slides / "slide02.tif")
    assert on_slide.patch_size_level0 == 512 and on_slide.coords.shape == (6, 2)  # TRIDENT's patch_size_level0
    alone = views(*by_name["slide05"])  # no slide file: its places alone, CLAM's patch size
    assert alone.path is None and alone.patch_size_level0 == 128
    from matplotlib.figure import Figure

    for view in (on_slide, alone):
        ax = Figure().add_subplot()
        draw_slide_attention(ax, view.path, view.coords, [1, 3], view.patch_size_level0, [0.2, 0.9])
        outlined = [p for p in ax.patches if not p.get_fill()]
        assert len(outlined) == 2 + (len(view.coords) - 2) * (view.path is not None)  # kept + faint others
    with pytest.raises(ConfigError, match="slides_root .* is not a folder"):
        build_datasets(DataConfig(dataset="features", root=str(tmp_path), slides_root=str(tmp_path / "none")))


def test_random_init_encoder_is_seeded_and_named_in_the_cache_key():
    from ips_search.extraction import build_frozen_encoder, encoder_identity

    raw = {"from": {"dataset": "megapixel", "seed": 3}, "encoder": "random-init", "model": {"encoder": "small-cnn"}}
    a = build_frozen_encoder(parse_extract(raw), progress=False)
    torch.manual_seed(123)  # whatever ran before: the same weights
    b = build_frozen_encoder(parse_extract(raw), progress=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    other = build_frozen_encoder(parse_extract({**raw, "from": {"dataset": "megapixel", "seed": 4}}), progress=False)
    assert not torch.equal(next(iter(other.parameters())), next(iter(a.parameters())))
    assert encoder_identity(parse_extract(raw)) == {"kind": "random-init", "model": {"encoder": "small-cnn"}, "seed": 3}
