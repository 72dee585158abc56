"""The ``tt_lut`` layout: a ternary x ternary conv as byte-table lookups (AVX512-VBMI ``vpermi2b``).

Four ternary activations of one pixel have 81 codes ``a = sum_i 3^i (x_i + 1)``, four ternary
weights of one tap 81 indices ``e`` (:func:`.packing.pack_lut_idx` with ``group=4``). The table
``TT[a, e] = sum_i (digit_i(a) - 1) (digit_i(e) - 1)`` therefore depends on the activations' code
only: the kernel builds the whole 81 x 128 int8 table once per call (10 KB, stays in L1) and
each input pixel keeps just its codes. One ``vpermi2b`` reads 64 output channels' partial sums
from the code's 128-byte row held in two registers (256 MACs; the ``tt_vpermi2b`` peak, 872
GMAC/s on znver4, against the popcount step's 576); a ``vpaddb`` accumulates them.

Exactness: ``|TT| <= 4``; every entry holds its sum plus :data:`TT_LUT_BIAS` (4), so runs of at
most :data:`TT_LUT_RUN` (31) lookups add up in unsigned bytes (<= 248), then widen to int16
without sign extension (:func:`.lut.row_tile_kernel`); the whole sum is at most the fan-in, so
the gate keeps ``K < 32768``.

Register tile: ``mb`` neighbouring pixels of one output row x ``nv`` 64-channel vectors (default
7 x 2). Two zmm loads per table row are the bottleneck when every (pixel, tap) loads its own
row (two loads per ``nv`` lookups), and in a row tile pixel ``r`` under tap ``d`` reads input
column ``r * stride + d``: per (kernel row, channel quad) the kernel holds the indices of all
``kw`` taps in registers and loads each of the ``(mb - 1) * stride + kw`` columns' rows once
(9 rows instead of 21 for 7 pixels of a 3x3/1 conv). A run therefore covers whole kernel rows:
``tpc`` rows x ``kw`` taps x ``cgc`` quads (:func:`ttlut_geometry_of`). Measured on the ResNet-18
3x3 convs, batch 1: 552-691 GMAC/s, against 437-630 (>= 128 channels) with 4-pixel tiles that
loaded a row per (pixel, tap) and 320-443 for per-pixel tables copied out of ``TT`` (their reads
came from L2/L3; loading the row through the code keeps every table read in L1).

The codes of a pixel's 64 channels come from one ``vpmaddubsw`` (bytes times (1, 3, 9, 27), in
pairs) and one ``vpmaddwd`` (pairs of pairs); built one scalar code at a time they took a fifth
of a 64x56x56 conv. With 16-64 input channels (one vector per pixel) the kernel still beats the
popcount kernel on 3x3 convs with >= 32 outputs (16 outputs fill a quarter of its byte lanes and
lose). 1x1 convs share no rows; with the biased widening and byte codes it wins on those with >=
64 inputs too (ResNet-18's downsamples), not on CIFAR's 16-32.

RTN's offsets (``x = alpha a + beta_a`` on the image, ``w = s c + beta_w``) are the popcount
kernel's affine terms (:func:`.packing.tt_affine_terms`, spec flags ``w_off`` / ``border``),
added in the row tile's epilogue: ``Bw[n]`` times the window's sum of activation codes (each
pixel's channel sum is kept beside its codes, the padding ring's is zero) and ``Tb[Rc[yo],
Cc[xo], n]``, the activation offset times the in-image taps' weights by border class (folded
into the bias when the conv does not pad). In one process, batch 1, on the ResNet-18 3x3 convs
they cost up to 12% over the same kernel without offsets and leave it 1.19-1.42x faster than
the popcount kernel with them (``docs/kernels.md``).

Like :mod:`.lut`, the kernel is TVMScript text generated per spec (one unrolled register tile)
with the signature ``main(X, Wi, [Bw], [Rc, Cc, Tb], S, bias, out)``: ``X`` int8 NHWC
activation codes, ``Wi [taps, CGp, Np]`` int8 indices, ``S``/``bias [Np]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import _tvm
from .lut import (
    ConvFrame,
    LutGeometry,
    conv_frame,
    finish_source,
    kernel_head,
    lut_geometry_of,
    padding_ring,
    row_tile_kernel,
)
from .packing import border_class_counts

if TYPE_CHECKING:
    from .lut import EpilogueTerms
    from .spec import GemmSpec

#: LLVM's name of ``vpermi2b zmm`` (AVX512-VBMI): ``(table lo, index, table hi) -> bytes``
VPERMI2B = "llvm.x86.avx512.vpermi2var.qi.512"
#: ternary weights (and activations) per index / code: 3^4 = 81 <= 128 table bytes
TT_LUT_GROUP = 4
#: lookups that may add up in a byte: 31 * 4 = 124 <= 127 (biased: 31 * 8 = 248 <= 255)
TT_LUT_RUN = 31
#: added to every table entry (``|TT| <= 4``): entries are 0..8, and a run of 31 adds up to
#: 248 <= 255 as unsigned bytes (:func:`.lut.row_tile_kernel`)
TT_LUT_BIAS = 4
#: the code (and index) of four zeros: padding pixels, channels and output channels
TT_LUT_ZERO = 40
#: output channels per lookup (int8 lanes of a zmm)
TT_LUT_LANES = 64
#: LLVM's names of ``vpmaddubsw zmm`` (u8 x s8 pair sums) and ``vpmaddwd zmm`` (AVX-512BW)
PMADDUBSW = "llvm.x86.avx512.pmaddubs.w.512"
PMADDWD = "llvm.x86.avx512.pmaddw.d.512"
#: LLVM's horizontal add of a vector (here int32x16)
VREDUCE_ADD = "llvm.vector.reduce.add"
#: the bytes (1, 3, 9, 27) of one int32: a quad's digit weights, little-endian
_POW3_BYTES = 1 + (3 << 8) + (9 << 16) + (27 << 24)


def ttlut_geometry_of(channels: int, kernel: tuple[int, int]) -> LutGeometry:
    """The chunking of a ``tt_lut`` conv with ``channels`` inputs and a ``kernel = (kh, kw)``:
    quads of 4 channels, runs of at most :data:`TT_LUT_RUN` lookups per accumulator
    (:func:`.lut.lut_geometry_of`).

    Example:
        >>> ttlut_geometry_of(256, (3, 3))  # 8 chunks of 8 quads, 24 lookups per run
        LutGeometry(cg=64, cgp=64, nc=8, cgc=8, tpc=1, nt=3)
    """
    return lut_geometry_of(channels, kernel, TT_LUT_GROUP, TT_LUT_RUN)


def ttlut_geometry(spec: GemmSpec) -> LutGeometry:
    return ttlut_geometry_of(spec.in_shape[0], (spec.kernel[0], spec.kernel[1]))


def _digit(v: str, i: int) -> str:
    return f"({v} // {3 ** i} % 3 - 1)"


def ttlut_source(spec: GemmSpec) -> str:
    """TVMScript text of the ``tt_lut`` kernel for ``spec`` (see the module docstring)."""
    f = conv_frame(spec, "tt_lut", TT_LUT_LANES)
    geo = ttlut_geometry(spec)
    c, h, ph, pw = f.c, f.h, f.ph, f.pw
    v = f"T.ramp(0, 1, {TT_LUT_LANES})"
    code = " + ".join(
        f"{3 ** i} * T.if_then_else(g * 4 + {i} < {c}, "
        f"T.Cast('int32', X[b, y, z, T.min(g * 4 + {i}, {c - 1})]) + 1, 1)" for i in range(4))
    # the codes buffer is wide enough for a partial last tile's pixels past the row (their
    # codes are zeros; they are computed and not stored). Codes are bytes: as int32 the buffer
    # was 4x larger than the int8 input (with the biased widening, batch 64, in one process:
    # 0.93-0.98x the time on the ResNet-18 64- and 128-channel 3x3 convs; batch 1: within the
    # noise between processes, 0.89-1.05x)
    extra, work, terms = _offset_terms(spec, f)
    lines = kernel_head(spec, f, geo.cgp, "int8", extra) + [
        "        TT = T.alloc_buffer((81, 128), 'int8')",
        f"        codes = T.alloc_buffer(({f.hp}, {f.wt}, {geo.cgp}), 'uint8')", *work,
        "        for a in range(81):",  # bytes 81..127 are never looked up: zeros
        "            for e in T.vectorized(128):",
        "                TT[a, e] = T.Cast('int8', T.if_then_else(e < 81, "
        + " + ".join(f"{_digit('a', i)} * {_digit('e', i)}" for i in range(4))
        + f" + {TT_LUT_BIAS}, 0))",
        f"        for b in range({spec.batch}):",
        # the padding ring and padding quads: all zeros (decided per pixel, not per quad)
        f"            for y in T.parallel({f.hp}):",
        f"                for z in range({f.wt}):",
        f"                    if {padding_ring(f)}:",
        f"                        for g in T.vectorized({geo.cgp}):",
        f"                            codes[y, z, g] = T.uint8({TT_LUT_ZERO})",
    ]
    if spec.w_off:  # the padding ring adds nothing to a window's sum of activations
        lines += ["                        asum[y, z] = 0"]
    if geo.cgp > geo.cg:
        lines += ["                    else:",
                  f"                        for g in range({geo.cg}, {geo.cgp}):",
                  f"                            codes[y, z, g] = T.uint8({TT_LUT_ZERO})"]
    # the codes, 16 quads (64 channels) per vpmaddubsw + vpmaddwd: the bytes of a quad times
    # (1, 3, 9, 27), summed in pairs and then pairs of pairs, plus 40 (the +1 per digit);
    # a last partial 64-channel group: scalar, so no byte of the next pixel is read
    full = c // 64
    lines += [f"            for y in T.parallel({h}):",
              f"                for z in range({f.w}):"]
    if full:
        xv = "X.vload([b, y, z, q * 64], 'int8x64')"
        lines += [f"                    for q in range({full}):",
                  f"                        codes[y + {ph}, z + {pw}, T.ramp(q * 16, 1, 16)] = "
                  f"T.Cast('uint8x16', "
                  f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{PMADDWD}'), "
                  f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{PMADDUBSW}'), "
                  f"T.reinterpret(T.broadcast(T.int32({_POW3_BYTES}), 16), dtype='int8x64'), "
                  f"{xv}, dtype='int16x32'), T.broadcast(T.int16(1), 32), dtype='int32x16')"
                  f" + T.broadcast(T.int32({TT_LUT_ZERO}), 16))"]
    if full * 16 < geo.cg:
        lines += [f"                    for g in range({full * 16}, {geo.cg}):",
                  f"                        codes[y + {ph}, z + {pw}, g] = "
                  f"T.Cast('uint8', {code})"]
    if spec.w_off:  # each pixel's sum of activation codes (a window's: in the epilogue)
        lines += [f"                    asum[y + {ph}, z + {pw}] = {channel_sum(c)}"]

    # register tile: mb pixels of one output row x nv * 64 channels; an input column's table
    # row (two zmm, loaded through its code) serves every (pixel, tap) that reads it
    def column(y: str, x: str, g: str) -> list[str]:
        row, ind = f"T.Cast('int32', codes[{y}, {x}, {g}])", " " * 36
        return [f"{ind}ta[{v}] = TT[{row}, T.ramp(0, 1, 64)]",
                f"{ind}tb[{v}] = TT[{row}, T.ramp(64, 1, 64)]"]

    def lookup(index: str) -> str:
        return (f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{VPERMI2B}'), ta[{v}], "
                f"{index}, tb[{v}], dtype='int8x64')")

    def indices(d: int, tap: str, g: str) -> list[str]:  # 64 int8 indices per vector
        return [f"                                    iv_{d}_{j}[{v}] = Wi[{tap}, {g},"
                f" T.ramp(nk * {spec.nb} + {TT_LUT_LANES * j}, 1, {TT_LUT_LANES})]"
                for j in range(f.nv)]

    lines += row_tile_kernel(spec, f, geo, wide=("a16", "int16"), narrow=("a8", "int8"),
                             idx_dtype="int8", regs=["ta", "tb"], column=column, lookup=lookup,
                             indices=indices, terms=terms, bias=TT_LUT_BIAS)
    return finish_source(spec, lines, TT_LUT_LANES)


def channel_sum(n: int) -> str:
    """TVMScript: the sum of pixel ``(b, y, z)``'s ``n`` activation codes, 16 channels per
    vector and one horizontal add (added one code at a time, a 32-channel 14x14 conv with
    offsets took 1.75x the time: 38.7 against 22.1 µs in one process)."""
    vec = [f"T.Cast('int32x16', X[b, y, z, T.ramp({16 * q}, 1, 16)])" for q in range(n // 16)]
    terms = [f"T.Cast('int32', X[b, y, z, {k}])" for k in range(n // 16 * 16, n)]
    if vec:
        terms.insert(0, f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("
                        f"'{VREDUCE_ADD}'), {' + '.join(vec)}, dtype='int32')")
    return " + ".join(terms)


def _offset_terms(spec: GemmSpec, f: ConvFrame
                  ) -> tuple[list[str], list[str], EpilogueTerms | None]:
    """RTN's offsets (:func:`.packing.tt_affine_terms`, as :func:`.compute.tt_compute` adds
    them): the extra parameters ``[Bw], [Rc, Cc, Tb]``, the work buffer of per-pixel sums of
    activation codes (``w_off``) and the epilogue's terms ``Bw[n] * sum of the window's codes``
    and ``Tb[Rc[yo], Cc[xo], n]`` (the activation offset times the in-image taps' weights)."""
    if not (spec.w_off or spec.border):
        return [], [], None
    work = [f"        asum = T.alloc_buffer(({f.hp}, {f.wt}), 'int32')"] if spec.w_off else []

    def terms(yo: str, xo: str, ch: str, width: int) -> list[str]:
        out = []
        if spec.w_off:
            out.append(f"Bw[{ch}] * T.broadcast(T.Cast('float32', {window_sum(spec, yo, xo)}),"
                       f" {width})")
        if spec.border:
            out.append(f"Tb[Rc[{yo}], Cc[{xo}], {ch}]")
        return out

    return offset_params(spec), work, terms


def offset_params(spec: GemmSpec) -> list[str]:
    """The TVMScript parameters of RTN's offset terms, ``[Bw], [Rc, Cc, Tb]`` (as
    :func:`.packing.pack_weight_args` passes them), for ``spec.w_off`` / ``spec.border``."""
    params = [f"Bw: T.Buffer(({spec.Np},), 'float32')"] if spec.w_off else []
    if spec.border:
        (ho, wo), (r_, c_) = spec.out_hw, border_class_counts(spec)
        params += [f"Rc: T.Buffer(({ho},), 'int32')", f"Cc: T.Buffer(({wo},), 'int32')",
                   f"Tb: T.Buffer(({r_}, {c_}, {spec.Np}), 'float32')"]
    return params


def window_sum(spec: GemmSpec, yo: str, xo: str) -> str:
    """TVMScript: output ``(yo, xo)``'s window sum of ``asum`` (each padded pixel's sum of
    activation codes, zero on the padding ring): padded pixel ``(yo * sh + i, xo * sw + j)``
    under tap ``(i, j)``."""
    (kh, kw), (sh, sw) = spec.kernel, spec.stride
    return " + ".join(f"asum[({yo}) * {sh} + {i}, ({xo}) * {sw} + {j}]"
                      for i in range(kh) for j in range(kw))


def ttlut_compute(spec: GemmSpec) -> Any:
    """The ``tt_lut`` PrimFunc for ``spec`` (already scheduled: see the module docstring)."""
    tvm = _tvm.require_tvm()
    from tvm.script import tirx as T

    return tvm.script.from_source(ttlut_source(spec), extra_vars={"T": T}, s_tir=True)
