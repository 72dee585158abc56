"""The TE compute definitions: a :class:`.GemmSpec` as a PrimFunc (the grouped GEMM with its
input stage and epilogue, the ternary x ternary popcount GEMM), before any schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _tvm
from .amx import amx_compute
from .lut import lut_compute
from .packing import AVX2_ACT_OFFSET, TT_WORD, border_class_counts, scale_block
from .ttlut import ttlut_compute

if TYPE_CHECKING:
    from .spec import GemmSpec


# ----------------------------------------------------------------------------- TE compute


def _source_col(spec: GemmSpec, k: Any) -> tuple[Any, Any]:
    """(fan-in index read for A column ``k``, validity predicate or None).

    Columns past ``K`` are zeros; so are, for ``tt_planes`` with several groups, the columns
    that pad each group of ``gs`` to ``gsp`` bits.
    """
    tvm = _tvm.require_tvm()
    te, tirx = tvm.te, tvm.tirx
    k_, kp = spec.K, spec.Kp
    if spec.k_row:  # (kernel row, run of kw*C padded to k_row): see GemmSpec.k_row
        run = spec.kernel[1] * spec.in_shape[0]
        i, r = k // spec.k_row, k % spec.k_row
        return i * run + te.min(r, run - 1), r < run
    if spec.layout == "tt_planes" and spec.G > 1 and spec.gsp != spec.gs:
        g, kk = k // spec.gsp, k % spec.gsp
        src = g * spec.gs + kk
        return te.min(src, k_ - 1), tirx.all(kk < spec.gs, src < k_)
    if kp == k_:
        return k, None
    return te.min(k, k_ - 1), k < k_


#: a padded im2col row of at most this many columns is built in one stage with its columns
#: unrolled (constant indices), not as the im2col proper plus a padding copy
UNROLLED_IM2COL_MAX_K = 256


def unrolled_im2col(spec: GemmSpec) -> bool:
    """Whether a conv's padded im2col row (``Kp != K``, no ``k_row``) is short enough to build
    in one stage with every column unrolled: each column's source is then a constant offset
    from the output pixel's, and LLVM merges the runs of one kernel row into wide copies
    (FGQ N=4 on a 3-channel stem, 27 -> 32 columns: two root stages of byte copies with a
    sign extension per element took 0.61-0.62 of the kernel's time, perf on the Intel
    emeraldrapids). Wider rows keep the two stages (no div/mod per element)."""
    return (spec.op == "conv2d" and not spec.k_row and spec.Kp != spec.K
            and spec.Kp <= UNROLLED_IM2COL_MAX_K and spec.layout != "tt_planes")


def _im2col(spec: GemmSpec, x: Any, shift: Callable[[Any], Any] | None) -> Any:
    """``A_in [M, Kp]`` of a conv: a padded copy ``X_pad`` (bounds checks once per pixel,
    contiguous over C) when the conv pads, then a gather with affine indices only.

    ``shift`` (the AVX2 int8 -> uint8 offset) is applied in the first stage that copies data.
    """
    tvm = _tvm.require_tvm()
    te, tirx = tvm.te, tvm.tirx
    c, h, w = spec.in_shape
    ph, pw = spec.padding
    src = x
    if ph or pw:
        def pad(b: Any, y: Any, z: Any, ch: Any) -> Any:
            inb = tirx.all(y >= ph, y < h + ph, z >= pw, z < w + pw)
            v = tirx.if_then_else(
                inb, x[b, te.max(te.min(y - ph, h - 1), 0), te.max(te.min(z - pw, w - 1), 0), ch],
                tirx.const(0, x.dtype))
            return shift(v) if shift else v

        src = te.compute((spec.batch, h + 2 * ph, w + 2 * pw, c), pad, name="X_pad")

    if not spec.k_row and spec.Kp != spec.K and not unrolled_im2col(spec):
        # K padded (FGQ groups that do not divide the fan-in, e.g. N=64 on 144; a 3-channel
        # stem's 27 -> 32 or 64 bits): the im2col proper over [M, K] (a perfect (C, kh, kw)
        # split, no div/mod per element), then a copy that inserts the zero columns
        k_ = spec.K
        core_spec = dataclasses.replace(spec, Kp=k_, G=1, gs=k_)

        def core(m: Any, k: Any) -> Any:
            return _col(core_spec, src, x, shift, m, k)

        a_core = te.compute((spec.M, k_), core, name="A_core")

        def pad_cols(m: Any, k: Any) -> Any:
            kk, valid = _source_col(spec, k)
            return tirx.if_then_else(valid, a_core[m, kk], tirx.const(0, a_core.dtype))

        return te.compute((spec.M, spec.Kp), pad_cols, name="A_in")

    def col(m: Any, k: Any) -> Any:
        return _col(spec, src, x, shift, m, k)

    return te.compute((spec.M, spec.Kp), col, name="A_in")


def _col(spec: GemmSpec, src: Any, x: Any, shift: Callable[[Any], Any] | None, m: Any,
         k: Any) -> Any:
    """Element ``(m, k)`` of a conv's im2col matrix, read from ``src`` (X or X_pad)."""
    tvm = _tvm.require_tvm()
    tirx = tvm.tirx
    c = spec.in_shape[0]
    (kh, kw), (sh, sw) = spec.kernel, spec.stride
    ho, wo = spec.out_hw
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


def gemm_compute(spec: GemmSpec) -> Any:
    """PrimFunc ``main(X, *weights, S, bias, out)`` for ``spec`` (see module docstring).

    Block names the schedules rely on: ``A_in`` (input stage, absent for an unpadded linear
    that needs no shift), ``W_dec`` (AVX2 decode, or the ``t2_decoded`` decode to the
    accumulator type), ``acc`` (grouped GEMM), ``ep`` (scale epilogue, reduction over groups)
    and ``out`` (bias). ``tt_planes`` specs get :func:`tt_compute`.
    """
    if spec.layout == "tt_planes":
        return tt_compute(spec)
    if spec.layout == "t2_lut":  # hand-scheduled TIR (a data-dependent in-register lookup)
        return lut_compute(spec)
    if spec.layout in ("t2_amx", "tt_amx", "bf16_amx"):  # hand-scheduled TIR (AMX tiles)
        return amx_compute(spec)
    if spec.layout == "tt_lut":
        return ttlut_compute(spec)
    tvm = _tvm.require_tvm()
    te, tirx = tvm.te, tvm.tirx
    m_, kp, g_, gs, np_ = spec.M, spec.Kp, spec.G, spec.gs, spec.Np
    x = te.placeholder(spec.input_shape, spec.act_dtype, name="X")
    avx2 = spec.layout in ("t2_avx2", "i8_avx2")

    def shifted(v: Any) -> Any:
        # int8 a -> uint8 a + 128 for vpmaddubsw's unsigned operand (padding 0 -> 128 is
        # consistent with the weight-side correction, which counts every k of a group)
        return (v.astype("int16") + AVX2_ACT_OFFSET).astype("uint8")

    a = _input_stage(spec, x, shifted if avx2 else None)
    assert a.dtype == ("uint8" if avx2 else spec.act_dtype)

    # t2_avx2 takes S and Cw block-major ([Np/nb, G, nb]): the epilogue under the group loop
    # loads a tile's scales as one contiguous vector (an [Np, G] row per channel was a
    # G-strided gather per group: FGQ N=4 ran below torch FP32), and a channel block's groups
    # follow each other (group-major [G, Np] put them Np * 4 bytes apart: 2 KB at 512
    # channels, few cache sets, so FGQ N=4 on 512x7x7 re-read them from L3 every row tile)
    nbw = scale_block(spec)
    s = te.placeholder((np_ // nbw, g_, nbw) if avx2 else (np_, g_), "float32", name="S")
    bias = te.placeholder((np_,), "float32", name="bias")
    kk = te.reduce_axis((0, gs), "kk")
    acc_t = spec.acc_dtype
    if avx2:
        tn = spec.tile_n
        cw = te.placeholder((np_ // nbw, g_, nbw), "int32", name="Cw")
        if spec.layout == "i8_avx2":
            # dense int8 weights already in tiles [N/T, K/4, 4T]: W_dec is a copy of a task's
            # tiles (the same schedule places it), no decode
            wp = te.placeholder((np_ // tn, kp // 4, 4 * tn), "int8", name="Wp")
            wd = te.compute((np_ // tn, kp // 4, tn, 4),
                            lambda nb, kq, ni, ki: wp[nb, kq, ni * 4 + ki], name="W_dec")
        else:
            wp = te.placeholder((np_ // tn, kp // 16, 4 * tn), "uint8", name="Wp")
            # decoded signed codes laid out [N/T, K/4, T, 4]: each T n x 4k tile is 4T
            # contiguous bytes (a strided sub-region would silently tensorize wrong)
            wd = te.compute(
                (np_ // tn, kp // 4, tn, 4),
                lambda nb, kq, ni, ki: (
                    (wp[nb, kq // 4, ni * 4 + ki] >> ((kq % 4) * 2).astype("uint8"))
                    & tirx.const(3, "uint8")
                ).astype("int8") - tirx.const(1, "int8"),
                name="W_dec",
            )
        w_args = [wp, cw]
        q = gs // 4
        acc = te.compute(
            (m_, g_, np_),
            lambda m, g, n: te.sum(
                a[m, g * gs + kk].astype("int32")
                * wd[n // tn, g * q + kk // 4, n % tn, kk % 4].astype("int32"),
                axis=kk),
            name="acc")

        def term(m: Any, g: Any, n: Any) -> Any:
            blk, j = n // nbw, n % nbw
            return s[blk, g, j] * (acc[m, g, n] - cw[blk, g, j]).astype("float32")
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


def _mask_pixels(spec: GemmSpec, x: Any, sub: bool) -> Any:
    """``X_bits`` of a :attr:`~.spec.GemmSpec.mask_words` pixel conv: each word one call of
    the helper (:func:`mask_word_ir`) on a pixel's 64 channels (C % 64 == 0) or its C (8, 16,
    32), float32 inputs compared with the threshold (:attr:`~.spec.GemmSpec.float_in`); the
    padding ring zero words; parallel over (image, row). ``sub``: a strided 1x1 conv's
    pixels only, indexed by output position."""
    tvm = _tvm.require_tvm()
    tirx = tvm.tirx
    c, h, w_ = spec.in_shape
    (sh, sw), (ph, pw) = spec.stride, spec.padding
    rows, cols = spec.out_hw if sub else (h + 2 * ph, w_ + 2 * pw)
    cw = max(c // TT_WORD, 1)

    def at(buf: Any, by: Any, z: Any, q: Any) -> tuple[Any, Any, list[Any]]:
        b, y = by // rows, by % rows
        if sub:
            return tirx.BufferLoad(buf, [b, y * sh, z * sw, q * TT_WORD]), None, [b, y, z, q]
        inside = tirx.all(y >= ph, y < h + ph, z >= pw, z < w_ + pw)
        start = tirx.BufferLoad(buf, [b, y - ph, z - pw, q * TT_WORD])
        return start, inside, [b, y, z, q]

    threshold = spec.threshold if spec.float_in else None
    return _mask_extern((spec.batch, rows, cols, cw), x, spec.mask_lanes, threshold,
                        [("by", spec.batch * rows), ("z", cols), ("q", cw)], at, "X_bits")


def _pixel_planes(spec: GemmSpec, x: Any, word: Callable[..., Any], j: Any) -> Any:
    """``A_bits [M, KW, 2]`` of a :attr:`GemmSpec.pixel_bits` conv: ``X_bits`` packs each
    (padded) input pixel once; ``A_bits`` gathers words.

    * ``C % 64 == 0``: ``X_bits [B, Hp, Wp, C/64, 2]``; word ``w`` of row ``m`` is tap
      ``(i, j) = divmod(w // (C/64), kw)`` and channel word ``w % (C/64)``.
    * ``64 % C == 0`` (CIFAR-size layers, 8-32 channels): ``X_bits [B, Hp, Wp, 1, 2]`` holds the
      C bits of a pixel; in (kh, kw, C) order a word is ``T = 64 / C`` consecutive taps, so
      word ``w`` is ``sum_t X_bits[tap w*T + t] << (t*C)`` (disjoint bits: the sum is an OR;
      taps past kh*kw are the zero padding of ``Kp``). An explicit sum, not a reduction block,
      so ``A_bits`` stays a plain gather that a GPU schedule can inline. A stem whose whole
      kernel fits one word (kh*kw*C <= 64, e.g. 3x3x3) is the same gather with one word.
    * :attr:`GemmSpec.row_words` (16 or 32 channels): ``X_rows [B, Hp, Wo, R, 2]`` ORs the
      ``T`` taps of one kernel row into a word once per (image row, output column), the words
      of each kernel row padded on their own (``Kp = kh * R * 64``, the weights likewise), so
      ``A_bits`` word ``w`` is a single load, ``X_rows[.., y + w // R, x, w % R]``: no OR of
      taps from different image rows per output row.
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

    # a strided 1x1 conv (ResNet shortcuts) reads one pixel in sh*sw: pack only those
    sub = (kh, kw) == (1, 1) and (ph, pw) == (0, 0) and (sh, sw) != (1, 1)
    if spec.mask_words:
        xb = _mask_pixels(spec, x, sub)
        if sub:
            sh = sw = 1
    elif sub:
        def xbits_sub(b: Any, y: Any, z: Any, q: Any, s: Any) -> Any:
            return word(x[b, y * sh, z * sw, jc if small else q * TT_WORD + j], s, jc)

        xb = te.compute((spec.batch, ho, wo, cw, 2), xbits_sub, name="X_bits")
        sh = sw = 1  # xb is indexed by output position
    else:
        xb = te.compute((spec.batch, h + 2 * ph, w_ + 2 * pw, cw, 2), xbits, name="X_bits")
    if spec.row_words:
        # X_rows[b, y, ox, r]: taps r*T .. r*T+T-1 of the kernel row starting at padded image
        # row y, output column ox (T = 64 / C whole pixels, the taps past kw zero); each is
        # built once per (image row, output column) and read by kh output rows, and a word of
        # A_bits is one load of it
        per, rw = TT_WORD // c, spec.row_chunks

        def xrow(b: Any, y: Any, ox: Any, r: Any, s: Any) -> Any:
            v = None
            for t in range(min(per, kw)):
                j = r * per + t
                part = tirx.if_then_else(
                    j < kw, xb[b, y, ox * sw + te.min(j, kw - 1), 0, s],
                    tirx.const(0, "uint64")) << tirx.const(t * c, "uint64")
                v = part if v is None else v | part
            return v

        xr = te.compute((spec.batch, h + 2 * ph, wo, rw, 2), xrow, name="X_rows")

        def row_word(m: Any, w: Any, s: Any) -> Any:
            b, r = m // (ho * wo), m % (ho * wo)
            return xr[b, (r // wo) * sh + w // rw, r % wo, w % rw, s]

        return te.compute((spec.M, spec.words, 2), row_word, name="A_bits")

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


#: lanes a :attr:`~.spec.GemmSpec.mask_words` helper compares at once: a pixel's channels
#: (8, 16 or 32 of CIFAR-size convs) or one whole 64-bit word
MASK_LANES = (8, 16, 32, 64)


def mask_word_ir(lanes: int, floats: bool) -> str:
    """LLVM IR of the :attr:`~.spec.GemmSpec.mask_words` helpers ``tb_mask{lanes}[f]_nz`` and
    ``..._neg``: ``lanes`` int8 codes at a pointer compared with zero (``!= 0`` / ``< 0``), or
    (``floats``) float32 values with a threshold ``t`` (``|x| > t`` / ``x < -t``, as the
    fake-quant graph compares), the ``<lanes x i1>`` result read as one integer (zero-extended
    to i64). LLVM lowers it to a compare into a mask register and a ``kmov`` (AVX-512BW) or
    ``vpcmpeqb`` / ``vpmovmskb`` pairs (AVX2). ``linkonce_odr``: every kernel of a module may
    import it (``pragma_import_llvm``).

    Example:
        >>> print(mask_word_ir(64, False).splitlines()[0])
        define linkonce_odr i64 @tb_mask64_nz(ptr %p) alwaysinline {
    """
    if lanes not in MASK_LANES:
        raise ValueError(f"mask words: lanes must be one of {MASK_LANES}, got {lanes}")
    vt, it = (f"<{lanes} x float>", "f") if floats else (f"<{lanes} x i8>", "")
    args = "ptr %p, float %t" if floats else "ptr %p"
    out = []
    for name in ("nz", "neg"):
        lines = [f"define linkonce_odr i64 @tb_mask{lanes}{it}_{name}({args}) alwaysinline {{",
                 "entry:", f"  %v = load {vt}, ptr %p, align 1"]
        if not floats:
            cmp = "ne" if name == "nz" else "slt"
            lines.append(f"  %c = icmp {cmp} {vt} %v, zeroinitializer")
        else:
            lines += [f"  %i = insertelement {vt} poison, float %t, i64 0",
                      f"  %s = shufflevector {vt} %i, {vt} poison, <{lanes} x i32> "
                      "zeroinitializer"]
            if name == "nz":
                lines += [f"  %a = call {vt} @llvm.fabs.v{lanes}f32({vt} %v)",
                          f"  %c = fcmp ogt {vt} %a, %s"]
            else:
                lines += [f"  %n = fneg {vt} %s", f"  %c = fcmp olt {vt} %v, %n"]
        lines += [f"  %m = bitcast <{lanes} x i1> %c to i{lanes}"]
        if lanes < 64:
            lines += [f"  %z = zext i{lanes} %m to i64", "  ret i64 %z"]
        else:
            lines += ["  ret i64 %m"]
        out += [*lines, "}"]
    if floats:
        out.append(f"declare <{lanes} x float> @llvm.fabs.v{lanes}f32(<{lanes} x float>)")
    return "\n".join(out) + "\n"


def _mask_extern(shape: tuple[int, ...], src: Any, lanes: int, threshold: float | None,
                 loops: list[tuple[str, int]], word_at: Callable[..., Any], name: str) -> Any:
    """An extern stage ``name`` of ``shape + (2,)`` uint64 words (mask, sign) packed from
    ``src``: the loops ``(var name, extent)`` nest in order (the first parallel when longer
    than 1), and at each point ``word_at(buffer, *vars)`` gives the element where the word's
    ``lanes`` codes start, a condition for them to be read (None: always; else the word is
    zero) and the word's index in the output."""
    tvm = _tvm.require_tvm()
    tirx = tvm.tirx
    floats = threshold is not None

    def body(ins: Any, outs: Any) -> Any:
        inp, dst = ins[0], outs[0]
        vs = [tirx.Var(n, "int32") for n, _ in loops]
        start, inside, index = word_at(inp, *vs)
        suffix = "f" if floats else ""

        def words(zero: bool) -> Any:
            stores = []
            for s, kind in enumerate(("nz", "neg")):
                if zero:
                    v = tirx.const(0, "uint64")
                else:
                    args = [tirx.address_of(start)]
                    if floats:
                        args.append(tirx.const(threshold, "float32"))
                    v = tirx.call_extern("uint64", f"tb_mask{lanes}{suffix}_{kind}", *args)
                stores.append(tirx.BufferStore(dst, v, [*index, tirx.const(s, "int32")]))
            return tirx.SeqStmt(stores)

        stmt = words(False)
        if inside is not None:
            stmt = tirx.IfThenElse(inside, stmt, words(True))
        for i in reversed(range(len(loops))):
            kind = tirx.ForKind.PARALLEL if i == 0 and loops[0][1] > 1 else tirx.ForKind.SERIAL
            stmt = tirx.For(vs[i], 0, loops[i][1], kind, stmt)
        return tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm",
                             tvm.ir.StringImm(mask_word_ir(lanes, floats)), stmt)

    # the input as a plain buffer (te.extern's own has offset_factor=1: a symbolic offset on
    # the kernel's parameter when ``src`` is the input itself)
    inp = tirx.decl_buffer(src.shape, src.dtype, name=src.op.name)
    return tvm.te.extern((*shape, 2), [src], body, name=name, dtype="uint64", in_buffers=[inp])


def mask_planes(spec: GemmSpec, a: Any) -> Any:
    """``A_bits [M, KW, 2]`` of a :attr:`~.spec.GemmSpec.mask_words` spec without
    :attr:`~.spec.GemmSpec.pixel_bits` from the int8 codes ``a [M, Kp]`` (the input or its
    ``A_in`` stage): word ``(m, w)`` is one call of the helper (:func:`mask_word_ir`) on
    ``a[m, 64 w : 64 w + 64]``, parallel over rows. The 64-step reduction it replaces
    (``sum_j bit_j << j``) compiled to ~95 vector instructions per pair of words on znver4."""
    tvm = _tvm.require_tvm()

    def at(buf: Any, m: Any, w: Any) -> tuple[Any, None, list[Any]]:
        return tvm.tirx.BufferLoad(buf, [m, w * TT_WORD]), None, [m, w]

    return _mask_extern((spec.M, spec.words), a, TT_WORD, None,
                        [("m", spec.M), ("w", spec.words)], at, "A_bits")


def tt_compute(spec: GemmSpec) -> Any:
    """PrimFunc ``main(X, Wm, Ws, [Bw], [Rc, Cc, Tb], S, bias, out)`` of a ``tt_planes`` spec.

    ``X`` holds ternary activation codes (int8, NHWC or [B, F]). Blocks::

        A_in  [M, Kp]     im2col / group padding (zeros = no bit), as for the other layouts
        A_bits[M, KW, 2]  uint64 mask (s=0: a != 0) and sign (s=1: a < 0) planes
        acc   [M, G, Np]  sum_q popc(am & wm) - 2 popc(am & wm & (as ^ ws))   (int32, exact)
        ep    [M, Np]     sum_g S[n, g] * acc                                   (S = α scales)
        asum  [M]         sum_k a = sum_q popc(am) - 2 popc(am & as)            (w_off only)
        out   [M, N]      ep + bias [+ Bw[n] * asum] [+ Tb[Rc[y], Cc[x], n]: the offset
                          term of the taps inside the image, by border class (border only)]

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
        planes = mask_planes(spec, a) if spec.mask_words else te.compute(
            (m_, kw_, 2), lambda m, w, s: word(a[m, w * TT_WORD + j], s), name="A_bits")
    wm = te.placeholder((np_ // nb, kw_, nb), "uint64", name="Wm")
    ws = te.placeholder((np_ // nb, kw_, nb), "uint64", name="Ws")

    # int64 accumulators where the target's vector popcount yields 64-bit lanes (x86
    # VPOPCNTQ): no narrowing per word; int32 elsewhere (CUDA's __popcll returns an int)
    acc_t = "int64" if spec.tt_acc64 else "int32"

    def popc(v: Any) -> Any:
        return tirx.popcount(v).astype(acc_t)

    q = te.reduce_axis((0, q_per_g), "q")

    def masks(m: Any, g: Any, n: Any) -> tuple[Any, Any]:
        w = g * q_per_g + q
        nz = planes[m, w, 0] & wm[n // nb, w, n % nb]
        return nz, nz & (planes[m, w, 1] ^ ws[n // nb, w, n % nb])

    def dot(m: Any, g: Any, n: Any) -> Any:
        nz, neg = masks(m, g, n)
        return te.sum(popc(nz) - (popc(neg) << 1), axis=q)

    def dot_split(m: Any, g: Any, n: Any, t: Any) -> Any:
        # t is an unrolled constant in the schedule: the select folds, the masks are shared
        nz, neg = masks(m, g, n)
        return te.sum(popc(tirx.Select(t == 0, nz, neg)), axis=q)

    s = te.placeholder((np_, g_), "float32", name="S")
    bias = te.placeholder((np_,), "float32", name="bias")
    gr = te.reduce_axis((0, g_), "g")
    if spec.tt_split:
        pair = te.compute((m_, g_, np_, 2), dot_split, name="acc")
        # sum popc(nz) - 2 sum popc(neg) as a reduction over the pair (weights 1, -2), not two
        # constant-index reads: compute_at cannot place a consumer of those under acc's loops
        tr = te.reduce_axis((0, 2), "t")
        acc = te.compute((m_, g_, np_), lambda m, g, n: te.sum(
            pair[m, g, n, tr] * (1 - 3 * tr).astype(acc_t), axis=tr), name="acc_pair")
    else:
        acc = te.compute((m_, g_, np_), dot, name="acc")
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
        ho, wo = spec.out_hw
        r_, c_ = border_class_counts(spec)
        rcls = te.placeholder((ho,), "int32", name="Rc")
        ccls = te.placeholder((wo,), "int32", name="Cc")
        tb = te.placeholder((r_, c_, np_), "float32", name="Tb")

        def corr(m: Any, n: Any) -> Any:
            # the in-image taps' sum of this output's border class (one load, no reduction
            # block: `out` keeps ep as its single producer and stays fused under the row tile)
            r = m % (ho * wo)
            return tb[rcls[r // wo], ccls[r % wo], n]

        extra_args += [rcls, ccls, tb]
        terms.append(corr)

    def out_f(m: Any, n: Any) -> Any:
        v = ep[m, n] + bias[n]
        for term in terms:
            v = v + term(m, n)
        return v

    out = te.compute((m_, spec.N), out_f, name="out")
    return te.create_prim_func([x, wm, ws, *extra_args, s, bias, out])
