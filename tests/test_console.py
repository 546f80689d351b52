"""A quiet console: the plan, a progress bar and one line per trial; Ray's output in the experiment's search.log."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from ips_search.experiment import LOG_FILE, TRIALS_CSV
from ips_search.search.console import TrialProgress, trial_line


@pytest.mark.ray
def test_a_smoke_search_prints_at_most_40_lines_and_logs_ray(tmp_path, cache_dir):
    results = tmp_path / "results"
    env = {**os.environ, "IPS_SEARCH_CACHE": cache_dir, "RAY_AUTH_MODE": "token"}
    argv = ["--space", "smoke", "--trials", "4", "--name", "quiet", "--results-dir", str(results), "--no-dashboard"]
    proc = subprocess.run(
        [sys.executable, "-m", "ips_search.run", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = (proc.stdout + proc.stderr).replace("\r", "\n")
    lines = [line for line in shown.splitlines() if line.strip()]
    assert len(lines) <= 40, "\n".join(lines)
    trials = pd.read_csv(results / "quiet" / TRIALS_CSV, dtype={"trial_id": str})
    for trial_id in trials["trial_id"]:  # one line per finished trial, with its id
        assert sum(line.startswith(trial_id) for line in lines) == 1, (trial_id, lines)
    assert "best:" in shown and "Trial status" not in shown
    log = (results / "quiet" / LOG_FILE).read_text()
    assert "Trial status" in log or "Trial train_ips" in log  # Tune's own progress went to the log


def test_terminal_only_ours_sends_fds_to_the_log(tmp_path):
    code = (
        "import os, sys; from pathlib import Path; from ips_search.search.console import terminal_only_ours\n"
        f"with terminal_only_ours(Path({str(tmp_path / 'x.log')!r}), False) as t:\n"
        "    print('to the log'); os.write(2, b'fd two\\n'); t.write('to the terminal\\n')\n"
        "print('after')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["to the terminal", "after"] and out.stderr == ""
    assert (tmp_path / "x.log").read_text().splitlines() == ["to the log", "fd two"]


def test_progress_prints_each_finished_trial_once_and_skips_earlier_ones(tmp_path):
    import io

    csv = tmp_path / TRIALS_CSV
    row = dict(memory_size=4, iteration_size=2, patch_size=32, lr=1e-3, peak_memory_mb=50.0, time_total_s=3.0)
    pd.DataFrame([dict(trial_id="old", status="completed", val_score_mean=0.5, **row)]).to_csv(csv, index=False)
    stream = io.StringIO()
    with TrialProgress(csv, total=3, stream=stream) as progress:
        pd.DataFrame(
            [
                dict(trial_id="old", status="completed", val_score_mean=0.5, **row),
                dict(trial_id="new", status="completed", val_score_mean=0.8, **row),
                dict(trial_id="run", status="running", val_score_mean=0.9, **row),
            ]
        ).to_csv(csv, index=False)
        progress.poll()
        progress.poll()
    lines = [line for line in stream.getvalue().replace("\r", "\n").splitlines() if line.startswith(("old", "new"))]
    assert lines == [trial_line(dict(trial_id="new", status="completed", val_score_mean=0.8, **row))]
    assert progress.best == 0.8 and progress.seen == {"old", "new"}
    assert "M=4 I=2 P=32 lr=1.0e-03  completed      val 0.800  mem 50 MB  3 s" in lines[0]
