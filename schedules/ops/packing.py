"""Weight packing (numpy): a layer's codes and scales into the runtime arguments of a kernel,
in each layout of the package docstring, with the layouts' tile constants."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

    from .spec import GemmSpec

#: the 2-bit AVX2 tile: 8 output channels x 16 reduction elements in 32 bytes (AVX-512: 16
#: output channels in 64 bytes, :data:`AVX512_TILE_N`)
AVX2_TILE_N = 8
AVX512_TILE_N = 16
AVX2_TILE_K = 16
#: the unsigned activation offset of the AVX2 path (int8 a -> uint8 a + 128)
AVX2_ACT_OFFSET = 128
#: bits per activation/weight plane word of the ternary x ternary kernel
TT_WORD = 64


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


def pack_i8_tiles(w: np.ndarray, np_: int, kp: int, tile_n: int = AVX2_TILE_N) -> np.ndarray:
    """Dense int8 weights [N, K] -> int8 [Np/T, Kp/4, 4T]: byte ``ni*4 + ki`` of ``(nb, kq)`` is
    ``w[nb*T + ni, kq*4 + ki]`` (the decoded layout of :func:`pack_t2_avx2`, zero padded).

    Example:
        >>> p = pack_i8_tiles(np.arange(8, dtype=np.int8).reshape(1, 8), 8, 16)
        >>> p.shape, p[0, 1, :4].tolist()
        ((1, 4, 32), [4, 5, 6, 7])
    """
    t = int(tile_n)
    if np_ % t or kp % 4:
        raise ValueError(f"padded shape ({np_}, {kp}) must be multiples of ({t}, 4)")
    p = _pad2(w.astype(np.int8), np_, kp).reshape(np_ // t, t, kp // 4, 4)
    return np.ascontiguousarray(p.transpose(0, 2, 1, 3).reshape(np_ // t, kp // 4, 4 * t))


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


#: the ``t2_avx2`` / ``i8_avx2`` scales and corrections in blocks of the register tile's
#: channels (False: one block of all ``Np``, i.e. group-major ``[G, Np]``, the layout before)
SCALES_BLOCK_MAJOR = True


def scale_block(spec: GemmSpec) -> int:
    """Channels per block of the ``t2_avx2`` / ``i8_avx2`` scales and corrections (see
    :func:`block_major`): the register tile's ``nb``."""
    return spec.nb if SCALES_BLOCK_MAJOR else spec.Np


def block_major(per_group: np.ndarray, nb: int) -> np.ndarray:
    """``[Np, G]`` per-(output, group) values -> ``[Np / nb, G, nb]``: a block of ``nb`` output
    channels holds its groups one after the other, each group's ``nb`` values contiguous (the
    ``t2_avx2`` / ``i8_avx2`` scales and corrections; with one group it is the ``[Np]`` order).

    Example:
        >>> block_major(np.arange(8).reshape(4, 2), 2)[1].tolist()  # channels 2, 3
        [[4, 6], [5, 7]]
    """
    np_, g = per_group.shape
    return np.ascontiguousarray(per_group.reshape(np_ // nb, nb, g).transpose(0, 2, 1))


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
    channels; for ``spec.border`` its sums over the taps inside the image as the kernel reads
    them (:func:`border_classes`: ``Rc [Ho]``, ``Cc [Wo]`` int32 and ``Tb [R, C, Np]``); and
    ``bias [Np]`` with the ``β_a`` term folded in when every tap is always valid (linear
    layers, unpadded convs).
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
    out = {"Bw": bw.astype(np.float32), "Tw": _pad2(tw.T, taps, spec.Np).astype(np.float32),
           "bias": bias.astype(np.float32)}
    if spec.border:
        rc, cc, tb = border_classes(spec, _pad2(tw.T, taps, spec.Np))
        out.update(Rc=rc, Cc=cc, Tb=tb)
    return out


def _tap_classes(n_out: int, k: int, stride: int, pad: int, size: int
                 ) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Per output row (or column): the index of its set of in-image kernel taps, and the sets."""
    sets: list[tuple[int, ...]] = []
    idx = np.zeros(n_out, np.int32)
    for o in range(n_out):
        valid = tuple(i for i in range(k) if 0 <= o * stride - pad + i < size)
        if valid not in sets:
            sets.append(valid)
        idx[o] = sets.index(valid)
    return idx, sets


def border_class_counts(spec: GemmSpec) -> tuple[int, int]:
    """``(R, C)``: how many row and column classes :func:`border_classes` gives ``spec`` (the
    leading shape of its ``Tb``, which a kernel's signature declares).

    Example:
        >>> from types import SimpleNamespace as S
        >>> border_class_counts(S(out_hw=(4, 4), kernel=(3, 3), stride=(1, 1), padding=(1, 1),
        ...                       in_shape=(1, 4, 4)))
        (3, 3)
    """
    (ho, wo), (kh, kw) = spec.out_hw, spec.kernel
    (sh, sw), (ph, pw) = spec.stride, spec.padding
    _c, h, w = spec.in_shape
    return (len(_tap_classes(ho, kh, sh, ph, h)[1]), len(_tap_classes(wo, kw, sw, pw, w)[1]))


def border_classes(spec: GemmSpec, tw: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The border term of a padded conv as a lookup: ``Rc [Ho]`` / ``Cc [Wo]`` give each output
    row / column the class of its in-image kernel rows / columns (a 3x3, pad 1 conv has 3 of
    each: first, inner, last), ``Tb [R, C, Np]`` the sum of ``tw [kh*kw, Np]`` over the taps of
    each class pair, summed in float64 and rounded once. The kernel adds ``Tb[Rc[y], Cc[x], n]``:
    one load per output instead of a select per tap.

    Example:
        >>> from types import SimpleNamespace as S
        >>> sp = S(out_hw=(4, 4), kernel=(3, 3), stride=(1, 1), padding=(1, 1), in_shape=(1, 4, 4))
        >>> rc, cc, tb = border_classes(sp, np.ones((9, 1)))
        >>> rc.tolist(), tb[:, :, 0].tolist()
        ([0, 1, 1, 2], [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]])
    """
    (ho, wo), (kh, kw) = spec.out_hw, spec.kernel
    (sh, sw), (ph, pw) = spec.stride, spec.padding
    _c, h, w = spec.in_shape
    rc, rows = _tap_classes(ho, kh, sh, ph, h)
    cc, cols = _tap_classes(wo, kw, sw, pw, w)
    t = np.asarray(tw, np.float64).reshape(kh, kw, -1)
    tb = np.stack([np.stack([t[list(r)][:, list(c)].sum(axis=(0, 1)) for c in cols])
                   for r in rows])
    return rc, cc, tb.astype(np.float32)



def pack_lut_idx(codes: np.ndarray, channels: int, kernel: tuple[int, int],
                 np_: int, *, group: int = 3, paired: bool = False) -> np.ndarray:
    """Table-lookup weight indices ``[taps, CGp, Np]`` from ternary codes ``[N, K]`` in
    (kh, kw, C) order: ``sum_j 3^j (w_j + 1)`` per tap and group of ``group`` channels; padding
    channels, groups and output channels get the all-zero index ``(3^group - 1) / 2``.
    ``group=3``: ``t2_lut`` (uint8, 27 indices); ``group=4``: ``tt_lut`` (int8, 81).
    Channel order: in each block of a vector's ``width`` output channels (32 for ``t2_lut``'s
    int16 lanes, 64 for ``tt_lut``'s bytes; ``Np`` a multiple of it) lanes ``2m`` and ``2m + 1``
    hold channels ``m`` and ``width / 2 + m``: the kernels read a lane pair as one wide lane
    when they widen their sums (:func:`.lut.row_tile_kernel`). ``paired`` (``t2_lut``, byte
    indices): bytes ``2k`` and ``2k + 1`` of each 64-channel block then hold the ``k``-th
    index of its two 32-channel vectors (``t2_lut`` reads a block as 32 int16 words:
    ``vpermw`` looks up the low byte's index, and again after a shift right by 8 the high
    byte's). So a paired block's bytes hold channels 0, 32, 16, 48, 1, 33, 17, 49, ...

    Example:
        >>> pack_lut_idx(np.array([[1, 0, -1, 1]]), 4, (1, 1), 32)[0, :, 0].tolist()
        [5, 14]
        >>> pack_lut_idx(np.array([[1, 0, -1, 1]]), 4, (1, 1), 64, group=4)[0, :, 0].tolist()
        [59]
        >>> codes = np.zeros((64, 3), int)
        >>> codes[16, 0] = codes[32, 1] = codes[48, 2] = 1  # 13 is the all-zero index
        >>> pack_lut_idx(codes, 3, (1, 1), 64, paired=True)[0, 0, :4].tolist()
        [13, 16, 14, 22]
    """
    from .lut import LUT_LANES, lut_geometry_of
    from .ttlut import TT_LUT_GROUP, TT_LUT_LANES, ttlut_geometry_of

    _check_ternary(codes)
    n = codes.shape[0]
    taps = kernel[0] * kernel[1]
    byte = group == TT_LUT_GROUP  # tt_lut: int8 indices, runs of 31; t2_lut: uint8, runs of 85
    dtype: type[np.integer] = np.int8 if byte else np.uint8
    cgp = (ttlut_geometry_of(channels, (kernel[0], kernel[1])) if byte
           else lut_geometry_of(channels, (kernel[0], kernel[1]))).cgp
    w = np.zeros((n, taps, cgp * group), np.int16)
    w[:, :, :channels] = np.asarray(codes, np.int16).reshape(n, taps, channels)
    d = w.reshape(n, taps, cgp, group) + 1
    idx = np.full((taps, cgp, np_), (3 ** group - 1) // 2, dtype)
    idx[:, :, :n] = (d * 3 ** np.arange(group)).sum(-1).transpose(1, 2, 0)
    # lanes 2m, 2m + 1 of each vector's block hold channels m and width / 2 + m (the kernels'
    # widening reads lane pairs as one wide lane: lut.row_tile_kernel)
    width = TT_LUT_LANES if byte else LUT_LANES
    if np_ % width:
        raise ValueError(f"table-lookup indices need Np % {width} == 0, got {np_}")
    idx = _interleave(idx, width)
    if paired:
        if np_ % 64:
            raise ValueError(f"paired indices need Np % 64 == 0, got {np_}")
        idx = _interleave(idx, 64)
    return idx


def pack_lut_dp(codes: np.ndarray, channels: int, kernel: tuple[int, int],
                np_: int) -> list[np.ndarray]:
    """``t2_lut`` with dot-product channels (:attr:`.spec.GemmSpec.lut_dp`): ``Wi [taps, T,
    Np]`` int16 indices of the looked-up triples (as :func:`pack_lut_idx`), ``Wv [taps, Q,
    4 Np]`` int8 weights of the quads (byte ``4 n + i``: channel ``n``, the quad's input ``i``)
    and ``Cv [Np]`` = -128 x the sum of each channel's quad weights (the kernel adds 128 to
    the quads' inputs: ``vpdpbusd`` multiplies unsigned by signed bytes). ``codes [N, K]`` in
    (kh, kw, C) order.

    Example:
        >>> codes = np.zeros((32, 128), int)
        >>> codes[1, 0], codes[1, 60:64] = 1, [1, -1, 1, 1]  # triple 0; quad 0 of chunk 0
        >>> wi, wv, cv = pack_lut_dp(codes, 128, (1, 1), 32)
        >>> wi.shape, wv.shape, int(wi[0, 0, 2]), wv[0, 0, 4:8].tolist(), int(cv[1])
        ((1, 20, 32), (1, 17, 128), 14, [1, -1, 1, 1], -256)
    """
    from .lut import LUT_GROUP, LUT_LANES, lut_dp_geometry_of

    _check_ternary(codes)
    geo = lut_dp_geometry_of(channels, kernel)
    if geo is None:
        raise ValueError(f"lut_dp: {channels} input channels with kernel {kernel} have no split")
    if np_ % LUT_LANES:
        raise ValueError(f"table-lookup indices need Np % {LUT_LANES} == 0, got {np_}")
    n, taps = codes.shape[0], kernel[0] * kernel[1]
    w = np.zeros((np_, taps, geo.nc, geo.chunk), np.int16)  # padding channels: zeros (index 13)
    w[:n] = np.asarray(codes, np.int16).reshape(n, taps, geo.nc, geo.chunk)
    split = LUT_GROUP * geo.cgc
    d = w[..., :split].reshape(np_, taps, geo.nc * geo.cgc, LUT_GROUP) + 1
    idx = (d * 3 ** np.arange(LUT_GROUP)).sum(-1).transpose(1, 2, 0).astype(np.int16)
    quads = w[..., split:].reshape(np_, taps, geo.nc * geo.qc, 4)
    wv = np.ascontiguousarray(quads.transpose(1, 2, 0, 3)).reshape(taps, geo.nc * geo.qc,
                                                                   4 * np_)
    cv = (-128 * quads.sum(axis=(1, 2, 3))).astype(np.int32)
    return [_interleave(idx, LUT_LANES), wv.astype(np.int8), cv]


def _interleave(idx: np.ndarray, width: int) -> np.ndarray:
    """Per block of ``width`` channels of the last axis: position ``2k + half`` takes channel
    ``half * width / 2 + k``.

    Example:
        >>> _interleave(np.arange(8).reshape(1, 8), 4).tolist()
        [[0, 2, 1, 3, 4, 6, 5, 7]]
    """
    *lead, n = idx.shape
    blocks = idx.reshape(*lead, n // width, 2, width // 2)  # [.., half, k] -> 2k + half
    return np.ascontiguousarray(np.swapaxes(blocks, -1, -2)).reshape(idx.shape)


def pack_weight_args(spec: GemmSpec, lx: LayerExport) -> list[np.ndarray]:
    """Runtime weight arguments of a kernel, in PrimFunc order: weights (+ Cw), S, bias."""
    # bf16_amx packs the codes times their group scales; they take the same reorder / padding
    codes = (np.asarray(lx.dequantized_weight(), np.float32) if spec.layout == "bf16_amx"
             else np.asarray(lx.codes))
    if spec.op == "conv2d" and spec.k_order == "ijc":
        c, kh, kw = spec.in_shape[0], *spec.kernel
        codes = codes.reshape(spec.N, c, kh, kw).transpose(0, 2, 3, 1).reshape(spec.N, spec.K)
    if spec.k_row:  # each kernel row's kw*C weights padded to k_row (GemmSpec.k_row)
        kh, run = spec.kernel[0], spec.kernel[1] * spec.in_shape[0]
        padded = np.zeros((spec.N, kh, spec.k_row), codes.dtype)
        padded[:, :, :run] = codes.reshape(spec.N, kh, run)
        codes = padded.reshape(spec.N, spec.Kp)
    if spec.layout == "tt_planes":
        if spec.row_words:  # (kh, kw, C) -> each kernel row's taps padded to whole words
            c, kh, kw = spec.in_shape[0], *spec.kernel
            per = TT_WORD // c
            rw = np.zeros((spec.N, kh, spec.row_chunks * per, c), codes.dtype)
            rw[:, :, :kw] = codes.reshape(spec.N, kh, kw, c)
            codes = rw.reshape(spec.N, spec.Kp)
            return _pack_tt_args(spec, lx, codes, gs=spec.Kp)
        return _pack_tt_args(spec, lx, codes)
    if spec.layout in ("t2_avx2", "i8_avx2"):
        pack = pack_t2_avx2 if spec.layout == "t2_avx2" else pack_i8_tiles
        w_args = [pack(codes, spec.Np, spec.Kp, spec.tile_n), block_major(
            AVX2_ACT_OFFSET * group_code_sums(codes, spec.G, spec.gs, spec.Np),
            scale_block(spec))]
    elif spec.layout in ("t2_blocked", "t2_decoded"):
        w_args = [pack_t2_blocked(codes, spec.nb, spec.Np, spec.Kp)]
    elif spec.layout == "t2_lut" and spec.lut_dp:
        w_args = pack_lut_dp(codes, spec.in_shape[0], spec.kernel, spec.Np)
    elif spec.layout == "t2_lut":
        w_args = [pack_lut_idx(codes, spec.in_shape[0], spec.kernel, spec.Np,
                               paired=spec.nb % 64 == 0)]
    elif spec.layout in ("t2_amx", "tt_amx"):
        from .amx import pack_amx_tiles

        w_args = [pack_amx_tiles(codes, spec.in_shape[0], spec.kernel, spec.Np)]
    elif spec.layout == "bf16_amx":  # row chunks: each padded kernel row is one "tap"
        from .amx import pack_bf16_tiles

        rows = (spec.k_row, (spec.kernel[0], 1)) if spec.k_row else (spec.in_shape[0],
                                                                     spec.kernel)
        w_args = [pack_bf16_tiles(codes, *rows, spec.Np, spec.planes)]
    elif spec.layout == "tt_lut":
        from .ttlut import TT_LUT_GROUP

        w_args = [pack_lut_idx(codes, spec.in_shape[0], spec.kernel, spec.Np,
                               group=TT_LUT_GROUP)]
    else:
        w_args = [pack_dense_blocked(codes, spec.nb, spec.Np, spec.Kp, spec.w_dtype)]
    scales = np.asarray(lx.scales, dtype=np.float64)
    if lx.weight_format == "fp32" or spec.layout == "bf16_amx":  # fp32: the codes are the
        # weights, scales are ones by contract; bf16_amx: the scales are in the weights
        scales = np.ones((spec.N, spec.G))
    act_scale = 1.0 if lx.act_mode == "fp32" else float(lx.act_scale)  # fp32: used as is
    s = _pad2((scales * act_scale).astype(np.float32), spec.Np, spec.G)
    if spec.layout in ("t2_avx2", "i8_avx2"):  # block-major (see gemm_compute)
        s = block_major(s, scale_block(spec))
    elif spec.layout in ("t2_lut", "tt_lut", "t2_amx", "tt_amx", "bf16_amx"):  # one group
        s = s.reshape(spec.Np)
    bias = np.zeros(spec.Np, np.float32)
    if lx.bias is not None:
        bias[: spec.N] = np.asarray(lx.bias, dtype=np.float32)
    if spec.layout in ("tt_lut", "tt_amx") and spec.affine:  # RTN's offsets, as for
        # tt_planes: their arguments, and a bias with a term folded in
        offsets, bias = _tt_offset_args(spec, lx)
        w_args += offsets
    return [*w_args, s, bias]


def requantize_args(spec: GemmSpec, args: list[np.ndarray], out_scale: float
                    ) -> list[np.ndarray]:
    """The weight arguments of an int8-output kernel (``spec.out_clip``): every float32
    epilogue argument (S, bias, RTN's ``Bw`` and ``Tb``) divided by ``out_scale``, so the
    epilogue's value counts output steps (the codes the next layer reads).

    Example:
        >>> from ternbench.schedules.ops.spec import GemmSpec
        >>> spec = GemmSpec(op="conv2d", batch=1, in_shape=(64, 8, 8), kernel=(3, 3),
        ...                 stride=(1, 1), padding=(1, 1), out_hw=(8, 8), k_order="ijc", N=32,
        ...                 K=576, G=1, gs=576, Kp=576, Np=32, act_dtype="int8",
        ...                 layout="t2_amx", w_dtype="uint8", nb=32, mb=32, m_task=1,
        ...                 out_clip=(-128, 127))
        >>> w, s, b = requantize_args(spec, [np.zeros(4, np.uint8), np.full(2, 0.5, np.float32),
        ...                                  np.ones(2, np.float32)], 0.25)
        >>> s.tolist(), b.tolist()
        ([2.0, 2.0], [4.0, 4.0])
    """
    if spec.out_clip is None:
        raise ValueError("requantize_args: the spec has float32 outputs (out_clip is None)")
    if not (math.isfinite(out_scale) and out_scale > 0):
        raise ValueError(f"out_scale: must be a positive finite number, got {out_scale}")
    return [args[0], *((a / np.float64(out_scale)).astype(np.float32) if a.dtype == np.float32
                       else a for a in args[1:])]


def _tt_offset_args(spec: GemmSpec, lx: LayerExport) -> tuple[list[np.ndarray], np.ndarray]:
    """The offset arguments ``[Bw], [Rc, Cc, Tb]`` of a ternary-activation kernel and its bias
    (with the activation offset folded in where every tap is always valid)."""
    terms = tt_affine_terms(lx, spec)
    args = [terms["Bw"]] if spec.w_off else []
    if spec.border:
        args += [terms["Rc"], terms["Cc"], terms["Tb"]]
    return args, terms["bias"]


def _pack_tt_args(spec: GemmSpec, lx: LayerExport, codes: np.ndarray,
                  gs: int | None = None) -> list[np.ndarray]:
    """``tt_planes`` arguments: Wm, Ws, [Bw], [Rc, Cc, Tb], S, bias (see :func:`tt_compute`)."""
    wm, ws = pack_planes(codes, spec.G, gs or spec.gs, spec.gsp, spec.nb, spec.Np)
    s = np.asarray(lx.scales, dtype=np.float64) * float(lx.act_scale)
    offsets, bias = _tt_offset_args(spec, lx)
    return [wm, ws, *offsets, _pad2(s.astype(np.float32), spec.Np, spec.G), bias]
