"""aarch64 schedules (``arm``, ``arm-neon``, ``arm-sve``): NEON ``sdot``, NEON popcount and
int32-lane ternary kernels.

Same function name as :mod:`.x86` and :mod:`.generic` (``rules()``). ARM kernels are
cross-compiled (see :mod:`.cross`): checked bit-exact under qemu-user, timed on a board over
RPC (:mod:`.rpc`). Every rule gates on the target's features *before* anything is compiled: an
intrinsic of another architecture (or ``sdot`` without ``+dotprod``) makes LLVM abort the
process instead of raising.

Rules, in priority order:

* ``arm.t2_sdot`` (``+dotprod``; int8 activations, ternary weights): the 2-bit codes
  (``t2_decoded`` layout: the portable ``t2_blocked`` bytes) are decoded into an *int8* tile
  laid out ``[.., K/4, NB/4, 4n, 4k]``, so every 4 output x 4 input block is 16 contiguous
  bytes: exactly one operand of the NEON ``sdot`` (four int32 lanes, each the dot product of 4
  int8 pairs). The activations stay signed, so there is no offset correction. Tensorized with
  our own intrinsic (``import tvm.s_tir.tensor_intrin`` would take minutes).
* ``arm.tt_popc`` (ternary activations and weights, ``tt_planes``): mask/sign bit-planes,
  vectorised over the output channels; NEON has a byte popcount (``cnt``), so the vector
  popcount is ``cnt`` plus pairwise widening adds.
* ``arm.t2_neon`` (int8 activations, no dotprod or a group size that is not a multiple of 4):
  ``t2_blocked`` with the 2-bit codes decoded inline, int32 lanes (``mla``).
* ``arm.t2_f32`` (float activations, ternary weights): codes decoded to a float32 tile per task,
  then a blocked ``fmla`` GEMM (the x86 ``t2_f32`` schedule, which has no intrinsics).

int8 and fp32 dense layers use the portable rules of :mod:`.generic` (they build for aarch64).
The integer semantics are those of :func:`.ops.gemm_compute` (groups, per-group scales ``S``,
bias) unchanged: the schedules only re-lay intermediate buffers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any

from . import _tvm
from .generic import (
    TILE_SCOPE,
    finish_tensorized,
    fuse_epilogue,
    schedule_blocked,
    schedule_gemm,
)
from .ops import GemmSpec, Params, Rule, plan_gemm, tile_kwargs

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

__all__ = [
    "rules",
    "register_sdot_intrinsic",
    "schedule_t2_sdot",
    "schedule_tt_popc",
    "SDOT_4X4",
    "SDOT_DEFAULT",
    "NEON_DEFAULT",
    "TT_DEFAULT",
    "F32_DEFAULT",
]

log = logging.getLogger(__name__)

#: our own tensor intrinsic: int8 x int8 -> int32, 4 outputs x 4 reduction elements per ``sdot``
SDOT_4X4 = "ternbench_neon_sdot_4x4_i8i8i32_local"
#: the sdot tile: 4 output channels (int32 lanes) x 4 reduction elements
SDOT_N = 4
SDOT_K = 4

# Tile defaults (hand-picked for a 32 x 128-bit register file, not tuned on a board):
# sdot: 16 outputs = 4 int32x4 accumulators per row, 4 rows -> 16 accumulator registers, plus
# 4 decoded weight registers and the broadcast activations.
SDOT_DEFAULT = {"nb": 16, "mb": 4, "rows": 64}
# inline decode with int32 lanes: 8 outputs = 2 registers per row, 4 rows (the decode needs
# temporaries of its own)
NEON_DEFAULT = {"nb": 8, "mb": 4, "rows": 64}
# popcount on uint64 lanes (2 per register): 4 outputs = 2 registers per plane word and row
TT_DEFAULT = {"nb": 4, "mb": 4, "rows": 64}
# float activations: 8 outputs = 2 float32x4 accumulators per row
F32_DEFAULT = {"nb": 8, "mb": 4, "rows": 64}


@functools.cache
def register_sdot_intrinsic() -> str:
    """Register the NEON ``sdot`` 4x4 tensor intrinsic (int32 accumulator in ``local`` scope)
    once per process; returns its name."""
    tvm = _tvm.require_tvm()
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "int8", offset_factor=1),  # type: ignore[valid-type]
        W: T.Buffer((4, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        C: T.Buffer((4,), "int32", offset_factor=1, scope=TILE_SCOPE),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], W[0:4, 0:4])
            T.writes(C[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", W[vi, vk])

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1),  # type: ignore[valid-type]
        W: T.Buffer((4, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        C: T.Buffer((4,), "int32", offset_factor=1, scope=TILE_SCOPE),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], W[0:4, 0:4])
            T.writes(C[0:4])
            # the 4 activation bytes repeated in every 32-bit lane; lane i of the result adds
            # the dot product of those 4 bytes with bytes 4i..4i+3 of W (output i's 4 codes)
            a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            a_x16 = T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], dtype="int32x4"), W.vload([0, 0], dtype="int8x16"), a_x16,
                dtype="int32x4")

    try:
        tvm.s_tir.TensorIntrin.register(SDOT_4X4, desc, impl)
    except Exception:  # tvm raises a generic error when the name exists (e.g. module reload)
        tvm.s_tir.TensorIntrin.get(SDOT_4X4)
    return SDOT_4X4


def schedule_t2_sdot(func: Any, spec: GemmSpec) -> Any:
    """Ternary GEMM on ``sdot``: ``(task | mo | g | ko | kr | mi | nq | [ni x ki] = sdot)``.

    The ``t2_decoded`` compute decodes the 2-bit codes into ``W_dec [Np/NB, Kp, NB]`` (int32,
    the accumulator type); here that buffer becomes int8 (the codes are -1/0/1, so the
    narrowing is exact) and is re-laid ``[Np/NB, Kp/4, NB/4, 4, 4]`` so that each 4n x 4k block
    is contiguous (a strided sub-region would tensorize wrong). It is decoded once per task when
    a task has several row tiles (reused by all of them), else per k step (batch-1 layers use
    each weight once).
    """
    tvm = _tvm.require_tvm()
    intrin = register_sdot_intrinsic()
    sch = tvm.s_tir.Schedule(func)
    acc, ep, out, wd = (sch.get_sblock(n) for n in ("acc", "ep", "out", "W_dec"))
    sch.unsafe_set_dtype(wd, 0, "int8")
    sch.transform_layout(wd, ("write", 0),
                         lambda b, k, n: (b, k // SDOT_K, n // SDOT_N, n % SDOT_N, k % SDOT_K))
    m, g, n, kk = sch.get_loops(acc)
    mp, mo, mi = sch.split(m, [None, spec.m_task, spec.mb])
    no, nq, ni = sch.split(n, [None, spec.nb // SDOT_N, SDOT_N])
    if spec.gs % 16 == 0:
        ko, kr, ki = sch.split(kk, [None, 4, SDOT_K])  # 16 k per step: 4 sdot per output block
        red = [ko, kr]
    else:  # groups of 4, 8 or 12: gs/4 sdot steps per group
        kr, ki = sch.split(kk, [None, SDOT_K])
        red = [kr]
    sch.reorder(mp, no, mo, g, *red, mi, nq, ni, ki)
    fuse_epilogue(sch, acc, ep, out, g, mo)
    sch.compute_at(wd, no if spec.m_task > 1 else red[0])
    # decode loops (b, k, n) -> (b, kq, nq, ni, ki): the inner 16 codes are one store
    _b, wk, wn = sch.get_loops(wd)[-3:]
    wkq, wki = sch.split(wk, [None, SDOT_K])
    wnq, wni = sch.split(wn, [None, SDOT_N])
    sch.reorder(wkq, wnq, wni, wki)
    sch.vectorize(sch.fuse(wni, wki))
    sch.unroll(mi)
    sch.unroll(nq)
    if len(red) == 2:
        sch.unroll(red[1])
    return finish_tensorized(sch, spec, acc, ep, out, (mp, no), g, red[0], ni, intrin)


def schedule_tt_popc(func: Any, spec: GemmSpec) -> Any:
    """Ternary x ternary (``tt_planes``) on NEON: the blocked nest vectorised over the output
    channels' uint64 plane words; LLVM lowers the vector popcount to ``cnt`` (bytes) plus
    ``uaddlp`` pairwise widening adds."""
    return schedule_gemm(func, spec, vector_n=True)


# ----------------------------------------------------------------------------- gates and plans


def _is_arm(target: _tvm.TargetInfo) -> bool:
    return target.family == "arm" and target.kind == "llvm" and target.has("neon")


def _int8_ternary(lx: LayerExport) -> bool:
    return lx.weight_format == "ternary" and lx.act_mode == "int" and 1 <= lx.act_qmax <= 127


def _applies_t2_sdot(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    if not (_is_arm(target) and target.has("dotprod") and _int8_ternary(lx)):
        return False
    gs = int(lx.group_size)
    # one group: K is zero-padded to whole sdot steps; several: each group must be whole steps
    return gs >= lx.fan_in or gs % SDOT_K == 0


def _applies_t2_neon(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return _is_arm(target) and _int8_ternary(lx)


def _applies_tt_popc(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    # any group size: groups are padded to whole 64-bit words
    return _is_arm(target) and lx.weight_format == "ternary" and lx.act_mode == "ternary"


def _applies_t2_f32(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return _is_arm(target) and lx.weight_format == "ternary" and lx.act_mode == "fp32"


def _plan_t2_sdot(lx: LayerExport, batch: int, target: _tvm.TargetInfo,
                  params: Params) -> GemmSpec:
    tiles = tile_kwargs(params, SDOT_DEFAULT)
    if tiles["nb"] % SDOT_N:
        raise ValueError(f"arm.t2_sdot needs nb to be a multiple of {SDOT_N}, got {tiles['nb']}")
    spec = plan_gemm(lx, batch, "t2_decoded", **tiles)
    if spec.G == 1 and spec.gs != spec.Kp:
        # one group: the zero columns that pad K to a multiple of 4 (zero activations in A_in,
        # zero codes) just join it, so the reduction is whole sdot steps
        spec = dataclasses.replace(spec, gs=spec.Kp)
    return spec


def _plan(layout: Any, default: dict[str, int]) -> Any:
    def plan(lx: LayerExport, batch: int, target: _tvm.TargetInfo, params: Params) -> GemmSpec:
        return plan_gemm(lx, batch, layout, **tile_kwargs(params, default))

    return plan


def _grid(nbs: tuple[int, ...], mbs: tuple[int, ...], rows: tuple[int, ...],
          default: dict[str, int]) -> tuple[Params, ...]:
    """Default first, then the rest of the cartesian grid (what a per-shape search tries)."""
    pts = [{"nb": n, "mb": m, "rows": r} for n in nbs for m in mbs for r in rows]
    return (default, *[p for p in pts if p != default])


def rules() -> list[Rule]:
    """ARM rules in priority order; int8 / fp32 dense layers fall to :mod:`.generic`."""
    return [
        Rule("arm.t2_sdot", "tvm_t2_sdot", _applies_t2_sdot, _plan_t2_sdot, schedule_t2_sdot,
             a32_suffix=False, grid=_grid((8, 16, 32), (2, 4), (16, 64, 256), SDOT_DEFAULT)),
        Rule("arm.tt_popc", "tvm_tt_popc", _applies_tt_popc,
             _plan("tt_planes", TT_DEFAULT), schedule_tt_popc, a32_suffix=False,
             grid=_grid((2, 4, 8), (2, 4), (16, 64, 256), TT_DEFAULT)),
        Rule("arm.t2_neon", "tvm_t2_neon", _applies_t2_neon, _plan("t2_blocked", NEON_DEFAULT),
             schedule_blocked, a32_suffix=False,
             grid=_grid((4, 8, 16), (2, 4), (16, 64, 256), NEON_DEFAULT)),
        Rule("arm.t2_f32", "tvm_t2_f32", _applies_t2_f32, _plan("t2_decoded", F32_DEFAULT),
             schedule_blocked, a32_suffix=False,
             grid=_grid((4, 8, 16), (2, 4), (16, 64, 256), F32_DEFAULT)),
    ]
