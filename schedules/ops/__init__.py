"""Compute definitions (TE) and weight packing (numpy) shared by every target's schedules.

Every exported layer is lowered to one *grouped GEMM* with an optional input stage::

    A[m, k]       = im2col(X)[m, k]  (conv, NHWC, padding inlined)  |  X[m, k]  (linear)
    acc[m, g, n]  = sum_{kk < gs} A[m, g*gs + kk] * W[n, g*gs + kk]          (exact integer)
    out[m, n]     = sum_g S[n, g] * acc[m, g, n] + bias[n]

with ``S = scales * act_scale`` folded on the host (one float32 rounding). ``M = batch*Ho*Wo``,
``K = fan_in`` in the export's (C, kh, kw) order, ``N = out_channels``. The output is float32
``[M, N]``, i.e. NHWC for convs. Weight layouts (K and N are padded with zero weights, so
padding never changes the result):

* ``t2_avx2``: 2-bit unsigned codes ``u = w + 1``, tile ``[Np/8, Kp/16, 32]`` (an 8n x 4k int8
  tile per 32 bytes after one shift+mask). The x86 kernel feeds ``vpmaddubsw`` with *unsigned*
  activations ``a + 128`` and signed decoded weights, so the correction ``128 * sum_k w`` is a
  weight-only constant ``Cw`` (passed like the scales, which this layout takes block-major,
  ``S[n // nb, g, n % nb]``, so a tile's scales are one vector load and a channel block's
  groups are contiguous, :func:`.packing.block_major`) and the epilogue has a single
  producer, which lets it be fused under the group loop.
* ``i8_avx2``: dense int8 weights in the decoded ``t2_avx2`` tile order ``[Np/T, Kp/4, 4T]``,
  fed to the same VNNI tile intrinsic (``vpdpbusd`` accumulates in int32: full-range int8
  weights would overflow AVX2's int16 ``vpmaddubsw`` pair sums, so this layout is VNNI-only).
* ``t2_blocked``: 2-bit two's-complement codes, 4 per byte, ``[Np/NB, Kp/4, NB]`` (portable
  inline decode, vectorised over n).
* ``t2_decoded``: the ``t2_blocked`` bytes, decoded once per tile into a float32 (or int32)
  ``W_dec [Np/NB, Kp, NB]`` stage that feeds the blocked dense GEMM (weight-only ternary layers
  with float activations).
* ``dense_blocked``: int8 or float32 ``[Np/NB, Kp, NB]``.
* ``tt_planes`` (ternary activations *and* weights): mask/sign bit-planes, uint64
  ``[Np/NB, KW, NB]`` each, ``KW = Kp / 64``; every group is zero-padded to whole 64-bit words
  (``gsp = Kp / G`` bits), so a word never straddles two groups. The activations are packed at
  run time by the kernel itself (stage ``A_bits [M, KW, 2]``) and a group's dot product is
  ``popc(am & wm) - 2 * popc(am & wm & (as ^ ws))``. The affine terms of RTN-style offsets are
  added in the epilogue (see :func:`tt_compute`).
* ``t2_lut`` (int8 activations, one group, convs; AVX-512BW): byte indices of three ternary
  weights ``[taps, CGp, Np]`` into 27-entry tables the kernel builds per input pixel and channel
  triple, looked up 32 channels at a time with ``vpermw`` (:mod:`.lut`). With dot-product
  channels (``GemmSpec.lut_dp``; znver4 with VNNI): int16 indices of each chunk's triples, the
  int8 weights of its other channels ``Wv [taps, quads, 4 Np]`` for ``vpdpbusd`` interleaved
  with the lookups, and ``Cv [Np]`` (-128 x their sum per channel).
* ``tt_lut`` (ternary activations *and* weights, one group, convs; AVX512-VBMI): int8 indices
  of four ternary weights ``[taps, CGp, Np]`` into the 128-byte row of an 81 x 128 table that
  the activations' code of each pixel and channel quad selects, looked up 64 channels at a time
  with ``vpermi2b`` (:mod:`.ttlut`); RTN's offsets are the same affine terms, added in the
  row tile's epilogue.
* ``t2_amx`` (int8 activations, one group, convs with 64k input channels; AMX-INT8): 2-bit
  ternary codes of 16 x 64-byte B tiles ``[taps * C / 64, Np / 16, 256]``, decoded into the
  int8 tiles ``tdpbssd`` reads (once per call, or by one task per channel block at batch 1
  and for large weights); A tiles come straight from a zero-padded copy of the images, as
  phase planes for strided convs (:mod:`.amx`).
* ``tt_amx`` (ternary activations *and* weights, the same convs): the ``t2_amx`` kernel on the
  activation codes in {-1, 0, 1}; RTN's offsets are the same affine terms as ``tt_lut``'s.
* ``bf16_amx`` (int8 activations, FGQ's grouped convs; AMX-BF16): the codes times their group
  scales split into exact bf16 pieces (two for FGQ's FP16 scales), ``[Np / 32, taps * C / 32,
  planes, 2, 512]`` uint16 B tiles (block-major) that ``tdpbf16ps`` runs on the activation
  codes as bf16;
  every product exact, the sums float32; channel counts off 32k as kernel-row runs padded to
  32k (``GemmSpec.k_row``) (:mod:`.amx`).

Nothing here imports tvm at module import time.

Modules (one job each; every public name is re-exported here, ``ternbench.schedules.ops.X``):
:mod:`.packing` (numpy weight packing and the layouts' tile constants), :mod:`.spec` (the GEMM
description, :class:`GemmSpec` and :func:`plan_gemm`), :mod:`.compute` (the TE compute
definitions), :mod:`.lut`, :mod:`.ttlut` and :mod:`.amx` (the hand-scheduled ``t2_lut``,
``tt_lut`` and ``t2_amx`` / ``tt_amx`` / ``bf16_amx`` kernels), :mod:`.rules` (:class:`Rule`,
:class:`Kernel` and the kernel cache).
"""

from __future__ import annotations

from .amx import pack_amx_tiles
from .compute import gemm_compute, tt_compute
from .packing import (
    AVX2_ACT_OFFSET,
    AVX2_TILE_K,
    AVX2_TILE_N,
    AVX512_TILE_N,
    TT_WORD,
    border_classes,
    group_code_sums,
    pack_dense_blocked,
    pack_i8_tiles,
    pack_lut_dp,
    pack_lut_idx,
    pack_planes,
    pack_t2_avx2,
    pack_t2_blocked,
    pack_weight_args,
    requantize_args,
    tt_affine_terms,
)
from .rules import Kernel, Rule, clear_kernel_cache, kernel_cache_size
from .spec import (
    OUT_CLIP_LAYOUTS,
    GemmSpec,
    Params,
    UnsupportedLayerError,
    WeightLayout,
    layer_geometry,
    layer_offsets,
    plan_gemm,
    row_tile_pixels,
    tile_kwargs,
    with_lut_dp,
)

__all__ = [
    "UnsupportedLayerError",
    "GemmSpec",
    "Rule",
    "Kernel",
    "pack_t2_avx2",
    "pack_i8_tiles",
    "pack_t2_blocked",
    "pack_lut_dp",
    "pack_lut_idx",
    "pack_amx_tiles",
    "pack_dense_blocked",
    "group_code_sums",
    "layer_geometry",
    "layer_offsets",
    "plan_gemm",
    "row_tile_pixels",
    "with_lut_dp",
    "pack_weight_args",
    "requantize_args",
    "OUT_CLIP_LAYOUTS",
    "gemm_compute",
    "tt_compute",
    "pack_planes",
    "tt_affine_terms",
    "border_classes",
    "kernel_cache_size",
    "clear_kernel_cache",
    "Params",
    "tile_kwargs",
    # the layouts and their tile constants (module attributes of the former single module)
    "WeightLayout",
    "AVX2_TILE_N",
    "AVX512_TILE_N",
    "AVX2_TILE_K",
    "AVX2_ACT_OFFSET",
    "TT_WORD",
]
