"""The ``tt_lut`` byte-table lookup conv (AVX512-VBMI ``vpermi2b``, ternary x ternary): chunking,
index packing, the table, and exactness against the integer reference at the int8 run bound.
(Reference cases on every path and the rule gate are in ``test_schedules.py``.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import require_x86_features, x86_info
from ternbench.schedules import measure, ops, x86
from ternbench.schedules.ops.ttlut import (
    TT_LUT_BIAS,
    TT_LUT_GROUP,
    TT_LUT_RUN,
    TT_LUT_ZERO,
    ttlut_geometry_of,
    ttlut_source,
)
from test_schedules import make_layer


def _needs_vbmi() -> None:
    require_x86_features({"avx512bw", "avx512vbmi"}, "tt_lut needs AVX512-VBMI")


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (7, 7), (1, 5)])
def test_geometry_keeps_int8_runs_exact(kernel):
    kh, kw = kernel
    for c in range(1, 700):
        geo = ttlut_geometry_of(c, kernel)
        assert geo.cgp * TT_LUT_GROUP >= c and geo.cgp == geo.nc * geo.cgc
        # a run: tpc kernel rows x kw taps x cgc quads, 31 lookups of |entry| <= 4 at most
        assert geo.tpc * kw * geo.cgc <= TT_LUT_RUN
        assert geo.nt * geo.tpc == kh and (geo.tpc == 1 or geo.nc == 1)
        assert geo.cgp - geo.cg < geo.nc  # never a whole padding quad per chunk
    # biased entries 0..2 * TT_LUT_BIAS add up in unsigned bytes (|entry| <= TT_LUT_GROUP)
    assert TT_LUT_BIAS >= TT_LUT_GROUP and TT_LUT_RUN * 2 * TT_LUT_BIAS <= np.iinfo(np.uint8).max
    with pytest.raises(ValueError, match="kernel width 32"):
        ttlut_geometry_of(8, (1, 32))


def test_pack_quads_decode_to_the_codes():
    rng = np.random.default_rng(0)
    n, c, kh, kw = 5, 7, 3, 3
    codes = rng.integers(-1, 2, (n, kh * kw * c)).astype(np.int8)  # (kh, kw, C) order
    idx = ops.pack_lut_idx(codes, c, (kh, kw), 64, group=4)
    geo = ttlut_geometry_of(c, (kh, kw))
    assert idx.shape == (kh * kw, geo.cgp, 64) and idx.dtype == np.int8
    # lanes 2m, 2m + 1 hold channels m, 32 + m
    i = idx.astype(np.int64)[..., [2 * (ch % 32) + ch // 32 for ch in range(64)]]
    digits = np.stack([i % 3, i // 3 % 3, i // 9 % 3, i // 27], -1) - 1  # [taps, cgp, Np, 4]
    back = digits.transpose(2, 0, 1, 3).reshape(64, kh * kw, geo.cgp * 4)
    np.testing.assert_array_equal(back[:n, :, :c].reshape(n, -1), codes)
    assert (i[:, :, n:] == TT_LUT_ZERO).all()  # padding output channels add zero
    assert (back[:n, :, c:] == 0).all()  # so do the input channels padding the last quad


@pytest.mark.tvm
@pytest.mark.parametrize("cin", [120, 128])
def test_ttlut_kernel_is_exact_at_the_int8_bound(cin):
    """All activations +1 or -1 and all weights +1 or -1: every lookup is +-4, stored biased by 4
    (0 or 8; cin 120: runs of 3 taps x 10 quads = 30 lookups, up to 240 of the 255 a byte holds;
    cin 128: 3 x 8); the sums (up to 9 x 128) are widened to int16 per run."""
    _needs_vbmi()
    tinfo = x86_info()
    for sign in (1, -1):
        lx = make_layer("conv2d", cin=cin, out=128, hw=(3, 3), act="ternary",
                        name=f"bound{cin}")
        lx = dataclasses.replace(lx, codes=np.full_like(lx.codes, sign),
                                 scales=np.ones_like(lx.scales), bias=None)
        kern = x86.tt_lut_rule().build(lx, 1, tinfo)
        assert kern.spec.layout == "tt_lut"
        for level in (1e3, -1e3):
            x = torch.full((1, cin, 3, 3), level)
            prep = measure.prepare_kernel(kern, lx, tinfo, x)
            centre = float(prep.a[0].astype(np.int64).sum() * sign) * lx.act_scale
            assert abs(prep.a).min() == 1  # every activation saturated
            assert prep.out.numpy()[4, 0] == pytest.approx(centre, rel=1e-6)


@pytest.mark.tvm
def test_ttlut_kernel_looks_up_with_vpermi2b():
    """The lookups are vpermi2b / vpermt2b on zmm (the same instruction with the operands
    swapped), and the register tile stays in registers: two heap workspaces only (the 81 x 128
    table and the per-pixel codes)."""
    _needs_vbmi()
    kern = x86.tt_lut_rule().build(
        make_layer("conv2d", cin=128, out=128, hw=(4, 4), act="ternary"), 1, x86_info())
    asm = kern.module.inspect_source("asm")
    assert "vpermi2b\t%zmm" in asm or "vpermt2b\t%zmm" in asm
    ll = kern.module.inspect_source("ll")
    assert ll.count("load ptr, ptr @__TVMBackendAllocWorkspace") == 2


@pytest.mark.tvm
@pytest.mark.parametrize(("kw", "params", "mb"), [
    (dict(cin=128, out=128, k=1, pad=0, stride=2, hw=(7, 9)), None, 5),  # 1x1: no shared rows
    (dict(cin=28, out=64, k=5, pad=2, hw=(6, 11)), None, 7),  # runs of 5 taps x 4 quads
    (dict(cin=64, out=192, hw=(6, 10), stride=2), {"nb": 64, "mb": 4, "rows": 1}, 5),
    (dict(cin=40, out=64, hw=(5, 20)), {"nb": 64, "mb": 14, "rows": 1}, 14),  # 14 + 6 per row
    (dict(cin=64, out=48, hw=(6, 9)), None, 7),  # 48 of 64 lanes: stored through `ot`
])
def test_ttlut_kernel_matches_the_reference_off_its_gate(kw, params, mb):
    """Shapes the rule does not choose, or tiles it does not default to: the row tiles still
    read the right columns (the reference check in prepare_kernel)."""
    _needs_vbmi()
    tinfo = x86_info()
    lx = make_layer("conv2d", act="ternary", name="offgate", **kw)
    kern = x86.tt_lut_rule(where_chosen=False).build(lx, 2, tinfo, params)
    assert (kern.spec.layout, kern.spec.mb) == ("tt_lut", mb)
    prep = measure.prepare_kernel(kern, lx, tinfo)
    assert np.isfinite(prep.max_abs_err)


@pytest.mark.tvm
@pytest.mark.parametrize("kw", [
    dict(cin=128, out=128, hw=(28, 28), stride=2, act_offset=0.3, w_offset=True),  # 2 tiles/row
    dict(cin=64, out=96, hw=(7, 16), act_offset=-0.2, w_offset=True),  # partial block and tile
    dict(cin=64, out=112, hw=(6, 9), act_offset=0.2, w_offset=True),  # 48 lanes of a block
    dict(cin=40, out=64, hw=(5, 11), act_offset=0.25),  # border term only
    dict(cin=64, out=64, hw=(6, 15), stride=2, w_offset=True),  # window sums only
    dict(cin=64, out=64, hw=(5, 8), pad=0, act_offset=0.4, w_offset=True),  # offset in bias
    dict(cin=3, out=64, hw=(9, 9), k=7, pad=3, stride=2, act_offset=0.1, w_offset=True),
])
def test_ttlut_kernel_adds_rtn_offsets(kw):
    """RTN's offsets: the weight offset times each window's sum of activation codes, and the
    activation offset times the weights of the taps inside the image (by border class, or
    folded into the bias without padding), checked against the reference, as the popcount
    kernel adds them (same spec flags, same arguments)."""
    _needs_vbmi()
    tinfo = x86_info()
    lx = make_layer("conv2d", act="ternary", name="rtn_offsets", **kw)
    chosen = x86.full_rate_permutes(tinfo) or lx.in_channels <= 4  # Intel: stems only
    assert (measure.select_rule(lx, tinfo).name == "x86.tt_lut") == chosen
    kern = x86.tt_lut_rule().build(lx, 2, tinfo)
    spec = kern.spec
    assert spec.w_off == bool(kw.get("w_offset")) and spec.affine
    assert spec.border == (bool(kw.get("act_offset")) and kw.get("pad", 1) != 0)
    popc = ops.plan_gemm(lx, 2, "tt_planes", nb=8, mb_max=4, rows_per_task=64)
    assert (popc.w_off, popc.border) == (spec.w_off, spec.border)
    prep = measure.prepare_kernel(kern, lx, tinfo)  # raises on a mismatch
    assert len(prep.args) == 4 + spec.w_off + 3 * spec.border  # X, Wi, [Bw], [Rc, Cc, Tb], S, bias


@pytest.mark.tvm
def test_ttlut_kernel_streams_large_outputs(stream_everything):
    """Non-temporal stores with RTN's offsets in the epilogue, 72 channels (rows off a 64-byte
    boundary store plainly): still exact."""
    _needs_vbmi()
    tinfo = x86_info()
    lx = make_layer("conv2d", cin=64, out=72, hw=(6, 9), act="ternary", act_offset=0.2,
                    w_offset=True, name="stream_tt")
    kern = x86.tt_lut_rule().build(lx, 2, tinfo)
    assert "tb_stream_f32x64" in ttlut_source(kern.spec)
    assert "vmovntps" in kern.module.inspect_source("asm")
    prep = measure.prepare_kernel(kern, lx, tinfo)  # raises on a mismatch
    assert np.isfinite(prep.max_abs_err)
