"""``--dry-run`` is dry: it checks the space, the flags and the data cheaply, and builds and trains nothing."""

from __future__ import annotations

import pytest

from ips_search import run
from ips_search.space import SPACES_DIR

SHIPPED = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_dry_run_of_a_shipped_space_builds_nothing(name, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("IPS_SEARCH_CACHE", str(cache))
    monkeypatch.setattr("ips_search.data.megapixel.generate", lambda cfg: pytest.fail("the dataset was generated"))
    monkeypatch.setattr("ips_search.search.launch.start_ray", lambda *a: pytest.fail("Ray was started"))
    assert run.main(["--space", name, "--results-dir", str(tmp_path / "results"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "the first run builds (nothing was built now):" in out and "data " in out
    written = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert written == [], written
    assert not any((tmp_path / "results").iterdir())


def test_dry_run_reports_what_the_default_space_will_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IPS_SEARCH_CACHE", str(tmp_path / "cache"))
    assert run.main(["--space", "default", "--results-dir", str(tmp_path / "results"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    canvases = next(line for line in out.splitlines() if line.startswith("data "))
    assert "megapixel canvases (1600 train + 500 test, 256 px): built on the first run" in canvases
    assert "137.6 MB of disk" in canvases  # 2,100 canvases of 256 x 256 bytes
    warm = [line for line in out.splitlines() if line.startswith("warm start")]
    assert len(warm) == 2 and all("pretrained on the first run" in line for line in warm)


def test_dry_run_sees_a_cached_dataset_as_cached(tmp_path, monkeypatch, capsys):
    from ips_search.data import build_datasets
    from ips_search.space import load_space

    monkeypatch.setenv("IPS_SEARCH_CACHE", str(tmp_path / "cache"))
    base = load_space("smoke").base_config()
    build_datasets(base.data)
    assert run.main(["--space", "smoke", "--results-dir", str(tmp_path / "results"), "--dry-run"]) == 0
    assert "megapixel canvases (120 train + 40 test, 128 px): cached" in capsys.readouterr().out
