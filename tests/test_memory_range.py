"""The M range follows the memory budget: a space that searches no M of its own gets, at each patch size, M from 2 up
to the largest M predicted to fit ``--max-memory-mb`` (never at or above N), saved with the space."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
import yaml

from ips_search.data import data_geometry
from ips_search.errors import ConfigError
from ips_search.experiment import SearchSettings
from ips_search.prediction import estimate_memory
from ips_search.search import plan
from ips_search.search.plan import budget_memory_range, plan_lines
from ips_search.space import SPACES_DIR, define_space, load_space, saved_space, space_from_dict, trial_config

SMOKE = yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())  # 128 px canvases: N = 64 at P=16, 16 at P=32
N = {16: 64, 32: 16}


def space_without_m(tmp_path: Path, patch_sizes: list[int], **model):
    raw = {**SMOKE, "search": {k: v for k, v in SMOKE["search"].items() if k != "memory_size"}}
    raw["search"]["patch_size"] = {"choices": patch_sizes}
    raw["model"] = {**SMOKE["model"], **model}
    path = tmp_path / "no-m.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_space(str(path))


def settings(tmp_path: Path, budget: float | None) -> SearchSettings:
    return SearchSettings(name="m", results_dir=str(tmp_path), space="no-m", max_memory_mb=budget)


def predicted(space, patch_size: int, memory_size: int) -> float:
    """The prediction the range is built on: this M with the largest I the space allows with it (I up to 8)."""
    exp = trial_config(
        space.fixed,
        {"patch_size": patch_size, "memory_size": memory_size, "iteration_size": min(8, N[patch_size] - memory_size)},
    )
    return estimate_memory(exp, data_geometry(exp.data)).peak_mb


@pytest.fixture
def linear_peak(monkeypatch):
    """A stand-in estimator whose peak is 10 MB + 1 MB per kept patch (per image of the batch), for the rules of the
    range without the cost of real predictions."""

    def fake(exp, geometry, device="cuda"):
        return dataclasses.make_dataclass("E", ["peak_mb"])(10.0 + exp.model.memory_size * exp.train.batch_size)

    monkeypatch.setattr(plan, "estimate_memory", fake)


def test_the_top_m_is_predicted_under_the_budget_and_the_next_over_it(tmp_path):
    space = space_without_m(tmp_path, [16])
    budget = predicted(space, 16, 40)  # peaks grow with M (flat at first): the top is 40 or a little above
    budget_memory_range(space, budget)
    top = space.memory_highs[16]
    assert 40 <= top < N[16] - 1
    assert predicted(space, 16, top) <= budget < predicted(space, 16, top + 1)
    m = space.params["memory_size"]
    assert (m.low, m.high, m.log, m.integer) == (2, top, True, True)


def test_the_range_never_reaches_the_smallest_n(tmp_path, linear_peak):
    space = space_without_m(tmp_path, [16, 32])
    budget_memory_range(space, 1e6)  # everything fits: M stays below N at each patch size
    assert space.memory_highs == {16: 63, 32: 15}
    # slides, features: N is the smallest item's (the geometry's n_patches), not the largest
    space = space_without_m(tmp_path, [16])
    geometry = data_geometry(plan.data_at(space.base_config().data, 16))
    items = dataclasses.replace(geometry, n_patches=20, grid=(1, 64), item_counts=(20, 64, 33))
    budget_memory_range(space, 1e6, {16: items})
    assert space.memory_highs == {16: 19}


def test_the_top_follows_the_heaviest_searched_batch_size(tmp_path, linear_peak):
    space = space_without_m(tmp_path, [16])
    space.params["batch_size"] = plan.Param("batch_size", choices=[4, 16])
    budget_memory_range(space, 10 + 16 * 30)  # batch 16: 30 kept patches per image fit
    assert space.memory_highs == {16: 30}


def test_an_explicit_range_or_no_budget_is_left_alone(tmp_path, linear_peak):
    explicit = load_space("smoke")
    before = explicit.to_dict()
    assert budget_memory_range(explicit, 100.0) is explicit and explicit.to_dict() == before
    no_budget = space_without_m(tmp_path, [16])
    budget_memory_range(no_budget, None)
    assert "memory_size" not in no_budget.params and no_budget.memory_highs == {}


def test_trials_and_a_resume_see_the_same_range(tmp_path, linear_peak, monkeypatch):
    space = space_without_m(tmp_path, [16, 32])
    budget_memory_range(space, 10 + 16 * 12)  # batch 16: M up to 12
    assert space.memory_highs == {16: 12, 32: 12}
    saved = space.to_dict()
    assert saved["memory_highs"] == {"16": 12, "32": 12} and saved["search"]["memory_size"]["high"] == 12
    monkeypatch.setattr(plan, "estimate_memory", lambda *a, **k: pytest.fail("estimated again"))
    for again in (space_from_dict(saved), saved_space(saved)):  # what define_space and a resume read
        assert again.memory_highs == space.memory_highs
        assert budget_memory_range(again, 10 + 16 * 12).to_dict() == saved  # already set: not redone
    for patch_size, q in ((16, 1.0), (32, 1.0), (16, 0.0)):
        trial = optuna.trial.FixedTrial(
            {"patch_size": patch_size, "memory_size_quantile": q, "iteration_size_quantile": 0.0, "lr": 1e-3}
        )
        assert define_space(trial, saved)["memory_size"] == (12 if q else 2)


def test_a_patch_size_nothing_fits_keeps_the_smallest_m_and_no_fit_at_all_is_a_config_error(tmp_path, monkeypatch):
    def fake(exp, geometry, device="cuda"):  # P=16 heavy, P=32 light
        peak = (500.0 if exp.data.patch_size == 16 else 10.0) + exp.model.memory_size
        return dataclasses.make_dataclass("E", ["peak_mb"])(peak)

    monkeypatch.setattr(plan, "estimate_memory", fake)
    space = space_without_m(tmp_path, [16, 32])
    budget_memory_range(space, 20.0)
    assert space.memory_highs == {16: 0, 32: 10}
    lines = "\n".join(plan_lines(space, settings(tmp_path, 20.0)))
    assert "P=16   N=64    M in [2, 2], I up to N - M (not even this M is predicted under the memory budget" in lines
    assert "P=32   N=16    M in [2, 10], I up to N - M (the top: the largest M predicted under" in lines
    with pytest.raises(ConfigError, match=r"--max-memory-mb 5 fits no config of space no-m: even M=2 at patch_size 32 "
                       r"is predicted at 12 MB; raise --max-memory-mb") as info:  # fmt: skip
        budget_memory_range(space_without_m(tmp_path, [16, 32]), 5.0)
    assert "\n" not in str(info.value)


def test_the_low_end_is_the_spaces_own_m_where_that_is_smaller(tmp_path, linear_peak):
    space = space_without_m(tmp_path, [32], memory_size=1)
    budget_memory_range(space, 1e6)
    assert space.params["memory_size"].low == 1


def test_the_plan_prints_the_range_and_a_dry_run_says_it_is_estimated_later(tmp_path, linear_peak):
    space = space_without_m(tmp_path, [16, 32])
    before = "\n".join(plan_lines(space, settings(tmp_path, 300.0)))  # a dry run: nothing estimated yet
    assert "memory_size      [2, the largest M predicted under 300 MB at each P] log, estimated when" in before
    assert "P=16   N=64    M up to the budget's largest (at most N - 1), I up to N - M" in before
    budget_memory_range(space, 10 + 16 * 12)
    after = "\n".join(plan_lines(space, settings(tmp_path, 10 + 16 * 12)))
    assert "memory_size      [2, 12] log" in after
    assert "P=16   N=64    M in [2, 12], I up to N - M (the top: the largest M predicted under the memory" in after
    no_budget = "\n".join(plan_lines(space_without_m(tmp_path, [16]), settings(tmp_path, None)))
    assert "memory_size" not in no_budget and "P=16" not in no_budget
