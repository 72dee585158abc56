"""The ``t2_amx`` layout: an int8-activation ternary conv on Intel AMX (``tdpbssd``).

On a CPU with AMX-INT8 torch's int8 convs run oneDNN's AMX kernels, and no ``vpdpbusd`` or
table-lookup kernel comes near them (instruction peaks on an Intel emeraldrapids,
``bench/kernels/peaks.py``: ``int8_amx`` 1055-2320 GMAC/s, ``int8_vpdpbusd`` 150-293). This
kernel puts the ternary weights on the same unit:

* weights stay 2-bit in memory (``Wp [taps * C / 64, Np / 16, 256]``: one byte holds the codes
  ``w + 1`` of four elements of a 16 x 64-byte B tile, 256 bytes apart) and every call decodes
  them once into int8 tiles in the VNNI order ``tdpbssd`` reads (row ``r``, byte ``4 j + q`` =
  output channel ``j`` of the block, reduction index ``4 r + q`` of the 64-channel chunk): a
  shift, a mask and a subtract per 64 weights;
* no im2col: each image is copied once into a zero-padded NHWC buffer (the zero ring written
  once per call), and an A tile is 16
  neighbouring output pixels of one output row under one tap and 64 input channels, loaded
  straight from it with a row stride of ``stride * C`` bytes;
* a register tile is 2 output rows x 16 pixels (or a whole shorter row: the tiles are
  configured with that many rows) x 32 output channels: two A tiles, two B tiles
  and four int32 accumulator tiles (all eight tile registers), one ``tdpbssd`` (16 x 16 x 64
  MACs) per pair; s8 x s8, so the int8 activations need no offset and the sums stay exact in
  int32 (``|x w| <= 128`` times a fan-in below 2^24);
* the 32-channel block runs innermost (each A tile stays in L1 for all blocks) unless the
  decoded weights outweigh twice the padded image; then the pixels do (each block's B tiles
  stay in L2 for all pixels);
* the epilogue stores the tiles to a small int32 buffer and writes ``acc * S + bias``, with
  non-temporal stores for outputs of 4 MB or more (:func:`.lut.streams_output`).

Measured on the Intel emeraldrapids (docs/kernels.md, "Intel"): the ResNet-18 3x3 convs at
batch 1 at a median 1.58x torch INT8's speed (oneDNN on AMX) and 2.34-3.98x ``t2_vnni``'s but
for the two with 7-pixel output rows, where a 16-pixel A tile carries 7.

Linux hands out the tile state per process on request (``arch_prctl(ARCH_REQ_XCOMP_PERM)``):
:func:`.._tvm.require_tvm` asks for it on a CPU with AMX, before any kernel runs. Each parallel
task loads the tile configuration itself (it is per thread) and releases the tiles at its end.
The kernel is TVMScript text like :mod:`.lut`: TIR has no tile registers, and the LLVM
intrinsics take the tile numbers as immediates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _tvm
from .lut import finish_source, streams_output

if TYPE_CHECKING:
    from .spec import GemmSpec

#: bytes of one tile row (the reduction chunk of an A tile: 64 input channels of one tap)
AMX_K = 64
#: rows of a tile (output pixels of an A tile, reduction quads of a B tile)
AMX_ROWS = 16
#: output channels of one B / accumulator tile (16 int32 = 64 bytes per row)
AMX_N = 16
#: output channels per register tile (two B tiles)
AMX_NB = 2 * AMX_N


def _geometry(spec: GemmSpec) -> tuple[int, int, int, int, int, int]:
    """``(kc, segs, pairs, hp, wp, nblk)``: reduction chunks, 16-pixel segments per output row,
    pairs of output rows, the padded copy's rows and columns (wide enough for the last
    segment's and row pair's reads), output-channel blocks."""
    c, h, w = spec.in_shape
    (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
    ho, wo = spec.out_hw
    segs, pairs = -(-wo // AMX_ROWS), -(-ho // 2)
    hp = max(h + 2 * ph, (2 * pairs - 1) * sh + kh)
    wp = max(w + 2 * pw, (segs * AMX_ROWS - 1) * sw + kw)
    return kh * kw * c // AMX_K, segs, pairs, hp, wp, spec.Np // AMX_NB


def pack_amx_tiles(codes: np.ndarray, channels: int, kernel: tuple[int, int],
                   n_pad: int) -> np.ndarray:
    """Ternary codes ``[N, kh * kw * C]`` (reduction order (kh, kw, C)) as the 2-bit B tiles
    of :mod:`.amx`: ``[taps * C / 64, n_pad / 16, 256]`` uint8, byte ``i`` of a tile holding
    the codes ``w + 1`` of its elements ``i + 256 s`` at bits ``2 s`` (s = 0..3); element ``e``
    is row ``e // 64`` (reduction quad), byte ``e % 64 = 4 j + q`` (output channel ``j``,
    reduction index ``4 row + q``). Padding channels hold zero weights.

    Example:
        >>> codes = np.zeros((2, 64), np.int8)
        >>> codes[0, 5], codes[1, 0] = 1, -1  # channel 0, k 5 (row 1, q 1); channel 1, k 0
        >>> t = pack_amx_tiles(codes, 64, (1, 1), 16)
        >>> t.shape, int(t[0, 0, 64 + 1] & 3), int(t[0, 0, 4] & 3), int(t[0, 0, 0] & 3)
        ((1, 1, 256), 2, 0, 1)
    """
    n, k = codes.shape
    if channels % AMX_K or k != kernel[0] * kernel[1] * channels or n_pad % AMX_N or n > n_pad:
        raise ValueError(f"t2_amx tiles: C={channels} must be a multiple of {AMX_K}, K={k} "
                         f"= taps x C, n_pad={n_pad} a multiple of {AMX_N} >= N={n}")
    u = np.ones((n_pad, k), np.uint8)  # w + 1; padding channels hold zero weights
    u[:n] = (np.asarray(codes) + 1).astype(np.uint8)
    # [nblk, j, kc, r, q] -> [kc, nblk, r, j, q]: element e = 64 r + 4 j + q of tile (kc, nblk)
    t = u.reshape(n_pad // AMX_N, AMX_N, k // AMX_K, AMX_ROWS, 4).transpose(2, 0, 3, 1, 4)
    e = t.reshape(k // AMX_K, n_pad // AMX_N, 4, 256)  # [kc, nblk, s, i]: e = 256 s + i
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return np.bitwise_or.reduce(e << shifts, axis=2).astype(np.uint8)


def amx_source(spec: GemmSpec) -> str:
    """TVMScript text of the ``t2_amx`` kernel for ``spec`` (see the module docstring)."""
    if spec.op != "conv2d" or spec.layout != "t2_amx" or spec.G != 1:
        raise ValueError(f"t2_amx is a one-group conv2d layout, got {spec.op} {spec.layout} "
                         f"G={spec.G}")
    c, h, w = spec.in_shape
    if c % AMX_K or spec.Np % AMX_NB:
        raise ValueError(f"t2_amx needs C % {AMX_K} == 0 and Np % {AMX_NB} == 0, got C={c}, "
                         f"Np={spec.Np}")
    (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
    ho, wo = spec.out_hw
    kc, segs, pairs, hp, wp, nblk = _geometry(spec)
    cc, mi = c // AMX_K, ho * wo
    # rows of an A / accumulator tile: 16 output pixels, or a whole shorter row (tdpbssd's
    # time follows its rows; one process, against 16-row tiles at batch 1 / 16: 7-pixel rows
    # 0.91x / 0.74x the time on 3x3/2 256 -> 512 and 0.95x / 0.92x on 512x7x7, 14-pixel ones
    # 0.79x / 0.96x on 256x14x14)
    rows = min(AMX_ROWS, wo)

    def intrin(name: str, *args: str) -> str:
        return f"T.evaluate(T.call_llvm_intrin('void', 'llvm.x86.{name}', {', '.join(args)}))"

    def i8(v: int) -> str:
        return f"T.int8({v})"

    lines = [
        "@T.prim_func(s_tir=True)",
        f"def main(X: T.Buffer(({spec.batch}, {h}, {w}, {c}), 'int8'),"
        f" Wp: T.Buffer(({kc}, {spec.Np // AMX_N}, 256), 'uint8'),"
        f" S: T.Buffer(({spec.Np},), 'float32'), bias: T.Buffer(({spec.Np},), 'float32'),"
        f" out: T.Buffer(({spec.M}, {spec.N}), 'float32')):",
        "    T.func_attr({'global_symbol': 'main', 'tir.noalias': True})",
        "    with T.sblock('root'):",
        f"        Wd = T.alloc_buffer(({kc}, {spec.Np // AMX_N}, 1024), 'int8')",
        f"        Xp = T.alloc_buffer(({hp}, {wp}, {c}), 'int8')",
        # the 2-bit weights decoded once per call into int8 B tiles
        f"        for k in T.parallel({kc}):",
        f"            for nb, s in T.grid({spec.Np // AMX_N}, 4):",
        "                for i in T.vectorized(256):",
        "                    Wd[k, nb, s * 256 + i] = T.Cast('int8', T.bitwise_and("
        "T.shift_right(Wp[k, nb, i], T.Cast('uint8', 2 * s)), T.uint8(3))) - T.int8(1)",
        # the zero ring, once per call (Xp is a per-call workspace; the images only fill the
        # interior)
        f"        for y in T.parallel({hp}):",
        f"            for z in range({wp}):",
        f"                if y < {ph} or y >= {h + ph} or z < {pw} or z >= {w + pw}:",
        f"                    for e in T.vectorized({c}):",
        "                        Xp[y, z, e] = T.int8(0)",
        f"        for b in range({spec.batch}):",
        f"            for y in T.parallel({h}):",
        f"                for z, q in T.grid({w}, {cc}):",
        f"                    for e in T.vectorized({AMX_K}):",
        f"                        Xp[y + {ph}, z + {pw}, q * {AMX_K} + e] = "
        f"X[b, y, z, q * {AMX_K} + e]",
        f"            for t in T.parallel({pairs * segs * nblk}):",
        "                with T.sblock('tile'):",
        "                    T.reads()",
        "                    T.writes()",
        "                    cfg = T.alloc_buffer((64,), 'uint8')",
        f"                    acc = T.alloc_buffer(({2 * AMX_ROWS * AMX_NB},), 'int32')",
        "                    for i in range(64):",
        # palette 1; 8 tiles of 64-byte rows (colsb: uint16 at 16 + 2 i, rows at 48 + i): the
        # B tiles (6, 7) 16 rows, the A and accumulator tiles (0-5) one per pixel of a segment
        "                        cfg[i] = T.if_then_else(i == 0, T.uint8(1), T.if_then_else("
        "i >= 16 and i < 32 and i % 2 == 0, T.uint8(64), T.if_then_else(i >= 48 and i < 54, "
        f"T.uint8({rows}), T.if_then_else(i >= 54 and i < 56, T.uint8(16), T.uint8(0)))))",
        "                    " + intrin("ldtilecfg", "T.address_of(cfg[0])"),
    ]
    ind = "                    "
    lines += [ind + intrin("tilezero", i8(a)) for a in range(4)]
    # tile t: (row pair, 16-pixel segment, 32-channel block). The block runs innermost (each
    # A tile stays in L1 for all blocks) unless the decoded weights outweigh twice the padded
    # image: then the pixels do, and each block's B tiles stay in L2 for all pixels (one
    # process, batch 1, pixels inner / block inner: 64x56x56 1.39x and 128x28x28 1.14x the
    # time; 256x14x14 0.83x, 3x3/2 256 -> 512 0.74x, 512x7x7 0.93x)
    if kc * spec.Np * AMX_K > 2 * hp * wp * c:
        nk, py, sg = f"t // {pairs * segs}", f"t // {segs} % {pairs}", f"t % {segs}"
    else:
        py, sg, nk = f"t // {segs * nblk}", f"t // {nblk} % {segs}", f"t % {nblk}"
    lines += [f"{ind}for dy, dx, q in T.grid({kh}, {kw}, {cc}):"]
    stride = f"T.int64({sw * c})"
    for a in range(2):  # A tiles: output rows 2 py + a, pixels 16 sg .. 16 sg + 15
        y = f"(2 * ({py}) + {a}) * {sh} + dy"
        x = f"({sg}) * {AMX_ROWS * sw} + dx"
        lines += [ind + "    " + intrin("tileloadd64", i8(4 + a),
                                        f"T.address_of(Xp[{y}, {x}, q * {AMX_K}])", stride)]
    for j in range(2):  # B tiles: channels 32 nk + 16 j ..
        lines += [ind + "    " + intrin(
            "tileloadd64", i8(6 + j),
            f"T.address_of(Wd[(dy * {kw} + dx) * {cc} + q, ({nk}) * 2 + {j}, 0])",
            f"T.int64({AMX_K})")]
    lines += [ind + "    " + intrin("tdpbssd", i8(2 * a + j), i8(4 + a), i8(6 + j))
              for a in range(2) for j in range(2)]
    # accumulators -> acc [2 rows x 16 pixels, 32 channels] (row stride 128 bytes)
    lines += [ind + intrin("tilestored64", i8(2 * a + j),
                           f"T.address_of(acc[{a * AMX_ROWS * AMX_NB + j * AMX_N}])",
                           f"T.int64({AMX_NB * 4})")
              for a in range(2) for j in range(2)]
    lines += [ind + intrin("tilerelease")]
    full = spec.N % AMX_NB == 0
    lines += [f"{ind}for a, r in T.grid(2, {AMX_ROWS}):",
              f"{ind}    if 2 * ({py}) + a < {ho} and ({sg}) * {AMX_ROWS} + r < {wo}:"]
    row = f"b * {mi} + (2 * ({py}) + a) * {wo} + ({sg}) * {AMX_ROWS} + r"
    ch = f"({nk}) * {AMX_NB}"
    if full:
        value = (f"T.Cast('float32x{AMX_NB}', acc[T.ramp((a * {AMX_ROWS} + r) * {AMX_NB}, 1, "
                 f"{AMX_NB})]) * S[T.ramp({ch}, 1, {AMX_NB})] + bias[T.ramp({ch}, 1, {AMX_NB})]")
        if streams_output(spec):  # large outputs bypass the caches (see lut.STREAM_MIN_BYTES)
            lines += [f"{ind}        T.evaluate(T.call_extern('void', 'tb_stream_f32x{AMX_NB}', "
                      f"T.address_of(out[{row}, {ch}]), {value}))"]
        else:
            lines += [f"{ind}        out[{row}, T.ramp({ch}, 1, {AMX_NB})] = {value}"]
    else:  # a partial last block: channel by channel
        lines += [f"{ind}        for n in range({AMX_NB}):",
                  f"{ind}            if {ch} + n < {spec.N}:",
                  f"{ind}                out[{row}, {ch} + n] = T.Cast('float32', "
                  f"acc[(a * {AMX_ROWS} + r) * {AMX_NB} + n]) * S[{ch} + n] + bias[{ch} + n]"]
    return finish_source(spec, lines, AMX_NB) if full else "\n".join(lines)


def amx_compute(spec: GemmSpec) -> Any:
    """The ``t2_amx`` PrimFunc for ``spec`` (already scheduled: see the module docstring)."""
    tvm = _tvm.require_tvm()
    from tvm.script import tirx as T

    return tvm.script.from_source(amx_source(spec), extra_vars={"T": T}, s_tir=True)
