"""Shared fixtures. Tests that start Ray share one local cluster per session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One data / warm-start cache for the whole session, so generation happens once."""
    path = os.environ.get("IPS_SEARCH_TEST_CACHE") or str(tmp_path_factory.mktemp("ips-cache"))
    os.environ["IPS_SEARCH_CACHE"] = path
    return path
