"""The benchmark's output: the ``kernels.csv`` columns and rows of one (shape, batch) group, and
the ``kernels.md`` summary."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .impls import _Impl
    from .shapes import KernelShape

COLUMNS = (
    "op", "shape", "batch", "M", "K", "N", "act_mode", "impl", "target", "threads",
    "median_us", "p25_us", "p75_us", "speedup_vs_torch_fp32", "speedup_vs_torch_int8",
    "gmacs", "bytes", "roofline_fraction", "bandwidth_gbs", "max_abs_err",
    "suite", "layer", "backend", "rule", "params", "build_s", "rounds", "target_str", "note",
    "tvm_version", "torch_version", "cpu", "isa", "git",
)


def _rows(shape: KernelShape, batch: int, impls: list[_Impl], *, bandwidth_gbs: float,
          rounds: int, prov: dict[str, str]) -> list[dict[str, Any]]:
    ho, wo = shape.out_hw
    m, k, n = batch * ho * wo, shape.fan_in, shape.cout
    med = {(i.impl, i.act_mode): float(np.median(i.samples)) for i in impls if i.samples}
    rows = []
    for i in impls:
        t = med.get((i.impl, i.act_mode), math.nan)
        row = {
            "op": shape.op, "shape": shape.label, "batch": batch, "M": m, "K": k, "N": n,
            "act_mode": i.act_mode, "impl": i.impl, "target": "x86", "threads": i.threads,
            "median_us": t * 1e6,
            "p25_us": float(np.percentile(i.samples, 25)) * 1e6 if i.samples else math.nan,
            "p75_us": float(np.percentile(i.samples, 75)) * 1e6 if i.samples else math.nan,
            "speedup_vs_torch_fp32": med.get(("torch_fp32", "fp32"), math.nan) / t,
            "speedup_vs_torch_int8": med.get(("torch_int8", "int8"), math.nan) / t,
            "gmacs": shape.macs(batch) / t / 1e9,
            "bytes": i.nbytes or math.nan,
            "roofline_fraction": (i.nbytes / t / (bandwidth_gbs * 1e9)) if i.nbytes else math.nan,
            "bandwidth_gbs": bandwidth_gbs, "max_abs_err": i.max_abs_err,
            "suite": shape.suite, "layer": shape.name, "backend": i.backend, "rule": i.rule,
            "params": i.params, "build_s": i.build_s, "rounds": len(i.samples) or rounds,
            "target_str": i.target_str, "note": i.note, **prov,
        }
        rows.append(row)
    return rows


def _markdown(df: Any, meta: dict[str, Any]) -> str:
    """Short summary: one line per (shape, batch) with each impl's median and the ternary
    kernels' speed-ups over torch."""
    lines = [
        "# Kernel benchmark", "",
        f"{meta['when']} · {meta['cpu']} · {meta['threads']} thread(s) · TVM "
        f"{meta['tvm_version']} · torch {meta['torch_version']} · git {meta['git'] or '-'}",
        "", f"1-thread DRAM read bandwidth: {meta['bandwidth_gbs']:.1f} GB/s. Times are medians "
        f"of {meta['rounds']} interleaved rounds (µs); `xF` / `xI` = speed-up over torch fp32 "
        "/ torch int8 in the same run; roofline = minimum bytes / time / bandwidth.", "",
    ]
    if meta.get("peaks"):
        lines += ["1-thread instruction peaks of the kernels' inner recipes, operands in "
                  "registers (GMAC/s; `bench/kernels/peaks.py`): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in meta["peaks"].items()) + ".", ""]
    ok = df[df["median_us"].notna()].copy()
    if not len(ok):
        return "\n".join([*lines, "No impl could be timed.", ""])
    # an impl measured in several activation modes (e.g. tvm_metaschedule) gets one column each
    modes = ok.groupby("impl")["act_mode"].nunique()
    ok["col"] = [i if modes[i] == 1 else f"{i} ({a})" for i, a in zip(ok["impl"], ok["act_mode"],
                                                                        strict=True)]
    base = ["torch_fp32", "torch_int8", "tvm_fp32", "tvm_int8"]
    cols = list(dict.fromkeys(ok["col"]))
    head = ["shape", "batch", *[b for b in base if b in cols], *[c for c in cols if c not in base]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, batch), g in ok.groupby(["shape", "batch"], sort=False):
        by = {r.col: r for r in g.itertuples()}
        cells = [str(label), str(batch)]
        for c in head[2:]:
            r = by.get(c)
            if r is None:
                cells.append("-")
            elif c in base:
                cells.append(f"{r.median_us:.1f}")
            else:
                cells.append(f"{r.median_us:.1f} (x{r.speedup_vs_torch_fp32:.2f}F "
                             f"x{r.speedup_vs_torch_int8:.2f}I, roof {r.roofline_fraction:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    tern = ok[~ok["col"].isin(base)]
    if len(tern):
        lines += ["Geometric-mean speed-up over torch fp32 / int8:", ""]
        for (col, batch), g in tern.groupby(["col", "batch"], sort=False):
            gf = float(np.exp(np.log(g["speedup_vs_torch_fp32"].dropna()).mean()))
            gi = float(np.exp(np.log(g["speedup_vs_torch_int8"].dropna()).mean()))
            lines.append(f"* {col}, batch {batch}: x{gf:.2f} / x{gi:.2f} ({len(g)} shapes)")
        lines.append("")
    fails = df[df["median_us"].isna()]
    if len(fails):
        lines += ["Failed (not timed):", ""]
        lines += [f"* {r.shape} batch {r.batch} {r.impl}: {r.note}" for r in fails.itertuples()]
        lines.append("")
    return "\n".join(lines)
