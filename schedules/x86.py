"""x86 schedules: the AVX2 ``vpmaddubsw`` ternary kernel, the ternary x ternary popcount kernel,
ternary weights with float activations, plus blocked int8/fp32 GEMMs.

Same function names as :mod:`.generic` (``rules()``). The ternary rule needs AVX2 in the
target's features: x86 intrinsics reaching a non-x86 LLVM backend abort the process
("Do not know how to split the result of this operator!"), so the gate is checked before any
compile.

The ternary kernel (bitnet.cpp "I2_S"-like, measured in ``shared/notes/tvm.md`` §2):

* weights: 2-bit ``u = w + 1`` in 8n x 16k tiles; one ``vpsrlw + vpand`` per 32 bytes decodes an
  8n x 4k tile, minus 1 gives the signed codes;
* activations: ``a + 128`` as uint8 (the ``A_in`` stage), so ``vpmaddubsw(u8 act, s8 w)``
  gives 8 outputs' pair sums of 4 k in int16 (|255 + 255| < 2^15); four of them (16 k) are
  added in int16 (``vpaddw``: at most 8 * 255 per lane) before one ``vpmaddwd(., 1)`` widens
  the 8 dot products to int32 (:func:`register_avx2_chain_intrinsic`; groups of 4, 8 or 12
  widen every 4 k);
* epilogue: ``S[n, g] * (acc - 128 * sum_{k in g} w[n, k]) + bias`` per group, fused under the
  group loop.

Ternary activations (``tvm_tt_popc``, RTN/STTN): the kernel packs its int8 activation codes into
uint64 mask/sign planes (stage ``A_bits``, cost included; each word one compare into a mask,
``GemmSpec.mask_words``), then per group
``popc(am & wm) - 2 popc(am & wm & (as ^ ws))`` vectorised over 8 output channels; offsets
(``act_offset``, ``weight_offset``) add exact border-aware corrections (see
:func:`.ops.tt_compute`). With AVX-512 VPOPCNTDQ + DQ (``x86.tt_popc512``) the popcounts
accumulate in int64 lanes (no narrowing per word) over 16 channels x 2 rows. Ternary weights
with float activations (TWN) use ``tvm_t2_f32``.
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
from .ops import (
    AVX2_TILE_K,
    GemmSpec,
    Params,
    Rule,
    WeightLayout,
    layer_geometry,
    plan_gemm,
    row_tile_pixels,
    tile_kwargs,
    with_lut_dp,
)
from .ops.amx import AMX_NB
from .ops.lut import LUT_LANES, lut_dp_geometry_of
from .ops.ttlut import TT_LUT_LANES

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

__all__ = [
    "rules",
    "lut_rule",
    "amx_rule",
    "bf16_amx_rule",
    "fp32_amx_rule",
    "tt_amx_rule",
    "tt_lut_rule",
    "full_rate_permutes",
    "schedule_t2_avx2",
    "schedule_t2_lut",
    "schedule_t2_f32",
    "schedule_tt_popc",
    "register_avx2_intrinsic",
    "AVX2_U8S8_8X4",
]

log = logging.getLogger(__name__)

#: our own tensor intrinsic (``import tvm.s_tir.tensor_intrin`` would parse ~500 TVMScript
#: functions and take minutes)
AVX2_U8S8_8X4 = "ternbench_avx2_u8s8i32_8x4_local"
AVX2_U8S8_CHAIN = "ternbench_avx2_u8s8i32_8x16_chain_local"
#: the AVX2 kernel sums each 16-k tile in int16 before widening (see
#: :func:`register_avx2_chain_intrinsic`); False: one widening per 4 k (the former kernel)
AVX2_INT16_CHAIN = True

# Tile constants (from the probe's 1-thread sweep, not re-tuned): T2_NB = 16 output channels
# (2 AVX2 tiles) per task was best at batch 1 (NB = 64 was 2.6x slower); MB = 4 rows share a
# decoded tile; a task covers up to 64 rows, and the decoded weight block of a task is reused
# by all its rows.
T2_NB = 16
T2_MB = 4
T2_ROWS_PER_TASK = 64
# Blocked int8 / fp32 GEMMs: 16 outputs = two 256-bit vectors of int32/fp32 accumulators per
# row, 4 rows -> 8 accumulator registers of the 16 ymm.
DENSE_NB = 16
DENSE_MB = 4
DENSE_ROWS_PER_TASK = 64
# Ternary x ternary popcount GEMM: 8 output channels = two 256-bit vectors of uint64 plane
# words per plane (the probe's best NB at batch 1), 4 rows per register tile.
TT_NB = 8
TT_MB = 4
TT_ROWS_PER_TASK = 64
T2_DEFAULT = {"nb": T2_NB, "mb": T2_MB, "rows": T2_ROWS_PER_TASK}
#: AVX-512 VNNI: 16-wide (zmm) tiles, two per block, 8 rows: 16 zmm accumulators. Intel's
#: cores issue two 512-bit ``vpdpbusd`` a cycle at a 5-cycle latency, so they need 10 or more
#: independent accumulators: 4 rows (8) took 1.19-1.51x the time of 8 on the ResNet-18 3x3
#: convs (emeraldrapids forced to ``avx512``; the same on 7x7 maps at batch 1, whose 49 rows
#: tile by 7 either way) and 1.04-1.30x on CIFAR's (``docs/measured/ab-x86-emr-vnni-rows.txt``).
#: 256 rows per task (each decoded weight block serves 32 register tiles instead of 8): 64 took
#: 1.00-1.12x the time of 256 on the ResNet-18 convs with one group, 0.99-1.26x on CIFAR's,
#: 0.93-1.06x with FGQ N=4 (``docs/measured/ab-x86-emr-vnni-task-rows.txt``). The 8-wide ymm
#: tiles stay in the grid.
T2_512_DEFAULT = {"nb": 32, "mb": 8, "rows": 256, "tn": 16}
#: ... except for one-tap layers (1x1 convs, linears) with at most this many inputs: there 8
#: rows took 1.15-1.61x the time of 4 (the CIFAR and ResNet-18 1x1/2 downsamples with 16-64
#: inputs, the 64 -> 10 classifier), so their plan keeps at most 4 rows per register tile
T2_512_SHORT_K = 64
#: ... and on these CPUs (AMD Zen: 512-bit ops on 256-bit units) everywhere. On znver4 8 rows
#: took 0.97-1.11x the time of 4 with one ternary group (ResNet-18, batch 1 and 64); FGQ's group
#: kernels, whose tile holds an int32 and a float32 accumulator per vector (8 rows x 2 zmm take
#: all 32 registers), 1.69-1.75x with N=4, 1.25-1.36x with N=16 and 1.15-1.21x with N=64; the
#: dense int8 7x7/2 stem (``i8_avx512vnni``) 1.81x at batch 1 and 2.19x at batch 64
#: (``docs/measured/ab-x86-znver4-vnni-rows.txt``). On emeraldrapids forced to ``avx512`` FGQ
#: N=4 and 64 took 0.85-1.02x with 8, one group 0.67-0.85x on the 3x3 convs, so Intel keeps 8
T2_512_4ROW_CPUS = frozenset({"znver4", "znver5"})
TT_DEFAULT = {"nb": TT_NB, "mb": TT_MB, "rows": TT_ROWS_PER_TASK}
#: AVX-512 VPOPCNTDQ: 16 channels (two zmm of int64 accumulators) x 2 rows (ResNet-18 3x3
#: convs 2-12% faster than 8 x 4 on znver4; on AVX2 8 x 4 stays best)
TT_512_DEFAULT = {"nb": 16, "mb": 2, "rows": TT_ROWS_PER_TASK}
#: AVX-512 popcount GEMMs keep ``sum popc(nz)`` and ``sum popc(neg)`` apart (``tt_split``: 6
#: vector ops per word and lane block instead of 7) from this many 64-bit words per group: the
#: ResNet-18 convs with 18-72 words ran 4-12% faster (batch 1 and 64), those with 1-9 words
#: within noise (0.97-1.03x) and the 3-word 7x7 stem 9-11% slower
TT_SPLIT_MIN_WORDS = 16
#: popcount GEMMs pack each bit-plane word with one compare into a mask (``GemmSpec.mask_words``;
#: words of 64 codes of an input row or pixel, or a pixel of 8-32 channels)
TT_MASK_WORDS = True
DENSE_DEFAULT = {"nb": DENSE_NB, "mb": DENSE_MB, "rows": DENSE_ROWS_PER_TASK}
#: AVX-512 FP32: 32 channels (two zmm) x 4 rows. One process on an Intel emeraldrapids, against
#: 16 x 4: the FP32 ResNet-18 stem (7x7/2 3 -> 64, which the ternary models keep in FP32)
#: 0.69-0.70x the time, the 512 -> 1000 fc 0.93x
DENSE_512_DEFAULT = {"nb": 32, "mb": 4, "rows": DENSE_ROWS_PER_TASK}
#: dense blocks are clamped to the layer's channels in whole vectors of this many lanes
#: (:func:`_plan_dense`; ``DENSE_CLAMP_LANES = 1024`` turns the clamp off for an A/B). With 32
#: on a 16-channel conv the FP32 kernel computed as many padding channels as real ones
DENSE_CLAMP_LANES = 16
#: row tasks of a dense conv whose block was clamped (a layer narrower than the block): at most
#: this many rows. On znver4 (one process, 1 thread; ``docs/measured/ab-x86-znver4-dense-narrow-
#: rows.txt``) 32-row tasks took the 3-channel CIFAR stem (3x32x32 -> 16, which the ternary CIFAR
#: models keep in FP32) 0.68-0.73x the time of 64-row ones, the 16-channel conv 0.92-1.00x; 32
#: rows on every layer gained nothing on the wider ones (the ResNet-18 stem 1.015x). With 64
#: rows LLVM vectorises the stem's im2col copy over the rows with 27 ``vgatherdps`` (none with
#: 32 at batch 1; unrolling its 27 columns did not remove them). Since the stem has no im2col
#: (``generic.inline_im2col``) the two take the same time (0.97-1.00x, in
#: ``ab-x86-znver4-inline-im2col.txt``)
DENSE_NARROW_ROWS = 32
#: LLVM CPUs whose 512-bit permutes (``vpermw``, ``vpermi2b``) issue about one per cycle beside
#: the adds, so that table lookups beat ``vpdpbusd`` and popcounts where the gates below say.
#: 1-thread instruction peaks (``bench/kernels/peaks.py``, GMAC/s): znver4 ``lut_vpermw`` 335
#: against ``int8_vpdpbusd`` 235, ``tt_vpermi2b`` 919 against ``tt_popcount`` 574; Intel
#: emeraldrapids 156-164 against 186-233 and 292-329 against 410-432 (its 512-bit permutes
#: issue on one port, about once every two cycles). There the lookups lost on every ResNet-18
#: 3x3 conv (docs/measured/kernels-x86-emr-resnet18-cifar-fea003e.md: ``t2_lut`` 0.43-0.77x
#: ``t2_vnni``, ``tt_lut`` 0.68-0.98x the popcount kernel) and are chosen on stems only. Zen 5
#: keeps Zen 4's full-width permute units (assumed; not measured here).
FULL_RATE_PERMUTE_CPUS = frozenset({"znver4", "znver5"})
#: table-lookup convs: 7 pixels of one output row x 2 zmm of 32 int16 lanes (64 channels);
#: with 3x3 kernels 14 accumulators + 6 index vectors stay in registers, and each input
#: column's table is loaded once for all 21 (pixel, tap) pairs that read it (znver4, 1 thread,
#: batch 1, one process against the 4-pixel x 128-channel tiles that loaded a table per (pixel,
#: tap): ResNet-18 3x3/1 convs 1-11% faster; 4 x 128 tiles: 16 accumulators, 7 x 128 spilled)
LUT_DEFAULT = {"nb": 64, "mb": 7, "rows": 1}
#: input channels from which the lookup kernel is chosen over vpdpbusd on 3x3/1 convs (znver4,
#: 1 thread, speed over the VNNI kernel at batch 1 / 64 in the kernels run of docs/kernels.md:
#: 32 channels 0.90 / 0.92, 64 1.01 / 1.01-1.11, 128 1.15 / 1.14, 256 1.15 / 1.05, 512
#: 1.12 / 1.12; the 7x7/2 3-channel stem 1.85 / 1.72; stride-2 3x3 convs 0.57-1.07, 1x1 convs
#: 0.20-0.76)
LUT_MIN_CHANNELS = 64
#: input channels from which it is chosen on convs whose tables are read 2-9 times (3x3/2).
#: With row tiles and byte indices, speed over the VNNI kernel (batch 1 / 64; one process, then
#: the kernels run at 346f515): 3x3/2 256 -> 512 1.08x / 1.08x, 1.10x / 1.07x; 128 -> 256
#: 0.93x / 1.02x, 0.99x / 0.92x; 64 -> 128 0.92x (batch 1, one process). Since: 128 -> 256 at
#: batch 1 1.06x (run c424f6f), 1.04x and 1.04x (the two runs at fe33809), 1.05x (one process,
#: d0e3aa2); at batch 64 1.04x, 1.12x, 1.11x and 0.95x; 64 -> 128 0.89-0.92x at batch 1
LUT_MIN_CHANNELS_STRIDED = 128
#: ... or 64 where it has dot-product channels (:func:`lut_dp_applies`): 3x3/2 64 -> 128 then
#: ran 0.80x the time of the plain lookups and 0.91x that of the VNNI kernel (one process,
#: batch 1; ``docs/measured/ab-x86-znver4-lut-dp.txt``)
LUT_MIN_CHANNELS_STRIDED_DP = 64
#: most bytes of int8 weights a ``t2_lut`` conv's dot-product channels may take (per layer):
#: past about half of Zen 4's 1 MB L2 they lost (batch 1, one process, against plain lookups:
#: 3x3/2 256 -> 512, 0.63 MB, 1.01x the time; 3x3/1 512, 1.25 MB, 1.02x; 3x3/1 256, 0.31 MB,
#: 0.91x; ``docs/measured/ab-x86-znver4-lut-dp.txt``)
LUT_DP_MAX_BYTES = 512 << 10
#: pixels per tile with dot-product channels: 7 x 32 channels hold 7 int16 + 14 int32
#: accumulators, 3 index and 2 weight vectors; 8 pixels spilled (1.04x the time of plain
#: lookups on 128x28x28, against 0.91x with 7). Output rows that such tiles pad by more than
#: 1/8 keep the plain lookups: CIFAR's 64x8x8 conv, in tiles of 6 + 2 pixels, took 1.21x /
#: 1.18x the plain lookups' time (8-pixel tiles) at batch 1 / 64 (``ab-x86-znver4-lut-dp.txt``)
LUT_DP_MAX_PIXELS = 7
#: ternary x ternary byte-table lookups: 7 pixels of one output row x 2 zmm of 64 int8 lanes
#: (128 channels); with 3x3 kernels 14 accumulators + 6 index vectors stay in registers (4 x 4
#: zmm and 12 indices spilled: 3.7x slower)
TT_LUT_DEFAULT = {"nb": 128, "mb": 7, "rows": 1}
#: input and output channels from which they are chosen over the popcount kernel (znver4, 1
#: thread, kernels run e147874, batch 1 / 64; row tiles that load each input column's table row
#: once, activation codes built 16 quads per vpmaddubsw + vpmaddwd): ResNet-18 3x3 convs 1.21-1.40x
#: / 1.09-1.14x (stride 1), 1.25-1.38x / 0.97-1.06x (stride 2); CIFAR 64x8x8 1.22x / 1.34x, 3x3/2
#: 32 -> 64 1.17x / 1.26x, 32x16x16 1.00x / 1.02x, 16 channels 0.58-0.91x. Stems with <= 4
#: channels take it whatever their kernel (7x7/2 3 -> 64 2.06x / 2.31x, 3x3 3 -> 16 1.68x / 1.73x).
#: The outputs fill its 64 byte lanes: 16 outputs lose (16 -> 16 3x3/1 0.73-0.75x in three runs
#: and one process since fe33809, 0.75-0.89x at batch 64 with RTN's offsets)
TT_LUT_MIN_CHANNELS = 32
#: inputs of a wider-than-one-tap conv from which it is chosen (with TT_LUT_MIN_CHANNELS outputs):
#: since fe33809, 16 inputs win: CIFAR's 3x3/2 16 -> 32 1.07-1.13x / 1.19x in three kernels
#: runs; in one process (batch 1 / 64, without / with RTN's offsets) 3x3/1 16 -> 32 1.07x,
#: 1.07x / 1.09x, 1.34x; 3x3/2 16 -> 32 1.12x, 1.03x / 1.18x, 1.07x; 3x3/1 16 -> 64 on 16x16
#: 1.56x, 1.50x / 1.61x, 1.84x
TT_LUT_MIN_INPUTS = 16
#: ... but with fewer inputs than TT_LUT_FEW_INPUTS, from TT_LUT_MIN_CHANNELS_FEW_INPUTS outputs:
#: since the popcount kernel packs its words as compare masks (``GemmSpec.mask_words``) it
#: wins the 16 -> 32 convs (one process, batch 1 / 64, popcount over lookup time: 3x3/2
#: 0.67-0.74x with or without RTN's offsets; 3x3/1 0.88-0.92x except 1.16-1.18x at batch 64 with
#: the offsets); 16 -> 64 on 16x16 stays on the lookups (1.36-1.65x), as do 32 inputs
#: (0.99-1.21x; ``docs/measured/ab-x86-znver4-ttlut-vs-popc-16-inputs.txt``)
TT_LUT_FEW_INPUTS = 32
TT_LUT_MIN_CHANNELS_FEW_INPUTS = 64
#: 1x1 convs share no rows; with the biased widening and byte codes (fe33809) they are chosen
#: from 64 inputs. ResNet-18's 1x1/2 downsamples (64, 128, 256 inputs), speed over the popcount
#: kernel in one process, batch 1: 1.55x, 1.42x, 1.20x; batch 64: 1.47x, 1.56x, 0.84x (the two
#: kernels runs at fe33809: 1.41-1.51x, 1.42x, 1.16-1.19x at batch 1; 256 -> 512 at batch 64
#: 1.30x and 0.85x); CIFAR's (16 and 32 inputs) 0.59-0.76x, so they stay on the popcount kernel
TT_LUT_MIN_CHANNELS_1X1 = 64


@functools.cache
def _u8s8_8x4_desc(tn: int = 8) -> Any:
    """What every x86 int8 tile intrinsic computes: ``C[i] += sum_k u8 A[k] * s8 W[i, k]``
    for a ``tn`` x 4 tile (8: 256-bit, 16: 512-bit) into a local int32 accumulator (AVX2 and
    VNNI implement it)."""
    _tvm.require_tvm()
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]
        W: T.Buffer((tn, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        C: T.Buffer((tn,), "int32", offset_factor=1, scope=TILE_SCOPE),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:tn], A[0:4], W[0:tn, 0:4])
            T.writes(C[0:tn])
            for i in T.serial(0, tn):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", W[vi, vk])

    return desc


@functools.cache
def register_avx2_intrinsic() -> str:
    """Register the u8 x s8 -> i32 8x4 AVX2 tensor intrinsic once per process."""
    tvm = _tvm.require_tvm()
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]
        W: T.Buffer((8, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        C: T.Buffer((8,), "int32", offset_factor=1, scope=TILE_SCOPE),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], W[0:8, 0:4])
            T.writes(C[0:8])
            # the 4 activation bytes broadcast to all 8 lanes of 32 bits
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")
            w_x32 = W.vload([0, 0], dtype="int8x32")
            p16 = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a_x32, w_x32,
                dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), p16, T.int16x16(1),
                dtype="int32x8")

    try:
        tvm.s_tir.TensorIntrin.register(AVX2_U8S8_8X4, _u8s8_8x4_desc(), impl)
    except Exception:  # tvm raises a generic error when the name exists (e.g. module reload)
        tvm.s_tir.TensorIntrin.get(AVX2_U8S8_8X4)
    return AVX2_U8S8_8X4


@functools.cache
def _u8s8_chain_desc() -> Any:
    """What the AVX2 chain intrinsic computes: ``C[i] += sum_k u8 A[k] * s8 W[k // 4, i, k % 4]``
    over 16 k (four 8 x 4 tiles, 128 contiguous bytes of ``W_dec``)."""
    _tvm.require_tvm()
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((16,), "uint8", offset_factor=1),  # type: ignore[valid-type]
        W: T.Buffer((4, 8, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        C: T.Buffer((8,), "int32", offset_factor=1, scope=TILE_SCOPE),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:16], W[0:4, 0:8, 0:4])
            T.writes(C[0:8])
            for r, i, k in T.grid(4, 8, 4):
                with T.sblock("update"):
                    vi = T.axis.spatial(8, i)
                    vk = T.axis.reduce(16, r * 4 + k)
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", W[vk // 4, vi, vk % 4])

    return desc


@functools.cache
def register_avx2_chain_intrinsic() -> str:
    """The AVX2 tile over 16 k with an int16 accumulation chain: four ``vpmaddubsw`` summed
    with ``vpaddw``, then one ``vpmaddwd(., 1)`` + ``vpaddd`` into int32 (12 ops -> 9, and 8
    multiplies -> 5 on the two ports that run them). Each int16 lane sums 8 products
    ``(a + 128) * w`` with ``|w| <= 1``: at most 8 * 255 = 2040, no saturation (ternary
    weights only: full-range int8 weights overflow one pair)."""
    tvm = _tvm.require_tvm()
    from tvm.script import tirx as T

    def step(a: Any, w: Any, r: int) -> Any:
        """``vpmaddubsw`` of k = 4r..4r+3: the 4 activation bytes broadcast to all 8 lanes,
        times the r-th 8 x 4 weight tile (an expression: a named temporary inside the
        intrinsic became a workspace allocation per tile)."""
        word = T.reinterpret(a.vload([4 * r], "uint8x4"), dtype="int32")
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
            T.reinterpret(T.broadcast(word, 8), dtype="uint8x32"),
            w.vload([r, 0, 0], dtype="int8x32"), dtype="int16x16")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((16,), "uint8", offset_factor=1),  # type: ignore[valid-type]
        W: T.Buffer((4, 8, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        C: T.Buffer((8,), "int32", offset_factor=1, scope=TILE_SCOPE),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:16], W[0:4, 0:8, 0:4])
            T.writes(C[0:8])
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                (step(A, W, 0) + step(A, W, 1)) + (step(A, W, 2) + step(A, W, 3)),
                T.int16x16(1), dtype="int32x8")

    try:
        tvm.s_tir.TensorIntrin.register(AVX2_U8S8_CHAIN, _u8s8_chain_desc(), impl)
    except Exception:  # tvm raises a generic error when the name exists (e.g. module reload)
        tvm.s_tir.TensorIntrin.get(AVX2_U8S8_CHAIN)
    return AVX2_U8S8_CHAIN


#: LLVM intrinsic per VNNI flavour and tile width: AVX512-VNNI (+VL for the 256-bit EVEX
#: form; 512-bit ``zmm`` for 16-wide tiles) or AVX-VNNI (VEX, 256-bit only); LLVM has one
#: 256-bit intrinsic for both and picks the encoding from the target's features
VNNI_LLVM = {("avx512vnni", 8): "llvm.x86.avx512.vpdpbusd.256",
             ("avx512vnni", 16): "llvm.x86.avx512.vpdpbusd.512",
             ("avxvnni", 8): "llvm.x86.avx512.vpdpbusd.256"}


@functools.cache
def register_vnni_intrinsic(flavour: str, tn: int = 8) -> str:
    """The same ``tn`` x 4 u8 x s8 -> i32 tile as :func:`register_avx2_intrinsic` (tn = 8), as
    one ``vpdpbusd`` (multiply, sum 4, accumulate: 3 AVX2 instructions in one) per tile; with
    tn = 16 one 512-bit ``vpdpbusd zmm`` covers twice the output channels."""
    tvm = _tvm.require_tvm()
    from tvm.script import tirx as T

    name = f"ternbench_{flavour}_u8s8i32_{tn}x4_local"
    llvm_name = VNNI_LLVM[(flavour, tn)]
    nbytes = 4 * tn

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]
        W: T.Buffer((tn, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        C: T.Buffer((tn,), "int32", offset_factor=1, scope=TILE_SCOPE),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:tn], A[0:4], W[0:tn, 0:4])
            T.writes(C[0:tn])
            # LLVM 22 types both byte operands as <4T x i8> (signedness is the instruction's)
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_xb = T.reinterpret(T.broadcast(a_i32, tn), dtype=f"int8x{nbytes}")
            C[T.ramp(T.int32(0), 1, tn)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name), C[T.ramp(T.int32(0), 1, tn)],
                a_xb, W.vload([0, 0], dtype=f"int8x{nbytes}"), dtype=f"int32x{tn}")

    try:
        tvm.s_tir.TensorIntrin.register(name, _u8s8_8x4_desc(tn), impl)
    except Exception:  # already registered in this process
        tvm.s_tir.TensorIntrin.get(name)
    return name


def _schedule_t2_vnni(flavour: str) -> Any:
    def schedule(func: Any, spec: GemmSpec) -> Any:
        return schedule_t2_avx2(func, spec, register_vnni_intrinsic(flavour, spec.tile_n))

    schedule.__name__ = f"schedule_t2_{flavour}"
    return schedule


def schedule_t2_avx2(func: Any, spec: GemmSpec, intrin: str | None = None) -> Any:
    """Tensorized ternary GEMM: ``(task | mo | g | ko | kr | mi | nb | [ni x ki] = intrinsic)``.

    The decoded weight block lives at the task level when a task has several row tiles (decoded
    once, reused by all of them) and at the ``ko`` level otherwise (batch-1 layers: each weight is
    used once, so a 32 x NB/8-byte tile in L1 is enough). Groups need ``gs % 4 == 0``: a group
    of 4, 8 or 12 is 1-3 intrinsic steps followed by its epilogue.
    """
    tvm = _tvm.require_tvm()
    if intrin is None:
        if spec.tile_n != 8:
            raise ValueError("the AVX2 intrinsic covers 8-wide tiles only (16: AVX-512 VNNI)")
        intrin = register_avx2_intrinsic()
    sch = tvm.s_tir.Schedule(func)
    acc, ep, out, wd = (sch.get_sblock(n) for n in ("acc", "ep", "out", "W_dec"))
    m, g, n, kk = sch.get_loops(acc)
    mp, mo, mi = sch.split(m, [None, spec.m_task, spec.mb])
    tn = spec.tile_n
    no, nb, ni = sch.split(n, [None, spec.nb // tn, tn])
    chain = (intrin == AVX2_U8S8_8X4 and AVX2_INT16_CHAIN and spec.gs % AVX2_TILE_K == 0
             and spec.layout == "t2_avx2")
    if spec.gs % AVX2_TILE_K == 0:
        ko, kr, ki = sch.split(kk, [None, 4, 4])  # kk = ko*16 + kr*4 + ki
        red = [ko, kr]
    else:  # small groups (4, 8, 12): gs/4 sub-tiles of 4 k per group
        kr, ki = sch.split(kk, [None, 4])
        red = [kr]
    if chain:  # the 16 k of a tile inside the intrinsic: (mi | nb | [kr x ni x ki])
        sch.reorder(mp, no, mo, g, ko, mi, nb, kr, ni, ki)
        tile, intrin = kr, register_avx2_chain_intrinsic()
    else:
        sch.reorder(mp, no, mo, g, *red, mi, nb, ni, ki)
        tile = ni
    fuse_epilogue(sch, acc, ep, out, g, mo)
    sch.compute_at(wd, no if spec.m_task > 1 else red[0])
    wl = sch.get_loops(wd)
    sch.vectorize(sch.fuse(wl[-2], wl[-1]))  # 32 bytes: one shift + mask + sub
    sch.unroll(mi)
    sch.unroll(nb)
    if not chain:
        sch.unroll(kr)
    mod = finish_tensorized(sch, spec, acc, ep, out, (mp, no), g, red[0], tile, intrin)
    return _correction_into_init(mod)


def _correction_into_init(mod: Any) -> Any:
    """Start each group's accumulator at ``-Cw[g, n]`` instead of 0 and drop the ``- Cw`` from
    the group epilogue: ``vpdpbusd`` adds onto the loaded correction, so the exact int32
    ``acc - Cw`` costs no subtraction per group and lane block (FGQ N=4 did one per 4 k)."""
    tvm = _tvm.require_tvm()
    import tvm_ffi

    tirx, s_tir = tvm.tirx, tvm.s_tir
    func = mod["main"]
    cw = next((p for p in func.params if getattr(p, "name", "") == "Cw"), None)
    if cw is None:  # a layout without the correction
        return mod
    from tvm.ir.prim.expr import Sub

    def rewrite(blk: Any) -> Any:
        body = blk.body
        if blk.name_hint == "acc_init" and isinstance(body, tirx.BufferStore):
            _m, vg, vn = (iv.var for iv in blk.iter_vars)
            nbw = int(cw.shape[2])  # block-major [Np/nb, G, nb] (see ops.gemm_compute)
            at = (vn // nbw, vg, vn % nbw)
            store = tirx.BufferStore(body.buffer, tirx.const(0, "int32") - cw[at],
                                     body.indices)
            return s_tir.SBlock(blk.iter_vars, [cw[at[0]:at[0] + 1, vg:vg + 1,
                                                   at[2]:at[2] + 1]], blk.writes,
                                blk.name_hint, store, blk.init, blk.alloc_buffers,
                                blk.match_buffers, blk.annotations)
        if blk.name_hint == "ep_update":
            def drop(sub: Any) -> Any:
                b = sub.b
                return sub.a if getattr(b, "source", None) is not None and \
                    b.source.same_as(cw) else sub

            new_body = tvm_ffi.structural_map(body, [(Sub, drop)])
            return s_tir.SBlock(blk.iter_vars, blk.reads, blk.writes, blk.name_hint, new_body,
                                blk.init, blk.alloc_buffers, blk.match_buffers,
                                blk.annotations)
        return blk

    new = tvm_ffi.structural_map(func, [(s_tir.SBlock, rewrite)])
    return tvm.IRModule({"main": new})


def schedule_tt_popc(func: Any, spec: GemmSpec) -> Any:
    """Ternary x ternary (``tt_planes``) on AVX2: the blocked nest vectorised over 8 output
    channels of uint64 words; LLVM lowers the vector popcount to ``vpshufb`` nibble lookups
    plus ``vpsadbw`` (AVX2 has no vector popcount instruction)."""
    return schedule_gemm(func, spec, vector_n=True)


def schedule_t2_f32(func: Any, spec: GemmSpec) -> Any:
    """Ternary weights, float activations (``t2_decoded``): the 2-bit codes are decoded into a
    float32 tile (2 integer ops + 1 convert per 8 weights) once per task, or per 4-k step for
    single-row-tile tasks (batch-1 linears), and the GEMM is the ``tvm_fp32`` blocked schedule
    with the same tiles on it."""
    return schedule_blocked(func, spec)


def _is_x86(target: _tvm.TargetInfo) -> bool:
    return target.is_x86 and target.kind == "llvm"


def _applies_t2_avx2(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    if not (_is_x86(target) and target.has("avx2")):
        return False
    if lx.weight_format != "ternary" or lx.act_mode != "int" or lx.act_qmax > 127:
        return False
    gs = int(lx.group_size)
    # one group: K is zero-padded to the 16-wide tile; several: each group must be whole
    # 4-k steps of the intrinsic (a partial last group and the tile padding are zero-padded)
    return gs >= lx.fan_in or gs % 4 == 0


def _has_vnni(flavour: str, target: _tvm.TargetInfo) -> bool:
    if flavour == "avx512vnni" and not (target.has("avx512vl") and target.has("avx512bw")):
        return False  # the 256-bit EVEX form needs AVX512-VL, the zmm byte decode BW
    return target.has(flavour)


def _applies_vnni(flavour: str) -> Any:
    def applies(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
        return _has_vnni(flavour, target) and _applies_t2_avx2(lx, target)

    return applies


def _clamp_block(nb: int, channels: int, lanes: int) -> int:
    """A channel block no wider than the layer, in whole ``lanes``-wide vectors or tiles (a
    wider one computes padding channels).

    Example:
        >>> _clamp_block(32, 16, 16), _clamp_block(32, 10, 8), _clamp_block(32, 64, 16)
        (16, 16, 32)
    """
    return min(nb, -(-channels // lanes) * lanes)


def _tile_plan(layout: Any) -> Any:
    """The plan of the u8 x s8 tile rules (``t2_avx2`` / ``i8_avx2`` layouts)."""
    def plan(lx: LayerExport, batch: int, target: _tvm.TargetInfo,
             params: Params) -> GemmSpec:
        kw = tile_kwargs(params, T2_DEFAULT)
        # a block wider than the layer (16-channel CIFAR layers under 32-wide AVX-512
        # blocks) would compute padding channels: clamp it to the channels, whole tiles
        tn = kw.get("tile_n", 8)
        kw["nb"] = _clamp_block(kw["nb"], lx.out_channels, tn)
        if tn == 16 and (lx.fan_in <= T2_512_SHORT_K and tuple(lx.kernel_size) == (1, 1)
                         or target.mcpu in T2_512_4ROW_CPUS):
            kw["mb_max"] = min(kw["mb_max"], 4)
        return plan_gemm(lx, batch, layout, **kw)

    return plan


_plan_t2_avx2 = _tile_plan("t2_avx2")


def _applies_tt_popc(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    # the vector popcount is only worth it with AVX2's 256-bit vpshufb; any group size works
    # (groups are padded to whole 64-bit words)
    return (_is_x86(target) and target.has("avx2") and lx.weight_format == "ternary"
            and lx.act_mode == "ternary")


def _mask_words(spec: GemmSpec) -> GemmSpec:
    # bit-plane words as one compare each wherever they hold whole runs of codes
    return dataclasses.replace(spec, mask_words=TT_MASK_WORDS and spec.mask_lanes > 0)


def _plan_tt_popc(lx: LayerExport, batch: int, target: _tvm.TargetInfo,
                  params: Params) -> GemmSpec:
    return _mask_words(plan_gemm(lx, batch, "tt_planes", **tile_kwargs(params, TT_DEFAULT)))


def _applies_tt_popc512(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return (_applies_tt_popc(lx, target) and target.has("avx512vpopcntdq")
            and target.has("avx512dq"))


def _plan_tt_popc512(lx: LayerExport, batch: int, target: _tvm.TargetInfo,
                     params: Params) -> GemmSpec:
    # int64 accumulators: vpopcntq's 64-bit lanes added as they are (no narrowing per word),
    # converted once per output (vcvtqq2ps, AVX512-DQ)
    spec = plan_gemm(lx, batch, "tt_planes", **tile_kwargs(params, TT_512_DEFAULT))
    return _mask_words(dataclasses.replace(spec, tt_acc64=True,
                                           tt_split=spec.gsp // 64 >= TT_SPLIT_MIN_WORDS))


def _applies_t2_f32(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    # plain vector code (decode + FMA/mul-add): any x86 LLVM target, no intrinsics
    return _is_x86(target) and lx.weight_format == "ternary" and lx.act_mode == "fp32"


def _plan_t2_f32(lx: LayerExport, batch: int, target: _tvm.TargetInfo,
                 params: Params) -> GemmSpec:
    return plan_gemm(lx, batch, "t2_decoded",
                     **tile_kwargs(params, DENSE_DEFAULT))


def full_rate_permutes(target: _tvm.TargetInfo) -> bool:
    """Whether ``target``'s CPU runs 512-bit permutes at full rate (FULL_RATE_PERMUTE_CPUS):
    where it does not, the table-lookup kernels are chosen on stems (<= 4 inputs) only.

    Example:
        >>> import dataclasses
        >>> from ternbench.schedules import _tvm
        >>> zen4 = _tvm.TargetInfo(name="x86", target_str="{}", kind="llvm", mcpu="znver4",
        ...                        is_x86=True, features=frozenset())
        >>> full_rate_permutes(zen4), full_rate_permutes(dataclasses.replace(zen4,
        ...                                                  mcpu="sapphirerapids"))
        (True, False)
    """
    return target.mcpu in FULL_RATE_PERMUTE_CPUS


def _applies_t2_lut_any(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where the ``t2_lut`` kernel can run: one-group int8-activation ternary convs on AVX-512BW
    (``vpermw zmm``)."""
    if not (_is_x86(target) and target.has("avx512f") and target.has("avx512bw")):
        return False
    return (lx.op == "conv2d" and lx.weight_format == "ternary" and lx.act_mode == "int"
            and lx.act_qmax <= 127 and int(lx.group_size) >= lx.fan_in)


def _applies_t2_lut(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where it is chosen over ``vpdpbusd``: convs whose input tables are each read >= 9 times
    (``kh * kw / (sh * sw)``: 3x3/1, 7x7/2) with >= LUT_MIN_CHANNELS inputs or a stem's <= 4
    (one triple per tap: ``vpdpbusd`` pads its 4-byte steps), and those read >= 2 times (3x3/2)
    with >= LUT_MIN_CHANNELS_STRIDED inputs; without full-rate permutes
    (:func:`full_rate_permutes`) the stems only. Measured: docs/kernels.md."""
    if not _applies_t2_lut_any(lx, target):
        return False
    (kh, kw), (sh, sw) = lx.kernel_size, lx.stride
    reuse, c = kh * kw / (sh * sw), lx.in_channels
    if not full_rate_permutes(target):
        return reuse >= 9 and c <= 4
    strided = LUT_MIN_CHANNELS_STRIDED_DP if lut_dp_applies(lx, target) else (
        LUT_MIN_CHANNELS_STRIDED)
    return ((reuse >= 9 and (c >= LUT_MIN_CHANNELS or c <= 4))
            or (reuse >= 2 and c >= strided))


def lut_dp_applies(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Whether a ``t2_lut`` conv sends some input channels to ``vpdpbusd`` (:attr:`GemmSpec.
    lut_dp`): on full-rate-permute CPUs with AVX512-VNNI, where the channels split into the
    chunks of :func:`.ops.lut.lut_dp_geometry_of`, the int8 weights of the multiplied
    channels take at most :data:`LUT_DP_MAX_BYTES`, and the default tiles (at most
    :data:`LUT_DP_MAX_PIXELS` pixels) pad the output row by at most 1/8. With them the plan
    takes 32-channel tiles whatever the grid point's ``nb`` (the kernel benchmark's ``params``
    column keeps the point asked for, ``tile`` the tiles built).

    Example:
        >>> from ternbench.schedules import _tvm
        >>> from ternbench.bench.kernels.layers import synthetic_layer
        >>> from ternbench.bench.kernels.shapes import select_shapes
        >>> zen4 = _tvm.TargetInfo(name="x86", target_str="{}", kind="llvm", mcpu="znver4",
        ...                        is_x86=True, features=frozenset({"avx512f", "avx512bw",
        ...                                                          "avx512vnni"}))
        >>> convs = {s.label: synthetic_layer(s, "ternary", "int8")
        ...          for s in select_shapes("resnet18") if s.op == "conv2d"}
        >>> [lut_dp_applies(convs[k], zen4) for k in ("conv 3x3/1 256x14x14->256",
        ...                                           "conv 3x3/1 512x7x7->512")]
        [True, False]
    """
    if not (_applies_t2_lut_any(lx, target) and target.has("avx512vnni")
            and full_rate_permutes(target)):
        return False
    geo = lut_dp_geometry_of(lx.in_channels, tuple(lx.kernel_size))  # type: ignore[arg-type]
    if geo is None:
        return False
    kh, kw = lx.kernel_size
    if kh * kw * geo.nc * geo.qc * 4 * lx.out_channels > LUT_DP_MAX_BYTES:
        return False
    # the row tiles the planner takes (LUT_DP_MAX_PIXELS - 1 or one more pixel, whichever pads
    # the output row less) may pad it by at most 1/8
    wo = layer_geometry(lx)[1][1]
    mb = row_tile_pixels(wo, LUT_DP_MAX_PIXELS - 1)
    padded = -(-wo // mb) * mb
    return 8 * (padded - wo) <= padded


def _plan_t2_lut(lx: LayerExport, batch: int, target: _tvm.TargetInfo,
                 params: Params) -> GemmSpec:
    kw = tile_kwargs(params, LUT_DEFAULT)
    if lut_dp_applies(lx, target):
        # 32-channel tiles (7 pixels: 7 int16 + 14 int32 accumulators); the planner takes
        # mb_max or one more pixel, whichever pads the row less
        mb = min(kw["mb_max"], LUT_DP_MAX_PIXELS - 1)
        return with_lut_dp(plan_gemm(lx, batch, "t2_lut", nb=LUT_LANES, mb_max=mb,
                                     rows_per_task=kw["rows_per_task"]))
    kw["nb"] = _clamp_block(kw["nb"], lx.out_channels, LUT_LANES)
    return plan_gemm(lx, batch, "t2_lut", **kw)


def schedule_t2_lut(func: Any, spec: GemmSpec) -> Any:
    """The ``t2_lut`` and ``tt_lut`` PrimFuncs come scheduled (:mod:`.ops.lut`,
    :mod:`.ops.ttlut`)."""
    tvm = _tvm.require_tvm()
    return tvm.IRModule({"main": func})


def _applies_i8_vnni(flavour: str) -> Any:
    """Dense int8 weights x int8 activations on the VNNI tile intrinsic (never AVX2's
    ``vpmaddubsw``: a u8 x s8 pair sum of full-range weights overflows int16)."""
    def applies(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
        if not (_is_x86(target) and _has_vnni(flavour, target)):
            return False
        return lx.weight_format == "int8" and lx.act_mode == "int" and lx.act_qmax <= 127

    return applies


_plan_i8_vnni = _tile_plan("i8_avx2")


def _applies_dense(fmt: str) -> Any:
    def applies(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
        return _is_x86(target) and lx.weight_format == fmt and lx.act_mode in ("int", "fp32")

    return applies


def _applies_dense_512(fmt: str) -> Any:
    def applies(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
        return _applies_dense(fmt)(lx, target) and target.has("avx512f")

    return applies


def _plan_dense(lx: LayerExport, batch: int, target: _tvm.TargetInfo,
                params: Params) -> GemmSpec:
    kw = tile_kwargs(params, DENSE_DEFAULT)
    # the 16-channel CIFAR and Fashion-MNIST convs under the 32-wide AVX-512 default
    nb = _clamp_block(kw["nb"], lx.out_channels, DENSE_CLAMP_LANES)
    if nb < kw["nb"] and lx.op == "conv2d":
        kw["rows_per_task"] = min(kw["rows_per_task"], DENSE_NARROW_ROWS)
    kw["nb"] = nb
    return plan_gemm(lx, batch, "dense_blocked", **kw)


def _grid(nbs: tuple[int, ...], mbs: tuple[int, ...], rows: tuple[int, ...],
          default: dict[str, int], tns: tuple[int, ...] = ()) -> tuple[Params, ...]:
    """Default first, then the rest of the cartesian grid (what a per-shape search tries);
    ``tns``: int8 tile widths to try (points whose ``nb`` is not a multiple are left out)."""
    pts: list[dict[str, int]] = [{"nb": n, "mb": m, "rows": r} for n in nbs for m in mbs
                                 for r in rows]
    if tns:
        pts = [{**p, "tn": t} for t in tns for p in pts if p["nb"] % t == 0]
    return (default, *[p for p in pts if p != default])


def lut_rule(*, where_chosen: bool = True) -> Rule:
    """The ``t2_lut`` rule; ``where_chosen=False`` applies wherever the kernel can run (the
    kernel benchmark times it beside the VNNI kernel on every int8-activation conv)."""
    return Rule("x86.t2_lut", "tvm_t2_lut",
                _applies_t2_lut if where_chosen else _applies_t2_lut_any, _plan_t2_lut,
                schedule_t2_lut, grid=_grid((64, 32), (7, 4, 14), (1,), LUT_DEFAULT))


def _amx_conv(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """A one-group ternary-weight conv with a multiple of 64 input channels on AMX-INT8, in a
    process Linux granted the tile state (:func:`.._tvm.enable_amx`)."""
    if not (_is_x86(target) and target.has("amx-tile") and target.has("amx-int8")):
        return False
    return (lx.op == "conv2d" and lx.weight_format == "ternary"
            and int(lx.group_size) >= lx.fan_in and lx.in_channels % 64 == 0
            and _tvm.enable_amx())


def _applies_t2_amx(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where the ``t2_amx`` kernel can run: :func:`_amx_conv` with int8 activations."""
    return lx.act_mode == "int" and lx.act_qmax <= 127 and _amx_conv(lx, target)


def _applies_t2_amx_chosen(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where it is chosen: wherever it runs. Measured on an Intel emeraldrapids (1 thread;
    speed over ``t2_vnni``, batch 1 / 64; docs/kernels.md, "Intel"): ResNet-18's 3x3 convs
    1.61-5.9x / 3.3-5.5x in the ``d84b6f2`` run; its 1x1/2 downsamples, with phase planes,
    1.23-1.69x / 1.18-1.39x in that run and 1.27-1.66x / 1.25-1.83x in the ``ae8ba10`` one
    (chosen since; with row tiles they had run 0.80-1.46x / 0.35-1.37x)."""
    return _applies_t2_amx(lx, target)


def _plan_amx(layout: WeightLayout) -> Any:
    def plan(lx: LayerExport, batch: int, target: _tvm.TargetInfo, params: Params) -> GemmSpec:
        return plan_gemm(lx, batch, layout, nb=AMX_NB, mb_max=16, rows_per_task=16)

    return plan


def amx_rule(*, where_chosen: bool = True) -> Rule:
    """The ``t2_amx`` rule (AMX ``tdpbssd`` on 2-bit weights decoded per call);
    ``where_chosen=False`` applies wherever the kernel can run (the kernel benchmark times it
    beside the chosen kernel on every int8-activation conv with 64k input channels)."""
    return Rule("x86.t2_amx", "tvm_t2_amx",
                _applies_t2_amx_chosen if where_chosen else _applies_t2_amx,
                _plan_amx("t2_amx"), schedule_t2_lut)


def _applies_bf16_amx(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where the ``bf16_amx`` kernel runs: grouped (FGQ) ternary-weight convs with int8
    activations on AMX-BF16 (row chunks for channel counts off 32k), in a process Linux
    granted the tile state. One-group layers stay on ``t2_amx`` (int8 tiles do 2x the MACs
    of bf16 ones, and need no second piece); 1x1 convs with fewer than 64 input channels on
    the integer group kernel (FGQ N=4 against ``t2_vnni``'s group kernel, one process:
    CIFAR's 1x1/2 32 -> 64 and 16 -> 32 ran 0.45-1.0x its speed at batch 1 / 64; the other
    ResNet-18 and CIFAR convs 1.4-4.4x at batch 1 and 1.1-4.3x at batch 64, but CIFAR's
    3-channel stem 0.9x at batch 1 (1.6x at batch 64); docs/kernels.md "Intel")."""
    if not (_is_x86(target) and target.has("amx-tile") and target.has("amx-bf16")):
        return False
    one_tap = tuple(lx.kernel_size) == (1, 1)
    return (lx.op == "conv2d" and lx.weight_format == "ternary" and lx.act_mode == "int"
            and lx.act_qmax <= 127 and int(lx.group_size) < lx.fan_in
            and not (one_tap and lx.in_channels < 64)
            and _tvm.enable_amx())


def bf16_amx_rule() -> Rule:
    """The ``bf16_amx`` rule: FGQ's grouped convs on AMX ``tdpbf16ps``, the weights (codes
    times their group scales) split into exact bf16 pieces (:func:`.ops.amx.bf16_pieces`: two
    for FGQ's FP16 scales), so every product is exact and the sums are float32 like torch's.
    Per group, an integer kernel converts and scales every few MACs (``vpdpbusd`` + convert +
    FMA for N = 4: the ``fgq4`` peak); here the group size costs nothing."""
    return Rule("x86.bf16_amx", "tvm_bf16_amx", _applies_bf16_amx, _plan_amx("bf16_amx"),
                schedule_t2_lut)


def _applies_fp32_amx(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where FP32 convs run on ``bf16_amx`` (weights and inputs as three exact bf16 pieces
    each, the six piece products with ``i + j <= 2``): AMX-BF16, in a process Linux granted
    the tile state."""
    if not (_is_x86(target) and target.has("amx-tile") and target.has("amx-bf16")):
        return False
    return (lx.op == "conv2d" and lx.weight_format == "fp32" and lx.act_mode == "fp32"
            and _tvm.enable_amx())


def _applies_fp32_amx_chosen(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where it is chosen over the AVX-512 FP32 GEMM: convs wider than one tap. One process,
    batch 1, against ``x86.fp32_512`` on an Intel emeraldrapids: ResNet-18's 7x7/2 stem 0.75x
    the time (batch 64: 0.65x), its 3x3 convs 0.42x (64x56x56, 256x14x14) and 0.81x
    (512x7x7), CIFAR's 16-channel 3x3 0.72x and its 3-channel stem 1.01x (batch 64: 0.90x);
    the 1x1/2 downsample 64 -> 128 took 1.41x (docs/kernels.md, "Intel")."""
    return _applies_fp32_amx(lx, target) and tuple(lx.kernel_size) != (1, 1)


def fp32_amx_rule(*, where_chosen: bool = True) -> Rule:
    """FP32 convs (the stems ternary models keep in FP32) on AMX ``tdpbf16ps``: each float32
    weight and input split exactly into three bf16 pieces, and the products of the pieces
    whose orders sum to at most 2 (six of nine: each one left out is at most about 2^-24 of
    its product, float32's own unit roundoff); the sums are float32, as in torch's conv.
    Named ``tvm_fp32`` like the other FP32 rules (the ``rule`` column tells them apart)."""
    return Rule("x86.fp32_amx", "tvm_fp32",
                _applies_fp32_amx_chosen if where_chosen else _applies_fp32_amx,
                _plan_amx("bf16_amx"), schedule_t2_lut)


def _applies_tt_amx(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where the ``tt_amx`` kernel can run: :func:`_amx_conv` with ternary activations (RTN's
    offsets included; the codes are exact int8 operands)."""
    return lx.act_mode == "ternary" and _amx_conv(lx, target)


def _applies_tt_amx_chosen(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where it is chosen: convs wider than one tap (speed over the popcount kernel in the
    ``d84b6f2`` run, batch 1 / 64: ResNet-18's 3x3 convs 1.18-2.97x / 1.36-2.89x; its 1x1/2
    downsamples 0.96-1.30x / 0.99-1.16x, and 1.07x / 0.74x on 256 -> 512 at batch 1 / 16 in
    one process: they stay on the popcount kernel)."""
    return _applies_tt_amx(lx, target) and tuple(lx.kernel_size) != (1, 1)


def tt_amx_rule(*, where_chosen: bool = True) -> Rule:
    """The ``tt_amx`` rule: ternary activation codes on the ``t2_amx`` tiles (AMX
    ``tdpbssd``); ``where_chosen=False`` applies wherever the kernel can run (the kernel
    benchmark times it beside the chosen kernel on every ternary-activation conv with 64k
    input channels)."""
    return Rule("x86.tt_amx", "tvm_tt_amx",
                _applies_tt_amx_chosen if where_chosen else _applies_tt_amx,
                _plan_amx("tt_amx"), schedule_t2_lut)


def _applies_tt_lut_any(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where the ``tt_lut`` kernel can run: one-group ternary x ternary convs (RTN's offsets
    included) on AVX512-VBMI (``vpermi2b zmm``), fan-in below 2^15 (int16 sums)."""
    if not (_is_x86(target) and target.has("avx512bw") and target.has("avx512vbmi")):
        return False
    return (lx.op == "conv2d" and lx.weight_format == "ternary" and lx.act_mode == "ternary"
            and int(lx.group_size) >= lx.fan_in and lx.fan_in < 2 ** 15)


def _applies_tt_lut(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    """Where it is chosen over the popcount kernel: convs wider than 1 tap with >=
    TT_LUT_MIN_INPUTS inputs and TT_LUT_MIN_CHANNELS outputs (TT_LUT_MIN_CHANNELS_FEW_INPUTS
    with fewer than TT_LUT_FEW_INPUTS inputs), 1x1 convs with >=
    TT_LUT_MIN_CHANNELS_1X1 inputs (and TT_LUT_MIN_CHANNELS outputs), or a stem's <= 4 inputs;
    without full-rate permutes (:func:`full_rate_permutes`) the stems only. Measured:
    docs/kernels.md."""
    if not full_rate_permutes(target):
        return _applies_tt_lut_any(lx, target) and lx.in_channels <= 4
    outs = lx.out_channels >= TT_LUT_MIN_CHANNELS
    few = lx.in_channels < TT_LUT_FEW_INPUTS
    wide = (lx.kernel_size[1] > 1 and outs and lx.in_channels >= TT_LUT_MIN_INPUTS
            and (not few or lx.out_channels >= TT_LUT_MIN_CHANNELS_FEW_INPUTS))
    one = (tuple(lx.kernel_size) == (1, 1) and outs
           and lx.in_channels >= TT_LUT_MIN_CHANNELS_1X1)
    return _applies_tt_lut_any(lx, target) and (wide or one or lx.in_channels <= 4)


def _plan_tt_lut(lx: LayerExport, batch: int, target: _tvm.TargetInfo,
                 params: Params) -> GemmSpec:
    kw = tile_kwargs(params, TT_LUT_DEFAULT)
    kw["nb"] = _clamp_block(kw["nb"], lx.out_channels, TT_LUT_LANES)
    return plan_gemm(lx, batch, "tt_lut", **kw)


def tt_lut_rule(*, where_chosen: bool = True) -> Rule:
    """The ``tt_lut`` rule; ``where_chosen=False`` applies wherever the kernel can run (the
    kernel benchmark times it beside the popcount kernel on every ternary-activation conv)."""
    return Rule("x86.tt_lut", "tvm_tt_lut",
                _applies_tt_lut if where_chosen else _applies_tt_lut_any, _plan_tt_lut,
                schedule_t2_lut, grid=_grid((128, 64), (7, 4, 14), (1,), TT_LUT_DEFAULT))


def rules() -> list[Rule]:
    """x86 rules in priority order; ternary layers that miss the AVX2 gate fall to generic."""
    return [
        # AMX-BF16: FGQ's grouped convs, the scales folded into exact bf16 weight pieces
        bf16_amx_rule(),
        # AMX-INT8: one-group convs on tdpbssd tiles (16 x 16 x 64 MACs each)
        amx_rule(),
        # AVX-512BW: deep stride-1 convs as table lookups (vpermw, 96 MACs per instruction)
        lut_rule(),
        # VNNI CPUs: the same packing, one vpdpbusd per tile instead of three ops; AVX-512
        # tiles are 16 channels wide (zmm), AVX-VNNI's 8 (ymm)
        Rule("x86.t2_avx512vnni", "tvm_t2_vnni", _applies_vnni("avx512vnni"), _plan_t2_avx2,
             _schedule_t2_vnni("avx512vnni"),
             grid=_grid((16, 32, 64), (2, 4, 8), (16, 64, 256), T2_512_DEFAULT, tns=(16, 8))),
        Rule("x86.t2_avxvnni", "tvm_t2_vnni", _applies_vnni("avxvnni"), _plan_t2_avx2,
             _schedule_t2_vnni("avxvnni"), grid=_grid((8, 16, 32), (2, 4), (16, 64, 256),
                                                      T2_DEFAULT)),
        Rule("x86.t2_avx2", "tvm_t2_avx2", _applies_t2_avx2, _plan_t2_avx2, schedule_t2_avx2,
             grid=_grid((8, 16, 32), (2, 4), (16, 64, 256), T2_DEFAULT)),
        # AMX-INT8: ternary x ternary convs wider than one tap, the codes as int8 tiles
        tt_amx_rule(),
        # AVX512-VBMI: wide ternary x ternary convs as byte-table lookups (vpermi2b, 256 MACs)
        tt_lut_rule(),
        Rule("x86.tt_popc512", "tvm_tt_popc", _applies_tt_popc512, _plan_tt_popc512,
             schedule_tt_popc, grid=_grid((8, 16, 32), (1, 2, 4), (64, 256), TT_512_DEFAULT)),
        Rule("x86.tt_popc", "tvm_tt_popc", _applies_tt_popc, _plan_tt_popc, schedule_tt_popc,
             grid=_grid((4, 8, 16), (2, 4), (16, 64, 256), TT_DEFAULT)),
        Rule("x86.t2_f32", "tvm_t2_f32", _applies_t2_f32, _plan_t2_f32, schedule_t2_f32,
             a32_suffix=False, grid=_grid((8, 16), (2, 4), (16, 64, 256), DENSE_DEFAULT)),
        # dense int8 on VNNI: the same tiles and intrinsic, the weights copied instead of decoded
        Rule("x86.i8_avx512vnni", "tvm_int8", _applies_i8_vnni("avx512vnni"), _plan_i8_vnni,
             _schedule_t2_vnni("avx512vnni"),
             grid=_grid((16, 32, 64), (2, 4, 8), (16, 64, 256), T2_512_DEFAULT, tns=(16, 8))),
        Rule("x86.i8_avxvnni", "tvm_int8", _applies_i8_vnni("avxvnni"), _plan_i8_vnni,
             _schedule_t2_vnni("avxvnni"), grid=_grid((8, 16, 32), (2, 4), (16, 64, 256),
                                                      T2_DEFAULT)),
        Rule("x86.int8", "tvm_int8", _applies_dense("int8"), _plan_dense, schedule_blocked,
             grid=_grid((8, 16), (2, 4), (16, 64, 256), DENSE_DEFAULT)),
        # AMX-BF16: FP32 convs wider than one tap as exact bf16 pieces (six products)
        fp32_amx_rule(),
        Rule("x86.fp32_512", "tvm_fp32", _applies_dense_512("fp32"), _plan_dense,
             schedule_blocked, grid=_grid((16, 32, 64), (2, 4, 8), (16, 64, 256),
                                          DENSE_512_DEFAULT)),
        Rule("x86.fp32", "tvm_fp32", _applies_dense("fp32"), _plan_dense, schedule_blocked,
             grid=_grid((8, 16), (2, 4), (16, 64, 256), DENSE_DEFAULT)),
    ]
