"""The ``t2_amx``, ``tt_amx`` and ``bf16_amx`` layouts: ternary-weight convs on Intel AMX.

On a CPU with AMX-INT8 torch's int8 convs run oneDNN's AMX kernels, and no ``vpdpbusd``,
popcount or table-lookup kernel comes near them (instruction peaks on an Intel
emeraldrapids, ``bench/kernels/peaks.py``: ``int8_amx`` 1055-2320 GMAC/s, ``int8_vpdpbusd``
150-293, the popcount step 344-432). These kernels put the ternary weights on the same unit,
with int8 activations (``t2_amx``) or ternary activation codes in {-1, 0, 1}, which are int8
operands as they are (``tt_amx``; RTN's offsets are the affine terms of
:func:`.packing.tt_affine_terms`, added in the epilogue as :mod:`.ttlut` adds them):

* weights stay 2-bit in memory (``Wp [taps * C / 64, Np / 16, 256]``: one byte holds the codes
  ``w + 1`` of four elements of a 16 x 64-byte B tile, 256 bytes apart) and are decoded into
  int8 tiles in the VNNI order ``tdpbssd`` reads (row ``r``, byte ``4 j + q`` = output channel
  ``j`` of the block, reduction index ``4 r + q`` of the 64-channel chunk): a shift, a mask
  and a subtract per 64 weights;
* no im2col: each image is copied once into a zero-padded NHWC buffer (the zero ring written
  once per call), and an A tile is 16 output pixels under one tap and 64 input channels,
  loaded straight from it with a row stride of ``stride * C`` bytes: 16 neighbours in one
  output row, or, for stride-1 convs whose padded row is narrower than its 16-pixel
  segments, 16 consecutive pixels of the padded-width output (:func:`amx_geometry`);
* a register tile is 32 pixels (2 A tiles) x 32 output channels (2 B tiles), with four int32
  accumulator tiles (all eight tile registers), one ``tdpbssd`` (16 x 16 x 64 MACs) per pair;
  s8 x s8, so the activations need no offset and the sums stay exact in int32 (``|x w| <=
  128`` times a fan-in below 2^24);
* the 32-channel block runs innermost, image by image, with the weights decoded once per
  call (each A tile stays in L1 for all blocks), unless the decoded weights outweigh twice
  the padded image; then the pixels of the whole batch do, and each task decodes the blocks
  it runs into a buffer that stays in L2 for all their pixels (instead of 4x the packed
  weights written and read back per call); at batch 1 a block of few tiles decodes each
  chunk's B tiles inside its first tile's chunk loop, so the vector units decode while AMX
  multiplies (:data:`AMX_INLINE_DECODE_TILES`); a large batch goes in chunks of images whose
  padded copies fit in half the L2 (:data:`AMX_CHUNK_BYTES`), every block over one chunk
  before the next, and each source tile is reloaded for the next chunk right after its last
  product (AMX does not rename tile registers: a load waits for the products that read it);
* a parallel task runs consecutive register tiles (at most :data:`AMX_TASKS` tasks; pixels
  inner, one per channel block and batch chunk, which decodes the block once), loading
  the tile configuration once;
* the epilogue stores the tiles to a small int32 buffer and writes ``acc * S + bias [+
  terms]``, with non-temporal stores for outputs of 4 MB or more (:func:`.lut.streams_output`),
  a few rows at a time during the next tile's products (a double buffer), so the vector
  units convert and store while AMX multiplies.

``bf16_amx`` runs FGQ's grouped convs (a scale every N weights) on ``tdpbf16ps`` (16 x 16 x 32
MACs, float32 accumulators). An integer kernel has to convert and scale each group's sum
(for N = 4 one ``vpdpbusd`` + convert + FMA per 64 MACs: no more than 1.3x torch's fp32 FMAs);
here the scales are folded into the weights instead: codes times their group scales, each
split into the fewest bf16 pieces that sum to it exactly (:func:`bf16_pieces`: two for FGQ's
FP16 scales, at most three for any float32 value), one B-tile plane per piece, all run on the
same A tiles. The activation codes (|x| <= 127) are exact bf16 values, so every product is
exact in float32 and only the sums round, as in torch's fp32 conv; the group size and order
cost nothing. The weights are stored decoded (2 bytes per piece) and block-major, a 32-channel
block's tiles for the whole reduction in the order they are read (they stream from memory in
a whole model: FGQ's ResNet-18 took 0.78x the time so, against chunk-major tiles 64 KB
apart, docs/kernels.md "Intel"); the A tiles hold 32 channels, the rest (padded copies, phase
planes, tasks, pixels inner) is the int8 kernel's.

FP32 convs (the stems ternary models keep in FP32; rule ``x86.fp32_amx``) run the same
``bf16_amx`` kernel on float32 inputs (``GemmSpec.a_planes = 3``): each input value is split
exactly into three bf16 pieces while the image is copied (one copy per piece), each weight
into three (:func:`bf16_pieces`), and each reduction chunk runs the six piece products
``a_i x w_j`` with ``i + j <= 2``; the three left out are each at most about 2^-24 of their
product, float32's unit roundoff.

``t2_amx`` / ``tt_amx`` can write int8 outputs (``GemmSpec.out_clip``): the epilogue rounds
``acc * S + bias [+ terms]`` half to even, clips and narrows it, S, bias and the terms divided
by the output scale on the host (:func:`.packing.requantize_args`); plain stores, since a
32-channel block is half a cache line.

Measured on the Intel emeraldrapids: docs/kernels.md, "Intel".

Linux hands out the tile state per process on request (``arch_prctl(ARCH_REQ_XCOMP_PERM)``):
:func:`.._tvm.require_tvm` asks for it on a CPU with AMX, before any kernel runs. Each parallel
task loads the tile configuration itself (it is per thread) and releases the tiles at its end.
The kernel is TVMScript text like :mod:`.lut`: TIR has no tile registers, and the LLVM
intrinsics take the tile numbers as immediates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .. import _tvm
from .lut import finish_source, requantized, streams_output
from .ttlut import channel_sum, offset_params, window_sum

if TYPE_CHECKING:
    from .spec import GemmSpec

#: bytes of one tile row (the reduction chunk of an A tile: 64 input channels of one tap)
AMX_K = 64
#: channels of one ``bf16_amx`` tile row (32 bf16 = 64 bytes; ``tdpbf16ps`` reduces pairs)
AMX_K_BF16 = 32
#: rows of a tile (output pixels of an A tile, reduction quads of a B tile)
AMX_ROWS = 16
#: output channels of one B / accumulator tile (16 int32 = 64 bytes per row)
AMX_N = 16
#: output channels per register tile (two B tiles)
AMX_NB = 2 * AMX_N
#: parallel tasks of a call at most (each loads the tile configuration once)
AMX_TASKS = 32
#: bytes of the padded images one pass of the channel blocks covers (pixels inner)
AMX_CHUNK_BYTES = 1 << 20
#: batch 1: a block of at most this many register tiles decodes each chunk's B tiles in its
#: first tile's chunk loop (the vector units decode while AMX multiplies), not all up front
AMX_INLINE_DECODE_TILES = 16


class AmxGeometry(NamedTuple):
    """How a ``t2_amx`` / ``tt_amx`` conv is cut into register tiles of 32 output pixels (two
    16-row A tiles) x 32 output channels (two B tiles), and the padded copy they read."""

    kc: int  #: reduction chunks (64 input channels of one tap)
    nblk: int  #: 32-channel output blocks
    flat: bool  #: tiles of 32 consecutive pixels of the plane-width output
    tiles: int  #: register tiles per image and block
    segs: int  #: row tiles: 16-pixel segments per output row
    pairs: int  #: row tiles: pairs of output rows
    hp: int  #: rows of the padded copy (flat: of one phase plane), enough for the last reads
    wp: int  #: columns of the padded copy (flat: of one phase plane)
    rows: int  #: rows of an A / accumulator tile
    qh: int = 1  #: flat: phase planes per padded-image row step (the conv's vertical stride)
    qw: int = 1  #: flat: phase planes per column step (the horizontal stride)

    @property
    def copy_pixels(self) -> int:
        """Pixels of one image's padded copy (all its phase planes)."""
        return self.qh * self.qw * self.hp * self.wp


def amx_geometry(spec: GemmSpec) -> AmxGeometry:
    """The tiles of ``spec``. Row tiles cover 2 output rows x 16 pixels (or a whole shorter
    row, the tiles configured with that many rows). Convs whose output rows fill their
    16-pixel segments worse than the padded rows' phase planes do take flat tiles instead.
    The padded image is copied as ``sh x sw`` phase planes (plane ``(ry, rx)`` holds padded
    pixels ``(sh i + ry, sw j + rx)``; one plane, the padded image itself, at stride 1), so tap
    ``(dy, dx)`` of output ``(yo, xo)`` reads plane ``(dy % sh, dx % sw)`` at ``(yo + dy //
    sh, xo + dx // sw)``: with output pixel ``(yo, xo)`` at index ``yo * wp + xo`` of a
    plane-width output, 16 consecutive indices are one strided tile load from index ``+ dy //
    sh * wp + dx // sw`` of the plane, and only the ``wp - wo`` columns past each output row
    are computed in vain (3x3/1 at 7x7: 7 of 9 rows of a tile are outputs, against 7 of 16;
    3x3/2 from 14x14: 7 of 8; 56x56: 56 of 58, against 56 of 64). One process, two runs, flat
    against row tiles, stride 1: 512x7x7 0.89-0.91x the time at batch 1, 0.71x at batch 16;
    64x56x56 and 128x28x28 0.93-1.03x.

    Example:
        >>> from types import SimpleNamespace as S
        >>> g = amx_geometry(S(in_shape=(64, 7, 7), kernel=(3, 3), stride=(1, 1),
        ...                    padding=(1, 1), out_hw=(7, 7), Np=64))
        >>> g.flat, g.tiles, g.wp, g.rows  # 7 rows of 9 = 63 indices: 2 tiles of 32
        (True, 2, 9, 16)
        >>> g = amx_geometry(S(in_shape=(64, 14, 14), kernel=(3, 3), stride=(2, 2),
        ...                    padding=(1, 1), out_hw=(7, 7), Np=64))
        >>> g.flat, g.tiles, g.wp, (g.qh, g.qw)  # 4 planes of 8 columns: 7 rows of 8
        (True, 2, 8, (2, 2))
    """
    c, h, w = spec.in_shape
    (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
    ho, wo = spec.out_hw
    kc, nblk = kh * kw * c // AMX_K, spec.Np // AMX_NB
    segs, pairs = -(-wo // AMX_ROWS), -(-ho // 2)
    wq = -(-(w + 2 * pw) // sw)  # columns of a phase plane
    # row chunks (``k_row``) read each kernel row's taps as one run of the padded row: strided
    # convs then need the padded image itself, not phase planes
    planes_ok = not getattr(spec, "k_row", 0) or (sh, sw) == (1, 1)
    if wq < segs * AMX_ROWS and planes_ok:
        tiles = -(-ho * wq // (2 * AMX_ROWS))
        last = tiles * 2 * AMX_ROWS + (kh - 1) // sh * wq + (kw - 1) // sw  # reads end here
        hq = max(-(-(h + 2 * ph) // sh), -(-last // wq))
        return AmxGeometry(kc, nblk, True, tiles, segs, pairs, hq, wq, AMX_ROWS, sh, sw)
    hp = max(h + 2 * ph, (2 * pairs - 1) * sh + kh)
    wp = max(w + 2 * pw, (segs * AMX_ROWS - 1) * sw + kw)
    return AmxGeometry(kc, nblk, False, pairs * segs, segs, pairs, hp, wp, min(AMX_ROWS, wo))


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


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), as uint16 bit patterns.

    Example:
        >>> bf16_bits(np.array([1.0, 1.00390625, -2.0], np.float32)).tolist()  # 1 + 2^-8: a tie
        [16256, 16256, 49152]
    """
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + (((b >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def bf16_value(bits: np.ndarray) -> np.ndarray:
    """float32 values of uint16 bf16 bit patterns."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_pieces(x: np.ndarray, max_pieces: int = 3) -> list[np.ndarray]:
    """The fewest bf16 values (uint16 bit patterns, largest first) that sum exactly to each
    float32 value of ``x``: each piece is the remainder rounded to bf16, and the remainder of
    a rounding to 8 significant bits is exact in float32, so any float32 value takes at most
    three (24 bits), an FP16 value (11 bits: FGQ's scales) at most two. Products of pieces
    with int8 codes (8 bits each) are exact in float32.

    Example:
        >>> [bf16_value(p).tolist() for p in bf16_pieces(np.array([1.0009765625], np.float32))]
        [[1.0], [0.0009765625]]
    """
    rest = np.asarray(x, dtype=np.float32)
    pieces: list[np.ndarray] = []
    for _ in range(max_pieces):
        if pieces and not rest.any():
            break
        bits = bf16_bits(rest)
        pieces.append(bits)
        rest = rest - bf16_value(bits)  # exact: the remainder of a rounding
    if rest.any():
        raise ValueError(f"values need more than {max_pieces} bf16 pieces")
    return pieces


def pack_bf16_tiles(weights: np.ndarray, channels: int, kernel: tuple[int, int], n_pad: int,
                    planes: int) -> np.ndarray:
    """float32 weights ``[N, kh * kw * C]`` (reduction order (kh, kw, C); FGQ's codes times
    their group scales) as the ``bf16_amx`` B tiles: ``[n_pad / 32, taps * C / 32, planes, 2,
    512]`` uint16, block-major (a 32-channel block's tiles for the whole reduction are one
    contiguous run, read in order), plane ``p`` holding each weight's ``p``-th bf16 piece
    (:func:`bf16_pieces`, zero where it needs fewer); element ``32 r + 2 j + q`` of tile ``t``
    of a block is output channel ``16 t + j``, reduction index ``2 r + q`` of the 32-channel
    chunk (the pair order ``tdpbf16ps`` reads).

    Example:
        >>> w = np.zeros((1, 32), np.float32)
        >>> w[0, 3] = 1.0009765625  # row 1, q 1 of channel 0: two pieces
        >>> t = pack_bf16_tiles(w, 32, (1, 1), 32, 2)
        >>> t.shape, bf16_value(t[0, 0, :, 0, 32 + 1]).tolist()
        ((1, 1, 2, 2, 512), [1.0, 0.0009765625])
    """
    n, k = weights.shape
    if channels % AMX_K_BF16 or k != kernel[0] * kernel[1] * channels or n_pad % AMX_NB \
            or n > n_pad:
        raise ValueError(f"bf16_amx tiles: C={channels} must be a multiple of {AMX_K_BF16}, "
                         f"K={k} = taps x C, n_pad={n_pad} a multiple of {AMX_NB} >= N={n}")
    w = np.zeros((n_pad, k), np.float32)  # padding channels hold zero weights
    w[:n] = weights
    pieces = bf16_pieces(w, planes)
    kc = k // AMX_K_BF16
    out = np.zeros((n_pad // AMX_NB, kc, planes, 2, 512), np.uint16)
    for p, bits in enumerate(pieces):  # [blk, t, j, kc, r, q] -> [blk, kc, t, r, j, q]
        t = bits.reshape(n_pad // AMX_NB, 2, AMX_N, kc, AMX_ROWS, 2)
        out[:, :, p] = t.transpose(0, 3, 1, 4, 2, 5).reshape(n_pad // AMX_NB, kc, 2, 512)
    return out


def amx_source(spec: GemmSpec) -> str:
    """TVMScript text of the ``t2_amx`` / ``tt_amx`` / ``bf16_amx`` kernel for ``spec`` (see
    the module docstring)."""
    if (spec.op != "conv2d" or spec.layout not in ("t2_amx", "tt_amx", "bf16_amx")
            or spec.G != 1):
        raise ValueError(f"t2_amx / tt_amx / bf16_amx are one-group conv2d layouts, got "
                         f"{spec.op} {spec.layout} G={spec.G}")
    bf = spec.layout == "bf16_amx"  # bf16 tiles (tdpbf16ps): 32 channels per 64-byte row
    ck, esz = (AMX_K_BF16, 2) if bf else (AMX_K, 1)  # channels per tile row, operand bytes
    planes, xdt = (spec.planes, "uint16") if bf else (1, "int8")
    ap = spec.a_planes if bf else 1  # bf16 pieces per input value (float32 inputs: 3)
    if ap > 1 and spec.act_dtype != "float32":
        raise ValueError(f"a_planes > 1 is for float32 inputs, got {spec.act_dtype}")
    # the piece products run: all weight planes on the codes, i + j <= 2 on float32 inputs
    pairs = [(i, j) for i in range(ap) for j in range(planes) if ap == 1 or i + j <= 2]
    c, h, w = spec.in_shape
    if (c % ck and not (bf and spec.k_row)) or spec.Np % AMX_NB:
        raise ValueError(f"{spec.layout} needs C % {ck} == 0 (bf16_amx: or row chunks) and Np "
                         f"% {AMX_NB} == 0, got C={c}, Np={spec.Np}")
    (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
    ho, wo = spec.out_hw
    geo = amx_geometry(spec)
    nblk, hp, wp = geo.nblk, geo.hp, geo.wp
    # row chunks (bf16_amx with C % 32 != 0, ``spec.k_row``): a kernel row's kw taps x C
    # channels are one run of the padded row, read as k_row / 32 tile rows (weights past kw * C
    # are zero, and what the run reads there is finite)
    row_mode = bf and spec.k_row > 0
    rc = spec.k_row // ck if row_mode else 0  # chunks per kernel row
    kc = kh * rc if row_mode else kh * kw * c // ck  # reduction chunks
    cc, mi, nt, bt = c // ck, ho * wo, spec.Np // AMX_N, spec.batch
    # Tile t: (pixel tile, 32-channel block). The block runs innermost (each A tile stays in
    # L1 for all blocks), image by image, unless the decoded weights outweigh twice the
    # padded image; then the pixels of the whole batch do (one process, batch 1, pixels inner
    # / block inner: 256x14x14 0.83x, 3x3/2 256 -> 512 0.74x, 512x7x7 0.93x the time), and each
    # task decodes its block's weights into a buffer that stays in L2 for all its pixels
    # (``wl``). Those figures predate one task per block: 64x56x56 and 128x28x28 took 1.39x /
    # 1.14x the time then, the block decoded by several tasks.
    # bf16_amx with one channel block: nothing to keep in L1 across blocks, and a tile loop
    # per image costs its tasks' set-up (one process, FGQ N=4 at batch 64, CIFAR's one-block
    # convs: 0.60-0.95x the time pixels inner; at batch 1 1.00-1.01x)
    # one image (int8 tiles): pixels inner too, each block decoded once by its task (one
    # process, batch 1: 64x56x56, 3x3/2 64 -> 128 and 128x28x28 0.82-0.92x the time)
    pixels_inner = (kc * ck * spec.Np * planes > 2 * geo.copy_pixels * c * ap
                    or (bf and nblk == 1) or (not bf and bt == 1))
    # pixels inner: the batch in chunks of ``ic`` images whose padded copies fit in half the
    # L2 (the blocks run over one chunk, then the next): a block's pass over the whole batch
    # streamed the copy from memory once per block (one process, batch 64, the ResNet-18 convs
    # that run pixels inner: 0.72-0.94x the time with 1 MB chunks, bf16_amx 0.83-0.99x; 512 KB
    # 0.85-0.97x, 128 KB 1.02-1.26x)
    ic = 1
    if pixels_inner:
        fit = max(1, AMX_CHUNK_BYTES // (geo.copy_pixels * c * esz * ap))
        ic = max(d for d in range(1, bt + 1) if bt % d == 0 and d <= fit)
    px = geo.tiles * (ic if pixels_inner else 1)  # tiles per channel block (and chunk)
    total = px * nblk * (bt // ic if pixels_inner else 1)
    # a task runs ``per`` consecutive tiles: one ``ldtilecfg`` each (one per tile: 64x56x56
    # took 1.43x the time)
    tasks = min(total, AMX_TASKS)
    per = -(-total // tasks)
    if pixels_inner and not bf:
        # one task per channel block (and batch chunk), so each decodes its block once: at
        # most 32 tasks split 256x14x14's 7 tiles per block at batch 1 over 4 tasks, each
        # decoding the block again (one process, batch 1, the ResNet-18 convs that run pixels
        # inner: 0.64-0.75x the time; batch 64 0.99-1.04x)
        per, tasks = px, total // px

    def intrin(name: str, *args: str) -> str:
        return f"T.evaluate(T.call_llvm_intrin('void', 'llvm.x86.{name}', {', '.join(args)}))"

    def i8(v: int) -> str:
        return f"T.int8({v})"

    def decode(dst: str, block: str, k: str = "k") -> str:  # 2-bit w + 1 -> int8 w
        return (f"{dst} = T.Cast('int8', T.bitwise_and(T.shift_right(Wp[{k}, {block}, i], "
                "T.Cast('uint8', 2 * s)), T.uint8(3))) - T.int8(1)")

    def load_x(src: str, piece: int = 0) -> str:
        """An activation as a tile operand: int8 codes as they are, as exact bf16 bits, or
        (float32 inputs) its ``piece``-th bf16 piece: the top 16 bits of what the pieces
        before it leave (truncation: each remainder is exact, and three cover 24 bits)."""
        if not bf:
            return src
        v = src if ap > 1 else f"T.Cast('float32', {src})"
        for _ in range(piece):  # the remainder below the previous piece
            v = (f"({v} - T.reinterpret('float32', T.bitwise_and(T.reinterpret('uint32', {v}), "
                 f"T.uint32(4294901760))))")
        return f"T.Cast('uint16', T.shift_right(T.reinterpret('uint32', {v}), T.uint32(16)))"

    extra, work, terms = _offset_terms(spec, h + 2 * ph, w + 2 * pw)
    xb = bt if pixels_inner else 1  # images held in the padded copy [image, pixel, C]
    qh, qw, plane = geo.qh, geo.qw, hp * wp
    # row chunks: a flat copy with a zeroed tail, for the last run's reads past the end
    slack = rc * ck if row_mode else 0
    piece_len = xb * geo.copy_pixels * c  # elements of one piece's copy (float32 inputs)

    def xp(u: str, pix: str, e: str, piece: str = "0") -> str:
        """Element e of pixel pix of image u in the copy (of the input's bf16 piece)."""
        if not row_mode:
            return f"Xp[{u}, {pix}, {e}]" if ap == 1 else f"Xp[({piece}) * {xb} + {u}, {pix}, {e}]"
        at_piece = "" if ap == 1 else f"({piece}) * {piece_len} + "
        return f"Xp[{at_piece}(({u}) * {geo.copy_pixels} + {pix}) * {c} + {e}]"

    def at(y: str, z: str) -> str:  # padded pixel (y, z) in the copy (flat: its phase plane)
        if (qh, qw) == (1, 1):
            return f"({y}) * {wp} + {z}"
        return (f"(({y}) % {qh} * {qw} + ({z}) % {qw}) * {plane} + ({y}) // {qh} * {wp} + "
                f"({z}) // {qw}")

    weights = (f" Wb: T.Buffer(({nblk}, {kc}, {planes}, 2, 512), 'uint16')," if bf else
               f" Wp: T.Buffer(({kc}, {nt}, 256), 'uint8'),")
    lines = [
        "@T.prim_func(s_tir=True)",
        f"def main(X: T.Buffer(({bt}, {h}, {w}, {c}), '{spec.act_dtype}'),{weights}"
        + "".join(f" {e}," for e in extra) +
        f" S: T.Buffer(({spec.Np},), 'float32'), bias: T.Buffer(({spec.Np},), 'float32'),"
        f" out: T.Buffer(({spec.M}, {spec.N}), '{spec.out_dtype}')):",
        "    T.func_attr({'global_symbol': 'main', 'tir.noalias': True})",
        "    with T.sblock('root'):",
        (f"        Xp = T.alloc_buffer(({ap * piece_len + slack},), '{xdt}')" if row_mode
         else f"        Xp = T.alloc_buffer(({ap * xb}, {geo.copy_pixels}, {c}), '{xdt}')"),
        *work,
    ]
    if not pixels_inner and not bf:  # the 2-bit weights decoded once per call into B tiles
        lines += [f"        Wd = T.alloc_buffer(({kc}, {nt}, 1024), 'int8')",
                  f"        for k in T.parallel({kc}):",
                  f"            for nb, s in T.grid({nt}, 4):",
                  "                for i in T.vectorized(256):",
                  "                    " + decode("Wd[k, nb, s * 256 + i]", "nb")]
    # the zero ring, once per call (Xp is a per-call workspace; the images only fill the
    # interior)
    lines += [f"        for i, u, y in T.grid({ap}, {xb}, {hp * qh}):",
              f"            for z in range({wp * qw}):",
              f"                if y < {ph} or y >= {h + ph} or z < {pw} or z >= {w + pw}:",
              f"                    for e in T.vectorized({c}):",
              f"                        {xp('u', at('y', 'z'), 'e', 'i')} = T.{xdt}(0)"]
    if slack:
        lines += [f"        for e in range({slack}):",
                  f"            Xp[{ap * piece_len} + e] = T.{xdt}(0)"]
    if spec.w_off:  # the codes' channel sums of the padded image: zero on the ring
        lines += [f"        for y, z in T.grid({h + 2 * ph}, {w + 2 * pw}):",
                  "            asum[y, z] = 0"]
    u = "b" if pixels_inner else "0"
    lines += [f"        for b in range({bt}):",
              f"            for y in T.parallel({h}):"]
    if row_mode:  # one plane: each image row is one run of the padded row, copied as one
        # vector loop instead of a C-lane vector per pixel
        lines += [f"                for e in T.vectorized({w * c}):"]
        lines += [f"                    {xp(u, at(f'y + {ph}', str(pw)), 'e', str(i))}"
                  f" = {load_x(f'X[b, y, e // {c}, e % {c}]', i)}" for i in range(ap)]
    else:
        lines += [f"                for z, q in T.grid({w}, {cc}):",
                  f"                    for e in T.vectorized({ck}):"]
        lines += [f"                        "
                  f"{xp(u, at(f'y + {ph}', f'z + {pw}'), f'q * {ck} + e', str(i))}"
                  f" = {load_x(f'X[b, y, z, q * {ck} + e]', i)}" for i in range(ap)]
    if spec.w_off:  # each pixel's sum of codes, then each output's window sum
        lines += [f"                for z in range({w}):",
                  f"                    asum[y + {ph}, z + {pw}] = {channel_sum(c)}",
                  f"            for yo in T.parallel({ho}):",
                  f"                for xo in range({wo}):",
                  f"                    wsum[b * {mi} + yo * {wo} + xo] = "
                  f"{window_sum(spec, 'yo', 'xo')}"]
    # pixels inner: every image copied first, then one tile loop; else a tile loop per image
    base = "        " if pixels_inner else "            "

    def tile_of(tv: str) -> tuple[str, str, str]:  # tile tv's block, image and pixel tile
        if pixels_inner:
            return (f"({tv}) // {px} % {nblk}", f"({tv}) // {px * nblk} * {ic} + ({tv}) // "
                    f"{geo.tiles} % {ic}", f"({tv}) % {geo.tiles}")
        return f"({tv}) % {nblk}", "b", f"({tv}) // {nblk}"

    nk, b, ti = tile_of("t")
    # Each tile's epilogue runs during the next tile's products, a few rows per chunk, from
    # the other half of ``acc``: the vector units convert and store while AMX multiplies
    # (one process, int8 and ternary activations, the ResNet-18 3x3 convs: 0.90-1.02x the
    # time at batch 64, median 0.97x; 0.84-1.02x at batch 1; bf16_amx at batch 1 0.95-1.03x).
    # The task's last tile's runs after its loop.
    # The pipelined order where a task runs many tiles of one block (batch > 1, pixels inner):
    # one process, batch 64, int8 and ternary activations, it took 0.90-0.98x the time of the
    # plain order (both with batch chunks) on the ResNet-18 convs from 256 channels, 1.01-1.02x
    # on 128 -> 256 at stride 2; image by image (block inner) 1.10-1.18x, at batch 1 0.98-1.13x
    pipelined = pixels_inner and bt > 1 and ap == 1
    # Batch 1 (int8 tiles, a task per block): a block of few tiles spent a large share of its
    # time decoding its B tiles before the first product. Decoded chunk by chunk inside the
    # first tile's loop, the decode overlaps the products (docs/measured/
    # ab-x86-emr-inline-decode.txt: one process, paired rounds, against decoding up front).
    inline_decode = (pixels_inner and not bf and bt == 1
                     and px <= AMX_INLINE_DECODE_TILES)
    n_slots = kc - 1 if pipelined else kc  # chunk-loop iterations
    epr = -(-2 * AMX_ROWS // max(n_slots, 1))  # epilogue rows per chunk
    lines += [
        f"{base}for p in T.parallel({tasks}):",
        f"{base}    with T.sblock('tile'):",
        f"{base}        T.reads()",
        f"{base}        T.writes()",
        f"{base}        cfg = T.alloc_buffer((64,), 'uint8')",
        f"{base}        acc = T.alloc_buffer(({2 * 2 * AMX_ROWS * AMX_NB},), "
        f"'{'float32' if bf else 'int32'}')",
        *([f"{base}        wl = T.alloc_buffer(({kc}, 2, 1024), 'int8')"]
          if pixels_inner and not bf else []),
        f"{base}        for i in range(64):",
        # palette 1; 8 tiles of 64-byte rows (colsb: uint16 at 16 + 2 i, rows at 48 + i): the
        # B tiles (6, 7) 16 rows, the A and accumulator tiles (0-5) one per pixel of a segment
        f"{base}            cfg[i] = T.if_then_else(i == 0, T.uint8(1), T.if_then_else("
        "i >= 16 and i < 32 and i % 2 == 0, T.uint8(64), T.if_then_else(i >= 48 and i < 54, "
        f"T.uint8({geo.rows}), T.if_then_else(i >= 54 and i < 56, T.uint8(16), T.uint8(0)))))",
        f"{base}        " + intrin("ldtilecfg", "T.address_of(cfg[0])"),
        f"{base}        for t in range(p * {per}, T.min(p * {per} + {per}, {total})):",
    ]
    ind = base + "            "
    first_tile = f"t == p * {per} or t % {px} == 0"  # a new block, or the task's first tile

    def decode_chunk(k: str) -> list[str]:  # chunk k's B tiles, in a block's first tile
        return [f"if {first_tile}:",
                "    for j, s in T.grid(2, 4):",
                "        for i in T.vectorized(256):",
                "            " + decode(f"wl[{k}, j, s * 256 + i]", f"({nk}) * 2 + j", k)]

    if pixels_inner and not bf and not inline_decode:  # decode the new block's tiles
        lines += [f"{ind}if {first_tile}:",
                  f"{ind}    for k, j, s in T.grid({kc}, 2, 4):",
                  f"{ind}        for i in T.vectorized(256):",
                  f"{ind}            " + decode("wl[k, j, s * 256 + i]", f"({nk}) * 2 + j")]
    lines += [ind + intrin("tilezero", i8(a)) for a in range(4)]

    def lets(k: str, sfx: str) -> list[str]:  # chunk k's tap (dy, dx) and channel chunk q
        if row_mode:  # tap (dy, 0) of the run, element q * 32 on
            return [f"dy{sfx} = {k} // {rc}", f"q{sfx} = {k} % {rc}", f"dx{sfx} = 0"]
        return [f"dy{sfx} = {k} // {kw * cc}", f"dx{sfx} = {k} // {cc} % {kw}",
                f"q{sfx} = {k} % {cc}"]

    def load_a(a: int, sfx: str, piece: int = 0) -> str:  # A tile a: 16 output pixels
        dy, dx, q = f"dy{sfx}", f"dx{sfx}", f"q{sfx}"
        if geo.flat:  # indices 32 ti + 16 a .. + 15 of the tap's plane, shifted by the tap
            pos = f"({ti}) * {2 * AMX_ROWS} + {a * AMX_ROWS} + {dy} // {qh} * {wp} + {dx} // {qw}"
            if (qh, qw) != (1, 1):
                pos = f"({dy} % {qh} * {qw} + {dx} % {qw}) * {plane} + {pos}"
        else:  # output row 2 py + a, pixels 16 sg .. 16 sg + 15
            py, sg = f"({ti}) // {geo.segs}", f"({ti}) % {geo.segs}"
            pos = f"((2 * ({py}) + {a}) * {sh} + {dy}) * {wp} + ({sg}) * {AMX_ROWS * sw} + {dx}"
        img = b if pixels_inner else "0"
        return intrin("tileloadd64", i8(4 + a),
                      f"T.address_of({xp(img, pos, f'{q} * {ck}', str(piece))})",
                      f"T.int64({(1 if geo.flat else sw) * c * esz})")

    def load_b(j: int, k: str, p: int) -> str:  # B tile j (channels 32 nk + 16 j ..), plane p
        if bf:
            src = f"Wb[{nk}, {k}, {p}, {j}, 0]"
        else:
            src = f"wl[{k}, {j}, 0]" if pixels_inner else f"Wd[{k}, ({nk}) * 2 + {j}, 0]"
        return intrin("tileloadd64", i8(6 + j), f"T.address_of({src})", f"T.int64({AMX_K})")

    def dp(a: int, j: int) -> str:
        return intrin("tdpbf16ps" if bf else "tdpbssd", i8(2 * a + j), i8(4 + a), i8(6 + j))

    slot = f"t % 2 * {2 * AMX_ROWS * AMX_NB}"  # this tile's half of acc
    full = spec.N % AMX_NB == 0

    def epilogue(tv: str, lo: str, hi: str) -> list[str]:
        """Rows ``lo .. hi - 1`` (of 2 x 16 pixels) of tile ``tv``'s ``acc * S + bias [+
        terms]``, from its half of ``acc``."""
        tnk, tb, tti = tile_of(tv)
        at0 = f"({tv}) % 2 * {2 * AMX_ROWS * AMX_NB}"
        if geo.flat:
            v = f"({tti}) * {2 * AMX_ROWS} + rr"
            yo, xo = f"({v}) // {wp}", f"({v}) % {wp}"
        else:
            yo = f"2 * (({tti}) // {geo.segs}) + rr // {AMX_ROWS}"
            xo = f"(({tti}) % {geo.segs}) * {AMX_ROWS} + rr % {AMX_ROWS}"
        out = [f"for rr in range({lo}, {hi}):", f"    if {yo} < {ho} and {xo} < {wo}:"]
        row = f"({tb}) * {mi} + ({yo}) * {wo} + {xo}"
        ch = f"({tnk}) * {AMX_NB}"
        if full:
            lanes = f"T.ramp({ch}, 1, {AMX_NB})"
            value = " + ".join([
                f"T.Cast('float32x{AMX_NB}', acc[T.ramp({at0} + rr * {AMX_NB}, 1, {AMX_NB})])"
                f" * S[{lanes}] + bias[{lanes}]",
                *(terms(row, yo, xo, lanes, AMX_NB) if terms else [])])
            if streams_output(spec):  # large outputs bypass the caches (lut.STREAM_MIN_BYTES)
                out += [f"        T.evaluate(T.call_extern('void', 'tb_stream_f32x{AMX_NB}', "
                        f"T.address_of(out[{row}, {ch}]), {value}))"]
            else:
                out += [f"        out[{row}, {lanes}] = {requantized(spec, value, AMX_NB)}"]
        else:  # a partial last block: channel by channel
            value = " + ".join([f"T.Cast('float32', acc[{at0} + rr * {AMX_NB} + n]) * "
                                f"S[{ch} + n] + bias[{ch} + n]",
                                *(terms(row, yo, xo, f"{ch} + n", 1) if terms else [])])
            out += [f"        for n in range({AMX_NB}):",
                    f"            if {ch} + n < {spec.N}:",
                    f"                out[{row}, {ch} + n] = {requantized(spec, value, 1)}"]
        return out

    def previous_rows(k: str) -> list[str]:  # chunk k's share of the previous tile's rows
        lo = f"({k}) * {epr}"
        return [f"if t > p * {per} and {lo} < {2 * AMX_ROWS}:",
                *("    " + x for x in epilogue("t - 1", lo, f"T.min({lo} + {epr}, "
                                                 f"{2 * AMX_ROWS})"))]

    def chunk(k: str, nxt: str | None) -> list[str]:
        """Chunk ``k``'s products (each plane of bf16 pieces on the same A tiles), each source
        tile reloaded for the next plane or chunk ``nxt`` right after its last use: AMX does
        not rename tile registers, so a load waits for the products that read its tile; loads
        issued after all four products of a step leave their latency exposed."""
        out = []
        for p in range(planes):
            last = p == planes - 1
            kb, pb = (nxt, 0) if last else (k, p + 1)  # the next B tiles' chunk and plane
            loads_a = last and nxt is not None
            out += [dp(0, 0), dp(0, 1)]
            out += [load_a(0, "n")] if loads_a else []
            out.append(dp(1, 0))
            out += [load_b(0, kb, pb)] if kb is not None else []
            out.append(dp(1, 1))
            out += [load_a(1, "n")] if loads_a else []
            out += [load_b(1, kb, pb)] if kb is not None else []
        return out

    # the first chunk's tiles, then chunks 0 .. kc - 2 loading chunk kk + 1's, then the last
    if not pipelined:  # loads, then products, chunk by chunk
        if row_mode:  # tap (dy, 0) of the run, element q * 32 on
            lines += [f"{ind}for dy, q in T.grid({kh}, {rc}):", f"{ind}    dx = 0"]
        else:
            lines += [f"{ind}for dy, dx, q in T.grid({kh}, {kw}, {cc}):"]
        tap = f"dy * {rc} + q" if row_mode else f"(dy * {kw} + dx) * {cc} + q"
        if inline_decode:
            lines += [ind + "    " + x for x in decode_chunk(tap)]
        for i, p in pairs:  # each input piece's A tiles once, then its weight planes
            if p == 0:  # the piece's first pair (pairs run i-major, j from 0)
                lines += [ind + "    " + x for x in (load_a(0, "", i), load_a(1, "", i))]
            lines += [ind + "    " + x for x in (load_b(0, tap, p), load_b(1, tap, p),
                                                dp(0, 0), dp(0, 1), dp(1, 0), dp(1, 1))]
        lines += [ind + "    " + x for x in previous_rows(tap)]
    else:
        lines += [ind + x for x in lets("0", "f")]
        lines += [ind + x for x in (load_a(0, "f"), load_a(1, "f"), load_b(0, "0", 0),
                                     load_b(1, "0", 0))]
        if kc > 1:
            lines += [f"{ind}for kk in range({kc - 1}):"]
            lines += [ind + "    " + x for x in lets("(kk + 1)", "n") + chunk("kk", "kk + 1")
                      + previous_rows("kk")]
        lines += [ind + x for x in chunk(str(kc - 1), None)]
        if kc == 1:  # no chunk loop: the previous tile's rows after this one's products
            lines += [ind + x for x in previous_rows("0")]
    # accumulators -> acc [2 x 16 pixels, 32 channels] (row stride 128 bytes)
    lines += [ind + intrin("tilestored64", i8(2 * a + j),
                           f"T.address_of(acc[{slot} + {a * AMX_ROWS * AMX_NB + j * AMX_N}])",
                           f"T.int64({AMX_NB * 4})")
              for a in range(2) for j in range(2)]
    last = f"T.min(p * {per} + {per}, {total}) - 1"  # the task's last tile, after its loop
    lines += [f"{base}        if p * {per} < {total}:",
              *(f"{base}            " + x for x in epilogue(last, "0", str(2 * AMX_ROWS)))]
    lines += [f"{base}        " + intrin("tilerelease")]
    return finish_source(spec, lines, AMX_NB) if full else "\n".join(lines)


#: ``terms(row, yo, xo, channels, width)``: TVMScript expressions added to an output vector
AmxTerms = Callable[[str, str, str, str, int], list[str]]


def _offset_terms(spec: GemmSpec, hp: int, wp: int
                  ) -> tuple[list[str], list[str], AmxTerms | None]:
    """RTN's offsets on ``tt_amx`` (:func:`.packing.tt_affine_terms`, as :mod:`.ttlut` adds
    them): the parameters ``[Bw], [Rc, Cc, Tb]``, the work buffers ``asum`` (each padded
    pixel's sum of codes, zero on the ring) and ``wsum`` (each output's window sum), and the
    epilogue's terms ``Bw[n] * wsum[row]`` and ``Tb[Rc[yo], Cc[xo], n]``."""
    if not (spec.w_off or spec.border):
        return [], [], None
    work = [f"        asum = T.alloc_buffer(({hp}, {wp}), 'int32')",
            f"        wsum = T.alloc_buffer(({spec.M},), 'int32')"] if spec.w_off else []

    def terms(row: str, yo: str, xo: str, ch: str, width: int) -> list[str]:
        out = []
        if spec.w_off:
            s = f"T.Cast('float32', wsum[{row}])"
            out.append(f"Bw[{ch}] * " + (f"T.broadcast({s}, {width})" if width > 1 else s))
        if spec.border:
            out.append(f"Tb[Rc[{yo}], Cc[{xo}], {ch}]")
        return out

    return offset_params(spec), work, terms


def amx_compute(spec: GemmSpec) -> Any:
    """The ``t2_amx`` / ``tt_amx`` / ``bf16_amx`` PrimFunc for ``spec`` (already scheduled: see
    the module docstring)."""
    tvm = _tvm.require_tvm()
    from tvm.script import tirx as T

    return tvm.script.from_source(amx_source(spec), extra_vars={"T": T}, s_tir=True)
