"""Scale-out on one CPU machine: a real two-node Ray cluster, and fractional (logical) GPUs per trial.

Both searches run as driver subprocesses (``python -m ips_search.run``) so they can join or start their own Ray
next to the session's shared test cluster. The standalone cluster gets its own ports and temp dirs, and is torn
down by killing only the processes whose command line names those temp dirs: ``ray stop --force`` would also kill
every other Ray on the machine (the session's cluster, anyone else's search).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from ips_search.experiment import SearchSettings
from ips_search.search.launch import fit_resources
from ips_search.search.trainable import make_trainable

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env() -> dict[str, str]:
    """The environment for Ray CLIs and drivers: token auth as the tool uses it, and no inherited RAY_ADDRESS
    (which would point them at the session's cluster)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def kill_processes_under(marker: str) -> None:
    """SIGKILL the processes whose command line contains ``marker`` (a temp dir only our nodes use), by pid."""
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != me and marker in " ".join(proc.info["cmdline"] or []):
                proc.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def result_rows(trial_path: str | Path) -> list[dict]:
    lines = (Path(trial_path) / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run_driver(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ips_search.run", "--space", "smoke", "--no-dashboard", "--scheduler", "fifo", *args]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


# ------------------------------------------------------------------ fast unit checks: resources per trial


@pytest.mark.parametrize(("cpus", "gpus"), [(1.0, 0.0), (0.5, 0.25), (2.0, 1.0), (0.25, 0.5)])
def test_trial_resource_request_equals_the_flags(cpus, gpus):
    settings = SearchSettings(name="x", results_dir="/tmp/x", space="smoke", cpus_per_trial=cpus, gpus_per_trial=gpus)
    request = make_trainable(settings)._resources  # the PlacementGroupFactory tune.with_resources attached
    wanted = {k: v for k, v in {"CPU": cpus, "GPU": gpus}.items() if v}  # Ray drops zero amounts
    assert request.bundles == [wanted] and request.strategy == "PACK"
    assert {k: v for k, v in request.required_resources.items() if v} == wanted


@pytest.mark.parametrize(
    ("cpus", "gpus", "cluster", "expected"),
    [
        (1.0, 0.0, {"CPU": 2.0}, 2),
        (0.5, 0.0, {"CPU": 2.0}, 4),
        (1.0, 0.25, {"CPU": 2.0, "GPU": 1.0}, 2),  # CPUs are the limit
        (0.5, 0.25, {"CPU": 2.0, "GPU": 1.0}, 4),  # four trials share the GPU
        (0.25, 0.25, {"CPU": 2.0, "GPU": 1.0}, 4),  # GPU is the limit
        (0.5, 0.5, {"CPU": 2.0}, 4),  # no GPU: falls back to CPU, CPUs decide
    ],
)
def test_concurrency_fits_the_cluster(cpus, gpus, cluster, expected, capsys):
    settings = SearchSettings(
        name="x", results_dir="/tmp/x", space="smoke", trials=8, cpus_per_trial=cpus, gpus_per_trial=gpus
    )
    fit_resources(settings, cluster, explicit_concurrency=False)
    assert settings.concurrency == expected
    assert ("no GPU" in capsys.readouterr().err) == (gpus > 0 and "GPU" not in cluster)


# ------------------------------------------------------------------ a two-node cluster on this machine


@pytest.fixture
def two_node_cluster():
    """Head (1 CPU) + a second raylet (1 CPU) on this machine, each with its own temp dir and ports."""
    head_tmp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths must stay under ~100 chars
    node_tmp = tempfile.mkdtemp(prefix="rn-", dir="/tmp")
    gcs, client, *ports = free_ports(10)
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", "--object-store-memory", "80000000"]
    head = [RAY, "start", "--head", "--port", str(gcs), "--ray-client-server-port", str(client)]
    head += ["--include-dashboard=false", "--temp-dir", head_tmp, "--node-ip-address", "127.0.0.1"]
    head += ["--dashboard-agent-listen-port", str(ports[0]), "--dashboard-agent-grpc-port", str(ports[1])]
    head += ["--metrics-export-port", str(ports[2]), "--runtime-env-agent-port", str(ports[3])]
    node = [RAY, "start", "--address", f"127.0.0.1:{gcs}", "--temp-dir", node_tmp, "--node-ip-address", "127.0.0.1"]
    node += ["--dashboard-agent-listen-port", str(ports[4]), "--dashboard-agent-grpc-port", str(ports[5])]
    node += ["--metrics-export-port", str(ports[6]), "--runtime-env-agent-port", str(ports[7])]
    try:
        for cmd in (head + common, node + common):
            done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(cmd)}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        yield f"127.0.0.1:{gcs}"
    finally:
        kill_processes_under(head_tmp)
        kill_processes_under(node_tmp)
        time.sleep(1)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(node_tmp, ignore_errors=True)


CLUSTER_STATE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes = [{"id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0)} for n in ray.nodes()]
print(json.dumps({"nodes": nodes}))
"""


@pytest.mark.ray
def test_search_uses_both_nodes_of_a_two_node_cluster(two_node_cluster, tmp_path):
    results = tmp_path / "results"
    done = run_driver(
        ["--trials", "4", "--epochs", "1", "--address", two_node_cluster, "--results-dir", str(results)]
        + ["--name", "two-nodes", "--no-reference"],  # the nodes are the point: no reference run
        timeout=240,
    )
    assert "(2 at once, 1 CPU + 0 GPU each)" in done.stdout  # 1 CPU per node, 1 CPU per trial

    df = pd.read_csv(results / "two-nodes" / "trials.csv", dtype={"trial_id": str})
    assert len(df) == 4 and (df["status"] == "completed").all() and df["val_accuracy"].notna().all()
    trial_nodes = {row["node_id"] for path in df["path"] for row in result_rows(path)}

    probe = subprocess.run(
        [sys.executable, "-c", CLUSTER_STATE, two_node_cluster],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    state = json.loads(probe.stdout.strip().splitlines()[-1])
    nodes = {n["id"] for n in state["nodes"] if n["alive"]}
    assert len(nodes) == 2 and all(n["cpus"] == 1 for n in state["nodes"] if n["alive"])
    # The node id each trial reported (from its own runtime context), not the GCS actor table: Ray may already
    # have dropped dead actors' pids from it, which made an earlier, pid-based version of this check flaky in CI.
    assert trial_nodes == nodes, "trials should have run on both nodes"


# ------------------------------------------------------------------ fractional GPUs (logical, CUDA absent)


@pytest.mark.ray
def test_four_trials_share_one_logical_gpu_concurrently(tmp_path):
    results = tmp_path / "results"
    done = run_driver(
        ["--trials", "4", "--epochs", "1", "--num-gpus", "1", "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5"]
        + ["--results-dir", str(results), "--name", "quarter-gpus", "--no-reference"],
        timeout=240,
    )
    assert "(4 at once, 0.5 CPU + 0.25 GPU each)" in done.stdout
    assert "no GPU" not in done.stderr  # the local Ray advertised the GPU: no fallback

    df = pd.read_csv(results / "quarter-gpus" / "trials.csv", dtype={"trial_id": str})
    assert len(df) == 4 and (df["status"] == "completed").all()
    intervals = []
    for path in df["path"]:
        rows = result_rows(path)
        # Without CUDA the logical GPU only schedules, and each trial trains on the CPU; with one, on the GPU.
        assert {r["device"] for r in rows} == {"cuda" if torch.cuda.is_available() else "cpu"}
        assert {r["memory_kind"] for r in rows} == {"cuda" if torch.cuda.is_available() else "predicted-cuda"}
        intervals.append((rows[0]["timestamp"] - rows[0]["time_this_iter_s"], rows[-1]["timestamp"]))
    latest_start, earliest_end = max(s for s, _ in intervals), min(e for _, e in intervals)
    assert latest_start < earliest_end - 1, f"the 4 trials did not all run at once: {intervals}"
