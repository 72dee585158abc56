"""The kernel benchmark on a CUDA GPU: the same shapes as :mod:`.kernels`, TVM's CUDA kernels
(checked against the reference before they are timed) beside torch's cuDNN/cuBLAS FP32 and FP16
on the same shapes, measured interleaved in one run.

``ternbench kernels --target cuda --out DIR`` writes ``DIR/kernels.csv`` with the x86 file's
columns (``target`` = ``cuda``; ``threads`` = 0; ``speedup_vs_torch_int8`` is empty: torch has
no eager INT8 convolution on CUDA, so FP16 is the low-precision baseline, column
``speedup_vs_torch_fp16``) and ``DIR/kernels.md``. Needs a visible GPU.

Example:
    >>> from ternbench.bench.kernels_cuda import gpu_unavailable_reason
    >>> isinstance(gpu_unavailable_reason(), str)
    True
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .kernels import KernelShape, select_shapes, synthetic_layer
from .kernels.env import _git_describe

__all__ = ["gpu_unavailable_reason", "measure_gpu_bandwidth", "run_kernels_cuda"]

log = logging.getLogger(__name__)


def gpu_unavailable_reason() -> str:
    """'' when a CUDA GPU is visible to torch and TVM, else why not."""
    from ternbench import schedules

    if schedules.cuda_arch() is None:
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return ""


def _cuda_time(fn: Callable[[], Any], number: int, rounds: int) -> list[float]:
    """Seconds per call, one sample per round of ``number`` calls (CUDA events)."""
    import torch

    out = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / number)
    return out


def measure_gpu_bandwidth() -> float:
    """Device-memory read bandwidth in GB/s: median of sums over a 1 GiB buffer."""
    import torch

    x = torch.ones(2**28, dtype=torch.float32, device="cuda")
    x.sum()
    t = statistics.median(_cuda_time(lambda: x.sum(), 10, 5))
    return x.numel() * 4 / t / 1e9


def _torch_impl(lx: Any, batch: int, dtype: Any) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F
    from ternbench.schedules.measure import fp32_weight

    w = torch.from_numpy(fp32_weight(lx)).to("cuda", dtype)
    b = None if lx.bias is None else torch.from_numpy(np.asarray(lx.bias)).to("cuda", dtype)
    if lx.op == "conv2d":
        x = torch.randn(batch, *lx.input_shape, device="cuda", dtype=dtype)
        w4 = w.reshape(lx.out_channels, lx.in_channels, *lx.kernel_size)
        if dtype == torch.float16:  # the fast cuDNN path for half is NHWC
            x = x.contiguous(memory_format=torch.channels_last)
            w4 = w4.contiguous(memory_format=torch.channels_last)
        return lambda: F.conv2d(x, w4, b, stride=lx.stride, padding=lx.padding)
    x = torch.randn(batch, lx.fan_in, device="cuda", dtype=dtype)
    return lambda: F.linear(x, w, b)


def _tvm_impl(lx: Any, batch: int) -> tuple[Callable[[int, int], list[float]], Any, float]:
    """(timer(number, rounds) -> seconds per call, kernel, max_abs_err) of a checked kernel."""
    from ternbench import schedules

    tinfo = schedules.target_info("cuda")
    prep = schedules.prepare_kernel(schedules.build_layer(lx, batch, "cuda"), lx, tinfo)
    kern, args, out, err = prep.kernel, prep.args, prep.out, prep.max_abs_err
    dev = schedules.require_tvm().cuda(0)

    def timer(number: int, rounds: int) -> list[float]:
        res = kern.module.time_evaluator("main", dev, number=number, repeat=rounds)(*args, out)
        return [float(r) for r in res.results]

    return timer, kern, err


def _bytes(lx: Any, batch: int, act_bytes: float, w_bits: float) -> int:
    ho, wo = lx.output_hw
    n_in = batch * int(np.prod(lx.input_shape))
    return int(n_in * act_bytes + lx.out_channels * lx.fan_in * w_bits / 8
               + batch * ho * wo * lx.out_channels * 4)


def run_kernels_cuda(out: str | Path, *, suites: str | Sequence[str] = "all",
                     batches: Sequence[int] = (1, 64), act_modes: Sequence[str] = ("int8",
                                                                                  "ternary"),
                     layers: Sequence[str] | None = None,
                     shapes: Sequence[KernelShape] | None = None, rounds: int = 15,
                     number: int = 20) -> Path:
    """Benchmark every shape on the GPU; returns the path of ``kernels.csv``."""
    import pandas as pd
    import torch
    from ternbench import schedules

    why = gpu_unavailable_reason()
    if why:
        raise RuntimeError(f"ternbench kernels --target cuda: {why}")
    # FP32 means FP32: no TF32 in the cuBLAS/cuDNN baselines
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = list(shapes) if shapes is not None else select_shapes(suites, layers)
    bw = measure_gpu_bandwidth()
    gpu = torch.cuda.get_device_name(0)
    tinfo = schedules.target_info("cuda")
    prov = {"tvm_version": schedules.tvm_version() or "", "torch_version": torch.__version__,
            "cpu": gpu, "git": _git_describe()}
    log.info("%s (%s): read bandwidth %.0f GB/s", gpu, tinfo.mcpu, bw)
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        for batch in batches:
            impls: list[dict[str, Any]] = []
            base = synthetic_layer(shape, "fp32", "fp32")
            for name, dt in (("torch_fp32", torch.float32), ("torch_fp16", torch.float16)):
                fn = _torch_impl(base, batch, dt)
                fn()
                impls.append({"impl": name, "act_mode": "fp32" if "32" in name else "fp16",
                              "backend": "torch",
                              "timer": lambda n, r, fn=fn: _cuda_time(fn, n, r),
                              "nbytes": _bytes(base, batch, 4 if "32" in name else 2,
                                               32 if "32" in name else 16),
                              "max_abs_err": math.nan, "rule": "", "note": ""})
            cases = [("fp32", "fp32", "fp32")] + [("ternary", m, m) for m in act_modes]
            for wf, act, mode in cases:
                lx = synthetic_layer(shape, wf, act)
                try:
                    timer, kern, err = _tvm_impl(lx, batch)
                except Exception as exc:  # one failed kernel is a row, not a lost run
                    log.error("%s batch %d %s/%s: %s", shape.label, batch, wf, act, exc)
                    impls.append({"impl": f"tvm_{wf}_{act}", "act_mode": mode,
                                  "backend": "tvm", "timer": None, "nbytes": 0,
                                  "max_abs_err": math.nan, "rule": "", "note": str(exc)[:300]})
                    continue
                abytes = {"fp32": 4, "int8": 1, "ternary": 0.25}[act]
                impls.append({"impl": kern.impl, "act_mode": mode, "backend": "tvm",
                              "timer": timer, "rule": kern.rule,
                              "nbytes": _bytes(lx, batch, abytes, 32 if wf == "fp32" else 2),
                              "max_abs_err": err, "note": "", "build_s": kern.build_s})
            samples: dict[int, list[float]] = {i: [] for i in range(len(impls))}
            for r in range(rounds):  # interleaved, rotating order
                for j in range(len(impls)):
                    i = (j + r) % len(impls)
                    if impls[i]["timer"] is not None:
                        samples[i] += impls[i]["timer"](number, 1)
            med = {impls[i]["impl"]: statistics.median(s) for i, s in samples.items() if s}
            ho, wo = shape.out_hw
            for i, imp in enumerate(impls):
                t = statistics.median(samples[i]) if samples[i] else math.nan
                rows.append({
                    "op": shape.op, "shape": shape.label, "batch": batch,
                    "M": batch * ho * wo, "K": shape.fan_in, "N": shape.cout,
                    "act_mode": imp["act_mode"], "impl": imp["impl"], "target": "cuda",
                    "threads": 0, "median_us": t * 1e6,
                    "speedup_vs_torch_fp32": med.get("torch_fp32", math.nan) / t,
                    "speedup_vs_torch_int8": math.nan,
                    "speedup_vs_torch_fp16": med.get("torch_fp16", math.nan) / t,
                    "gmacs": shape.macs(batch) / t / 1e9,
                    "bytes": imp["nbytes"] or math.nan,
                    "roofline_fraction": imp["nbytes"] / t / (bw * 1e9) if imp["nbytes"]
                    else math.nan,
                    "bandwidth_gbs": bw, "max_abs_err": imp["max_abs_err"],
                    "suite": shape.suite, "layer": shape.name, "backend": imp["backend"],
                    "rule": imp["rule"], "build_s": imp.get("build_s", math.nan),
                    "rounds": len(samples[i]), "target_str": tinfo.target_str,
                    "note": imp["note"], **prov,
                })
            log.info("%s batch %d: %s", shape.label, batch,
                     ", ".join(f"{k} {v * 1e6:.1f}us" for k, v in med.items()))
    df = pd.DataFrame(rows)
    csv = out / "kernels.csv"
    df.to_csv(csv, index=False)
    lines = [f"# Kernel benchmark on {gpu} ({tinfo.mcpu})", "",
             f"Device read bandwidth {bw:.0f} GB/s. Medians of {rounds} interleaved rounds of "
             f"{number} calls (µs); `xF`/`xH` = speed-up over torch FP32 / FP16 (cuDNN, "
             "cuBLAS; TF32 off) in the same run.", "",
             "| shape | batch | impl | act | µs | xF | xH | GMAC/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['shape']} | {row['batch']} | {row['impl']} | {row['act_mode']} | "
                     f"{row['median_us']:.1f} | {row['speedup_vs_torch_fp32']:.2f} | "
                     f"{row['speedup_vs_torch_fp16']:.2f} | {row['gmacs']:.0f} |")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")
    return csv
