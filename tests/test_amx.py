"""The ``t2_amx`` conv (AMX ``tdpbssd`` on 2-bit ternary weights decoded per call): the tile
packing, the rule gate, and exactness against the layer reference on every path (strides,
1x1, partial row segments and row pairs, a partial channel block, batches)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from conftest import require_x86_features, x86_info
from ternbench.schedules import _tvm, measure, x86
from ternbench.schedules.ops.amx import AMX_K, AMX_N, amx_source, pack_amx_tiles
from test_schedules import make_layer


def _needs_amx() -> None:
    require_x86_features({"amx-tile", "amx-int8"}, "t2_amx needs AMX-INT8")
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
    assert applies(cin=256, out=64, k=1, pad=0, stride=2) == granted  # timed, not chosen
    for kw in (dict(cin=96), dict(cin=3), dict(cin=128, gs=4, order="ijc"),
               dict(cin=128, act="ternary")):
        assert not applies(out=32, **kw), kw
    assert not x86.amx_rule().applies(make_layer(cin=128), amx)  # linear
    no_amx = dataclasses.replace(base, features=base.features - {"amx-tile", "amx-int8"})
    assert not applies(no_amx, cin=64, out=32)
    # chosen for convs wider than one tap (1x1 convs stay on vpdpbusd), first of all rules
    assert x86.rules()[0].name == "x86.t2_amx"
    one = make_layer("conv2d", cin=64, out=32, k=1, pad=0)
    assert x86.amx_rule(where_chosen=False).applies(one, amx) == granted
    assert not x86.amx_rule().applies(one, amx)
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
    """The channel block runs innermost on large images with small weights (64x56x56), the
    pixels where the decoded weights outweigh twice the padded image (512x7x7)."""
    def block_of_tile(**kw) -> str:
        spec = x86.amx_rule().plan(make_layer("conv2d", **kw), 1, x86_info(), {})
        return re.search(r"Wd\[\(dy \* 3 \+ dx\) \* \d+ \+ q, \((t [^)]*)\)", amx_source(spec))[1]

    assert block_of_tile(cin=64, out=64, hw=(56, 56)) == "t % 2"  # 2 blocks of 32 channels
    assert block_of_tile(cin=512, out=512, hw=(7, 7)) == "t // 4"  # 4 row pairs x 1 segment


AMX_CASES = [
    ("c64_n32_3x3", dict(cin=64, out=32, hw=(5, 7)), 1),
    ("c64_n48_3x3_b3", dict(cin=64, out=48, hw=(6, 9)), 3),  # partial channel block
    ("c128_n64_s2", dict(cin=128, out=64, hw=(9, 20), stride=2), 2),  # 2 segments, odd rows
    ("c64_n64_1x1_s2", dict(cin=64, out=64, hw=(17, 18), k=1, pad=0, stride=2), 1),
    ("c192_n32_w35", dict(cin=192, out=32, hw=(3, 35)), 2),  # a row of 3 segments
    ("c64_n32_7x7_s2", dict(cin=64, out=32, hw=(11, 11), k=7, pad=3, stride=2), 1),
    ("c64_n64_w33", dict(cin=64, out=64, hw=(20, 33)), 1),
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
