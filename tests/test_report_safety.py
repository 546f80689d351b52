"""The report against a hostile or damaged experiment folder, and Ctrl-C.

* modules planted in the experiment or report folder never run in the notebook's kernel;
* Ctrl-C is one line and exit 130, kills the kernel and leaves the old report as it was;
* a report that fails half-way leaves the old report as it was;
* a corrupt line in ``optuna.journal`` is skipped and counted in one note;
* a bad flag is one line and exit 2.

Experiments are written by hand (no search runs); two tests execute the notebook (about 20 s each).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import optuna
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from test_report_sources import epoch, make_experiment

import ips_search.report.write as report_write
from ips_search.errors import EXIT_BAD_INPUT
from ips_search.experiment import JOURNAL_FILE
from ips_search.report import write_report
from ips_search.report.__main__ import main as report_main
from ips_search.report.notebook import execute_notebook, kernel_argv
from ips_search.report.sources import load_study, read_study

# What the kernel imports on its way up and in the notebook's set-up cell, and what Python runs at start-up
PLANTED = [
    "ipykernel_launcher",
    "ipykernel",
    "IPython",
    "pandas",
    "matplotlib",
    "numpy",
    "ips_search",
    "json",
    "sitecustomize",
    "usercustomize",
    "ipython_kernel_config",  # IPython's config file, which is Python too
]
N_STUDY_TRIALS = 6
SKIPPED_NOTE = f"{JOURNAL_FILE}: skipped 1 unreadable line(s)"


def write_journal(folder: Path, n_trials: int = N_STUDY_TRIALS) -> Path:
    """``optuna.journal`` as the search writes it: a study named like the experiment with ``n_trials`` finished."""
    journal = folder / JOURNAL_FILE
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=folder.name, storage=storage, direction="maximize")
    for _ in range(n_trials):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        patch = trial.suggest_int("patch_size", 8, 64)
        trial.set_user_attr("peak_memory_mb", 10.0 * patch)
        study.tell(trial, 3 * lr + patch / 100)
    return journal


def corrupt_middle_line(journal: Path) -> None:
    """A torn line in the middle of the journal (a disk or copy fault, not the search writing), between whole ones."""
    lines = journal.read_bytes().splitlines(keepends=True)
    middle = len(lines) // 2
    journal.write_bytes(b"".join(lines[:middle]) + b'{"op_code": 5, "worker_\n' + b"".join(lines[middle:]))


def small_experiment(folder: Path) -> Path:
    """Two finished trials, a study of six (enough for parameter importance) with one corrupt line in the middle."""
    make_experiment(
        folder,
        {
            "low": [epoch(1), epoch(2, "completed", val_accuracy=0.6, peak_memory_mb=50.0)],
            "high": [epoch(1), epoch(2, "completed", val_accuracy=0.8, peak_memory_mb=90.0)],
        },
        max_memory_mb=500,
    )
    corrupt_middle_line(write_journal(folder))
    return folder


def plant(folder: Path, markers: Path) -> None:
    """A module for every name in PLANTED that, if it is ever imported, leaves a file in ``markers``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PLANTED:
        marker = json.dumps(str(markers / f"{folder.name}-{name}"))
        (folder / f"{name}.py").write_text(f"open({marker}, 'w').close()\n")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def leftovers(experiment: Path) -> list[str]:
    """Temporary report folders (``.report-new-*``, ``.report-old-*``) left in the experiment."""
    return [p.name for p in experiment.iterdir() if p.name.startswith(".report-")]


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory) -> tuple[Path, Path, dict]:
    """An experiment with modules planted in it and in its report folder, reported on with the notebook executed."""
    root = tmp_path_factory.mktemp("planted")
    markers = root / "markers"
    markers.mkdir()
    folder = small_experiment(root / "planted-exp")
    plant(folder, markers)
    plant(folder / "report", markers)
    result = write_report(folder, notebook=True, html=True, n_images=0)
    return folder, markers, result


def test_modules_planted_in_the_experiment_or_report_folder_never_run(planted_report):
    folder, markers, result = planted_report
    assert sorted(p.name for p in markers.iterdir()) == []
    assert result["error"] is None
    out = folder / "report"
    assert (out / "report.html").is_file() and (out / "summary.md").is_file()
    nb = nbformat.read(out / "report.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not (out / "pandas.py").exists()  # the old report folder (with its planted files) was replaced whole
    assert leftovers(folder) == []


def test_the_kernel_starts_in_an_empty_folder_that_is_not_on_its_module_path(tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    plant(tmp_path / "here", markers)
    monkeypatch.chdir(tmp_path / "here")  # the caller's folder (a report run from inside an experiment, say)
    probe = "import json, os, sys\nprint(json.dumps({'cwd': os.getcwd(), 'files': os.listdir('.'), 'path': sys.path}))"
    nb = execute_notebook(new_notebook(cells=[new_code_cell(probe)]))
    seen = json.loads(nb.cells[0].outputs[0].text)
    assert seen["files"] == [] and seen["cwd"] != str(tmp_path / "here")
    assert "" not in seen["path"] and seen["cwd"] not in seen["path"] and str(tmp_path / "here") not in seen["path"]
    assert sorted(p.name for p in markers.iterdir()) == []
    if sys.version_info >= (3, 11):
        assert "-P" in kernel_argv()


def test_the_notebook_says_how_many_journal_lines_it_skipped(planted_report):
    folder, _, result = planted_report
    assert sum(n.startswith(SKIPPED_NOTE) for n in result["notes"]) == 1
    nb = nbformat.read(folder / "report" / "report.ipynb", as_version=4)
    printed = [
        line
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
        for line in o.text.splitlines()
    ]
    assert [ln for ln in printed if SKIPPED_NOTE in ln] == [f"note: {SKIPPED_NOTE}; the study was read without them"]


def _kernel_of(pid: int) -> int | None:
    """The pid of the ipykernel process started by ``pid``, if there is one yet."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"ipykernel_launcher" in cmdline:
            return int(entry.name)
    return None


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # dead, waiting only for a reaper


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the kernel process through /proc")
def test_ctrl_c_while_the_notebook_runs_is_one_line_and_keeps_the_old_report(planted_report, tmp_path):
    folder = tmp_path / "ctrl-c"
    shutil.copytree(planted_report[0], folder)
    before = digests(folder / "report")
    assert "report.html" in before
    proc = subprocess.Popen(
        [sys.executable, "-m", "ips_search.report", str(folder), "--images", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which gets the SIGINT as a terminal's Ctrl-C would
    )
    try:
        deadline = time.monotonic() + 180
        kernel = None
        while kernel is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            kernel = _kernel_of(proc.pid)
        assert kernel is not None, "the notebook's kernel never started"
        time.sleep(1.0)  # let it reach the cells
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    said = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("  ")]  # "  " lines: progress
    assert said == ["interrupted"], err
    assert digests(folder / "report") == before
    assert leftovers(folder) == []
    deadline = time.monotonic() + 10
    while not _gone(kernel) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(kernel), "the kernel outlived the report"


def test_a_report_that_fails_half_way_leaves_the_old_one(tmp_path, monkeypatch):
    folder = small_experiment(tmp_path / "fails")
    write_report(folder, notebook=False, n_images=0)
    before = digests(folder / "report")
    result = folder / "train_ips_high_00000_lr=0.001" / "result.json"
    text = result.read_text()
    assert '"val_accuracy": 0.8' in text
    result.write_text(text.replace('"val_accuracy": 0.8', '"val_accuracy": 0.9'))  # so the new tables differ

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_write, "_attention", broken)  # after the tables and plots are written
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(folder, notebook=False, n_images=0)
    assert digests(folder / "report") == before
    assert leftovers(folder) == []


def test_a_corrupt_journal_line_is_skipped_and_counted_once(tmp_path, capsys):
    folder = small_experiment(tmp_path / "corrupt")
    assert report_main([str(folder), "--no-notebook", "--images", "0"]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if JOURNAL_FILE in ln]
    assert notes == [f"note: {SKIPPED_NOTE}; the study was read without them"]
    assert SKIPPED_NOTE in (folder / "report" / "summary.md").read_text()
    assert (folder / "report" / "importance.png").is_file()  # the study was still read: importance was computed
    study = load_study(folder)  # every whole line around the torn one was read
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * N_STUDY_TRIALS


def test_a_half_written_last_journal_line_is_not_counted(tmp_path):
    folder = tmp_path / "writing"
    folder.mkdir()
    journal = write_journal(folder)
    with journal.open("ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "w", "tri')  # the search is writing this line right now
    study, note = read_study(folder)
    assert note is None and len(study.trials) == N_STUDY_TRIALS


def test_a_journal_that_cannot_be_replayed_is_a_note_not_a_traceback(tmp_path):
    folder = tmp_path / "unreplayable"
    folder.mkdir()
    journal = write_journal(folder)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + b'{"op_code": 4}\n' + b"".join(lines[1:]))  # JSON, but not an operation
    study, note = read_study(folder)
    assert study is None and note.startswith(f"{JOURNAL_FILE} could not be replayed")


def test_a_bad_report_flag_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        report_main(["--top", "x"])
    assert exc.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--top" in err[0]
