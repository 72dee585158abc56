"""Portable schedules: plain loop transformations that compile for any LLVM CPU target.

Same function names as the per-target modules (``rules()``), in the style of TVM dlight: the
measurement picks the first applicable rule of the target's module and falls back to these
rules, logging "not optimized for <target>".

One loop nest (:func:`schedule_gemm`) serves every format: the weights are stored blocked
``[N/NB, K, NB]`` (2-bit codes decoded inline for ternary weights, uint64 mask/sign bit-planes
for ternary activations), the NB output channels of a block are one vector (scalar popcounts for
the bit-planes), ``MB`` rows share each weight load, and the per-group epilogue is fused under
the group loop so no ``[M, G, N]`` accumulator is ever written to memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _tvm
from .ops import GemmSpec, Params, Rule, plan_gemm, tile_kwargs
from .ops.compute import unrolled_im2col

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

__all__ = [
    "rules",
    "schedule_blocked",
    "schedule_gemm",
    "schedule_input_stage",
    "fuse_epilogue",
    "finish_tensorized",
    "schedule_tt_popc",
    "NB",
    "MB",
    "ROWS_PER_TASK",
    "TILE_SCOPE",
    "has_block",
]

#: storage scope of the register tiles (accumulators, epilogue): TVM 0.27 lowers every
#: "local" allocation of a CPU kernel to a TVMBackendAllocWorkspace heap buffer, which LLVM
#: cannot promote to registers (each group's accumulator went through memory: a store and a
#: reload per vector and group); a small (< 1 KiB) "global" allocation stays a stack alloca,
#: which LLVM keeps in registers
TILE_SCOPE = "global"

# Tile constants (hand-picked, not tuned): NB = 8 lanes is one 256-bit vector of int32/fp32
# (two 128-bit ones on SSE/NEON); MB = 4 rows reuse every decoded weight vector 4 times while
# the 4 x NB accumulator tile still fits in registers; a parallel task covers up to 64 rows.
NB = 8
MB = 4
ROWS_PER_TASK = 64
# Ternary x ternary with scalar popcounts: a 4 x 4 tile of int32 accumulators plus the 2 x 4
# weight words stay in general-purpose registers.
TT_NB = 4
TT_MB = 4


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
        schedule_padding(sch, spec)
        if has_block(sch, "A_core"):  # K padded: the im2col proper, then a padding copy
            _schedule_im2col(sch, "A_core", spec)
            m, k = sch.get_loops(sch.get_sblock("A_in"))
            if spec.M > 1:
                sch.parallel(m)
            _vector_split(sch, k, spec.Kp)
            return
        _schedule_im2col(sch, "A_in", spec)
        return
    m, k = sch.get_loops(sch.get_sblock("A_in"))
    if spec.M > 1:
        sch.parallel(m)
    if spec.Kp == spec.K:
        _vector_split(sch, k, spec.K)


def schedule_padding(sch: Any, spec: GemmSpec) -> None:
    """``X_pad`` of a padded conv: parallel over (batch, row), vectorised over C."""
    if any(spec.padding):
        b, y, _z, ch = sch.get_loops(sch.get_sblock("X_pad"))
        sch.parallel(sch.fuse(b, y))
        _vector_split(sch, ch, spec.in_shape[0])


def has_block(sch: Any, name: str) -> bool:
    """Whether the schedule's function has a block called ``name``."""
    try:
        sch.get_sblock(name)
    except Exception:  # tvm raises a generic error for an unknown block name
        return False
    return True


def _schedule_im2col(sch: Any, name: str, spec: GemmSpec) -> None:
    """An im2col block at the root: rows split by output width (parallel), the columns as in
    :func:`_split_im2col_columns`."""
    m, k = sch.get_loops(sch.get_sblock(name))
    rows, _cols = sch.split(m, [None, spec.out_hw[1]])
    _split_im2col_columns(sch, k, name, spec)
    if spec.M > spec.out_hw[1]:
        sch.parallel(rows)


def _split_im2col_columns(sch: Any, k: Any, name: str, spec: GemmSpec) -> None:
    """The columns of an im2col block split into their three factors (``C`` vectorised in
    (kh, kw, C) order, the taps unrolled in (C, kh, kw)), into (kernel row, padded run) for
    ``k_row``, or left as one loop over a padded K."""
    c = spec.in_shape[0]
    kh, kw = spec.kernel
    width = int(sch.get(k).extent)
    if spec.k_row and name == "A_in":  # the run unrolled: constant indices
        _i, r = sch.split(k, [kh, spec.k_row])
        sch.unroll(r)
    elif name == "A_in" and unrolled_im2col(spec):  # every column a constant offset
        sch.unroll(k)
    elif width == spec.K and spec.k_order == "ijc":
        _i, _j, ch = sch.split(k, [kh, kw, c])
        _vector_split(sch, ch, c)
    elif width == spec.K:
        _ch, i, j = sch.split(k, [c, kh, kw])
        sch.unroll(i)
        sch.unroll(j)


#: row tasks a conv needs before its im2col moves into them (the tasks are then the only
#: parallel loop: enough of them for a 16-thread machine)
LOCAL_IM2COL_MIN_TASKS = 16


def _enough_row_tasks(spec: GemmSpec) -> bool:
    return -(-spec.M // spec.m_task) >= LOCAL_IM2COL_MIN_TASKS


#: float convs with at most this many input channels (stems: 1-4) read their padded input in
#: the GEMM instead of an im2col copy (:func:`inline_im2col`)
INLINE_IM2COL_MAX_C = 4
#: ... and at most this many fan-in columns (the reduction loop is unrolled)
INLINE_IM2COL_MAX_K = 256


def inline_im2col(sch: Any, spec: GemmSpec) -> bool:
    """Whether a float conv's GEMM reads ``X_pad`` itself (``A_in`` inlined, the reduction
    unrolled so every column is a constant offset from its pixel): a small-channel stem, whose
    im2col rows are runs of 1-4 floats. Copying them cost about as much as the GEMM that reads
    them once per 16-64 output channels. On znver4 (one process per level, 1 thread, time with
    / without, batch 1 / 64; ``docs/measured/ab-x86-znver4-inline-im2col.txt``): the CIFAR stem
    (3 -> 16, 32x32) 0.40-0.44x / 0.39-0.43x, AVX2 forced 0.54x / 0.54x, SSE 0.69x / 0.70x; a
    1 -> 16 28x28 stem 0.69-0.72x / 0.39-0.40x; 3 -> 64 and 4 -> 16 3x3 convs 0.55-0.90x;
    ResNet-18's 7x7/2 stem (147 columns) 1.00-1.01x / 0.96-0.98x. With 16 or more channels
    the im2col stays: inlined, the CIFAR 3x3/1 convs took 1.1-1.5x the time."""
    c = spec.in_shape[0]
    return (spec.op == "conv2d" and spec.layout == "dense_blocked"
            and spec.act_dtype == "float32" and spec.Kp == spec.K
            and c <= INLINE_IM2COL_MAX_C and spec.K <= INLINE_IM2COL_MAX_K
            and has_block(sch, "A_in") and not has_block(sch, "A_core"))


def im2col_per_task(sch: Any, spec: GemmSpec) -> bool:
    """Whether a GEMM builds its im2col rows inside each row task (in cache, right before
    use) rather than the whole [M, Kp] matrix first: a conv with one im2col stage and at least
    :data:`LOCAL_IM2COL_MIN_TASKS` row tasks. At batch 64 the root matrix (115 MB for ResNet-18's
    64x56x56 conv) went through DRAM twice: 57.9 -> 38.7 ms on znver4."""
    return (spec.op == "conv2d" and spec.has_input_stage and not has_block(sch, "A_core")
            and _enough_row_tasks(spec))


def im2col_in_task(sch: Any, spec: GemmSpec, task: Any) -> None:
    """Build ``A_in`` under the row-task loop ``task`` (see :func:`im2col_per_task`): its columns
    split as at the root, ``X_pad`` parallel at the root."""
    a_in = sch.get_sblock("A_in")
    sch.compute_at(a_in, task)
    _split_im2col_columns(sch, sch.get_loops(a_in)[-1], "A_in", spec)
    schedule_padding(sch, spec)


def fuse_epilogue(sch: Any, acc: Any, ep: Any, out: Any, g: Any, mo: Any) -> None:
    """Accumulator in registers, the per-group scale epilogue ``ep`` under the group loop ``g``
    (also in registers) and the bias pass ``out`` under the row-tile loop ``mo``."""
    sch.set_scope(acc, 0, TILE_SCOPE)
    sch.reverse_compute_at(ep, g)
    sch.set_scope(ep, 0, TILE_SCOPE)
    sch.reverse_compute_at(out, mo)


def finish_tensorized(sch: Any, spec: GemmSpec, acc: Any, ep: Any, out: Any,
                      task: tuple[Any, Any], g: Any, red0: Any, tile: Any, intrin: str) -> Any:
    """The common end of the tensorized tile GEMMs (x86 ``vpmaddubsw``/``vpdpbusd``, ARM
    ``sdot``): vectorise the epilogues, parallelise the (row, channel) task loops, schedule the
    input stage, then - every loop annotation before ``decompose_reduction`` (see
    :func:`schedule_gemm`) - split off the inits, tensorize ``tile`` and vectorise the inits."""
    sch.vectorize(sch.get_loops(ep)[-1])
    if spec.N % spec.nb == 0:  # else the last block is predicated and cannot be vectorised
        sch.vectorize(sch.get_loops(out)[-1])
    if im2col_per_task(sch, spec):
        # the row task's im2col rows right before its GEMM (the row task is then the only
        # parallel loop: the channel blocks of a task reuse its rows from cache)
        im2col_in_task(sch, spec, task[0])
        sch.parallel(task[0])
    else:
        sch.parallel(sch.fuse(*task))
        schedule_input_stage(sch, spec)
    acc_init = sch.decompose_reduction(acc, red0)
    ep_init = sch.decompose_reduction(ep, g)
    sch.tensorize(tile, intrin)
    sch.vectorize(sch.get_loops(acc_init)[-1])
    sch.vectorize(sch.get_loops(ep_init)[-1])
    return sch.mod


def schedule_blocked(func: Any, spec: GemmSpec) -> Any:
    """Blocked GEMM schedule for the ``t2_blocked``, ``t2_decoded`` and ``dense_blocked``
    layouts (see :func:`schedule_gemm`), vectorised over the NB output channels."""
    return schedule_gemm(func, spec, vector_n=True)


def schedule_tt_popc(func: Any, spec: GemmSpec) -> Any:
    """Portable ternary x ternary (``tt_planes``) schedule: the blocked nest with *scalar*
    popcounts (a vector popcount is a long bit-twiddling sequence on CPUs without one, while a
    scalar ``popcnt`` / ``cnt`` is everywhere); the float epilogue is still vectorised."""
    return schedule_gemm(func, spec, vector_n=False)


def schedule_gemm(func: Any, spec: GemmSpec, *, vector_n: bool) -> Any:
    """The blocked nest shared by every non-tensorized kernel.

    Loop nest ``(task=(mp, no) parallel | mo | g | k... | mi unrolled | ni)``, ``ni`` vectorised
    when ``vector_n`` else unrolled. The epilogue ``ep`` (sum over groups of scale * acc) is
    computed at ``g`` into a local MB x NB tile, and ``out`` (+ bias) at ``mo``. Optional stages:

    * ``W_dec`` (``t2_decoded``): decoded once per task (its NB x Kp block is reused by the
      task's ``m_task`` row tiles), or per 4-k step when a task has a single row tile;
    * ``A_bits`` (``tt_planes``): at the root, parallel over rows, or inside each row task
      (:func:`tt_bits_per_task`; the row task is then the only parallel loop); with a weight
      offset, ``out`` stays a root pass of its own (see :func:`_schedule_tt_stages`).
    """
    tvm = _tvm.require_tvm()
    sch = tvm.s_tir.Schedule(func)
    acc, ep, out = (sch.get_sblock(n) for n in ("acc", "ep", "out"))
    split = spec.layout == "tt_planes" and spec.tt_split
    if split:  # the two accumulators of an output: an unrolled loop inside the row tile
        m, g, n, t, kk = sch.get_loops(acc)
    else:
        m, g, n, kk = sch.get_loops(acc)
    mp, mo, mi = sch.split(m, [None, spec.m_task, spec.mb])
    no, ni = sch.split(n, [None, spec.nb])
    red = [kk]
    decode = spec.layout == "t2_decoded"
    decode_per_k = decode and spec.m_task == 1 and spec.gs % 4 == 0
    if (spec.layout == "t2_blocked" and spec.gs % 4 == 0) or decode_per_k:
        # k % 4 becomes the unrolled loop index: constant shifts for the 2-bit decode
        red = list(sch.split(kk, [None, 4]))
    sch.reorder(mp, no, mo, g, *red, mi, *([t] if split else []), ni)
    inline_a = inline_im2col(sch, spec)
    if inline_a:  # the GEMM reads X_pad itself: each A element a broadcast load
        sch.compute_inline(sch.get_sblock("A_in"))
        sch.unroll(kk)
    if split:
        sch.unroll(t)
    sch.set_scope(acc, 0, TILE_SCOPE)
    if split:  # the pair's difference, per tile at g: the pair axis unrolled outside n
        pair_diff = sch.get_sblock("acc_pair")
        sch.reverse_compute_at(pair_diff, g)
        sch.set_scope(pair_diff, 0, TILE_SCOPE)
        *_, d_n, d_t = sch.get_loops(pair_diff)
        sch.reorder(d_t, d_n)
        sch.unroll(d_t)
        sch.vectorize(d_n)
    sch.reverse_compute_at(ep, g)
    # `out` moves under the row-tile loop only when `ep` is its single producer stage (a
    # second one is refused, and `asum` cannot move first since its consumer is `out`)
    fuse_out = not spec.w_off
    if fuse_out:
        sch.set_scope(ep, 0, TILE_SCOPE)
        sch.reverse_compute_at(out, mo)
    sch.unroll(mi)
    if len(red) == 2:
        sch.unroll(red[1])
    if vector_n:
        sch.vectorize(ni)
    else:
        sch.unroll(ni)
    sch.vectorize(sch.get_loops(ep)[-1])
    if fuse_out and spec.N % spec.nb == 0:  # else predicated: cannot be vectorised
        sch.vectorize(sch.get_loops(out)[-1])
    # the row task builds its own input rows right before its GEMM (it is then the only
    # parallel loop; its channel blocks reuse the rows from cache)
    bits_local = tt_bits_per_task(spec)
    a_local = spec.layout != "tt_planes" and not inline_a and im2col_per_task(sch, spec)
    if bits_local:
        sch.compute_at(sch.get_sblock("A_bits"), mp)
    if a_local:
        im2col_in_task(sch, spec, mp)
    task = mp if bits_local or a_local else sch.fuse(mp, no)
    if decode:
        wd = sch.get_sblock("W_dec")
        sch.compute_at(wd, red[0] if decode_per_k else (no if a_local else task))
        _wb, wk, wn = sch.get_loops(wd)[-3:]
        if decode_per_k:
            sch.unroll(wk)
        elif (spec.G * spec.gs) % 4 == 0:  # whole bytes: k % 4 is the unrolled index
            sch.unroll(sch.split(wk, [None, 4])[1])
        sch.vectorize(wn)
    # parallel/vectorize check the subtree's dataflow, which decomposed reductions (blocks
    # without init) fail, so every loop annotation comes before decompose_reduction
    sch.parallel(task)
    if inline_a:
        schedule_padding(sch, spec)
    elif not a_local:
        schedule_input_stage(sch, spec)
    tt_inits = _schedule_tt_stages(sch, spec) if spec.layout == "tt_planes" else []
    for blk, loop in tt_inits:
        sch.decompose_reduction(blk, loop)  # scalar inits
    inits = [sch.decompose_reduction(acc, red[0]), sch.decompose_reduction(ep, g)]
    if split:
        inits.append(sch.decompose_reduction(pair_diff, d_t))
    for init in inits:
        sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod


def tt_bits_per_task(spec: GemmSpec) -> bool:
    """Whether a ``tt_planes`` conv gathers its ``A_bits`` rows inside each row task (from the
    per-pixel ``X_bits``) instead of the whole [M, words, 2] matrix first: pixel-packed convs
    without a weight offset (whose root ``asum`` pass reads the planes too) and at least
    :data:`LOCAL_IM2COL_MIN_TASKS` row tasks."""
    return (spec.layout == "tt_planes" and spec.pixel_bits and not spec.w_off
            and _enough_row_tasks(spec))


def _schedule_tt_stages(sch: Any, spec: GemmSpec) -> list[tuple[Any, Any]]:
    """Root stages of ``tt_planes``: ``A_bits``, parallel over rows (the mask and sign words of
    one 64-k chunk built side by side; for :attr:`GemmSpec.pixel_bits` convs ``X_bits`` packs
    the pixels, parallel over image rows, and ``A_bits`` only gathers words), and, with a
    weight offset, the unfused ``out`` pass: parallel over rows, ``asum`` of the row computed
    at its row loop, vectorised over NB.
    Returns the (block, loop) pairs to ``decompose_reduction`` once annotations are done."""
    bits = sch.get_sblock("A_bits")
    if spec.pixel_bits:  # X_bits packs pixels (parallel over image rows); A_bits gathers words
        todo = []
        if not spec.mask_words:  # (else an extern stage, parallel inside: _mask_pixels)
            xb = sch.get_sblock("X_bits")
            b, y, _z, _q, xs, xj = sch.get_loops(xb)
            todo = [(xb, xj)]
            sch.parallel(sch.fuse(b, y))
            sch.unroll(xs)
        if spec.row_words:  # X_rows: parallel over image rows too; A_bits is a plain load
            # (kept materialised: inlined into acc and asum it measured slower on RTN layers)
            xr = sch.get_sblock("X_rows")
            rb, ry, _ox, _r, rs = sch.get_loops(xr)
            sch.parallel(sch.fuse(rb, ry))
            sch.unroll(rs)
        m, w, s = sch.get_loops(bits)[-3:]
        c = spec.in_shape[0]
        if c % 64 == 0 and not spec.row_words:
            # words in (kernel row, kw x C/64) order: a kernel row's words are one contiguous
            # run of X_bits, an affine copy (one loop over taps made LLVM gather and scatter)
            _i, jq = sch.split(w, [spec.kernel[0], None])
            sch.vectorize(sch.fuse(jq, s))
            s = None
    elif spec.mask_words:  # an extern stage, parallel over rows inside (mask_planes)
        m = s = None
        todo = []
    else:
        m, _w, s, j = sch.get_loops(bits)
        todo = [(bits, j)]
    if m is not None and spec.M > 1 and not tt_bits_per_task(spec):
        sch.parallel(m)
    if s is not None:
        sch.unroll(s)
    if spec.w_off:
        out = sch.get_sblock("out")
        om, on = sch.get_loops(out)
        if spec.N % spec.nb == 0:
            sch.vectorize(sch.split(on, [None, spec.nb])[1])
        asum = sch.get_sblock("asum")
        sch.compute_at(asum, om)
        todo.append((asum, sch.get_loops(asum)[-1]))
        if spec.M > 1:
            sch.parallel(om)
    return todo


def _applies_t2(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return lx.weight_format == "ternary" and lx.act_mode in ("int", "fp32")


def _applies_tt(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return lx.weight_format == "ternary" and lx.act_mode == "ternary"


def _tiles(params: Params, nb: int) -> dict[str, int]:
    return tile_kwargs(params, {"nb": nb, "mb": MB, "rows": ROWS_PER_TASK})


def _plan_tt(lx: LayerExport, batch: int, target: _tvm.TargetInfo, params: Params) -> GemmSpec:
    return plan_gemm(lx, batch, "tt_planes", **_tiles(params, TT_NB))


def _applies_int8(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return lx.weight_format == "int8" and lx.act_mode in ("int", "fp32")


def _applies_fp32(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return lx.weight_format == "fp32" and lx.act_mode in ("int", "fp32")


def _plan(layout: Any) -> Any:
    def plan(lx: LayerExport, batch: int, target: _tvm.TargetInfo, params: Params) -> GemmSpec:
        return plan_gemm(lx, batch, layout, **_tiles(params, NB))

    return plan


def rules() -> list[Rule]:
    """Portable rules, one per weight format and activation kind (always applicable to a
    supported layer)."""
    return [
        Rule("generic.t2", "tvm_t2_generic", _applies_t2, _plan("t2_blocked"), schedule_blocked),
        Rule("generic.int8", "tvm_int8", _applies_int8, _plan("dense_blocked"), schedule_blocked),
        Rule("generic.fp32", "tvm_fp32", _applies_fp32, _plan("dense_blocked"), schedule_blocked),
        Rule("generic.tt_popc", "tvm_tt_popc_generic", _applies_tt, _plan_tt, schedule_tt_popc),
    ]
