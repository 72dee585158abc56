"""The ``t2_lut`` layout: an int8-activation ternary conv as table lookups (AVX-512BW ``vpermw``).

T-MAC / bitnet.cpp TL style, exact: three ternary weights of one kernel tap and three input
channels form one index ``e = (w0 + 1) + 3 (w1 + 1) + 9 (w2 + 1)`` (27 values), and each input
pixel gets, per channel triple, a 32-entry int16 table ``T[e] = sum_j (digit_j(e) - 1) * x_j``.
One ``vpermw`` then looks up 32 output channels' partial sums at once (96 MACs); a plain
``vpaddw`` accumulates them. ``vpdpbusd`` does 64 MACs per instruction (instruction peaks on
znver4, ``bench/kernels/peaks.py``: ``lut_vpermw`` ~345 GMAC/s, ``int8_vpdpbusd`` 235). A table
costs two ``vpdpbusd`` and a ``vpackssdw`` (see :func:`lut_source`).

Why per input pixel: a 3x3 conv reads every input pixel under 9 taps, so tables built on the
input (``tab [Hp, Wp, CGp, 32]``, the padding ring all zeros) are reused 9 times and by every
output channel; an im2col-row table would be built 9 times. Strided convs reuse them less
(stride 2 reads each table ~2.25 times), 1x1 convs not at all.

Register tile (shared with :mod:`.ttlut`, :func:`row_tile_kernel`): ``mb`` neighbouring pixels
of one output row x ``nv`` 32-channel vectors (default 7 x 2: 14 accumulators). Pixel ``r``
under tap ``d`` reads input column ``r * stride + d``, so per (kernel row, channel triple) the
indices of all ``kw`` taps stay in registers and each of the ``(mb - 1) * stride + kw``
columns' tables is loaded once for every (pixel, tap) that reads it: 9 loads for 21 pairs of a
3x3/1 conv, against one per (pixel, tap) with the earlier 4-pixel x 128-channel tiles (in one
process, batch 1: the ResNet-18 3x3/1 convs 1-11% faster, the 7x7/2 stem 14% at batch 64).

Exactness: ``|T[e]| <= 3 * 128``; every entry holds its sum plus :data:`LUT_BIAS` (384), so at
most 85 lookups may add up in unsigned int16 (<= 65280) before they are widened to int32
without sign extension (:func:`row_tile_kernel`); the reduction runs in chunks of whole kernel
rows of at most 85 lookups (rows grouped when a row has few triples, triples split when it has
many: :func:`lut_geometry_of`).

Dot-product channels (:attr:`.spec.GemmSpec.lut_dp`, chosen by ``x86.lut_dp_applies``): on
znver4 ``vpermw`` and ``vpdpbusd`` issue on different pipes, so a loop that does both runs faster
than either alone (operands in registers: 6 lookups + 6 ``vpdpbusd`` 326-344 GMAC/s, the
lookups alone 275-284, ``vpdpbusd`` alone 231-236). Each chunk of 128 (or 64) input channels
then sends 20 (8) triples to the tables and the other 68 (40) channels, in quads, to ``vpdpbusd``
on int8 weights (``Wv``, the inputs + 128 copied once per pixel into ``xu``, ``Cv = -128 sum(w)``
cancelling the 128); each group step of the row tile looks up one triple and multiplies one quad
(:class:`DotSteps`). Tiles are 7 pixels x 32 channels (7 int16 + 14 int32 accumulators) and the
indices int16 (no widening shuffle beside the lookups). Against the plain lookups in one process:
the ResNet-18 3x3 convs with 64-256 inputs 0.80-0.95x the time at batch 1, 0.83-0.93x at batch
64 (``docs/measured/ab-x86-znver4-lut-dp.txt``).

The kernel is written as TVMScript text (one unrolled register tile, a Python-generated body):
TE cannot express a data-dependent in-register lookup, and tensorize cannot match one. It
keeps the common signature ``main(X, Wi, S, bias, out)``: ``X`` int8 NHWC, ``Wi [taps, CGp,
Np]`` byte indices (:func:`.packing.pack_lut_idx`; with an even number of vectors per tile the
channels ``k`` and ``32 + k`` of each 64-channel block share an int16 word: ``vpermw`` reads the
low byte's index, and after a shift right by 8 the high byte's), ``S [Np]``, ``bias [Np]``,
``out [M, N]``. Byte indices take 2.67 bits per weight; int16 ones took 5.3, and against them
(one process, batch 1) the 512x7x7 conv ran 8% and the 3x3/2 256 -> 512 one 6.5% faster (their
indices no longer fill L2), the narrower convs 0-2% slower (the shift), and the whole ResNet-18
with TWN's weights and 8-bit activations 3-5% faster (11.12 ms; 10.58 and 10.78 ms after).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import _tvm

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .spec import GemmSpec

    #: ``terms(yo, xo, channels, width) -> expressions`` of :func:`_tile_stores`
    EpilogueTerms = Callable[[str, str, str, int], list[str]]

#: LLVM's name of ``vpermw zmm`` (AVX512-BW): ``(table, index) -> table[index]`` per 16-bit lane
VPERMW = "llvm.x86.avx512.permvar.hi.512"
#: lanes of one table / one lookup (int16 in a zmm)
LUT_LANES = 32
#: weights per index (3^3 = 27 <= 32 table entries)
LUT_GROUP = 3
#: lookups that may add up in int16: 85 * 384 = 32640 <= 32767 (biased: 85 * 768 <= 65535)
LUT_INT16_RUN = 85
#: added to every table entry (``|T[e]| <= 3 * 128``): entries are 0..768, and a run of 85
#: adds up to 65280 <= 65535 as unsigned int16 (:func:`row_tile_kernel`)
LUT_BIAS = 3 * 128
#: ``t2_lut``'s row tiles skip the padding triples of a padded fan-in (:func:`row_tile_kernel`;
#: the 128- and 256-channel 3x3 convs have 1 and 2 in 44 and 88): 0.974-0.988x
#: the time on the ResNet-18 convs with them, batch 1 and 64, in one process
#: (``docs/measured/ab-x86-znver4-lut-skip-padding.txt``; ``tt_lut``'s 512-channel conv, 2 quads
#: in 130, took 1.01-1.02x there, so its kernel keeps them)
LUT_SKIP_PADDING = True
#: the weight index of three zero weights (padding channels and groups)
LUT_ZERO_INDEX = 13


@dataclass(frozen=True)
class LutGeometry:
    """How a table-lookup spec splits its reduction.

    ``cg`` channel groups per tap (the last may be partial), padded to ``cgp = nc * cgc``;
    the reduction runs over ``nt`` chunks of ``tpc`` kernel rows x all ``kw`` taps of a row x
    ``cgc`` groups, each at most ``run`` lookups long (:func:`lut_geometry_of`).

    Example:
        >>> lut_geometry_of(64, (3, 3))
        LutGeometry(cg=22, cgp=22, nc=1, cgc=22, tpc=1, nt=3)
        >>> lut_geometry_of(512, (3, 3))  # 9 chunks of 19 triples, 57 lookups per run
        LutGeometry(cg=171, cgp=171, nc=9, cgc=19, tpc=1, nt=3)
    """

    cg: int
    cgp: int
    nc: int
    cgc: int
    tpc: int
    nt: int


def lut_geometry_of(channels: int, kernel: tuple[int, int], group: int = LUT_GROUP,
                    run: int = LUT_INT16_RUN) -> LutGeometry:
    """The chunking of a conv with ``channels`` inputs and a ``kernel = (kh, kw)``: groups of
    ``group`` channels (the last may be partial), padded to ``cgp = nc * cgc``. A chunk covers
    whole kernel rows (a row tile holds every tap's indices of a row in registers): ``tpc`` rows
    x ``kw`` taps x ``cgc`` groups, so that each accumulator adds at most ``run`` lookups
    (``tpc * kw * cgc <= run``; ``t2_lut``: triples, 85; ``tt_lut``: quads, 31). Groups split
    into the chunks that pad least (a widening costs about two lookups per accumulator)."""
    kh, kw = kernel
    if not 1 <= kw <= run:
        raise ValueError(f"table lookups: kernel width {kw} must be 1..{run}")
    cg = -(-channels // group)
    per_row = run // kw  # groups per kernel row that one run can take
    if cg <= per_row:
        tpc = max(d for d in range(1, kh + 1) if kh % d == 0 and d * cg <= per_row)
        return LutGeometry(cg=cg, cgp=cg, nc=1, cgc=cg, tpc=tpc, nt=kh // tpc)
    nc = min(range(-(-cg // per_row), cg + 1), key=lambda n: (kw * n * -(-cg // n) + 2 * n, n))
    cgc = -(-cg // nc)
    return LutGeometry(cg=cg, cgp=nc * cgc, nc=nc, cgc=cgc, tpc=1, nt=kh)


def lut_geometry(spec: GemmSpec) -> LutGeometry:
    if spec.lut_dp:
        dp = lut_dp_geometry_of(spec.in_shape[0], (spec.kernel[0], spec.kernel[1]))
        if dp is None:
            raise ValueError(f"t2_lut with dot-product channels: {spec.in_shape[0]} inputs and "
                             f"kernel {spec.kernel} have no split (lut_dp_geometry_of)")
        return dp.lookups(spec.kernel[0])
    return lut_geometry_of(spec.in_shape[0], (spec.kernel[0], spec.kernel[1]))


#: ``t2_lut`` with dot-product channels (:attr:`.spec.GemmSpec.lut_dp`): per chunk of input
#: channels (the key), how many triples are looked up and how many quads go to ``vpdpbusd``.
#: On znver4 ``vpermw`` and ``vpdpbusd`` issue on different pipes: in one loop (1 thread,
#: operands in registers, ``docs/measured/ab-x86-znver4-lut-dp.txt``) 6 lookups + 6
#: ``vpdpbusd`` ran at 326-344 GMAC/s against 275-284 for lookups alone and 231-236 for
#: ``vpdpbusd`` alone. The splits are the fastest of those tried on the ResNet-18 3x3 convs
#: (20 triples + 17 quads: 60 channels looked up, 68 multiplied; 64-channel chunks 8 + 10).
LUT_DP_SPLITS: dict[int, tuple[int, int]] = {128: (20, 17), 64: (8, 10)}


@dataclass(frozen=True)
class DpGeometry:
    """How a ``t2_lut`` conv with dot-product channels splits its inputs: ``nc`` chunks of
    ``chunk`` channels, each ``cgc`` triples (channels ``3k .. 3k + 2`` of the chunk, table
    lookups) then ``qc`` quads (the next ``4 qc`` channels, ``vpdpbusd``).

    Example:
        >>> g = lut_dp_geometry_of(256, (3, 3))
        >>> g
        DpGeometry(chunk=128, cgc=20, qc=17, nc=2)
        >>> g.triple_channel("g"), g.quad_channel("q")
        ('g // 20 * 128 + g % 20 * 3', 'q // 17 * 128 + 60 + q % 17 * 4')
        >>> g.lookups(3)
        LutGeometry(cg=40, cgp=40, nc=2, cgc=20, tpc=1, nt=3)
        >>> lut_dp_geometry_of(96, (3, 3)) is None  # neither 128 nor 64 divides it
        True
    """

    chunk: int
    cgc: int
    qc: int
    nc: int

    def triple_channel(self, g: str) -> str:
        """TVMScript: the first input channel of triple ``g``."""
        return f"{g} // {self.cgc} * {self.chunk} + {g} % {self.cgc} * {LUT_GROUP}"

    def quad_channel(self, q: str) -> str:
        """TVMScript: the first input channel of quad ``q``."""
        return (f"{q} // {self.qc} * {self.chunk} + {LUT_GROUP * self.cgc} + {q} % {self.qc} "
                "* 4")

    def lookups(self, kh: int) -> LutGeometry:
        """The chunking of the lookups: one chunk per kernel row and channel chunk."""
        t = self.nc * self.cgc
        return LutGeometry(cg=t, cgp=t, nc=self.nc, cgc=self.cgc, tpc=1, nt=kh)


def lut_dp_geometry_of(channels: int, kernel: tuple[int, int]) -> DpGeometry | None:
    """The split of ``channels`` inputs (:data:`LUT_DP_SPLITS`), or None where no chunk size
    divides them or a kernel row's lookups would overrun an int16 run."""
    for chunk, (cgc, qc) in LUT_DP_SPLITS.items():
        if channels % chunk == 0 and kernel[1] * cgc <= LUT_INT16_RUN:
            return DpGeometry(chunk=chunk, cgc=cgc, qc=qc, nc=channels // chunk)
    return None


#: LLVM names of ``vpdpbusd zmm`` (u8 x s8, 4 per dword, accumulate) and ``vpackssdw zmm``
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
PACKSSDW = "llvm.x86.avx512.packssdw.512"
#: 0x80808080 as int32: XOR-ing it adds 128 to each int8 (the unsigned operand of vpdpbusd)
_XOR_128 = -0x7F7F7F80


def _digits(e: str) -> tuple[str, str, str]:
    """TVMScript for the three index digits ``w_j + 1`` of table entry ``e`` (entries 27..31
    are never looked up, whatever they hold)."""
    return f"{e} % 3", f"{e} // 3 % 3", f"{e} // 9"


def _digit_of(half: str, dword: str, k: str) -> str:
    """TVMScript for digit ``k`` (0..2; 3: the zero weight of the 4th byte) of the table entry
    that dword ``dword`` of half ``half`` builds (entry ``8 (dword // 4) + 4 half + dword % 4``:
    see the packssdw note in :func:`lut_source`)."""
    d0, d1, d2 = _digits(f"(8 * ({dword} // 4) + 4 * ({half}) + {dword} % 4)")
    return (f"T.if_then_else({k} == 0, {d0}, T.if_then_else({k} == 1, {d1}, "
            f"T.if_then_else({k} == 2, {d2}, 1)))")


@dataclass(frozen=True)
class ConvFrame:
    """What a table-lookup kernel generator needs of its conv spec: sizes of the input, its
    padding and the padded table rows, and the output map ``mi = ho * wo`` in row tiles: ``mb``
    neighbouring pixels of one output row (``per_row`` tiles per row, the last may be partial;
    ``tiles`` per image) x ``nv`` vectors of ``lanes`` channels. ``wt`` is the width of the
    padded per-pixel buffer (tables or codes): wide enough for a partial tile's extra pixels,
    which read zeros and are not stored."""

    c: int
    h: int
    w: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    wo: int
    mi: int
    mb: int
    nv: int
    lanes: int
    per_row: int
    tiles: int
    hp: int
    wt: int
    taps: int


def conv_frame(spec: GemmSpec, layout: str, lanes: int) -> ConvFrame:
    """The :class:`ConvFrame` of a one-group conv ``spec`` in ``layout``, checked."""
    if spec.op != "conv2d" or spec.layout != layout or spec.G != 1:
        raise ValueError(f"{layout} is a one-group conv2d layout, got {spec.op} {spec.layout} "
                         f"G={spec.G}")
    if spec.nb % lanes or spec.Np % spec.nb:
        raise ValueError(f"{layout} tiles: nb={spec.nb} must be a multiple of {lanes} "
                         f"dividing Np={spec.Np}")
    c, h, w = spec.in_shape
    (sh, sw), (ph, pw), (kh, kw) = spec.stride, spec.padding, spec.kernel
    ho, wo = spec.out_hw
    per_row = -(-wo // spec.mb)
    return ConvFrame(c=c, h=h, w=w, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, wo=wo, mi=ho * wo,
                     mb=spec.mb, nv=spec.nb // lanes, lanes=lanes, per_row=per_row,
                     tiles=ho * per_row, hp=h + 2 * ph,
                     wt=max(w + 2 * pw, (per_row * spec.mb - 1) * sw + kw), taps=kh * kw)


def kernel_head(spec: GemmSpec, f: ConvFrame, cgp: int, w_dtype: str,
                extra: Sequence[str] = ()) -> list[str]:
    """The PrimFunc's signature ``main(X, Wi, [extra], S, bias, out)`` and its root block
    (``extra``: TVMScript parameters, e.g. ``tt_lut``'s offset terms)."""
    more = "".join(f" {e}," for e in extra)
    return [
        "@T.prim_func(s_tir=True)",
        f"def main(X: T.Buffer(({spec.batch}, {f.h}, {f.w}, {f.c}), 'int8'),"
        f" Wi: T.Buffer(({f.taps}, {cgp}, {spec.Np}), '{w_dtype}'),{more}"
        f" S: T.Buffer(({spec.Np},), 'float32'), bias: T.Buffer(({spec.Np},), 'float32'),"
        f" out: T.Buffer(({spec.M}, {spec.N}), '{spec.out_dtype}')):",
        "    T.func_attr({'global_symbol': 'main', 'tir.noalias': True})",
        "    with T.sblock('root'):",
    ]


def padding_ring(f: ConvFrame) -> str:
    """TVMScript condition: padded pixel ``(y, z)`` lies outside the input (it reads zeros)."""
    return f"y < {f.ph} or y >= {f.h + f.ph} or z < {f.pw} or z >= {f.w + f.pw}"


@dataclass(frozen=True)
class DotSteps:
    """``vpdpbusd`` work that a row tile interleaves with its lookups (:func:`row_tile_kernel`):
    ``quads`` per chunk; ``lines(quad, tap_row, row, col0)`` gives one quad's TVMScript
    (indent 36); ``allocs`` its register buffers; ``corr`` an int32 per-channel buffer added
    to every output."""

    quads: int
    lines: Callable[[str, str, str, str], list[str]]
    allocs: tuple[str, ...]
    corr: str


def row_tile_kernel(spec: GemmSpec, f: ConvFrame, geo: LutGeometry, *,
                    wide: tuple[str, str], narrow: tuple[str, str], idx_dtype: str,
                    regs: list[str], column: Callable[[str, str, str], list[str]],
                    lookup: Callable[[str], str],
                    indices: Callable[[int, str, str], list[str]], bias: int,
                    terms: EpilogueTerms | None = None,
                    skip_padding: bool = False, dots: DotSteps | None = None) -> list[str]:
    """The parallel loop over the row tiles of one image (under ``for b``), down to the stores.

    Per output-channel block ``nk`` and chunk ``(tc, cc)``: ``narrow`` accumulators (name,
    dtype: int8 or int16) per tile pixel ``r`` and vector ``j`` add up one run of lookups and
    are then widened into ``wide`` ones (twice the bits). Per step ``(i, k)`` (a kernel row and
    a channel group) the indices of all ``kw`` taps of the row stay in registers, and each input
    column ``q`` the tile reads is loaded once and looked up for every (pixel ``r``, tap ``d``)
    with ``r * sw + d == q``: ``column(row, col, group)`` gives the lines that load its
    ``regs`` (TVMScript, indent 36), ``lookup(index)`` the looked-up vector;
    ``indices(d, tap, group)`` the lines that load tap ``d``'s index vectors ``iv_{d}_{j}``
    from ``Wi[tap, group, ...]`` (block ``nk``).

    Widening without sign extension: every table entry holds its sum plus ``bias`` (>= 0,
    at most twice the bias), so a run's sums are unsigned and fit the narrow type (the run
    lengths keep them below 2^bits). Lanes ``2m`` and ``2m + 1`` of a vector hold channels
    ``m`` and ``lanes / 2 + m`` (:func:`.packing.pack_lut_idx` interleaves the indices so);
    read as wide lanes they are ``lo + 2^bits hi``, so per run two wide sums ``se += v`` and
    ``so += v >> bits`` (logical) take three instructions instead of five (an extract, two
    sign extensions and two adds), and the tile's sums come out once per block: ``hi = so``,
    ``lo = se - (so << bits)``, each less ``bias`` times the lookups per output, all in
    wrapping unsigned arithmetic (the true sums fit the signed wide type). In one process
    against sign extension (batch 1): ``t2_lut`` 0.98-1.00x the time on the ResNet-18 3x3
    convs, ``tt_lut`` 0.97-0.99x; at batch 16 ``tt_lut`` 0.93x / 0.97x on the 64-channel convs.

    The small "global" buffers stay stack allocas that LLVM keeps in registers ("local" ones
    become heap workspaces in TVM 0.27). ``terms`` adds to each stored output (see
    :func:`_tile_stores`). ``skip_padding``: the last chunk's loop stops at the last real group
    (a run-time trip count) instead of looking up the padding groups' biased zeros.

    ``dots``: ``vpdpbusd`` work on other input channels, interleaved with the lookups (one
    quad per group step while both last, so the out-of-order core issues both recipes at once):
    per chunk ``dots.quads`` quads, ``dots.lines(quad, tap_row, row, col0)`` the lines of one
    (indent 36); their int32 sums ``va_{r}_{j}_{p}`` (16 channels: half ``p`` of vector ``j``)
    and ``dots.corr`` (an int32 buffer per channel) join the widened sums once per block."""
    n, v = f.lanes, f"T.ramp(0, 1, {f.lanes})"
    mb, nv, kw = f.mb, f.nv, f.kw
    tile = [(r, j) for r in range(mb) for j in range(nv)]
    (wn, wt), (nn, nt) = wide, narrow
    h, bits = n // 2, int(nt.removeprefix("int"))
    hv, ut = f"T.ramp(0, 1, {h})", f"uint{2 * bits}"
    idx = [f"iv_{d}_{j}" for d in range(kw) for j in range(nv)]
    lines = [f"            for t in T.parallel({f.tiles}):",
             "                with T.sblock('tile'):",
             "                    T.reads()",
             "                    T.writes()"]
    lines += [f"                    {wn}_{r}_{j} = T.alloc_buffer(({n},), '{wt}')" for r, j in tile]
    lines += [f"                    {nn}_{r}_{j} = T.alloc_buffer(({n},), '{nt}')" for r, j in tile]
    lines += [f"                    {x}_{r}_{j} = T.alloc_buffer(({h},), '{ut}')"
              for r, j in tile for x in ("se", "so")]
    lines += [f"                    {x} = T.alloc_buffer(({n},), '{idx_dtype}')"
              for x in idx + regs]
    dot_acc = [f"va_{r}_{j}_{p}" for r, j in tile for p in (0, 1)] if dots else []
    lines += [f"                    {x} = T.alloc_buffer(({h},), 'int32')" for x in dot_acc]
    lines += [f"                    {x}" for x in (dots.allocs if dots else [])]
    if spec.N % spec.nb:  # a partial last block's vector, stored through it (_tile_stores)
        lines += [f"                    ot = T.alloc_buffer(({n},), '{spec.out_dtype}')"]
    lines += [f"                    for nk in range({spec.Np // spec.nb}):"]
    lines += [f"                        {x}_{r}_{j}[{hv}] = T.broadcast(T.{ut}(0), {h})"
              for r, j in tile for x in ("se", "so")]
    lines += [f"                        {x}[{hv}] = T.broadcast(T.int32(0), {h})" for x in dot_acc]
    lines += [f"                        for tc, cc in T.grid({geo.nt}, {geo.nc}):"]
    lines += [f"                            {nn}_{r}_{j}[{v}] = T.broadcast(T.{nt}(0), {n})"
              for r, j in tile]
    # the padding groups (cgp > cg: fewer than nc, all in the last chunk) add a biased zero
    # each; ``skip_padding``: the last chunk stops at the last real group instead
    skip = skip_padding and geo.cgp > geo.cg
    steps = f"T.min({geo.cgc}, {geo.cg} - cc * {geo.cgc})" if skip else str(geo.cgc)
    dy, grp = f"(tc * {geo.tpc} + i)", f"cc * {geo.cgc} + k"
    y0, x0 = f"t // {f.per_row} * {f.sh} + {dy}", f"t % {f.per_row} * {mb * f.sw}"

    def lookups() -> list[str]:  # one group step: its indices, then every column's lookups
        out = []
        for d in range(kw):
            out += indices(d, f"{dy} * {kw} + {d}", grp)
        for q in range((mb - 1) * f.sw + kw):
            pairs = [(r, q - r * f.sw) for r in range(mb) if 0 <= q - r * f.sw < kw]
            if not pairs:
                continue
            out += column(y0, f"{x0} + {q}", grp)
            out += [f"{ind}{nn}_{r}_{j}[{v}] = {nn}_{r}_{j}[{v}] + {lookup(f'iv_{d}_{j}[{v}]')}"
                    for r, d in pairs for j in range(nv)]
        return out

    ind = "                                    "
    lines += [f"                            for i in range({geo.tpc}):"]
    if dots is None:
        lines += [f"                                for k in range({steps}):", *lookups()]
    else:  # a quad beside each group while both last, then the rest of either
        both, quad = min(geo.cgc, dots.quads), f"cc * {dots.quads} + k"
        dot = dots.lines(quad, dy, y0, x0)
        lines += [f"                                for k in range({both}):", *lookups(), *dot]
        if geo.cgc > both:
            lines += [f"                                for k in range({both}, {geo.cgc}):",
                      *lookups()]
        if dots.quads > both:
            lines += [f"                                for k in range({both}, {dots.quads}):",
                      *dot]
    shift = f"T.broadcast(T.{ut}({bits}), {h})"
    for r, j in tile:  # (narrow sums wrap past 2^(bits-1): LLVM adds below 32 bits wrap)
        u = f"T.reinterpret({nn}_{r}_{j}[{v}], dtype='{ut}x{h}')"
        lines += [f"                            se_{r}_{j}[{hv}] = se_{r}_{j}[{hv}] + {u}",
                  f"                            so_{r}_{j}[{hv}] = so_{r}_{j}[{hv}]"
                  f" + T.shift_right({u}, {shift})"]
    # every output adds taps x (cg or cgp) lookups, each biased
    looked = geo.cg if skip else geo.cgp
    corr = f"T.broadcast(T.{ut}({bias * f.taps * looked % (1 << 2 * bits)}), {h})"
    for r, j in tile:
        lines += [f"                        {wn}_{r}_{j}[T.ramp(0, 1, {h})] = T.reinterpret("
                  f"se_{r}_{j}[{hv}] - T.shift_left(so_{r}_{j}[{hv}], {shift}) - {corr}, "
                  f"dtype='{wt}x{h}')",
                  f"                        {wn}_{r}_{j}[T.ramp({h}, 1, {h})] = T.reinterpret("
                  f"so_{r}_{j}[{hv}] - {corr}, dtype='{wt}x{h}')"]
        if dots:  # half p: channels (block nk, vector j) + h p .. + h
            lines[-2:] = [f"{x} + va_{r}_{j}_{p}[{hv}] + {dots.corr}[T.ramp(nk * {spec.nb}"
                          f" + {n * j + h * p}, 1, {h})]" for p, x in enumerate(lines[-2:])]
    return lines + _tile_stores(spec, f, wn, terms)


#: fp32 outputs of at least this many bytes are written with non-temporal stores: past the
#: caches they would only be read for ownership and evict the tables. In one process (interleaved
#: rounds, same buffers, ResNet-18 3x3 convs) the stores alone made ``tt_lut`` take 0.84-0.96x
#: the time at batch 64 and 0.76x / 0.92x at batch 16 (64x56x56 / 128x28x28), ``t2_lut``
#: 0.92-0.97x at batch 64; in a first series (own output buffers) 0.98-0.99x at batch 4-8
#: (1.6-6.4 MB). Below the bound (every batch-1 ResNet-18 conv, the 3.2 MB stem included) the
#: output stays in the caches for the next layer.
STREAM_MIN_BYTES = 4 << 20


def streams_output(spec: GemmSpec) -> bool:
    """Whether the lookup kernels write ``spec``'s fp32 output with non-temporal stores.

    Example:
        >>> import dataclasses
        >>> from ternbench.schedules.ops.spec import GemmSpec
        >>> big = GemmSpec(op="conv2d", batch=64, in_shape=(64, 56, 56), kernel=(3, 3),
        ...                stride=(1, 1), padding=(1, 1), out_hw=(56, 56), k_order="ijc", N=64,
        ...                K=576, G=1, gs=576, Kp=576, Np=64, act_dtype="int8",
        ...                layout="tt_lut", w_dtype="int8", nb=64, mb=7, m_task=1)
        >>> streams_output(big), streams_output(dataclasses.replace(big, batch=1))
        (True, False)
    """
    # int8 outputs (``out_clip``) take plain stores: a 32-channel block is half a cache line,
    # and its other half is written by another block's pass
    return spec.out_clip is None and spec.M * spec.N * 4 >= STREAM_MIN_BYTES


def _stream_store_ir(lanes: int) -> str:
    """LLVM IR of ``tb_stream_f32x{lanes}(ptr, <lanes x float>)``: a non-temporal store where
    the address is 64-byte aligned (``vmovntps zmm`` faults otherwise: a row of N floats is
    aligned only when N % 16 == 0), a plain one elsewhere. ``linkonce_odr``: every kernel of a
    module imports it."""
    return (f"define linkonce_odr void @tb_stream_f32x{lanes}(ptr %p, <{lanes} x float> %v) "
            "alwaysinline {\n"
            "entry:\n"
            "  %a = ptrtoint ptr %p to i64\n"
            "  %m = and i64 %a, 63\n"
            "  %z = icmp eq i64 %m, 0\n"
            "  br i1 %z, label %nt, label %plain\n"
            "nt:\n"
            f"  store <{lanes} x float> %v, ptr %p, align 64, !nontemporal !0\n"
            "  ret void\n"
            "plain:\n"
            f"  store <{lanes} x float> %v, ptr %p, align 4\n"
            "  ret void\n"
            "}\n"
            "!0 = !{i32 1}\n")


def finish_source(spec: GemmSpec, lines: list[str], lanes: int) -> str:
    """The kernel's TVMScript text; with :func:`streams_output`, the batch loop (the root
    block's last statement, at indent 8) is wrapped in an attribute that links the streaming
    store helper into the module (``pragma_import_llvm``)."""
    if not streams_output(spec):
        return "\n".join(lines)
    head = "        for b in range("
    i = next(k for k, x in enumerate(lines) if x.startswith(head))
    attr = f"        with T.attr(0, 'pragma_import_llvm', {_stream_store_ir(lanes)!r}):"
    return "\n".join([*lines[:i], attr, *("    " + x for x in lines[i:])])


def requantized(spec: GemmSpec, value: str, width: int) -> str:
    """TVMScript of an epilogue ``value`` (``width`` float32 lanes; 1: a scalar) as stored:
    itself, or with :attr:`~.spec.GemmSpec.out_clip` rounded half to even, clipped and narrowed
    to int8 (``vrndscaleps``, min / max, ``vcvttps2dq`` + ``vpmovdb``), as torch's quantized
    ops round.

    Example:
        >>> import dataclasses
        >>> from ternbench.schedules.ops.spec import GemmSpec
        >>> spec = GemmSpec(op="conv2d", batch=1, in_shape=(64, 8, 8), kernel=(3, 3),
        ...                 stride=(1, 1), padding=(1, 1), out_hw=(8, 8), k_order="ijc", N=64,
        ...                 K=576, G=1, gs=576, Kp=576, Np=64, act_dtype="int8",
        ...                 layout="t2_lut", w_dtype="uint8", nb=64, mb=7, m_task=1)
        >>> requantized(spec, "v", 1)
        'v'
        >>> requantized(dataclasses.replace(spec, out_clip=(0, 127)), "v", 1)
        "T.Cast('int8', T.max(T.min(T.nearbyint(v), T.float32(127)), T.float32(0)))"
    """
    if spec.out_clip is None:
        return value
    lo, hi = (f"T.float32({v})" if width == 1 else f"T.broadcast(T.float32({v}), {width})"
              for v in spec.out_clip)
    dt = "int8" if width == 1 else f"int8x{width}"
    return f"T.Cast('{dt}', T.max(T.min(T.nearbyint({value}), {hi}), {lo}))"


def _tile_stores(spec: GemmSpec, f: ConvFrame, acc: str,
                 terms: EpilogueTerms | None = None) -> list[str]:
    """The epilogue of a row tile: ``out = acc * S + bias [+ terms]`` per pixel and vector
    (``acc`` names the accumulators ``{acc}_{r}_{j}``; ``terms(yo, xo, channels, width)``
    gives the TVMScript expressions added in order, ``channels`` a ramp of ``width`` lanes);
    the pixels of a partial tile past the row are not stored, nor a partial channel block's
    padding lanes: its channels are computed as the narrowest vector that holds them and
    stored as it is or through ``ot`` (lane by lane, a 32-channel conv with RTN's offset terms
    took 1.8x the time). No scalar bindings here: a ``name: T.float32 = ...`` per stored
    vector made the same conv take 1.5x the time (measured, not traced)."""
    lines, n = [], f.lanes
    stream = streams_output(spec)
    yo = f"t // {f.per_row}"
    last = spec.Np // spec.nb - 1  # the last channel block (the partial one, if any)

    def value(a: str, xo: str, c0: str, w: int) -> str:  # w lanes from channel c0
        ch = f"T.ramp({c0}, 1, {w})"
        extra = terms(yo, xo, ch, w) if terms else []
        return (f"(T.Cast('float32x{w}', {a}[T.ramp(0, 1, {w})]) * S[{ch}] + bias[{ch}])"
                + "".join(f" + {e}" for e in extra))

    for r in range(f.mb):
        xo = f"t % {f.per_row} * {f.mb} + {r}"
        row = f"b * {f.mi} + {yo} * {f.wo} + {xo}"
        for j in range(f.nv):
            a, c0 = f"{acc}_{r}_{j}", f"nk * {spec.nb} + {n * j}"
            if stream:  # whole vectors only (see streams_output)
                store = (f"T.evaluate(T.call_extern('void', 'tb_stream_f32x{n}', "
                         f"T.address_of(out[{row}, {c0}]), {value(a, xo, c0, n)}))")
            else:
                store = (f"out[{row}, T.ramp({c0}, 1, {n})] = "
                         f"{requantized(spec, value(a, xo, c0, n), n)}")
            valid = min(max(spec.N - last * spec.nb - n * j, 0), n)  # its lanes in the last block
            if valid == n:
                body = [store]
            else:
                # the last block stores its channels only: the narrowest vector that holds
                # them (16, 32 or 64 lanes), as it is or through ``ot``
                w, c1 = next(x for x in (16, 32, 64) if x >= valid), str(last * spec.nb + n * j)
                if not valid:
                    tail = []
                elif valid == w:
                    tail = [f"out[{row}, T.ramp({c1}, 1, {w})] = "
                            f"{requantized(spec, value(a, xo, c1, w), w)}"]
                else:
                    tail = [f"ot[T.ramp(0, 1, {w})] = {requantized(spec, value(a, xo, c1, w), w)}",
                            f"for n in range({valid}):", f"    out[{row}, {c1} + n] = ot[n]"]
                body = tail
                if last:  # the other blocks are whole
                    body = [f"if nk < {last}:", f"    {store}"]
                    if tail:
                        body += ["else:", *(f"    {x}" for x in tail)]
            if not body:
                continue
            ind = "                        "
            if f.wo % f.mb:
                lines.append(f"{ind}if {xo} < {f.wo}:")
                ind += "    "
            lines += [ind + x for x in body]
    return lines


def lut_source(spec: GemmSpec) -> str:
    """TVMScript text of the ``t2_lut`` kernel for ``spec`` (see the module docstring)."""
    f = conv_frame(spec, "t2_lut", LUT_LANES)
    geo = lut_geometry(spec)
    c, h, w, ph, pw = f.c, f.h, f.w, f.ph, f.pw
    v = "T.ramp(0, 1, 32)"
    dpg = lut_dp_geometry_of(c, (spec.kernel[0], spec.kernel[1])) if spec.lut_dp else None
    extra = ([f"Wv: T.Buffer(({f.taps}, {dpg.nc * dpg.qc}, {4 * spec.Np}), 'int8')",
              f"Cv: T.Buffer(({spec.Np},), 'int32')"] if dpg else [])
    # the dot-product channels' inputs + 128 (u8, a quad per int32), per padded pixel
    xu = ([f"        xu = T.alloc_buffer(({f.hp}, {f.wt}, {dpg.nc * dpg.qc}), 'int32')"]
          if dpg else [])
    lines = kernel_head(spec, f, geo.cgp, spec.w_dtype, extra) + [
        f"        tab = T.alloc_buffer(({f.hp}, {f.wt}, {geo.cgp}, 32), 'int16')", *xu,
        # the table-building constants (see below): signed weights of each entry, 4 bytes per
        # dword (the 4th zero), and -128 * their sum + LUT_BIAS
        "        wq = T.alloc_buffer((128,), 'int8')",
        "        cq = T.alloc_buffer((32,), 'int32')",
        "        for i in range(128):",
        f"            wq[i] = T.Cast('int8', {_digit_of('i // 64', 'i % 64 // 4', 'i % 4')} - 1)",
        "        for i in range(32):",
        "            cq[i] = -128 * ("
        + " + ".join(f"{_digit_of('i // 16', 'i % 16', str(k))} - 1" for k in range(3))
        + f") + {LUT_BIAS}",
    ]
    # the zero ring (and a partial tile's columns past it), and the padding triples where the
    # row tiles look them up (not LUT_SKIP_PADDING): sums of zeros, so the bias alone. The
    # images write the other tables only, so this is written once per call (the buffer is a
    # per-call workspace), decided per pixel: against once per image, decided per triple,
    # 0.976-1.011x the time at batch 64 (``docs/measured/ab-x86-znver4-lut-ring-once.txt``)
    lines += [f"        for y in T.parallel({f.hp}):",
              f"            for z in range({f.wt}):",
              f"                if {padding_ring(f)}:",
              f"                    for g in range({geo.cgp}):",
              "                        for e in T.vectorized(32):",
              f"                            tab[y, z, g, e] = T.int16({LUT_BIAS})"]
    if dpg:  # the ring's quads: zeros + 128
        lines += [f"                    for q in range({dpg.nc * dpg.qc}):",
                  f"                        xu[y, z, q] = T.int32({_XOR_128})"]
    if geo.cgp > geo.cg and not LUT_SKIP_PADDING:
        lines += ["                else:",
                  f"                    for g in range({geo.cg}, {geo.cgp}):",
                  "                        for e in T.vectorized(32):",
                  f"                            tab[y, z, g, e] = T.int16({LUT_BIAS})"]
    lines += [f"        for b in range({spec.batch}):"]
    lines += [f"            for y in T.parallel({h}):",
              f"                for z in range({w}):"]
    digit = _digits("e")

    def table(g: str, n: int) -> str:
        terms = [f"T.Cast('int16', X[b, y, z, {g} * 3 + {j}]) * T.Cast('int16', {digit[j]} - 1)"
                 for j in range(n)]
        return " + ".join(terms) + f" + T.int16({LUT_BIAS})"

    # Triples whose 4-byte load stays inside the pixel (3g + 3 < C) get their table from two
    # vpdpbusd: the 4 bytes (x0, x1, x2, next) + 128 as the unsigned operand, broadcast to 16
    # dwords, against each entry's signed weights (w0, w1, w2, 0), starting from the constant
    # -128 * sum(w) (the +128 cancelled exactly); packssdw interleaves the two halves per 128-bit
    # lane, so half h, dword 4L + q holds entry 8L + 4h + q and the table is in entry order.
    # (with dot-product channels every triple is followed by a quad in its chunk)
    fast = geo.cg if dpg else (c - 1) // LUT_GROUP
    first = dpg.triple_channel("g") if dpg else "g * 3"

    def plus_128(channel: str) -> str:  # 4 input bytes + 128 each, as one int32
        return (f"T.bitwise_xor(T.reinterpret(X.vload([b, y, z, {channel}], 'int8x4'), "
                f"dtype='int32'), T.int32({_XOR_128}))")

    xb = f"T.reinterpret(T.broadcast({plus_128(first)}, 16), dtype='int8x64')"
    dp = [f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{VPDPBUSD}'), "
          f"cq[T.ramp({16 * h}, 1, 16)], {xb}, wq[T.ramp({64 * h}, 1, 64)], dtype='int32x16')"
          for h in (0, 1)]
    if fast:
        lines += [f"                    for g in range({fast}):",
                  f"                        tab[y + {ph}, z + {pw}, g, {v}] = "
                  f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{PACKSSDW}'), "
                  f"{dp[0]}, {dp[1]}, dtype='int16x32')"]
    if dpg:
        lines += [f"                    for q in range({dpg.nc * dpg.qc}):",
                  f"                        xu[y + {ph}, z + {pw}, q] = "
                  f"{plus_128(dpg.quad_channel('q'))}"]
    for g in range(fast, geo.cg):  # the last triple(s): plain vector arithmetic
        n = min(LUT_GROUP, c - LUT_GROUP * g)
        lines += ["                    for e in T.vectorized(32):",
                  f"                        tab[y + {ph}, z + {pw}, {g}, e] = {table(str(g), n)}"]

    # register tile: mb pixels of one output row x nv * 32 channels; an input column's table
    # (one zmm) serves every (pixel, tap) of the tile that reads it
    def column(y: str, x: str, g: str) -> list[str]:
        return [f"                                    tv[{v}] = tab[{y}, {x}, {g}, {v}]"]

    def lookup(index: str) -> str:
        return (f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{VPERMW}'), tv[{v}], "
                f"{index}, dtype='int16x32')")

    # byte indices: with an even number of vectors each 64-channel block (packed with
    # pack_lut_idx(paired=True)) read as 32 int16 words gives vpermw the low byte's index (it
    # reads 5 bits of each word) and, shifted right by 8, the high byte's; else each 32-channel
    # vector is widened
    def indices(d: int, tap: str, g: str) -> list[str]:
        ind, out = "                                    ", []
        if f.nv % 2:  # (int16 indices: no widening, a shuffle the lookups would wait for)
            cast = ("{}" if spec.w_dtype == "int16" else "T.Cast('int16x32', {})").format
            return [f"{ind}iv_{d}_{j}[{v}] = " + cast(f"Wi[{tap}, {g}, "
                    f"T.ramp(nk * {spec.nb} + {32 * j}, 1, 32)]") for j in range(f.nv)]
        for j in range(0, f.nv, 2):
            block = f"Wi[{tap}, {g}, T.ramp(nk * {spec.nb} + {32 * j}, 1, 64)]"
            out += [f"{ind}iv_{d}_{j}[{v}] = T.reinterpret({block}, dtype='int16x32')",
                    f"{ind}iv_{d}_{j + 1}[{v}] = T.shift_right(iv_{d}_{j}[{v}], "
                    "T.broadcast(T.int16(8), 32))"]
        return out

    lines += row_tile_kernel(spec, f, geo, wide=("acc", "int32"), narrow=("a16", "int16"),
                             idx_dtype="int16", regs=["tv"], column=column, lookup=lookup,
                             indices=indices, bias=LUT_BIAS,
                             skip_padding=LUT_SKIP_PADDING,
                             dots=_dot_steps(spec, f, dpg) if dpg else None)
    return finish_source(spec, lines, LUT_LANES)


def _dot_steps(spec: GemmSpec, f: ConvFrame, dpg: DpGeometry) -> DotSteps:
    """The ``vpdpbusd`` quads of a ``t2_lut`` conv with dot-product channels: per tap of the
    kernel row, the block's weights (``Wv [tap, quad, 4 Np]``: 16 channels x 4 bytes per zmm,
    natural channel order) stay in registers while each tile pixel's 4 bytes + 128 (``xu``)
    are broadcast; ``Cv = -128 sum(w)`` per channel cancels the + 128."""
    ind, hv, bv = " " * 36, "T.ramp(0, 1, 16)", "T.ramp(0, 1, 64)"
    halves = [(j, p) for j in range(f.nv) for p in (0, 1)]

    def lines(quad: str, dy: str, y0: str, x0: str) -> list[str]:
        out = []
        for d in range(f.kw):
            out += [f"{ind}wv_{j}_{p}[{bv}] = Wv[{dy} * {f.kw} + {d}, {quad}, T.ramp((nk * "
                    f"{spec.nb} + {32 * j + 16 * p}) * 4, 1, 64)]" for j, p in halves]
            for r in range(f.mb):
                out.append(f"{ind}xv[{bv}] = T.reinterpret(T.broadcast(xu[{y0}, {x0} + "
                           f"{r * f.sw + d}, {quad}], 16), dtype='int8x64')")
                out += [f"{ind}va_{r}_{j}_{p}[{hv}] = T.call_llvm_pure_intrin("
                        f"T.llvm_lookup_intrinsic_id('{VPDPBUSD}'), va_{r}_{j}_{p}[{hv}], "
                        f"xv[{bv}], wv_{j}_{p}[{bv}], dtype='int32x16')" for j, p in halves]
        return out

    allocs = tuple(f"{x} = T.alloc_buffer((64,), 'int8')"
                   for x in ["xv", *(f"wv_{j}_{p}" for j, p in halves)])
    return DotSteps(quads=dpg.qc, lines=lines, allocs=allocs, corr="Cv")


def lut_compute(spec: GemmSpec) -> Any:
    """The ``t2_lut`` PrimFunc for ``spec`` (already scheduled: see the module docstring)."""
    tvm = _tvm.require_tvm()
    from tvm.script import tirx as T

    return tvm.script.from_source(lut_source(spec), extra_vars={"T": T}, s_tir=True)
