"""Each plot's data object, checked without drawing; one drawing per plot checks the figure follows its data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from ips_search.experiment import Status, coerce, pareto_front
from ips_search.report.axes import AXES, axis_spec, describe, param_label
from ips_search.report.plots import (
    OVER_BUDGET_STYLE,
    STATUS_STYLE,
    accuracy_vs_memory_data,
    draw_accuracy_vs_memory,
    draw_parameters,
    importance_data,
    learning_curves_data,
    parameters_data,
    plot_importance,
    plot_learning_curves,
)

COLUMNS = ["trial_id", "status", "feasible", "memory_size", "iteration_size", "patch_size", "lr"]


def trials() -> pd.DataFrame:
    """Trials of every kind: completed ones (one over the budget), stopped, failed, running, and one not reported."""
    rows = [
        # trial_id, status, feasible, M, I, P, lr, peak_memory_mb, val_accuracy
        ("c1", "completed", True, 2, 1, 32, 1e-4, 10.0, 0.50),
        ("c2", "completed", True, 4, 2, 32, 3e-4, 40.0, 0.70),
        ("c3", "completed", True, 4, 2, 64, 1e-3, 80.0, 0.60),  # dominated by c2
        ("c4", "completed", True, 8, 4, 64, 3e-3, 200.0, 0.90),
        ("over", "completed", False, 8, 8, 64, 1e-3, 500.0, 0.95),  # over the budget after the probe step
        ("es", "early-stopped", True, 2, 2, 32, 1e-2, 12.0, 0.99),
        ("inf", "infeasible", False, 16, 8, 64, 1e-3, 900.0, 0.0),
        ("run", "running", True, 4, 4, 32, 5e-4, 30.0, 0.30),
        ("odd", "archived", True, 4, 4, 32, 5e-4, 30.0, 0.30),  # no status we know: not drawn
        ("new", "pending", None, 4, 4, 32, 5e-4, np.nan, np.nan),
    ]
    return coerce(pd.DataFrame(rows, columns=[*COLUMNS, "peak_memory_mb", "val_accuracy"]))


def test_every_status_has_a_style_keyed_by_the_enum():
    assert set(STATUS_STYLE) == set(Status)
    assert all(isinstance(k, Status) for k in STATUS_STYLE)
    assert OVER_BUDGET_STYLE not in STATUS_STYLE.values()


def test_accuracy_vs_memory_data_groups_by_status_and_finds_the_front():
    df = trials()
    data = accuracy_vs_memory_data(df, max_memory_mb=300)
    groups = {(g.status, g.over_budget): g for g in data.points}
    assert set(groups) == {
        (Status.COMPLETED, False),
        (Status.COMPLETED, True),
        (Status.EARLY_STOPPED, False),
        (Status.INFEASIBLE, False),
        (Status.RUNNING, False),
    }
    assert groups[Status.COMPLETED, False].trial_ids == ("c1", "c2", "c3", "c4")
    assert groups[Status.COMPLETED, True].trial_ids == ("over",)
    assert groups[Status.COMPLETED, True].style is OVER_BUDGET_STYLE
    assert groups[Status.COMPLETED, True].label == "completed, over the budget (1)"
    assert groups[Status.RUNNING, False].memory_mb == (30.0,) and groups[Status.RUNNING, False].accuracy == (0.3,)
    assert data.shown == 9 and data.trials == 10  # the pending trial reported nothing; "archived" is counted, not drawn
    assert data.front_ids == tuple(pareto_front(df)["trial_id"]) == ("c1", "c2", "c4")
    assert data.front_memory_mb == (10.0, 40.0, 200.0) and data.front_accuracy == (0.5, 0.7, 0.9)
    assert data.front_until == pytest.approx(900 * 1.05)
    assert data.front_notes[0] == "M=2 I=1 P=32 lr=1.0e-04"
    assert data.budget_mb == 300 and data.log_x  # 10 to 900 MB: a log axis
    assert accuracy_vs_memory_data(df).budget_mb is None
    narrow = accuracy_vs_memory_data(df[df["trial_id"].isin(["c2", "c3"])])
    assert not narrow.log_x and narrow.front_ids == ("c2",)


def test_accuracy_vs_memory_data_says_why_it_is_empty():
    assert accuracy_vs_memory_data(pd.DataFrame()).message == "no trial has reported yet"
    pending = trials()[lambda d: d["status"] == "pending"]
    assert accuracy_vs_memory_data(pending).message == "no trial has reported memory and accuracy yet"
    assert isinstance(draw_accuracy_vs_memory(accuracy_vs_memory_data(pending)), Figure)


def test_the_accuracy_vs_memory_figure_draws_its_data():
    data = accuracy_vs_memory_data(trials(), max_memory_mb=300)
    ax = draw_accuracy_vs_memory(data).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [*(g.label for g in data.points), "Pareto front (3 trials)", "memory budget (300 MB)"]
    assert ax.get_xscale() == "log"
    assert [a.get_text() for a in ax.texts] == list(data.front_notes)


def test_parameters_data_follows_each_axis_spec():
    data = parameters_data(trials())
    panels = {p.axis.name: p for p in data.panels}
    assert list(panels) == ["memory_size", "iteration_size", "patch_size", "lr"]
    lr, m = panels["lr"], panels["memory_size"]
    assert lr.axis.log and lr.log_x and lr.ticks == () and lr.means == ()  # log axis, matplotlib places ticks
    assert m.x_completed == (2, 4, 4, 8, 8)  # completed, over-budget included
    assert m.x_other == (2, 16, 4, 4)  # early-stopped, infeasible, running, unknown
    assert m.means == ((2.0, 0.5), (4.0, pytest.approx(0.65)), (8.0, pytest.approx(0.925)))
    assert m.ticks == (2.0, 4.0, 8.0, 16.0) and m.log_x  # few values, spanning 8x
    assert panels["patch_size"].ticks == (32.0, 64.0) and not panels["patch_size"].log_x
    assert data.memory_range == (10.0, 900.0) and data.memory_log
    assert data.trials == 9


def test_parameters_figure_labels_ticks_with_the_spec():
    data = parameters_data(trials(), params=["patch_size", "lr"])
    fig = draw_parameters(data)
    fig.canvas.draw()
    p_ax, lr_ax = fig.axes[:2]
    assert p_ax.get_title() == "P (patch size)" and lr_ax.get_xlabel() == "learning rate"
    assert [t.get_text() for t in p_ax.get_xticklabels()] == ["32", "64"]
    assert lr_ax.get_xscale() == "log"
    shown = [t.get_text() for t in lr_ax.get_xticklabels() if t.get_text()]
    assert shown and all("e-0" in t for t in shown)  # plain scientific text, not 10^-3 mathtext
    assert parameters_data(pd.DataFrame()).message


def test_learning_curves_data_puts_the_ranked_trials_on_top():
    df = trials()
    curves = pd.DataFrame(
        [
            {"trial_id": t, "epoch": e, "val_accuracy": 0.1 * e, "train_loss": 1.0 / e}
            for t in ("c1", "c2", "c4", "es", "$x$")
            for e in (1, 2)
        ]
    )
    data = learning_curves_data(curves, df, top=2)
    assert [c.trial_id for c in data.top] == ["c4", "c2"]  # by the ranking rule: best validation accuracy first
    assert [c.rank for c in data.top] == [1, 2]
    assert data.top[0].label == "#1 c4  M=8 I=4 P=64 lr=3.0e-03"
    assert {c.trial_id for c in data.background} == {"c1", "es", "$x$"}
    no_curve = learning_curves_data(curves, df, top=3)  # the third, c3, has reported no epoch
    assert [c.trial_id for c in no_curve.top] == ["c4", "c2"] and "c1" in {c.trial_id for c in no_curve.background}
    assert data.top[0].epoch == (1, 2) and data.top[0].train_loss == (1.0, 0.5)
    loose = learning_curves_data(curves, None, top=5)  # no trials table: in the curves' order
    assert [c.label.strip() for c in loose.top][-1] == "#5 \\$x\\$"  # a $ in a trial id is literal text
    assert learning_curves_data(curves.iloc[:0]).message
    assert isinstance(plot_learning_curves(curves, df, top=2), Figure)


def test_importance_data_sorts_bars_and_names_quantiles():
    table = pd.DataFrame(
        {
            "parameter": ["lr", "memory_size_quantile", "lr", "memory_size_quantile"],
            "target": ["val_accuracy", "val_accuracy", "peak_memory_mb", "peak_memory_mb"],
            "importance": [0.8, 0.2, 0.1, 0.9],
        }
    )
    data = importance_data(table)
    acc, mem = data.panels
    assert acc.title == "for validation accuracy" and acc.labels == ("M (as quantile)", "lr")
    assert acc.importances == (0.2, 0.8) and mem.labels == ("lr", "M (as quantile)")
    assert data.footnote and "quantiles" in data.footnote
    assert importance_data({"lr": 1.0}).footnote is None
    assert importance_data(table.iloc[:0]).message
    assert isinstance(plot_importance(table), Figure)


def test_axis_specs_replace_per_name_cases():
    assert AXES["lr"].log and not AXES["lr"].integer and AXES["lr"].format(3e-4) == "3.0e-04"
    assert all(AXES[n].integer and not AXES[n].log for n in ("memory_size", "iteration_size", "patch_size"))
    assert AXES["memory_size"].format(4.0) == "4"
    other = axis_spec("dropout")
    assert not other.log and other.format(0.25) == "0.25" and other.format(2.0) == "2" and other.label == "dropout"
    assert param_label("iteration_size_quantile") == "I (as quantile)" and param_label("dropout") == "dropout"
    assert describe(pd.Series({"memory_size": 4, "lr": 1e-3, "patch_size": np.nan})) == "M=4 lr=1.0e-03"


def crowded_front() -> pd.DataFrame:
    """Eight completed trials, each on the front, at nearly the same memory: labels at the default offset collide."""
    rows = [
        (f"t{i}", "completed", True, 2 + i, 2, 32, 1e-3 * (1 + i / 10), 13.0 + 0.02 * i, 0.90 + 0.004 * i)
        for i in range(8)
    ]
    rows.append(("big", "completed", True, 8, 4, 64, 1e-3, 20.0, 0.80))  # dominated: not on the front
    return coerce(pd.DataFrame(rows, columns=[*COLUMNS, "peak_memory_mb", "val_accuracy"]))


def test_front_labels_of_a_crowded_front_do_not_overlap():
    data = accuracy_vs_memory_data(crowded_front())
    assert len(data.front_ids) == 8 and not data.log_x and "log scale" not in data.x_label
    fig = draw_accuracy_vs_memory(data)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [a for a in ax.texts if a.get_text() in data.front_notes]
    assert [a.get_text() for a in labels] == list(data.front_notes)
    fig.draw_without_rendering()  # as savefig draws it
    for a in labels:
        a.update_positions(renderer)
    boxes = [Text.get_window_extent(a, renderer) for a in labels]  # the text alone, not its leader line
    frame = ax.get_window_extent(renderer)
    legend = ax.get_legend().get_window_extent(renderer)
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, box
        assert not box.overlaps(legend), (data.front_notes[i], box, legend)
        for j in range(i):
            assert not box.overlaps(boxes[j]), (data.front_notes[i], data.front_notes[j])


def test_the_memory_axis_says_what_it_measures_and_when_it_is_logarithmic():
    df = trials().assign(memory_kind="predicted-cuda")
    data = accuracy_vs_memory_data(df)
    assert data.log_x and data.x_label == "peak memory (MB, predicted CUDA peak of a training step), log scale"
    ax = draw_accuracy_vs_memory(data).axes[0]
    assert ax.get_xlabel() == data.x_label
    assert "up and left is better" in ax.get_title()


def test_a_slide_maps_title_fits_its_figure(tmp_path):
    from ips_search.data.slides.generate import make_layout, write_slide
    from ips_search.report.slide_maps import fit_title, plot_slide_attention

    name = "TCGA-A2-A0CM-01Z-00-DX1.AC4901DE-4B6D-4185-BB9F-156033839828.tif"  # a real cohort's kind of name
    path = write_slide(tmp_path / name, make_layout(512, seed=1, tumour=True))
    coords = np.array([[x, y] for y in range(0, 512, 64) for x in range(0, 512, 64)])
    fig = plot_slide_attention(path, coords, [3, 9], 64, scores=[0.2, 0.8], thumbnail_size=256)
    fig.draw_without_rendering()
    title = fig.get_suptitle()
    assert title == f"{name}\n2 of 64 patches kept"
    box = fig._suptitle.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width  # not cut at either edge
    assert fit_title("a " + "x" * 200, 3.0).count("…") == 1  # a name longer than a line keeps its two ends
    assert fit_title("name.svs\n3 of 9 patches kept", 7.0) == "name.svs\n3 of 9 patches kept"


def test_features_extracted_here_take_the_class_names_of_their_source_data():
    from types import SimpleNamespace

    from ips_search.report.feature_views import FeatureViews

    views = FeatureViews(SimpleNamespace(data=SimpleNamespace(extract={"from": {"dataset": "slides"}})))
    views._source_splits = SimpleNamespace(train=SimpleNamespace(classes=["normal", "tumor"]))  # the slide manifest's
    assert views.class_names(["0", "1"]) == ["normal", "tumor"]  # the features manifest holds indices
    assert views.class_names(["0", "1", "2"]) == ["0", "1", "2"]  # another number of classes: not these names
    trident = FeatureViews(SimpleNamespace(data=SimpleNamespace(extract=None)))
    assert trident.class_names(["normal", "tumor"]) == ["normal", "tumor"]  # names from its own manifest
