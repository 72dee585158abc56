"""The ``t2_lut`` table-lookup conv (AVX-512BW ``vpermw``): chunking, index packing, rule gate,
and exactness against the integer reference (including the int16 accumulation bound)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_int8_codes, require_x86_features, x86_info
from ternbench.schedules import _tvm, measure, ops, x86
from ternbench.schedules.ops.lut import (
    LUT_BIAS,
    LUT_GROUP,
    LUT_INT16_RUN,
    LUT_ZERO_INDEX,
    lut_dp_geometry_of,
    lut_geometry_of,
    lut_source,
)
from ternbench.schedules.ops.ttlut import ttlut_source
from test_schedules import make_layer

AVX512 = _tvm.TargetInfo(name="x86", target_str="{}", kind="llvm", mcpu="znver4", is_x86=True,
                         features=frozenset({"avx2", "avx512f", "avx512bw", "avx512vl",
                                             "avx512dq", "avx512vnni"}))


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (7, 7), (1, 5)])
def test_geometry_keeps_int16_runs_exact(kernel):
    kh, kw = kernel
    for c in range(1, 700):
        geo = lut_geometry_of(c, kernel)
        assert geo.cgp * LUT_GROUP >= c and geo.cgp == geo.nc * geo.cgc
        assert geo.cg <= geo.cgp < geo.cg + geo.nc  # at most one padding triple per chunk
        # a run: tpc kernel rows x kw taps x cgc triples, 85 lookups of |entry| <= 384 at most
        assert geo.tpc * kw * geo.cgc <= LUT_INT16_RUN
        assert geo.nt * geo.tpc == kh and (geo.tpc == 1 or geo.nc == 1)
    # biased entries 0..2 * LUT_BIAS add up in unsigned int16 (|entry| <= 3 * 128)
    assert LUT_BIAS >= 3 * 128 and LUT_INT16_RUN * 2 * LUT_BIAS <= np.iinfo(np.uint16).max
    with pytest.raises(ValueError, match="kernel width 86"):
        lut_geometry_of(8, (1, 86))


def test_pack_lut_idx_decodes_to_the_codes():
    rng = np.random.default_rng(0)
    n, c, kh, kw = 5, 7, 3, 3
    codes = rng.integers(-1, 2, (n, kh * kw * c)).astype(np.int8)  # (kh, kw, C) order
    idx = ops.pack_lut_idx(codes, c, (kh, kw), 32)
    geo = lut_geometry_of(c, (kh, kw))
    assert idx.shape == (kh * kw, geo.cgp, 32) and idx.dtype == np.uint8
    # lanes 2m, 2m + 1 hold channels m, 16 + m
    i = idx.astype(np.int64)[..., [2 * (ch % 16) + ch // 16 for ch in range(32)]]
    digits = np.stack([i % 3, i // 3 % 3, i // 9], -1) - 1  # [taps, cgp, Np, 3]
    back = digits.transpose(2, 0, 1, 3).reshape(32, kh * kw, geo.cgp * 3)  # [Np, taps, 3 cgp]
    np.testing.assert_array_equal(back[:n, :, :c].reshape(n, -1), codes)
    assert (i[:, :, n:] == LUT_ZERO_INDEX).all()  # padding output channels add zero
    assert (back[:n, :, c:] == 0).all()  # so do the input channels padding the last triple
    # paired: a 64-channel block read as int16 words holds channel k in the low byte of word
    # k and channel 32 + k in its high byte
    codes = rng.integers(-1, 2, (100, kh * kw * c)).astype(np.int8)
    plain = ops.pack_lut_idx(codes, c, (kh, kw), 128)
    words = ops.pack_lut_idx(codes, c, (kh, kw), 128, paired=True).view(np.uint16)
    np.testing.assert_array_equal(words & 0xFF, plain.reshape(9, -1, 2, 2, 32)[..., 0, :]
                                  .reshape(words.shape))
    np.testing.assert_array_equal(words >> 8, plain.reshape(9, -1, 2, 2, 32)[..., 1, :]
                                  .reshape(words.shape))
    with pytest.raises(ValueError, match="Np % 64"):
        ops.pack_lut_idx(codes[:32], c, (kh, kw), 96, paired=True)
    with pytest.raises(ValueError, match="Np % 32"):
        ops.pack_lut_idx(codes[:5], c, (kh, kw), 8)


def test_lut_dp_split_covers_every_channel_once():
    for c in (64, 128, 192, 256, 512, 1024):
        geo = lut_dp_geometry_of(c, (3, 3))
        assert geo is not None and geo.nc * geo.chunk == c
        assert LUT_GROUP * geo.cgc + 4 * geo.qc == geo.chunk
        assert 3 * geo.cgc <= LUT_INT16_RUN  # a kernel row's lookups: one int16 run
        firsts = ([eval(geo.triple_channel("g"), {"g": g}) + i for g in range(geo.nc * geo.cgc)
                   for i in range(LUT_GROUP)]
                  + [eval(geo.quad_channel("q"), {"q": q}) + i for q in range(geo.nc * geo.qc)
                     for i in range(4)])
        assert sorted(firsts) == list(range(c))
    for c in (32, 96, 130):
        assert lut_dp_geometry_of(c, (3, 3)) is None


def test_pack_lut_dp_decodes_to_the_codes():
    rng = np.random.default_rng(1)
    n, c, kh, kw = 40, 192, 3, 3  # 64-channel chunks (192 % 128 != 0), 24 padding channels
    codes = rng.integers(-1, 2, (n, kh * kw * c)).astype(np.int8)
    wi, wv, cv = ops.pack_lut_dp(codes, c, (kh, kw), 64)
    geo = lut_dp_geometry_of(c, (kh, kw))
    assert wi.dtype == np.int16 and wv.dtype == np.int8 and cv.dtype == np.int32
    back = np.zeros((64, kh * kw, c), np.int64)
    i = wi.astype(np.int64)[..., [32 * (ch // 32) + 2 * (ch % 16) + ch % 32 // 16
                                  for ch in range(64)]]  # lanes 2m, 2m + 1: m, 16 + m
    for g in range(geo.nc * geo.cgc):
        c0 = eval(geo.triple_channel("g"), {"g": g})
        back[:, :, c0:c0 + 3] = (np.stack([i[:, g] % 3, i[:, g] // 3 % 3, i[:, g] // 9], -1)
                                 - 1).transpose(1, 0, 2)
    quads = wv.reshape(kh * kw, geo.nc * geo.qc, 64, 4).astype(np.int64)
    for q in range(geo.nc * geo.qc):
        c0 = eval(geo.quad_channel("q"), {"q": q})
        back[:, :, c0:c0 + 4] = quads[:, q].transpose(1, 0, 2)
    np.testing.assert_array_equal(back[:n].reshape(n, -1), codes)
    assert not back[n:].any()  # padding output channels: zero weights
    want = -128 * np.array([sum(int(back[m, :, eval(geo.quad_channel("q"), {"q": q}) + j].sum())
                                for q in range(geo.nc * geo.qc) for j in range(4))
                            for m in range(64)])
    np.testing.assert_array_equal(cv, want)
    with pytest.raises(ValueError, match="no split"):
        ops.pack_lut_dp(codes[:, :9 * 96], 96, (3, 3), 64)


def test_lut_dp_plan_and_source():
    """With AVX512-VNNI on znver4: 32-channel tiles of 7 pixels, int16 indices, the quads'
    weights ``Wv`` and correction ``Cv`` as arguments, and each group step's lookups followed
    by a quad's ``vpdpbusd`` (17 steps of both, then the 3 triples left alone); not past
    LUT_DP_MAX_BYTES of dot-product weights, nor without VNNI or full-rate permutes."""
    spec = x86.lut_rule().plan(make_layer("conv2d", cin=128, out=64, hw=(28, 28)), 1, AVX512,
                               {})
    assert spec.lut_dp and spec.nb == 32 and spec.mb == 7 and spec.w_dtype == "int16"
    assert spec.Kp == spec.K == 9 * 128
    src = lut_source(spec)
    assert "Wv: T.Buffer((9, 17, 256), 'int8'), Cv: T.Buffer((64,), 'int32')" in src
    steps = src[src.index("for k in range(17):"):]
    assert "permvar.hi.512" in steps and "vpdpbusd.512" in steps
    assert "for k in range(17, 20):" in src  # the 3 triples left look up alone
    for kw, ok in ((dict(cin=256, out=256, hw=(14, 14)), True),
                   (dict(cin=256, out=512, hw=(14, 14)), False),  # 0.63 MB of quad weights
                   (dict(cin=512, out=512, hw=(7, 7)), False),
                   (dict(cin=96, out=64, hw=(7, 7)), False),  # no chunk size divides 96
                   # rows of 8 (6 + 2 pixels: 1/3 padding) and 16 (6 + 6 + 6: 1/9) pixels
                   (dict(cin=64, out=64, hw=(8, 8)), False),
                   (dict(cin=64, out=64, hw=(16, 16)), True)):
        assert x86.lut_dp_applies(make_layer("conv2d", **kw), AVX512) == ok, kw
    for target in (dataclasses.replace(AVX512, features=AVX512.features - {"avx512vnni"}),
                   dataclasses.replace(AVX512, mcpu="emeraldrapids")):
        assert not x86.lut_dp_applies(make_layer("conv2d", cin=128, out=64, hw=(7, 7)),
                                      target)
    with pytest.raises(ValueError, match="lut_dp"):
        dataclasses.replace(spec, nb=64)


def test_rule_gate():
    """Chosen where each input table is read >= 9 times with >= 64 or <= 4 channels, or >= 2
    times (3x3/2) with >= 256; never for groups (FGQ), ternary activations, narrower stride-2
    3x3 or 1x1 convs, or without AVX-512BW."""
    def rule(**kw):
        return measure.select_rule(make_layer("conv2d", **kw), AVX512).name

    assert rule(cin=128, out=32) == "x86.t2_lut"
    assert rule(cin=3, out=16, k=7, stride=2, pad=3, hw=(15, 15)) == "x86.t2_lut"
    assert rule(cin=3, out=16) == "x86.t2_lut"
    assert rule(cin=64, out=16) == "x86.t2_lut"
    assert rule(cin=256, out=32, stride=2) == "x86.t2_lut"  # tables read 2.25 times, 256 ch
    assert rule(cin=128, out=32, stride=2) == "x86.t2_lut"  # and 128
    for kw in (dict(cin=32), dict(cin=96, stride=2), dict(cin=256, k=1, pad=0),
               dict(cin=128, gs=4, order="ijc")):
        assert rule(out=32, **kw) == "x86.t2_avx512vnni", kw
    # 64-channel 3x3/2 convs where the lookups share the channels with vpdpbusd (lut_dp)
    assert rule(cin=64, out=32, stride=2) == "x86.t2_lut"
    no_vnni = dataclasses.replace(AVX512, features=AVX512.features - {"avx512vnni"})
    assert measure.select_rule(make_layer("conv2d", cin=64, out=32, stride=2),
                               no_vnni).name == "x86.t2_avx2"
    assert rule(cin=128, out=32, act="ternary") == "x86.tt_popc"
    assert measure.select_rule(make_layer(cin=128), AVX512).name != "x86.t2_lut"  # linear
    no_bw = dataclasses.replace(AVX512, features=frozenset({"avx2", "avx512f", "avx512vnni"}))
    assert measure.select_rule(make_layer("conv2d", cin=128), no_bw).name != "x86.t2_lut"
    assert x86.rules()[2].name == "x86.t2_lut"  # after AMX (not on this target)
    # without full-rate 512-bit permutes (Intel: vpermw takes two cycles on one port) the stems
    # only
    intel = dataclasses.replace(AVX512, mcpu="emeraldrapids")
    for kw, lut in ((dict(cin=3, out=16), True), (dict(cin=3, out=16, k=7, stride=2, pad=3,
                                                        hw=(15, 15)), True),
                    (dict(cin=128, out=32), False), (dict(cin=256, out=32, stride=2), False)):
        want = "x86.t2_lut" if lut else "x86.t2_avx512vnni"
        assert measure.select_rule(make_layer("conv2d", **kw), intel).name == want, kw


def test_last_chunk_skips_the_padding_triple(monkeypatch):
    """128 channels: 43 triples per tap padded to 2 chunks of 22; the last chunk stops at the
    43rd (its kernel is checked against the reference in ``c128_w17_partial_tile``)."""
    from ternbench.schedules.ops import lut

    no_vnni = dataclasses.replace(AVX512, features=AVX512.features - {"avx512vnni"})
    spec = x86.lut_rule().plan(make_layer("conv2d", cin=128, out=64), 1, no_vnni, {})
    assert not spec.lut_dp
    assert "for k in range(T.min(22, 43 - cc * 22)):" in lut_source(spec)
    monkeypatch.setattr(lut, "LUT_SKIP_PADDING", False)
    assert "for k in range(22):" in lut_source(spec)


def test_plan_tiles_one_image():
    lx = make_layer("conv2d", cin=130, out=40, hw=(7, 7))
    spec = x86.lut_rule().plan(lx, 3, AVX512, {})
    assert spec.layout == "t2_lut" and spec.w_dtype == "uint8" and spec.k_order == "ijc"
    assert spec.mb == 7 and spec.m_task == 1  # one tile per output row
    assert spec.nb == 64 and spec.Np == 64  # 40 channels: two 32-lane blocks
    assert spec.Kp == 9 * 44 * 3  # 130 channels -> 44 triples per tap (2 chunks of 22)
    src = lut_source(spec)
    assert "llvm.x86.avx512.permvar.hi.512" in src
    # the second vector holds channels 32..39: a 16-lane vector, 8 of its lanes stored
    assert "ot[T.ramp(0, 1, 16)] = " in src and "for n in range(8):" in src
    assert ", 32 + n] = ot[n]" in src and "T.ramp(32, 1, 32)" not in src
    assert " < 7:" not in src  # whole rows: no pixel guards
    # tiles of one output row: 7 pixels by default, or 8 where that pads the row less; the
    # extra pixels of a row's partial last tile are not stored
    for w, mb in ((4, 4), (28, 7), (32, 8), (17, 7), (112, 7)):
        lx = make_layer("conv2d", cin=130, hw=(3, w))
        assert x86.lut_rule().plan(lx, 1, AVX512, {}).mb == mb
    src = lut_source(x86.lut_rule().plan(make_layer("conv2d", cin=130, hw=(3, 17)), 1,
                                         AVX512, {}))
    assert "if t % 3 * 7 + 6 < 17:" in src
    with pytest.raises(ValueError, match="one-group"):
        ops.plan_gemm(make_layer("conv2d", cin=8, gs=4), 1, "t2_lut", nb=32, mb_max=4,
                      rows_per_task=1)


def _needs_bw() -> None:
    require_x86_features({"avx512f", "avx512bw"}, "t2_lut needs AVX-512BW")


CASES = [
    # C % 3 == 1, N not a multiple of 32 (partial block), batch 2
    ("c130_n40_b2", dict(cin=130, out=40, hw=(6, 6)), 2),
    # 86 triples per tap: two int16 chunks per tap, C % 3 == 2
    ("c257_chunks", dict(cin=257, out=64, hw=(5, 5)), 1),
    ("stem_7x7_s2", dict(cin=3, out=32, k=7, stride=2, pad=3, hw=(15, 15)), 1),
    # 17-wide rows: tiles of 7 + 7 + 3 pixels, the last partial (batch 2: the image offset)
    ("c128_w17_partial_tile", dict(cin=128, out=32, hw=(4, 17)), 2),
    ("c128_7x7", dict(cin=128, out=64, hw=(7, 7)), 1),
    # cases the rule does not choose, which the benchmark times beside the VNNI kernel
    ("c8_s2", dict(cin=8, out=32, stride=2, hw=(9, 9)), 2),
    ("c16_1x1_nopad", dict(cin=16, out=32, k=1, pad=0, hw=(5, 5)), 1),
    ("c2_nopad", dict(cin=2, out=16, pad=0, hw=(6, 6)), 1),
    # dot-product channels (lut_dp, with AVX512-VNNI on znver4; plain lookups elsewhere): two
    # 128-channel chunks at stride 2, a partial channel block, batch 2; 64-channel chunks 1x1/2
    ("dp_c256_s2_n40_b2", dict(cin=256, out=40, stride=2, hw=(9, 9)), 2),
    ("dp_c64_1x1_s2", dict(cin=64, out=32, k=1, pad=0, stride=2, hw=(8, 8)), 1),
]


@pytest.mark.tvm
@pytest.mark.parametrize(("label", "kw", "batch"), CASES, ids=[c[0] for c in CASES])
def test_lut_kernel_matches_reference(label, kw, batch):
    from ternbench.schedules import tuning

    _needs_bw()
    lx = make_layer("conv2d", **kw, name=label)
    prep = tuning.prepare_rule(x86.lut_rule(where_chosen=False), lx, batch, x86_info())
    assert prep.kernel.impl == "tvm_t2_lut" and prep.kernel.spec.layout == "t2_lut"
    assert prep.kernel.spec.lut_dp == x86.lut_dp_applies(lx, x86_info())
    if "partial" in label:
        assert 17 % prep.kernel.spec.mb
    assert np.isfinite(prep.max_abs_err)  # prepare_rule raised KernelMismatchError otherwise


@pytest.mark.tvm
@pytest.mark.parametrize("cin", [84, 85])
def test_lut_kernel_is_exact_at_the_int16_bound(cin):
    """Saturated activations and all-(+1) / all-(-1) weights: runs of 3 taps x 28 triples = 84
    lookups of +-381 (cin 84: one chunk per kernel row), stored biased by 384 (3..765: up to
    64260 of the 65535 an unsigned int16 holds, and the low end, all 3s); cin 85 splits each row
    into 2 chunks."""
    _needs_bw()
    tinfo = x86_info()
    for sign in (1, -1):
        lx = make_layer("conv2d", cin=cin, out=32, hw=(3, 3), name=f"bound{cin}")
        lx = dataclasses.replace(lx, codes=np.full_like(lx.codes, sign),
                                 scales=np.ones_like(lx.scales), bias=None)
        kern = x86.lut_rule().build(lx, 1, tinfo)
        for level in (1e3, -1e3):
            x = torch.full((1, cin, 3, 3), level)
            prep = measure.prepare_kernel(kern, lx, tinfo, x)
            a = prep.a.astype(np.int64)
            assert abs(a).max() == lx.act_qmax
            centre = float(a[0].sum() * sign) * lx.act_scale  # all 9 taps in the image
            assert prep.out.numpy()[4, 0] == pytest.approx(centre, rel=1e-6)


@pytest.mark.tvm
def test_lut_tiles_stay_in_registers():
    """One heap workspace (the per-image tables); the register tiles are stack buffers that
    LLVM promotes (a "local" buffer would be a heap workspace, each lookup a store + reload)."""
    _needs_bw()
    kern = x86.lut_rule().build(make_layer("conv2d", cin=128, out=64, hw=(4, 4)), 1,
                                x86_info())
    ll = kern.module.inspect_source("ll")
    # with dot-product channels also their inputs + 128 (xu)
    workspaces = 2 if kern.spec.lut_dp else 1
    assert ll.count("load ptr, ptr @__TVMBackendAllocWorkspace") == workspaces
    asm = kern.module.inspect_source("asm")
    assert "vpermw" in asm


@pytest.mark.tvm
@pytest.mark.parametrize("out", [64, 72])
def test_lut_kernel_streams_large_outputs(stream_everything, out):
    """Large outputs are written with ``vmovntps``, and the results stay exact: with 72
    channels every other row starts off a 64-byte boundary, where the helper stores plainly
    (a non-temporal store there would fault)."""
    _needs_bw()
    tinfo = x86_info()
    lx = make_layer("conv2d", cin=64, out=out, hw=(5, 7), name=f"stream{out}")
    kern = x86.lut_rule().build(lx, 2, tinfo)
    assert "pragma_import_llvm" in lut_source(kern.spec)
    assert "vmovntps" in kern.module.inspect_source("asm")
    prep = measure.prepare_kernel(kern, lx, tinfo)  # raises on a mismatch
    assert np.isfinite(prep.max_abs_err)


def test_only_large_outputs_stream():
    """The batch-1 ResNet-18 convs keep plain stores (their outputs feed the next layer from
    the caches); the same convs at batch 64 stream."""
    from ternbench.bench.kernels.layers import synthetic_layer
    from ternbench.bench.kernels.shapes import resnet18_shapes
    from ternbench.schedules.ops.lut import streams_output

    for s in resnet18_shapes():
        if s.op != "conv2d" or s.k != 3:
            continue
        lx = synthetic_layer(s, "ternary", "int8")
        one, many = (x86.lut_rule(where_chosen=False).plan(lx, b, AVX512, {}) for b in (1, 64))
        assert not streams_output(one) and "tb_stream" not in lut_source(one)
        assert streams_output(many) and "tb_stream_f32x32" in lut_source(many)


@pytest.mark.tvm
def test_streaming_kernels_share_one_module(stream_everything):
    """A whole-model module holds many kernels, each importing the store helper: its
    ``linkonce_odr`` definitions link once, and every call is inlined."""
    import tvm
    from ternbench.schedules.ops.lut import lut_compute
    from ternbench.schedules.ops.ttlut import ttlut_compute

    _needs_bw()
    tinfo = x86_info()
    specs = [x86.lut_rule().plan(make_layer("conv2d", cin=c, out=64, hw=(4, 4)), 1, tinfo, {})
             for c in (64, 128)]
    funcs = {f"k{i}": lut_compute(s).with_attr("global_symbol", f"k{i}")
             for i, s in enumerate(specs)}
    if {"avx512vbmi"} <= tinfo.features:
        tt = x86.tt_lut_rule().plan(make_layer("conv2d", cin=64, out=64, hw=(4, 4),
                                               act="ternary"), 1, tinfo, {})
        funcs["k2"] = ttlut_compute(tt).with_attr("global_symbol", "k2")
    mod = _tvm.compile_prim_module(tvm.IRModule(funcs), tinfo).jit()
    ll = mod.inspect_source("ll")  # linked once (a second definition would not link), inlined
    assert "tb_stream_f32x32.exit" in ll and "call void @tb_stream" not in ll
    assert "vmovntps" in mod.inspect_source("asm")
    for name in funcs:
        assert mod[name] is not None


LOOKUP_Q8_CASES = [  # (label, act, layer kwargs, batch, clip, out_scale: None = the ref's range)
    ("q8_c130_n40_b2", "int", dict(cin=130, out=40, hw=(6, 6)), 2, (-128, 127), None),
    ("q8_relu_w17", "int", dict(cin=64, out=64, hw=(4, 17)), 2, (0, 127), 0.05),
    ("q8_tt_codes_n72", "ternary", dict(cin=64, out=72, hw=(5, 7)), 1, (-1, 1), None),
    ("q8_tt_rtn_s2", "ternary", dict(cin=128, out=64, hw=(9, 20), stride=2, act_offset=-0.3,
                                     w_offset=True), 2, (-128, 127), None),
]


@pytest.mark.tvm
@pytest.mark.parametrize(("label", "act", "kw", "batch", "clip", "scale"), LOOKUP_Q8_CASES,
                         ids=[c[0] for c in LOOKUP_Q8_CASES])
def test_lookup_int8_outputs_match_reference(label, act, kw, batch, clip, scale):
    """The lookup kernels' int8 outputs (``out_clip``, as the AMX ones): whole and partial
    channel blocks, a partial pixel tile, the ReLU clip, ternary codes and RTN's offset terms;
    the codes are the reference divided by the output scale, rounded half to even and clipped
    (``prepare_kernel`` raises otherwise), and the stores are plain int8 vectors."""
    tinfo = x86_info()
    if act == "ternary":
        require_x86_features({"avx512bw", "avx512vbmi"}, "tt_lut needs AVX512-VBMI")
        rule = x86.tt_lut_rule(where_chosen=False)
    else:
        _needs_bw()
        rule = x86.lut_rule(where_chosen=False)
    lx = make_layer("conv2d", act=act, name=label, seed=len(label), **kw)
    kern = rule.build(lx, batch, tinfo, out_clip=clip)
    assert kern.spec.out_clip == clip and kern.spec.out_dtype == "int8"
    src = (lut_source if act == "int" else ttlut_source)(kern.spec)
    assert "'int8')):" in src and "T.nearbyint" in src and "tb_stream" not in src
    assert "vpmovdb" in kern.module.inspect_source("asm")
    prep = measure.prepare_kernel(kern, lx, tinfo, out_scale=scale)
    assert_int8_codes(prep.out.numpy(), clip, scale is not None, both_ends=True)
