"""Portable schedules: plain loop transformations that compile for any LLVM CPU target.

Same function names as the per-target modules (``rules()``), in the style of TVM dlight: the
measurement picks the first applicable rule of the target's module and falls back to these
rules, logging "not optimized for <target>".

The one schedule (:func:`schedule_blocked`) serves every format: the weights are stored blocked
``[N/NB, K, NB]`` (2-bit codes decoded inline for ternary), the NB output channels of a block are
one vector, ``MB`` rows share each weight load, and the per-group epilogue is fused under the
group loop so no ``[M, G, N]`` accumulator is ever written to memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _tvm
from .ops import GemmSpec, Rule, plan_gemm

if TYPE_CHECKING:
    from ternbench.methods._base import LayerExport

__all__ = ["rules", "schedule_blocked", "schedule_input_stage", "NB", "MB", "ROWS_PER_TASK"]

# Tile constants (hand-picked, not tuned): NB = 8 lanes is one 256-bit vector of int32/fp32
# (two 128-bit ones on SSE/NEON); MB = 4 rows reuse every decoded weight vector 4 times while
# the 4 x NB accumulator tile still fits in registers; a parallel task covers up to 64 rows.
NB = 8
MB = 4
ROWS_PER_TASK = 64


def _vector_split(sch: Any, loop: Any, extent: int) -> None:
    """Vectorise the innermost copy loop in chunks of up to 32 lanes (when they divide it)."""
    lanes = next((v for v in (32, 16, 8, 4) if extent % v == 0), 0)
    if lanes:
        sch.vectorize(sch.split(loop, [None, lanes])[-1])


def schedule_input_stage(sch: Any, spec: GemmSpec) -> None:
    """Schedule the stages before the GEMM (materialised at the root, parallel over rows).

    ``X_pad``: parallel over (batch, row), vectorised over C. ``A_in`` of a conv: M split into
    (batch*Ho, Wo) and K into its three factors, so every index is affine and the bounds checks
    are gone (they live in ``X_pad``); the C loop is vectorised in (kh, kw, C) order.
    """
    if not spec.has_input_stage:
        return
    if spec.op == "conv2d":
        c = spec.in_shape[0]
        (kh, kw), (ph, pw) = spec.kernel, spec.padding
        if ph or pw:
            b, y, _z, ch = sch.get_loops(sch.get_sblock("X_pad"))
            sch.parallel(sch.fuse(b, y))
            _vector_split(sch, ch, c)
        m, k = sch.get_loops(sch.get_sblock("A_in"))
        rows, _cols = sch.split(m, [None, spec.out_hw[1]])
        if spec.Kp == spec.K:  # a padded K has no perfect factorisation; left as one loop
            if spec.k_order == "ijc":
                _i, _j, ch = sch.split(k, [kh, kw, c])
                _vector_split(sch, ch, c)
            else:
                _ch, i, j = sch.split(k, [c, kh, kw])
                sch.unroll(i)
                sch.unroll(j)
        if spec.M > spec.out_hw[1]:
            sch.parallel(rows)
        return
    m, k = sch.get_loops(sch.get_sblock("A_in"))
    if spec.M > 1:
        sch.parallel(m)
    if spec.Kp == spec.K:
        _vector_split(sch, k, spec.K)


def schedule_blocked(func: Any, spec: GemmSpec) -> Any:
    """Blocked GEMM schedule for the ``t2_blocked`` and ``dense_blocked`` layouts.

    Loop nest ``(task=(mp, no) parallel | mo | g | k... | mi unrolled | ni vectorised)``; the
    epilogue ``ep`` (sum over groups of scale * acc) is computed at ``g`` into a local
    MB x NB tile, and ``out`` (+ bias) at ``mo``.
    """
    tvm = _tvm.require_tvm()
    sch = tvm.s_tir.Schedule(func)
    acc, ep, out = (sch.get_sblock(n) for n in ("acc", "ep", "out"))
    m, g, n, kk = sch.get_loops(acc)
    mp, mo, mi = sch.split(m, [None, spec.m_task, spec.mb])
    no, ni = sch.split(n, [None, spec.nb])
    red = [kk]
    if spec.layout == "t2_blocked" and spec.gs % 4 == 0:
        # k % 4 becomes the unrolled loop index: constant shifts for the 2-bit decode
        red = list(sch.split(kk, [None, 4]))
    sch.reorder(mp, no, mo, g, *red, mi, ni)
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(ep, g)
    sch.set_scope(ep, 0, "local")
    sch.reverse_compute_at(out, mo)
    sch.unroll(mi)
    if len(red) == 2:
        sch.unroll(red[1])
    sch.vectorize(ni)
    sch.vectorize(sch.get_loops(ep)[-1])
    if spec.N % spec.nb == 0:  # else the last block is predicated and cannot be vectorised
        sch.vectorize(sch.get_loops(out)[-1])
    # parallel/vectorize check the subtree's dataflow, which decomposed reductions (blocks
    # without init) fail, so every loop annotation comes before decompose_reduction
    sch.parallel(sch.fuse(mp, no))
    schedule_input_stage(sch, spec)
    acc_init = sch.decompose_reduction(acc, red[0])
    ep_init = sch.decompose_reduction(ep, g)
    sch.vectorize(sch.get_loops(acc_init)[-1])
    sch.vectorize(sch.get_loops(ep_init)[-1])
    return sch.mod


def _applies_t2(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return lx.weight_format == "ternary" and lx.act_mode in ("int", "fp32")


def _applies_int8(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return lx.weight_format == "int8" and lx.act_mode in ("int", "fp32")


def _applies_fp32(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return lx.weight_format == "fp32" and lx.act_mode in ("int", "fp32")


def _plan(layout: Any) -> Any:
    def plan(lx: LayerExport, batch: int, target: _tvm.TargetInfo) -> GemmSpec:
        return plan_gemm(lx, batch, layout, nb=NB, mb_max=MB, rows_per_task=ROWS_PER_TASK)

    return plan


def rules() -> list[Rule]:
    """Portable rules, one per weight format (always applicable to a supported layer)."""
    return [
        Rule("generic.t2", "tvm_t2_generic", _applies_t2, _plan("t2_blocked"), schedule_blocked),
        Rule("generic.int8", "tvm_int8", _applies_int8, _plan("dense_blocked"), schedule_blocked),
        Rule("generic.fp32", "tvm_fp32", _applies_fp32, _plan("dense_blocked"), schedule_blocked),
    ]
