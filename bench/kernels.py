"""Kernel benchmark: ternary TVM kernels vs torch FP32 / INT8 and TVM dense GEMMs, per layer shape.

For each layer shape (ResNet-18 at ImageNet 224, the CIFAR ResNet-20 shapes, the 4608x512
GEMV/GEMM probe shape) and batch, one process measures, interleaved round by round:

* ``tvm_t2_avx2`` (ternary weights, int8 activations) and ``tvm_tt_popc`` (ternary weights and
  activations): the rules the x86 target selects (the generic ones on a CPU without AVX2);
  ``--generic`` adds the portable rules for comparison, ``--metaschedule N`` a MetaSchedule
  baseline (``tvm_metaschedule``, ``N`` trials, cached);
* ``tvm_int8`` / ``tvm_fp32``: blocked dense GEMMs with int8 / fp32 weights, same loop nest;
* ``torch_fp32`` (``F.conv2d`` / ``F.linear``, MKL / oneDNN) and ``torch_int8`` (fbgemm:
  ``torch.ao.nn.quantized.dynamic.Linear`` for linears, which quantizes its float input per
  call; ``torch.ao.nn.quantized.Conv2d`` on a quint8 channels-last input for convs).

Every TVM kernel is checked against the float64 reference of its layer before it is timed (a
mismatch is a failed row, never a time); torch's outputs are compared with a float64 torch run
(``max_abs_err``: int8 rows carry their quantization error). Single-thread DRAM read bandwidth
is measured in the same run; ``roofline_fraction = bytes / time / bandwidth`` with ``bytes``
the data a call must move at least (input, packed weights with scales and bias, output). A
fraction above 1 means the working set was served from the caches, which the benchmark loop
keeps warm.

Writes ``OUT/kernels.csv`` (one row per shape x batch x impl) and ``OUT/kernels.md``.

Example:
    >>> from ternbench.bench import kernels
    >>> [s.name for s in kernels.select_shapes("gemv")]
    ['gemv.4608x512']
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import functools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "SUITES",
    "ACT_MODES",
    "COLUMNS",
    "KernelShape",
    "KernelsResult",
    "resnet18_shapes",
    "cifar_shapes",
    "gemv_shapes",
    "select_shapes",
    "synthetic_layer",
    "configure_env",
    "measure_bandwidth",
    "run_kernels",
]

log = logging.getLogger(__name__)

SUITES = ("resnet18", "cifar", "gemv", "bitnet")
#: activation modes of the ternary layers: int8 codes (``t2``) or ternary codes (``tt``)
ACT_MODES = ("int8", "ternary")
COLUMNS = (
    "op", "shape", "batch", "M", "K", "N", "act_mode", "impl", "target", "threads",
    "median_us", "p25_us", "p75_us", "speedup_vs_torch_fp32", "speedup_vs_torch_int8",
    "gmacs", "bytes", "roofline_fraction", "bandwidth_gbs", "max_abs_err",
    "suite", "layer", "backend", "rule", "params", "build_s", "rounds", "target_str", "note",
    "tvm_version", "torch_version", "cpu", "isa", "git",
)
#: interleaved rounds and minimum duration of one timing sample (normal / --quick)
ROUNDS, QUICK_ROUNDS = 15, 3
SAMPLE_S, QUICK_SAMPLE_S = 0.02, 0.002
#: the int8 activation scale and the ternary activation quantizer of the synthetic layers
_ACT = {"int8": ("int", 8, 0.05), "ternary": ("ternary", 2, 0.7), "fp32": ("fp32", 32, 1.0)}
_TORCH_QUANT_WARNING = (r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other "
                        r"quantized tensor creation functions")


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class KernelShape:
    """One conv / linear layer shape (per sample; the batch is chosen per measurement)."""

    suite: str
    name: str
    op: Literal["conv2d", "linear"]
    cin: int
    cout: int
    hw: tuple[int, int] = (1, 1)
    k: int = 1
    stride: int = 1
    pad: int = 0

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.op == "linear":
            return (1, 1)
        h, w = self.hw
        return ((h + 2 * self.pad - self.k) // self.stride + 1,
                (w + 2 * self.pad - self.k) // self.stride + 1)

    @property
    def fan_in(self) -> int:
        return self.cin * self.k * self.k

    @property
    def label(self) -> str:
        """e.g. ``conv 3x3/2 64x56x56->128`` or ``linear 512->1000``."""
        if self.op == "linear":
            return f"linear {self.cin}->{self.cout}"
        h, w = self.hw
        return f"conv {self.k}x{self.k}/{self.stride} {self.cin}x{h}x{w}->{self.cout}"

    def macs(self, batch: int) -> int:
        ho, wo = self.out_hw
        return batch * ho * wo * self.fan_in * self.cout


def _conv(suite: str, name: str, cin: int, cout: int, hw: int, k: int = 3,
          stride: int = 1) -> KernelShape:
    return KernelShape(suite, name, "conv2d", cin, cout, (hw, hw), k, stride, k // 2)


def resnet18_shapes() -> list[KernelShape]:
    """The distinct conv/linear shapes of torchvision's ResNet-18 at 224x224."""
    s = "resnet18"
    out = [_conv(s, "resnet18.conv1", 3, 64, 224, k=7, stride=2),
           _conv(s, "resnet18.layer1.conv", 64, 64, 56)]
    for i, (cin, cout, hw) in enumerate(((64, 128, 56), (128, 256, 28), (256, 512, 14)), 2):
        out += [_conv(s, f"resnet18.layer{i}.0.conv1", cin, cout, hw, stride=2),
                _conv(s, f"resnet18.layer{i}.conv", cout, cout, hw // 2),
                _conv(s, f"resnet18.layer{i}.0.downsample", cin, cout, hw, k=1, stride=2)]
    out.append(KernelShape(s, "resnet18.fc", "linear", 512, 1000))
    return out


def cifar_shapes() -> list[KernelShape]:
    """The distinct shapes of the CIFAR ResNet-20 (16/32/64 channels at 32/16/8; the option-B
    1x1 shortcut of ``bench.models``)."""
    s = "cifar"
    out = [_conv(s, "resnet20.conv1", 3, 16, 32), _conv(s, "resnet20.layer1.conv", 16, 16, 32)]
    for i, (cin, cout, hw) in enumerate(((16, 32, 32), (32, 64, 16)), 2):
        out += [_conv(s, f"resnet20.layer{i}.0.conv1", cin, cout, hw, stride=2),
                _conv(s, f"resnet20.layer{i}.conv", cout, cout, hw // 2),
                _conv(s, f"resnet20.layer{i}.0.shortcut", cin, cout, hw, k=1, stride=2)]
    out.append(KernelShape(s, "resnet20.fc", "linear", 64, 10))
    return out


def gemv_shapes() -> list[KernelShape]:
    """The GEMV/GEMM probe shape of ``shared/notes/tvm.md`` §2 (K=4608, N=512; batch 1 is the
    GEMV, batch 64 the GEMM)."""
    return [KernelShape("gemv", "gemv.4608x512", "linear", 4608, 512)]


def bitnet_shapes() -> list[KernelShape]:
    """The distinct linear shapes of BitNet b1.58 2B (hidden 2560, FFN 6912): attention
    projections 2560->2560, FFN up/gate 2560->6912 and down 6912->2560; batch 1 is the decode
    GEMV, batch 64 a prefill-sized GEMM (the shapes bitnet.cpp publishes kernel figures for)."""
    s = "bitnet"
    return [KernelShape(s, "bitnet.attn.2560x2560", "linear", 2560, 2560),
            KernelShape(s, "bitnet.ffn_up.2560x6912", "linear", 2560, 6912),
            KernelShape(s, "bitnet.ffn_down.6912x2560", "linear", 6912, 2560)]


_SUITE_FUNCS: dict[str, Callable[[], list[KernelShape]]] = {
    "resnet18": resnet18_shapes, "cifar": cifar_shapes, "gemv": gemv_shapes,
    "bitnet": bitnet_shapes}


def select_shapes(which: str | Iterable[str] = "all",
                  layers: Iterable[str] | None = None) -> list[KernelShape]:
    """Shapes of the named suites (``resnet18``, ``cifar``, ``gemv``, ``bitnet``, ``all``; a
    comma list or an iterable), optionally only the layers matching one of the shell-style
    ``layers`` patterns (e.g. ``resnet18.layer3.*``, ``*fc``)."""
    names = [w.strip() for w in (which.split(",") if isinstance(which, str) else which)]
    names = [n for n in names if n]
    if not names or "all" in names:
        names = list(SUITES)
    bad = [n for n in names if n not in _SUITE_FUNCS]
    if bad:
        raise ValueError(f"unknown shape suite(s) {bad}; choose from {[*SUITES, 'all']}")
    out = [s for n in dict.fromkeys(names) for s in _SUITE_FUNCS[n]()]
    if layers is not None:
        pats = list(layers)
        out = [s for s in out if any(fnmatch.fnmatchcase(s.name, p) for p in pats)]
        if not out:
            raise ValueError(f"no layer of {names} matches {pats}")
    return out


# ----------------------------------------------------------------------------- layers


def synthetic_layer(shape: KernelShape, weight_format: str = "ternary", act: str = "int8",
                    seed: int = 0, group_size: int | None = None) -> Any:
    """A LayerExport of ``shape`` with seeded codes and per-channel scales (ternary with
    ``group_size``: one scale per group of that many fan-in weights, FGQ style, the last group
    partial when the fan-in is not a multiple).

    ``weight_format``: ``ternary`` (codes in {-1, 0, 1}), ``int8`` or ``fp32`` (the float
    weights ``scale * code`` of the ternary layer of the same seed); ``act``: ``int8`` (8-bit
    codes, scale 0.05), ``ternary`` (threshold 0.5, scale 0.7, no offsets) or ``fp32``.
    """
    from ternbench.core.export import LayerExport

    if act not in _ACT:
        raise ValueError(f"act must be one of {sorted(_ACT)}, got {act!r}")
    rng = np.random.default_rng(seed)
    n, k = shape.cout, shape.fan_in
    tern = rng.integers(-1, 2, (n, k)).astype(np.int8)
    scales = (rng.random((n, 1)) * 0.5 + 0.5).astype(np.float32) / math.sqrt(k)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    gs = k
    if weight_format == "ternary":
        codes: np.ndarray = tern
        if group_size is not None:
            gs = int(group_size)
            scales = (rng.random((n, -(-k // gs))) * 0.5 + 0.5).astype(np.float32) / math.sqrt(k)
    elif weight_format == "int8":
        codes = rng.integers(-127, 128, (n, k)).astype(np.int8)
        scales = scales / 127
    elif weight_format == "fp32":
        codes, scales = (tern * scales).astype(np.float32), np.ones((n, 1), np.float32)
    else:
        raise ValueError(f"weight_format must be ternary, int8 or fp32, got {weight_format!r}")
    mode, bits, act_scale = _ACT[act]
    extra = {"act_threshold": 0.5} if act == "ternary" else {}
    conv = shape.op == "conv2d"
    return LayerExport(
        name=f"{shape.name}[{weight_format},{act}]", op=shape.op, weight_format=weight_format,  # type: ignore[arg-type]
        codes=codes, scales=scales, group_size=gs, bias=bias, act_mode=mode,  # type: ignore[arg-type]
        act_bits=bits, act_scale=act_scale, in_channels=shape.cin, out_channels=n,
        kernel_size=(shape.k, shape.k), stride=(shape.stride, shape.stride),
        padding=(shape.pad, shape.pad),
        input_shape=(shape.cin, *shape.hw) if conv else (shape.cin,),
        output_hw=shape.out_hw, **extra)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- environment


def configure_env(threads: int) -> list[str]:
    """Thread-pool environment for benchmarking TVM and torch in one process.

    Both pools spin-wait by default and fight over the cores when calls alternate
    (``shared/notes/tvm.md`` §7): sets ``TVM_THREAD_POOL_SPIN_COUNT=0``,
    ``OMP_WAIT_POLICY=PASSIVE`` and a ``TVM_NUM_THREADS`` bound of at least ``threads``
    (unless already set). They only act when set before the libraries load; returns a note for
    each one that came too late (the CLI logs them: export them in the shell instead).
    """
    notes = []
    wanted = {"TVM_THREAD_POOL_SPIN_COUNT": ("0", "tvm"), "OMP_WAIT_POLICY": ("PASSIVE", "torch"),
              "TVM_NUM_THREADS": (str(max(threads, os.cpu_count() or 1)), "tvm")}
    for var, (value, lib) in wanted.items():
        if var in os.environ:
            continue
        if lib in sys.modules:
            if var != "OMP_WAIT_POLICY" or threads > 1:  # one thread: no pool to spin
                notes.append(f"{var}={value} not applied ({lib} already imported); export it "
                             "before starting ternbench")
            continue
        os.environ[var] = value
    return notes


def _l3_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        with contextlib.suppress(ValueError):
            best = max(best, int(txt.rstrip("KMG")) * mult)
    return best or 32 << 20


def measure_bandwidth(quick: bool = False) -> float:
    """Single-thread DRAM read bandwidth in GB/s: median over repeats of ``torch.sum`` of a
    float32 buffer larger than the last-level cache (2x in quick mode, else max(4x, 256 MiB))."""
    import torch

    l3 = _l3_bytes()
    nbytes = 2 * l3 if quick else max(4 * l3, 256 << 20)
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        buf.sum()  # page in
        ts = []
        for _ in range(3 if quick else 11):
            t = time.perf_counter()
            buf.sum()
            ts.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(prev)
    return nbytes / float(np.median(ts)) / 1e9


@functools.cache
def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return name


@functools.cache
def _git_describe() -> str:
    """``git describe --always --dirty`` of the source checkout, '' outside one."""
    src = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty",
                              "--abbrev=12"], capture_output=True, text=True, timeout=5,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


# ----------------------------------------------------------------------------- measured impls


@dataclass
class _Impl:
    """One row of a (shape, batch) group: how to time it and what it moves."""

    impl: str
    act_mode: str
    backend: str
    rule: str = ""
    params: str = ""
    run_n: Callable[[int], float] | None = None  # seconds per call over n calls
    nbytes: int = 0
    max_abs_err: float = math.nan
    build_s: float = math.nan
    threads: int = 0
    target_str: str = ""
    note: str = ""
    number: int = 1
    samples: list[float] = field(default_factory=list)


@contextlib.contextmanager
def _quiet_torch_quant() -> Iterator[None]:
    """Silence exactly torch's deprecation notice for quantized tensors (fbgemm still runs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_QUANT_WARNING, category=UserWarning)
        yield


def _tvm_impl(prep: Any, act_mode: str, rule: str, dev: Any, impl: str | None = None) -> _Impl:
    kern = prep.kernel
    timers: dict[int, Any] = {}

    def run_n(n: int) -> float:
        if n not in timers:
            timers[n] = kern.module.time_evaluator("main", dev, number=n, repeat=1)
        return float(timers[n](*prep.args, prep.out).mean)

    return _Impl(impl=impl or kern.impl, act_mode=act_mode, backend="tvm", rule=rule,
                 params=json.dumps(dict(kern.params), sort_keys=True), run_n=run_n,
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
                 f"({torch.backends.quantized.engine})")


@functools.cache
def _quant_engine() -> str:
    import torch

    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm") if e in engines), engines[0])


# ----------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class KernelsResult:
    """Outcome of :func:`run_kernels`: the rows (a pandas DataFrame), the files, the
    failures (``(shape, batch, impl, error)``) and the bandwidth used."""

    frame: Any
    csv_path: Path
    md_path: Path
    failures: tuple[tuple[str, int, str, str], ...]
    bandwidth_gbs: float


def _calibrate(run_n: Callable[[int], float], min_s: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_s`` (also the warm-up)."""
    n = 1
    while True:
        per = max(run_n(n), 1e-9)
        if per * n >= min_s or n >= 1 << 22:
            return n
        n = min(1 << 22, max(2 * n, math.ceil(1.2 * min_s / per)))


def _group(shape: KernelShape, batch: int, *, threads: int, act_modes: Sequence[str],
           tinfo: Any, tune: bool, tune_points: int | None, tune_budget_s: float | None,
           ms_trials: int, generic: bool, failures: list[tuple[str, int, str, str]],
           pbar: Any, group_sizes: Sequence[int] = ()) -> list[_Impl]:
    """Prepare (build + check) every impl of one (shape, batch); failures become noted rows."""
    from ternbench.schedules import generic as gen_mod
    from ternbench.schedules import measure, tuning

    tvm = _import_tvm()
    dev = tvm.cpu(0)
    impls: list[_Impl] = []

    def attempt(impl: str, act_mode: str, backend: str, make: Callable[[], _Impl]) -> None:
        pbar.set_postfix_str(f"{shape.name} b{batch} {impl}", refresh=True)
        try:
            impls.append(make())
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            log.error("%s batch %d %s failed: %s", shape.name, batch, impl, msg)
            failures.append((shape.label, batch, impl, msg))
            impls.append(_Impl(impl=impl, act_mode=act_mode, backend=backend,
                               note=f"failed: {msg}"[:500]))

    def tvm_case(lx: Any, act_mode: str, rule: Any, impl: str | None = None
                 ) -> Callable[[], _Impl]:
        def make() -> _Impl:
            if tune and len(rule.grid) > 1:
                tuning.search(lx, batch, tinfo.name, rule=rule, threads=threads,
                              max_points=tune_points, budget_s=tune_budget_s)
            prep = tuning.prepare_rule(rule, lx, batch, tinfo)
            return _tvm_impl(prep, act_mode, rule.name, dev, impl)

        return make

    dense = {"fp32": synthetic_layer(shape, "fp32", "fp32"),
             "int8": synthetic_layer(shape, "int8", "int8")}
    attempt("torch_fp32", "fp32", "torch", lambda: _torch_fp32_impl(dense["fp32"], batch, threads))
    attempt("torch_int8", "int8", "torch", lambda: _torch_int8_impl(dense["fp32"], batch))
    for mode in ("fp32", "int8"):
        lx = dense[mode]
        rule = measure.select_rule(lx, tinfo)
        attempt(rule.impl_for(lx), mode, "tvm", tvm_case(lx, mode, rule))
    gen = {r.name: r for r in gen_mod.rules()}
    for mode in act_modes:
        lx = synthetic_layer(shape, "ternary", mode)
        rule = measure.select_rule(lx, tinfo)
        attempt(rule.impl_for(lx), mode, "tvm", tvm_case(lx, mode, rule))
        if generic:
            g = gen["generic.t2" if mode == "int8" else "generic.tt_popc"]
            if g.name != rule.name:
                attempt(g.impl_for(lx), mode, "tvm", tvm_case(lx, mode, g))
        if ms_trials:
            def make_ms(lx: Any = lx, mode: str = mode) -> _Impl:
                kern = tuning.tune_metaschedule(lx, batch, tinfo.name, trials=ms_trials,
                                                threads=threads)
                return _tvm_impl(tuning.prepare_kernel(kern, lx, tinfo), mode,
                                 "metaschedule", dev)

            attempt("tvm_metaschedule", mode, "tvm", make_ms)
    for gs in group_sizes:  # FGQ: one scale per group of gs weights, int8 activations
        lx = synthetic_layer(shape, "ternary", "int8", group_size=gs)
        rule = measure.select_rule(lx, tinfo)
        name = f"{rule.impl_for(lx)}_g{gs}"
        attempt(name, "int8", "tvm", tvm_case(lx, "int8", rule, name))
    return impls


def _import_tvm() -> Any:
    from ternbench import schedules

    return schedules.require_tvm()


def _time_group(impls: list[_Impl], *, threads: int, rounds: int, min_s: float) -> None:
    """Calibrate, then time all impls interleaved: each round takes one sample of each, in a
    rotating order (no impl always runs right after the same neighbour)."""
    import torch
    from ternbench import schedules

    live = [i for i in impls if i.run_n is not None]
    prev_torch, prev_tvm = torch.get_num_threads(), schedules.num_threads()
    try:
        torch.set_num_threads(threads)
        tvm_used = schedules.set_num_threads(threads)
        with _quiet_torch_quant(), torch.inference_mode():
            for i in live:
                i.threads = tvm_used if i.backend == "tvm" else torch.get_num_threads()
                i.number = _calibrate(i.run_n, min_s)  # type: ignore[arg-type]
            for r in range(rounds):
                for j in range(len(live)):
                    i = live[(j + r) % len(live)]
                    i.samples.append(i.run_n(i.number))  # type: ignore[misc]
    finally:
        torch.set_num_threads(prev_torch)
        schedules.set_num_threads(prev_tvm)


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


def run_kernels(out: str | Path, *, threads: int = 1, suites: str | Iterable[str] = "all",
                batches: Sequence[int] = (1, 64), act_modes: Sequence[str] = ACT_MODES,
                tune: bool = False, tune_points: int | None = None,
                tune_budget_s: float | None = None, metaschedule_trials: int = 0,
                generic: bool = False, quick: bool = False, rounds: int | None = None,
                layers: Sequence[str] | None = None, shapes: Sequence[KernelShape] | None = None,
                progress: bool | None = None, group_sizes: Sequence[int] = ()) -> KernelsResult:
    """Run the kernel benchmark into ``out`` (``kernels.csv``, ``kernels.md``).

    ``layers`` keeps the layers matching a pattern (see :func:`select_shapes`); ``shapes``
    overrides ``suites`` and ``layers`` (any :class:`KernelShape`); ``tune`` runs the cached grid
    search (:func:`ternbench.schedules.tuning.search`, ``tune_points`` / ``tune_budget_s``
    per rule and shape) before building; ``metaschedule_trials`` > 0 adds the MetaSchedule
    baseline for int8 activations. ``group_sizes``: also the int8-activation ternary kernel
    with FGQ group scales of each size (impl ``<impl>_g<N>``). ``quick``: 3 rounds of >= 2 ms
    samples and a smaller bandwidth buffer (tests, CI). Failed impls are rows with an empty
    time and a ``note``.
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    bad = [b for b in batches if int(b) < 1]
    if bad or not batches:
        raise ValueError(f"batches must be >= 1, got {list(batches)}")
    bad_modes = [m for m in act_modes if m not in ACT_MODES]
    if bad_modes:
        raise ValueError(f"act modes must be among {ACT_MODES}, got {bad_modes}")
    for note in configure_env(threads):
        log.warning(note)
    from ternbench import schedules

    shapes = list(shapes) if shapes is not None else select_shapes(suites, layers)
    n_rounds = rounds or (QUICK_ROUNDS if quick else ROUNDS)
    min_s = QUICK_SAMPLE_S if quick else SAMPLE_S
    tinfo = schedules.target_info("x86")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bw = measure_bandwidth(quick)
    log.info("1-thread read bandwidth %.1f GB/s; %d shapes x %d batches, %d thread(s)", bw,
             len(shapes), len(batches), threads)
    prov = {"tvm_version": schedules.tvm_version() or "", "torch_version": torch.__version__,
            "cpu": f"{_cpu_name()} ({tinfo.mcpu})", "isa": tinfo.isa, "git": _git_describe()}
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, int, str, str]] = []
    groups = [(s, int(b)) for s in shapes for b in batches]
    show = (sys.stderr.isatty() if progress is None else progress)
    with tqdm(groups, desc="kernels", unit="shape", disable=not show) as pbar:
        for done, (shape, batch) in enumerate(pbar, 1):
            impls = _group(shape, batch, threads=threads, act_modes=act_modes, tinfo=tinfo,
                           tune=tune, tune_points=tune_points, tune_budget_s=tune_budget_s,
                           ms_trials=metaschedule_trials, generic=generic, failures=failures,
                           pbar=pbar, group_sizes=group_sizes)
            pbar.set_postfix_str(f"{shape.name} b{batch} timing", refresh=True)
            _time_group(impls, threads=threads, rounds=n_rounds, min_s=min_s)
            rows += _rows(shape, batch, impls, bandwidth_gbs=bw, rounds=n_rounds, prov=prov)
            if not show:  # no bar (not a terminal): one line per shape instead
                # (a disabled bar does not count: pbar.n stays 0)
                log.info("[%d/%d] %s batch %d: %d impls timed", done, len(groups),
                         shape.name, batch, sum(1 for i in impls if i.samples))
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    csv_path, md_path = out / "kernels.csv", out / "kernels.md"
    df.to_csv(csv_path, index=False)
    meta = {"when": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "threads": threads, "bandwidth_gbs": bw, "rounds": n_rounds, **prov}
    md_path.write_text(_markdown(df, meta))
    log.info("wrote %s and %s (%d rows, %d failed)", csv_path, md_path, len(df), len(failures))
    return KernelsResult(frame=df, csv_path=csv_path, md_path=md_path,
                         failures=tuple(failures), bandwidth_gbs=bw)

