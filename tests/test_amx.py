"""The ``t2_amx`` conv (AMX ``tdpbssd`` on 2-bit ternary weights decoded per call): the tile
packing, the rule gate, and exactness against the layer reference on every path (strides,
1x1, partial row segments and row pairs, a partial channel block, batches)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import assert_int8_codes, require_x86_features, x86_info
from ternbench.schedules import _tvm, measure, x86
from ternbench.schedules.ops import rules
from ternbench.schedules.ops.amx import (
    AMX_K,
    AMX_N,
    amx_geometry,
    amx_source,
    bf16_pieces,
    bf16_value,
    pack_amx_tiles,
    pack_bf16_tiles,
)
from test_schedules import make_layer


def _needs_amx(unit: str = "amx-int8", what: str = "t2_amx / tt_amx need AMX-INT8") -> None:
    require_x86_features({"amx-tile", unit}, what)
    if not _tvm.enable_amx():
        pytest.skip("Linux refused this process the AMX tile state")


def _unpack(tiles: np.ndarray, n: int, k: int) -> np.ndarray:
    """Codes [n, k] back from the packed tiles: element e = 256 s + i of a tile is bits 2 s of
    byte i; e = 64 r + 4 j + q is output channel j, reduction index 4 r + q."""
    kc, nblk, _ = tiles.shape
    e = np.stack([(tiles >> (2 * s)) & 3 for s in range(4)], axis=2).reshape(kc, nblk, 1024)
    u = e.reshape(kc, nblk, 16, AMX_N, 4).transpose(1, 3, 0, 2, 4).reshape(nblk * AMX_N, kc * 64)
    return u[:n, :k].astype(np.int8) - 1


def test_tile_packing_round_trips():
    rng = np.random.default_rng(0)
    for n, c, kernel in ((48, 64, (3, 3)), (16, 128, (1, 1)), (40, 64, (1, 3))):
        codes = rng.integers(-1, 2, (n, kernel[0] * kernel[1] * c)).astype(np.int8)
        n_pad = -(-n // 32) * 32
        tiles = pack_amx_tiles(codes, c, kernel, n_pad)
        assert tiles.shape == (kernel[0] * kernel[1] * c // AMX_K, n_pad // AMX_N, 256)
        np.testing.assert_array_equal(_unpack(tiles, n, codes.shape[1]), codes)
        pad = _unpack(tiles, n_pad, codes.shape[1])[n:]
        assert not pad.any()  # padding channels: zero weights
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_amx_tiles(np.zeros((16, 9 * 32), np.int8), 32, (3, 3), 16)


def test_rule_gate():
    """AMX-INT8 (and the tile state granted) with one-group int8-activation convs of 64k input
    channels; never for FGQ groups, ternary activations, linears, other channel counts, or a
    CPU (or forced ISA level) without AMX."""
    base = x86_info()
    amx = dataclasses.replace(base, features=base.features | {"amx-tile", "amx-int8"})
    granted = _tvm.enable_amx() if _tvm.is_x86_host() else False

    def applies(target=amx, **kw):
        return x86.amx_rule(where_chosen=False).applies(make_layer("conv2d", **kw), target)

    assert applies(cin=64, out=32) == granted
    assert applies(cin=128, out=16, stride=2) == granted
    assert applies(cin=256, out=64, k=1, pad=0, stride=2) == granted
    for kw in (dict(cin=96), dict(cin=3), dict(cin=128, gs=4, order="ijc"),
               dict(cin=128, act="ternary")):
        assert not applies(out=32, **kw), kw
    assert not x86.amx_rule().applies(make_layer(cin=128), amx)  # linear
    no_amx = dataclasses.replace(base, features=base.features - {"amx-tile", "amx-int8"})
    assert not applies(no_amx, cin=64, out=32)
    # chosen wherever it runs (1x1 convs too, since ae8ba10), first of all rules after the
    # grouped convs' bf16 rule
    assert [r.name for r in x86.rules()[:2]] == ["x86.bf16_amx", "x86.t2_amx"]
    one = make_layer("conv2d", cin=64, out=32, k=1, pad=0)
    assert x86.amx_rule(where_chosen=False).applies(one, amx) == granted
    assert x86.amx_rule().applies(one, amx) == granted
    if granted:
        assert measure.select_rule(make_layer("conv2d", cin=64, out=32), amx).name == \
            "x86.t2_amx"


def test_forced_lower_isa_drops_amx(monkeypatch):
    pytest.importorskip("tvm")
    if not _tvm.is_x86_host() or "avx2" not in _tvm.host_isa_levels():
        pytest.skip("needs an x86 CPU with AVX2")
    monkeypatch.setenv(_tvm.ISA_ENV, "avx2")
    assert not {"amx-tile", "amx-int8"} & x86_info().features


def test_source_names_every_tile_register():
    lx = make_layer("conv2d", cin=64, out=32, hw=(5, 7))
    spec = x86.amx_rule().plan(lx, 1, x86_info(), {})
    src = amx_source(spec)
    for name in ("ldtilecfg", "tileloadd64", "tdpbssd", "tilestored64", "tilerelease"):
        assert f"llvm.x86.{name}" in src
    assert src.count("llvm.x86.tdpbssd") == 4 and src.count("tilezero") == 4
    with pytest.raises(ValueError, match="multiple of 64"):
        x86.amx_rule().plan(make_layer("conv2d", cin=96, out=32), 1, x86_info(), {})


def test_tile_order_follows_the_weights():
    """The channel block runs innermost, image by image, with the weights decoded once per call
    on large images with small weights (64x56x56, batch > 1); the pixels of the whole batch,
    one task per block decoding it into ``wl``, where the decoded weights outweigh twice the
    padded image (512x7x7) and at batch 1."""
    def source(**kw) -> str:
        spec = x86.amx_rule().plan(make_layer("conv2d", **kw), 4, x86_info(), {})
        return amx_source(spec)

    small = source(cin=64, out=64, hw=(56, 56))
    assert "Wd = T.alloc_buffer" in small and "wl = " not in small
    assert "Wd[(dy * 3 + dx) * 1 + q, ((t) % 2) * 2 + 0, 0]" in small  # 2 blocks
    assert "Xp = T.alloc_buffer((1, " in small  # one image at a time
    large = source(cin=512, out=512, hw=(7, 7))
    assert "wl = T.alloc_buffer((72, 2, 1024)" in large and "Wd = " not in large
    assert "Xp = T.alloc_buffer((4, " in large  # the whole batch
    # batch > 1, pixels inner: the pipelined order (the last chunk's products outside the loop)
    assert "for kk in range(71):" in large and large.count("llvm.x86.tdpbssd") == 8
    assert small.count("llvm.x86.tdpbssd") == 4  # image by image: loads, then products
    assert "for p in T.parallel(16):" in large  # one task per block, each decoding it once
    # one image: pixels inner whatever the weights, one task per block
    one = amx_source(x86.amx_rule().plan(make_layer("conv2d", cin=64, out=64, hw=(56, 56)), 1,
                                         x86_info(), {}))
    assert "wl = T.alloc_buffer((9, 2, 1024)" in one and "for p in T.parallel(2):" in one


def test_large_batches_go_in_chunks_that_fit_the_l2(monkeypatch):
    """Pixels inner, the batch runs in chunks of images whose padded copies fit in
    ``AMX_CHUNK_BYTES`` (a divisor of the batch), every block over one chunk, then the next."""
    import ternbench.schedules.ops.amx as amx_mod

    lx = make_layer("conv2d", cin=512, out=64, hw=(7, 7))
    spec = x86.amx_rule().plan(lx, 6, x86_info(), {})
    copy = amx_geometry(spec).copy_pixels * 512
    monkeypatch.setattr(amx_mod, "AMX_CHUNK_BYTES", 2 * copy + 1)  # 2 of 6 images fit
    src = amx_source(spec)
    # 2 tiles per image, 2 blocks: 4 tiles per block and chunk; image = chunk * 2 + ...
    assert "(t) // 4 % 2" in src and "(t) // 8 * 2 + (t) // 2 % 2" in src
    monkeypatch.setattr(amx_mod, "AMX_CHUNK_BYTES", 4 * copy)  # 4 fit, but 4 does not divide 6
    assert "(t) // 12 * 3 + (t) // 2 % 3" in amx_source(spec)


@pytest.mark.tvm
def test_batch_chunks_match_reference(monkeypatch):
    """Several chunks, each block decoded again by its task in every chunk, and the pipelined
    order: exact against the reference."""
    import ternbench.schedules.ops.amx as amx_mod

    _needs_amx()
    tinfo = x86_info()
    monkeypatch.setattr(amx_mod, "AMX_CHUNK_BYTES", 1)  # one image per chunk
    monkeypatch.setattr(rules, "_CACHE", {})  # these kernels stay out of the shared cache
    for act in ("int", "ternary"):
        lx = make_layer("conv2d", cin=256, out=64, hw=(6, 6), act=act, name=f"chunks_{act}")
        rule = x86.amx_rule() if act == "int" else x86.tt_amx_rule()
        kern = rule.build(lx, 5, tinfo)
        assert "for kk in range(" in amx_source(kern.spec)
        measure.prepare_kernel(kern, lx, tinfo)  # raises on any mismatch


@pytest.mark.tvm
def test_batch_one_decodes_inside_the_first_tile_or_up_front(monkeypatch):
    """Batch 1: a block of at most ``AMX_INLINE_DECODE_TILES`` register tiles decodes each
    chunk's B tiles in its first tile's chunk loop, a larger one all of them before its first
    product; both exact against the reference (int8 and ternary activations)."""
    import ternbench.schedules.ops.amx as amx_mod

    _needs_amx()
    tinfo = x86_info()
    monkeypatch.setattr(rules, "_CACHE", {})  # these kernels stay out of the shared cache
    for act in ("int", "ternary"):
        lx = make_layer("conv2d", cin=128, out=64, hw=(7, 7), act=act, name=f"dec_{act}")
        rule = x86.amx_rule() if act == "int" else x86.tt_amx_rule()
        for tiles, inline in ((16, True), (1, False)):  # 2 tiles per block (flat, 7 x 9)
            monkeypatch.setattr(amx_mod, "AMX_INLINE_DECODE_TILES", tiles)
            rules._CACHE.clear()
            kern = rule.build(lx, 1, tinfo)
            src = amx_source(kern.spec)
            assert ("Wp[(dy * 3 + dx) * 2 + q," in src) is inline
            assert ("for k, j, s in T.grid(18, 2, 4):" in src) is not inline
            measure.prepare_kernel(kern, lx, tinfo)  # raises on any mismatch


def test_geometry_flat_and_row_tiles():
    """Stride-1 convs whose padded row is narrower than its 16-pixel segments take flat tiles
    (32 consecutive padded-width pixels); the others 2 rows x 16 pixels (or a shorter row)."""
    def geo(**kw):
        return amx_geometry(x86.amx_rule().plan(make_layer("conv2d", **kw), 1, x86_info(), {}))

    g = geo(cin=64, out=64, hw=(56, 56))  # 58 < 64: flat, 56 x 58 indices in 102 tiles
    assert g.flat and g.wp == 58 and g.tiles == -(-56 * 58 // 32) and g.rows == 16
    assert g.hp * g.wp >= g.tiles * 32 + 2 * 58 + 2  # the last tile's reads stay inside
    g = geo(cin=64, out=64, hw=(14, 14))  # 16 = 16: rows
    assert not g.flat and (g.segs, g.pairs, g.rows) == (1, 7, 14)
    g = geo(cin=64, out=64, hw=(14, 14), stride=2)  # 4 phase planes of 8 x 8: 7 x 8 indices
    assert g.flat and (g.qh, g.qw, g.wp, g.tiles) == (2, 2, 8, 2)
    assert g.copy_pixels == 4 * g.hp * 8 and g.hp * 8 >= 2 * 32 + 8 + 1
    g = geo(cin=64, out=64, hw=(32, 32), stride=2)  # 16 = 16: rows of a 3x3/2
    assert not g.flat and g.rows == 16 and (g.qh, g.qw) == (1, 1)


def test_tt_amx_rule_gate():
    """``tt_amx``: the same convs with ternary activations (RTN's offsets included), chosen
    where wider than one tap and first of the ternary-activation rules; never for int8
    activations."""
    base = x86_info()
    amx = dataclasses.replace(base, features=base.features | {"amx-tile", "amx-int8"})
    granted = _tvm.enable_amx() if _tvm.is_x86_host() else False
    rule = x86.tt_amx_rule(where_chosen=False)
    tt = dict(act="ternary", out=32)
    assert rule.applies(make_layer("conv2d", cin=64, **tt), amx) == granted
    assert rule.applies(make_layer("conv2d", cin=128, act_offset=0.2, w_offset=True, **tt),
                        amx) == granted
    one = make_layer("conv2d", cin=64, k=1, pad=0, **tt)
    assert rule.applies(one, amx) == granted and not x86.tt_amx_rule().applies(one, amx)
    for kw in (dict(cin=96), dict(cin=3), dict(cin=128, gs=4, order="ijc")):
        assert not rule.applies(make_layer("conv2d", **tt, **kw), amx), kw
    assert not rule.applies(make_layer("conv2d", cin=64, out=32), amx)  # int8 activations
    names = [r.name for r in x86.rules()]
    assert names.index("x86.tt_amx") < names.index("x86.tt_lut")
    if granted:
        assert measure.select_rule(make_layer("conv2d", cin=64, **tt), amx).name == "x86.tt_amx"


AMX_CASES = [
    ("c64_n32_3x3", dict(cin=64, out=32, hw=(5, 7)), 1),
    ("c64_n48_3x3_b3", dict(cin=64, out=48, hw=(6, 9)), 3),  # partial channel block
    ("c128_n64_s2", dict(cin=128, out=64, hw=(9, 20), stride=2), 2),  # odd rows, 4 planes
    ("c64_n32_rows_2segs", dict(cin=64, out=32, hw=(5, 32)), 1),  # row tiles, 2 segments
    ("c64_n64_1x1_s2", dict(cin=64, out=64, hw=(17, 18), k=1, pad=0, stride=2), 1),
    ("c192_n32_w35", dict(cin=192, out=32, hw=(3, 35)), 2),  # a row of 3 segments
    ("c64_n32_7x7_s2", dict(cin=64, out=32, hw=(11, 11), k=7, pad=3, stride=2), 1),
    ("c64_n64_w33", dict(cin=64, out=64, hw=(20, 33)), 1),
    ("c64_n32_rows14", dict(cin=64, out=32, hw=(14, 14)), 2),  # row tiles of 14 rows
    ("c64_n32_s2_planes", dict(cin=64, out=32, hw=(15, 13), stride=2), 1),  # odd sizes, 4 planes
    ("c256_n64_s2_b3", dict(cin=256, out=64, hw=(14, 14), stride=2), 3),  # planes, pixels inner
]


@pytest.mark.tvm
@pytest.mark.parametrize(("label", "kw", "batch"), AMX_CASES, ids=[c[0] for c in AMX_CASES])
def test_amx_kernel_matches_reference(label, kw, batch):
    """Exact against the layer reference (``prepare_kernel`` raises on a mismatch); the
    sums are int32 tiles, so no run bound applies."""
    _needs_amx()
    tinfo = x86_info()
    lx = make_layer("conv2d", name=label, seed=len(label), **kw)
    kern = x86.amx_rule().build(lx, batch, tinfo)
    assert "tdpbssd" in kern.module.inspect_source("asm")
    prep = measure.prepare_kernel(kern, lx, tinfo)
    assert np.isfinite(prep.max_abs_err)


TT_AMX_CASES = [
    ("tt_c64_n32", dict(cin=64, out=32, hw=(5, 7)), 1),  # STTN-like: no offsets, flat tiles
    ("tt_rtn_c64_n48", dict(cin=64, out=48, hw=(6, 9), act_offset=0.2, w_offset=True), 2),
    ("tt_rtn_c128_s2", dict(cin=128, out=64, hw=(9, 20), stride=2, act_offset=-0.3,
                            w_offset=True), 2),  # border and window terms
    ("tt_rtn_c256_b3", dict(cin=256, out=96, hw=(6, 9), act_offset=0.2, w_offset=True), 3),
    ("tt_border_only", dict(cin=64, out=64, hw=(7, 7), act_offset=0.25), 1),
    ("tt_rtn_s2_planes", dict(cin=128, out=64, hw=(14, 14), stride=2, act_offset=0.2,
                              w_offset=True), 2),  # phase planes, offsets
    ("tt_rtn_rows14", dict(cin=64, out=32, hw=(14, 14), act_offset=0.1, w_offset=True), 1),
    ("tt_rtn_nopad", dict(cin=64, out=64, hw=(5, 8), pad=0, act_offset=0.4, w_offset=True), 1),
    ("tt_rtn_1x1_s2", dict(cin=64, out=64, hw=(17, 18), k=1, pad=0, stride=2, act_offset=0.1,
                           w_offset=True), 1),
]


@pytest.mark.tvm
@pytest.mark.parametrize(("label", "kw", "batch"), TT_AMX_CASES, ids=[c[0] for c in TT_AMX_CASES])
def test_tt_amx_kernel_matches_reference(label, kw, batch):
    """``tt_amx`` against the layer reference (``prepare_kernel`` raises on a mismatch): exact
    without offsets; RTN's window-sum and border terms (``w_off`` / ``border``) in the
    epilogue, which rounds like a float GEMM. The 256-channel case runs pixels inner (each task
    decoding its blocks), the batch inside the tile loop."""
    _needs_amx()
    tinfo = x86_info()
    lx = make_layer("conv2d", act="ternary", name=label, seed=len(label), **kw)
    kern = x86.tt_amx_rule(where_chosen=False).build(lx, batch, tinfo)
    spec = kern.spec
    assert spec.layout == "tt_amx" and spec.w_off == bool(kw.get("w_offset"))
    assert spec.border == (bool(kw.get("act_offset")) and kw.get("pad", 1) != 0)
    assert "tdpbssd" in kern.module.inspect_source("asm")
    if label == "tt_rtn_c256_b3":
        assert "wl = T.alloc_buffer" in amx_source(spec)
    prep = measure.prepare_kernel(kern, lx, tinfo)
    assert np.isfinite(prep.max_abs_err)


@pytest.mark.tvm
@pytest.mark.parametrize("act", ["int", "ternary"])
def test_amx_streaming_stores_match_reference(stream_everything, act):
    """With non-temporal stores forced: a pixels-inner conv (the batch inside the tile loop,
    wrapped whole in the store helper's import) and a block-inner one stay exact."""
    _needs_amx()
    tinfo = x86_info()
    for kw, batch, inner in ((dict(cin=256, out=64, hw=(6, 6)), 2, True),
                             (dict(cin=64, out=32, hw=(12, 12)), 2, False)):
        lx = make_layer("conv2d", act=act, name=f"stream_{act}", seed=7, **kw)
        rule = x86.tt_amx_rule() if act == "ternary" else x86.amx_rule()
        kern = rule.build(lx, batch, tinfo)
        src = amx_source(kern.spec)
        assert "tb_stream_f32x32" in src and ("wl = T.alloc_buffer" in src) == inner
        measure.prepare_kernel(kern, lx, tinfo)


# ----------------------------------------------------------------------------- bf16_amx (FGQ)


def test_bf16_pieces_are_exact_and_fewest():
    """float32 values split into bf16 pieces that sum back exactly: at most three for any
    value, two for FP16 values (FGQ's scales), one for bf16 values; more than allowed raises."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(4096) * 10.0 ** rng.integers(-6, 3, 4096)).astype(np.float32)
    for vals, most in ((x, 3), (x.astype(np.float16).astype(np.float32), 2),
                       (bf16_value(bf16_pieces(x)[0]), 1), (np.zeros(4, np.float32), 1)):
        pieces = bf16_pieces(vals)
        assert len(pieces) <= most
        total = sum(bf16_value(p).astype(np.float64) for p in pieces)
        np.testing.assert_array_equal(total, vals.astype(np.float64))
    assert len(bf16_pieces(x)) == 3
    with pytest.raises(ValueError, match="more than 2 bf16 pieces"):
        bf16_pieces(x, 2)


def _unpack_bf16(tiles: np.ndarray, n: int, k: int) -> np.ndarray:
    """float64 weights [n, k] back from ``bf16_amx`` tiles: the sum of the planes; element
    32 r + 2 j + q of a tile is output channel j, reduction index 2 r + q."""
    blocks, kc, planes, _, _ = tiles.shape
    v = bf16_value(tiles).astype(np.float64).sum(axis=2)  # [blocks, kc, 2, 512]
    w = v.reshape(blocks, kc, 2, 16, AMX_N, 2).transpose(0, 2, 4, 1, 3, 5)
    w = w.reshape(blocks * 2 * AMX_N, kc * 32)
    return w[:n, :k]


def test_bf16_tile_packing_round_trips():
    rng = np.random.default_rng(2)
    for n, c, kernel, planes in ((48, 32, (3, 3), 3), (16, 64, (1, 1), 2), (40, 96, (1, 3), 3)):
        k = kernel[0] * kernel[1] * c
        s = (rng.random((n, k)) + 0.5).astype(np.float32)
        if planes == 2:
            s = s.astype(np.float16).astype(np.float32)
        w = rng.integers(-1, 2, (n, k)).astype(np.float32) * s
        n_pad = -(-n // 32) * 32
        tiles = pack_bf16_tiles(w, c, kernel, n_pad, planes)
        assert tiles.shape == (n_pad // 32, k // 32, planes, 2, 512)
        np.testing.assert_array_equal(_unpack_bf16(tiles, n, k), w.astype(np.float64))
        assert not _unpack_bf16(tiles, n_pad, k)[n:].any()  # padding channels: zero weights
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_bf16_tiles(np.zeros((16, 9 * 16), np.float32), 16, (3, 3), 32, 2)


def test_bf16_amx_rule_gate():
    """AMX-BF16 (and the tile state granted) with grouped int8-activation convs, any group size
    or order, any channel count (row chunks below 32k), 1x1 from 64 channels; never one-group
    layers (``t2_amx``), ternary activations, linears, or a CPU without AMX-BF16."""
    base = x86_info()
    amx = dataclasses.replace(base, features=base.features | {"amx-tile", "amx-int8",
                                                              "amx-bf16"})
    granted = _tvm.enable_amx() if _tvm.is_x86_host() else False
    rule = x86.bf16_amx_rule()

    def applies(target=amx, **kw):
        return rule.applies(make_layer("conv2d", **kw), target)

    assert applies(cin=64, out=32, gs=4, order="ijc") == granted
    assert applies(cin=32, out=16, gs=64, stride=2) == granted
    assert applies(cin=128, out=64, gs=16, k=1, pad=0, stride=2) == granted
    assert applies(cin=3, out=16, gs=4, order="ijc") == granted  # row chunks
    assert applies(cin=48, out=16, gs=16) == granted
    for kw in (dict(cin=64), dict(cin=64, gs=4, act="ternary"), dict(cin=32, gs=4, k=1, pad=0)):
        assert not applies(out=32, **kw), kw
    assert not rule.applies(make_layer(cin=128, gs=4), amx)  # linear
    no_bf16 = dataclasses.replace(amx, features=amx.features - {"amx-bf16"})
    assert not applies(no_bf16, cin=64, out=32, gs=4)
    if granted:
        lx = make_layer("conv2d", cin=64, out=32, gs=4, order="ijc")
        assert measure.select_rule(lx, amx).name == "x86.bf16_amx"


def _fp16_scales(lx):
    return dataclasses.replace(lx, scales=lx.scales.astype(np.float16).astype(np.float32))


BF16_AMX_CASES = [  # (label, make_layer keywords, batch, FP16 scales: 2 pieces, else 3)
    ("bf_c64_g4_ijc", dict(cin=64, out=32, hw=(5, 7), gs=4, order="ijc"), 1, True),
    ("bf_c32_g16_cij_s2", dict(cin=32, out=48, hw=(9, 10), stride=2, gs=16), 2, False),
    ("bf_c96_g64_rows", dict(cin=96, out=32, hw=(5, 32), gs=64, order="ijc"), 1, True),
    ("bf_c64_1x1_s2", dict(cin=64, out=64, hw=(17, 18), k=1, pad=0, stride=2, gs=4), 1, True),
    ("bf_c256_g4_inner_b3", dict(cin=256, out=64, hw=(6, 6), gs=4, order="ijc"), 3, False),
    ("bf_c128_g8_planes_s2", dict(cin=128, out=64, hw=(14, 14), stride=2, gs=8), 2, True),
    # row chunks (C % 32 != 0): each kernel row's kw x C run read as whole tile rows
    ("bf_c3_stem", dict(cin=3, out=16, hw=(8, 8), gs=4, order="ijc"), 1, True),
    ("bf_c3_7x7_s2", dict(cin=3, out=64, hw=(20, 20), k=7, pad=3, stride=2, gs=4), 1, True),
    ("bf_c16_s2_rows", dict(cin=16, out=32, hw=(9, 10), stride=2, gs=4), 2, False),
    ("bf_c16_flat_b3", dict(cin=16, out=16, hw=(7, 7), gs=4, order="ijc"), 3, True),
    ("bf_c48_g16", dict(cin=48, out=48, hw=(6, 7), gs=16), 2, True),
]


@pytest.mark.tvm
@pytest.mark.parametrize(("label", "kw", "batch", "fp16"), BF16_AMX_CASES,
                         ids=[c[0] for c in BF16_AMX_CASES])
def test_bf16_amx_kernel_matches_reference(label, kw, batch, fp16):
    """``bf16_amx`` against the layer reference (``prepare_kernel`` raises on a mismatch):
    exact products, float32 sums, so the float tolerance; two pieces for FP16 scales, three
    for any float32 ones; row and flat tiles, strides, 1x1, a partial channel block, groups
    along either order, the batch inside the tile loop (large weights, one channel block),
    and row chunks for channel counts off 32k (3-channel stems, 16 and 48 channels)."""
    _needs_amx("amx-bf16", "bf16_amx needs AMX-BF16")
    tinfo = x86_info()
    lx = make_layer("conv2d", name=label, seed=len(label), **kw)
    if fp16:
        lx = _fp16_scales(lx)
    kern = x86.bf16_amx_rule().build(lx, batch, tinfo)
    assert kern.spec.layout == "bf16_amx" and kern.spec.planes == (2 if fp16 else 3)
    assert bool(kern.spec.k_row) == (kw["cin"] % 32 != 0)
    assert "tdpbf16ps" in kern.module.inspect_source("asm")
    if label == "bf_c256_g4_inner_b3":
        assert f"Xp = T.alloc_buffer(({batch}, " in amx_source(kern.spec)  # pixels inner
    prep = measure.prepare_kernel(kern, lx, tinfo)
    assert np.isfinite(prep.max_abs_err)


# ----------------------------------------------------------------------------- int8 outputs


def test_int8_outputs_are_validated_and_never_streamed(stream_everything):
    """``out_clip`` (int8 outputs requantized in the epilogue) is for the AMX int8-tile (and
    the table-lookup) layouts with a clip inside int8; its stores are plain (a 32-channel block
    is half a cache line, so non-temporal stores would flush partial lines), however large the
    output."""
    from ternbench.schedules.ops.lut import streams_output

    lx = make_layer("conv2d", cin=64, out=32, hw=(8, 8))
    spec = x86.amx_rule().plan(lx, 2, x86_info(), {})
    assert spec.out_dtype == "float32" and streams_output(spec)
    q = dataclasses.replace(spec, out_clip=(0, 127))
    assert q.out_dtype == "int8" and not streams_output(q)
    src = amx_source(q)
    assert "'int8')):" in src and "T.nearbyint" in src and "tb_stream" not in src
    assert "T.float32(0), 32)" in src and "T.float32(127), 32)" in src  # the clip, vectorized
    for bad in ((5, 5), (-129, 127), (0, 128)):
        with pytest.raises(ValueError, match="out_clip"):
            dataclasses.replace(spec, out_clip=bad)
    with pytest.raises(ValueError, match="t2_amx / tt_amx / t2_lut / tt_lut only"):
        dataclasses.replace(spec, layout="bf16_amx", out_clip=(-128, 127))


def test_int8_output_check_allows_only_boundary_rounding():
    """The codes' check: round half to even and the clip, one step apart only where the
    reference sits on a rounding boundary; anything else is a mismatch."""
    ref = np.array([[0.49, 2.5, 1.2, -3.7, 300.0]])  # output steps (out_scale 2: ref * 2)
    q = np.array([[0, 2, 1, -4, 127]], np.int8)
    err = measure._check_codes("l", "k", q, 2 * ref, 2.0, (-128, 127), 1e-5)
    assert err == pytest.approx(2 * (300 - 127))
    q[0, 1] = 3  # 2.5 rounded up: on the boundary, allowed
    measure._check_codes("l", "k", q, 2 * ref, 2.0, (-128, 127), 1e-5)
    q[0, 2] = 2  # 1.2 -> 2: a real error
    with pytest.raises(measure.KernelMismatchError, match="1 of 5 elements"):
        measure._check_codes("l", "k", q, 2 * ref, 2.0, (-128, 127), 1e-5)
    relu = np.array([[0, 2, 1, 0, 127]], np.int8)  # (0, 127): negatives clip to 0
    measure._check_codes("l", "k", relu, 2 * ref, 2.0, (0, 127), 1e-5)
    with pytest.raises(ValueError, match="out_scale"):
        from ternbench.schedules.ops import requantize_args

        spec = dataclasses.replace(x86.amx_rule().plan(make_layer("conv2d"), 1, x86_info(), {}),
                                   out_clip=(-128, 127))
        requantize_args(spec, [np.zeros(1, np.uint8)], 0.0)


INT8_OUT_CASES = [  # (label, act, layer kwargs, batch, clip, out_scale: None = the ref's range)
    ("q8_c64_n48_b3", "int", dict(cin=64, out=48, hw=(6, 9)), 3, (-128, 127), None),
    ("q8_relu_c256_inner", "int", dict(cin=256, out=64, hw=(6, 6)), 2, (0, 127), None),
    ("q8_s2_planes", "int", dict(cin=128, out=64, hw=(15, 13), stride=2), 1, (-128, 127), 0.05),
    ("q8_tt_rtn", "ternary", dict(cin=128, out=64, hw=(9, 20), stride=2, act_offset=-0.3,
                                  w_offset=True), 2, (-128, 127), None),
    ("q8_tt_codes", "ternary", dict(cin=64, out=32, hw=(5, 7)), 1, (-1, 1), None),
]


@pytest.mark.tvm
@pytest.mark.parametrize(("label", "act", "kw", "batch", "clip", "scale"), INT8_OUT_CASES,
                         ids=[c[0] for c in INT8_OUT_CASES])
def test_int8_outputs_match_reference(label, act, kw, batch, clip, scale):
    """int8 outputs on both activation kinds, block inner and pixels inner, a partial channel
    block, phase planes and RTN's offset terms: the codes are the reference divided by the
    output scale, rounded half to even and clipped (``prepare_kernel`` raises otherwise)."""
    _needs_amx()
    tinfo = x86_info()
    lx = make_layer("conv2d", act=act, name=label, seed=len(label), **kw)
    rule = x86.tt_amx_rule(where_chosen=False) if act == "ternary" else x86.amx_rule()
    kern = rule.build(lx, batch, tinfo, out_clip=clip)
    assert kern.spec.out_clip == clip
    if kern.spec.N % 32 == 0:  # whole blocks: 32 lanes narrowed at once (a partial one: scalar)
        assert "vpmovdb" in kern.module.inspect_source("asm")
    prep = measure.prepare_kernel(kern, lx, tinfo, out_scale=scale)
    assert_int8_codes(prep.out.numpy(), clip, scale is not None)


# ----------------------------------------------------------------------------- FP32 convs


def test_fp32_amx_source_runs_six_piece_products():
    """FP32 convs on ``bf16_amx``: three pieces of each input (the copy holds three planes)
    and of each weight, and the six piece products with ``i + j <= 2`` per reduction chunk."""
    lx = make_layer("conv2d", fmt="fp32", act="fp32", cin=3, out=64, hw=(20, 20), k=7, pad=3,
                    stride=2)
    spec = x86.fp32_amx_rule().plan(lx, 1, x86_info(), {})
    assert (spec.layout, spec.planes, spec.a_planes, spec.act_dtype) == ("bf16_amx", 3, 3,
                                                                         "float32")
    src = amx_source(spec)
    assert "X: T.Buffer((1, 20, 20, 3), 'float32')" in src
    assert src.count("'llvm.x86.tdpbf16ps'") == 6 * 4  # six pairs x four tiles
    assert "Xp[(2) * " in src and "T.grid(3, 1, " in src  # piece 2's copy; 3 zero rings
    with pytest.raises(ValueError, match="float32 inputs"):
        amx_source(dataclasses.replace(spec, act_dtype="int8"))


def test_fp32_amx_rule_gate():
    """FP32 convs on AMX-BF16 (tile state granted), chosen for kernels wider than one tap;
    never for ternary or int8 layers, linears, or a CPU without AMX-BF16."""
    base = x86_info()
    amx = dataclasses.replace(base, features=base.features | {"amx-tile", "amx-bf16"})
    granted = _tvm.enable_amx() if _tvm.is_x86_host() else False
    f32 = dict(fmt="fp32", act="fp32")
    stem = make_layer("conv2d", cin=3, out=64, hw=(16, 16), k=7, pad=3, stride=2, **f32)
    one = make_layer("conv2d", cin=64, out=64, k=1, pad=0, stride=2, **f32)
    assert x86.fp32_amx_rule().applies(stem, amx) == granted
    assert not x86.fp32_amx_rule().applies(one, amx)  # 1x1: the AVX-512 GEMM (1.41x faster)
    assert x86.fp32_amx_rule(where_chosen=False).applies(one, amx) == granted
    for lx in (make_layer("conv2d", cin=64), make_layer("conv2d", cin=64, act="fp32"),
               make_layer("conv2d", fmt="int8", cin=64), make_layer(**f32)):
        assert not x86.fp32_amx_rule(where_chosen=False).applies(lx, amx)
    no_bf16 = dataclasses.replace(base, features=base.features - {"amx-bf16"})
    assert not x86.fp32_amx_rule().applies(stem, no_bf16)
    names = [r.name for r in x86.rules()]
    assert names.index("x86.fp32_amx") < names.index("x86.fp32_512")
    if granted:
        assert measure.select_rule(stem, amx).name == "x86.fp32_amx"


FP32_AMX_CASES = [
    ("f32_stem_7x7_s2", dict(cin=3, out=64, hw=(23, 21), k=7, pad=3, stride=2), 1),  # row chunks
    ("f32_cifar_stem", dict(cin=3, out=16, hw=(12, 12)), 2),  # one partial block
    ("f32_c32_n48", dict(cin=32, out=48, hw=(9, 7)), 2),  # whole chunks, partial block
    ("f32_c64_s2", dict(cin=64, out=64, hw=(10, 10), stride=2), 3),  # phase planes
]


@pytest.mark.tvm
@pytest.mark.parametrize(("label", "kw", "batch"), FP32_AMX_CASES,
                         ids=[c[0] for c in FP32_AMX_CASES])
def test_fp32_amx_is_as_accurate_as_torch_fp32(label, kw, batch):
    """Against the float64 reference: within 4x the error of torch's own FP32 conv on the
    same input (the pieces are exact; the products left out are at float32's roundoff)."""
    import torch
    import torch.nn.functional as F

    _needs_amx("amx-bf16", "fp32_amx needs AMX-BF16")
    tinfo = x86_info()
    lx = make_layer("conv2d", fmt="fp32", act="fp32", name=label, seed=len(label), **kw)
    rule = x86.fp32_amx_rule()
    assert rule.applies(lx, tinfo)
    kern = rule.build(lx, batch, tinfo)
    prep = measure.prepare_kernel(kern, lx, tinfo)
    ref = measure.reference_output(lx, prep.a)
    x = torch.from_numpy(prep.a).permute(0, 3, 1, 2)
    w = torch.from_numpy(lx.codes.astype(np.float32)).reshape(lx.out_channels, kw["cin"],
                                                              *lx.kernel_size)
    y = F.conv2d(x, w, torch.from_numpy(np.asarray(lx.bias, np.float32)), stride=lx.stride,
                 padding=lx.padding).permute(0, 2, 3, 1).reshape(ref.shape).numpy()
    torch_err = float(np.abs(y - ref).max())
    assert prep.max_abs_err <= 4 * torch_err + 1e-6 * float(np.abs(ref).max())
