"""Per-layer latency: pick a rule, build, check against a torch reference, then time.

A kernel is never timed unless its output matched the float64 torch reference of the export on
the same input (:class:`KernelMismatchError` otherwise). Latency is the median of
``time_evaluator`` repeats (C++ loop, explicit ``number / repeat / min_repeat_ms``); all raw
repeats are kept.

Example:
    >>> from ternbench.schedules import EvaluatorCfg
    >>> EvaluatorCfg(number=1, repeat=2, min_repeat_ms=0).repeat
    2
"""

from __future__ import annotations

import importlib
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from ternbench.core.errors import ConfigError
from ternbench.core.reference import integer_reference, quantize_activation

from . import _tvm, generic, ops, x86
from .ops import Rule, UnsupportedLayerError
from .tuning_cache import cached_params

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

__all__ = [
    "EvaluatorCfg",
    "LayerLatency",
    "KernelMismatchError",
    "UnsupportedLayerError",
    "list_targets",
    "select_rule",
    "measure_layer",
    "build_layer",
    "check_layer",
    "LayerCheck",
    "PreparedKernel",
    "prepare_kernel",
    "time_kernel",
    "target_rules",
    "measure_torch_fp32",
    "run_layer",
    "fp32_weight",
    "reference_output",
    "kernel_input",
    "INT_RTOL",
    "FLOAT_RTOL",
]

log = logging.getLogger(__name__)

#: tolerance, relative to the reference output's max |y|, when the accumulation is integer
#: (exact): only the float32 epilogue (scale fold, sum over groups, bias) rounds
INT_RTOL = 1e-5
#: when the kernel accumulates in float32 (fp32 weights or activations): the dot product itself
#: rounds, ~eps32 * sqrt(K) relative to the output scale
FLOAT_RTOL = 1e-4
#: seed of the synthetic activations used when no input is given
INPUT_SEED = 0

_fallback_logged: set[tuple[str, str]] = set()


def target_rules(family: str) -> list[Rule]:
    """The rule list of a target family (``x86``, ``arm``, ``cuda``): module ``.<family>``'s
    ``rules()``, imported on first use (dlight style: same function name per target)."""
    if family == "x86":
        return x86.rules()
    mod = importlib.import_module(f"{__package__}.{family}")
    return list(mod.rules())


class KernelMismatchError(RuntimeError):
    """A kernel's output disagrees with the reference; it is never timed."""


@dataclass(frozen=True)
class EvaluatorCfg:
    """``time_evaluator`` settings: ``repeat`` medians of ``number`` calls, each repeat lasting
    at least ``min_repeat_ms`` (``number`` grows until it does)."""

    number: int = 20
    repeat: int = 7
    min_repeat_ms: int = 20

    def __post_init__(self) -> None:
        for name, low in (("number", 1), ("repeat", 1), ("min_repeat_ms", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"EvaluatorCfg.{name} must be an int >= {low}, got {v!r}")


@dataclass(frozen=True)
class LayerLatency:
    """Latency of one layer with one implementation on one target."""

    layer: str
    impl: str  # e.g. "tvm_t2_avx2", "tvm_t2_generic", "tvm_int8", "tvm_fp32", "torch_fp32"
    target: str  # ternbench target name, e.g. "x86"
    median_us: float
    raw_us: tuple[float, ...]
    threads: int
    batch: int
    M: int  # GEMM view: M = batch * Ho * Wo
    K: int
    N: int
    max_abs_err: float  # vs the float64 torch reference, checked before timing
    target_str: str  # full TVM target, or "torch"
    isa: str = ""  # x86 ISA level the kernel was built for (``avx512``, ``avx2``, ``generic``)


def list_targets() -> list[str]:
    """Target names kernels can be built for from this process: ``x86`` (the local CPU, on an
    x86 host), the aarch64 cross targets (``arm``, ``arm-neon``, ``arm-sve``) and ``cuda``
    (timed with a GPU, built only without one)."""
    return [t for t in _tvm.KNOWN_TARGETS if t != "x86" or _tvm.is_x86_host()]


def _check_target(target: str) -> None:
    if target not in _tvm.KNOWN_TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {list(_tvm.KNOWN_TARGETS)}")


def select_rule(lx: LayerExport, target: _tvm.TargetInfo) -> Rule:
    """First applicable rule of the target, else (CPU targets) the first applicable generic
    rule, logged once as "not optimized for <target>"."""
    for rule in target_rules(target.family):
        if rule.applies(lx, target):
            return rule
    if target.family == "cuda":  # the generic rules are CPU loop nests (no thread binding)
        raise UnsupportedLayerError(
            f"{lx.name}: no CUDA kernel for weight_format={lx.weight_format!r} "
            f"act_mode={lx.act_mode!r} group_size={lx.group_size}")
    for rule in generic.rules():
        if rule.applies(lx, target):
            why = (lx.weight_format, f"act={lx.act_mode} gs={lx.group_size}")
            level = logging.DEBUG if why in _fallback_logged else logging.WARNING
            _fallback_logged.add(why)
            log.log(level, "layer %s (%s, %s): not optimized for %s, using %s", lx.name,
                    why[0], why[1], target.name, rule.name)
            return rule
    raise UnsupportedLayerError(
        f"{lx.name}: no kernel for weight_format={lx.weight_format!r} act_mode={lx.act_mode!r}")


# ----------------------------------------------------------------------------- inputs / reference


def _quantize(x: torch.Tensor, lx: LayerExport) -> np.ndarray:
    """The deployed activation quantizer of ``lx`` (:func:`ternbench.core.reference.
    quantize_activation`), in the dtype its counterpart computes in."""
    if lx.act_mode == "fp32":
        return x.detach().to(torch.float32).numpy()
    # ternary: compared in float64, as the reference of the export does for float64 input;
    # int: float32 division and half-to-even rounding, exactly as ActQuantizer.forward
    dtype = torch.float64 if lx.act_mode == "ternary" else torch.float32
    q = quantize_activation(x.detach().to(dtype), lx.act_mode, scale=lx.act_scale,
                            qmax=lx.act_qmax, threshold=lx.act_threshold)
    return q.to(torch.int8).numpy()


def kernel_input(lx: LayerExport, spec: ops.GemmSpec, x: torch.Tensor | None = None
                 ) -> np.ndarray:
    """Kernel input (NHWC or [batch, F]; int8 codes or float32) from ``x`` or seeded noise.

    ``x`` is the float layer input, NCHW / [n, F] per ``lx.input_shape``; its rows are cycled
    when it holds fewer than ``batch`` samples and cut when it holds more. Ternary-activation
    layers get codes in {-1, 0, 1}.
    """
    per = spec.in_shape
    a: np.ndarray
    if x is None:
        rng = np.random.default_rng(INPUT_SEED)
        shape = (spec.batch, *per)
        if lx.act_mode == "fp32":
            a = rng.standard_normal(shape, dtype=np.float32)
        elif lx.act_mode == "ternary":
            a = rng.integers(-1, 2, shape, dtype=np.int8)
        else:
            a = rng.integers(-lx.act_qmax, lx.act_qmax + 1, shape, dtype=np.int8)
    else:
        x = x.detach().cpu()
        if tuple(x.shape[1:]) != per and x[0].numel() != math.prod(per):
            raise ValueError(f"{lx.name}: x has per-sample shape {tuple(x.shape[1:])}, "
                             f"expected {per}")
        x = x.reshape(x.shape[0], *per)
        if x.shape[0] < spec.batch:
            x = x.repeat(-(-spec.batch // x.shape[0]), *([1] * len(per)))
        a = _quantize(x[: spec.batch], lx)
    if spec.op == "conv2d":
        a = a.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    return np.ascontiguousarray(a)


def reference_output(lx: LayerExport, a: np.ndarray) -> np.ndarray:
    """float64 [M, N] reference of the export on kernel input ``a`` (NHWC / [B, F]).

    The project's one reference of the deployed form,
    :func:`ternbench.core.reference.integer_reference`, in the kernel's layout.
    """
    xa = torch.from_numpy(np.asarray(a)).to(torch.float64)
    if lx.op == "linear":
        return integer_reference(lx, xa).numpy()
    y = integer_reference(lx, xa.permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).reshape(-1, lx.out_channels).numpy()


def _max_err(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |out - ref|, max |ref|)."""
    err = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
    return err, float(np.max(np.abs(ref))) if ref.size else 0.0


def _check_shape(name: str, what: str, out: np.ndarray, ref: np.ndarray) -> None:
    if out.shape != ref.shape:
        raise KernelMismatchError(f"{name}: {what} output shape {out.shape} != {ref.shape}")


def _check(name: str, what: str, out: np.ndarray, ref: np.ndarray, rtol: float) -> float:
    _check_shape(name, what, out, ref)
    if not np.all(np.isfinite(out)):
        raise KernelMismatchError(f"{name}: {what} produced non-finite values")
    err, scale = _max_err(out, ref)
    tol = rtol * max(scale, float(np.finfo(np.float32).tiny))
    if not err <= tol:
        raise KernelMismatchError(
            f"{name}: {what} disagrees with the torch reference: max |err| = {err:.3g} > "
            f"{tol:.3g} ({rtol:g} x max |y| = {scale:.3g})")
    return err


def _check_codes(name: str, what: str, q: np.ndarray, ref: np.ndarray, out_scale: float,
                 clip: tuple[int, int], rtol: float) -> float:
    """Check int8 output codes against ``clip(round(ref / out_scale))``: equal, or one apart
    where the reference lies within ``rtol`` of a rounding boundary (the kernel's float32
    epilogue rounds there, the float64 reference does not). Returns max ``|q * out_scale -
    ref|``."""
    _check_shape(name, what, q, ref)
    lo, hi = clip
    v = ref / out_scale
    want = np.clip(np.rint(v), lo, hi)
    off = np.abs(q.astype(np.int64) - want)
    near = np.abs(np.abs(v - np.floor(v)) - 0.5) <= rtol * max(1.0, float(np.max(np.abs(v),
                                                                                 initial=0)))
    bad = (off > 1) | ((off == 1) & ~near)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise KernelMismatchError(
            f"{name}: {what} int8 output disagrees with the torch reference at {bad.sum()} of "
            f"{bad.size} elements (first: code {q.flat[i]} against {want.flat[i]:.0f}, "
            f"reference {v.flat[i]:.4f} output steps)")
    return float(np.max(np.abs(q * out_scale - ref), initial=0.0))


# ----------------------------------------------------------------------------- measuring


def _rtol(spec: ops.GemmSpec) -> float:
    # offsets (affine ternary layers) add float terms of the size of the fan-in to the
    # epilogue, which then rounds like a float accumulation
    return INT_RTOL if spec.acc_dtype == "int32" and not spec.affine else FLOAT_RTOL


def _device(tinfo: _tvm.TargetInfo) -> Any:
    tvm = _tvm.require_tvm()
    return tvm.cuda(0) if tinfo.family == "cuda" else tvm.cpu(0)


def build_layer(lx: LayerExport, batch: int, target: str,
                params: ops.Params | None = None, *, float_input: bool = False,
                out_clip: tuple[int, int] | None = None) -> ops.Kernel:
    """Select the rule of ``target`` for ``lx`` and build its kernel (any target, local or
    not: ARM kernels are cross-compiled, CUDA kernels need no GPU to build).

    ``params`` None: the best tile parameters a search (:func:`.tuning.search`) cached for
    this shape, else the rule's default grid point. ``float_input``, ``out_clip``: see
    :meth:`.ops.Rule.build` (whole models)."""
    _check_target(target)
    tinfo = _tvm.target_info(target)
    rule = select_rule(lx, tinfo)
    if params is None:
        params = cached_params(rule, lx, batch, tinfo)
    return rule.build(lx, batch, tinfo, params, float_input=float_input, out_clip=out_clip)


def _local_target(target: str) -> _tvm.TargetInfo:
    """The target info of ``target``, which must run in this process (x86, CUDA with a GPU)."""
    _check_target(target)
    tinfo = _tvm.target_info(target)
    if not tinfo.local:
        raise RuntimeError(f"target {target!r} ({tinfo.description}) does not run in this "
                           "process: use check_layer (qemu) or an RPC session")
    return tinfo


@dataclass
class PreparedKernel:
    """A built kernel with its runtime arguments, run once and (unless prepared with
    ``check=False``) checked against the reference.

    ``nbytes`` is the data a call must move at least: kernel input, weight arguments (packed
    weights, scales, bias) and the float32 output.
    """

    kernel: ops.Kernel
    a: np.ndarray
    args: list[Any]
    out: Any
    max_abs_err: float
    nbytes: int

    def __call__(self) -> None:
        self.kernel.func(*self.args, self.out)


def prepare_kernel(kern: ops.Kernel, lx: LayerExport, tinfo: _tvm.TargetInfo,
                   x: torch.Tensor | None = None, *, check: bool = True,
                   out_scale: float | None = None) -> PreparedKernel:
    """Runtime arguments for ``kern`` on its local device (input from ``x``, else seeded: see
    :func:`kernel_input`), one run, and the check against :func:`reference_output`.

    A kernel with int8 outputs (``spec.out_clip``) writes codes of ``out_scale`` (None: the
    reference's largest magnitude over the clip's top, as the torch INT8 baseline sets its
    output scale); its check compares them with the reference rounded to those codes.

    Raises :class:`KernelMismatchError` when the output disagrees; a kernel that fails here is
    never timed. ``check=False`` skips the check (``max_abs_err`` is then NaN).
    """
    if not tinfo.local:
        raise RuntimeError(f"target {tinfo.name!r} ({tinfo.description}) does not run in this "
                           "process: use check_layer (qemu) or an RPC session")
    tvm = _tvm.require_tvm()
    dev = _device(tinfo)
    spec = kern.spec
    a = kernel_input(lx, spec, x)
    weights = kern.pack(lx)
    ref = reference_output(lx, a) if check or spec.out_clip is not None else None
    if spec.out_clip is not None:
        assert ref is not None
        if out_scale is None:
            out_scale = float(np.max(np.abs(ref), initial=0.0)) / spec.out_clip[1] or 1.0
        weights = ops.requantize_args(spec, weights, out_scale)
    # tvm.runtime.tensor copies into 64-byte aligned memory (from_dlpack of a numpy-backed
    # tensor can fail the alignment check)
    args = [tvm.runtime.tensor(v, dev) for v in (a, *weights)]
    out = tvm.runtime.empty((spec.M, spec.N), spec.out_dtype, dev)
    kern.func(*args, out)
    err = math.nan
    if check and ref is not None:
        if spec.out_clip is not None and out_scale is not None:
            err = _check_codes(lx.name, kern.impl, out.numpy(), ref, out_scale, spec.out_clip,
                               _rtol(spec))
        else:
            err = _check(lx.name, kern.impl, out.numpy(), ref, _rtol(spec))
    out_bytes = spec.M * spec.N * (1 if spec.out_clip is not None else 4)
    nbytes = a.nbytes + sum(w.nbytes for w in weights) + out_bytes
    return PreparedKernel(kern, a, args, out, err, int(nbytes))


def time_kernel(prep: PreparedKernel, lx: LayerExport, tinfo: _tvm.TargetInfo, *,
                ev: EvaluatorCfg = EvaluatorCfg(), threads: int = 1,  # noqa: B008
                target: str | None = None) -> LayerLatency:
    """Time a prepared (checked) kernel with ``time_evaluator`` on ``threads`` threads (CPU
    targets; the pool is restored afterwards): one warm-up call, then ``ev``."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    kern, spec = prep.kernel, prep.kernel.spec
    dev = _device(tinfo)
    cpu = tinfo.family != "cuda"
    prev = _tvm.num_threads()
    try:
        used = _tvm.set_num_threads(threads) if cpu else 0
        prep()  # warms caches on the timed thread count
        timer = kern.module.time_evaluator("main", dev, number=ev.number, repeat=ev.repeat,
                                           min_repeat_ms=ev.min_repeat_ms)
        res = timer(*prep.args, prep.out)
    finally:
        if cpu:
            _tvm.set_num_threads(prev)
    raw = tuple(float(r) * 1e6 for r in res.results)
    log.debug("%s %s %s: %.1f us", lx.name, kern.impl, spec.shape_key, statistics.median(raw))
    return LayerLatency(
        layer=lx.name, impl=kern.impl, target=target or tinfo.name,
        median_us=float(statistics.median(raw)), raw_us=raw, threads=used, batch=spec.batch,
        M=spec.M, K=spec.K, N=spec.N, max_abs_err=prep.max_abs_err, target_str=kern.target_str,
        isa=tinfo.isa)


def run_layer(lx: LayerExport, x: torch.Tensor | None = None, *, batch: int | None = None,
              target: str = "x86") -> tuple[str, np.ndarray]:
    """Run the layer's TVM kernel once, unchecked: ``(impl, y)`` with ``y`` float32 in the
    layer's own layout (NCHW for convs, [B, N] for linears), comparable with
    ``ternbench.core.reference.layer_reference(lx, x)``.

    ``x`` is the float layer input (quantized like :func:`measure_layer` does); ``batch``
    defaults to its sample count (1 without ``x``).
    """
    if batch is None:
        batch = 1 if x is None else int(x.shape[0])
    tinfo = _local_target(target)
    prep = prepare_kernel(build_layer(lx, batch, target), lx, tinfo, x, check=False)
    kern = prep.kernel
    y = prep.out.numpy()
    if lx.op == "conv2d":
        y = y.reshape(batch, *kern.spec.out_hw, kern.spec.N).transpose(0, 3, 1, 2)
    return kern.impl, np.ascontiguousarray(y)


def measure_layer(lx: LayerExport, *, batch: int = 1, target: str = "x86",
                  ev: EvaluatorCfg = EvaluatorCfg(), threads: int = 1,  # noqa: B008
                  x: torch.Tensor | None = None,
                  params: ops.Params | None = None) -> LayerLatency:
    """Build, verify and time the TVM kernel of one exported layer on a local target (x86, or
    CUDA with a GPU).

    ``x`` (optional) is a float layer input (NCHW / [n, F]); it is quantized with the layer's
    activation quantizer (ternary layers: ``sign(x) * [|x| > act_threshold]``). Without it,
    seeded random codes in [-qmax, qmax] ({-1, 0, 1} for ternary activations) are used.
    Raises :class:`KernelMismatchError` when the kernel disagrees with the reference, and
    :class:`UnsupportedLayerError` for formats without a kernel.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    tinfo = _local_target(target)
    prep = prepare_kernel(build_layer(lx, batch, target, params), lx, tinfo, x)
    return time_kernel(prep, lx, tinfo, ev=ev, threads=threads, target=target)


@dataclass(frozen=True)
class LayerCheck:
    """A kernel built for a target that is not timed here, and how far it was checked.

    ``status`` is ``"built and verified"`` (run somewhere - qemu-user, a GPU - and matched the
    reference: ``max_abs_err``) or ``"built"`` (compiled only; ``why`` says what was missing).
    """

    layer: str
    impl: str
    target: str
    status: str
    max_abs_err: float | None
    build_s: float
    checked_with: str  # e.g. "qemu-aarch64", "cuda:0", "" when not run
    why: str = ""


def check_layer(lx: LayerExport, *, batch: int = 1, target: str,
                x: torch.Tensor | None = None) -> LayerCheck:
    """Build the kernel of ``lx`` for ``target`` and check it where it can run from here.

    Local targets run in process; ARM kernels are exported as an aarch64 shared library and
    run under qemu-user with a no-runtime harness (:mod:`.cross`), compared with the reference
    (integer kernels bit-exact). Nothing here is a latency: emulated timings are never
    reported. Raises :class:`KernelMismatchError` on a mismatch.
    """
    tinfo = _tvm.target_info(target) if target in _tvm.KNOWN_TARGETS else None
    kern = build_layer(lx, batch, target)
    if tinfo is not None and tinfo.local:
        err = prepare_kernel(kern, lx, tinfo, x).max_abs_err
        where = "cuda:0" if tinfo.family == "cuda" else "cpu"
        return LayerCheck(lx.name, kern.impl, target, "built and verified", err, kern.build_s,
                          where)
    if tinfo is not None and tinfo.family == "arm":
        from . import cross

        why = cross.qemu_unavailable_reason()
        if why:
            return LayerCheck(lx.name, kern.impl, target, "built", None, kern.build_s, "", why)
        a = kernel_input(lx, kern.spec, x)
        y = cross.run_under_qemu(kern, [a, *kern.pack(lx)], (kern.spec.M, kern.spec.N))
        err = _check(lx.name, kern.impl, y, reference_output(lx, a), _rtol(kern.spec))
        return LayerCheck(lx.name, kern.impl, target, "built and verified", err, kern.build_s,
                          "qemu-aarch64")
    return LayerCheck(lx.name, kern.impl, target, "built", None, kern.build_s, "",
                      "no GPU visible" if target == "cuda" else "cannot run here")


class _DropNoCudaRuntime(logging.Filter):
    """Drops torch's "No CUDA runtime is found" warning, nothing else.

    ``torch.utils.benchmark`` imports ``torch.utils.cpp_extension``, which looks for a CUDA
    toolkit when imported and warns when it finds one (an ``nvcc`` on PATH) without a GPU. The
    torch FP32 / INT8 baselines are CPU timings, where that message only misleads.

    Example:
        >>> rec = logging.LogRecord("torch.utils.cpp_extension", logging.WARNING, "", 0,
        ...                         "No CUDA runtime is found, using CUDA_HOME='%s'", ("/x",), None)
        >>> _DropNoCudaRuntime().filter(rec)
        False
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _torch_timer() -> type:
    """``torch.utils.benchmark.Timer``, imported without cpp_extension's CUDA-home warning."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    quiet = _DropNoCudaRuntime()
    cpp_log.addFilter(quiet)
    try:
        from torch.utils.benchmark import Timer
    finally:
        cpp_log.removeFilter(quiet)
    return Timer


def _torch_repeats(fn: Callable[[], Any], ev: EvaluatorCfg, threads: int) -> list[float]:
    """Per-call seconds of ``ev.repeat`` repeats, with time_evaluator's min_repeat_ms rule."""
    Timer = _torch_timer()  # noqa: N806 (a class)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    number = ev.number
    if ev.min_repeat_ms > 0:  # grow `number` until one repeat lasts min_repeat_ms (as TVM does)
        while True:
            per = timer.timeit(number).times[0]
            if per * number * 1e3 >= ev.min_repeat_ms:
                break
            number = max(int(ev.min_repeat_ms / max(per * 1e3, 1e-6)) + 1,
                         int(number * 1.618) + 1)
    return [timer.timeit(number).times[0] for _ in range(ev.repeat)]


def fp32_weight(lx: LayerExport) -> np.ndarray:
    """float32 [out, fan_in] weights the export stands for: ``scales * codes + weight_offset``.

    Example:
        >>> import dataclasses
        >>> from ternbench.core.export import LayerExport
        >>> lx = LayerExport("l", "linear", "ternary", np.array([[1, -1]], np.int8),
        ...                  np.array([[0.5]], np.float32), 2, None, "ternary", 2, 1.0, 2, 1,
        ...                  weight_offset=np.array([0.25], np.float32))
        >>> fp32_weight(lx).tolist()
        [[0.75, -0.25]]
    """
    w = lx.dequantized_weight().astype(np.float32)
    if lx.weight_offset is not None:
        w = w + np.asarray(lx.weight_offset, np.float32).reshape(-1, 1)
    return np.ascontiguousarray(w)


def measure_torch_fp32(lx: LayerExport, *, batch: int = 1,
                       ev: EvaluatorCfg = EvaluatorCfg(),  # noqa: B008
                       threads: int = 1) -> LayerLatency:
    """Time torch's F.conv2d / F.linear on float32 NCHW input with the dequantized weights
    (``weight_offset`` included; the input is float whatever the layer's activation mode)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    in_shape, (ho, wo) = ops.layer_geometry(lx)
    gen = torch.Generator().manual_seed(INPUT_SEED)
    xf = torch.randn(batch, *in_shape, generator=gen)
    w = torch.from_numpy(fp32_weight(lx))
    bias = None if lx.bias is None else torch.from_numpy(np.asarray(lx.bias, np.float32))
    if lx.op == "conv2d":
        wt = w.reshape(lx.out_channels, lx.in_channels, *lx.kernel_size).contiguous()

        def fn() -> torch.Tensor:
            return F.conv2d(xf, wt, bias, stride=lx.stride, padding=lx.padding)
    else:
        wt = w.contiguous()

        def fn() -> torch.Tensor:
            return F.linear(xf, wt, bias)

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            y = fn()
            if lx.op == "conv2d":
                ref = F.conv2d(xf.double(), wt.double(), None if bias is None else bias.double(),
                               stride=lx.stride, padding=lx.padding)
                ref, y = (t.permute(0, 2, 3, 1).reshape(-1, lx.out_channels) for t in (ref, y))
            else:
                ref = F.linear(xf.double(), wt.double(), None if bias is None else bias.double())
            err = _check(lx.name, "torch_fp32", y.numpy(), ref.numpy(), FLOAT_RTOL)
            raw = tuple(t * 1e6 for t in _torch_repeats(fn, ev, threads))
            used = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)
    return LayerLatency(
        layer=lx.name, impl="torch_fp32", target="x86", median_us=float(statistics.median(raw)),
        raw_us=raw, threads=used, batch=batch, M=batch * ho * wo, K=lx.fan_in,
        N=lx.out_channels, max_abs_err=err, target_str="torch")
