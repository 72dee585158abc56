"""The committed reference report shows the numbers of the run it names."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

REF = Path(__file__).resolve().parents[1] / "reports" / "reference"


def test_reference_report_matches_its_results() -> None:
    df = pd.read_csv(REF / "results.csv", keep_default_na=False)
    meta = json.loads((REF / "run.json").read_text())
    assert set(df.run_id) == {meta["run_id"]}
    md = (REF / "report.md").read_text()
    assert meta["run_id"] in md
    top1 = df[(df.metric == "top1") & (df.status == "ok")]
    assert {"fp32", "fgq", "rtn", "sttn"} <= set(top1.method)
    for value in top1.value.astype(float):
        assert f"{value:.2f}" in md
    for png in ("acc_vs_latency_x86.png", "acc_vs_bits.png"):
        assert (REF / "plots" / png).stat().st_size > 10_000
        assert f"plots/{png}" in md
