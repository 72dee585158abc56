"""Issue 14 acceptance: with a `ray start --head` cluster running on the machine, a plain
`ternbench run` starts its own embedded Ray and leaves the cluster untouched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import needs_fashion

pytestmark = [needs_fashion, pytest.mark.ray, pytest.mark.slow]


def _pids_with(*texts: str) -> list[int]:
    """PIDs whose full command line (ps -ww: no truncation) holds any of ``texts``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True,
                         text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()[1:]
            if any(t in line for t in texts) and str(os.getpid()) != line.split(None, 1)[0]]


def _stop_cluster(temp: Path, port: str) -> None:
    """End the test's own cluster: its processes by PID (never `ray stop`), then its folder."""
    for pid in _pids_with(str(temp), f":{port} "):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    shutil.rmtree(temp, ignore_errors=True)


def test_run_ignores_a_local_ray_cluster(tmp_path: Path) -> None:
    ray_bin = Path(sys.executable).with_name("ray")
    # our cluster's own (short: socket paths) temp dir; its processes carry it in argv
    temp = Path(tempfile.mkdtemp(prefix="tb14-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = "46391"
    try:
        subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1",
                        "--include-dashboard=false", f"--temp-dir={temp}"], env=env,
                       check=True, capture_output=True, timeout=120)
        before = sorted(_pids_with(str(temp), f":{port} "))
        assert before
        out = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "ternbench.bench", "run", "--methods", "fgq", "--profile",
             "smoke", "--targets", "", "--no-report", "--no-progress", "--out", str(out)],
            env={**env, "TERNBENCH_CACHE": str(tmp_path / "cache")}, capture_output=True,
            text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "starting an embedded Ray" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert (out / "results.parquet").is_file()
        # the cluster is untouched: the same processes, alive, and still answering
        assert sorted(_pids_with(str(temp), f":{port} ")) == before
        ping = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(address='127.0.0.1:" + port + "'); "
             "print(int(ray.cluster_resources()['CPU']))"],
            env=env, capture_output=True, text=True, timeout=120)
        assert ping.stdout.strip().splitlines()[-1] == "1", ping.stderr[-2000:]
    finally:
        _stop_cluster(temp, port)


def test_cluster_workers_get_the_forced_isa(tmp_path: Path) -> None:
    """With ``--ray-address`` (an existing cluster, whose workers do not inherit the driver's
    environment) a forced ISA level and its torch caps reach the workers via the job's
    runtime_env, so that a forced run computes the same on a cluster as on an embedded Ray."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp = Path(tempfile.mkdtemp(prefix="tbisa-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    for k in ("RAY_ADDRESS", "TERNBENCH_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        env.pop(k, None)
    port = "46393"
    probe = (
        "import os, ray\n"
        "from ternbench.bench.executor import RayExecutor\n"
        f"ex = RayExecutor(address='127.0.0.1:{port}')\n"
        "f = ray.remote(num_cpus=1)(lambda: [os.environ.get(k) for k in "
        "('TERNBENCH_ISA', 'ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA')])\n"
        "print('WORKER', ray.get(f.remote()))\n"
        "ray.shutdown()\n")
    try:
        # the cluster starts without the variables: its workers cannot have them from it
        subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1",
                        "--include-dashboard=false", f"--temp-dir={temp}"], env=env,
                       check=True, capture_output=True, timeout=120)
        forced = {**env, "TERNBENCH_ISA": "generic", "ATEN_CPU_CAPABILITY": "default",
                  "ONEDNN_MAX_CPU_ISA": "SSE41"}
        proc = subprocess.run([sys.executable, "-c", probe], env=forced, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER"))
        assert line == "WORKER ['generic', 'default', 'SSE41']", line
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER"))
        assert line == "WORKER [None, None, None]", line
    finally:
        _stop_cluster(temp, port)
