"""The four command-line entry points share one base: a bad flag is one line and exit 2, Ctrl-C one line and 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ips_search import estimate, extract, run
from ips_search.cli import EXIT_INTERRUPTED, exit_code_of
from ips_search.errors import EXIT_BAD_INPUT, ConfigError
from ips_search.report import __main__ as report

CLIS = {"run": run.main, "report": report.main, "estimate": estimate.main, "extract": extract.main}


@pytest.mark.parametrize("name", sorted(CLIS))
def test_an_unknown_flag_is_one_line_exit_2(name, capsys):
    with pytest.raises(SystemExit) as exc:
        CLIS[name](["--no-such-flag"])
    assert exc.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith("; see --help"), err


@pytest.mark.parametrize("name", sorted(CLIS))
def test_help_still_prints_the_usage(name, capsys):
    with pytest.raises(SystemExit) as exc:
        CLIS[name](["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_bad_input_and_ctrl_c_are_one_line_each(capsys):
    def bad(_):
        raise ConfigError("the thing is wrong; fix it")

    def interrupted(_):
        raise KeyboardInterrupt

    assert exit_code_of(bad, None) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == "error: the thing is wrong; fix it"
    assert exit_code_of(interrupted, None, interrupted="stopped: nothing was written") == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "stopped: nothing was written"


def as_in_a_terminal() -> None:
    """The child starts with SIGINT's default action, as a command started in a terminal does. A test suite run in
    the background of a non-interactive shell (``make test &``) inherits SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler: the signal would be dropped, as it is for any background job."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_a_running_command_is_one_line_and_130(tmp_path, cache_dir):
    """A real SIGINT, as a terminal's Ctrl-C sends it, into ``estimate`` while it predicts a grid (about 25 s).

    The child says when its imports are done, so the signal lands in the command's work whatever the machine's load.
    """
    env = {**os.environ, "IPS_SEARCH_CACHE": cache_dir}
    argv = ["--space", "default", "--sample", "60", "--device", "cpu"]
    code = f"import sys; from ips_search import estimate; print('ready', flush=True); sys.exit(estimate.main({argv!r}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        preexec_fn=as_in_a_terminal,
    )
    assert proc.stdout.readline().strip() == "ready", proc.communicate()
    time.sleep(3)  # into the grid
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["interrupted"], err


def test_ctrl_c_while_the_command_loads_is_one_line_and_130(tmp_path, cache_dir):
    """Ctrl-C a second after start, while the search command still imports torch and Ray (or, on a fast machine,
    checks the space): the same one line and exit 130, never a traceback or an aborted interpreter."""
    env = {**os.environ, "IPS_SEARCH_CACHE": cache_dir}
    cmd = [sys.executable, "-m", "ips_search.run", "--space", "smoke", "--dry-run"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(cmd, **pipes, env=env, cwd=tmp_path, preexec_fn=as_in_a_terminal)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, (out, err)
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted"], err


def test_the_search_command_imports_ray_only_after_reading_its_flags():
    """Ray reads RAY_AUTH_MODE when first imported, and the search sets it from its flags (token auth for a cluster it
    starts): importing the command must not import Ray, or the dashboard of a local search would start without it."""
    code = "import sys, ips_search.run; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
