"""Display strings for the report's tables (numbers formatted, columns named for readers).

Every ``format_*`` takes one numeric table of :class:`~ternbench.reports.tables.ReportData`
and returns the frame the Markdown/HTML templates show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .loading import MODEL_TARGET

__all__ = [
    "DASH",
    "fmt_num",
    "fmt_ops",
    "format_accuracy",
    "format_failed",
    "format_latency",
    "format_layers",
    "format_meta",
    "format_model",
    "format_status",
]


DASH = "—"


def fmt_num(v: Any, spec: str, suffix: str = "") -> str:
    """``format(v, spec) + suffix``, or an em dash for missing values."""
    if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
        return DASH
    try:
        return f"{format(float(v), spec)}{suffix}"
    except (TypeError, ValueError):
        return str(v)


def fmt_ops(v: Any) -> str:
    """Operation counts with SI suffix: 1234567 -> '1.23M'."""
    if v is None or pd.isna(v):
        return DASH
    v = float(v)
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suf}"
    return f"{v:.0f}"


def _fmt_sweep(v: Any) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return DASH
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v)


def format_accuracy(acc: pd.DataFrame, sweep_cols: Sequence[str] = ()) -> pd.DataFrame:
    """Display strings for the accuracy/cost table.

    top1 and Δtop1 with 2 decimals (the fp32 reference row reads ``ref``), bits 2 decimals,
    sparsity as a percentage, MULs/ADDs with SI suffixes. Subset and seed-count columns are shown
    only when they carry information.
    """
    out = pd.DataFrame({"Method": acc["label"].astype(str)})
    for c in sweep_cols:
        out[c] = [_fmt_sweep(v) for v in acc[c]]
    out["Model"] = acc["model"].astype(str)
    if "block" in acc and acc["block"].isin(["", "plain"]).sum() < len(acc):
        out["Block"] = [b or "plain" for b in acc["block"].astype(str)]
    out["Dataset"] = acc["dataset"].astype(str)
    if acc["subset"].nunique() > 1:
        out["Subset"] = acc["subset"].astype(str)
    out["Top-1 (%)"] = [fmt_num(v, ".2f") for v in acc["top1"]]
    out["Δ Top-1 vs fp32 (pp)"] = [
        "ref" if ref else fmt_num(d, "+.2f")
        for d, ref in zip(acc["delta_top1"], acc["is_reference"], strict=True)
    ]
    if "fp32_top1" in acc and acc["fp32_top1"].notna().any():  # each cell's own FP32 baseline
        out["Own FP32 (%)"] = [fmt_num(v, ".2f") for v in acc["fp32_top1"]]
    if "converged" in acc and acc["converged"].notna().any():
        out["Training"] = ["" if pd.isna(c) else "converged" if c >= 0.5 else "not converged"
                           for c in acc["converged"]]
    if "degraded" in acc and acc["degraded"].astype(str).ne("").any():
        out["Status"] = [f"degraded: {w}" if w else "ok" for w in acc["degraded"].astype(str)]
    out["Eff. bits"] = [fmt_num(v, ".2f") for v in acc["effective_bits"]]
    out["Sparsity"] = [
        fmt_num(100 * v if not pd.isna(v) else v, ".1f", "%") for v in acc["sparsity"]
    ]
    out["MULs"] = [fmt_ops(v) for v in acc["muls"]]
    out["ADDs"] = [fmt_ops(v) for v in acc["adds"]]
    if len(acc) and pd.to_numeric(acc["n_seeds"], errors="coerce").max() > 1:
        out["Seeds"] = acc["n_seeds"].astype(str)
    return out.reset_index(drop=True)


def format_latency(lat: pd.DataFrame, sweep_cols: Sequence[str] = ()) -> pd.DataFrame:
    """Display strings for one target's model-latency table (µs 1 decimal, speed-ups ``1.23×``)."""
    out = pd.DataFrame({"Method": lat["label"].astype(str)})
    for c in sweep_cols:
        out[c] = [_fmt_sweep(v) for v in lat[c]]
    out["Model"] = lat["model"].astype(str)
    out["Dataset"] = lat["dataset"].astype(str)
    out["Kernel"] = lat["impl"].astype(str)
    out["Latency (µs)"] = [fmt_num(v, ".1f") for v in lat["latency_us"]]
    out["Torch FP32 (µs)"] = [fmt_num(v, ".1f") for v in lat["torch_fp32_us"]]
    out["Speed-up vs torch"] = [fmt_num(v, ".2f", "×") for v in lat["speedup_torch"]]
    if lat["tvm_fp32_us"].notna().any():
        out["TVM FP32 (µs)"] = [fmt_num(v, ".1f") for v in lat["tvm_fp32_us"]]
        out["Speed-up vs TVM FP32"] = [fmt_num(v, ".2f", "×") for v in lat["speedup_tvm_fp32"]]
    return out.reset_index(drop=True)


def format_model(model: pd.DataFrame) -> pd.DataFrame:
    """Display strings for the end-to-end (deployed artifact) table."""
    out = pd.DataFrame(
        {
            "Method": model["label"].astype(str),
            "Model": model["model"].astype(str),
            "Target": model["target"].astype(str),
            "TVM artifact (µs)": [fmt_num(v, ".0f") for v in model["tvm_us"]],
            "Kernel sum (µs)": [fmt_num(v, ".0f") for v in model["kernel_sum_us"]],
            "Artifact / kernels": [fmt_num(v, ".2f", "×") for v in model["overhead"]],
            "Kernels in sequence (µs)": [fmt_num(v, ".0f") for v in
                                         model.get("kernel_chain_us",
                                                   pd.Series(np.nan, model.index))],
            "Artifact / sequence": [fmt_num(v, ".2f", "×") for v in
                                    model.get("glue", pd.Series(np.nan, model.index))],
            "Torch FP32 eager (µs)": [fmt_num(v, ".0f") for v in model["torch_fp32_us"]],
            "Torch INT8 (µs)": [fmt_num(v, ".0f") for v in model["torch_int8_us"]],
            "ORT INT8 (µs)": [fmt_num(v, ".0f") for v in model["ort_int8_us"]],
            "Speed-up vs FP32": [fmt_num(v, ".2f", "×") for v in model["speedup_fp32"]],
            "Speed-up vs INT8": [fmt_num(v, ".2f", "×") for v in model["speedup_int8"]],
            "Speed-up vs ORT INT8": [fmt_num(v, ".2f", "×") for v in model["speedup_ort"]],
            "Top-1 fake-quant (%)": [fmt_num(v, ".2f") for v in model["top1"]],
            "Top-1 deployed (%)": [fmt_num(v, ".2f") for v in model["top1_deployed"]],
            "Same prediction": [fmt_num(100 * v, ".1f", "%") for v in model["pred_agreement"]],
            "Logit Δ vs fake-quant": [fmt_num(v, ".1e") for v in model["logit_rel_diff"]],
            "Flag": [str(f) if isinstance(f, str) else "" for f in model["flag"]],
        }
    )
    if model["other_us"].notna().any():  # runs with the chained (torch glue) model
        out["Non-GEMM ops (µs)"] = [fmt_num(v, ".0f") for v in model["other_us"]]
    return out.reset_index(drop=True)


def format_status(status: pd.DataFrame) -> pd.DataFrame:
    """Display strings for the built / verified (not timed) targets."""
    return pd.DataFrame(
        {
            "Method": status["label"].astype(str),
            "Model": status["model"].astype(str),
            "Target": status["target"].astype(str),
            "Status": status["status_text"].astype(str),
            "Whole model": [_whole_model_status(a, d, h) for a, d, h in zip(
                status.get("model_top1_agreement", pd.Series(np.nan, status.index)),
                status.get("model_logit_rel_diff", pd.Series(np.nan, status.index)),
                status.get("model_checked_by", pd.Series("", status.index)),
                strict=True)],
        }
    ).reset_index(drop=True)


_CHECKED_BY = {"qemu": "ran under qemu", "serial emulation": "ran in serial CPU emulation",
               "gpu": "ran on the GPU"}


def _whole_model_status(agree: Any, rel: Any, how: Any = "") -> str:
    """How the whole model was run and how it compares with fake-quant, else 'built'."""
    if agree is None or pd.isna(agree):
        return "built"
    ran = _CHECKED_BY.get(str(how), "ran")
    return f"{ran}: top-1 agrees {100 * float(agree):.0f}%, logit Δ {float(rel):.1e} of max"


def format_layers(layers: pd.DataFrame) -> pd.DataFrame:
    """Display strings for one target's per-layer latency table."""
    return pd.DataFrame(
        {
            "Method": layers["label"].astype(str),
            "Model": layers["model"].astype(str),
            "Kernel": layers["impl"].astype(str),
            "Layer": layers["layer"].astype(str),
            "Latency (µs)": [fmt_num(v, ".1f") for v in layers["latency_us"]],
            "Torch FP32 (µs)": [fmt_num(v, ".1f") for v in layers["torch_fp32_us"]],
            "Speed-up vs torch": [fmt_num(v, ".2f", "×") for v in layers["speedup_torch"]],
        }
    ).reset_index(drop=True)


def format_failed(failed: pd.DataFrame, max_error: int | None = None) -> pd.DataFrame:
    """Display strings for the failed cells; ``max_error`` truncates long reasons."""

    def err(e: str) -> str:
        e = " ".join(str(e).split())  # tracebacks become one line
        if max_error is not None and len(e) > max_error:
            return e[: max_error - 1] + "…"
        return e or "(no reason recorded)"

    def where(r: Any) -> str:
        parts = [p for p in (r.target if r.target != MODEL_TARGET else "", r.layer, r.impl) if p]
        return " / ".join(parts) or "accuracy"

    return pd.DataFrame(
        {
            "Method": failed["label"].astype(str),
            "Model": failed["model"].astype(str),
            "Dataset": failed["dataset"].astype(str),
            "Seed": failed["seed"].astype(str),
            "Stage": [where(r) for r in failed.itertuples()],
            "Cell": failed["cell_key"].astype(str),
            "Error": [err(e) for e in failed["error"]],
        }
    ).reset_index(drop=True)


def format_meta(meta: pd.DataFrame) -> pd.DataFrame:
    """The metadata table with its field index as a first column."""
    return meta.reset_index().rename(columns={"field": "Field"})
