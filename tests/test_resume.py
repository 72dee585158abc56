"""A run killed mid-training (SIGKILL, no cleanup) resumes from its last QAT checkpoint and keeps
every finished cell."""

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

pytestmark = [needs_fashion, pytest.mark.training]

CMD = [sys.executable, "-m", "ternbench.bench", "--log-level", "WARNING", "run",
       "--methods", "ttn_re", "--profile", "smoke", "--executor", "local",
       "--set", "ttn_re.epochs=6", "--no-report", "--no-progress"]


def test_kill_mid_training_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "TERNBENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([*CMD, "--out", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    ckpts: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        ckpts = list(out.glob("checkpoints/*/ttn_re.ckpt"))
        if ckpts:
            break
        time.sleep(0.05)
    assert ckpts, f"no checkpoint before the run ended: {proc.communicate()[0]!r}"
    os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
    proc.wait(timeout=30)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("cells/*.json")}
    assert finished, "the fp32 cell should have finished before training started"
    assert not any("ttn_re" in p.read_text() for p in finished)

    done = subprocess.run([*CMD, "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for p, mtime in finished.items():  # nothing finished was recomputed
        assert p.stat().st_mtime_ns == mtime
    df = pd.read_parquet(out / "results.parquet")
    tt = df[(df.method == "ttn_re") & (df.target == "-")].set_index("metric").value
    assert tt["resumed_from_epoch"] >= 1
    assert tt["epochs_run"] == 6
    assert 0 <= tt["top1"] <= 100
