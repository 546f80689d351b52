"""Shared fixtures. Tests that start Ray share one local cluster per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before torch loads OpenMP: idle threads sleep instead of spinning, which on 2 cores shared with Ray's trial
# processes made in-process selection passes many times slower in wall time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

# Ray reads its auth mode when first imported: token auth on, as the CLI runs it
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One data / warm-start cache for the whole session, so generation happens once."""
    path = os.environ.get("IPS_SEARCH_TEST_CACHE") or str(tmp_path_factory.mktemp("ips-cache"))
    os.environ["IPS_SEARCH_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def ray_cluster(cache_dir):
    """The session's one Ray cluster: 2 CPUs, a small object store, its own short temp dir
    (Ray's socket paths must stay under ~100 characters)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ctx = ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ctx
    ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to start or join Ray."""
    import ray

    def started(*args, **kwargs):
        pytest.fail("Ray was started")

    monkeypatch.setattr("ips_search.search.launch.start_ray", started)
    monkeypatch.setattr(ray, "init", started)
    # as a fresh command sees it, whether or not another test left the session's cluster up
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


@pytest.fixture
def results_dir(tmp_path) -> Path:
    path = tmp_path / "results"
    path.mkdir()
    return path
