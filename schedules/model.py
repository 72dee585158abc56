"""Whole-model latency: every conv/linear of a ternary model as a TVM kernel, chained with the
model's own non-GEMM ops (BatchNorm, ReLU, residual adds, pooling) in torch eager.

:func:`compile_model` swaps each exported layer of a graph module for a :class:`TvmLayer`
(activation quantizer in torch, then the layer's kernel and those of its enabled branches,
written straight into a preallocated NHWC output that the next op sees as a channels-last NCHW
tensor: no copies between layers). :func:`model_latency` checks the compiled model's logits
against the fake-quant model's on real inputs *before* timing it, then times it interleaved with
torch FP32 eager and torch INT8 (FX static quantization, fbgemm) on the same input, and breaks
the end-to-end time down per layer.

Example:
    >>> from ternbench.schedules.model import ModelCheckError
    >>> issubclass(ModelCheckError, RuntimeError)
    True
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
from ternbench.core.reference import export_activation
from torch import Tensor, nn

from . import _tvm
from .measure import build_layer

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

    from .ops import Kernel

__all__ = [
    "ModelCheckError",
    "bn_affine",
    "fold_batchnorm_nodes",
    "fold_bn_exports",
    "TvmLayer",
    "ModelLatency",
    "compile_model",
    "check_model",
    "compare_logits",
    "model_latency",
    "torch_int8_model",
    "LOGIT_RTOL",
    "MIN_TOP1_AGREEMENT",
]

log = logging.getLogger(__name__)

#: largest |logit difference| vs the fake-quant model, relative to its max |logit|. The kernels
#: are exact integer GEMMs with a float32 epilogue, but end to end a near-tie activation can
#: round to the neighbouring code in one graph and not the other and the flip propagates; real
#: kernel bugs give O(1) relative errors.
LOGIT_RTOL = 0.05
#: share of samples whose top-1 class must agree with the fake-quant model
MIN_TOP1_AGREEMENT = 0.9


class ModelCheckError(RuntimeError):
    """The TVM model's logits disagree with the fake-quant model's; it is never timed."""


class TvmLayer(nn.Module):
    """One conv/linear computed by TVM kernels: quantize (torch) -> kernel(s) -> NCHW view.

    The kernels take NHWC (conv) / [B, F] (linear) activation codes and write float32
    ``[B*Ho*Wo, N]``; branches (TRN edges) are extra kernels on the same codes, summed.
    """

    def __init__(self, lx: LayerExport, branches: list[LayerExport], batch: int,
                 target: str = "x86", float_input: bool = True) -> None:
        super().__init__()
        self.lx = lx
        self.parts = [lx, *branches]
        self.batch = batch
        self.target = target
        self.float_input = float_input
        self.folded = ""  # name of the BatchNorm folded into the epilogue, if any
        self.kernels: list[tuple[Kernel, list[Any], Tensor]] = []
        self._build()
        spec = self.kernels[0][0].spec
        self.out_hw = spec.out_hw
        # one quantize pass is shared by all parts: all take codes, or all the float input
        fin = {k.spec.float_in for k, _a, _o in self.kernels}
        if len(fin) != 1:
            raise ValueError(f"{lx.name}: branches disagree on float input")
        self.takes_float = fin.pop()
        self.impl = self.kernels[0][0].impl
        self.seconds = 0.0  # time spent in this layer (quantize + kernels), when profiling
        self.profile = False

    def _build(self) -> None:
        tvm = _tvm.require_tvm()
        self.kernels = []
        for part in self.parts:
            # ternary convs that can quantize while packing take the float input directly
            kern = build_layer(part, self.batch, self.target, float_input=self.float_input)
            if kern.spec.act_dtype != ("float32" if part.act_mode == "fp32" else "int8"):
                raise ValueError(f"{part.name}: unexpected kernel input {kern.spec.act_dtype}")
            args = [tvm.runtime.tensor(v, tvm.cpu(0)) for v in kern.pack(part)]
            out = torch.empty(kern.spec.M, kern.spec.N, dtype=torch.float32)
            self.kernels.append((kern, args, out))

    def fold_batchnorm(self, bn: nn.BatchNorm2d | nn.BatchNorm1d, name: str = "bn") -> None:
        """Fold an eval-mode BatchNorm that consumes this layer's output into the kernels'
        epilogue (per-channel scale into ``scales`` / weight offsets, shift into the primary's
        bias): one float32 rounding more, one eager op and one pass over the output less."""
        parts = fold_bn_exports(self.parts, bn, name)
        self.parts = parts
        self.lx = parts[0]
        self.folded = name
        self._build()

    def _codes(self, x: Tensor) -> Tensor:
        lx = self.lx
        if self.takes_float:  # the kernel quantizes while packing its bit-planes
            a = x.to(torch.float32).permute(0, 2, 3, 1)
            return a if a.is_contiguous() else a.contiguous()
        if lx.act_mode == "fp32":
            a = x.to(torch.float32)
        else:  # the export's rule in the input's dtype (float32: exactly as ActQuantizer)
            a = export_activation(lx, x).to(torch.int8)
        if lx.op == "conv2d":
            a = a.permute(0, 2, 3, 1)  # a channels-last tensor gives a contiguous NHWC view
        else:
            a = a.reshape(a.shape[0], -1)
        return a if a.is_contiguous() else a.contiguous()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] != self.batch:
            raise ValueError(f"{self.lx.name}: compiled for batch {self.batch}, got {x.shape[0]}")
        t0 = time.perf_counter() if self.profile else 0.0
        a = self._codes(x)
        y: Tensor | None = None
        for kern, args, out in self.kernels:
            kern.func(a, *args, out)
            y = out if y is None else y + out
        assert y is not None
        if self.lx.op == "conv2d":
            ho, wo = self.out_hw
            y = y.view(self.batch, ho, wo, -1).permute(0, 3, 1, 2)  # NCHW, channels-last strides
        if self.profile:
            self.seconds += time.perf_counter() - t0
        return y

    def extra_repr(self) -> str:
        fold = f" + {self.folded}" if self.folded else ""
        return f"{self.lx.name}: {self.impl} x{len(self.kernels)}{fold}"


def bn_affine(bn: nn.BatchNorm2d | nn.BatchNorm1d, name: str = "bn"
              ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel, float64, of an eval-mode BatchNorm: ``y = scale*x + shift``."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError(f"{name}: BatchNorm without running statistics cannot be folded")
    ones = torch.ones(bn.num_features, dtype=torch.float64)
    gamma = bn.weight.detach().double() if bn.affine else ones
    beta = bn.bias.detach().double() if bn.affine else 0.0 * ones
    g = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shift = beta - bn.running_mean.detach().double() * g
    return g.numpy(), np.asarray(shift, dtype=np.float64) * np.ones(bn.num_features)


def fold_batchnorm_nodes(gm: torch.fx.GraphModule, is_layer: Callable[[nn.Module], bool],
                         fold: Callable[[nn.Module, nn.BatchNorm2d | nn.BatchNorm1d, str], None]
                         ) -> int:
    """Fold every eval BatchNorm (with running statistics) that is the only consumer of a
    layer (``is_layer``) into it: ``fold(layer, bn, bn_name)``, then the BatchNorm node is
    removed from the graph. Returns how many were folded (the graph is recompiled)."""
    mods = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        layer = mods.get(node.target) if node.op == "call_module" else None
        if layer is None or not is_layer(layer):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn = mods.get(users[0].target)
        if not isinstance(bn, nn.BatchNorm2d | nn.BatchNorm1d) or bn.training:
            continue
        if not bn.track_running_stats or bn.running_var is None:
            continue
        fold(layer, bn, str(users[0].target))
        users[0].replace_all_uses_with(node)
        gm.graph.erase_node(users[0])
        folded += 1
    gm.graph.lint()
    gm.recompile()
    return folded


def fold_bn_exports(parts: list[LayerExport], bn: nn.BatchNorm2d | nn.BatchNorm1d,
                    name: str = "bn") -> list[LayerExport]:
    """The exports of a layer (primary first, then its branches) with an eval-mode BatchNorm
    that consumes the layer's output folded in: per-channel scale into ``scales`` (or the
    fp32 weights) and weight offsets, shift into the primary's bias."""
    gn, sn = bn_affine(bn, name)
    out = []
    for i, p in enumerate(parts):
        if p.out_channels != len(gn):
            raise ValueError(f"{name}: {len(gn)} channels after {p.name} "
                             f"({p.out_channels} outputs)")
        bias = np.zeros(len(gn)) if p.bias is None else np.asarray(p.bias, np.float64)
        bias = bias * gn + (sn if i == 0 else 0.0)
        repl: dict[str, Any] = {"bias": bias.astype(np.float32)}
        if p.weight_format == "fp32":  # the codes are the weights
            repl["codes"] = (np.asarray(p.codes, np.float64) * gn[:, None]).astype(np.float32)
        else:
            repl["scales"] = (np.asarray(p.scales, np.float64) * gn[:, None]).astype(
                np.float32)
            repl["scale_bits"] = 32
        if p.weight_offset is not None:
            repl["weight_offset"] = (np.asarray(p.weight_offset, np.float64) * gn).astype(
                np.float32)
        out.append(dataclasses.replace(p, **repl))
    return out


def compile_model(graph: nn.Module, exports: Mapping[str, LayerExport], *, batch: int,
                  target: str = "x86", fold_bn: bool = True,
                  float_input: bool = True) -> nn.Module:
    """A copy of ``graph`` whose conv/linear layers named in ``exports`` are :class:`TvmLayer`.

    ``graph`` is the fake-quant module or the float architecture with the quantized model's
    non-GEMM state loaded (BatchNorm statistics etc.); every conv/linear of it must have an
    export. Branch exports (``branch_of``) that are enabled join their layer. With ``fold_bn``
    the model is traced (torch.fx) and every BatchNorm that is the only consumer of a layer's
    output is folded into that layer's epilogue (see :meth:`TvmLayer.fold_batchnorm`); a model
    that cannot be traced runs unfolded. With ``float_input`` the ternary-activation convs
    whose kernels can quantize while packing (:attr:`.ops.GemmSpec.pixel_bits`) take the float
    input directly (no quantize pass in torch).
    """
    from ternbench.methods import swap_layers

    m = copy.deepcopy(graph).eval()
    missing: list[str] = []

    def make(name: str, mod: nn.Module, pos: str) -> nn.Module | None:
        lx = exports.get(name)
        if lx is None:
            missing.append(name)
            return None
        branches = [b for b in exports.values() if b.branch_of == name and b.enabled]
        return TvmLayer(lx, branches, batch, target, float_input=float_input)

    swap_layers(m, make)
    if missing:
        raise ValueError(f"no export for layers {missing}: cannot run the model through TVM")
    return _fold_batchnorms(m) if fold_bn else m


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, TvmLayer) or super().is_leaf_module(m, qualname)


def _fold_batchnorms(m: nn.Module) -> nn.Module:
    """Trace ``m`` and fold each BatchNorm fed only by a TvmLayer into it (see compile_model)."""
    try:
        graph = _Tracer().trace(m)
    except Exception as exc:  # data-dependent control flow etc.: run the model as it is
        log.info("model not traceable (%s): BatchNorm runs unfolded", exc)
        return m
    gm = torch.fx.GraphModule(m, graph)
    def fold(layer: nn.Module, bn: nn.BatchNorm2d | nn.BatchNorm1d, name: str) -> None:
        assert isinstance(layer, TvmLayer)
        layer.fold_batchnorm(bn, name)

    folded = fold_batchnorm_nodes(gm, lambda mod: isinstance(mod, TvmLayer), fold)
    gm.delete_all_unused_submodules()  # the folded BatchNorms
    log.debug("folded %d BatchNorm layers into TVM epilogues", folded)
    return gm

@dataclass(frozen=True)
class ModelCheck:
    """How the TVM model's logits compare with the fake-quant model's on real inputs."""

    samples: int
    max_abs_diff: float
    rel_diff: float  # max |diff| / max |reference logit|
    top1_agreement: float


def check_model(tvm_model: nn.Module, x: Tensor, ref_logits: Tensor) -> ModelCheck:
    """Run ``tvm_model`` on ``x`` in chunks of its batch and compare with ``ref_logits``.

    Raises :class:`ModelCheckError` past :data:`LOGIT_RTOL` or under
    :data:`MIN_TOP1_AGREEMENT`.
    """
    batch = _batch_of(tvm_model)
    n = (x.shape[0] // batch) * batch
    if n == 0:
        raise ValueError(f"need at least {batch} check samples, got {x.shape[0]}")
    outs = []
    with torch.inference_mode():
        for i in range(0, n, batch):
            outs.append(tvm_model(x[i:i + batch].contiguous(
                memory_format=torch.channels_last)).clone())
    return compare_logits(torch.cat(outs), ref_logits[:n], "TVM model")


def compare_logits(got: Tensor | np.ndarray, ref: Tensor | np.ndarray,
                   what: str = "TVM model", *, strict: bool = True) -> ModelCheck:
    """Compare deployed logits with the fake-quant model's (same samples, same order).

    Raises :class:`ModelCheckError` past :data:`LOGIT_RTOL` or under
    :data:`MIN_TOP1_AGREEMENT`; with ``strict=False`` (models with seeded random weights, whose
    near-threshold code flips grow through deep nets and whose near-tied logits flip top-1 under
    a small gap) only when both fail: a gap within :data:`LOGIT_RTOL` or the top-1 agreement
    passes, and the failed half is logged as a warning and left in the returned figures.
    """
    g = torch.as_tensor(np.asarray(got)).to(torch.float64)
    r = torch.as_tensor(np.asarray(ref)).to(torch.float64)
    if g.shape != r.shape:
        raise ModelCheckError(f"{what}: logits of shape {tuple(g.shape)}, fake-quant model "
                              f"gives {tuple(r.shape)}")
    n = int(g.shape[0])
    diff = float((g - r).abs().max())
    scale = float(r.abs().max()) or 1.0
    agree = float((g.argmax(1) == r.argmax(1)).double().mean())
    res = ModelCheck(samples=n, max_abs_diff=diff, rel_diff=diff / scale, top1_agreement=agree)
    msg = (f"{what} disagrees with the fake-quant model on {n} samples: max |dlogit| = "
           f"{diff:.3g} ({res.rel_diff:.2%} of max |logit|, limit {LOGIT_RTOL:.0%}), top-1 "
           f"agreement {agree:.1%} (limit {MIN_TOP1_AGREEMENT:.0%})")
    close, agrees = res.rel_diff <= LOGIT_RTOL, agree >= MIN_TOP1_AGREEMENT
    if not (close and agrees) and (strict or not (close or agrees)):
        raise ModelCheckError(msg)
    if not (close and agrees):
        log.warning("%s (accepted: not strict)", msg)
    return res


def _batch_of(m: nn.Module) -> int:
    for mod in m.modules():
        if isinstance(mod, TvmLayer):
            return mod.batch
    raise ValueError("model has no TvmLayer (compile it with compile_model)")


class _FloatPReLU(nn.Module):
    """PReLU that torch's FX quantization leaves in float (dequantize -> prelu -> quantize)."""

    def __init__(self, mod: nn.PReLU) -> None:
        super().__init__()
        self.weight = nn.Parameter(mod.weight.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.prelu(x, self.weight)


class _FloatBatchNorm(nn.Module):
    """An inference BatchNorm that torch's FX quantization leaves in float."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        b = self.bn
        return torch.nn.functional.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias,
                                              False, 0.0, b.eps)


def _float_islands(m: nn.Module) -> int:
    """Swap the layers fbgemm quantizes badly for float ones, in place; returns how many.

    Why: torch's quantized PReLU and a BatchNorm that does not follow a conv (so it is not
    folded) lose most of the accuracy: on ``sttn_resnet8`` (BN -> Hardtanh -> conv -> BN -> add
    -> PReLU) the INT8 model agreed with its FP32 model on 14% of test images, 95% with these
    two kept in float (dequantize/quantize around them, which its latency then includes).
    """
    gm = torch.fx.symbolic_trace(m)
    mods = dict(m.named_modules())
    swaps: list[tuple[str, nn.Module]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = mods[str(node.target)]
        if isinstance(mod, nn.PReLU):
            swaps.append((str(node.target), _FloatPReLU(mod)))
        elif isinstance(mod, nn.BatchNorm2d):
            prev = node.args[0]
            folded = (isinstance(prev, torch.fx.Node) and prev.op == "call_module"
                      and isinstance(mods[str(prev.target)], nn.Conv2d) and len(prev.users) == 1)
            if not folded:
                swaps.append((str(node.target), _FloatBatchNorm(mod)))
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, child, new)
    return len(swaps)


def torch_int8_model(fp32: nn.Module, calib: Tensor) -> nn.Module:
    """Torch's own INT8 deployment of ``fp32``: FX graph-mode static quantization (fbgemm,
    per-channel int8 weights, uint8 activations), calibrated on ``calib``. PReLU and BatchNorm
    layers that are not folded into a conv stay in float (:func:`_float_islands`)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    m = copy.deepcopy(fp32).eval()
    n_float = _float_islands(m)
    if n_float:
        log.info("torch INT8 baseline: %d PReLU/unfolded BatchNorm layers kept in float", n_float)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not installed
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\.")
        prev = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            prepared = prepare_fx(m, get_default_qconfig_mapping("fbgemm"), (calib[:1],))
            with torch.inference_mode():
                prepared(calib)
            return convert_fx(prepared)
        finally:
            torch.backends.quantized.engine = prev


@dataclass
class ModelLatency:
    """End-to-end latency of one model, TVM vs torch, measured side by side (medians, us)."""

    tvm_us: float
    torch_fp32_us: float
    torch_int8_us: float | None
    batch: int
    threads: int
    check: ModelCheck
    per_layer_us: dict[str, float] = field(default_factory=dict)  # quantize + kernels
    impls: dict[str, str] = field(default_factory=dict)
    raw: dict[str, list[float]] = field(default_factory=dict)

    @property
    def other_us(self) -> float:
        """Non-GEMM ops (torch eager) and call overhead: end to end minus the layers (the layer
    split is a mean over the timed calls, the end-to-end figure a median)."""
        return self.tvm_us - sum(self.per_layer_us.values())


def _per_call(fn: Callable[[], Any], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def _calls_for(fn: Callable[[], Any], min_ms: float) -> int:
    """Calls per repeat so that one repeat lasts about ``min_ms`` (as time_evaluator does)."""
    fn()
    per = max(_per_call(fn, 1), 1e-7)
    return max(1, int(min_ms / 1e3 / per) + 1)


def model_latency(tvm_model: nn.Module, fp32_model: nn.Module, x_check: Tensor,
                  ref_logits: Tensor, *, threads: int = 1, repeat: int = 15,
                  min_repeat_ms: float = 100.0, int8: bool = True) -> ModelLatency:
    """Check ``tvm_model`` against the fake-quant logits, then time it beside torch.

    Rounds are interleaved (TVM, torch FP32 eager, torch INT8, TVM, ...) on the same input, the
    first check sample(s) at the compiled batch; each figure is the median of ``repeat``
    per-call means. The same TVM calls record the time spent in each layer.
    """
    check = check_model(tvm_model, x_check, ref_logits)
    batch = _batch_of(tvm_model)
    x = x_check[:batch].contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fp32 = copy.deepcopy(fp32_model).eval()
    q8 = torch_int8_model(fp32, x_check) if int8 else None
    prev_torch, prev_tvm = torch.get_num_threads(), _tvm.num_threads()
    runs: dict[str, Callable[[], Any]] = {
        "tvm": lambda: tvm_model(x_cl),
        "torch_fp32": lambda: fp32(x),
    }
    if q8 is not None:
        runs["torch_int8"] = lambda: q8(x)
    raw: dict[str, list[float]] = {k: [] for k in runs}
    layers = [m for m in tvm_model.modules() if isinstance(m, TvmLayer)]
    calls = 0
    try:
        torch.set_num_threads(threads)
        _tvm.set_num_threads(threads)
        with torch.inference_mode():
            numbers = {k: _calls_for(fn, min_repeat_ms) for k, fn in runs.items()}
            # the per-layer split comes from the very calls that are timed end to end (two
            # perf_counter reads per layer: well under a microsecond)
            for m in layers:
                m.seconds, m.profile = 0.0, True
            for _ in range(repeat):
                for k, fn in runs.items():
                    raw[k].append(_per_call(fn, numbers[k]) * 1e6)
                calls += numbers["tvm"]
    finally:
        for m in layers:
            m.profile = False
        torch.set_num_threads(prev_torch)
        _tvm.set_num_threads(prev_tvm)
    med = {k: float(statistics.median(v)) for k, v in raw.items()}
    per_layer = {m.lx.name: m.seconds / max(calls, 1) * 1e6 for m in layers}
    log.info("model batch %d, %d thread(s): tvm %.0f us, torch fp32 %.0f us, torch int8 %s us",
             batch, threads, med["tvm"], med["torch_fp32"],
             f"{med['torch_int8']:.0f}" if "torch_int8" in med else "-")
    return ModelLatency(
        tvm_us=med["tvm"], torch_fp32_us=med["torch_fp32"],
        torch_int8_us=med.get("torch_int8"), batch=batch, threads=threads, check=check,
        per_layer_us=per_layer, impls={m.lx.name: m.impl for m in layers},
        raw={k: [float(v) for v in vs] for k, vs in raw.items()})
