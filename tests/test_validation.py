"""Load-time validation: every config field's type and range, the features encoder, a space's paths
resolved once, ``extract --device``, and TorchScript loaded only from paths a user named."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ips_search import extract, extraction, run
from ips_search.config import RULES, DataConfig, EvaluationConfig, IPSConfig, Task, TrainConfig, build_config
from ips_search.errors import ConfigError
from ips_search.space import SPACES_DIR, load_space, saved_space, trial_config

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
SMOKE = yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())
SECTIONS = {"data": DataConfig, "model": IPSConfig, "train": TrainConfig, "evaluation": EvaluationConfig}


def _space(tmp_path: Path, doc: dict, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _smoke(section: str, key: str, value) -> dict:
    doc = json.loads(json.dumps(SMOKE))
    doc.setdefault(section, {})[key] = value
    doc["search"].pop(key, None)  # a fixed value, not a searched one
    return doc


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# -- every field: its type ------------------------------------------------------------------------------------------
def _wrong_type(hint) -> object:
    """A value of the wrong type for a field annotated ``hint``: a number where text belongs, else text."""
    text_like = hint is str or "str" in str(hint) or typing.get_origin(hint) is typing.Literal
    return 5 if text_like and "tuple" not in str(hint) else "x"


@pytest.mark.parametrize(
    ("section", "name"),
    [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)],
)
def test_every_field_refuses_a_value_of_the_wrong_type(section, name):
    """No field is unchecked, including ones added later: each names section.key and the bad value."""
    cls = SECTIONS[section]
    hint = typing.get_type_hints(cls)[name]
    value = _wrong_type(hint)
    with pytest.raises(ConfigError) as info:
        build_config(cls, {name: value}, f"{section} of space.yaml")
    message = _one_line(info)
    assert f"{section}.{name}" in message and repr(value) in message, message


def test_the_rules_table_names_only_real_fields():
    classes = {c.__name__: c for c in (Task, *SECTIONS.values())}
    assert set(RULES) == set(classes)
    for cls_name, rules in RULES.items():
        known = {f.name for f in dataclasses.fields(classes[cls_name])}
        assert set(rules) <= known, (cls_name, set(rules) - known)


# -- ranges, booleans, paths: caught when the space is loaded -------------------------------------------------------
RANGE_CASES = [
    ("model", "dropout", 1.5, "model.dropout must be a number in [0, 1), got 1.5; use a rate"),
    ("model", "attn_dropout", -0.1, "model.attn_dropout must be a number in [0, 1)"),
    ("model", "heads", 0, "model.heads must be a positive integer, got 0"),
    ("model", "d_k", 0, "model.d_k must be a positive integer"),
    ("model", "dim", -64, "model.dim must be a positive integer"),
    ("model", "d_inner", 2.5, "model.d_inner must be a positive integer, got 2.5"),
    ("model", "pretrained", "yes", "model.pretrained must be true or false, got 'yes'; write true or false without"),
    ("model", "use_pos", "true", "model.use_pos must be true or false"),
    ("model", "ips_dtype", "float16", "unknown ips_dtype 'float16' in model.ips_dtype; choose one of float32"),
    ("model", "tasks", [{"name": "label", "n_class": 0}], "model.tasks[0].n_class must be a positive integer"),
    ("model", "tasks", [{"name": "a", "n_class": 2}, {"name": "a", "n_class": 3}], "names a task twice"),
    ("data", "root", 5, "data.root must be a path (text), got 5"),
    ("data", "manifest", ["a"], "data.manifest must be a path (text), got ['a']"),
    ("data", "cache_dir", 5, "data.cache_dir must be a path"),
    ("data", "canvas_size", "big", "data.canvas_size must be a positive integer, got 'big'"),
    ("data", "min_foreground", "x", "data.min_foreground must be a number in [0, 1], got 'x'"),
    ("data", "val_fraction", 1.0, "data.val_fraction must be a number in (0, 1), got 1.0"),
    ("data", "test_fraction", 0, "data.test_fraction must be a number in (0, 1)"),
    ("data", "download", "yes", "data.download must be true or false, got 'yes'"),
    ("data", "digits", "emnist", "data.digits must be one of sklearn, mnist, mnist-full, got 'emnist'"),
    ("data", "tasks", "majority", "data.tasks must be a list, got 'majority'; write [majority]"),
    ("data", "n_noise", -1, "data.n_noise must be 0 or a positive integer"),
    ("data", "seed", -1, "data.seed must be an integer from 0 to 2**32 - 1"),
    ("data", "max_pixels", 0, "data.max_pixels must be a positive integer, got 0"),
    ("train", "num_workers", -1, "train.num_workers must be 0 or a positive integer, got -1"),
    ("train", "amp", "true", "train.amp must be true or false, got 'true'"),
    ("train", "warm_start", 1, "train.warm_start must be true or false, got 1"),
    ("train", "min_lr_ratio", 1.5, "train.min_lr_ratio must be a number in [0, 1]"),
    (
        "train",
        "grad_clip",
        0,
        "train.grad_clip must be a positive number, got 0; use a positive norm like 1.0, or null",
    ),
    ("train", "lr", "1e-4", "write 1.0e-4, not 1e-4"),
    ("train", "epochs", 2.0, "train.epochs must be a positive integer, got 2.0"),
]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"), RANGE_CASES, ids=[f"{c[0]}.{c[1]}" for c in RANGE_CASES]
)
def test_a_bad_value_is_one_line_when_the_space_loads(tmp_path, section, key, value, message):
    with pytest.raises(ConfigError) as info:
        load_space(_space(tmp_path, _smoke(section, key, value)))
    assert message in _one_line(info)


def test_a_bad_searched_value_is_refused_at_load(tmp_path):
    doc = json.loads(json.dumps(SMOKE))
    doc["search"]["dropout"] = {"low": 0.0, "high": 1.0}  # high 1.0: every trial that draws near it would raise
    with pytest.raises(ConfigError, match=r"model\.dropout must be a number in \[0, 1\), got 1\.0"):
        load_space(_space(tmp_path, doc))


def test_dropout_above_1_stops_the_search_before_ray(tmp_path, cache_dir, capsys, no_ray):
    """It used to pass the dry run, then every trial raised and the search exited 1 with a traceback."""
    argv = ["--space", _space(tmp_path, _smoke("model", "dropout", 1.5)), "--results-dir", str(tmp_path / "r")]
    for extra in ([], ["--dry-run"]):
        assert run.main([*argv, *extra, "--no-dashboard"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: model.dropout must be a number in [0, 1), got 1.5") and "\n" not in err, err


# -- dataset: features and its encoder ------------------------------------------------------------------------------
FEATURES = {
    "data": {"dataset": "features", "root": "/nowhere/features"},
    "model": {"dim": 16, "heads": 2, "d_k": 8, "d_v": 8, "d_inner": 32},
    "search": {"lr": {"low": 1.0e-4, "high": 1.0e-3, "log": True}},
}


def test_features_default_the_encoder_to_the_projector(tmp_path):
    from ips_search.model.encoders import Projector, build_encoder

    space = load_space(_space(tmp_path, FEATURES))
    assert space.to_dict()["model"]["encoder"] == "projector"  # saved explicitly with the experiment
    config = trial_config(space.fixed, {"lr": 1e-3})
    assert config.model.encoder == "projector"
    assert isinstance(build_encoder(dataclasses.replace(config.model, n_chan=24)), Projector)
    # a space saved before the default was explicit still gets it
    assert trial_config({"data": {"dataset": "features"}}, {}).model.encoder == "projector"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"encoder": "resnet18"}}, "model.encoder resnet18 reads images, but dataset: features holds patch"),
        ({"search": {"encoder": {"choices": ["projector", "small-cnn"]}}}, "model.encoder small-cnn reads images"),
        ({"data": {"dataset": "megapixel"}, "model": {"encoder": "projector"}}, "not megapixel images; choose an"),
    ],
)
def test_an_encoder_that_does_not_fit_the_data_is_one_line(tmp_path, change, message):
    doc = json.loads(json.dumps(FEATURES))
    for section, values in change.items():
        doc[section] = {**doc[section], **values}
    if doc["data"]["dataset"] == "megapixel":
        doc["data"] = {"dataset": "megapixel", "canvas_size": 64}
    with pytest.raises(ConfigError) as info:
        load_space(_space(tmp_path, doc))
    assert message in _one_line(info)


# -- paths: resolved once, against the command's working directory --------------------------------------------------
def test_relative_paths_are_resolved_against_the_cwd_at_load(tmp_path, monkeypatch):
    """Ray runs trials in another directory: the space's relative paths are made absolute when it is loaded."""
    (tmp_path / "work" / "here").mkdir(parents=True)
    (tmp_path / "enc.pt").write_bytes(b"not read here")
    doc = json.loads(json.dumps(FEATURES))
    doc["data"] = {
        "dataset": "features",
        "root": "../feats",
        "manifest": "../feats/labels.csv",
        "cache_dir": "cache",
        "slides_root": "~/slides",
        "extract": {"from": {"dataset": "folder", "root": "../../images"}, "encoder": "../../enc.pt"},
    }
    path = _space(tmp_path, doc, "spaces/space.yaml")  # the space file lives elsewhere: its folder is not the base
    monkeypatch.chdir(tmp_path / "work" / "here")
    data = load_space(path).to_dict()["data"]
    assert data["root"] == str(tmp_path / "work" / "feats")
    assert data["manifest"] == str(tmp_path / "work" / "feats" / "labels.csv")
    assert data["cache_dir"] == str(tmp_path / "work" / "here" / "cache")
    assert data["slides_root"] == str(Path("~/slides").expanduser())
    assert data["extract"]["from"]["root"] == str(tmp_path / "images")
    assert data["extract"]["encoder"] == str(tmp_path / "enc.pt")


def test_resolved_paths_survive_a_save_and_resume_from_another_cwd(tmp_path, monkeypatch):
    for sub in ("a/deeper", "b"):
        (tmp_path / sub).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    saved = load_space(_space(tmp_path, {**FEATURES, "data": {"dataset": "features", "root": "../feats"}})).to_dict()
    monkeypatch.chdir(tmp_path / "a" / "deeper")  # a resume elsewhere reads the saved absolute path unchanged
    assert saved_space(saved).fixed["data"]["root"] == str(tmp_path / "feats")


def test_experiment_json_saves_the_absolute_root(tmp_path, cache_dir, monkeypatch):
    """The real command: a folder dataset with a ``../`` root, run from a subfolder; Ray and the tuner are faked."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png"
            )
    doc = {
        "data": {"dataset": "folder", "root": "../images", "image_size": 64, "n_chan": 3},
        "model": {"encoder": "small-cnn", "dim": 32, "heads": 2, "d_k": 16, "d_v": 16, "d_inner": 64},
        "train": {"epochs": 1, "batch_size": 4, "warm_start": False},
        "search": {
            "patch_size": {"choices": [16]},
            "memory_size": {"low": 2, "high": 4},
            "lr": {"low": 1e-4, "high": 1e-3},
        },
    }
    (tmp_path / "cwd").mkdir()
    space = _space(tmp_path, doc)
    monkeypatch.chdir(tmp_path / "cwd")

    class Stop(Exception):
        pass

    def tuner(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("ips_search.search.launch.start_ray", lambda *a: {"CPU": 2.0})
    monkeypatch.setattr("ips_search.search.launch.make_tuner", tuner)
    with pytest.raises(Stop):
        run.main(["--space", space, "--results-dir", str(tmp_path / "results"), "--name", "x", "--no-dashboard"])
    saved = json.loads((tmp_path / "results" / "x" / "experiment.json").read_text())
    assert saved["space"]["data"]["root"] == str(tmp_path / "images")


# -- extract --device -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("device", "cuda", "message"),
    [
        ("gpu", 1, "--device 'gpu' is not a device; use cpu, cuda or cuda:N"),
        ("cuda:x", 1, "--device 'cuda:x' is not a device"),
        ("cuda", 0, "--device cuda asks for CUDA, but this machine has no usable CUDA GPU; use --device cpu"),
        ("cuda:1", 1, "--device cuda:1: this machine has 1 CUDA GPU(s), cuda:0 to cuda:0"),
    ],
)
def test_extract_bad_device_is_one_line_exit_2(tmp_path, capsys, monkeypatch, device, cuda, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr("ips_search.data.build_datasets", lambda *a, **k: pytest.fail("data was built"))
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"dataset": "megapixel", "canvas_size": 64}}))
    assert extract.main(["--data-yaml", str(data), "--device", device, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_extract_setting_of_the_wrong_type_names_its_nested_key():
    with pytest.raises(ConfigError, match=r"^data\.extract\.from\.canvas_size must be a positive integer, got 'big'"):
        extraction.parse_extract({"from": {"dataset": "megapixel", "canvas_size": "big"}})
    with pytest.raises(ConfigError, match=r"^data\.extract\.warm_start_steps must be a positive integer, got 0"):
        extraction.parse_extract({"from": {"dataset": "megapixel"}, "warm_start_steps": 0})


def test_the_named_extraction_encoders_are_the_ones_space_loading_leaves_alone():
    """space.py tells a TorchScript path (resolved at load) from a named encoder by config.EXTRACT_ENCODERS."""
    assert set(extraction.NAMED_ENCODERS) == {"warm-start", extraction.RANDOM_INIT, *extraction.IMAGENET}


# -- TorchScript: code, loaded only from a path a user named --------------------------------------------------------
SOURCE = {"dataset": "megapixel", "canvas_size": 64, "digit_size": 16, "n_digits": 3, "n_noise": 2, "n_train": 6,
          "n_test": 3, "patch_size": 16}  # fmt: skip


@pytest.fixture
def torchscript_file(tmp_path) -> Path:
    from ips_search.model.encoders import SmallCNN

    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.trace(SmallCNN(1, 8).eval(), torch.rand(2, 1, 16, 16)), str(path))
    return path


def _features_config(ts: Path, cache: Path) -> DataConfig:
    extract_raw = {"from": SOURCE, "encoder": str(ts), "dtype": "float32"}
    return DataConfig(dataset="features", extract=extract_raw, cache_dir=str(cache))


def test_the_report_never_loads_torchscript(tmp_path, torchscript_file, monkeypatch):
    """A features trial whose params.json names a TorchScript encoder: the report refuses to extract with it,
    and the attention maps are skipped with a note, without ``torch.jit.load`` ever being called."""
    from ips_search.report.attention import load_trial_model

    loads = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a) or pytest.fail("TorchScript was loaded"))
    cfg = _features_config(torchscript_file, tmp_path / "cache")
    with pytest.raises(ConfigError, match="the report does not run TorchScript"):
        extraction.resolve_data(cfg, progress=False, run_torchscript=False)
    trial = tmp_path / "trial_0"
    trial.mkdir()
    fixed = {"data": dataclasses.asdict(cfg), "model": {"encoder": "projector", "dim": 8}, "train": {}}
    (trial / "params.json").write_text(json.dumps({"fixed": fixed, "lr": 1e-3}))
    with pytest.raises(ConfigError, match="does not run TorchScript"):
        load_trial_model(trial)
    assert loads == []


def test_the_report_reads_features_a_user_extracted_with_torchscript(
    tmp_path, torchscript_file, cache_dir, monkeypatch
):
    """Extracted by a command that named the file (here the extract API, as the driver does), the report reads
    the extracted files and still never loads the TorchScript file."""
    cfg = _features_config(torchscript_file, tmp_path / "cache")
    folder = Path(extraction.resolve_data(cfg, progress=False).root)  # the named path: loaded once, here
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("TorchScript was loaded"))
    assert Path(extraction.resolve_data(cfg, progress=False, run_torchscript=False).root) == folder
