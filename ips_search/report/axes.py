"""How each searched parameter is shown: its order, its label, its scale and how its values are written.

One :class:`AxisSpec` per parameter replaces the per-name cases in the plots, the tables' bins and the Markdown:
the learning rate is log-scaled and written in scientific notation; M, I and P are whole numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ips_search.space import QUANTILE_SUFFIX

PARAM_ORDER = ("memory_size", "iteration_size", "patch_size", "lr")  # M, I, P first, as the paper orders them


@dataclass(frozen=True)
class AxisSpec:
    """How one parameter (or metric) is drawn and written."""

    name: str  # the column
    label: str  # an axis label
    log: bool = False  # always on a log axis, its bins log-spaced
    integer: bool = False  # whole numbers only: whole-number bins and ticks
    fmt: str = "{:g}"  # a value as text (tick labels, bin edges)
    short: str = ""  # in annotations and importance bars: "M", "lr"
    title: str = ""  # a panel title: "M (memory size)"

    def format(self, value: Any) -> str:
        """``value`` written for reading: whole numbers plainly, the rest with :attr:`fmt`."""
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            return "nan"
        value = float(value)
        if not self.log and value == round(value):  # 4, not 4.0 or 4e+00
            return f"{int(round(value))}"
        return self.fmt.format(value)

    @property
    def heading(self) -> str:
        return self.title or self.label


AXES: dict[str, AxisSpec] = {
    spec.name: spec
    for spec in (
        AxisSpec("memory_size", "M, memory size (patches kept)", integer=True, short="M", title="M (memory size)"),
        AxisSpec(
            "iteration_size",
            "I, iteration size (patches per step)",
            integer=True,
            short="I",
            title="I (iteration size)",
        ),
        AxisSpec("patch_size", "P, patch size (pixels)", integer=True, short="P", title="P (patch size)"),
        AxisSpec("lr", "learning rate", log=True, fmt="{:.1e}", short="lr", title="learning rate"),
    )
}


def axis_spec(name: str) -> AxisSpec:
    """The spec of a parameter; a linear one labelled by its name for a parameter not listed in :data:`AXES`."""
    if name in AXES:
        return AXES[name]
    text = name.replace("_", " ")
    return AxisSpec(name, text, short=name, title=name)


def param_label(name: str) -> str:
    """A parameter's short name; a quantile-sampled one (``memory_size_quantile``) says so."""
    base = name.removesuffix(QUANTILE_SUFFIX)
    short = axis_spec(base).short if base in AXES else base
    return f"{short} (as quantile)" if name.endswith(QUANTILE_SUFFIX) else short


def param_columns(df: pd.DataFrame, space: dict[str, Any] | None = None) -> list[str]:
    """Searched-parameter columns of a trials table, M, I, P and lr first."""
    searched = list((space or {}).get("search") or {})
    known = set(searched) | set(PARAM_ORDER)
    cols = [c for c in PARAM_ORDER if c in df and (c in searched or not searched or df[c].notna().any())]
    cols += [c for c in searched if c in df and c not in cols]
    return [c for c in cols if c in known]


def describe(row: pd.Series) -> str:
    """A trial's M, I, P and learning rate in one short line (``M=4 I=2 P=32 lr=1.0e-03``)."""
    parts = []
    for name in PARAM_ORDER:
        if name in row and pd.notna(row[name]):
            spec = AXES[name]
            parts.append(f"{spec.short}={spec.format(row[name])}")
    return " ".join(parts)
