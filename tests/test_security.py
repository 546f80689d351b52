"""Security defaults: the dashboard needs the token and stays on loopback, exposing it warns, and neither
checkpoints nor search-space YAML files can run code when loaded."""

from __future__ import annotations

import ipaddress
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_LINE = re.compile(r"Ray dashboard: http://(?P<host>[^\s:/]+):(?P<port>\d+)")
TCP_LISTEN = "0A"


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _listening_addresses(port: int) -> set[str]:
    """Addresses with a socket in LISTEN state on ``port`` (all of this network namespace), from /proc/net."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr_hex, port_hex = fields[1].split(":")
            if fields[3] != TCP_LISTEN or int(port_hex, 16) != port:
                continue
            # each 32-bit word is in host (little-endian) order
            raw = b"".join(bytes.fromhex(addr_hex[i : i + 8])[::-1] for i in range(0, len(addr_hex), 8))
            found.add(str(ipaddress.ip_address(raw[:width])))
    return found


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (the CLI's Ctrl-C: Tune saves, Ray shuts down), then SIGTERM, then SIGKILL; last, whatever is left
    of the process group the driver leads (it was started in its own session, so that is only its processes)."""
    for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Output:
    """The driver's merged stdout/stderr, read by a thread so waiting for a line never blocks on the pipe."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern, timeout_s: float) -> re.Match | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:  # the driver exited
                return None
            self.lines.append(line)
            if match := pattern.search(line):
                return match
        return None

    def tail(self) -> str:
        return "".join(self.lines[-40:])


@pytest.mark.ray
def test_dashboard_needs_token_and_listens_on_loopback_only(tmp_path, cache_dir):
    # RAY_AUTH_MODE unset: the CLI's own default (token) applies; the default token file is used
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(IPS_SEARCH_CACHE=cache_dir, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "ips_search.run", "--space", "smoke", "--trials", "1", "--epochs", "20"]
    cmd += ["--results-dir", str(tmp_path / "results"), "--name", "sec"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    out = _Output(proc)
    try:
        match = out.wait_for(DASHBOARD_LINE, timeout_s=120)
        assert match, "no dashboard URL printed; output:\n" + out.tail()
        assert match["host"] == "127.0.0.1"
        port = int(match["port"])
        base = f"http://127.0.0.1:{port}"

        token_file = Path.home() / ".ray" / "auth_token"
        assert token_file.is_file(), f"token auth is on but {token_file} is missing"
        token = token_file.read_text().strip()

        assert _http_status(f"{base}/api/version") == 401
        assert _http_status(f"{base}/api/jobs/") == 401
        assert _http_status(f"{base}/api/version", {"Authorization": "Bearer not-the-token"}) == 403
        assert _http_status(f"{base}/api/version", {"Authorization": f"Bearer {token}"}) == 200
        assert _http_status(f"{base}/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200

        listening = _listening_addresses(port)
        assert listening, f"nothing listens on port {port}"
        exposed = sorted(a for a in listening if not _is_loopback(a))
        assert not exposed, f"dashboard port {port} is bound on {exposed}"

        # interrupt inside tuner.fit (the CLI's Ctrl-C path), not while it is still setting up
        out.wait_for(re.compile(r"Trial status|started with configuration"), timeout_s=30)
    finally:
        _stop(proc)
    assert proc.returncode in (0, 130), f"exit code {proc.returncode}; output:\n{out.tail()}"


def test_dashboard_host_outside_loopback_warns(monkeypatch, capsys):
    import ray

    from ips_search.run import build_parser
    from ips_search.search.launch import start_ray

    class Stop(Exception):
        pass

    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a session cluster must not short-cut start_ray
    monkeypatch.setattr(ray, "init", fake_init)

    with pytest.raises(Stop):
        start_ray(build_parser().parse_args([]))
    assert calls[-1]["dashboard_host"] == "127.0.0.1"
    assert "warning" not in capsys.readouterr().err

    with pytest.raises(Stop):
        start_ray(build_parser().parse_args(["--dashboard-host", "0.0.0.0"]))
    assert calls[-1]["dashboard_host"] == "0.0.0.0"
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "0.0.0.0" in err and "other machines" in err


class _OpensFile:
    """Unpickling this calls ``open(path, "w")``: a file appears if a loader runs pickled code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    from ips_search.search.trainable import CHECKPOINT_FILE, load_checkpoint

    marker = tmp_path / "pwned"
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    torch.save({"model": _OpensFile(marker), "epoch": 0}, ckpt_dir / CHECKPOINT_FILE)

    with pytest.raises(RuntimeError) as info:
        load_checkpoint(str(ckpt_dir))
    assert not marker.exists()
    msg = str(info.value)
    assert str(ckpt_dir) in msg
    assert "\n" not in msg and "\x1b" not in msg, f"not one plain line: {msg!r}"

    # the payload is live: an unsafe load does run it
    control = tmp_path / "control"
    torch.save({"model": _OpensFile(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()


def test_space_yaml_with_python_tag_is_rejected(tmp_path):
    from ips_search.errors import ConfigError
    from ips_search.space import load_space

    marker = tmp_path / "pwned"
    smoke = (REPO / "search_spaces" / "smoke.yaml").read_text()
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    space_file = tmp_path / "evil.yaml"
    space_file.write_text(re.sub(r"(?m)^description:.*$", f"description: {payload}", smoke))
    assert payload in space_file.read_text()

    with pytest.raises(ConfigError) as info:
        load_space(str(space_file))
    assert not marker.exists()
    assert "\n" not in str(info.value)

    # the payload is live: an unsafe loader does run it
    control = tmp_path / "control"
    yaml.unsafe_load(payload.replace(str(marker), str(control)))
    assert control.exists()
