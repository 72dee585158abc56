"""CUDA schedules: hand-written split-K GEMV and thread-tiled GEMM nests, dlight as fallback.

Same function name as the other target modules (``rules()``). :func:`.measure.select_rule`
has no generic fallback for CUDA (the generic rules are CPU loop nests), so these rules cover
every format a layer can have: ternary weights with int8 / fp32 / ternary activations and dense
int8 / fp32 weights, conv2d and linear, any group size. The TE computes are those of
:mod:`.ops`, unchanged (same packed weights and runtime arguments as on the CPU); only the
schedules differ:

* **split-K** (``M <= GEMV_MAX_M`` rows, e.g. batch-1 linears): a thread block owns ``nb``
  output channels (``threadIdx.x``) of one row (``blockIdx.y``); ``ks`` threads
  (``threadIdx.y``) each reduce an interleaved slice of the reduction (one group: the ``k``
  loop; several groups: whole groups, each finished with its scale in the thread), and a
  cross-thread reduction (``rfactor`` + a reduction loop bound to ``threadIdx.y``, lowered by
  TVM through shared memory) combines the partial sums. Adjacent threads read adjacent bytes of
  the ``[N/nb, K/4, nb]`` packed weights, so a warp's loads are coalesced.
* **tiled** (larger M: convs, batched linears): a thread block computes a ``rows x nb`` output
  tile; thread ``(ty, tx)`` owns ``mb`` rows and ``nb / 32`` adjacent channels, accumulates
  each group in registers and applies the group's scale at once: the CPU nest of
  :func:`.generic.schedule_gemm` with threads instead of parallel/vector loops. With one group,
  the activation and weight tiles of each K step (up to 32 deep; ternary x ternary: 4 words)
  are staged in shared memory by all threads of the block, and a conv's im2col (and zero
  padding) is inlined into that copy (implicit GEMM): it never goes to global memory.
* **stages** that stay kernels of their own (im2col of grouped convs, the ternary activations'
  bit-planes ``A_bits``, the row sums ``asum`` and then ``out`` of weight-offset layers): one
  thread per output element, any reduction serial inside the thread.

``cuda.dlight`` (``tvm.s_tir.dlight``: ``GEMV, Matmul, Reduction, Fallback``) is the last rule
and accepts every layer. TVM 0.27's dlight mis-schedules the single-group epilogue of these
PrimFuncs: ``normalize_prim_func`` drops the unit group loop of ``ep`` but keeps its ``init``,
then ``reverse_compute_inline(out)`` adds ``+ bias`` to both the init and the update (the bias
counted twice). :func:`fold_unit_reductions` rewrites such reductions into plain assignments
first; dlight's ``GEMV`` / ``Matmul`` rules then match single-group layers, ``Fallback`` (one
thread per output, the reduction serial) the others.

TVM keeps the device code as CUDA C in the built module and compiles it (NVRTC by default,
``TVM_CUDA_COMPILE_MODE=nvcc`` for nvcc) when the module is first loaded on a GPU;
:func:`compile_kernel` does that compilation without a GPU.

Checking without a GPU (``docs/cuda.md``): :func:`serial_equivalent` turns a scheduled module
into the same loop nest with every thread-bound loop serial, which builds for the host CPU and
computes what the GPU kernel must compute (thread binding only changes *who* runs an
iteration); :func:`poison_thread_storage` makes each thread's registers start as garbage, as on
a GPU, and :func:`schedule_errors` checks statically what serial execution cannot see (buffers
shared across kernels, blocks bound to no thread). :func:`emulate_layer` runs all of it against
the reference. TVM's GPU lowering (cross-thread reductions, barriers) and the kernels' numbers
on a device are checked by the ``gpu`` tests.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from . import _tvm
from .ops import GemmSpec, Params, Rule, gemm_compute, pack_weight_args, plan_gemm

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

__all__ = [
    "rules",
    "schedule_t2",
    "schedule_splitk",
    "schedule_tiled",
    "schedule_dlight",
    "fold_unit_reductions",
    "serial_equivalent",
    "poison_thread_storage",
    "schedule_errors",
    "emulate_layer",
    "kernel_source",
    "compile_kernel",
    "compiler_unavailable_reason",
    "cuda_toolkit_root",
    "ensure_cuda_path",
    "export_gpu_bundle",
    "GEMV_MAX_M",
]

log = logging.getLogger(__name__)

#: rows up to which a GEMM is scheduled as a split-K GEMV (each row its own blockIdx.y)
GEMV_MAX_M = 8
#: threads per block of the split-K kernel: nb output channels x ks reduction slices
SPLITK_THREADS = 256
#: threads per block of the one-thread-per-element stage kernels
STAGE_THREADS = 256
#: threads along the output channels of the tiled kernel (one warp)
WARP = 32
#: CUDA's limit of threads per block
MAX_THREADS = 1024
#: arch of :func:`export_gpu_bundle` (the H100 the project's GPU checks run on)
DEFAULT_BUNDLE_ARCH = "sm_90"
#: depth of the shared-memory K step of the tiled kernel, in reduction elements (k, or uint64
#: words for the ternary x ternary bit-planes); halved (twice at most) until it divides K
STAGE_K = 32
STAGE_K_WORDS = 4

# Defaults (hand-picked, untuned; the grids list what a per-shape search may try). split-K:
# 16 channels x 16 K-slices per block. tiled: a 64-channel x 32-row block tile, 2 x 2 outputs
# per thread (256 threads, 4 accumulators each).
GEMV_DEFAULT: dict[str, int] = {"nb": 16}
TILED_DEFAULT: dict[str, int] = {"nb": 64, "mb": 2, "rows": 32}
#: names of the GEMM's operand buffers in the ``acc`` block (see :func:`.ops.gemm_compute`)
_ACT_BUFFERS = ("X", "A_in", "A_bits")
_WEIGHT_BUFFERS = ("Wp", "W", "Wm", "Ws")


def _require() -> Any:
    return _tvm.require_tvm()


def _extent(sch: Any, loop: Any) -> int:
    return int(sch.get(loop).extent)


def _has_block(sch: Any, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # tvm raises a generic error for a missing block name
        return False
    return True


def _n_spatial(sch: Any, block: Any) -> int:
    """Number of data-parallel iter vars of a block (a root stage's leading loops)."""
    tvm = _require()
    return sum(1 for iv in sch.get(block).iter_vars
               if iv.iter_type == tvm.tirx.IterVar.DataPar)


def _byte_split(spec: GemmSpec, extent: int) -> int:
    """Innermost reduction factor, unrolled: 4 for 2-bit codes (``k % 4`` becomes a constant
    shift), 1 otherwise."""
    return 4 if spec.layout in ("t2_blocked", "t2_decoded") and extent % 4 == 0 else 1


def _check_threads(n: int) -> None:
    if n > MAX_THREADS:  # the launch would fail on the GPU, not at build time
        raise ValueError(f"{n} threads per block exceed CUDA's {MAX_THREADS}; use smaller tiles")


def _fused_out(spec: GemmSpec) -> bool:
    """``out`` moves under the GEMM's thread loop only when ``ep`` is its single producer
    (a weight offset adds ``asum``, see :func:`.generic.schedule_gemm`); otherwise ``out``
    is a kernel of its own and ``ep`` stays in global memory."""
    return not spec.w_off


# ----------------------------------------------------------------------------- stage kernels


def _bind_elementwise(sch: Any, block: Any, threads: int = STAGE_THREADS) -> None:
    """One thread per spatial point of a root block: its spatial loops fused and split over
    ``blockIdx.x`` x ``threadIdx.x``; reduction loops (bit packing, row sums) stay serial."""
    loops = sch.get_loops(block)
    ns = _n_spatial(sch, block)
    fused = sch.fuse(*loops[:ns]) if ns > 1 else loops[0]
    bx, tx = sch.split(fused, [None, min(threads, _extent(sch, fused))])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _is_reduction(sch: Any, block: Any) -> bool:
    return _n_spatial(sch, block) < len(sch.get(block).iter_vars)


def _schedule_stages(sch: Any) -> None:
    """Bind every root-level stage the GEMM schedule left unbound (im2col ``X_pad`` /
    ``A_in``, the bit-planes ``X_bits`` / ``A_bits``, ``asum``, an unfused ``out``: whatever
    :mod:`.ops` materialises, found by structure rather than by name) as a one-thread-per-
    element kernel, and split their reductions into init + update."""
    tirx = _require().tirx
    reductions = []
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(blk)
        if not loops or any(sch.get(lp).kind == tirx.ForKind.THREAD_BINDING for lp in loops):
            continue  # a GEMM nest (bound) or a loop-less scalar block
        red = _is_reduction(sch, blk)
        # a per-row reduction (asum: K/64 words) on fewer threads per block than a stage with
        # one output per thread
        _bind_elementwise(sch, blk, threads=64 if red and _n_spatial(sch, blk) == 1
                          else STAGE_THREADS)
        if red:
            reductions.append(blk)
    for blk in reductions:
        sch.decompose_reduction(blk, sch.get_loops(blk)[2])  # (bx, tx, reduction...)


# ----------------------------------------------------------------------------- split-K GEMV


def _splitk_threads(spec: GemmSpec, red_extent: int, divide: bool) -> int:
    """Reduction slices per output: the block's thread budget over ``nb``, at most the
    reduction length (with ``divide``: a divisor of it, see :func:`schedule_splitk`)."""
    ks = max(1, min(SPLITK_THREADS // spec.nb, red_extent))
    if divide:
        while red_extent % ks:
            ks -= 1
    return ks


def schedule_splitk(func: Any, spec: GemmSpec) -> Any:
    """Split-K GEMV for few rows (see the module docstring).

    One group: ``acc``'s reduction ``kk`` is split ``(ko, kt, ki)`` with ``kk = (ko * ks + kt) *
    ki_len + ki``; ``rfactor(kt)`` gives each thread its partial sum in a register, and
    ``acc`` then reduces the ``ks`` partials across ``threadIdx.y``. Several groups: the same
    on ``ep``'s group loop, with ``acc`` (one group's dot product) computed in registers right
    where its scale is applied. ``ep`` / ``out`` follow at the thread's output channel.
    """
    tvm = _require()
    sch = tvm.s_tir.Schedule(func)
    acc, ep, out = (sch.get_sblock(n) for n in ("acc", "ep", "out"))
    if spec.G == 1:
        _m, _g, n, kk = sch.get_loops(acc)
        kki = _byte_split(spec, _extent(sch, kk))
        ks = _splitk_threads(spec, -(-_extent(sch, kk) // kki), divide=False)
        _ko, kt, _ki = sch.split(kk, [None, ks, kki])
        _bx, tx = sch.split(n, [None, spec.nb])
        sch.reorder(tx, kt, _ko, _ki)
        partial, red_block = sch.rfactor(kt, 0), acc
        # rfactor leaves the partial block in the original nest: (m, g=1, bx, tx, kt, ko, ki)
        by, _g1, bx, tx, kt, ko, ki = sch.get_loops(partial)
        if kki > 1:
            sch.unroll(ki)
    else:
        _m, n, g = sch.get_loops(ep)
        # a predicated group split makes the partial block's bindings non-affine, which
        # decompose_reduction refuses: ks divides G
        ks = _splitk_threads(spec, spec.G, divide=True)
        _go, gt = sch.split(g, [None, ks])
        _bx, tx = sch.split(n, [None, spec.nb])
        sch.reorder(tx, gt, _go)
        partial, red_block = sch.rfactor(gt, 0), ep
        by, bx, tx, kt, ko = sch.get_loops(partial)
    depth = len(sch.get_loops(partial)) - (3 if spec.G == 1 else 2)  # loops down to tx
    _check_threads(spec.nb * ks)
    sch.bind(by, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.bind(kt, "threadIdx.y")
    sch.set_scope(partial, 0, "local")
    if spec.G > 1:
        # one group's dot product in registers, right where its scale is applied
        sch.compute_at(acc, ko, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
        kk = sch.get_loops(acc)[-1]
        kki = _byte_split(spec, _extent(sch, kk))
        if kki > 1:
            sch.unroll(sch.split(kk, [None, kki])[1])
    # the cross-thread reduction of the ks partials: without unit loops, its reduction loop is
    # the only loop under tx (TVM requires it innermost); binding any other loop to threadIdx.y
    # would read other threads' registers
    sch.reverse_compute_at(red_block, tx, preserve_unit_loops=False)
    red_loops = sch.get_loops(red_block)[depth:]
    if len(red_loops) != (ks > 1) or (ks > 1 and _extent(sch, red_loops[0]) != ks):
        raise RuntimeError(f"split-K: expected only the {ks}-way reduction loop under "
                           f"threadIdx.x, got {len(red_loops)} loops")
    if ks > 1:
        sch.bind(red_loops[0], "threadIdx.y")
    fuse = _fused_out(spec)
    if spec.G == 1:
        sch.set_scope(acc, 0, "local")
        sch.reverse_compute_at(ep, tx, preserve_unit_loops=True)
    if fuse:
        sch.set_scope(ep, 0, "local")
        sch.reverse_compute_at(out, tx, preserve_unit_loops=True)
    if spec.G > 1:
        sch.decompose_reduction(acc, sch.get_loops(acc)[-2 if kki > 1 else -1])
    sch.decompose_reduction(partial, ko)
    _schedule_stages(sch)
    return sch.mod


# ----------------------------------------------------------------------------- tiled GEMM


def _read_index(sch: Any, block: Any, names: tuple[str, ...]) -> list[int]:
    """Positions of ``block``'s read regions whose buffer is one of ``names``."""
    return [i for i, r in enumerate(sch.get(block).reads) if r.source.name in names]


def _cooperative_copy(sch: Any, block: Any, depth: int, ty_extent: int, tx_extent: int
                      ) -> None:
    """Spread a shared-memory copy block (its loops below ``depth``) over all threads of the
    thread block: the inner bindings coincide with the kernel's own ``threadIdx`` loops."""
    loops = sch.get_loops(block)[depth:]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _o, ty, tx = sch.split(fused, [None, ty_extent, tx_extent])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def _stage_operands(sch: Any, acc: Any, ko: Any, depth: int, ty_extent: int, tx_extent: int
                    ) -> None:
    """Copy the activation and weight tiles of each K step into shared memory at ``ko`` (the
    ``depth``-th loop of ``acc``); a conv's ``A_in`` (and ``X_pad``) is inlined into the
    activation copy."""
    act = _read_index(sch, acc, _ACT_BUFFERS)
    weights = _read_index(sch, acc, _WEIGHT_BUFFERS)
    # only the GEMM reads the copies (asum reads A_bits too, outside the tile loops)
    copies = [sch.cache_read(acc, i, "shared", consumer_blocks=[acc]) for i in act + weights]
    for blk in copies:
        sch.compute_at(blk, ko)
    # the gathers feeding the activation copy (im2col with its zero padding, the bit-plane
    # word gather) run inside it, reading X (or the packed X_bits) directly
    for name in ("A_in", "X_pad", "A_bits"):
        if _has_block(sch, name) and not _is_reduction(sch, sch.get_sblock(name)):
            sch.compute_inline(sch.get_sblock(name))
    for blk in copies:
        _cooperative_copy(sch, blk, depth, ty_extent, tx_extent)


def schedule_tiled(func: Any, spec: GemmSpec) -> Any:
    """Thread-tiled GEMM (see the module docstring): loop nest
    ``(bx: rows, by: channels) | (ty, tx) | g | ko | kr | ki | mr | nr`` with the accumulator
    tile in registers, the group epilogue at ``g`` and ``out`` (+ bias) written per thread;
    one-group layers stage each ``ko`` step's operand tiles in shared memory."""
    tvm = _require()
    sch = tvm.s_tir.Schedule(func)
    acc, ep, out = (sch.get_sblock(n) for n in ("acc", "ep", "out"))
    m, g, n, kk = sch.get_loops(acc)
    tx_n = min(WARP, spec.nb)
    # rows on blockIdx.x (up to 2^31 - 1 blocks: a large batch of convs has many row tiles),
    # channel blocks on blockIdx.y
    bm, ty, mr = sch.split(m, [None, spec.m_task, spec.mb])
    # a thread's channels are contiguous (n = bn * nb + tx * nr_len + nr): a strided set
    # (tx + 32 * nr) would make the epilogue's compute_at region span other threads' channels
    bn, tx, nr = sch.split(n, [None, tx_n, spec.nb // tx_n])
    k_len = _extent(sch, kk)
    kki = _byte_split(spec, k_len)
    # the deepest K step (at most STAGE_K / STAGE_K_WORDS) that divides K into whole steps
    top = STAGE_K_WORDS if spec.layout == "tt_planes" else STAGE_K
    depth = next((d for d in (top, top // 2, top // 4) if k_len % d == 0 and d % kki == 0), 0)
    stage = spec.G == 1 and depth > 0
    if stage:
        red = list(sch.split(kk, [None, depth // kki, kki]))
    elif kki > 1:
        red = list(sch.split(kk, [None, kki]))
    else:
        red = [kk]
    _check_threads(spec.m_task * tx_n)
    sch.reorder(bm, bn, ty, tx, g, *red, mr, nr)
    sch.bind(bm, "blockIdx.x")
    sch.bind(bn, "blockIdx.y")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(ep, g)
    fuse = _fused_out(spec)
    if fuse:
        sch.set_scope(ep, 0, "local")
        sch.reverse_compute_at(out, tx)
    sch.unroll(mr)
    sch.unroll(nr)
    for loop in red[1:]:
        sch.unroll(loop)
    if stage:
        _stage_operands(sch, acc, red[0], 6, spec.m_task, tx_n)  # (bm, bn, ty, tx, g, ko)
    sch.decompose_reduction(acc, red[0])
    sch.decompose_reduction(ep, g)
    _schedule_stages(sch)
    return sch.mod


def schedule_t2(func: Any, spec: GemmSpec) -> Any:
    """:func:`schedule_splitk` up to :data:`GEMV_MAX_M` rows, :func:`schedule_tiled` above
    (any layout: 2-bit ternary, ternary bit-planes, dense int8 / fp32)."""
    if spec.M <= GEMV_MAX_M:
        return schedule_splitk(func, spec)
    return schedule_tiled(func, spec)


# ----------------------------------------------------------------------------- dlight


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


# ----------------------------------------------------------------------------- no-GPU checks


def serial_equivalent(mod: Any, interleave: bool = False) -> Any:
    """``mod`` with every thread-bound loop made serial: the same blocks and buffers in the
    order one thread after the other would run them, buildable for the host CPU.

    A scheduled TensorIR module's value is that of its blocks run in loop order; thread binding
    (a cross-thread reduction included: a reduction loop bound to a thread axis) only changes
    who runs an iteration. So this module computes what the GPU kernel must compute, provided
    no thread reads another thread's registers (:func:`poison_thread_storage`), no block uses a
    buffer across kernels (:func:`schedule_errors`) and no two threads write one element.

    ``interleave`` runs the even-numbered threads of each (even-sized, spatial) thread loop
    before the odd ones, so that of two neighbouring threads writing the same element, the
    other one writes last in half of the pairs: a write race then shows in one order or the
    other. (A plain reversal would need negative-stride bindings, which TVM's buffer region
    analysis mishandles.)
    """
    tvm = _require()
    import tvm_ffi

    tirx = tvm.tirx
    reduce_vars: list[Any] = []  # loop vars that feed a reduction iter var of some block

    def note(realize: Any) -> None:
        for iv, value in zip(realize.block.iter_vars, realize.iter_values, strict=True):
            if iv.iter_type == tirx.IterVar.CommReduce:
                tvm_ffi.structural_walk(value, [(tirx.Var, reduce_vars.append)])

    tvm_ffi.structural_walk(mod, [(tvm.s_tir.SBlockRealize, note)])

    def serial(loop: Any) -> Any:
        if loop.kind != tirx.ForKind.THREAD_BINDING:
            return loop
        ext = int(loop.extent) if isinstance(loop.extent, tirx.IntImm) else 0
        # a reduction loop keeps its order: a block's init runs at the first value of its
        # reduction vars (a reordered cross-thread reduction would re-init midway)
        if (not interleave or ext < 4 or ext % 2
                or any(loop.loop_var.same_as(v) for v in reduce_vars)):
            return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL,
                            loop.body, None, loop.annotations, loop.step, loop.span)
        var = loop.loop_var
        odd = tirx.Var(f"{var.name}_odd", var.ty)
        half = tirx.Var(f"{var.name}_half", var.ty)
        body = tvm_ffi.structural_map(
            loop.body, [(tirx.Var, lambda v: loop.min + half * 2 + odd if v.same_as(var) else v)])
        inner = tirx.For(half, 0, ext // 2, tirx.ForKind.SERIAL, body)
        return tirx.For(odd, 0, 2, tirx.ForKind.SERIAL, inner)

    return tvm_ffi.structural_map(mod, [(tirx.For, serial)])


def _poison_value(tirx: Any, dtype: str) -> Any:
    if dtype.startswith("float"):
        return tirx.const(float("nan"), dtype)
    return tirx.const(0x55 if dtype.endswith("int8") else 0x2AAAAAAA, dtype)


def poison_thread_storage(mod: Any) -> Any:
    """Place the ``local`` / ``shared`` buffers of a :func:`serial_equivalent` module where
    the GPU lowering would (TVM's own allocation-placement and compaction passes), and fill
    each with garbage (NaN, ``0x2AAAAAAA``) where it is allocated.

    A register buffer allocated under the (serialised) thread loops then starts as garbage in
    every thread, as on a GPU, instead of holding what the previous thread left there: a
    schedule whose thread reads registers it did not write (e.g. a compute_at region wider
    than the thread's own tile) produces garbage in emulation too.
    """
    tvm = _require()
    import tvm_ffi

    tirx, s_tir = tvm.tirx, tvm.s_tir
    placement = tvm.ir.transform.Sequential([
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
    ])
    with tvm.target.Target({"kind": "llvm"}):
        mod = placement(mod)

    def fill(block: Any) -> Any:
        bufs = [b for b in block.alloc_buffers if str(b.scope()) in ("local", "shared")]
        if not bufs:
            return block
        fills = []
        for buf in bufs:
            idx = [tirx.Var(f"poison{d}", "int32") for d in range(len(buf.shape))]
            stmt = tirx.BufferStore(buf, _poison_value(tirx, str(buf.dtype)), idx)
            for var, ext in reversed(list(zip(idx, buf.shape, strict=True))):
                stmt = tirx.For(var, 0, ext, tirx.ForKind.SERIAL, stmt)
            fills.append(stmt)
        return s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint,
                            tirx.SeqStmt([*fills, block.body]), block.init, block.alloc_buffers,
                            block.match_buffers, block.annotations)

    return tvm_ffi.structural_map(mod, [(s_tir.SBlock, fill)])


def schedule_errors(func: Any) -> list[str]:
    """GPU errors of a scheduled PrimFunc that serial emulation cannot see; ``[]`` when none.

    Every block must run under a ``threadIdx`` binding (else it is host code that would touch
    device memory). All blocks touching a ``local`` or ``shared`` buffer must be in one kernel
    (one root-level thread loop nest), and for a ``local`` buffer run on the same threads (the
    same ``threadIdx`` tags with the same extents), except for the thread axes a block reduces
    over: a cross-thread reduction reads the other threads' partial sums by design, and its
    result is then every thread's. Loops are compared by tag and extent, not by how they map
    iterations to threads. TVM compiles such errors without complaint.
    """
    tvm = _require()
    import tvm_ffi

    tirx, s_tir = tvm.tirx, tvm.s_tir
    stack: list[Any] = []  # enclosing thread-bound loops, outermost first
    uses: dict[str, list[tuple[str, list[Any], list[Any]]]] = {}
    scopes: dict[str, str] = {}
    host: list[str] = []

    def tag(loop: Any) -> str:
        return str(loop.thread_binding.thread_tag)

    def on_for(loop: Any, visitor: Any) -> None:
        bound = loop.kind == tirx.ForKind.THREAD_BINDING
        if bound:
            stack.append(loop)
        visitor.default_visit(loop)
        if bound:
            stack.pop()

    def on_realize(realize: Any, visitor: Any) -> None:
        blk = realize.block
        if blk.name_hint != "root" and not any(tag(lp).startswith("threadIdx") for lp in stack):
            host.append(blk.name_hint)
        red_vars: list[Any] = []
        for iv, value in zip(blk.iter_vars, realize.iter_values, strict=True):
            if iv.iter_type == tirx.IterVar.CommReduce:
                tvm_ffi.structural_walk(value, [(tirx.Var, red_vars.append)])
        for region in [*blk.reads, *blk.writes]:
            buf = region.source
            scope = str(buf.scope())
            if scope in ("local", "shared"):
                scopes[str(buf.name)] = scope
                uses.setdefault(str(buf.name), []).append((blk.name_hint, list(stack), red_vars))
        visitor.default_visit(realize)

    tvm_ffi.structural_visit(func, [(tirx.For, on_for), (s_tir.SBlockRealize, on_realize)])

    def threads(loops: list[Any], red_vars: list[Any], kinds: tuple[str, ...]
                ) -> tuple[set[tuple[str, int]], set[str]]:
        """((tag, extent) of the loops that identify the thread, tags reduced over)."""
        ls = [lp for lp in loops if tag(lp).startswith(kinds)]
        reduced = {tag(lp) for lp in ls if any(lp.loop_var.same_as(v) for v in red_vars)}
        return {(tag(lp), int(lp.extent)) for lp in ls if tag(lp) not in reduced}, reduced

    errors = [f"block {b!r} is not bound to GPU threads" for b in host]
    for name, accesses in uses.items():
        kinds = ("blockIdx",) if scopes[name] == "shared" else ("blockIdx", "threadIdx")
        first, loops0, red0 = accesses[0]
        own0, reduced0 = threads(loops0, red0, kinds)
        for blk, loops, red in accesses[1:]:
            # one kernel per root-level thread loop nest: within it, loops bound to the same
            # tag with the same extent are the same threads
            if not (loops and loops0 and loops[0].same_as(loops0[0])):
                errors.append(f"{scopes[name]} buffer {name}: blocks {first!r} and {blk!r} are "
                              "in different kernels")
                continue
            own, reduced = threads(loops, red, kinds)
            bad = sorted({t for t, _ in own0 ^ own} - reduced0 - reduced)
            if bad:
                errors.append(f"{scopes[name]} buffer {name}: blocks {first!r} and {blk!r} run "
                              f"on different {', '.join(bad)} threads")
    return errors


def emulate_layer(lx: LayerExport, batch: int = 1, rule: Rule | None = None,
                  params: Params | None = None) -> tuple[str, float]:
    """Check the CUDA schedule of ``lx`` without a GPU: :func:`schedule_errors`, then the
    :func:`serial_equivalent` with :func:`poison_thread_storage`, run on the host CPU with the
    threads in both orders, against :func:`.measure.reference_output`.

    Returns ``(rule name, max |err|)``; raises :class:`.measure.KernelMismatchError` when a
    run is off by more than the kernel's tolerance or the schedule has a GPU error.

    Example:
        >>> # emulate_layer(lx, batch=1)  ->  ("cuda.t2_gemv", 3.1e-06)
    """
    from . import measure

    tvm = _require()
    tinfo = _tvm.target_info("cuda")
    if rule is None:
        rule = measure.select_rule(lx, tinfo)
    spec = rule.plan(lx, batch, tinfo, dict(rule.default_params if params is None else params))
    mod = rule.schedule(gemm_compute(spec), spec)
    errors = schedule_errors(mod["main"])
    if errors:
        raise measure.KernelMismatchError(f"{lx.name}: {rule.name}: " + "; ".join(errors))
    a = measure.kernel_input(lx, spec)
    ref = measure.reference_output(lx, a)
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(v, dev) for v in (a, *pack_weight_args(spec, lx))]
    err = 0.0
    for interleave in (False, True):  # a write race shows in one order or the other
        host = poison_thread_storage(serial_equivalent(mod, interleave=interleave))
        exe = tvm.compile(host, target=tvm.target.Target({"kind": "llvm"}))
        out = tvm.runtime.empty((spec.M, spec.N), "float32", dev)
        exe.jit()["main"](*args, out)
        what = f"{rule.name} (serial CPU emulation{', interleaved' if interleave else ''})"
        err = max(err, measure._check(lx.name, what, out.numpy(), ref, measure._rtol(spec)))
    return rule.name, err


def kernel_source(kernel: Any) -> str:
    """CUDA C source of a built CUDA kernel (:class:`.ops.Kernel`); ``""`` for other targets.

    TVM 0.27 keeps the device code as CUDA source in the built module and compiles it when the
    module is first loaded on a GPU (see :func:`compile_kernel`).
    """
    exe = kernel.executable
    mod = getattr(exe, "mod", exe)
    for imp in mod.imports:
        if imp.kind == "cuda":
            return str(imp.inspect_source("cuda"))
    return ""


def _compiler(compiler: str | None) -> str:
    mode = (compiler or os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc")).lower()
    if mode not in ("nvrtc", "nvcc"):
        raise ValueError(f"CUDA compiler must be 'nvrtc' or 'nvcc', got {mode!r}")
    return mode


def _has_cuda_headers(root: str) -> bool:
    """Whether ``root`` holds what TVM's NVRTC path includes: ``cuda_runtime.h`` and the CCCL
    ``cuda/std`` headers (pip's ``nvidia/cu13`` has the former only)."""
    incs = [os.path.join(root, "include"),
            *glob.glob(os.path.join(root, "targets", "*", "include"))]
    runtime = any(os.path.isfile(os.path.join(i, "cuda_runtime.h")) for i in incs)
    cccl = any(os.path.isdir(os.path.join(i, *sub, "cuda", "std"))
               for i in incs for sub in ((), ("cccl",)))
    return runtime and cccl


def cuda_toolkit_root() -> str | None:
    """A CUDA toolkit root with the headers NVRTC needs, or None: ``CUDA_PATH``,
    ``CUDA_HOME``, ``/usr/local/cuda``, then the newest ``/usr/local/cuda-*``."""
    cands = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in cands if c and _has_cuda_headers(c)), None)


def ensure_cuda_path() -> str | None:
    """Point ``CUDA_PATH`` at :func:`cuda_toolkit_root` when it is unset or lacks headers.

    TVM finds the CUDA headers for NVRTC through ``CUDA_PATH``, else ``which nvcc``/../..,
    which goes wrong when ``nvcc`` is a wrapper script (``/usr/local/bin/nvcc`` here) or
    absent (a GPU host with only the driver and pip CUDA libraries). The runtime compiles a
    kernel's source when the module is first loaded on a GPU, so this is set before any build.
    """
    cur = os.environ.get("CUDA_PATH")
    if cur and _has_cuda_headers(cur):
        return cur
    root = cuda_toolkit_root()
    if root is not None and root != cur:
        os.environ["CUDA_PATH"] = root
        log.info("CUDA_PATH=%s (CUDA headers for NVRTC)", root)
    return root


def compiler_unavailable_reason(compiler: str | None = None) -> str:
    """Why CUDA source cannot be compiled here (``""`` when it can). NVRTC (TVM's default)
    needs the ``cuda-bindings`` package, a loadable ``libnvrtc`` (pip ``nvidia-cuda-nvrtc``) and
    a CUDA toolkit's headers (:func:`cuda_toolkit_root`); nvcc needs ``nvcc``. ``compiler``
    defaults to ``TVM_CUDA_COMPILE_MODE`` (else NVRTC), as in TVM's runtime."""
    mode = _compiler(compiler)
    if mode == "nvcc":
        if shutil.which("nvcc") or cuda_toolkit_root():
            return ""
        return "nvcc not found (PATH, CUDA_PATH, /usr/local/cuda)"
    try:
        from cuda.bindings import nvrtc

        err, _major, _minor = nvrtc.nvrtcVersion()
        if int(err) != 0:
            return f"libnvrtc is not usable ({err})"
    except Exception as exc:  # ImportError, or the bindings failing to load libnvrtc
        return (f"NVRTC unavailable: {type(exc).__name__}: {exc} "
                "(pip install cuda-bindings nvidia-cuda-nvrtc)")
    if cuda_toolkit_root() is None:
        return "no CUDA toolkit headers (cuda_runtime.h + CCCL) for NVRTC: set CUDA_PATH"
    return ""


def compile_kernel(kernel: Any, arch: str | None = None, compiler: str | None = None) -> bytes:
    """Compile a built CUDA kernel's source to a device binary without a GPU: an NVRTC cubin
    or an nvcc fatbin for ``arch`` (default: the kernel's target arch), the compilation TVM's
    CUDA runtime would do on first load. Raises ``RuntimeError`` with the compiler's log when
    the source does not compile.

    Example:
        >>> # compile_kernel(build_layer(lx, 1, "cuda"), "sm_80")[:4]  ->  b"\\x7fELF"
    """
    tvm = _require()
    from tvm.support import nvcc

    src = kernel_source(kernel)
    if not src:
        raise ValueError(f"{kernel.rule}: not a CUDA kernel (target {kernel.target_str})")
    if arch is None:
        arch = str(json.loads(kernel.target_str).get("arch", _tvm.DEFAULT_CUDA_ARCH))
    mode = _compiler(compiler)
    ensure_cuda_path()
    # nvcc takes explicit -gencode flags; both read the arch of the current target otherwise
    # (and would ask the GPU for it)
    arch_arg: Any = arch
    if mode == "nvcc":
        arch_arg = ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        binary = nvcc.compile_cuda(src, target_format="cubin" if mode == "nvrtc" else "fatbin",
                                   arch=arch_arg, compiler=mode)
    return bytes(binary)


# ----------------------------------------------------------------------------- GPU bundle

#: the runner of :func:`export_gpu_bundle`: needs only Python, numpy, torch (CUDA) and the
#: bundled TVM runtime; every kernel's device code comes precompiled (no NVRTC on the GPU host)
_BUNDLE_RUNNER = r'''"""Check a ternbench CUDA kernel bundle: python3 run.py [--dry] [name ...]"""
import ctypes, glob, hashlib, json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "py"))
import numpy as np
import torch
import tvm_ffi

for lib in ("libcudart.so.13", "libtvm_runtime.so", "libtvm_runtime_cuda.so"):
    if os.path.exists(os.path.join(HERE, "lib", lib)):  # dependencies first (by SONAME)
        ctypes.CDLL(os.path.join(HERE, "lib", lib), mode=ctypes.RTLD_GLOBAL)
BIN = {os.path.basename(p).rsplit(".", 1)[0]: open(p, "rb").read()
       for p in glob.glob(os.path.join(HERE, "bin", "*"))}


@tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
def _compiled(code, *_):  # the CUDA module compiles its source on first load: use ours
    key = hashlib.sha256(code.encode()).hexdigest()
    if key not in BIN:
        raise RuntimeError(f"no precompiled binary for kernel source {key[:12]}")
    return bytearray(BIN[key])


dry = "--dry" in sys.argv
only = [a for a in sys.argv[1:] if a != "--dry"]
results = []
for job in json.load(open(os.path.join(HERE, "manifest.json"))):
    if only and not any(o in job["name"] for o in only):
        continue
    try:
        func = tvm_ffi.load_module(os.path.join(HERE, "k", job["name"] + ".so"))["main"]
        if dry:
            results.append(dict(name=job["name"], ok=True, loaded=True))
            continue
        data = np.load(os.path.join(HERE, "k", job["name"] + ".npz"))
        args = [torch.from_numpy(np.ascontiguousarray(data[f"arr_{i}"])).cuda()
                for i in range(job["nargs"])]
        outs = []
        for _ in range(2):  # twice, into NaN-filled outputs: no stale or missing writes
            out = torch.full((job["M"], job["N"]), float("nan"), device="cuda")
            func(*args, out)
            outs.append(out.cpu().numpy().astype(np.float64))
        ref = data["ref"].astype(np.float64)
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        err = max(float(np.abs(o - ref).max()) for o in outs)
        ok = bool(all(np.isfinite(o).all() for o in outs) and err <= job["rtol"] * scale)
        results.append(dict(name=job["name"], ok=ok, max_abs_err=err, tol=job["rtol"] * scale))
    except Exception as exc:
        results.append(dict(name=job["name"], ok=False, error=f"{type(exc).__name__}: {exc}"))
    r = results[-1]
    print(("ok  " if r["ok"] else "BAD ") + job["name"], r.get("max_abs_err", r.get("error", "")),
          flush=True)
json.dump(results, open(os.path.join(os.environ.get("OUT", HERE), "results.json"), "w"), indent=1)
print(f"{sum(r['ok'] for r in results)}/{len(results)} ok on",
      "(dry run)" if dry else torch.cuda.get_device_name(0))
sys.exit(0 if all(r["ok"] for r in results) else 1)
'''


def export_gpu_bundle(jobs: list[tuple[Any, ...]], out_dir: str | os.PathLike[str], *,
                      arch: str = DEFAULT_BUNDLE_ARCH, tvm_ffi_dir: str | None = None) -> str:
    """Write a self-contained bundle that checks CUDA kernels on a GPU host without TVM.

    For each ``(layer, batch[, rule[, params]])`` (default: the selected rule, its default
    tiles): the kernel built for ``arch`` and exported (host code
    + CUDA source), its device code compiled here with NVRTC (keyed by the source's SHA-256),
    the kernel input, packed weights and the float64 reference. Plus the TVM runtime libraries,
    the ``tvm_ffi`` package (``tvm_ffi_dir``: one built for the GPU host's Python, e.g. unpacked
    from ``pip download apache-tvm-ffi==0.1.14.post0 --python-version 3.12 --only-binary=:all:
    --no-deps``; default: this interpreter's) and ``run.py``, which runs every kernel twice and
    compares it with the reference (``results.json``; exit status 1 on any mismatch).

    Returns ``out_dir``. Example (then carry ``out_dir`` to the GPU host and run
    ``python3 <out_dir>/run.py``):
        >>> # export_gpu_bundle([(lx, 1), (lx, 64)], "build/cuda_bundle")
    """
    import hashlib

    import numpy as np

    from . import measure

    tvm = _require()
    import tvm_ffi as local_ffi

    tinfo = dataclasses.replace(_tvm.target_info("cuda"), mcpu=arch, local=False,
                                target_str=json.dumps({"arch": arch, "kind": "cuda"},
                                                      sort_keys=True))
    out = os.fspath(out_dir)
    for sub in ("k", "bin", "lib"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    manifest = []
    for i, job in enumerate(jobs):
        lx, batch = job[0], int(job[1])
        rule = job[2] if len(job) > 2 and job[2] is not None else measure.select_rule(lx, tinfo)
        params = dict(job[3]) if len(job) > 3 and job[3] is not None else None
        kern = rule.build(lx, batch, tinfo, params)
        tiles = "".join(f"_{k}{v}" for k, v in sorted(kern.params.items()))
        name = f"{i:03d}_{lx.name}_b{batch}_{rule.name.split('.')[-1]}{tiles}"
        kern.export(os.path.join(out, "k", name + ".so"))
        key = hashlib.sha256(kernel_source(kern).encode()).hexdigest()
        binary = os.path.join(out, "bin", key + ".cubin")
        if not os.path.exists(binary):
            with open(binary, "wb") as f:
                f.write(compile_kernel(kern, arch, "nvrtc"))
        a = measure.kernel_input(lx, kern.spec)
        args = [a, *kern.pack(lx)]
        # float32 reference: its rounding (6e-8 relative) is far below every tolerance, and
        # the bundle stays small enough to copy around
        np.savez(os.path.join(out, "k", name + ".npz"), *args,
                 ref=measure.reference_output(lx, a).astype(np.float32))
        manifest.append(dict(name=name, layer=lx.name, batch=batch, rule=rule.name,
                             params=dict(kern.params), impl=kern.impl, M=kern.spec.M,
                             N=kern.spec.N, nargs=len(args),
                             rtol=measure._rtol(kern.spec), source_sha256=key))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    with open(os.path.join(out, "run.py"), "w") as f:
        f.write(_BUNDLE_RUNNER)
    lib = os.path.join(os.path.dirname(tvm.__file__), "lib")
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy(os.path.join(lib, name), os.path.join(out, "lib", name))
    root = cuda_toolkit_root()  # the CUDA runtime the TVM runtime was linked against
    for cand in ([os.path.join(root, "lib", "libcudart.so.13"),
                  os.path.join(root, "lib64", "libcudart.so.13")] if root else []):
        if os.path.exists(cand):
            shutil.copy(cand, os.path.join(out, "lib", "libcudart.so.13"))
            break
    ffi_src = tvm_ffi_dir or os.path.dirname(local_ffi.__file__)
    dst = os.path.join(out, "py", "tvm_ffi")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ffi_src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    log.info("GPU bundle of %d kernels for %s in %s", len(manifest), arch, out)
    return out


# ----------------------------------------------------------------------------- rules


def _is_cuda(target: _tvm.TargetInfo) -> bool:
    return target.family == "cuda"


def _applies_t2_gemv(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    # linear layers: M = batch, few rows in the common batch-1 case
    return (_is_cuda(target) and lx.weight_format == "ternary"
            and lx.act_mode in ("int", "fp32") and lx.op == "linear")


def _applies_t2_gemm(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return _is_cuda(target) and lx.weight_format == "ternary" and lx.act_mode in ("int", "fp32")


def _applies_tt(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return _is_cuda(target) and lx.weight_format == "ternary" and lx.act_mode == "ternary"


def _applies_dense(fmt: str) -> Any:
    def applies(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
        return _is_cuda(target) and lx.weight_format == fmt and lx.act_mode in ("int", "fp32")

    return applies


def _applies_any(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return _is_cuda(target) and (
        (lx.weight_format == "ternary" and lx.act_mode in ("int", "fp32", "ternary"))
        or (lx.weight_format in ("int8", "fp32") and lx.act_mode in ("int", "fp32")))


def _layout(lx: LayerExport) -> Any:
    if lx.weight_format != "ternary":
        return "dense_blocked"
    return "tt_planes" if lx.act_mode == "ternary" else "t2_blocked"


def _plan(lx: LayerExport, batch: int, target: _tvm.TargetInfo, params: Params) -> GemmSpec:
    """GEMM view of ``lx`` with the tiles of ``params`` (missing ones: the kernel's defaults):
    ``nb`` channels per thread block (also the weight layout's block, so that a block's
    weights are one contiguous slab); for the tiled kernel ``mb`` rows per thread and ``rows``
    rows per thread block."""
    layout = _layout(lx)
    spec = plan_gemm(lx, batch, layout, nb=int(params.get("nb", GEMV_DEFAULT["nb"])),
                     mb_max=1, rows_per_task=1)
    if spec.M <= GEMV_MAX_M:  # split-K: one row per thread block, mb / rows unused
        return spec
    nb = int(params.get("nb", TILED_DEFAULT["nb"]))
    mb = int(params.get("mb", TILED_DEFAULT["mb"]))
    # at most MAX_THREADS threads per block: (rows / mb) row threads x min(nb, 32) channel ones
    rows = min(int(params.get("rows", TILED_DEFAULT["rows"])), mb * (MAX_THREADS // min(WARP, nb)))
    return plan_gemm(lx, batch, layout, nb=nb, mb_max=mb, rows_per_task=rows)


def _grid(default: dict[str, int], **axes: tuple[int, ...]) -> tuple[Params, ...]:
    """Default first, then the cartesian product of ``axes`` (what a search may try)."""
    pts: list[dict[str, int]] = [{}]
    for key, vals in axes.items():
        pts = [{**p, key: v} for p in pts for v in vals]
    return (default, *[p for p in pts if p != default])


#: split-K tiles (linear layers: few rows); the tiled kernel's tiles (conv layers). The default
#: grid points leave ``nb`` to the kernel the row count selects (see :func:`_plan`).
_GEMV_GRID = _grid({}, nb=(8, 16, 32, 64))
_TILED_GRID = _grid({"mb": TILED_DEFAULT["mb"], "rows": TILED_DEFAULT["rows"]},
                    nb=(32, 64, 128), mb=(1, 2, 4), rows=(16, 32, 64))


def rules() -> list[Rule]:
    """CUDA rules in priority order: hand schedules first, dlight last (any format).

    Also points ``CUDA_PATH`` at a CUDA toolkit when needed (:func:`ensure_cuda_path`), so
    that the kernels built from these rules compile when they are first loaded on a GPU.
    """
    ensure_cuda_path()
    return [
        Rule("cuda.t2_gemv", "tvm_t2_gemv_cuda", _applies_t2_gemv, _plan,
             schedule_t2, grid=_GEMV_GRID),
        Rule("cuda.t2_gemm", "tvm_t2_gemm_cuda", _applies_t2_gemm, _plan,
             schedule_t2, grid=_TILED_GRID),
        Rule("cuda.tt_popc", "tvm_tt_popc_cuda", _applies_tt, _plan,
             schedule_t2, grid=_TILED_GRID),
        Rule("cuda.int8", "tvm_int8_cuda", _applies_dense("int8"), _plan,
             schedule_t2, grid=_TILED_GRID),
        Rule("cuda.fp32", "tvm_fp32_cuda", _applies_dense("fp32"), _plan,
             schedule_t2, grid=_TILED_GRID),
        Rule("cuda.dlight", "tvm_dlight_cuda", _applies_any, _plan, schedule_dlight),
    ]
