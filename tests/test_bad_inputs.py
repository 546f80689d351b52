"""Bad inputs: every one is exit 2 with exactly one stderr line naming the problem, and Ray never starts.

Each case builds its input in ``tmp_path`` (a space YAML, an image folder, a results folder) and runs the real
command, ``run.main([...])``, without ``--dry-run``: with ``ips_search.search.launch.start_ray`` and ``ray.init``
made to fail the test, a case passes only if the problem is caught before the search would start.
docs/reliability.md tables every case with the line it prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ips_search import run
from ips_search.errors import ConfigError
from ips_search.experiment.settings import check_resume
from ips_search.search import cli
from ips_search.space import SPACES_DIR

SMOKE = yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())  # canvas 128, P=32: N=16


def smoke(drop: tuple[str, ...] = (), **changes) -> str:
    """The smoke space with ``section__key=value`` changes (``drop``: ``section__key`` entries to remove)."""
    doc = json.loads(json.dumps(SMOKE))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        doc.setdefault(section, {})[key] = value
    for dotted in drop:
        section, key = dotted.split("__")
        doc[section].pop(key)
    return yaml.safe_dump(doc)


def folder_space(root: Path) -> str:
    return yaml.safe_dump(
        {
            "data": {"dataset": "folder", "root": str(root), "image_size": 64, "n_chan": 3},
            "model": {"encoder": "small-cnn", "dim": 32, "heads": 2, "d_k": 16, "d_v": 16, "d_inner": 64},
            "train": {"epochs": 1, "batch_size": 4, "warm_start": False},
            "search": {
                "patch_size": {"choices": [16]},
                "memory_size": {"low": 2, "high": 4},
                "iteration_size": {"low": 2, "high": 4},
                "lr": {"low": 1.0e-4, "high": 1.0e-3, "log": True},
            },
        }
    )


def write_images(root: Path, per_class: int = 3, grayscale: int = 0) -> None:
    """Two classes of small random RGB PNGs (plus ``grayscale`` single-channel ones in class ``a``)."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    for i in range(grayscale):
        Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8), "L").save(root / "a" / f"gray{i}.png")


# ------------------------------------------------------------------ case builders: tmp_path -> extra argv


def space_case(text: str | bytes) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        path = tmp / "space.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--space", str(path)]

    return build


def folder_case(fill: Callable[[Path], None] | None) -> Callable[[Path], list[str]]:
    """A folder-dataset space whose root is prepared by ``fill`` (None: the root does not exist)."""

    def build(tmp: Path) -> list[str]:
        root = tmp / "images"
        if fill is not None:
            root.mkdir()
            fill(root)
        (tmp / "space.yaml").write_text(folder_space(root))
        return ["--space", str(tmp / "space.yaml")]

    return build


def args_case(*argv: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(argv)


def resume_case(name: str, files: dict[str, str]) -> Callable[[Path], list[str]]:
    """``--resume name`` where ``results/name/`` holds ``files`` (none: the folder does not exist)."""

    def build(tmp: Path) -> list[str]:
        if files:
            (tmp / "results" / name).mkdir()
            for rel, text in files.items():
                (tmp / "results" / name / rel).write_text(text)
        return ["--resume", name]

    return build


def saved(settings: dict | None = None, space: dict | None = None) -> str:
    """A valid ``experiment.json`` of the smoke space, with ``settings`` / ``space`` keys changed."""
    doc = {
        "tool": "ips-search",
        "version": 1,
        "settings": {"name": "x", "results_dir": "results", "space": "smoke", **(settings or {})},
        "space": {"name": "smoke", **SMOKE, **(space or {})},
    }
    return json.dumps(doc)


def _truncated_png(root: Path) -> None:
    write_images(root)
    data = (root / "a" / "0.png").read_bytes()
    (root / "a" / "0.png").write_bytes(data[: len(data) // 2])


def _not_an_image(root: Path) -> None:
    write_images(root)
    (root / "b" / "notes.png").write_text("this is not a PNG")


def _empty_class(root: Path) -> None:
    write_images(root)
    (root / "c").mkdir()


@dataclass
class Case:
    build: Callable[[Path], list[str]]
    message: str  # a substring of the one error line (case-insensitive)
    bug: str | None = None  # why this is a product bug (the case is a strict xfail)


CASES: dict[str, Case] = {
    # --- the space file itself
    "yaml-syntax": Case(space_case("data: {dataset: megapixel\nsearch: ["), "is not valid YAML"),
    "yaml-list-not-mapping": Case(space_case("- data\n- search\n"), "must be a YAML mapping"),
    "yaml-python-tag": Case(space_case("data: !!python/object/apply:os.system [echo hi]\n"), "not allowed"),
    "space-file-binary": Case(
        space_case(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"),
        "space.yaml",
    ),
    "space-file-empty": Case(space_case("# nothing but a comment\n"), "is empty"),
    "space-not-found": Case(args_case("--space", "no-such-space"), "search space 'no-such-space' not found"),
    "unknown-section": Case(space_case(smoke() + "trian: {epochs: 3}\n"), "unknown section(s) trian"),
    "section-is-a-list": Case(space_case("data: [1, 2]\n"), "section 'data'"),
    "search-is-a-list": Case(space_case("search: [lr, patch_size]\n"), "search"),
    # --- wrong types, unknown keys
    "batch-size-string": Case(space_case(smoke(train__batch_size="big")), "batch_size must be a positive integer"),
    "lr-string": Case(space_case(smoke(train__lr="fast", drop=("search__lr",))), "lr must be a positive number"),
    "epochs-float": Case(space_case(smoke(train__epochs=2.5)), "epochs must be a positive integer"),
    "weight-decay-string": Case(
        space_case(smoke(train__weight_decay="lots")),
        "weight_decay",
    ),
    "device-gpu": Case(
        space_case(smoke(train__device="gpu")),
        "device",
    ),
    "unknown-model-key": Case(space_case(smoke(model__encodr="resnet18")), "unknown key(s) encodr"),
    "unknown-search-param": Case(
        space_case(smoke(search__momentum={"low": 0.1, "high": 0.9})), "unknown parameter 'momentum'"
    ),
    "search-range-unknown-key": Case(
        space_case(smoke(search__lr={"min": 1e-4, "max": 1e-3})), "unknown key(s) max, min"
    ),
    "yaml-1e-4-is-a-string": Case(
        space_case(smoke().replace("0.0001", "1e-4")), "needs numeric low and high"
    ),  # YAML 1.1 reads 1e-4 (no dot) as a string
    "empty-choices": Case(space_case(smoke(search__lr={"choices": []})), "must be a non-empty list"),
    "patch-size-choice-string": Case(
        space_case(smoke(search__patch_size={"choices": ["big"]})),
        "patch_size",
    ),
    # --- negative or zero sizes, empty ranges
    "canvas-negative": Case(space_case(smoke(data__canvas_size=-128)), "canvas_size must be a positive integer"),
    "batch-size-zero": Case(space_case(smoke(train__batch_size=0)), "batch_size must be a positive integer"),
    "dim-zero": Case(space_case(smoke(model__dim=0)), "dim must be a positive integer"),
    "log-range-from-zero": Case(
        space_case(smoke(search__lr={"low": 0.0, "high": 1e-3, "log": True})), "log ranges need low > 0"
    ),
    "reversed-range": Case(space_case(smoke(search__lr={"low": 1e-2, "high": 1e-3})), "empty or invalid range"),
    "negative-lr-range": Case(
        space_case(smoke(search__lr={"low": -1.0, "high": 1.0})),
        "lr",
    ),
    "data-patch-stride-zero": Case(
        space_case(smoke(data__patch_stride=0)),
        "patch_stride",
    ),
    # --- patch size vs image, M and I vs N
    "patch-larger-than-image": Case(
        space_case(smoke(search__patch_size={"choices": [256]})), "leaves 0 patch(es) per image"
    ),
    "memory-low-equals-n": Case(
        space_case(smoke(search__memory_size={"low": 16, "high": 20})), "memory_size low=16 in"
    ),
    "fixed-memory-equals-n": Case(
        space_case(smoke(model__memory_size=16, drop=("search__memory_size", "search__iteration_size"))),
        "memory_size low=16 in",
    ),
    "iteration-above-n-minus-m": Case(
        space_case(smoke(search__iteration_size={"low": 15, "high": 16})), "iteration_size low=15"
    ),
    "first-config-outside-range": Case(
        space_case(smoke() + "first: [{memory_size: 100}]\n"),
        "memory_size must be in",
    ),
    # --- dataset, encoder, task
    "unknown-dataset": Case(space_case(smoke(data__dataset="imagenet")), "unknown dataset 'imagenet'"),
    "unknown-encoder": Case(space_case(smoke(model__encoder="resnet9000")), "unknown encoder 'resnet9000'"),
    "unknown-task": Case(space_case(smoke(data__tasks=["median"])), "unknown task 'median'"),
    "mnist-not-downloaded": Case(
        space_case(smoke(data__dataset="mnist-resized", data__image_size=64)), "MNIST is not on disk"
    ),
    # --- image folders
    "folder-missing": Case(folder_case(None), "does not exist or is not a folder"),
    "folder-empty": Case(folder_case(lambda root: None), "no class folders in"),
    "folder-class-without-images": Case(folder_case(_empty_class), "has no images"),
    "folder-too-few-images": Case(folder_case(lambda root: write_images(root, per_class=1)), "need at least 3"),
    "folder-truncated-image": Case(folder_case(_truncated_png), "cannot read image"),
    "folder-not-an-image": Case(folder_case(_not_an_image), "notes.png"),
    # --- command-line arguments
    "trials-zero": Case(args_case("--space", "smoke", "--trials", "0"), "--trials must be at least 1"),
    "cpus-per-trial-zero": Case(args_case("--space", "smoke", "--cpus-per-trial", "0"), "--cpus-per-trial must be > 0"),
    "gpus-per-trial-fractional-above-1": Case(
        args_case("--space", "smoke", "--gpus-per-trial", "1.5"), "must be whole"
    ),
    "grace-period-zero": Case(
        args_case("--space", "smoke", "--scheduler", "asha", "--grace-period", "0"), "--grace-period must be at least 1"
    ),
    "reduction-factor-one": Case(
        args_case("--space", "smoke", "--scheduler", "asha", "--reduction-factor", "1"),
        "--reduction-factor must be at least 2",
    ),
    # FIFO (the default) has no rungs: an ASHA flag there would be silently ignored
    "asha-flag-without-asha": Case(
        args_case("--space", "smoke", "--rung-metric", "val_loss"), "--rung-metric only applies to --scheduler asha"
    ),
    "name-with-slash": Case(args_case("--space", "smoke", "--name", "../escape"), "must be a plain folder name"),
    "num-gpus-negative": Case(args_case("--space", "smoke", "--num-gpus", "-1"), "--num-gpus must be"),
    "seed-negative": Case(args_case("--space", "smoke", "--seed", "-1"), "--seed must be between 0"),
    "cpus-per-trial-above-this-machine": Case(
        args_case("--space", "smoke", "--cpus-per-trial", str((os.cpu_count() or 1) + 1)), "lower --cpus-per-trial"
    ),
    "trials-not-a-number": Case(
        args_case("--space", "smoke", "--trials", "abc"),
        "invalid int value: 'abc'",
    ),
    # --- results folders and --resume
    "results-dir-is-a-file": Case(
        lambda tmp: ["--space", "smoke", "--results-dir", str(_file(tmp / "afile"))], "cannot create results folder"
    ),
    "name-already-exists": Case(
        lambda tmp: (tmp / "results" / "taken").mkdir() or ["--space", "smoke", "--name", "taken"], "already exists"
    ),
    "resume-unknown-name": Case(resume_case("ghost", {}), "no experiment 'ghost'"),
    "resume-ray-tune-folder": Case(
        resume_case("tune-run", {"experiment_state-2025-01-01_00-00-00.json": "{}"}), "is not an ips-search experiment"
    ),
    "resume-other-tools-experiment-json": Case(
        resume_case("other", {"experiment.json": '{"tool": "mlflow"}'}), "was not written by ips-search"
    ),
    "resume-experiment-json-not-a-mapping": Case(
        resume_case("listy", {"experiment.json": "[1, 2]"}),
        "listy",
    ),
    "resume-experiment-json-without-settings": Case(
        resume_case("partial", {"experiment.json": '{"tool": "ips-search"}'}),
        "partial",
    ),
    "resume-experiment-json-unknown-setting": Case(
        resume_case("extra", {"experiment.json": saved(settings={"colour": "red"})}), "unknown setting(s) colour"
    ),
    "resume-experiment-json-search-is-a-number": Case(
        resume_case("five", {"experiment.json": saved(space={"search": 5})}), "section 'search'"
    ),
    # a resumed search keeps the settings it saved: another value would be silently ignored
    "resume-with-another-sampler": Case(
        lambda tmp: [*resume_case("sure", {"experiment.json": saved()})(tmp), "--sampler", "random"],
        "--sampler random differs from experiment 'sure', which runs with tpe",
    ),
    "resume-with-another-scheduler": Case(
        lambda tmp: [*resume_case("sure", {"experiment.json": saved()})(tmp), "--scheduler", "asha"],
        "--scheduler asha differs from experiment 'sure', which runs with fifo",
    ),
    "resume-experiment-json-not-json": Case(
        resume_case("cut", {"experiment.json": saved()[:40]}), "experiment.json is damaged (not valid JSON"
    ),
    # --- every field checked by type and range when the space loads (it used to pass the dry run, then fail in
    # every trial, or be a traceback)
    "dropout-above-1": Case(space_case(smoke(model__dropout=1.5)), "model.dropout must be a number in [0, 1), got 1.5"),
    "root-is-a-number": Case(
        space_case(smoke(data__dataset="folder", data__root=5)), "data.root must be a path (text), got 5"
    ),
    "manifest-is-a-list": Case(space_case(smoke(data__manifest=["a"])), "data.manifest must be a path (text)"),
    "canvas-size-word": Case(space_case(smoke(data__canvas_size="big")), "data.canvas_size must be a positive integer"),
    "min-foreground-word": Case(space_case(smoke(data__min_foreground="x")), "data.min_foreground must be a number"),
    "bool-quoted": Case(space_case(smoke(train__amp="yes")), "train.amp must be true or false, got 'yes'"),
    "num-workers-negative": Case(space_case(smoke(train__num_workers=-1)), "train.num_workers must be 0 or a positive"),
    "features-with-image-encoder": Case(
        space_case(smoke(data__dataset="features", data__root="/nowhere", model__encoder="small-cnn")),
        "set model.encoder: projector",
    ),
    # --- names and addresses that failed with a traceback
    "name-too-long": Case(args_case("--space", "smoke", "--name", "x" * 300), "(300 characters) must be a plain"),
    "name-with-a-space": Case(args_case("--space", "smoke", "--name", "my run"), "must be a plain folder name"),
    "name-with-a-newline": Case(args_case("--space", "smoke", "--name", "a\nb"), "must be a plain folder name"),
    "name-hidden": Case(args_case("--space", "smoke", "--name", ".hidden"), "not starting with '.'"),
    "dashboard-host-not-an-address": Case(
        args_case("--space", "smoke", "--dashboard-host", "no such host"), "--dashboard-host 'no such host' is not"
    ),
    "dashboard-host-bad-ip": Case(args_case("--space", "smoke", "--dashboard-host", "300.1.2.3"), "not an IP address"),
    # Ray unpickles the folder's state files on resume: one that another user can write is refused
    "resume-pickle-writable-by-others": Case(
        lambda tmp: _chmod(resume_case("shared", {"experiment.json": saved(), "tuner.pkl": "x"})(tmp), tmp, 0o666),
        "tuner.pkl can be written by other users",
    ),
}


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


def _chmod(argv: list[str], tmp: Path, mode: int) -> list[str]:
    """``argv`` of a resume case, after giving its experiment's ``tuner.pkl`` ``mode``."""
    os.chmod(tmp / "results" / argv[argv.index("--resume") + 1] / "tuner.pkl", mode)
    return argv


def _params():
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=f"product bug: {case.bug}")] if case.bug else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_bad_input_is_one_line_exit_2_before_ray(name, tmp_path, cache_dir, capsys, no_ray):
    case = CASES[name]
    (tmp_path / "results").mkdir()
    argv = case.build(tmp_path)
    if "--results-dir" not in argv:
        argv += ["--results-dir", str(tmp_path / "results")]
    try:
        rc = run.main([*argv, "--no-dashboard"])
    except SystemExit as exc:  # argparse exits instead of returning
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"exit {rc}; stderr: {err}"
    assert len(err.splitlines()) == 1, f"expected one stderr line, got:\n{err}"
    assert err.startswith("error: ") and case.message.lower() in err.lower(), err


def test_there_are_at_least_15_handled_cases():
    assert sum(1 for case in CASES.values() if case.bug is None) >= 15


def test_a_saved_experiment_loads_back_unchanged(tmp_path):
    """The checks on a resumed experiment.json accept every file the search writes."""
    from ips_search.search.launch import save_experiment
    from ips_search.search.tuner import SearchSettings
    from ips_search.space import load_space

    for name in ("default", "smoke"):
        space = load_space(name)
        settings = SearchSettings(name=name, results_dir=str(tmp_path), space=name, max_memory_mb=500.0, seed=3)
        save_experiment(space, settings, ["run"])
        settings_back, space_back = cli.load_experiment(tmp_path, name)
        assert settings_back == settings
        assert space_back.to_dict() == space.to_dict()


def test_resume_accepts_the_saved_settings_and_refuses_others():
    """Flags equal to what the experiment saved (or left out) pass; any other value of a kept setting is refused."""
    from ips_search.search.tuner import SearchSettings

    settings = SearchSettings(name="x", results_dir="r", space="smoke", sampler="random", seed=3, confirm=1, epochs=4)

    def given(*flags: str) -> dict:
        return cli.given_settings(cli.build_parser().parse_args(["--resume", "x", *flags]))

    assert given() == {}
    extended = dataclasses.replace(settings)
    check_resume(given("--trials", "80"), extended)  # --trials extends the search: not a kept setting
    assert extended == dataclasses.replace(settings, trials=80)
    check_resume(given("--sampler", "random", "--seed", "3", "--confirm", "1", "--epochs", "4"), settings)
    # "--sampler tpe" is the flag's default, and still not what this experiment runs with
    for flags in (
        ["--seed", "4"],
        ["--confirm", "2"],
        ["--epochs", "5"],
        ["--max-memory-mb", "300"],
        ["--sampler", "tpe"],
    ):
        with pytest.raises(ConfigError, match=f"^{flags[0]} {flags[1]} differs from experiment 'x'"):
            check_resume(given(*flags), settings)


def test_cluster_too_small_for_a_trial_is_one_line_exit_2(tmp_path, cache_dir, capsys, monkeypatch):
    """Found once Ray runs (a joined cluster's size is unknown before): still one line, exit 2, and Ray left."""
    import ray

    monkeypatch.setattr("ips_search.search.launch.start_ray", lambda *a: {"CPU": 1.0})
    shutdowns = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a fresh command, whatever other tests left running
    argv = ["--space", "smoke", "--cpus-per-trial", "2", "--address", "auto", "--results-dir", str(tmp_path)]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: a trial needs 2 CPU"), err
    assert shutdowns == [True]


def test_grayscale_image_in_an_rgb_folder_is_converted(tmp_path, cache_dir, capsys, no_ray):
    """Not an error: a 1-channel image among RGB ones is repeated over 3 channels, and the dry run passes."""
    from ips_search.data import build_datasets
    from ips_search.space import load_space

    root = tmp_path / "images"
    write_images(root, grayscale=2)
    (tmp_path / "space.yaml").write_text(folder_space(root))
    argv = ["--space", str(tmp_path / "space.yaml"), "--results-dir", str(tmp_path / "results"), "--dry-run"]
    assert run.main(argv) == 0
    assert "the space, the flags and the data are valid" in capsys.readouterr().out

    data = load_space(str(tmp_path / "space.yaml")).base_config().data
    splits = build_datasets(data)
    everything = [(ds, i) for ds in (splits.train, splits.val, splits.test) for i in range(len(ds))]
    assert splits.n_chan == 3 and len(everything) == 8
    grays = [(ds, i) for ds, i in everything if ds.paths[i].name.startswith("gray")]
    assert len(grays) == 2
    for ds, i in grays:
        img = ds.image(i)  # (3, 64, 64)
        assert img.shape == (3, 64, 64)
        assert torch_equal(img[0], img[1]) and torch_equal(img[1], img[2]) and img.max() > 0


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


class _Stop(Exception):
    """Raised by the faked tuner: the run got past every check and the experiment's own files."""


def test_a_valid_space_file_outside_search_spaces_is_accepted(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr("ips_search.search.launch.start_ray", lambda *a: {"CPU": 2.0})  # Ray is faked: not needed here

    def tuner(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr("ips_search.search.launch.make_tuner", tuner)
    space = tmp_path / "elsewhere" / "my-space.yaml"
    space.parent.mkdir()
    space.write_text(smoke())
    with pytest.raises(_Stop):
        run.main(["--space", str(space), "--results-dir", str(tmp_path / "results"), "--name", "x", "--no-dashboard"])
    saved = json.loads((tmp_path / "results" / "x" / "experiment.json").read_text())
    assert Path(saved["space_file"]) == space.resolve()
