"""Issue 11's latency targets checked on one run's rows: the "Targets" section of
``kernels.md``, so that a run says which it meets instead of leaving the medians to be
recomputed by hand.

Every target is a ratio measured side by side in the run (``speedup_vs_torch_*`` of the
kernel the rules choose for each layer, ``chosen``), on 1 thread (the targets are 1-thread
figures; a run on more threads is checked all the same and says so). A target whose rows the
run does not hold (another ``--shapes`` or ``--batches``, no ``--group-sizes``) is "not in this
run", never met or missed.

The ResNet-18 int8-activation target is the median over 8 convs: the seven distinct 3x3 shapes
and the 7x7/2 stem (the suite's convs wider than one tap); the seven 3x3 convs' median is given
beside it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: FGQ group variants' impl names end in ``_g<N>`` (``benchmark``; ``_flat``/``_alt`` excluded)
_GROUP = re.compile(r"_g(\d+)$")


@dataclass(frozen=True)
class TargetResult:
    """One target: what is asked, what the run measured, and whether it holds (None: the run
    does not measure it)."""

    target: str
    measured: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return {True: "yes", False: "no", None: "not in this run"}[self.met]


def ternary_kernels(df: Any) -> Any:
    """Row mask: the ternary TVM kernels (any recipe, FGQ's included), not the dense TVM
    GEMMs or torch (shared with ``kernels.md``'s "slowest ternary kernel" column)."""
    return (df["act_mode"].isin(("int8", "ternary")) & df["impl"].str.startswith("tvm_")
            & ~df["impl"].isin(("tvm_fp32", "tvm_int8")))


def _rows(df: Any, *, suite: str, batch: int, act: str | None = None,
          prefixes: tuple[str, ...] = ("conv 3x3",), chosen: bool = True) -> Any:
    sel = (df["suite"] == suite) & (df["batch"] == batch) & df["median_us"].notna()
    sel &= df["shape"].str.startswith(prefixes)
    if act is not None:
        sel &= df["act_mode"] == act
    if chosen:
        sel &= df["chosen"].eq(True)  # a CSV read back may hold NaN
    return df[sel]


def _int8_act(df: Any, batch: int, bound: float) -> TargetResult:
    what = (f"int8 act, ResNet-18 3x3 convs and the 7x7/2 stem (8 convs), batch {batch}: "
            f"median >= {bound}x torch INT8")
    conv = _rows(df, suite="resnet18", batch=batch, act="int8",
                 prefixes=("conv 3x3", "conv 7x7"))
    three = conv[conv["shape"].str.startswith("conv 3x3")]["speedup_vs_torch_int8"]
    if not len(three):
        return TargetResult(what, "-", None)
    med = float(np.median(conv["speedup_vs_torch_int8"]))
    return TargetResult(what, f"{med:.3f}x ({len(conv)} convs; the {len(three)} 3x3 convs "
                              f"{np.median(three):.2f}x, {three.min():.2f}-{three.max():.2f}x)",
                        med >= bound)


def _ternary_act(df: Any) -> TargetResult:
    what = ("ternary act, ResNet-18 3x3 convs, batch 1: median >= 12x torch FP32 and >= 3x "
            "torch INT8")
    c = _rows(df, suite="resnet18", batch=1, act="ternary")
    if not len(c):
        return TargetResult(what, "-", None)
    f, i = (float(np.median(c[k])) for k in ("speedup_vs_torch_fp32", "speedup_vs_torch_int8"))
    return TargetResult(what, f"{f:.2f}x / {i:.2f}x ({len(c)} convs)", f >= 12 and i >= 3)


def _gemv(df: Any) -> TargetResult:
    what = "GEMV 1x4608x512, ternary act: >= 25x torch FP32"
    c = _rows(df, suite="gemv", batch=1, act="ternary", prefixes=("linear 4608->512",))
    if not len(c):
        return TargetResult(what, "-", None)
    r = c.iloc[0]
    return TargetResult(what, f"{r['speedup_vs_torch_fp32']:.2f}x ({r['median_us']:.2f} µs, "
                              f"{r['impl']})", bool(r["speedup_vs_torch_fp32"] >= 25))


def _group_medians(df: Any, batch: int) -> dict[int, float]:
    """FGQ group size -> median speed-up over torch FP32 on the ResNet-18 3x3 convs."""
    c = _rows(df, suite="resnet18", batch=batch, chosen=False)
    n = c["impl"].str.extract(_GROUP, expand=False)
    return {int(k): float(np.median(g["speedup_vs_torch_fp32"])) for k, g in c.groupby(n)}


def _fgq_n4(df: Any) -> TargetResult:
    what = "FGQ N=4, ResNet-18 3x3 convs, batch 1 / 64: median >= 2x torch FP32"
    got = [_group_medians(df, b).get(4) for b in (1, 64)]
    have = [g for g in got if g is not None]
    if len(have) < len(got):
        return TargetResult(what, " / ".join("-" if g is None else f"{g:.2f}x" for g in got),
                            None)
    return TargetResult(what, f"{have[0]:.2f}x / {have[1]:.2f}x", min(have) >= 2)


def _fgq_n64(df: Any) -> TargetResult:
    what = "FGQ N=64 not slower than N=16 (ResNet-18 3x3 convs, median x torch FP32)"
    parts, met = [], []
    for b in (1, 64):
        g = _group_medians(df, b)
        if 16 in g and 64 in g:
            parts.append(f"batch {b}: {g[64]:.2f}x vs {g[16]:.2f}x")
            met.append(g[64] >= g[16])
    return TargetResult(what, "; ".join(parts) or "-", all(met) if met else None)


def _cifar(df: Any) -> TargetResult:
    what = "CIFAR ResNet-20 layers: no ternary kernel slower than torch FP32, batch 1 / 64"
    lows: list[float | None] = []
    for b in (1, 64):
        c = _rows(df, suite="cifar", batch=b, prefixes=("conv", "linear"), chosen=False)
        c = c[ternary_kernels(c)]
        lows.append(float(c["speedup_vs_torch_fp32"].min()) if len(c) else None)
    have = [x for x in lows if x is not None]
    if len(have) < len(lows):
        return TargetResult(what, " / ".join("-" if x is None else f">= {x:.2f}x" for x in lows),
                            None)
    return TargetResult(what, f"every kernel >= {have[0]:.2f}x / >= {have[1]:.2f}x",
                        min(have) >= 1)


#: issue 11's targets, in its order
CHECKS: tuple[Callable[[Any], TargetResult], ...] = (
    lambda df: _int8_act(df, 1, 1.5), lambda df: _int8_act(df, 64, 1.2), _ternary_act, _gemv,
    _fgq_n4, _fgq_n64, _cifar)


def check_targets(df: Any) -> list[TargetResult]:
    """Every target of issue 11 on the rows of one run (``kernels.csv`` as a DataFrame).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"suite": "gemv", "batch": 1, "shape": "linear 4608->512",
        ...     "act_mode": "ternary", "impl": "tvm_tt_popc", "chosen": True,
        ...     "median_us": [5.9], "speedup_vs_torch_fp32": [27.4],
        ...     "speedup_vs_torch_int8": [10.0]})
        >>> [(r.verdict, r.measured) for r in check_targets(df)][3]
        ('yes', '27.40x (5.90 µs, tvm_tt_popc)')
        >>> check_targets(df)[0].verdict
        'not in this run'
    """
    return [check(df) for check in CHECKS]


def targets_markdown(df: Any, threads: int) -> list[str]:
    """The ``kernels.md`` section: one table row per target (nothing where the run holds no
    row of any)."""
    results = check_targets(df)
    if all(r.met is None for r in results):
        return []
    note = "" if threads == 1 else f" (this run: {threads} threads; the targets are for 1)"
    lines = [f"Latency targets (issue 11; README, \"Where the kernels stand\"), checked on "
             f"this run's ratios{note}:", "",
             "| target | measured | met? |", "|---|---|---|"]
    lines += [f"| {r.target} | {r.measured} | {r.verdict} |" for r in results]
    return [*lines, ""]
