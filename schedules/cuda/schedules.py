"""The hand-written CUDA schedules: split-K GEMV, thread-tiled GEMM and the one-thread-per-element
stage kernels (see the package docstring), with their tile constants and defaults."""

from __future__ import annotations

from typing import Any

from .. import _tvm
from ..generic import has_block
from ..ops import GemmSpec

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
        if has_block(sch, name) and not _is_reduction(sch, sch.get_sblock(name)):
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
