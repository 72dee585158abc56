"""The measured implementations of one (shape, batch): a TVM kernel, torch FP32, torch INT8
(fbgemm), each with how to time it (``run_n``) and the bytes it must move."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_TORCH_QUANT_WARNING = (r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other "
                        r"quantized tensor creation functions")


# ----------------------------------------------------------------------------- measured impls


@dataclass
class _Impl:
    """One row of a (shape, batch) group: how to time it and what it moves."""

    impl: str
    act_mode: str
    backend: str
    rule: str = ""
    params: str = ""
    #: the tile the plan built (JSON, :func:`kernel_tile`): ``params`` is the grid point asked
    #: for, which a plan fits to the layer and CPU (e.g. the layer's channels, 4 rows on Zen)
    tile: str = ""
    run_n: Callable[[int], float] | None = None  # seconds per call over n calls
    nbytes: int = 0
    max_abs_err: float = math.nan
    build_s: float = math.nan
    threads: int = 0
    target_str: str = ""
    note: str = ""
    #: the kernel the rules pick for this layer (what a deployed model runs); False for the
    #: recipes timed beside it, FGQ's group variants and the baselines
    chosen: bool = False
    number: int = 1
    samples: list[float] = field(default_factory=list)


@contextlib.contextmanager
def _quiet_torch_quant() -> Iterator[None]:
    """Silence exactly torch's deprecation notice for quantized tensors (fbgemm still runs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_QUANT_WARNING, category=UserWarning)
        yield


def kernel_tile(spec: Any) -> dict[str, int]:
    """The register tile and task a kernel was built with, from its spec: ``nb`` output
    channels, ``mb`` rows per register tile, ``m_task`` tiles per parallel task, and ``tn``
    (the channels of one int8-activation vector tile) where the layout has one.

    Example:
        >>> from types import SimpleNamespace
        >>> kernel_tile(SimpleNamespace(nb=32, mb=4, m_task=64, tile_n=16, layout="t2_avx2"))
        {'nb': 32, 'mb': 4, 'm_task': 64, 'tn': 16}
    """
    from ternbench.schedules.ops.spec import INTRIN_LAYOUTS

    tile = {"nb": int(spec.nb), "mb": int(spec.mb), "m_task": int(spec.m_task)}
    if spec.layout in INTRIN_LAYOUTS:
        tile["tn"] = int(spec.tile_n)
    return tile


def _tvm_impl(prep: Any, act_mode: str, rule: str, dev: Any, impl: str | None = None) -> _Impl:
    kern = prep.kernel
    timers: dict[int, Any] = {}

    def run_n(n: int) -> float:
        if n not in timers:
            timers[n] = kern.module.time_evaluator("main", dev, number=n, repeat=1)
        return float(timers[n](*prep.args, prep.out).mean)

    return _Impl(impl=impl or kern.impl, act_mode=act_mode, backend="tvm", rule=rule,
                 params=json.dumps(dict(kern.params), sort_keys=True),
                 tile=json.dumps(kernel_tile(kern.spec), sort_keys=True), run_n=run_n,
                 nbytes=prep.nbytes, max_abs_err=prep.max_abs_err, build_s=kern.build_s,
                 target_str=kern.target_str)


def loop_timer(fn: Callable[[], Any]) -> Callable[[int], float]:
    """``run_n(n)``: seconds per call of ``fn`` over ``n`` back-to-back calls."""

    def run_n(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n

    return run_n


def _torch_fp32_impl(lx: Any, batch: int, threads: int) -> _Impl:
    """F.conv2d / F.linear on float NCHW input; checked by ``measure_torch_fp32`` (float64)."""
    import torch
    import torch.nn.functional as F
    from ternbench.schedules import EvaluatorCfg, measure, measure_torch_fp32

    chk = measure_torch_fp32(lx, batch=batch, ev=EvaluatorCfg(number=1, repeat=1,
                                                              min_repeat_ms=0), threads=threads)
    # the same input and weights as that check (seeded)
    xf = torch.randn(batch, *lx.input_shape,
                     generator=torch.Generator().manual_seed(measure.INPUT_SEED))
    w = torch.from_numpy(measure.fp32_weight(lx))
    bias = torch.from_numpy(np.asarray(lx.bias, np.float32))
    if lx.op == "conv2d":
        wt = w.reshape(lx.out_channels, lx.in_channels, *lx.kernel_size).contiguous()

        def fn() -> Any:
            return F.conv2d(xf, wt, bias, stride=lx.stride, padding=lx.padding)
    else:
        wt = w.contiguous()

        def fn() -> Any:
            return F.linear(xf, wt, bias)

    nbytes = xf.nbytes + wt.nbytes + bias.nbytes + chk.M * chk.N * 4
    return _Impl(impl="torch_fp32", act_mode="fp32", backend="torch", run_n=loop_timer(fn),
                 nbytes=int(nbytes), max_abs_err=chk.max_abs_err, build_s=0.0,
                 target_str=f"torch {torch.__version__} "
                 f"({torch.backends.cpu.get_cpu_capability()})")


def _torch_int8_impl(lx: Any, batch: int) -> _Impl:
    """fbgemm int8: dynamic quantized Linear (float in, float out) / quantized Conv2d on a
    quint8 channels-last input (per-channel qint8 weights in both)."""
    import torch
    import torch.nn.functional as F
    from ternbench.schedules import measure

    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        torch.backends.quantized.engine = _quant_engine()  # fbgemm kernels, not qnnpack
    w = torch.from_numpy(measure.fp32_weight(lx)).double()
    bias = torch.from_numpy(np.asarray(lx.bias, np.float32))
    n = lx.out_channels
    w_scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    xf = torch.randn(batch, *lx.input_shape,
                     generator=torch.Generator().manual_seed(measure.INPUT_SEED))
    with _quiet_torch_quant(), torch.inference_mode():
        if lx.op == "linear":
            ref = F.linear(xf.double(), w, bias.double())
            qw = torch.quantize_per_channel(w.float(), w_scale, torch.zeros(n, dtype=torch.long),
                                            0, torch.qint8)
            mod: Any = torch.ao.nn.quantized.dynamic.Linear(lx.in_channels, n,
                                                            dtype=torch.qint8)
            mod.set_weight_bias(qw, bias)
            x_in: Any = xf
            y = mod(x_in)
            out_bytes = y.numel() * 4
            in_bytes = xf.nbytes  # quantized per call inside the op
        else:
            w4 = w.reshape(n, lx.in_channels, *lx.kernel_size)
            ref = F.conv2d(xf.double(), w4, bias.double(), stride=lx.stride, padding=lx.padding)
            qw = torch.quantize_per_channel(w4.float(), w_scale,
                                            torch.zeros(n, dtype=torch.long), 0, torch.qint8)
            mod = torch.ao.nn.quantized.Conv2d(lx.in_channels, n, lx.kernel_size,
                                               stride=lx.stride, padding=lx.padding)
            mod.set_weight_bias(qw, bias)
            mod.scale = float(ref.abs().max()) / 127 or 1.0
            mod.zero_point = 128
            x_scale = float(xf.abs().max()) / 127 or 1.0
            x_in = torch.quantize_per_tensor(xf.contiguous(memory_format=torch.channels_last),
                                             x_scale, 128, torch.quint8)
            y = mod(x_in)
            out_bytes = y.numel()  # quint8
            in_bytes = x_in.numel()
            y = y.dequantize()
        err = float((y.double() - ref).abs().max())
    if not math.isfinite(err):
        raise RuntimeError(f"{lx.name}: torch int8 produced non-finite values")

    def fn() -> Any:
        return mod(x_in)

    return _Impl(impl="torch_int8", act_mode="int8", backend="torch", run_n=loop_timer(fn),
                 nbytes=int(in_bytes + qw.numel() + bias.nbytes + out_bytes), max_abs_err=err,
                 build_s=0.0, target_str=f"torch {torch.__version__} "
                 f"({_int8_engine(lx.op)})")


def _int8_engine(op: str) -> str:
    """What runs torch's int8 ``op``: the quantized engine, and for convs on a CPU with AMX
    tiles that the engine hands to oneDNN, "oneDNN AMX" (seen with ONEDNN_VERBOSE on an Intel
    emeraldrapids: ``brg_conv_fwd:avx10_1_512_amx``, ~630 GMAC/s on one core against
    ``vpdpbusd``'s 186; dynamic quantized Linear stays on fbgemm). Under a forced ISA level
    (``--isa``), the level torch was capped to (:func:`.env.cap_torch_isa`)."""
    import torch

    engine = torch.backends.quantized.engine
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if capped:
        return f"{engine}, oneDNN capped to {capped}"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if op == "conv2d" and engine in ("x86", "onednn") and amx:
        return f"{engine}, oneDNN AMX"
    return engine


@functools.cache
def _quant_engine() -> str:
    import torch

    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm") if e in engines), engines[0])
