"""``report.html`` opens with what a team reads: the best configuration, accuracy against memory, the Pareto set.

The notebook runs for real on a small hand-written experiment (no search, no checkpoints, no Optuna journal).
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import nbformat
from test_report_sources import epoch, make_experiment

from ips_search.report.notebook import write_notebook


class _Cells(HTMLParser):
    """The visible text of each notebook cell in nbconvert's HTML, and whether any cell shows its code."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[list[str]] = []
        self.code_inputs = 0
        self._depth = 0  # <div> nesting inside the current cell; 0: outside every cell
        self._hidden = 0  # inside <script> or <style>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag in ("script", "style"):
            self._hidden += 1
        if tag != "div":
            return
        if ("jp-CodeCell" in classes and "jp-mod-noInput" not in classes) or "jp-InputPrompt" in classes:
            self.code_inputs += 1
        if self._depth:
            self._depth += 1
        elif "jp-Cell" in classes:
            self._depth = 1
            self.cells.append([])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._hidden -= 1
        if tag == "div" and self._depth:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth and not self._hidden and data.strip():
            self.cells[-1].append(data.strip())


def visible_cells(html: str) -> tuple[list[str], int]:
    """The text of every cell that shows something, in order, and how many code inputs the page shows."""
    parser = _Cells()
    parser.feed(html)
    return [" ".join(texts) for texts in parser.cells if texts], parser.code_inputs


def test_report_html_opens_with_the_best_configuration_and_shows_no_code(tmp_path: Path):
    folder = make_experiment(
        tmp_path / "team-search",
        {
            "low": [epoch(1), epoch(2, "completed", val_accuracy=0.6, peak_memory_mb=50.0, test_accuracy=0.55)],
            "high": [epoch(1), epoch(2, "completed", val_accuracy=0.8, peak_memory_mb=90.0, test_accuracy=0.7)],
            "big": [epoch(1), epoch(2, "completed", val_accuracy=0.8, peak_memory_mb=400.0)],  # tie: more memory
            "part": [epoch(1, val_accuracy=0.99)],  # running: never the best
        },
        max_memory_mb=500,
    )
    paths, error = write_notebook(folder, folder / "report", execute=True, html=True)
    assert error is None
    html = paths["html"].read_text(encoding="utf-8")
    cells, code_inputs = visible_cells(html)
    assert code_inputs == 0
    assert "load_experiment(" not in html and "import " not in html  # no source anywhere on the page
    first = cells[0]
    assert first.startswith("Best configuration") and "Trial high (completed)" in first
    assert "search team-search" in first and "500 MB" in first and "0.8000" in first
    headings = [c.split()[0:4] for c in cells]
    order = [i for i, c in enumerate(cells) if c.startswith(("Accuracy vs peak memory", "The Pareto set", "Settings"))]
    assert [cells[i].split(" ")[0] for i in order] == ["Accuracy", "The", "Settings"], headings
    assert 'src="data:image/png' in html.split("The Pareto set")[0].split("Accuracy vs peak memory")[1]
    pareto = cells[order[1] + 1]  # the table under the Pareto set's heading: its two trials, not the tie's loser
    assert "low" in pareto and "high" in pareto and "big" not in pareto and "part" not in pareto
    nb = nbformat.read(paths["notebook"], as_version=4)  # the notebook keeps its code
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "load_experiment(EXPERIMENT)" in code[0].source and code[0].metadata["jupyter"]["source_hidden"]
    assert not code[0].outputs  # the set-up prints nothing, so nothing comes before the best configuration
