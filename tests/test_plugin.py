"""A third-party method plugin (``tests/plugins/ternbench_demo_plugin``: its own file and a
``.dist-info`` with the ``ternbench.methods`` entry point, nothing else) runs end to end: listed
with its facts, in ``ternbench run`` and in ``ternbench kernels --whole-model``. Each command
runs in a subprocess with the plugin folder on ``PYTHONPATH``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import needs_fashion

PLUGIN_DIR = Path(__file__).parent / "plugins" / "ternbench_demo_plugin"
NAME = "demo_ptq"


def _ternbench(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_DIR), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env["TERNBENCH_CACHE"] = str(tmp_path / "cache")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    res = subprocess.run([sys.executable, "-m", "ternbench.bench", *args], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, f"ternbench {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res


def test_plugin_is_listed_with_its_facts(tmp_path: Path) -> None:
    methods = _ternbench(["list", "methods"], tmp_path).stdout
    assert any(line.split()[:2] == [NAME, "ptq"] for line in methods.splitlines())
    ablations = _ternbench(["list", "ablations"], tmp_path).stdout
    assert f"{NAME}.ratio=0.5,0.7" in ablations  # the plugin's own named ablation


@needs_fashion
def test_plugin_runs_in_ternbench_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _ternbench(["run", "--methods", NAME, "--profile", "smoke", "--executor", "local",
                "--targets", "", "--subset", "200", "--no-progress", "--out", str(out)],
               tmp_path)
    df = pd.read_csv(out / "results.csv")
    ok = df[df.status.eq("ok")]
    assert set(df.method) == {"fp32", NAME}  # the reference joins every run
    mine = ok[ok.method.eq(NAME)].set_index("metric")["value"]
    assert mine["top1"] > 50 and mine["effective_bits"] < 3
    assert mine["deploy_max_abs_diff"] < 0.1  # the integer deploy path agrees (int8 rounding)
    assert json.loads(ok[ok.method.eq(NAME)].method_config.iloc[0])["ratio"] == 0.7
    assert NAME in (out / "report.md").read_text()


@pytest.mark.tvm
def test_plugin_runs_in_whole_model_kernels(tmp_path: Path) -> None:
    """A post-training plugin is not handed QAT's ``epochs=0`` (its config has no such field):
    the whole model is quantized, compiled and timed."""
    pytest.importorskip("tvm")
    out = tmp_path / "k"
    _ternbench(["kernels", "--whole-model", "resnet8", "--model-methods", NAME, "--model-only",
                "--quick", "--rounds", "1", "--out", str(out)], tmp_path)
    r = pd.read_csv(out / "model.csv").iloc[0]
    assert (r.model, r.method) == ("resnet8", NAME)
    assert r.tvm_artifact_us > 0 and r.top1_agreement == 1.0
    assert (out / "artifacts" / f"resnet8-{NAME}" / "manifest.json").exists()
