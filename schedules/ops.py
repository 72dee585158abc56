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
  weight-only constant ``Cw[g, n]`` (passed like the scales, which this layout takes
  group-major, ``S[g, n]``, so a tile's scales are one vector load) and the epilogue has a single
  producer, which lets it be fused under the group loop.
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

Nothing here imports tvm at module import time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import _tvm

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

__all__ = [
    "UnsupportedLayerError",
    "GemmSpec",
    "Rule",
    "Kernel",
    "pack_t2_avx2",
    "pack_t2_blocked",
    "pack_dense_blocked",
    "group_code_sums",
    "layer_geometry",
    "plan_gemm",
    "pack_weight_args",
    "gemm_compute",
    "tt_compute",
    "pack_planes",
    "tt_affine_terms",
    "kernel_cache_size",
    "clear_kernel_cache",
    "Params",
    "tile_kwargs",
]

log = logging.getLogger(__name__)

WeightLayout = Literal["t2_avx2", "t2_blocked", "t2_decoded", "dense_blocked", "tt_planes"]
#: the 2-bit AVX2 tile: 8 output channels x 16 reduction elements in 32 bytes (AVX-512: 16
#: output channels in 64 bytes, :data:`AVX512_TILE_N`)
AVX2_TILE_N = 8
AVX512_TILE_N = 16
AVX2_TILE_K = 16
#: the unsigned activation offset of the AVX2 path (int8 a -> uint8 a + 128)
AVX2_ACT_OFFSET = 128
#: bits per activation/weight plane word of the ternary x ternary kernel
TT_WORD = 64


class UnsupportedLayerError(NotImplementedError):
    """The layer's weight format / activation mode has no kernel (e.g. int16 activations)."""


# ----------------------------------------------------------------------------- packing (numpy)


def _pad2(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols), dtype=w.dtype)
    out[: w.shape[0], : w.shape[1]] = w
    return out


def _check_ternary(codes: np.ndarray) -> None:
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(
            f"ternary codes must be in {{-1, 0, 1}}, got [{codes.min()}, {codes.max()}]")


def pack_t2_avx2(codes: np.ndarray, np_: int, kp: int, tile_n: int = AVX2_TILE_N) -> np.ndarray:
    """Ternary codes [N, K] -> uint8 [Np/T, Kp/16, 4T] for the x86 kernels (T = ``tile_n``: 8
    for 256-bit tiles, 16 for AVX-512's 512-bit ones).

    Byte ``ni*4 + ki`` of tile ``(nb, kb)`` holds ``u = w + 1`` of output ``nb*T + ni`` and
    inputs ``k = kb*16 + r*4 + ki`` at bits ``2r`` (r = 0..3), so one ``>> 2r & 3`` yields the
    contiguous T n x 4k tile. Zero padding to (Np, Kp).

    Example:
        >>> w = np.zeros((8, 16), np.int8); w[0, 0] = 1
        >>> p = pack_t2_avx2(w, 8, 16); p.shape, int(p[0, 0, 0]), int(p[0, 0, 1])
        ((1, 1, 32), 86, 85)
    """
    _check_ternary(codes)
    t = int(tile_n)
    if np_ % t or kp % AVX2_TILE_K:
        raise ValueError(f"padded shape ({np_}, {kp}) must be multiples of ({t}, 16)")
    u = (_pad2(codes.astype(np.int8), np_, kp).astype(np.int16) + 1).astype(np.uint8)
    u = u.reshape(np_ // t, t, kp // 16, 4, 4)  # nb, ni, kb, r, ki
    u = u.transpose(0, 2, 3, 1, 4).reshape(np_ // t, kp // 16, 4, 4 * t)  # nb, kb, r, (ni, ki)
    b = u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)
    return np.ascontiguousarray(b)


def pack_t2_blocked(codes: np.ndarray, nb: int, np_: int, kp: int) -> np.ndarray:
    """Ternary codes [N, K] -> uint8 [Np/nb, Kp/4, nb]: 2-bit two's complement, 4 k per byte.

    Code of ``(n, k)`` sits in byte ``[n // nb, k // 4, n % nb]`` at bits ``2 * (k % 4)``
    (-1 -> 0b11, 0 -> 0b00, 1 -> 0b01).
    """
    _check_ternary(codes)
    if np_ % nb or kp % 4:
        raise ValueError(f"padded shape ({np_}, {kp}) must be multiples of ({nb}, 4)")
    c = (_pad2(codes.astype(np.int8), np_, kp).astype(np.int16) & 3).astype(np.uint8)
    c = c.reshape(np_ // nb, nb, kp // 4, 4)
    b = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)  # [Np/nb, nb, Kp/4]
    return np.ascontiguousarray(b.transpose(0, 2, 1))


def pack_dense_blocked(w: np.ndarray, nb: int, np_: int, kp: int, dtype: str) -> np.ndarray:
    """Dense weights [N, K] -> [Np/nb, Kp, nb] of ``dtype`` (int8 or float32), zero padded."""
    if np_ % nb:
        raise ValueError(f"padded N={np_} must be a multiple of {nb}")
    p = _pad2(w.astype(dtype), np_, kp)
    return np.ascontiguousarray(p.reshape(np_ // nb, nb, kp).transpose(0, 2, 1))


def group_code_sums(codes: np.ndarray, groups: int, gs: int, np_: int) -> np.ndarray:
    """int32 [Np, G]: ``sum`` of the codes of each (output, group), zero rows for padding."""
    n = codes.shape[0]
    k = groups * gs
    c = _pad2(codes.astype(np.int32), n, k) if codes.shape[1] < k else codes.astype(np.int32)
    s = c[:, :k].reshape(n, groups, gs).sum(axis=2, dtype=np.int64).astype(np.int32)
    return _pad2(s, np_, groups)


def _group_padded(codes: np.ndarray, groups: int, gs: int, gsp: int) -> np.ndarray:
    """[N, K] -> [N, G * gsp]: group ``g`` (``gs`` codes, the last one maybe partial) starts at
    column ``g * gsp``; the gap up to the next group is zeros."""
    n, k = codes.shape
    c = _pad2(codes, n, groups * gs).reshape(n, groups, gs)
    out = np.zeros((n, groups, gsp), dtype=codes.dtype)
    out[:, :, :gs] = c
    return out.reshape(n, groups * gsp)


def _bits_to_u64(bits: np.ndarray) -> np.ndarray:
    """bool [..., 64 * W] -> uint64 [..., W]: bit ``j`` of word ``q`` is ``bits[..., 64q + j]``."""
    b = bits.reshape(*bits.shape[:-1], -1, TT_WORD).astype(np.uint64)
    return np.bitwise_or.reduce(b << np.arange(TT_WORD, dtype=np.uint64), axis=-1)


def pack_planes(codes: np.ndarray, groups: int, gs: int, gsp: int, nb: int, np_: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Ternary codes [N, K] -> (mask, sign) uint64 ``[Np/nb, G*gsp/64, nb]`` bit-planes.

    ``mask`` has a bit where the code is nonzero, ``sign`` where it is -1. Each group is
    zero-padded to ``gsp`` (a multiple of 64) bits and rows to ``Np``; padding bits are 0 in
    both planes, so they never contribute to a dot product.

    Example:
        >>> m, s = pack_planes(np.array([[1, -1, 0]], np.int8), 1, 3, 64, 1, 1)
        >>> int(m[0, 0, 0]), int(s[0, 0, 0])
        (3, 2)
    """
    _check_ternary(codes)
    if gsp % TT_WORD or gsp < gs or np_ % nb:
        raise ValueError(f"bad plane geometry gs={gs} gsp={gsp} nb={nb} Np={np_}")
    c = _pad2(_group_padded(codes.astype(np.int8), groups, gs, gsp), np_, groups * gsp)
    planes = []
    for bits in (c != 0, c < 0):
        p = _bits_to_u64(bits)  # [Np, KW]
        planes.append(np.ascontiguousarray(
            p.reshape(np_ // nb, nb, p.shape[1]).transpose(0, 2, 1)))
    return planes[0], planes[1]


def tt_affine_terms(lx: LayerExport, spec: GemmSpec) -> dict[str, np.ndarray]:
    """Host-side float64 parts of the affine (offset) terms of a ternary-activation layer.

    With ``x_q = α a + β_a`` on valid taps (0 on padded ones) and ``w = s c + β_w``::

        y = α Σ_g s_g dot_g + α β_w Σ_valid a + β_a Σ_valid (s c + β_w) + bias

    Returns float32 arrays: ``Bw [Np] = α β_w`` (times the run-time ``Σ a``, kernel input
    ``Bw`` when ``spec.w_off``); ``Tw [kh*kw, Np]``, the ``β_a`` term per kernel tap summed over
    channels (kernel input when ``spec.border``: the kernel sums the taps that are inside the
    image); and ``bias [Np]`` with the ``β_a`` term folded in when every tap is always valid
    (linear layers, unpadded convs).
    """
    n, k = spec.N, spec.K
    alpha, beta_a = float(lx.act_scale), float(lx.act_offset)
    beta_w = (np.zeros(n) if lx.weight_offset is None
              else np.asarray(lx.weight_offset, dtype=np.float64).reshape(n))
    deq = lx.dequantized_weight().astype(np.float64)  # codes * scales: exact in float32
    taps = spec.kernel[0] * spec.kernel[1] if spec.op == "conv2d" else 1
    c = k // taps
    # per-tap sums over channels, in the export's (C, kh, kw) order
    tw = beta_a * (deq.reshape(n, c, taps).sum(axis=1) + beta_w[:, None] * c)  # [N, taps]
    bias = np.zeros(spec.Np)
    if lx.bias is not None:
        bias[:n] = np.asarray(lx.bias, dtype=np.float64)
    if not spec.border:  # every tap of every output is valid: a per-channel constant
        bias[:n] += tw.sum(axis=1)
    bw = np.zeros(spec.Np)
    bw[:n] = alpha * beta_w
    return {"Bw": bw.astype(np.float32), "Tw": _pad2(tw.T, taps, spec.Np).astype(np.float32),
            "bias": bias.astype(np.float32)}


# ----------------------------------------------------------------------------- GEMM description


@dataclass(frozen=True)
class GemmSpec:
    """Everything that determines one compiled kernel (weights are runtime arguments).

    Equal specs (same shapes, group size, layout, tiles) share one build across layers and
    methods. ``gs`` is the reduction length per group, ``G * gs <= Kp`` (the A-matrix width).
    """

    op: Literal["conv2d", "linear"]
    batch: int
    in_shape: tuple[int, ...]  # (C, H, W) or (F,)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    out_hw: tuple[int, int]
    k_order: Literal["cij", "ijc"]  # conv reduction order: export (C,kh,kw) or (kh,kw,C)
    N: int
    K: int
    G: int
    gs: int
    Kp: int
    Np: int
    act_dtype: Literal["int8", "float32"]
    layout: WeightLayout
    w_dtype: Literal["uint8", "int8", "float32", "uint64"]
    nb: int  # output channels per parallel task / register tile
    mb: int  # rows per register tile
    m_task: int  # register tiles per parallel task
    # ternary activations (``tt_planes``) with offsets: which affine terms the kernel computes
    w_off: bool = False  # weight offset: + Bw[n] * sum_k a[m, k]
    border: bool = False  # act offset on a padded conv: + sum over in-image taps of Tw[t, n]
    affine: bool = False  # any offset (the epilogue then rounds like a float GEMM)
    #: ``pixel_bits`` convs of a whole model: X is the layer's float32 input and the kernel
    #: quantizes it while packing (``|x| > threshold`` / ``x < -threshold``, in float32 as the
    #: fake-quant graph compares), so no separate quantize pass runs in torch
    float_in: bool = False
    threshold: float = 0.0
    #: ``t2_avx2`` tile width in output channels: 8 (a 256-bit 8n x 4k int8 tile) or 16 (a
    #: 512-bit 16n x 4k tile for AVX-512 VNNI ``vpdpbusd zmm``)
    tile_n: int = 8

    @property
    def M(self) -> int:
        return self.batch * self.out_hw[0] * self.out_hw[1]

    @property
    def gsp(self) -> int:
        """Padded length of one group along ``Kp`` (``tt_planes``: a multiple of 64)."""
        return self.Kp // self.G

    @property
    def words(self) -> int:
        """uint64 words per row of a bit-plane (``tt_planes``)."""
        return self.Kp // TT_WORD

    @property
    def acc_dtype(self) -> str:
        if self.act_dtype == "int8" and self.w_dtype != "float32":
            return "int32"
        return "float32"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Kernel input: NHWC for convs, [batch, F] for linears."""
        if self.op == "conv2d":
            c, h, w = self.in_shape
            return (self.batch, h, w, c)
        return (self.batch, self.K)

    @property
    def pixel_bits(self) -> bool:
        """``tt_planes`` conv whose 64-bit words hold 64 channels of one pixel and kernel tap
        (C % 64 == 0) or 64/C whole taps (C = 1, 2, ..., 32: CIFAR-size layers); one group,
        (kh, kw, C) order: the bit-planes are packed once per input pixel (``X_bits``) and
        gathered word by word, instead of packing the kh*kw times larger im2col matrix bit by
        bit."""
        c = self.in_shape[0]
        return (self.layout == "tt_planes" and self.op == "conv2d" and self.G == 1
                and self.k_order == "ijc" and (c % TT_WORD == 0 or TT_WORD % c == 0))

    @property
    def has_input_stage(self) -> bool:
        """Whether ``gemm_compute`` materialises an ``A_in`` stage (im2col, pad or shift)."""
        if self.pixel_bits:
            return False
        return self.op == "conv2d" or self.layout == "t2_avx2" or self.Kp != self.K

    @property
    def shape_key(self) -> str:
        return f"{self.op} M={self.M} K={self.K} N={self.N} G={self.G}"


def layer_geometry(lx: LayerExport) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Validated per-sample input shape and output (Ho, Wo) of an export."""
    k = lx.fan_in
    if lx.codes.ndim != 2 or lx.codes.shape[0] != lx.out_channels:
        raise ValueError(f"{lx.name}: codes must be [out={lx.out_channels}, fan_in]")
    if lx.op == "linear":
        shape = tuple(lx.input_shape) or (k,)
        if math.prod(shape) != k:
            raise ValueError(f"{lx.name}: linear input {shape} does not match fan_in {k}")
        return (k,), (1, 1)
    if len(lx.input_shape) != 3:
        raise ValueError(f"{lx.name}: conv2d export needs input_shape (C, H, W), got "
                         f"{lx.input_shape!r} (run a calibration forward before exporting)")
    c, h, w = (int(v) for v in lx.input_shape)
    (kh, kw), (sh, sw), (ph, pw) = lx.kernel_size, lx.stride, lx.padding
    if c != lx.in_channels or c * kh * kw != k:
        raise ValueError(f"{lx.name}: C*kh*kw = {c}*{kh}*{kw} does not match fan_in {k}")
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"{lx.name}: empty output for input {lx.input_shape}")
    if tuple(lx.output_hw) != (ho, wo):
        raise ValueError(f"{lx.name}: output_hw {lx.output_hw} != computed {(ho, wo)}")
    return (c, h, w), (ho, wo)


def _groups(lx: LayerExport) -> tuple[int, int]:
    """(G, gs) of an export: G = ceil(fan_in / gs); the last group may be partial (the kernels
    zero-pad K to G * gs, which adds nothing to any sum)."""
    k, gs = lx.fan_in, int(lx.group_size)
    if gs < 1:
        raise ValueError(f"{lx.name}: group_size must be >= 1, got {gs}")
    g = -(-k // gs)
    if lx.weight_format != "fp32" and tuple(lx.scales.shape) != (lx.out_channels, g):
        raise ValueError(f"{lx.name}: scales {lx.scales.shape} != (out, ceil(fan_in / "
                         f"group_size)) = {(lx.out_channels, g)}")
    return g, gs


def _act_dtype(lx: LayerExport) -> Literal["int8", "float32"]:
    if lx.act_mode == "int":
        if not 1 <= lx.act_qmax <= 127:
            raise UnsupportedLayerError(f"{lx.name}: {lx.act_bits}-bit activations exceed int8")
        return "int8"
    if lx.act_mode == "fp32":
        return "float32"
    if lx.act_mode == "ternary":  # codes in {-1, 0, 1}, packed into bit-planes by the kernel
        return "int8"
    raise UnsupportedLayerError(f"{lx.name}: act_mode {lx.act_mode!r} has no kernel")


def _row_tiles(m: int, mb_max: int, rows_per_task: int) -> tuple[int, int]:
    """(mb, m_task): register-tile rows dividing M and tiles per task (perfect splits only,
    since tensorize and vectorize refuse predicated loops)."""
    mb = next(d for d in range(min(mb_max, m), 0, -1) if m % d == 0)
    tiles = m // mb
    cap = max(1, rows_per_task // mb)
    m_task = next(d for d in range(min(cap, tiles), 0, -1) if tiles % d == 0)
    return mb, m_task


def _round_up(v: int, q: int) -> int:
    return -(-v // q) * q


#: one point of a rule's tile-parameter grid (e.g. ``{"nb": 16, "mb": 4, "rows": 64}``)
Params = Mapping[str, int]


def tile_kwargs(params: Params, default: Mapping[str, int]) -> dict[str, int]:
    """:func:`plan_gemm` tile keywords from a rule's grid point, missing keys from ``default``
    (both use the grid names ``nb``, ``mb``, ``rows``).

    Example:
        >>> tile_kwargs({"nb": 8}, {"nb": 16, "mb": 4, "rows": 64})
        {'nb': 8, 'mb_max': 4, 'rows_per_task': 64}
    """
    p = {**default, **params}
    kw = {"nb": int(p["nb"]), "mb_max": int(p["mb"]), "rows_per_task": int(p["rows"])}
    if "tn" in p:  # x86 int8-activation tiles: 8 (256-bit) or 16 (512-bit) channels wide
        kw["tile_n"] = int(p["tn"])
    return kw


def plan_gemm(lx: LayerExport, batch: int, layout: WeightLayout, *, nb: int, mb_max: int,
              rows_per_task: int, tile_n: int = AVX2_TILE_N) -> GemmSpec:
    """GEMM view of ``lx`` for a weight layout and tile sizes (padding decided here)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    in_shape, out_hw = layer_geometry(lx)
    g, gs = _groups(lx)
    act = _act_dtype(lx)
    k, n = lx.fan_in, lx.out_channels
    if (layout == "tt_planes") != (lx.act_mode == "ternary"):
        raise ValueError(f"layout {layout} does not fit act_mode {lx.act_mode!r}")
    if g == 1 or lx.weight_format == "fp32":
        g, gs = 1, k  # one group (fp32 exports carry unit scales whatever their group size)
    kg = g * gs  # >= K: a partial last group is zero-padded
    w_dtype: Literal["uint8", "int8", "float32", "uint64"]
    if layout == "tt_planes":
        kp = g * _round_up(gs, TT_WORD)  # each group padded to whole words
        w_dtype = "uint64"
    elif layout == "t2_avx2":
        if tile_n not in (AVX2_TILE_N, AVX512_TILE_N):
            raise ValueError(f"t2_avx2 tiles are 8 or 16 output channels wide, got {tile_n}")
        if nb % tile_n:
            raise ValueError(f"t2_avx2 needs nb to be a multiple of {tile_n}")
        kp = _round_up(kg, AVX2_TILE_K)
        if g == 1:
            gs = kp  # one group: the zero padding just joins it
        elif gs % 4:  # the intrinsic reduces 4 k at a time; padding beyond G*gs is in no group
            raise ValueError(f"t2_avx2 needs group_size % 4 == 0, got {gs}")
        w_dtype = "uint8"
    elif layout in ("t2_blocked", "t2_decoded"):
        kp, w_dtype = _round_up(kg, 4), "uint8"
    else:
        kp = kg
        w_dtype = "int8" if lx.weight_format == "int8" else "float32"
    if layout.startswith(("t2", "tt")) and lx.weight_format != "ternary":
        raise ValueError(f"layout {layout} needs ternary weights, got {lx.weight_format}")
    m = batch * out_hw[0] * out_hw[1]
    mb, m_task = _row_tiles(m, mb_max, rows_per_task)
    # One group: reduce in (kh, kw, C) order, so im2col copies contiguous channel runs (the
    # weights are permuted on the host). Several groups must stay contiguous in K, which only
    # the export's (C, kh, kw) order guarantees.
    k_order: Literal["cij", "ijc"] = "ijc" if lx.op == "conv2d" and g == 1 else "cij"
    w_off = border = affine = False
    if layout == "tt_planes":
        w_off = lx.weight_offset is not None and bool(np.any(np.asarray(lx.weight_offset)))
        a_off = float(lx.act_offset) != 0.0
        border = a_off and lx.op == "conv2d" and any(tuple(lx.padding))
        affine = w_off or a_off
    return GemmSpec(
        op=lx.op, batch=batch, in_shape=in_shape, kernel=tuple(lx.kernel_size),  # type: ignore[arg-type]
        stride=tuple(lx.stride), padding=tuple(lx.padding), out_hw=out_hw,  # type: ignore[arg-type]
        k_order=k_order,
        N=n, K=k, G=g, gs=gs, Kp=kp, Np=_round_up(n, nb), act_dtype=act, layout=layout,
        w_dtype=w_dtype, nb=nb, mb=mb, m_task=m_task, w_off=w_off, border=border,
        affine=affine, tile_n=tile_n if layout == "t2_avx2" else AVX2_TILE_N,
    )


def pack_weight_args(spec: GemmSpec, lx: LayerExport) -> list[np.ndarray]:
    """Runtime weight arguments of a kernel, in PrimFunc order: weights (+ Cw), S, bias."""
    codes = np.asarray(lx.codes)
    if spec.op == "conv2d" and spec.k_order == "ijc":
        c, kh, kw = spec.in_shape[0], *spec.kernel
        codes = codes.reshape(spec.N, c, kh, kw).transpose(0, 2, 3, 1).reshape(spec.N, spec.K)
    if spec.layout == "tt_planes":
        return _pack_tt_args(spec, lx, codes)
    if spec.layout == "t2_avx2":
        w_args = [pack_t2_avx2(codes, spec.Np, spec.Kp, spec.tile_n),
                  np.ascontiguousarray(
                      (AVX2_ACT_OFFSET * group_code_sums(codes, spec.G, spec.gs, spec.Np)).T)]
    elif spec.layout in ("t2_blocked", "t2_decoded"):
        w_args = [pack_t2_blocked(codes, spec.nb, spec.Np, spec.Kp)]
    else:
        w_args = [pack_dense_blocked(codes, spec.nb, spec.Np, spec.Kp, spec.w_dtype)]
    scales = np.asarray(lx.scales, dtype=np.float64)
    if lx.weight_format == "fp32":  # the codes are the weights; scales are ones by contract
        scales = np.ones((spec.N, spec.G))
    act_scale = 1.0 if lx.act_mode == "fp32" else float(lx.act_scale)  # fp32: used as is
    s = _pad2((scales * act_scale).astype(np.float32), spec.Np, spec.G)
    if spec.layout == "t2_avx2":  # group-major (see gemm_compute)
        s = np.ascontiguousarray(s.T)
    bias = np.zeros(spec.Np, np.float32)
    if lx.bias is not None:
        bias[: spec.N] = np.asarray(lx.bias, dtype=np.float32)
    return [*w_args, s, bias]


def _pack_tt_args(spec: GemmSpec, lx: LayerExport, codes: np.ndarray) -> list[np.ndarray]:
    """``tt_planes`` arguments: Wm, Ws, [Bw], [Tw], S, bias (see :func:`tt_compute`)."""
    wm, ws = pack_planes(codes, spec.G, spec.gs, spec.gsp, spec.nb, spec.Np)
    terms = tt_affine_terms(lx, spec)
    s = np.asarray(lx.scales, dtype=np.float64) * float(lx.act_scale)
    args = [wm, ws]
    if spec.w_off:
        args.append(terms["Bw"])
    if spec.border:
        args.append(terms["Tw"])
    return [*args, _pad2(s.astype(np.float32), spec.Np, spec.G), terms["bias"]]


# ----------------------------------------------------------------------------- TE compute


def _source_col(spec: GemmSpec, k: Any) -> tuple[Any, Any]:
    """(fan-in index read for A column ``k``, validity predicate or None).

    Columns past ``K`` are zeros; so are, for ``tt_planes`` with several groups, the columns
    that pad each group of ``gs`` to ``gsp`` bits.
    """
    tvm = _tvm.require_tvm()
    te, tirx = tvm.te, tvm.tirx
    k_, kp = spec.K, spec.Kp
    if spec.layout == "tt_planes" and spec.G > 1 and spec.gsp != spec.gs:
        g, kk = k // spec.gsp, k % spec.gsp
        src = g * spec.gs + kk
        return te.min(src, k_ - 1), tirx.all(kk < spec.gs, src < k_)
    if kp == k_:
        return k, None
    return te.min(k, k_ - 1), k < k_


def _im2col(spec: GemmSpec, x: Any, shift: Callable[[Any], Any] | None) -> Any:
    """``A_in [M, Kp]`` of a conv: a padded copy ``X_pad`` (bounds checks once per pixel,
    contiguous over C) when the conv pads, then a gather with affine indices only.

    ``shift`` (the AVX2 int8 -> uint8 offset) is applied in the first stage that copies data.
    """
    tvm = _tvm.require_tvm()
    te, tirx = tvm.te, tvm.tirx
    c, h, w = spec.in_shape
    (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
    ho, wo = spec.out_hw
    src = x
    if ph or pw:
        def pad(b: Any, y: Any, z: Any, ch: Any) -> Any:
            inb = tirx.all(y >= ph, y < h + ph, z >= pw, z < w + pw)
            v = tirx.if_then_else(
                inb, x[b, te.max(te.min(y - ph, h - 1), 0), te.max(te.min(z - pw, w - 1), 0), ch],
                tirx.const(0, x.dtype))
            return shift(v) if shift else v

        src = te.compute((spec.batch, h + 2 * ph, w + 2 * pw, c), pad, name="X_pad")

    def col(m: Any, k: Any) -> Any:
        kk, valid = _source_col(spec, k)
        b, r = m // (ho * wo), m % (ho * wo)
        if spec.k_order == "cij":  # the export's fan-in order (C, kh, kw)
            ch, i, j = kk // (kh * kw), (kk // kw) % kh, kk % kw
        else:  # (kh, kw, C): contiguous runs of C in NHWC
            i, j, ch = kk // (kw * c), (kk // c) % kw, kk % c
        v = src[b, (r // wo) * sh + i, (r % wo) * sw + j, ch]
        if shift and src is x:
            v = shift(v)
        if valid is not None:
            v = tirx.if_then_else(valid, v, tirx.const(0, v.dtype))
        return v

    return te.compute((spec.M, spec.Kp), col, name="A_in")


def gemm_compute(spec: GemmSpec) -> Any:
    """PrimFunc ``main(X, *weights, S, bias, out)`` for ``spec`` (see module docstring).

    Block names the schedules rely on: ``A_in`` (input stage, absent for an unpadded linear
    that needs no shift), ``W_dec`` (AVX2 decode, or the ``t2_decoded`` decode to the
    accumulator type), ``acc`` (grouped GEMM), ``ep`` (scale epilogue, reduction over groups)
    and ``out`` (bias). ``tt_planes`` specs get :func:`tt_compute`.
    """
    if spec.layout == "tt_planes":
        return tt_compute(spec)
    tvm = _tvm.require_tvm()
    te, tirx = tvm.te, tvm.tirx
    m_, kp, g_, gs, np_ = spec.M, spec.Kp, spec.G, spec.gs, spec.Np
    x = te.placeholder(spec.input_shape, spec.act_dtype, name="X")
    avx2 = spec.layout == "t2_avx2"

    def shifted(v: Any) -> Any:
        # int8 a -> uint8 a + 128 for vpmaddubsw's unsigned operand (padding 0 -> 128 is
        # consistent with the weight-side correction, which counts every k of a group)
        return (v.astype("int16") + AVX2_ACT_OFFSET).astype("uint8")

    a = _input_stage(spec, x, shifted if avx2 else None)
    assert a.dtype == ("uint8" if avx2 else spec.act_dtype)

    # t2_avx2 takes S and Cw group-major ([G, Np]): the epilogue under the group loop then
    # loads a tile's scales as one contiguous vector (an [Np, G] row per channel was a
    # G-strided gather per group: FGQ N=4 ran below torch FP32)
    s = te.placeholder((g_, np_) if avx2 else (np_, g_), "float32", name="S")
    bias = te.placeholder((np_,), "float32", name="bias")
    kk = te.reduce_axis((0, gs), "kk")
    acc_t = spec.acc_dtype
    if avx2:
        tn = spec.tile_n
        wp = te.placeholder((np_ // tn, kp // 16, 4 * tn), "uint8", name="Wp")
        cw = te.placeholder((g_, np_), "int32", name="Cw")
        w_args = [wp, cw]
        # decoded signed codes laid out [N/T, K/4, T, 4]: each T n x 4k tile is 4T contiguous
        # bytes (a strided sub-region would silently tensorize wrong)
        wd = te.compute(
            (np_ // tn, kp // 4, tn, 4),
            lambda nb, kq, ni, ki: (
                (wp[nb, kq // 4, ni * 4 + ki] >> ((kq % 4) * 2).astype("uint8"))
                & tirx.const(3, "uint8")
            ).astype("int8") - tirx.const(1, "int8"),
            name="W_dec",
        )
        q = gs // 4
        acc = te.compute(
            (m_, g_, np_),
            lambda m, g, n: te.sum(
                a[m, g * gs + kk].astype("int32")
                * wd[n // tn, g * q + kk // 4, n % tn, kk % 4].astype("int32"),
                axis=kk),
            name="acc")

        def term(m: Any, g: Any, n: Any) -> Any:
            return s[g, n] * (acc[m, g, n] - cw[g, n]).astype("float32")
    else:
        if spec.layout in ("t2_blocked", "t2_decoded"):
            wp = te.placeholder((np_ // spec.nb, kp // 4, spec.nb), "uint8", name="Wp")

            def decode(nb: Any, k: Any, ni: Any) -> Any:
                byte = wp[nb, k // 4, ni].astype("int32")
                if spec.layout == "t2_decoded":
                    # field to the top bits, arithmetic shift back: sign-extended in 2 ops
                    return ((byte << (30 - (k % 4) * 2)) >> 30).astype(acc_t)
                code = (byte >> ((k % 4) * 2)) & 3
                return (code - ((code & 2) << 1)).astype(acc_t)  # two's complement 2-bit

            if spec.layout == "t2_blocked":  # decoded inline, in the GEMM's inner loop
                def weight(n: Any, k: Any) -> Any:
                    return decode(n // spec.nb, k, n % spec.nb)
            else:  # decoded into a dense [N/NB, Kp, NB] stage the schedule places per tile
                wd = te.compute((np_ // spec.nb, kp, spec.nb), decode, name="W_dec")

                def weight(n: Any, k: Any) -> Any:
                    return wd[n // spec.nb, k, n % spec.nb]
        else:
            wp = te.placeholder((np_ // spec.nb, kp, spec.nb), spec.w_dtype, name="W")

            def weight(n: Any, k: Any) -> Any:
                return wp[n // spec.nb, k, n % spec.nb].astype(acc_t)

        w_args = [wp]
        acc = te.compute(
            (m_, g_, np_),
            lambda m, g, n: te.sum(a[m, g * gs + kk].astype(acc_t) * weight(n, g * gs + kk),
                                   axis=kk),
            name="acc")

        def term(m: Any, g: Any, n: Any) -> Any:
            return s[n, g] * acc[m, g, n].astype("float32")

    gr = te.reduce_axis((0, g_), "g")
    ep = te.compute((m_, np_), lambda m, n: te.sum(term(m, gr, n), axis=gr), name="ep")
    out = te.compute((m_, spec.N), lambda m, n: ep[m, n] + bias[n], name="out")
    return te.create_prim_func([x, *w_args, s, bias, out])


def _input_stage(spec: GemmSpec, x: Any, shift: Callable[[Any], Any] | None) -> Any:
    """``A [M, Kp]``: the ``A_in`` stage (im2col, K padding, shift), or ``X`` itself."""
    tvm = _tvm.require_tvm()
    te, tirx = tvm.te, tvm.tirx
    if spec.op == "conv2d":
        return _im2col(spec, x, shift)
    if not spec.has_input_stage:
        return x

    def row(m: Any, k: Any) -> Any:
        src, valid = _source_col(spec, k)
        v = x[m, src]
        if valid is not None:
            v = tirx.if_then_else(valid, v, tirx.const(0, x.dtype))
        return shift(v) if shift else v

    return te.compute((spec.M, spec.Kp), row, name="A_in")


def _pixel_planes(spec: GemmSpec, x: Any, word: Callable[..., Any], j: Any) -> Any:
    """``A_bits [M, KW, 2]`` of a :attr:`GemmSpec.pixel_bits` conv: ``X_bits`` packs each
    (padded) input pixel once; ``A_bits`` gathers words.

    * ``C % 64 == 0``: ``X_bits [B, Hp, Wp, C/64, 2]``; word ``w`` of row ``m`` is tap
      ``(i, j) = divmod(w // (C/64), kw)`` and channel word ``w % (C/64)``.
    * ``64 % C == 0`` (CIFAR-size layers, 8-32 channels): ``X_bits [B, Hp, Wp, 1, 2]`` holds the
      C bits of a pixel; in (kh, kw, C) order a word is ``T = 64 / C`` consecutive taps, so
      word ``w`` is ``sum_t X_bits[tap w*T + t] << (t*C)`` (disjoint bits: the sum is an OR;
      taps past kh*kw are the zero padding of ``Kp``). An explicit sum, not a reduction block,
      so ``A_bits`` stays a plain gather that a GPU schedule can inline.
    """
    tvm = _tvm.require_tvm()
    te, tirx = tvm.te, tvm.tirx
    c, h, w_ = spec.in_shape
    (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
    ho, wo = spec.out_hw
    small = c < TT_WORD
    cw = 1 if small else c // TT_WORD
    jc = te.reduce_axis((0, c), "jc") if small else j

    def xbits(b: Any, y: Any, z: Any, q: Any, s: Any) -> Any:
        inb = tirx.all(y >= ph, y < h + ph, z >= pw, z < w_ + pw)
        v = x[b, te.max(te.min(y - ph, h - 1), 0), te.max(te.min(z - pw, w_ - 1), 0),
              jc if small else q * TT_WORD + j]
        return word(tirx.if_then_else(inb, v, tirx.const(0, x.dtype)), s, jc)

    xb = te.compute((spec.batch, h + 2 * ph, w_ + 2 * pw, cw, 2), xbits, name="X_bits")

    def pixel(m: Any, tap: Any, q: Any, s: Any) -> Any:
        b, r = m // (ho * wo), m % (ho * wo)
        return xb[b, (r // wo) * sh + tap // kw, (r % wo) * sw + tap % kw, q, s]

    def gather(m: Any, w: Any, s: Any) -> Any:
        if not small:
            return pixel(m, w // cw, w % cw, s)
        per = TT_WORD // c
        v = None
        for t in range(min(per, kh * kw)):  # a word never holds more taps than the kernel
            tap = w * per + t
            part = tirx.if_then_else(
                tap < kh * kw, pixel(m, te.min(tap, kh * kw - 1), 0, s),
                tirx.const(0, "uint64")) << tirx.const(t * c, "uint64")
            v = part if v is None else v | part
        return v

    return te.compute((spec.M, spec.words, 2), gather, name="A_bits")


def tt_compute(spec: GemmSpec) -> Any:
    """PrimFunc ``main(X, Wm, Ws, [Bw], [Tw], S, bias, out)`` of a ``tt_planes`` spec.

    ``X`` holds ternary activation codes (int8, NHWC or [B, F]). Blocks::

        A_in  [M, Kp]     im2col / group padding (zeros = no bit), as for the other layouts
        A_bits[M, KW, 2]  uint64 mask (s=0: a != 0) and sign (s=1: a < 0) planes
        acc   [M, G, Np]  sum_q popc(am & wm) - 2 popc(am & wm & (as ^ ws))   (int32, exact)
        ep    [M, Np]     sum_g S[n, g] * acc                                   (S = α scales)
        asum  [M]         sum_k a = sum_q popc(am) - 2 popc(am & as)            (w_off only)
        out   [M, N]      ep + bias [+ Bw[n] * asum] [+ sum of Tw[t, n] over the kernel taps
                          t inside the image (border only, inline)]

    The affine terms follow :func:`tt_affine_terms`; a padded tap is a zero in ``A_in`` (no
    bit) and outside the image for ``corr``, so it contributes nothing, offsets included.
    """
    tvm = _tvm.require_tvm()
    te, tirx = tvm.te, tvm.tirx
    m_, g_, np_, nb, kw_ = spec.M, spec.G, spec.Np, spec.nb, spec.words
    q_per_g = spec.gsp // TT_WORD
    if spec.float_in and not (spec.pixel_bits and spec.threshold >= 0):
        raise ValueError("float_in needs a pixel_bits conv and a threshold >= 0")
    x = te.placeholder(spec.input_shape, "float32" if spec.float_in else "int8", name="X")
    j = te.reduce_axis((0, TT_WORD), "j")

    def word(v: Any, s: Any, axis: Any = j) -> Any:
        if spec.float_in:  # code(x) = sign(x) [|x| > t]: nonzero iff |x| > t, -1 iff x < -t
            t = tirx.const(spec.threshold, "float32")
            bit = tirx.Select(s == 0, tirx.abs(v) > t, v < -t)
        else:
            bit = tirx.Select(s == 0, v != tirx.const(0, "int8"), v < tirx.const(0, "int8"))
        # disjoint bits: the sum is an OR
        return te.sum(bit.astype("uint64") << axis.astype("uint64"), axis=axis)

    if spec.pixel_bits:
        planes = _pixel_planes(spec, x, word, j)
    else:
        a = _input_stage(spec, x, None)
        planes = te.compute((m_, kw_, 2), lambda m, w, s: word(a[m, w * TT_WORD + j], s),
                            name="A_bits")
    wm = te.placeholder((np_ // nb, kw_, nb), "uint64", name="Wm")
    ws = te.placeholder((np_ // nb, kw_, nb), "uint64", name="Ws")

    def popc(v: Any) -> Any:
        return tirx.popcount(v).astype("int32")

    q = te.reduce_axis((0, q_per_g), "q")

    def dot(m: Any, g: Any, n: Any) -> Any:
        w = g * q_per_g + q
        nz = planes[m, w, 0] & wm[n // nb, w, n % nb]
        neg = nz & (planes[m, w, 1] ^ ws[n // nb, w, n % nb])
        return te.sum(popc(nz) - (popc(neg) << 1), axis=q)

    acc = te.compute((m_, g_, np_), dot, name="acc")
    s = te.placeholder((np_, g_), "float32", name="S")
    bias = te.placeholder((np_,), "float32", name="bias")
    gr = te.reduce_axis((0, g_), "g")
    ep = te.compute((m_, np_), lambda m, n: te.sum(
        s[n, gr] * acc[m, gr, n].astype("float32"), axis=gr), name="ep")
    extra_args: list[Any] = []
    terms: list[Callable[[Any, Any], Any]] = []
    if spec.w_off:
        bw = te.placeholder((np_,), "float32", name="Bw")
        qa = te.reduce_axis((0, kw_), "qa")
        asum = te.compute((m_,), lambda m: te.sum(
            popc(planes[m, qa, 0]) - (popc(planes[m, qa, 0] & planes[m, qa, 1]) << 1),
            axis=qa), name="asum")
        extra_args.append(bw)
        terms.append(lambda m, n: bw[n] * asum[m].astype("float32"))
    if spec.border:
        c, h, w_ = spec.in_shape
        (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
        ho, wo = spec.out_hw
        tw = te.placeholder((kh * kw, np_), "float32", name="Tw")

        def corr(m: Any, n: Any) -> Any:
            # an explicit sum over the kh*kw taps, not a reduction block: `out` keeps a single
            # producer stage (ep), so it can still be fused under the GEMM's row-tile loop
            r = m % (ho * wo)
            oy, ox = (r // wo) * sh - ph, (r % wo) * sw - pw
            v = None
            for i in range(kh):
                for jj in range(kw):
                    inside = tirx.all(oy + i >= 0, oy + i < h, ox + jj >= 0, ox + jj < w_)
                    tap = tirx.Select(inside, tw[i * kw + jj, n], tirx.const(0.0, "float32"))
                    v = tap if v is None else v + tap
            return v

        extra_args.append(tw)
        terms.append(corr)

    def out_f(m: Any, n: Any) -> Any:
        v = ep[m, n] + bias[n]
        for term in terms:
            v = v + term(m, n)
        return v

    out = te.compute((m_, spec.N), out_f, name="out")
    return te.create_prim_func([x, wm, ws, *extra_args, s, bias, out])


# ----------------------------------------------------------------------------- rules and kernels


@dataclass
class Kernel:
    """A compiled layer kernel: ``module["main"](X, *weights, S, bias, out)``.

    ``executable`` is TVM's build result; ``module`` (the loaded runtime module) exists only
    for targets that run in this process (see :attr:`_tvm.TargetInfo.local`); a cross-compiled
    kernel is exported with :meth:`export` and run elsewhere (qemu, an RPC board).
    """

    rule: str
    impl: str
    spec: GemmSpec
    target_str: str
    executable: Any
    build_s: float
    params: Mapping[str, int] = field(default_factory=dict)
    _module: Any = field(default=None, repr=False)

    @property
    def module(self) -> Any:
        if self._module is None:
            self._module = self.executable.jit()
        return self._module

    @property
    def func(self) -> Any:
        return self.module["main"]

    def pack(self, lx: LayerExport) -> list[np.ndarray]:
        return pack_weight_args(self.spec, lx)

    def export(self, path: str | Any, **kwargs: Any) -> None:
        """``export_library`` (``fcompile=`` a cross compiler for ARM)."""
        self.executable.export_library(str(path), **kwargs)


_CACHE: dict[tuple[str, GemmSpec, str], Kernel] = {}
_CACHE_LOCK = threading.Lock()


def kernel_cache_size() -> int:
    return len(_CACHE)


def clear_kernel_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


@dataclass(frozen=True)
class Rule:
    """One schedule rule of a target (dlight style: the first rule that applies wins).

    ``plan(lx, batch, target, params)`` turns a layer into a :class:`GemmSpec` (layout,
    padding, tiles from ``params``); ``schedule`` turns the spec's TE PrimFunc into a scheduled
    IRModule. ``grid`` lists the tile parameters a per-shape search may try; its first entry is
    the default (used when no search result is cached).
    """

    name: str
    impl: str
    applies: Callable[[LayerExport, _tvm.TargetInfo], bool]
    plan: Callable[[LayerExport, int, _tvm.TargetInfo, Params], GemmSpec]
    schedule: Callable[[Any, GemmSpec], Any] = field(repr=False)
    #: tag weight-only layers (float activations) with ``_a32`` (rules that serve both kinds)
    a32_suffix: bool = True
    grid: tuple[Params, ...] = ({},)

    @property
    def default_params(self) -> Params:
        return self.grid[0] if self.grid else {}

    def impl_for(self, lx: LayerExport) -> str:
        """Implementation name; weight-only layers (float activations) get an ``_a32`` suffix
        unless the rule serves only them."""
        if self.a32_suffix and lx.act_mode == "fp32" and lx.weight_format != "fp32":
            return self.impl + "_a32"
        return self.impl

    def spec_for(self, lx: LayerExport, batch: int, target: _tvm.TargetInfo, params: Params,
                 *, float_input: bool = False) -> GemmSpec:
        """The planned spec; with ``float_input`` a ``pixel_bits`` ternary conv takes the
        layer's float input and quantizes it while packing."""
        spec = self.plan(lx, batch, target, params)
        if float_input and spec.pixel_bits and lx.act_threshold >= 0:
            spec = dataclasses.replace(spec, float_in=True, threshold=float(lx.act_threshold))
        return spec

    def build(self, lx: LayerExport, batch: int, target: _tvm.TargetInfo,
              params: Params | None = None, *, float_input: bool = False) -> Kernel:
        """Compile (or fetch from the in-process cache) the kernel for ``lx`` at ``batch``.

        ``float_input``: where the layout can quantize while packing (``pixel_bits`` ternary
        convs), take the layer's float input instead of activation codes; elsewhere ignored
        (check ``kernel.spec.float_in``).
        """
        p = dict(self.default_params if params is None else params)
        spec = self.spec_for(lx, batch, target, p, float_input=float_input)
        key = (self.name, spec, target.target_str)
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                return hit
            t0 = time.perf_counter()
            mod = self.schedule(gemm_compute(spec), spec)
            exe = _tvm.compile_prim_module(mod, target)
            kern = Kernel(rule=self.name, impl=self.impl_for(lx), spec=spec,
                          target_str=target.target_str, executable=exe,
                          build_s=time.perf_counter() - t0, params=p)
            _CACHE[key] = kern
        log.debug("built %s for %s in %.2fs", self.name, spec.shape_key, kern.build_s)
        return kern
