"""A whole ternary model as ONE TVM module: Relax ``main`` calling the layers' scheduled kernels.

:func:`build_graph` traces the deployed model (the float architecture with the quantized
model's non-GEMM state, as :func:`.model.compile_model` takes it) with torch.fx and lowers it
node by node into a Relax function::

    main(x: NCHW float32, *params) -> logits [batch, classes]

* every conv/linear is a ``call_tir`` into the very PrimFunc the per-layer benchmark times
  (rule chosen by :func:`.measure.select_rule`, tile parameters from the tuning cache, same
  schedule), with its runtime weights (packed codes, scales, bias) as ``params``;
* a BatchNorm that is the only consumer of a layer is folded into its epilogue (as
  :func:`.model.compile_model` does); ReLU / Hardtanh / PReLU / unfolded BatchNorm / residual
  adds are fused *lazily* into the next materialising stage: the activation quantizer in front
  of the next kernel (int8 or ternary codes, NHWC), a pooling stage, or a value that has
  several consumers (written once, float32 NHWC);
* kernels read NHWC codes (or, for ``pixel_bits`` ternary convs, the float input, quantizing
  while packing) and write ``[M, N]`` = NHWC, which the next stage reads in place;
* a conv whose kernel can write int8 outputs (:data:`.ops.OUT_CLIP_LAYOUTS`: the AMX
  int8-tile and the table-lookup layouts) and whose output only another conv reads, directly
  or through a ReLU, writes that conv's int8 or ternary codes from its epilogue
  (:meth:`_Lowering.output_codes`; the ReLU is the clip's lower bound), so no quantize stage
  runs between them: in ResNet-18 every block's first conv.

No Python runs between layers: the Relax VM executes the whole graph. The result is compiled
with :func:`compile_graph` (``tvm.compile``, CPU pipeline: no TIR rescheduling, static memory
plan) and written as an artifact by :mod:`.artifact`.

Example:
    >>> from ternbench.schedules.graph import UnsupportedGraphError
    >>> issubclass(UnsupportedGraphError, NotImplementedError)
    True
"""

from __future__ import annotations

import copy
import logging
import operator
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import _tvm, ops
from .model import bn_affine, fold_batchnorm_nodes, fold_bn_exports

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

__all__ = [
    "UnsupportedGraphError",
    "GraphModule",
    "KernelInfo",
    "build_graph",
    "compile_graph",
    "scheduled_kernel",
    "kernel_sum_timer",
    "kernel_chain_timer",
    "GraphPlan",
    "straight_line_plan",
]

log = logging.getLogger(__name__)

#: an elementwise stage's vector spans at least this many elements: where a pixel has fewer
#: channels (4k, < 32) it spans several neighbouring pixels of one row. On one 16- or
#: 24-lane vector LLVM vectorises the pixel loop around it once more, with gathers and
#: byte-by-byte stores: a float32 -> int8 quantize of a 28x28x16 map took 9.0-9.3 us, of a
#: 32x32x16 one 14-19 us, against 1.3 / 1.7-1.8 us on 32 lanes (znver4, 1 thread; 0 restores one
#: pixel per vector; docs/measured/ab-x86-znver4-stage-lanes.txt). Only for pointwise stages
#: without per-channel parameters: a vector over 2 pixels reads those at lane % C (a gather:
#: FGQ on the preact ResNet-8 took 1.30x the time) and 2 max-pooling windows (3x3/2 pooling of
#: 28x28x16 8.7 against 1.3 us). x86 only: the ARM stages keep one pixel per vector (NEON has
#: no gathers, and no ARM device times them here). The figures above were with the quantizer
#: rounding by ``tirx.nearbyint``, which TVM 0.27 leaves scalar in a vectorised loop (the root
#: cause); it rounds with ``tirx.round`` since, and a 16-lane quantize alone then takes 1.4 us
#: against 1.3 fused: this rule may now be redundant (not re-measured on whole models)
STAGE_MIN_LANES = 32


class UnsupportedGraphError(NotImplementedError):
    """The model uses an op the whole-model lowering does not know (named in the message)."""


@dataclass(frozen=True)
class KernelInfo:
    """One kernel call of the whole-model module."""

    layer: str
    impl: str
    rule: str
    func: str  # PrimFunc name in the IRModule
    shape_key: str
    #: the clip of its int8 outputs (the next conv's codes: :meth:`_Lowering.output_codes`);
    #: None: float32 outputs
    out_clip: tuple[int, int] | None = None


@dataclass
class GraphModule:
    """The lowered model: ``mod`` (Relax ``main`` + PrimFuncs) and its runtime parameters."""

    mod: Any
    params: list[tuple[str, np.ndarray]]
    input_shape: tuple[int, ...]  # NCHW, batch first
    output_shape: tuple[int, ...]
    target: _tvm.TargetInfo
    kernels: list[KernelInfo] = field(default_factory=list)
    folded_bn: int = 0
    build_s: float = 0.0

    @property
    def batch(self) -> int:
        return int(self.input_shape[0])

    def out_clips(self) -> dict[str, tuple[int, int]]:
        """Layer -> the clip of its kernel's int8 outputs, for the kernels that write the next
        conv's codes (:func:`kernel_sum_timer` times those kernels)."""
        return {k.layer: k.out_clip for k in self.kernels if k.out_clip is not None}


# ----------------------------------------------------------------------------- kernels

_SCHED_CACHE: dict[tuple[str, ops.GemmSpec, str], Any] = {}
_SCHED_LOCK = threading.Lock()


def scheduled_kernel(lx: LayerExport, batch: int, tinfo: _tvm.TargetInfo, *,
                     float_input: bool = False, out_clip: tuple[int, int] | None = None
                     ) -> tuple[ops.Rule, ops.GemmSpec, Any]:
    """(rule, spec, scheduled PrimFunc) of ``lx``: the same rule, tile parameters and schedule
    as :func:`.measure.build_layer` (so the whole model runs exactly the timed kernels);
    ``out_clip``: with int8 outputs (:attr:`.ops.GemmSpec.out_clip`)."""
    from . import tuning
    from .measure import select_rule

    rule = select_rule(lx, tinfo)
    cached = tuning.cached_params(rule, lx, batch, tinfo)
    p = dict(rule.default_params if cached is None else cached)
    spec = rule.spec_for(lx, batch, tinfo, p, float_input=float_input, out_clip=out_clip)
    key = (rule.name, spec, tinfo.target_str)
    with _SCHED_LOCK:
        func = _SCHED_CACHE.get(key)
        if func is None:
            func = rule.schedule(ops.gemm_compute(spec), spec)["main"]
            _SCHED_CACHE[key] = func
    return rule, spec, func


# ----------------------------------------------------------------------------- values

@dataclass(frozen=True)
class _Src:
    """A materialised tensor: a Relax var and how a logical index maps into it."""

    var: Any
    layout: str  # "nchw" | "nhwc" | "mn" (NHWC flattened to [B*H*W, C]) | "bf" | "vec"
    shape: tuple[int, ...]  # logical: (B, C, H, W), (B, F) or (C,)
    #: int8 codes already quantized for this layer's kernel (a producer's fused output
    #: quantizer, :meth:`_Lowering.output_codes`), not float32 values
    codes_for: str = ""


def _physical(src: _Src) -> tuple[int, ...]:
    """Shape of the tensor behind ``src``."""
    if src.layout == "nhwc":
        b, c, h, w = src.shape
        return (b, h, w, c)
    if src.layout == "mn":
        b, c, h, w = src.shape
        return (b * h * w, c)
    return src.shape


def _read(t: Any, src: _Src, idx: Sequence[Any]) -> Any:
    if src.layout == "vec":
        return t[idx[0]]
    if src.layout == "bf":
        return t[idx[0], idx[1]]
    b, c, h, w = idx
    if src.layout == "nchw":
        return t[b, c, h, w]
    if src.layout == "nhwc":
        return t[b, h, w, c]
    _b, _c, hh, ww = src.shape
    return t[(b * hh + h) * ww + w, c]  # "mn"


Fn = Callable[[Sequence[Any], Sequence[Any]], Any]


@dataclass(frozen=True)
class _Val:
    """A graph value: logical ``shape`` (NCHW or [B, F]), computed elementwise by ``f`` from
    the materialised ``srcs`` (``f(tensors, idx)``, tensors aligned with ``srcs``)."""

    shape: tuple[int, ...]
    srcs: tuple[_Src, ...]
    f: Fn

    @staticmethod
    def of(src: _Src) -> _Val:
        """A plain read of ``src``."""
        def f(ts: Sequence[Any], idx: Sequence[Any]) -> Any:
            return _read(ts[0], src, idx)

        f._plain = True  # type: ignore[attr-defined]
        return _Val(src.shape, (src,), f)


def _combine(vals: Sequence[_Val], shape: tuple[int, ...],
             g: Callable[[list[Any], Sequence[Any]], Any]) -> _Val:
    """``g([v0(idx), v1(idx), ...], idx)`` elementwise over ``vals`` (sources concatenated)."""
    srcs: list[_Src] = []
    spans = []
    for v in vals:
        spans.append((len(srcs), len(srcs) + len(v.srcs)))
        srcs.extend(v.srcs)

    def f(ts: Sequence[Any], idx: Sequence[Any]) -> Any:
        return g([v.f(ts[a:b], idx) for v, (a, b) in zip(vals, spans, strict=True)], idx)

    return _Val(shape, tuple(srcs), f)


# ----------------------------------------------------------------------------- lowering


class _Gemm(nn.Module):
    """Placeholder leaf for one exported conv/linear (and its enabled branches)."""

    def __init__(self, parts: list[LayerExport]) -> None:
        super().__init__()
        self.parts = parts
        self.folded = ""


#: parameter-free modules lowered whole (their forward reads shapes, which fx cannot trace)
_LEAVES = frozenset({"ParamFreeShortcut"})


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, _Gemm) or type(m).__name__ in _LEAVES
                or super().is_leaf_module(m, qualname))


class _Lowering:
    def __init__(self, tinfo: _tvm.TargetInfo, batch: int) -> None:
        tvm = _tvm.require_tvm()
        self.tvm = tvm
        self.relax = tvm.relax
        self.te = tvm.te
        self.tirx = tvm.tirx
        self.tinfo = tinfo
        self.batch = batch
        self.bb = tvm.relax.BlockBuilder()
        self.params: list[tuple[str, np.ndarray]] = []
        self.param_vars: list[Any] = []
        self.kernels: list[KernelInfo] = []
        self.funcs: dict[int, Any] = {}  # id(scheduled PrimFunc) -> GlobalVar
        self.n_stage = 0
        #: layer -> (the conv that alone reads its output, whether a ReLU sits between)
        self.consumers: dict[str, tuple[_Gemm, bool]] = {}
        #: (source var, op, shape, dtype, quantizer) -> the quantize stage's Relax var
        self.quantized: dict[tuple[Any, ...], Any] = {}

    # -- helpers
    def param(self, name: str, arr: np.ndarray) -> Any:
        arr = np.ascontiguousarray(arr)
        var = self.relax.Var(f"p{len(self.params)}_{name}".replace(".", "_"),
                             self.relax.TensorType(tuple(arr.shape), str(arr.dtype)))
        self.params.append((name, arr))
        self.param_vars.append(var)
        return var

    def vec_param(self, name: str, arr: np.ndarray) -> _Val:
        a = np.asarray(arr, np.float32).reshape(-1)
        src = _Src(self.param(name, a), "vec", (len(a),))
        return _Val((len(a),), (src,), lambda ts, idx: ts[0][idx[0]])

    def emit(self, name: str, shape: tuple[int, ...], dtype: str, srcs: Sequence[_Src],
             body: Callable[[Sequence[Any], Sequence[Any]], Any], *,
             pointwise: bool = True) -> Any:
        """One elementwise TE stage ``out[i] = body(tensors, i)`` over ``srcs`` -> Relax var.

        The stage is scheduled here (innermost loop, the channels of NHWC, vectorised; a
        ``pointwise`` stage, which reads each output pixel's own input pixel, and no
        per-channel parameter, over whole neighbouring pixels where they have few channels:
        :data:`STAGE_MIN_LANES`) and called with ``call_tir`` like a kernel."""
        te, tvm = self.te, self.tvm
        self.n_stage += 1
        fname = f"{name}_{self.n_stage}"
        ins = [te.placeholder(_physical(s), "float32", name=f"in{i}")
               for i, s in enumerate(srcs)]
        out = te.compute(shape, lambda *i: body(ins, i).astype(dtype), name=name)
        func = te.create_prim_func([*ins, out])
        if self.tinfo.family == "cuda":
            func = _gpu_stage(func)
        else:
            try:
                sch = tvm.s_tir.Schedule(func)
                loops = sch.get_loops(sch.get_sblock(name))
                pixels = _stage_pixels(shape) if pointwise and self.tinfo.family == "x86" \
                    else 1
                if any(src.layout == "vec" for src in srcs):
                    # per-channel parameters: one vector over 2 pixels reads them at lane % C,
                    # a gather (FGQ on the preact ResNet-8 1.30x the time; 2 pixels unrolled,
                    # one vector each, 1.00x: not worth a third schedule)
                    pixels = 1
                if pixels > 1:  # whole pixels per vector: see STAGE_MIN_LANES
                    fused = sch.fuse(loops[-2], loops[-1])
                    sch.vectorize(sch.split(fused, [None, pixels * shape[-1]])[1])
                elif shape[-1] % 4 == 0 and shape[-1] <= 1024:
                    sch.vectorize(loops[-1])
                func = sch.mod["main"]
            except Exception as exc:  # an unscheduled stage is still correct
                log.debug("stage %s left unscheduled: %s", fname, exc)
        gv = self.bb.add_func(func.with_attr("global_symbol", fname), fname)
        return self.bb.emit(self.relax.call_tir(
            gv, [s.var for s in srcs], self.relax.TensorType(tuple(shape), dtype)))

    def materialise(self, v: _Val, name: str = "act") -> _Src:
        """Write ``v`` once (float32 NHWC / [B, F])."""
        if len(v.shape) == 4:
            b, c, h, w = v.shape
            var = self.emit(name, (b, h, w, c), "float32", v.srcs,
                            lambda ts, i: v.f(ts, (i[0], i[3], i[1], i[2])))
            return _Src(var, "nhwc", v.shape)
        var = self.emit(name, v.shape, "float32", v.srcs, lambda ts, i: v.f(ts, i))
        return _Src(var, "bf", v.shape)

    def quantized_input(self, lx: LayerExport, spec: ops.GemmSpec, v: _Val) -> Any:
        """The kernel input of ``spec``: codes (int8) or float32, NHWC / [B, K], from ``v``."""
        tirx = self.tirx
        f32 = "float32"
        if _is_plain(v) and v.srcs[0].codes_for:  # quantized by the producer's epilogue
            src = v.srcs[0]
            if src.codes_for != lx.name or spec.float_in:
                raise UnsupportedGraphError(f"{lx.name}: its input holds codes for "
                                            f"{src.codes_for}")
            return self.bb.emit(self.relax.op.reshape(src.var, spec.input_shape))

        def q(x: Any) -> Any:
            if spec.float_in or lx.act_mode == "fp32":
                return x
            if lx.act_mode == "ternary":  # sign(x) * [|x| > t], compared in float32
                t = tirx.const(float(lx.act_threshold), f32)
                one, zero = tirx.const(1, "int8"), tirx.const(0, "int8")
                return tirx.Select(x > t, one, tirx.Select(x < -t, -one, zero))
            # float32 division, half-to-even rounding: exactly ActQuantizer. On the CPUs
            # tirx.round lowers to llvm.nearbyint (half to even) and vectorises; TVM 0.27
            # does not mark tirx.nearbyint vectorisable, so a "vectorised" stage ran as a
            # scalar loop that LLVM unrolled and re-vectorised over pixels with gathers (a
            # 28x28x16 quantize 12.0 against 1.4 us; docs/measured/ab-x86-znver4-stage-lanes.txt).
            # On CUDA round is roundf (half away from zero): nearbyint there
            rint = tirx.nearbyint if self.tinfo.family == "cuda" else tirx.round
            qm = float(lx.act_qmax)
            r = rint(x / tirx.const(float(lx.act_scale), f32))
            return tirx.max(tirx.min(r, tirx.const(qm, f32)), tirx.const(-qm, f32))

        dtype = "float32" if spec.float_in else spec.act_dtype
        view = self._view(v, spec.input_shape) \
            if spec.float_in or lx.act_mode == "fp32" else None
        if view is not None:
            return view
        # a value read by two convs with the same quantizer (a downsampling block's first conv
        # and its 1x1 shortcut) is quantized once
        key = (v.srcs[0].var, spec.op, tuple(spec.input_shape), dtype, spec.float_in,
               lx.act_mode, float(lx.act_scale), float(lx.act_qmax),
               float(lx.act_threshold)) if _is_plain(v) else None
        if key is not None and key in self.quantized:
            return self.quantized[key]
        if spec.op == "conv2d":
            if len(v.shape) != 4:
                raise UnsupportedGraphError(f"{lx.name}: conv input is not 4-D: {v.shape}")
            out = self.emit("quant", spec.input_shape, dtype, v.srcs,
                            lambda ts, i: q(v.f(ts, (i[0], i[3], i[1], i[2]))))
        else:
            if len(v.shape) != 2 or v.shape[1] != spec.K:
                raise UnsupportedGraphError(
                    f"{lx.name}: linear input {v.shape} is not [B, {spec.K}]")
            out = self.emit("quant", spec.input_shape, dtype, v.srcs,
                            lambda ts, i: q(v.f(ts, i)))
        if key is not None:
            self.quantized[key] = out
        return out

    def _view(self, v: _Val, shape: tuple[int, ...]) -> Any:
        """``v`` as a tensor of ``shape`` without a copy, or None.

        A plain read of a float32 tensor whose memory order already is the kernel's (NHWC,
        ``[B*H*W, C]``, ``[B, F]``, or NCHW with one channel) is handed over as a reshape, which
        the VM lowers to a view: no stage, no call, no copy between two kernels."""
        if not _is_plain(v) or len(v.srcs) != 1:
            return None
        src = v.srcs[0]
        if src.layout == "nchw" and not (len(src.shape) == 4 and src.shape[1] == 1):
            return None
        if src.layout == "vec" or int(np.prod(_physical(src))) != int(np.prod(shape)):
            return None
        if len(shape) == 4 and len(src.shape) != 4:
            return None
        if len(shape) == 2 and len(src.shape) == 4 and src.shape[2:] != (1, 1):
            return None  # flattening a spatial map is NCHW-ordered: needs the stage
        if _physical(src) == tuple(shape):
            return src.var
        return self.bb.emit(self.relax.op.reshape(src.var, shape))

    def output_codes(self, spec: ops.GemmSpec, name: str
                     ) -> tuple[tuple[int, int], float, str] | None:
        """Whether a conv's epilogue can write the codes its one consumer's quantizer would
        (``(out_clip, output scale, consumer)``, else None): a conv whose layout can write int8
        outputs (:data:`.ops.OUT_CLIP_LAYOUTS`, :attr:`.ops.GemmSpec.out_clip`) whose output
        is read only by another conv,
        directly or through a ReLU (the clip's lower bound 0), whose input is int8 codes of
        ``clip(round(x / act_scale), -qmax, qmax)`` (scale ``act_scale``) or ternary codes of
        ``|x| > t`` (``clip(round(x / 2t), -1, 1)``, scale ``2 t``: equal but at ``|x| = t``
        exactly). The scale is divided into the epilogue's S and bias on the host, so codes
        one rounding boundary apart can differ from the separate quantize stage's."""
        found = self.consumers.get(name)
        if found is None or spec.layout not in ops.OUT_CLIP_LAYOUTS or spec.op != "conv2d":
            return None
        consumer, relu = found
        lq = consumer.parts[0]
        _r, sq, _f = scheduled_kernel(lq, self.batch, self.tinfo, float_input=True)
        if (sq.float_in or sq.op != "conv2d"
                or sq.input_shape != (self.batch, *spec.out_hw, spec.N)):
            return None
        if lq.act_mode == "int" and sq.act_dtype == "int8" and lq.act_qmax <= 127:
            qm = int(lq.act_qmax)
            return (0 if relu else -qm, qm), float(lq.act_scale), lq.name
        if lq.act_mode == "ternary" and lq.act_threshold > 0:
            return (0 if relu else -1, 1), 2.0 * float(lq.act_threshold), lq.name
        return None

    # -- ops
    def gemm(self, mod: _Gemm, v: _Val, name: str = "") -> _Val:
        relax = self.relax
        outs: list[_Val] = []
        specs = []
        for part in mod.parts:
            rule, spec, func = scheduled_kernel(part, self.batch, self.tinfo, float_input=True)
            specs.append((part, rule, spec, func))
        if len({s.float_in for _p, _r, s, _f in specs}) != 1:
            raise ValueError(f"{mod.parts[0].name}: branches disagree on float input")
        lx0, _r0, spec0, _f0 = specs[0]
        xin = self.quantized_input(lx0, spec0, v)
        codes = self.output_codes(spec0, name) if len(specs) == 1 else None
        if codes is not None:  # the consumer's quantizer fused into this epilogue
            rule, spec, func = scheduled_kernel(lx0, self.batch, self.tinfo, float_input=True,
                                                out_clip=codes[0])
            specs = [(lx0, rule, spec, func)]
        for part, rule, spec, func in specs:
            gv = self.funcs.get(id(func))
            if gv is None:
                name = f"k{len(self.funcs)}_{rule.name}".replace("-", "_")
                # marked scheduled: the CUDA pipeline re-schedules unmarked PrimFuncs (dlight)
                gv = self.bb.add_func(func.with_attr("global_symbol", name)
                                      .with_attr("tirx.is_scheduled", True), name)
                self.funcs[id(func)] = gv
            wargs = ops.pack_weight_args(spec, part)
            if codes is not None:
                wargs = ops.requantize_args(spec, wargs, codes[1])
            pvars = [self.param(f"{part.name}.{i}", a) for i, a in enumerate(wargs)]
            out = self.bb.emit(relax.call_tir(
                gv, [xin, *pvars], relax.TensorType((spec.M, spec.N), spec.out_dtype)))
            self.kernels.append(KernelInfo(part.name, rule.impl_for(part)
                                           + ("_q8" if codes is not None else ""), rule.name,
                                           gv.name_hint, spec.shape_key,
                                           codes[0] if codes is not None else None))
            if spec.op == "conv2d":
                ho, wo = spec.out_hw
                src = _Src(out, "mn", (self.batch, spec.N, ho, wo),
                           codes_for=codes[2] if codes is not None else "")
            else:
                src = _Src(out, "bf", (self.batch, spec.N))
            outs.append(_Val.of(src))
        if len(outs) == 1:
            return outs[0]
        return _combine(outs, outs[0].shape, lambda xs, i: _sum(xs))

    def _affine(self, v: _Val, s: _Val, b: _Val) -> _Val:
        srcs = (*v.srcs, s.srcs[0], b.srcs[0])
        n = len(v.srcs)

        def f(ts: Sequence[Any], idx: Sequence[Any]) -> Any:
            return v.f(ts[:n], idx) * ts[n][idx[1]] + ts[n + 1][idx[1]]

        return _Val(v.shape, srcs, f)

    def prelu(self, v: _Val, weight: np.ndarray, name: str) -> _Val:
        w = np.asarray(weight, np.float32).reshape(-1)
        if len(w) == 1:
            w = np.repeat(w, v.shape[1])
        a = self.vec_param(name + ".weight", w)
        srcs = (*v.srcs, a.srcs[0])
        n = len(v.srcs)
        tirx = self.tirx

        def f(ts: Sequence[Any], idx: Sequence[Any]) -> Any:
            x = v.f(ts[:n], idx)
            return tirx.Select(x > tirx.const(0.0, "float32"), x, ts[n][idx[1]] * x)

        return _Val(v.shape, srcs, f)

    def clamp(self, v: _Val, lo: float | None, hi: float | None) -> _Val:
        tirx = self.tirx
        if _is_plain(v) and v.srcs[0].codes_for:  # a ReLU fused into the codes' clip
            if (lo, hi) != (0.0, None):
                raise UnsupportedGraphError(f"clamp({lo}, {hi}) of codes for "
                                            f"{v.srcs[0].codes_for}")
            return v

        def f(ts: Sequence[Any], idx: Sequence[Any]) -> Any:
            x = v.f(ts, idx)
            if lo is not None:
                x = tirx.max(x, tirx.const(lo, "float32"))
            if hi is not None:
                x = tirx.min(x, tirx.const(hi, "float32"))
            return x

        return _Val(v.shape, v.srcs, f)

    def avgpool_global(self, v: _Val) -> _Val:
        te = self.te
        b, c, h, w = v.shape
        rh, rw = te.reduce_axis((0, h), "rh"), te.reduce_axis((0, w), "rw")
        inv = 1.0 / float(h * w)

        def fn(*ts: Any) -> Any:
            s = te.compute((b, c), lambda bi, ci: te.sum(v.f(ts, (bi, ci, rh, rw)),
                                                        axis=[rh, rw]), name="pool_sum")
            return te.compute((b, 1, 1, c), lambda bi, _y, _x, ci: s[bi, ci] * inv,
                              name="avgpool")

        self.n_stage += 1
        fname = f"avgpool_{self.n_stage}"
        ins = [te.placeholder(_physical(s), "float32", name=f"in{i}")
               for i, s in enumerate(v.srcs)]
        func = te.create_prim_func([*ins, fn(*ins)])
        if self.tinfo.family == "cuda":
            func = _gpu_stage(func)
        gv = self.bb.add_func(func.with_attr("global_symbol", fname), fname)
        var = self.bb.emit(self.relax.call_tir(
            gv, [s.var for s in v.srcs], self.relax.TensorType((b, 1, 1, c), "float32")))
        return _Val.of(_Src(var, "nhwc", (b, c, 1, 1)))

    def maxpool(self, v: _Val, k: int, s: int, p: int, ceil: bool) -> _Val:
        te, tirx = self.te, self.tirx
        b, c, h, w = v.shape

        def osz(n: int) -> int:
            num = n + 2 * p - k
            o = (-(-num // s) if ceil else num // s) + 1
            if ceil and (o - 1) * s >= n + p:  # the last window must start inside
                o -= 1
            return o

        ho, wo = osz(h), osz(w)
        lowest = tirx.const(-3.4028234663852886e38, "float32")

        def body(ts: Sequence[Any], i: Sequence[Any]) -> Any:
            # the k*k taps written out (an elementwise stage: the channel loop vectorises)
            bi, y, x, ci = i
            acc = None
            for di in range(k):
                for dj in range(k):
                    iy, ix = y * s - p + di, x * s - p + dj
                    inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
                    cy, cx = te.max(te.min(iy, h - 1), 0), te.max(te.min(ix, w - 1), 0)
                    val = tirx.Select(inside, v.f(ts, (bi, ci, cy, cx)), lowest)
                    acc = val if acc is None else tirx.max(acc, val)
            return acc

        # not pointwise: a vector over 2 output pixels reads 2 windows (7x slower: 8.7 against
        # 1.3 us for 3x3/2 pooling of 28x28x16; docs/measured/ab-x86-znver4-stage-lanes.txt)
        var = self.emit("maxpool", (b, ho, wo, c), "float32", v.srcs, body, pointwise=False)
        return _Val.of(_Src(var, "nhwc", (b, c, ho, wo)))

    def pad_channels(self, v: _Val, extra: int) -> _Val:
        tirx = self.tirx
        b, c, h, w = v.shape

        def f(ts: Sequence[Any], idx: Sequence[Any]) -> Any:
            bi, ci, y, x = idx
            inner = v.f(ts, (bi, tirx.min(ci, c - 1), y, x))
            return tirx.Select(ci < c, inner, tirx.const(0.0, "float32"))

        return _Val((b, c + extra, h, w), v.srcs, f)

    def flatten(self, v: _Val) -> _Val:
        if len(v.shape) == 2:
            return v
        b, c, h, w = v.shape
        if h * w == 1 and _is_plain(v) and v.srcs[0].layout in ("nhwc", "mn"):
            # [B, 1, 1, C] is [B, C] in memory: a view, not a stage
            var = self.bb.emit(self.relax.op.reshape(v.srcs[0].var, (b, c)))
            return _Val.of(_Src(var, "bf", (b, c)))

        def f(ts: Sequence[Any], idx: Sequence[Any]) -> Any:
            bi, k = idx
            return v.f(ts, (bi, k // (h * w), (k // w) % h, k % w))

        return _Val((b, c * h * w), v.srcs, f)


def _stage_pixels(shape: Sequence[int]) -> int:
    """How many pixels (entries of the second-last axis) one vector of an elementwise stage of
    ``shape`` spans: where the last axis (a multiple of 4 channels) is shorter than
    :data:`STAGE_MIN_LANES`, the fewest pixels that divide the row and reach it; else 1.

    Example:
        >>> _stage_pixels((1, 28, 28, 16)), _stage_pixels((1, 16, 16, 24))
        (2, 2)
        >>> _stage_pixels((1, 14, 14, 32)), _stage_pixels((1, 28, 28, 3)), _stage_pixels((1, 16))
        (1, 1, 1)
    """
    c = int(shape[-1])
    if len(shape) < 2 or c % 4 or c >= STAGE_MIN_LANES:
        return 1
    row = int(shape[-2])
    for k in range(2, row + 1):
        if row % k == 0 and c * k >= STAGE_MIN_LANES:
            return k if c * k <= 1024 else 1
    return 1


def _gpu_stage(func: Any) -> Any:
    """A non-GEMM stage scheduled for the GPU: one thread per output element (TVM's dlight
    ``Fallback``; a pooling reduction runs serially inside its thread)."""
    tvm = _tvm.require_tvm()
    from tvm.s_tir import dlight as dl

    mod = tvm.IRModule({"main": func})
    with _tvm.target_info("cuda").target():
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    return mod["main"]


def _sum(xs: Sequence[Any]) -> Any:
    acc = xs[0]
    for x in xs[1:]:
        acc = acc + x
    return acc


def _fold_into_gemm(g: nn.Module, bn: nn.BatchNorm2d | nn.BatchNorm1d, name: str) -> None:
    assert isinstance(g, _Gemm)
    g.parts = fold_bn_exports(g.parts, bn, name)
    g.folded = name


def _fold(gm: torch.fx.GraphModule) -> int:
    """Fold every eval BatchNorm that is the only consumer of a _Gemm into it."""
    return fold_batchnorm_nodes(gm, lambda mod: isinstance(mod, _Gemm), _fold_into_gemm)


def build_graph(graph: nn.Module, exports: Mapping[str, LayerExport], *, batch: int = 1,
                input_shape: tuple[int, int, int], target: str = "x86") -> GraphModule:
    """Lower ``graph`` (every conv/linear exported in ``exports``) into one Relax IRModule.

    ``input_shape`` is the per-sample (C, H, W). Raises :class:`UnsupportedGraphError` for an
    op the lowering does not know, ``ValueError`` for a conv/linear without an export.
    """
    from ternbench.methods import swap_layers

    t0 = time.perf_counter()
    tinfo = _tvm.target_info(target)
    if tinfo.family not in ("x86", "arm", "cuda"):
        raise UnsupportedGraphError(
            f"whole-model modules are built for x86, the ARM targets and cuda, not {target}")
    m = copy.deepcopy(graph).eval()
    missing: list[str] = []

    def make(name: str, mod: nn.Module, pos: str) -> nn.Module | None:
        lx = exports.get(name)
        if lx is None:
            missing.append(name)
            return None
        branches = [b for b in exports.values() if b.branch_of == name and b.enabled]
        return _Gemm([lx, *branches])

    swap_layers(m, make)
    if missing:
        raise ValueError(f"no export for layers {missing}: cannot compile the whole model")
    try:
        gm = torch.fx.GraphModule(m, _Tracer().trace(m))
    except Exception as exc:
        raise UnsupportedGraphError(f"model is not traceable by torch.fx: {exc}") from None
    folded = _fold(gm)
    low = _Lowering(tinfo, batch)
    relax = low.relax
    shape = (batch, *input_shape)
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    mods = dict(gm.named_modules())
    low.consumers = _conv_consumers(gm, mods)
    env: dict[str, _Val] = {}
    users = {n.name: len(n.users) for n in gm.graph.nodes}
    out_val: _Val | None = None
    fscope = low.bb.function("main", [x], private=False)
    # parameters are only known after lowering: build the body, then rebuild the signature
    with fscope:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                val = _Val.of(_Src(x, "nchw", shape))
            elif node.op == "output":
                arg = node.args[0]
                if not isinstance(arg, torch.fx.Node):
                    raise UnsupportedGraphError("model output must be a single tensor")
                out_val = env[arg.name]
                break
            else:
                val = _lower_node(low, node, mods, env)
            if users.get(node.name, 0) > 1 and len(val.srcs) and not _is_plain(val):
                val = _Val.of(low.materialise(val))
            env[node.name] = val
        assert out_val is not None
        if len(out_val.shape) != 2:
            raise UnsupportedGraphError(f"model output has shape {out_val.shape}, not [B, classes]")
        res = out_val.srcs[0].var if _is_plain(out_val) and out_val.srcs[0].layout == "bf" \
            else low.materialise(out_val, "logits").var
        low.bb.emit_func_output(res)
    mod = low.bb.get()
    mod = _with_params(low, mod, x)
    log.info("whole model lowered: %d kernels, %d BatchNorm folded, %d params",
             len(low.kernels), folded, len(low.params))
    return GraphModule(mod=mod, params=low.params, input_shape=shape,
                       output_shape=tuple(int(d) for d in out_val.shape), target=tinfo,
                       kernels=low.kernels, folded_bn=folded,
                       build_s=time.perf_counter() - t0)


def _with_params(low: _Lowering, mod: Any, x: Any) -> Any:
    """``main(x)`` refers to the parameter vars freely: make them parameters of ``main``."""
    relax = low.relax
    main = mod["main"]
    fn = relax.Function([x, *low.param_vars], main.body, main.ret_ty,
                        attrs=main.attrs)
    mod["main"] = fn
    return mod


def _is_relu(node: torch.fx.Node, mods: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(mods.get(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU and not node.kwargs
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _conv_consumers(gm: torch.fx.GraphModule, mods: Mapping[str, nn.Module]
                    ) -> dict[str, tuple[_Gemm, bool]]:
    """Each layer whose output only one conv/linear reads, directly or through one ReLU
    that nothing else reads: ``{layer: (that module, whether the ReLU sits between)}``."""
    out: dict[str, tuple[_Gemm, bool]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(str(node.target)), _Gemm):
            continue
        prev, relu = node, False
        if len(prev.users) != 1:
            continue
        (user,) = prev.users
        if _is_relu(user, mods) and len(user.users) == 1 and user.args[:1] == (prev,):
            prev, relu = user, True
            (user,) = prev.users
        target = mods.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(target, _Gemm) and user.args[:1] == (prev,):
            out[str(node.target)] = (target, relu)
    return out


def _is_plain(v: _Val) -> bool:
    return getattr(v.f, "_plain", False)


_ADD = {operator.add, torch.add, operator.iadd}
_RELU = {F.relu, torch.relu}


def _lower_node(low: _Lowering, node: torch.fx.Node, mods: dict[str, nn.Module],
                env: dict[str, _Val]) -> _Val:
    def arg(i: int) -> _Val:
        a = node.args[i]
        if not isinstance(a, torch.fx.Node):
            raise UnsupportedGraphError(f"{node.name}: argument {i} is not a tensor ({a!r})")
        return env[a.name]

    if node.op == "call_module":
        mod = mods[str(node.target)]
        name = str(node.target)
        if isinstance(mod, _Gemm):
            return low.gemm(mod, arg(0), name)
        if isinstance(mod, nn.Identity | nn.Dropout):
            return arg(0)
        if isinstance(mod, nn.ReLU):
            return low.clamp(arg(0), 0.0, None)
        if isinstance(mod, nn.ReLU6):
            return low.clamp(arg(0), 0.0, 6.0)
        if isinstance(mod, nn.Hardtanh):
            return low.clamp(arg(0), float(mod.min_val), float(mod.max_val))
        if isinstance(mod, nn.PReLU):
            return low.prelu(arg(0), mod.weight.detach().numpy(), name)
        if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d) and not mod.training:
            g, b = (a.astype(np.float32) for a in bn_affine(mod, name))
            return low._affine(arg(0), low.vec_param(name + ".scale", g),
                               low.vec_param(name + ".shift", b))
        if isinstance(mod, nn.AdaptiveAvgPool2d) and _is_one(mod.output_size):
            return low.avgpool_global(arg(0))
        if isinstance(mod, nn.MaxPool2d) and _int(mod.dilation) == 1:
            return low.maxpool(arg(0), _int(mod.kernel_size), _int(mod.stride),
                               _int(mod.padding), bool(mod.ceil_mode))
        if isinstance(mod, nn.Flatten) and mod.start_dim == 1:
            return low.flatten(arg(0))
        if type(mod).__name__ == "ParamFreeShortcut":  # STTN's: 2x2 max pool + zero channels
            sv = arg(0)
            if isinstance(getattr(mod, "pool", None), nn.MaxPool2d):
                sv = low.maxpool(sv, 2, 2, 0, True)
            extra = int(getattr(mod, "extra", 0))
            return low.pad_channels(sv, extra) if extra else sv
        raise UnsupportedGraphError(f"module {name} ({type(mod).__name__}) has no lowering")
    if node.op == "call_function":
        fn = node.target
        if fn in _ADD and len(node.args) == 2 and not node.kwargs:
            va, vb = arg(0), arg(1)
            if va.shape != vb.shape:
                raise UnsupportedGraphError(f"{node.name}: add of {va.shape} and {vb.shape}")
            return _combine([va, vb], va.shape, lambda xs, i: xs[0] + xs[1])
        if fn in _RELU:
            return low.clamp(arg(0), 0.0, None)
        if fn is torch.flatten and tuple(node.args[1:]) in ((1,), (1, -1)):
            return low.flatten(arg(0))
        raise UnsupportedGraphError(f"function {getattr(fn, '__name__', fn)} has no lowering")
    if node.op == "call_method":
        if node.target == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1)):
            return low.flatten(arg(0))
        if node.target in ("relu", "relu_"):
            return low.clamp(arg(0), 0.0, None)
        raise UnsupportedGraphError(f"method .{node.target}() has no lowering")
    raise UnsupportedGraphError(f"node {node.op} {node.target} has no lowering")


def _int(v: Any) -> int:
    if isinstance(v, tuple | list):
        if len(set(v)) != 1:
            raise UnsupportedGraphError(f"non-square pooling parameter {v}")
        return int(v[0])
    return int(v)


def _is_one(v: Any) -> bool:
    if isinstance(v, int):
        return v == 1
    return isinstance(v, tuple | list) and tuple(v) == (1, 1)


@dataclass(frozen=True)
class PlanTensor:
    """One tensor of a :class:`GraphPlan`: allocated, or a view of ``view_of``'s memory."""

    id: int
    dtype: str
    shape: tuple[int, ...]
    view_of: int | None = None


@dataclass
class GraphPlan:
    """The Relax ``main`` of a whole model as a straight-line program over numbered tensors:
    what a runtime-free driver (the ARM harness under qemu, a board without TVM's runtime)
    executes. ``prim_mod`` holds every PrimFunc ``calls`` names (each its own global symbol);
    ``param_ids`` are aligned with :attr:`GraphModule.params`."""

    prim_mod: Any
    tensors: list[PlanTensor]
    calls: list[tuple[str, list[int]]]
    input_id: int
    param_ids: list[int]
    output_id: int


def _static_shape(ty: Any) -> tuple[str, tuple[int, ...]]:
    shape = ty.shape
    vals = shape.values if hasattr(shape, "values") else shape
    return str(ty.dtype), tuple(int(v) for v in vals)


def straight_line_plan(gm: GraphModule) -> GraphPlan:
    """:class:`GraphPlan` of ``gm`` (its ``main`` is only ``call_tir`` and ``reshape``
    bindings, as :func:`build_graph` emits it; anything else raises UnsupportedGraphError).

    Example:
        >>> callable(straight_line_plan)
        True
    """
    tvm = _tvm.require_tvm()
    main = gm.mod["main"]
    ids: dict[Any, int] = {}
    tensors: list[PlanTensor] = []

    def new(var: Any, view_of: int | None = None) -> int:
        dtype, shape = _static_shape(var.ty)
        ids[var] = len(tensors)
        tensors.append(PlanTensor(len(tensors), dtype, shape, view_of))
        return ids[var]

    params = [new(p) for p in main.params]
    calls: list[tuple[str, list[int]]] = []
    funcs: dict[str, Any] = {}
    for block in main.body.blocks:
        for b in block.bindings:
            call = b.value
            op = getattr(getattr(call, "op", None), "name", "")
            if op == "relax.call_tir":
                gv = call.args[0]
                name = gv.name_hint
                funcs[name] = gm.mod[gv].with_attr("global_symbol", name)
                args = [ids[a] for a in call.args[1].fields]
                calls.append((name, [*args, new(b.var)]))
            elif op == "relax.reshape":
                new(b.var, view_of=ids[call.args[0]])
            else:
                raise UnsupportedGraphError(f"main binds {op or type(call).__name__}: "
                                            "not a straight-line plan")
    out = main.body.body
    if out not in ids:
        raise UnsupportedGraphError("main returns something that is not a bound tensor")
    return GraphPlan(prim_mod=tvm.IRModule(funcs), tensors=tensors, calls=calls,
                     input_id=params[0], param_ids=params[1:], output_id=ids[out])


def compile_graph(gm: GraphModule) -> Any:
    """``tvm.compile`` the module for its target (Relax CPU pipeline); returns the Executable
    (``export_library``; ``tvm.relax.VirtualMachine(ex, tvm.cpu())`` runs it here)."""
    tvm = _tvm.require_tvm()
    t0 = time.perf_counter()
    ex = tvm.compile(gm.mod, target=_tvm.build_target(gm.target))
    log.info("whole model compiled in %.1f s", time.perf_counter() - t0)
    return ex


def kernel_sum_timer(exports: Mapping[str, LayerExport], batch: int, *,
                     target: str = "x86",
                     out_clips: Mapping[str, tuple[int, int]] | None = None
                     ) -> Callable[[int], float]:
    """A timer of the model's kernels run one by one (seconds per pass over all of them, each
    kernel ``number`` times in ``time_evaluator``'s C++ loop), so that the kernel sum can be
    timed in the same interleaved rounds as the whole module. Each kernel is first checked
    against the reference (:func:`.measure.measure_layer`, one short repeat).

    ``out_clips``: layer -> the clip of the int8 outputs the whole module's kernel writes
    there (``KernelInfo.out_clip`` of :attr:`GraphModule.kernels`); those layers are timed
    with the same int8-output kernel (checked as codes), not the float32 one."""
    from .measure import EvaluatorCfg, build_layer, kernel_input, measure_layer, prepare_kernel

    tvm = _tvm.require_tvm()
    dev = tvm.cpu(0)
    quick = EvaluatorCfg(number=1, repeat=1, min_repeat_ms=0)
    clips = dict(out_clips or {})
    runs: list[tuple[Any, list[Any]]] = []
    for name, lx in exports.items():
        kern = build_layer(lx, batch, target, out_clip=clips.get(name))
        if name in clips:  # raises on a mismatch (the codes' check)
            prepare_kernel(kern, lx, _tvm.target_info(target))
        else:
            measure_layer(lx, batch=batch, target=target, ev=quick)  # raises on a mismatch
        # (an int8-output kernel gets the float32 epilogue arguments: its codes saturate,
        # which its time does not depend on)
        args = [tvm.runtime.tensor(v, dev)
                for v in (kernel_input(lx, kern.spec), *kern.pack(lx))]
        args.append(tvm.runtime.empty((kern.spec.M, kern.spec.N), kern.spec.out_dtype, dev))
        runs.append((kern.module, args))

    def run(number: int) -> float:
        total = 0.0
        for mod, args in runs:
            total += float(mod.time_evaluator("main", dev, number=number, repeat=1)(*args).mean)
        return total

    return run


def kernel_chain_timer(gm: GraphModule) -> Callable[[int], float]:
    """A timer of the model's kernels run one after another, in model order, in ONE Relax
    function (seconds per pass): each kernel reads its own preallocated input, so there are
    no stages between them, and the VM calls them as the artifact does. Beside the artifact
    this separates the glue (stages and calls) from the kernels running in sequence, with
    the caches as the model leaves them; :func:`kernel_sum_timer` times each kernel hot, in a
    loop of its own."""
    tvm = _tvm.require_tvm()
    relax = tvm.relax
    main = gm.mod["main"]
    params = list(main.params)[1:]  # the weights (the image is replaced by the acts)
    bb = relax.BlockBuilder()
    acts: list[Any] = []
    calls: list[tuple[Any, list[Any], Any]] = []
    for block in main.body.blocks:
        for b in block.bindings:
            call = b.value
            if getattr(getattr(call, "op", None), "name", "") != "relax.call_tir":
                continue
            gv = call.args[0]
            if not gv.name_hint.startswith("k"):  # a stage, not a kernel
                continue
            args = list(call.args[1].fields)
            dtype, shape = _static_shape(args[0].ty)
            a = relax.Var(f"a{len(acts)}", relax.TensorType(shape, dtype))
            acts.append(a)
            calls.append((gv, [a, *args[1:]], b.var.ty))
    mod = tvm.IRModule({gv: f for gv, f in gm.mod.functions_items() if gv.name_hint != "main"})
    with bb.function("main", [*acts, *params]):
        outs = [bb.emit(relax.call_tir(gv, args, ty)) for gv, args, ty in calls]
        bb.emit_func_output(relax.Tuple(outs))
    chain = bb.get()["main"]
    mod["main"] = chain
    ex = tvm.compile(mod, target=_tvm.build_target(gm.target))
    dev = tvm.cpu(0)
    vm = tvm.relax.VirtualMachine(ex, dev)
    rng = np.random.default_rng(0)
    inputs = []
    for a in acts:
        dtype, shape = _static_shape(a.ty)
        arr = (rng.standard_normal(shape).astype(dtype) if dtype.startswith("float")
               else rng.integers(-1, 2, shape).astype(dtype))
        inputs.append(tvm.runtime.tensor(arr, dev))
    inputs += [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for _n, v in gm.params]
    vm.set_input("main", *inputs)

    def run(number: int) -> float:
        ev = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=1)
        return float(ev("main").mean)

    return run
