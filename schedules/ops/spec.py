"""The GEMM description: :class:`GemmSpec` (everything that determines one compiled kernel)
and :func:`plan_gemm`, which turns an exported layer into one for a layout and tile sizes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from .amx import bf16_pieces
from .lut import lut_dp_geometry_of, lut_geometry_of
from .packing import AVX2_TILE_K, AVX2_TILE_N, AVX512_TILE_N, TT_WORD
from .ttlut import TT_LUT_GROUP, ttlut_geometry_of

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

WeightLayout = Literal["t2_avx2", "i8_avx2", "t2_blocked", "t2_decoded", "dense_blocked",
                       "tt_planes", "t2_lut", "tt_lut", "t2_amx", "tt_amx", "bf16_amx"]
#: layouts fed to the x86 u8 x s8 tile intrinsics (activations + 128, a Cw correction)
INTRIN_LAYOUTS = ("t2_avx2", "i8_avx2")
#: layouts of ternary-activation kernels (their int8 input holds codes in {-1, 0, 1})
TT_LAYOUTS = ("tt_planes", "tt_lut", "tt_amx")
#: the AMX conv layouts (:mod:`.amx`): ``tdpbssd`` on int8 activations and on ternary codes,
#: ``tdpbf16ps`` on grouped (FGQ) weights folded with their scales into bf16 pieces
AMX_LAYOUTS = ("t2_amx", "tt_amx", "bf16_amx")
#: layouts whose epilogue can requantize the output to int8 codes (:attr:`GemmSpec.out_clip`):
#: the AMX int8-tile convs and the table-lookup convs (:mod:`.lut`, :mod:`.ttlut`)
OUT_CLIP_LAYOUTS = ("t2_amx", "tt_amx", "t2_lut", "tt_lut")


class UnsupportedLayerError(NotImplementedError):
    """The layer's weight format / activation mode has no kernel (e.g. int16 activations)."""


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
    w_dtype: Literal["uint8", "int8", "float32", "uint64", "int16", "uint16"]
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
    #: ``pixel_bits`` convs with 16 or 32 channels: each word holds whole taps of ONE kernel row
    #: (``64 / C`` of them, the rest zero), so a word of the bit-plane matrix is a plain load
    #: of the row-packed input ``X_rows`` instead of an OR of taps from different image rows
    #: (see :func:`.compute.tt_compute`); K is padded per kernel row
    row_words: bool = False
    #: small-channel convs (stems, C < 16) on the x86 tile intrinsics: each kernel row's
    #: ``kw * C`` fan-in elements padded to ``k_row`` (0: not padded), so the im2col row is
    #: (kernel row, padded run) with constant indices instead of a div/mod per element;
    #: ``bf16_amx`` with C % 32 != 0: the run padded to 32k, read as whole tile rows
    k_row: int = 0
    #: ``tt_planes``: accumulate the popcounts in int64 lanes (x86: ``vpopcntq`` results need
    #: no narrowing per word), else int32
    tt_acc64: bool = False
    #: ``tt_planes``: two accumulators per output, ``sum popc(nz)`` and ``sum popc(neg)``
    #: (``acc`` gets a last axis of 2), combined exactly in integers once per register tile
    #: (block ``acc_pair``): per word and lane block one add each instead of add, double and
    #: subtract (x86 AVX-512: 6 vector ops, not 7)
    tt_split: bool = False
    #: ``tt_planes``: each word of the bit-planes (of an input row, or of a pixel: ``X_bits``)
    #: is one compare of :attr:`mask_lanes` codes turned into its mask (an LLVM helper,
    #: :func:`.compute.mask_word_ir`: ``vptestmb`` / ``vpcmpgtb`` + ``kmovq`` on AVX-512,
    #: ``vpcmpeqb`` + ``vpmovmskb`` on AVX2), instead of a reduction of shifted bits
    mask_words: bool = False
    #: ``bf16_amx``: bf16 pieces per weight (weight = their exact sum; FP16 scales take 2)
    planes: int = 1
    #: ``bf16_amx`` on float32 inputs (FP32 convs: the stems ternary models keep in FP32): bf16
    #: pieces per input value, split exactly while the image is copied (3: 24 bits); the
    #: kernel runs the piece products ``a_i x w_j`` with ``i + j <= 2`` (:func:`.amx.amx_source`)
    a_planes: int = 1
    #: :data:`OUT_CLIP_LAYOUTS`: the output requantized in the epilogue, ``clip(round(acc * S
    #: + bias [+ terms]), lo, hi)`` as int8 (S, bias and the terms divided by the output scale
    #: on the host: :func:`.packing.requantize_args`), as torch's quantized conv writes quint8;
    #: ``(-128, 127)`` int8 codes, ``(0, 127)`` with a ReLU, ``(-1, 1)`` ternary codes.
    #: None: float32 output
    out_clip: tuple[int, int] | None = None
    #: ``t2_lut``: some input channels of each chunk go to ``vpdpbusd`` instead of the tables
    #: (:func:`.lut.lut_dp_geometry_of`), the two recipes interleaved in one loop; weights
    #: ``Wi`` (int16 indices of the triples), ``Wv`` (int8 weights of the quads) and ``Cv``
    #: (-128 x their sum per channel); 32-channel tiles
    lut_dp: bool = False

    def __post_init__(self) -> None:
        if self.mask_words and not self.mask_lanes:
            raise ValueError("mask_words: tt_planes specs whose words are 64 contiguous codes "
                             "or a pixel of 8, 16 or 32 channels only, got layout "
                             f"{self.layout!r} with in_shape {self.in_shape}")
        if self.lut_dp and (self.layout != "t2_lut" or self.nb != 32 or self.w_dtype != "int16"):
            raise ValueError("lut_dp: t2_lut specs with 32-channel tiles and int16 indices only, "
                             f"got layout {self.layout!r}, nb={self.nb}, w_dtype={self.w_dtype}")
        if self.out_clip is not None:
            lo, hi = self.out_clip
            if self.layout not in OUT_CLIP_LAYOUTS:
                raise ValueError(f"out_clip: int8 outputs are {' / '.join(OUT_CLIP_LAYOUTS)} "
                                 f"only, got layout {self.layout!r}")
            if not -128 <= lo < hi <= 127:
                raise ValueError(f"out_clip: need -128 <= lo < hi <= 127, got {self.out_clip}")

    @property
    def out_dtype(self) -> str:
        """The kernel's output dtype: int8 with :attr:`out_clip`, else float32."""
        return "float32" if self.out_clip is None else "int8"

    @property
    def row_chunks(self) -> int:
        """Words per kernel row of a :attr:`row_words` conv."""
        c, kw = self.in_shape[0], self.kernel[1]
        return -(-kw * c // TT_WORD)

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
        if self.layout == "bf16_amx":  # exact products, float32 sums (tdpbf16ps)
            return "float32"
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
        (C % 64 == 0), 64/C whole taps (C = 1, 2, ..., 32: CIFAR-size layers) or the whole
        kernel (kh*kw*C <= 64: a 3-channel stem's 27 bits); one group, (kh, kw, C) order: the
        bit-planes are packed once per input pixel (``X_bits``) and gathered word by word,
        instead of packing the kh*kw times larger im2col matrix bit by bit."""
        c = self.in_shape[0]
        whole = c * self.kernel[0] * self.kernel[1] <= TT_WORD  # taps in k order in one word
        return (self.layout == "tt_planes" and self.op == "conv2d" and self.G == 1
                and self.k_order == "ijc"
                and (c % TT_WORD == 0 or TT_WORD % c == 0 or whole))

    @property
    def mask_lanes(self) -> int:
        """Codes per :attr:`mask_words` compare: 64 (input rows, pixels of C % 64 == 0
        channels), C (pixels of 8, 16 or 32 channels); 0 where words are not packed so
        (other layouts, 1-4 channel and whole-kernel pixels).

        Example:
            >>> spec = GemmSpec(op="linear", batch=1, in_shape=(4608,), kernel=(1, 1),
            ...                 stride=(1, 1), padding=(0, 0), out_hw=(1, 1), k_order="cij",
            ...                 N=512, K=4608, G=1, gs=4608, Kp=4608, Np=512, act_dtype="int8",
            ...                 layout="tt_planes", w_dtype="uint64", nb=16, mb=1, m_task=1)
            >>> spec.mask_lanes
            64
        """
        if self.layout != "tt_planes":
            return 0
        if not self.pixel_bits:
            return TT_WORD
        c = self.in_shape[0]
        return TT_WORD if c % TT_WORD == 0 else (c if c in (8, 16, 32) else 0)

    @property
    def has_input_stage(self) -> bool:
        """Whether ``gemm_compute`` materialises an ``A_in`` stage (im2col, pad or shift)."""
        if self.pixel_bits:
            return False
        return self.op == "conv2d" or self.layout in INTRIN_LAYOUTS or self.Kp != self.K

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
    if 2 * mb <= mb_max:
        # M = 49 (7x7 maps at batch 1) has no divisor in 2..4: one-row tiles re-read every
        # weight and scale per row (FGQ layer4 was memory-bound on its group scales); a
        # divisor up to twice the register tile (7) still fits the accumulators
        mb = next(d for d in range(min(2 * mb_max, m), 0, -1) if m % d == 0)
    tiles = m // mb
    cap = max(1, rows_per_task // mb)
    m_task = next(d for d in range(min(cap, tiles), 0, -1) if tiles % d == 0)
    return mb, m_task


def _round_up(v: int, q: int) -> int:
    return -(-v // q) * q


#: one point of a rule's tile-parameter grid (e.g. ``{"nb": 16, "mb": 4, "rows": 64}``)
Params = Mapping[str, int]


def row_tile_pixels(width: int, mb_max: int) -> int:
    """Pixels per row tile of the lookup kernels (``t2_lut``, ``tt_lut``) on output rows of
    ``width``: ``mb_max`` or one more, whichever pads the row less (a row's last tile may be
    partial), never more than the row.

    Example:
        >>> [row_tile_pixels(w, m) for w, m in ((56, 7), (32, 7), (8, 6), (4, 7))]
        [7, 8, 6, 4]
    """
    return min((min(c, width) for c in (mb_max, mb_max + 1)),
               key=lambda c: (-(-width // c) * c, c))


def with_lut_dp(spec: GemmSpec) -> GemmSpec:
    """A ``t2_lut`` spec planned with 32-channel tiles, turned into one with dot-product
    channels (:attr:`GemmSpec.lut_dp`): int16 indices, and the chunks hold every channel
    exactly (no padding triples: ``Kp = K``)."""
    if spec.layout != "t2_lut" or lut_dp_geometry_of(spec.in_shape[0], spec.kernel) is None:
        raise ValueError(f"lut_dp: a t2_lut conv whose {spec.in_shape[0]} input channels split "
                         f"into chunks (lut_dp_geometry_of), got layout {spec.layout!r} with "
                         f"kernel {spec.kernel}")
    return dataclasses.replace(spec, lut_dp=True, w_dtype="int16", Kp=spec.K, gs=spec.K)


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


def layer_offsets(lx: LayerExport) -> tuple[bool, bool]:
    """Whether a layer has an activation offset and any non-zero weight offset (RTN).

    Example:
        >>> from types import SimpleNamespace
        >>> layer_offsets(SimpleNamespace(act_offset=0.0, weight_offset=np.zeros(4)))
        (False, False)
    """
    w_off = lx.weight_offset is not None and bool(np.any(np.asarray(lx.weight_offset)))
    return float(lx.act_offset) != 0.0, w_off


def plan_gemm(lx: LayerExport, batch: int, layout: WeightLayout, *, nb: int, mb_max: int,
              rows_per_task: int, tile_n: int = AVX2_TILE_N) -> GemmSpec:
    """GEMM view of ``lx`` for a weight layout and tile sizes (padding decided here)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    in_shape, out_hw = layer_geometry(lx)
    g, gs = _groups(lx)
    act = _act_dtype(lx)
    k, n = lx.fan_in, lx.out_channels
    if (layout in TT_LAYOUTS) != (lx.act_mode == "ternary"):
        raise ValueError(f"layout {layout} does not fit act_mode {lx.act_mode!r}")
    if g == 1 or lx.weight_format == "fp32":
        g, gs = 1, k  # one group (fp32 exports carry unit scales whatever their group size)
    kg = g * gs  # >= K: a partial last group is zero-padded
    w_dtype: Literal["uint8", "int8", "float32", "uint64", "int16", "uint16"]
    row_words = False
    planes, a_planes, bf_row = 1, 1, 0
    if layout == "tt_planes":
        kp = g * _round_up(gs, TT_WORD)  # each group padded to whole words
        w_dtype = "uint64"
        c0 = in_shape[0]
        if (lx.op == "conv2d" and g == 1 and 16 <= c0 < TT_WORD and TT_WORD % c0 == 0
                and tuple(lx.kernel_size) != (1, 1)):
            row_words = True  # whole taps of one kernel row per word (GemmSpec.row_words)
            kp = lx.kernel_size[0] * -(-lx.kernel_size[1] * c0 // TT_WORD) * TT_WORD
    elif layout in INTRIN_LAYOUTS:
        if tile_n not in (AVX2_TILE_N, AVX512_TILE_N):
            raise ValueError(f"{layout} tiles are 8 or 16 output channels wide, got {tile_n}")
        if nb % tile_n:
            raise ValueError(f"{layout} needs nb to be a multiple of {tile_n}")
        kp = _round_up(kg, AVX2_TILE_K)
        if g == 1:
            gs = kp  # one group: the zero padding just joins it
        elif gs % 4:  # the intrinsic reduces 4 k at a time; padding beyond G*gs is in no group
            raise ValueError(f"{layout} needs group_size % 4 == 0, got {gs}")
        w_dtype = "uint8" if layout == "t2_avx2" else "int8"
        if layout == "i8_avx2" and lx.weight_format != "int8":
            raise ValueError(f"layout i8_avx2 needs int8 weights, got {lx.weight_format}")
    elif layout in ("t2_blocked", "t2_decoded"):
        kp, w_dtype = _round_up(kg, 4), "uint8"
    elif layout == "t2_lut":
        if lx.op != "conv2d" or g != 1 or act != "int8":
            raise ValueError(f"layout t2_lut is for one-group int8-activation convs, got "
                             f"{lx.op} with {g} groups, {act} activations")
        kh_, kw_ = lx.kernel_size
        kp = gs = kh_ * kw_ * 3 * lut_geometry_of(in_shape[0], (kh_, kw_)).cgp  # padded triples
        w_dtype = "uint8"
    elif layout == "bf16_amx":
        fp32 = lx.weight_format == "fp32" and lx.act_mode == "fp32"  # an FP32 conv
        if lx.op != "conv2d" or not (fp32 or (act == "int8" and lx.act_mode == "int")):
            raise ValueError(f"layout bf16_amx is for int8-activation and FP32 convs, got "
                             f"{lx.op} with {lx.weight_format} weights and {act} activations")
        # the scales are folded into the weights (bf16 pieces): one group, any group size;
        # float32 weights and inputs take three pieces each
        g, gs, kp, w_dtype = 1, k, k, "uint16"
        planes = 3 if fp32 else len(bf16_pieces(np.asarray(lx.scales, np.float32)))
        a_planes = 3 if fp32 else 1
        if in_shape[0] % 32:  # row chunks: each kernel row's kw * C run padded to 32k
            kh_, kw_ = lx.kernel_size
            bf_row = _round_up(kw_ * in_shape[0], 32)
            kp = gs = kh_ * bf_row
    elif layout in AMX_LAYOUTS:
        if lx.op != "conv2d" or g != 1 or act != "int8" or in_shape[0] % 64:
            raise ValueError(f"layout {layout} is for one-group convs with int8 (or ternary) "
                             f"activations and a multiple of 64 input channels, got {lx.op} "
                             f"with {g} groups, {act} activations, {in_shape[0]} channels")
        kp = gs = kg
        w_dtype = "uint8"
    elif layout == "tt_lut":
        if lx.op != "conv2d" or g != 1:
            raise ValueError(f"layout tt_lut is for one-group ternary convs, got {lx.op} "
                             f"with {g} groups")
        kh_, kw_ = lx.kernel_size
        kp = gs = kh_ * kw_ * TT_LUT_GROUP * ttlut_geometry_of(in_shape[0], (kh_, kw_)).cgp
        w_dtype = "int8"
    else:
        kp = kg
        w_dtype = "int8" if lx.weight_format == "int8" else "float32"
    if layout.startswith(("t2", "tt")) and lx.weight_format != "ternary":
        raise ValueError(f"layout {layout} needs ternary weights, got {lx.weight_format}")
    if layout in ("t2_lut", "tt_lut"):  # tiles of one image's pixels (tables per image) that
        # lie in one output row (they share table rows): mb_max or one more pixel, whichever
        # pads the row less; a row's last tile may be partial (wider tiles would spill)
        mb, m_task = row_tile_pixels(out_hw[1], mb_max), 1
    else:
        mb, m_task = _row_tiles(batch * out_hw[0] * out_hw[1], mb_max, rows_per_task)
    # One group, or groups along the input channels of each tap (group_order "ijc"): reduce in
    # (kh, kw, C) order, so im2col copies contiguous channel runs (the weights are permuted on
    # the host). Groups over the (C, kh, kw) order must stay contiguous in K: reduce in it.
    ijc = g == 1 or lx.group_order == "ijc"
    k_order: Literal["cij", "ijc"] = "ijc" if lx.op == "conv2d" and ijc else "cij"
    k_row = 0
    if (layout in INTRIN_LAYOUTS and k_order == "ijc" and kp != k and in_shape[0] < 16
            and g == 1):
        # a stem (C = 1..3): K = kh*kw*C would be padded at the end, leaving the im2col a
        # div/mod per element (80% of the int8 ResNet-18 stem); pad each kernel row instead
        kh_, kw_ = lx.kernel_size
        k_row = _round_up(kw_ * in_shape[0], AVX2_TILE_K if layout == "t2_avx2" else 4)
        kp = gs = kh_ * k_row  # one group over the padded rows (pad weights are zeros)
    k_row = k_row or bf_row
    w_off = border = affine = False
    if layout in TT_LAYOUTS:
        a_off, w_off = layer_offsets(lx)
        border = a_off and lx.op == "conv2d" and any(tuple(lx.padding))
        affine = w_off or a_off
    return GemmSpec(
        op=lx.op, batch=batch, in_shape=in_shape, kernel=tuple(lx.kernel_size),  # type: ignore[arg-type]
        stride=tuple(lx.stride), padding=tuple(lx.padding), out_hw=out_hw,  # type: ignore[arg-type]
        k_order=k_order,
        N=n, K=k, G=g, gs=gs, Kp=kp, Np=_round_up(n, nb), act_dtype=act, layout=layout,
        w_dtype=w_dtype, nb=nb, mb=mb, m_task=m_task, w_off=w_off, border=border,
        affine=affine, tile_n=tile_n if layout in INTRIN_LAYOUTS else AVX2_TILE_N,
        row_words=row_words, k_row=k_row, planes=planes, a_planes=a_planes,
    )

