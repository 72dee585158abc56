"""A Ray worker killed mid-task: the task is retried (and resumes from its QAT checkpoint), and
the run completes with every cell."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import needs_fashion

pytestmark = [needs_fashion, pytest.mark.ray, pytest.mark.training]


def _descendants(root: int) -> set[int]:
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def _quantize_workers(root: int) -> list[int]:
    """Workers of *our* embedded Ray (descendants of our CLI process) running quantize_cell."""
    found = []
    for pid in _descendants(root):
        try:
            if b"quantize_cell" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_killed_worker_task_is_retried(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "TERNBENCH_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "ternbench.bench", "--log-level", "WARNING", "run",
           "--methods", "ttn_re", "--profile", "smoke", "--executor", "ray", "--num-cpus", "2",
           "--set", "ttn_re.epochs=6", "--targets", "", "--no-report", "--no-progress",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    victim = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and victim is None:
            # wait until ttn_re trains (its first checkpoint exists), then kill that worker
            if list(out.glob("checkpoints/*/ttn_re.ckpt")):
                workers = _quantize_workers(proc.pid)
                victim = workers[0] if workers else None
            time.sleep(0.05)
        assert victim is not None, "no quantize_cell worker seen while training"
        os.kill(victim, signal.SIGKILL)  # a worker of the cluster this test started
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all()
    tt = df[(df.method == "ttn_re") & (df.target == "-")].set_index("metric").value
    assert tt["epochs_run"] == 6 and tt["resumed_from_epoch"] >= 1  # the retry resumed
    assert set(df.method) == {"fp32", "ttn_re"}
