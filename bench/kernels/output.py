"""The benchmark's output: the ``kernels.csv`` columns and rows of one (shape, batch) group, and
the ``kernels.md`` summary."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from .targets import targets_markdown, ternary_kernels

if TYPE_CHECKING:
    from .impls import _Impl
    from .shapes import KernelShape

COLUMNS = (
    "op", "shape", "batch", "M", "K", "N", "act_mode", "impl", "target", "threads",
    "median_us", "p25_us", "p75_us", "speedup_vs_torch_fp32", "speedup_vs_torch_int8",
    "gmacs", "bytes", "roofline_fraction", "bandwidth_gbs", "max_abs_err",
    "suite", "layer", "backend", "rule", "chosen", "params", "tile", "build_s", "rounds",
    "target_str", "note",
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
            "chosen": i.chosen, "params": i.params, "tile": i.tile, "build_s": i.build_s,
            "rounds": len(i.samples) or rounds,
            "target_str": i.target_str, "note": i.note, **prov,
        }
        rows.append(row)
    return rows


def _layer_kind(label: str) -> str:
    """``conv 3x3/2 64x56x56->128`` -> ``3x3 convs``; ``linear 512->1000`` -> ``linears``."""
    m = re.match(r"conv (\d+x\d+)/", label)
    return f"{m.group(1)} convs" if m else "linears"


def _span(x: Any) -> str:
    """``median (min-max)``, or the one value."""
    lo, hi = float(np.min(x)), float(np.max(x))
    return f"{lo:.2f}" if lo == hi else f"{np.median(x):.2f} ({lo:.2f}-{hi:.2f})"


def _chosen_summary(ok: Any) -> list[str]:
    """One row per suite, layer kind and batch: the median (min-max) speed-up over torch of
    the kernel the rules choose for each layer, per activation kind (what a deployed model
    runs, not the best recipe per shape), the slowest ternary kernel timed (any recipe) against
    torch fp32, and the median speed-up over torch fp32 of FGQ's group variants (one scale
    per N weights).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"shape": ["conv 3x3/1 8x8x8->8"] * 3 + ["linear 8->8"],
        ...     "suite": "s", "batch": 1, "impl": ["tvm_tt_lut", "tvm_tt_popc", "tvm_t2_vnni_g4",
        ...     "tvm_t2_vnni"], "act_mode": ["ternary", "ternary", "int8", "int8"],
        ...     "chosen": [True, False, False, True],
        ...     "speedup_vs_torch_fp32": [12.0, 9.0, 2.0, 7.0],
        ...     "speedup_vs_torch_int8": [3.0, 2.0, 0.5, 2.5]})
        >>> print("\\n".join(_chosen_summary(df)[3:-1]))
        |---|---|---|---|---|---|---|---|
        | s | 3x3 convs | 1 | 1 | - | 12.00, 3.00 | 2.00 | 2.00 |
        | s | linears | 1 | 1 | 7.00, 2.50 | - | 7.00 | - |
    """
    ok = ok.assign(kind=[_layer_kind(x) for x in ok["shape"]],
                   group=ok["impl"].str.extract(r"_g(\d+(?:_flat)?)$", expand=False))
    ok = ok.assign(chosen=ok["chosen"].eq(True))  # a CSV read back may hold NaN
    chosen, fgq = ok[ok["chosen"]], ok[ok["group"].notna()]
    if not len(chosen) and not len(fgq):
        return []
    groups = sorted(fgq["group"].unique(), key=lambda g: (g.endswith("_flat"),
                                                          int(g.split("_")[0])))
    modes = sorted(set(chosen["act_mode"]), key=lambda m: (m != "int8", m))  # int8 first
    q8 = ok[ok["impl"].str.endswith("_q8")]  # int8 outputs (benchmark.Q8_SUFFIX)
    q8_modes = sorted(set(q8["act_mode"]), key=lambda m: (m != "int8", m))
    head = ["suite", "layers", "batch", "shapes",
            *[f"chosen, {m} act: x torch fp32, x torch int8" for m in modes],
            *[f"int8 outputs (`_q8`), {m} act: x torch int8" for m in q8_modes],
            "slowest ternary kernel: x torch fp32",
            *([f"FGQ N={' / '.join(groups)}: x torch fp32"] if groups else [])]
    lines = ["Per suite, layer kind and batch: median (min-max) speed-up of the kernel the rules "
             "choose for each layer (what a deployed model runs), the kernels with int8 outputs "
             "(`_q8`, requantized in the epilogue as torch int8 writes quint8: AMX, else the "
             "table lookups), the "
             "slowest ternary kernel timed (any recipe, FGQ's included), and FGQ's group "
             "variants' median speed-up over torch fp32 (the kernel chosen for them; `_flat`: "
             "groups along the flat fan-in, `_alt`: another recipe timed beside it):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (suite, kind, batch), g in ok.groupby(["suite", "kind", "batch"], sort=False):
        cells = [str(suite), kind, str(batch), str(g["shape"].nunique())]
        for m in modes:
            c = g[g["chosen"] & (g["act_mode"] == m)]
            cells.append(f"{_span(c['speedup_vs_torch_fp32'])}, "
                         f"{_span(c['speedup_vs_torch_int8'])}" if len(c) else "-")
        for m in q8_modes:
            c = g[g["impl"].str.endswith("_q8") & (g["act_mode"] == m)]
            cells.append(_span(c["speedup_vs_torch_int8"]) if len(c) else "-")
        tern = g.loc[ternary_kernels(g), "speedup_vs_torch_fp32"]
        cells.append(f"{tern.min():.2f}" if len(tern) else "-")
        if groups:
            cells.append(" / ".join(
                f"{np.median(x):.2f}" if len(x := g.loc[g["group"] == k,
                                                        "speedup_vs_torch_fp32"]) else "-"
                for k in groups))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


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
    engines = sorted(set(ok.loc[ok["impl"] == "torch_int8", "target_str"]))
    if engines:  # e.g. AMX under torch's int8 convs: the bar the ternary kernels face
        lines += ["torch int8 ran on: " + "; ".join(f"`{e}`" for e in engines) + ".", ""]
    lines += targets_markdown(ok, int(meta["threads"]))
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
    lines += _chosen_summary(ok)
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
