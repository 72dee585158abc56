"""The ``cuda.dlight`` fallback schedule: TVM's dlight rules, after working around TVM 0.27's
double-counted bias on unit reductions (:func:`fold_unit_reductions`, see the package
docstring)."""

from __future__ import annotations

from typing import Any

from .. import _tvm
from ..ops import GemmSpec
from .schedules import _require


def fold_unit_reductions(func: Any) -> Any:
    """Rewrite every reduction block whose reduction iter vars all have extent 1 into a plain
    assignment, ``buf = update(init)`` (same value; no ``init`` left).

    Works around a TVM 0.27 dlight bug (module docstring): dlight drops the unit loop but keeps
    the ``init``, and inlining the bias epilogue into such a block adds the bias twice.
    """
    tvm = _require()
    import tvm_ffi

    tirx, s_tir = tvm.tirx, tvm.s_tir

    def fold(realize: Any) -> Any:
        blk = realize.block
        init, body = blk.init, blk.body
        red = [iv for iv in blk.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        if (init is None or not red or any(int(iv.dom.extent) != 1 for iv in red)
                or not isinstance(body, tirx.BufferStore)
                or not isinstance(init, tirx.BufferStore)
                or not body.buffer.same_as(init.buffer)):
            return realize
        unit = {iv.var: iv.dom.min for iv in red}

        def own_load(load: Any) -> Any:  # the update's read of its own output: the init value
            src = load.source
            return init.value if src.same_as(body.buffer.data) or src.same_as(body.buffer) \
                else load

        def subst(x: Any) -> Any:
            return tvm_ffi.structural_map(x, [(tirx.Var, lambda v: unit.get(v, v))])

        value = subst(tvm_ffi.structural_map(body.value, [(tvm.ir.TensorLoad, own_load)]))
        keep = [(iv, v) for iv, v in zip(blk.iter_vars, realize.iter_values, strict=True)
                if iv.iter_type != tirx.IterVar.CommReduce]
        new = s_tir.SBlock(
            [iv for iv, _ in keep], [subst(r) for r in blk.reads], blk.writes, blk.name_hint,
            tirx.BufferStore(body.buffer, value, [subst(i) for i in body.indices]), None,
            blk.alloc_buffers, blk.match_buffers, blk.annotations)
        return s_tir.SBlockRealize([v for _, v in keep], realize.predicate, new)

    def drop_unused_unit_loop(loop: Any) -> Any:
        # the folded reduction's loop is left behind, bound to nothing; dlight only schedules
        # blocks whose loops match their iter vars one to one
        if not (isinstance(loop.extent, tirx.IntImm) and int(loop.extent) == 1):
            return loop
        used: list[Any] = []
        tvm_ffi.structural_walk(
            loop.body, [(tirx.Var, lambda v: used.append(v) if v.same_as(loop.loop_var)
                         else None)])
        return loop if used else loop.body

    folded = tvm_ffi.structural_map(func, [(s_tir.SBlockRealize, fold)])
    return tvm_ffi.structural_map(folded, [(tirx.For, drop_unused_unit_loop)])


def _simt_matmul() -> Any:
    """dlight's ``Matmul`` rule without its tensor-core branch.

    On a target with ``arch >= sm_70`` it schedules int8 x int8 -> int32 GEMMs with all
    extents above 64 through WMMA fragments, which TVM 0.27's ``InjectSoftwarePipeline`` then
    fails on (``GetWmmaFragmentSize``: "Check failed: it != fragment_info_.end()"), and which
    no CPU emulation could run. The rule reads the arch only for that branch, so it gets a
    pre-Volta CUDA target (the SIMT configuration depends only on the target kind).
    """
    tvm = _require()
    from tvm.s_tir import dlight as dl

    class SimtMatmul(dl.gpu.Matmul):  # type: ignore[misc, name-defined]
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            # any arch below sm_70 (without one, TVM warns and guesses sm_50)
            simt = tvm.target.Target({"kind": "cuda", "arch": "sm_61"})
            return super().apply(func, simt, tunable)

    return SimtMatmul()


def schedule_dlight(func: Any, spec: GemmSpec) -> Any:
    """TVM's rule-based default GPU schedules (``GEMV, Matmul, Reduction, Fallback``; Matmul
    without tensor cores, :func:`_simt_matmul`) under the CUDA target, on the PrimFunc with its
    unit reductions folded (:func:`fold_unit_reductions`)."""
    tvm = _require()
    from tvm.s_tir import dlight as dl

    mod = tvm.IRModule({"main": fold_unit_reductions(func)})
    with _tvm.target_info("cuda").target():
        return dl.ApplyDefaultSchedule(dl.gpu.GEMV(), _simt_matmul(), dl.gpu.Reduction(),
                                       dl.gpu.Fallback())(mod)
