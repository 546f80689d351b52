"""What the search command checks around Ray: one search per experiment folder (a lock), a folder whose pickles only
this user could have written, GPUs used when the cluster has them, Ray's token file kept private, and a search whose
every trial failed exiting non-zero. Only the last test starts Ray (the session's shared cluster)."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from ips_search import run
from ips_search.errors import ConfigError
from ips_search.experiment import SearchSettings
from ips_search.experiment.files import LOCK_FILE, check_trusted
from ips_search.search import launch
from ips_search.search.plan import plan_lines
from ips_search.space import SPACES_DIR, load_space

SMOKE = yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def saved_experiment(folder: Path) -> Path:
    """A valid experiment folder of the smoke space, as the search leaves it (``experiment.json``, a Ray pickle)."""
    folder.mkdir(parents=True)
    settings = SearchSettings(name="old-name", results_dir="elsewhere", space="smoke")
    doc = {"tool": "ips-search", "version": 1, "settings": settings.to_dict(), "space": {"name": "smoke", **SMOKE}}
    (folder / "experiment.json").write_text(json.dumps(doc))
    (folder / "tuner.pkl").write_bytes(b"not read by these tests")
    os.chmod(folder, 0o755)
    os.chmod(folder / "tuner.pkl", 0o644)
    return folder


@pytest.fixture
def searches(monkeypatch) -> list[SearchSettings]:
    """``launch.run_search`` replaced by a recorder: a test sees what would have been searched, and Ray never starts."""
    seen: list[SearchSettings] = []

    def run_search(space, settings, args, resume):
        seen.append(settings)
        return 0

    monkeypatch.setattr(launch, "run_search", run_search)
    return seen


def resume(target: str, results: Path) -> int:
    return run.main(["--resume", target, "--results-dir", str(results), "--no-dashboard"])


# ------------------------------------------------------------------ one search per experiment folder


def test_a_second_search_of_a_locked_experiment_is_refused(tmp_path, searches, capsys):
    folder = saved_experiment(tmp_path / "results" / "exp")
    with open(folder / LOCK_FILE, "a") as held:  # what a running search holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert resume("exp", tmp_path / "results") == 2
        line = one_error_line(capsys.readouterr().err)
        assert "'exp' is already being searched by another process" in line and "wait for that search" in line
        assert searches == []
    assert resume("exp", tmp_path / "results") == 0  # released: the same command goes on
    assert [s.name for s in searches] == ["exp"]


def test_the_lock_is_held_while_the_search_runs(tmp_path, monkeypatch, capsys):
    folder = saved_experiment(tmp_path / "results" / "exp")
    tried = []

    def run_search(space, settings, args, resume):
        with open(folder / LOCK_FILE, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tried.append(True)
        return 0

    monkeypatch.setattr(launch, "run_search", run_search)
    assert resume("exp", tmp_path / "results") == 0 and tried == [True]


def test_a_new_search_holds_the_lock_too(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(launch, "start_ray", lambda *a: {"CPU": 2.0})
    held = []

    def tuner(*args, **kwargs):
        with open(tmp_path / "new" / LOCK_FILE, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(True)
        raise _Stop

    monkeypatch.setattr("ips_search.search.launch.make_tuner", tuner)
    with pytest.raises(_Stop):
        run.main(["--space", "smoke", "--results-dir", str(tmp_path), "--name", "new", "--no-dashboard"])
    assert held == [True]
    with open(tmp_path / "new" / LOCK_FILE, "a") as after:  # released once the search ended, however it ended
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ------------------------------------------------------------------ --resume: which folder, and whether to trust it


def test_resume_names_the_folder_it_was_given_not_the_saved_name(tmp_path, searches, monkeypatch):
    saved_experiment(tmp_path / "results" / "renamed")
    assert resume("renamed", tmp_path / "results") == 0
    assert searches[-1].name == "renamed" and searches[-1].experiment_dir == (tmp_path / "results" / "renamed")
    moved = saved_experiment(tmp_path / "else" / "where")
    monkeypatch.chdir(tmp_path)
    assert run.main(["--resume", str(moved), "--no-dashboard"]) == 0  # by path; --results-dir left at "results"
    assert searches[-1].experiment_dir == moved
    assert not (tmp_path / "results" / "where").exists()


@pytest.mark.parametrize(
    ("target", "mode", "fix"),
    [
        ("tuner.pkl", 0o666, "chmod -R go-w"),
        ("tuner.pkl", 0o664, "chmod -R go-w"),
        (".", 0o777, "chmod -R go-w"),
        ("searcher-state-2025-01-01_00-00-00.pkl", 0o646, "chmod -R go-w"),
        ("search_gen_state-2025-01-01_00-00-00.json", 0o666, "chmod -R go-w"),  # cloudpickle inside
        ("train_ips_0001/params.pkl", 0o666, "chmod -R go-w"),
        ("train_ips_0001", 0o777, "chmod -R go-w"),
    ],
)
def test_resume_refuses_a_folder_others_can_write(tmp_path, searches, capsys, target, mode, fix):
    folder = saved_experiment(tmp_path / "results" / "exp")
    path = folder / target
    if not path.exists():
        if target.endswith(("pkl", "json")):
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"planted")
        else:
            path.mkdir()
    os.chmod(path, mode)
    assert resume("exp", tmp_path / "results") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{path.resolve() if target == '.' else path} can be written by other users" in line and fix in line
    assert searches == [] and not (folder / LOCK_FILE).exists()  # refused before anything was written
    os.chmod(path, mode & ~0o022)
    assert resume("exp", tmp_path / "results") == 0  # the fix it names works


def test_resume_refuses_a_folder_of_another_user(tmp_path, searches, capsys, monkeypatch):
    saved_experiment(tmp_path / "results" / "exp")
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 4242)
    assert resume("exp", tmp_path / "results") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "belongs to another user" in line and "chown -R" in line and "unpickles" in line
    assert searches == []


def test_a_linked_pickle_is_judged_by_its_target(tmp_path):
    folder = saved_experiment(tmp_path / "exp")
    planted = tmp_path / "planted.pkl"
    planted.write_bytes(b"x")
    os.chmod(planted, 0o666)
    (folder / "searcher-state-x.pkl").symlink_to(planted)
    with pytest.raises(ConfigError, match=r"searcher-state-x\.pkl \(a link to .*planted\.pkl\) can be written") as exc:
        check_trusted(folder)
    assert f"`chmod go-w {planted}`" in str(exc.value)


# ------------------------------------------------------------------ GPUs: auto by default


def test_gpus_per_trial_defaults_to_one_per_gpu_when_the_cluster_has_them(capsys):
    settings = SearchSettings(name="x", results_dir="/tmp/x", space="smoke", trials=8, gpus_per_trial=None)
    launch.fit_resources(settings, {"CPU": 16.0, "GPU": 2.0}, explicit_concurrency=False)
    assert settings.gpus_per_trial == 1.0 and settings.concurrency == 2
    settings = SearchSettings(name="x", results_dir="/tmp/x", space="smoke", trials=8, gpus_per_trial=None)
    launch.fit_resources(settings, {"CPU": 4.0}, explicit_concurrency=False)
    assert settings.gpus_per_trial == 0.0 and settings.concurrency == 4
    assert capsys.readouterr().err == ""  # no GPU and none asked for: nothing to warn about
    settings = SearchSettings(name="x", results_dir="/tmp/x", space="smoke", trials=8, gpus_per_trial=0.0)
    launch.fit_resources(settings, {"CPU": 4.0, "GPU": 2.0}, explicit_concurrency=False)
    assert settings.gpus_per_trial == 0.0 and settings.concurrency == 4  # --gpus-per-trial 0: the CPU on purpose


def test_gpus_auto_is_in_help_and_in_the_plan():
    help_text = " ".join(run.build_parser().format_help().split())
    assert "Default: auto, 1 per trial when the cluster has GPUs" in help_text
    space = load_space("smoke")
    settings = SearchSettings(name="x", results_dir="/tmp/x", space="smoke", gpus_per_trial=None)
    assert any(line.startswith("GPUs         auto") for line in plan_lines(space, settings))  # a dry run
    settings.gpus_per_trial = 1.0
    resolved = "GPUs         1 per trial (auto; pass --gpus-per-trial 0 to keep trials on the CPU)"
    assert resolved in plan_lines(space, settings, gpus_auto=True)
    assert not any(line.startswith("GPUs") for line in plan_lines(space, settings))  # asked for: no note


class _Stop(Exception):
    """Raised by the faked tuner once the experiment is saved."""


def _stop(*args, **kwargs):
    raise _Stop


@pytest.mark.parametrize(("flags", "gpus"), [([], 1.0), (["--gpus-per-trial", "0"], 0.0)])
def test_the_resolved_gpus_are_saved(tmp_path, cache_dir, monkeypatch, capsys, flags, gpus):
    monkeypatch.setattr(launch, "start_ray", lambda *a: {"CPU": 2.0, "GPU": 1.0})  # a fake one-GPU cluster
    monkeypatch.setattr("ips_search.search.launch.make_tuner", _stop)
    argv = ["--space", "smoke", "--results-dir", str(tmp_path), "--name", "g", "--no-dashboard", *flags]
    with pytest.raises(_Stop):
        run.main(argv)
    saved = json.loads((tmp_path / "g" / "experiment.json").read_text())["settings"]
    assert saved["gpus_per_trial"] == gpus
    out = capsys.readouterr().out
    assert ("GPUs         1 per trial (auto" in out) == (not flags)
    assert f"1 CPU + {gpus:g} GPU each" in out


# ------------------------------------------------------------------ Ray's token file


def test_our_token_file_is_made_private(tmp_path, capsys):
    token = tmp_path / "auth_token"
    token.write_text("secret")
    os.chmod(token, 0o644)
    launch.secure_token_file(token)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and capsys.readouterr().err == ""
    launch.secure_token_file(tmp_path / "absent")  # no token: nothing to do, nothing said
    assert capsys.readouterr().err == ""


def test_someone_elses_token_file_is_warned_about(tmp_path, capsys, monkeypatch):
    token = tmp_path / "auth_token"
    token.write_text("secret")
    os.chmod(token, 0o644)
    monkeypatch.setattr(os, "getuid", lambda: token.stat().st_uid + 4242)
    launch.secure_token_file(token)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and f"chmod 600 {token}" in err[0]
    assert stat.S_IMODE(token.stat().st_mode) == 0o644  # not ours to change


def test_starting_ray_makes_the_token_private(tmp_path, monkeypatch, capsys):
    import ray

    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("secret")
    os.chmod(token, 0o644)
    monkeypatch.setattr(launch, "AUTH_TOKEN_FILE", token)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: SimpleNamespace(dashboard_url=None))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    args = run.build_parser().parse_args(["--no-dashboard"])
    assert launch.start_ray(args) == {"CPU": 2.0}
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


# ------------------------------------------------------------------ every trial failed


@pytest.mark.ray
def test_a_search_whose_every_trial_failed_exits_1_naming_the_first_error(ray_cluster, tmp_path, capsys):
    doc = json.loads(json.dumps(SMOKE))
    doc["train"].update(device="cuda:9", epochs=1)  # no machine here has a tenth GPU: every trial raises
    space = tmp_path / "failing.yaml"
    space.write_text(yaml.safe_dump(doc))
    results = tmp_path / "results"
    argv = ["--space", str(space), "--trials", "2", "--results-dir", str(results), "--name", "bad", "--no-dashboard"]
    assert run.main(argv) == 1
    captured = capsys.readouterr()
    assert "2 trials: 2 failed" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and captured.err.strip().splitlines()[-1] == errors[0], captured.err
    df = pd.read_csv(results / "bad" / "trials.csv", dtype={"trial_id": str})
    first = Path(df["path"].iloc[0]) / "error.txt"
    assert f"the first one's error is in {first}:" in errors[0]
    assert "cuda" in first.read_text().lower()
