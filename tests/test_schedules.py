"""ternbench.schedules: packing, rule selection, kernel correctness checks, latency fields.

Tests that compile TVM kernels are marked ``tvm`` and skip without TVM; they use a tiny
evaluator config, so they check plumbing and correctness, never speed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import amx_granted, expected_t2_impl, expected_tt_impl, x86_info
from ternbench.methods import ConfigError, LayerExport
from ternbench.schedules import (
    EvaluatorCfg,
    KernelMismatchError,
    LayerLatency,
    UnsupportedLayerError,
    _tvm,
    generic,
    graph,
    list_targets,
    measure,
    measure_layer,
    measure_torch_fp32,
    ops,
    run_layer,
    tvm_version,
    x86,
)

EV = EvaluatorCfg(number=1, repeat=2, min_repeat_ms=0)


def make_layer(
    op: str = "linear",
    fmt: str = "ternary",
    out: int = 32,
    cin: int = 64,
    *,
    gs: int | None = None,
    hw: tuple[int, int] = (8, 8),
    k: int = 3,
    stride: int = 1,
    pad: int = 1,
    act: str = "int",
    bias: bool = True,
    seed: int = 0,
    name: str | None = None,
    act_offset: float = 0.0,
    w_offset: bool = False,
    order: str = "cij",
) -> LayerExport:
    """A hand-made export with random codes (ternary / int8 / fp32).

    ``act="ternary"``: ternary activations (threshold 0.5, scale 0.7) with an optional
    activation offset and per-channel weight offsets (RTN style).
    """
    rng = np.random.default_rng(seed)
    in_shape: tuple[int, ...]
    out_hw: tuple[int, ...]
    if op == "linear":
        fan, in_shape, out_hw, ks, st, pd = cin, (cin,), (1, 1), (1, 1), (1, 1), (0, 0)
    else:
        fan, in_shape = cin * k * k, (cin, *hw)
        out_hw = tuple((s + 2 * pad - k) // stride + 1 for s in hw)
        ks, st, pd = (k, k), (stride, stride), (pad, pad)
    gs = gs or fan
    if fmt == "ternary":
        codes = rng.integers(-1, 2, (out, fan)).astype(np.int8)
        scales = (rng.random((out, -(-fan // gs))) + 0.5).astype(np.float32)  # last group partial
    elif fmt == "int8":
        codes = rng.integers(-127, 128, (out, fan)).astype(np.int8)
        scales, gs = (rng.random((out, 1)) * 0.01 + 1e-3).astype(np.float32), fan
    else:
        codes = rng.standard_normal((out, fan)).astype(np.float32)
        scales, gs = np.ones((out, 1), np.float32), fan
    tern: dict = {}
    if act == "ternary":
        tern = dict(act_threshold=0.5, act_offset=act_offset)
        if w_offset:
            tern["weight_offset"] = (rng.standard_normal(out) * 0.2).astype(np.float32)
    return LayerExport(
        name=name or f"{op}_{fmt}_{out}x{fan}_gs{gs}",
        op=op,  # type: ignore[arg-type]
        weight_format=fmt,
        codes=codes,
        scales=scales,  # type: ignore[arg-type]
        group_size=gs,
        bias=rng.standard_normal(out).astype(np.float32) if bias else None,
        act_mode=act,
        act_bits={"int": 8, "ternary": 2}.get(act, 32),  # type: ignore[arg-type]
        act_scale={"int": 0.05, "ternary": 0.7}.get(act, 1.0),
        in_channels=cin,
        out_channels=out,
        kernel_size=ks,
        stride=st,
        padding=pd,
        input_shape=in_shape,
        output_hw=out_hw,  # type: ignore[arg-type]
        group_order=order,  # type: ignore[arg-type]
        **tern,  # type: ignore[arg-type]
    )


@pytest.fixture
def tvm_mod():
    return pytest.importorskip("tvm")


def _sane(lat: LayerLatency, lx: LayerExport, batch: int) -> None:
    assert lat.layer == lx.name and lat.target == "x86" and lat.batch == batch
    assert lat.median_us > 0 and len(lat.raw_us) == EV.repeat and all(r > 0 for r in lat.raw_us)
    assert min(lat.raw_us) <= lat.median_us <= max(lat.raw_us)
    assert lat.threads >= 1
    assert lat.K == lx.fan_in and lat.N == lx.out_channels
    assert lat.M == batch * lx.output_hw[0] * lx.output_hw[1]
    assert math.isfinite(lat.max_abs_err) and lat.max_abs_err >= 0


# ----------------------------------------------------------------------------- no TVM needed


def test_evaluator_cfg_validates():
    assert EvaluatorCfg().number == 20
    with pytest.raises(ConfigError, match="repeat"):
        EvaluatorCfg(repeat=0)
    with pytest.raises(ConfigError, match="min_repeat_ms"):
        EvaluatorCfg(min_repeat_ms=-1)
    with pytest.raises(ConfigError, match="number"):
        EvaluatorCfg(number=1.5)  # type: ignore[arg-type]


def test_import_does_not_import_tvm():
    code = (
        "import sys, ternbench.schedules as s; s.list_targets(); s.tvm_version(); "
        "assert 'tvm' not in sys.modules, 'tvm imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("tn", [8, 16])
def test_pack_t2_avx2_roundtrip(tn):
    rng = np.random.default_rng(1)
    w = rng.integers(-1, 2, (10, 27)).astype(np.int8)
    p = ops.pack_t2_avx2(w, 32, 32, tn)
    nt = 32 // tn
    assert p.shape == (nt, 2, 4 * tn) and p.dtype == np.uint8
    # decode exactly like the kernel's W_dec stage: tile [nb, kq, ni, ki]
    dec = np.empty((nt, 8, tn, 4), np.int16)
    for kq in range(8):
        dec[:, kq] = ((p[:, kq // 4].reshape(nt, tn, 4) >> (2 * (kq % 4))) & 3
                      ).astype(np.int16) - 1
    full = dec.transpose(0, 2, 1, 3).reshape(32, 32)  # [n, k]
    np.testing.assert_array_equal(full[:10, :27], w)
    assert not full[10:].any() and not full[:, 27:].any()
    with pytest.raises(ValueError, match="multiples of"):
        ops.pack_t2_avx2(w, 24, 32, 16)


def test_pack_t2_blocked_roundtrip():
    rng = np.random.default_rng(2)
    w = rng.integers(-1, 2, (12, 18)).astype(np.int8)
    p = ops.pack_t2_blocked(w, 8, 16, 20)
    assert p.shape == (2, 5, 8)
    n, k = np.meshgrid(np.arange(16), np.arange(20), indexing="ij")
    code = (p[n // 8, k // 4, n % 8].astype(np.int32) >> (2 * (k % 4))) & 3
    val = code - ((code & 2) << 1)
    np.testing.assert_array_equal(val[:12, :18], w)
    assert not val[12:].any() and not val[:, 18:].any()
    with pytest.raises(ValueError, match="ternary"):
        ops.pack_t2_blocked(w * 2, 8, 16, 20)


def test_reference_matches_naive_loops():
    """The oracle itself: grouped conv (F.unfold path) and grouped linear vs plain loops."""
    lx = make_layer("conv2d", cin=3, out=4, gs=9, hw=(5, 4), stride=2, pad=1, seed=3)
    rng = np.random.default_rng(4)
    a = rng.integers(-127, 128, (2, 5, 4, 3)).astype(np.int8)  # NHWC
    ref = measure.reference_output(lx, a)
    ho, wo = lx.output_hw
    xp = np.pad(a.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    w = lx.codes.reshape(4, 3, 3, 3).astype(np.int64)
    naive = np.zeros((2, ho, wo, 4))
    for b in range(2):
        for i in range(ho):
            for j in range(wo):
                patch = xp[b, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :].transpose(2, 0, 1)  # C,kh,kw
                for o in range(4):
                    acc = (patch * w[o]).reshape(3, 9).sum(1)  # group g = channel g (gs=9)
                    naive[b, i, j, o] = lx.act_scale * (acc * lx.scales[o]).sum() + lx.bias[o]
    np.testing.assert_allclose(ref, naive.reshape(-1, 4), rtol=1e-12, atol=1e-12)

    lin = make_layer("linear", cin=11, out=5, gs=4, seed=5)  # groups of 4, 4 and 3
    a2 = rng.integers(-127, 128, (3, 11)).astype(np.int64)
    prod = a2[:, None, :] * lin.codes[None].astype(np.int64)  # [B, O, K]
    acc = np.stack([prod[..., 0:4].sum(-1), prod[..., 4:8].sum(-1), prod[..., 8:].sum(-1)], -1)
    exp = lin.act_scale * (acc * lin.scales[None]).sum(-1) + lin.bias
    np.testing.assert_allclose(measure.reference_output(lin, a2.astype(np.int8)), exp,
                               rtol=1e-12)


def test_rule_selection_is_gated_by_target_features():
    info = _tvm.TargetInfo(
        name="x86",
        target_str="{}",
        kind="llvm",
        mcpu="generic",
        is_x86=True,
        features=frozenset({"avx2"}),
    )
    no_avx2 = _tvm.TargetInfo(
        name="x86", target_str="{}", kind="llvm", mcpu="generic", is_x86=True, features=frozenset()
    )
    t2 = make_layer()
    assert measure.select_rule(t2, info).name == "x86.t2_avx2"
    assert measure.select_rule(t2, no_avx2).name == "generic.t2"
    assert measure.select_rule(make_layer(gs=4), info).name == "x86.t2_avx2"
    assert measure.select_rule(make_layer(cin=66, gs=6), info).name == "generic.t2"
    assert measure.select_rule(make_layer(fmt="int8"), info).name == "x86.int8"
    assert measure.select_rule(make_layer(fmt="fp32", act="fp32"), info).name == "x86.fp32"
    # AVX-512: FP32 tiles two zmm wide (the FP32 stems of the ternary models)
    wide = dataclasses.replace(info, features=info.features | {"avx512f"})
    fp32_512 = measure.select_rule(make_layer(fmt="fp32", act="fp32"), wide)
    assert fp32_512.name == "x86.fp32_512" and fp32_512.default_params["nb"] == 32
    # TWN style (ternary weights, float activations): decoded-to-fp32 blocked GEMM, any x86
    twn = make_layer(act="fp32", gs=6, cin=66)
    for target in (info, no_avx2):
        rule = measure.select_rule(twn, target)
        assert rule.name == "x86.t2_f32" and rule.impl_for(twn) == "tvm_t2_f32"
    # ternary activations: popcount kernel, vectorised only with AVX2; any group size
    for lx in (make_layer(act="ternary"), make_layer(act="ternary", gs=24, w_offset=True)):
        assert measure.select_rule(lx, info).name == "x86.tt_popc"  # AVX2 only
        assert measure.select_rule(lx, no_avx2).name == "generic.tt_popc"
    with pytest.raises(UnsupportedLayerError):
        measure.select_rule(make_layer(fmt="int8", act="ternary"), info)
    assert [r.name for r in generic.rules()] == [
        "generic.t2", "generic.int8", "generic.fp32", "generic.tt_popc"]
    assert [r.name for r in x86.rules()][:11] == [
        "x86.bf16_amx", "x86.t2_amx", "x86.t2_lut", "x86.t2_avx512vnni", "x86.t2_avxvnni",
        "x86.t2_avx2", "x86.tt_amx", "x86.tt_lut", "x86.tt_popc512", "x86.tt_popc", "x86.t2_f32"]
    # VPOPCNTDQ + DQ: the 512-bit rule, int64 accumulators; without them the AVX2 one
    popc512 = dataclasses.replace(info, features=frozenset(
        {"avx2", "avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512vpopcntdq"}))
    tt = make_layer(act="ternary")
    rule = measure.select_rule(tt, popc512)
    assert rule.name == "x86.tt_popc512" and rule.impl_for(tt) == "tvm_tt_popc"
    assert rule.plan(tt, 1, popc512, rule.default_params).tt_acc64
    # the two popcount sums kept apart from 16 words per group on (x86.TT_SPLIT_MIN_WORDS)
    for cin, words, split in ((64, 9, False), (128, 18, True)):  # 3x3 convs: 9 x cin / 64
        lx = make_layer("conv2d", act="ternary", cin=cin, hw=(4, 4))
        spec = rule.plan(lx, 1, popc512, rule.default_params)
        assert (spec.gsp // 64, spec.tt_split) == (words, split)
    assert not measure.select_rule(tt, info).plan(tt, 1, info, {}).tt_split
    # AVX512-VBMI: byte-table lookups for one-group ternary convs (offsets or not), >= 32
    # channels in and out (16 in: 64 out; 1x1: >= 64 in) or a stem's <= 4 inputs; everything
    # else stays on the popcount, on a CPU with full-rate 512-bit permutes (Zen 4); elsewhere
    # (Intel) the stems only
    vbmi = dataclasses.replace(popc512, features=popc512.features | {"avx512vbmi"},
                               mcpu="znver4")
    intel = dataclasses.replace(vbmi, mcpu="emeraldrapids")
    for kw, lut in ((dict(cin=128, out=128), True), (dict(cin=3, out=16), True),
                    (dict(cin=64, out=128), True), (dict(cin=128, out=64), True),
                    (dict(cin=32, out=128), True), (dict(cin=128, out=16), False),
                    (dict(cin=16, out=32), False), (dict(cin=16, out=32, stride=2), False),
                    (dict(cin=16, out=64), True), (dict(cin=16, out=64, stride=2), True),
                    (dict(cin=16, out=16), False), (dict(cin=8, out=32), False),
                    (dict(cin=64, out=128, k=1, pad=0), True),
                    (dict(cin=32, out=64, k=1, pad=0, stride=2), False),
                    (dict(cin=64, out=16, k=1, pad=0), False),
                    (dict(cin=64, out=128, stride=2), True),
                    (dict(cin=128, out=128, stride=2), True),
                    (dict(cin=128, out=128, k=1, pad=0, stride=2), True),
                    (dict(cin=128, out=128, act_offset=0.3), True),  # RTN's offsets
                    (dict(cin=128, out=128, w_offset=True), True),
                    (dict(cin=128, out=128, gs=64), False)):
        lx = make_layer("conv2d", act="ternary", hw=(4, 4), **kw)
        assert measure.select_rule(lx, vbmi).name == ("x86.tt_lut" if lut else "x86.tt_popc512")
        stem = lut and lx.in_channels <= 4
        assert measure.select_rule(lx, intel).name == ("x86.tt_lut" if stem else "x86.tt_popc512")
        assert measure.select_rule(lx, popc512).name == "x86.tt_popc512"  # no VBMI
    assert measure.select_rule(make_layer(act="ternary", cin=256, out=256), vbmi).name \
        == "x86.tt_popc512"  # linears: no pixel tables to share
    wide = make_layer("conv2d", act="ternary", cin=128, out=128, hw=(4, 4))
    spec = x86.tt_lut_rule().plan(wide, 1, vbmi, x86.TT_LUT_DEFAULT)
    assert (spec.layout, spec.nb, spec.Np, spec.Kp) == ("tt_lut", 128, 128, 9 * 128)
    # tiles of one output row: 7 pixels by default, or 8 where that pads the row less
    for w, mb in ((4, 4), (28, 7), (32, 8), (17, 7)):
        lx = make_layer("conv2d", act="ternary", cin=128, out=128, hw=(3, w))
        assert x86.tt_lut_rule().plan(lx, 1, vbmi, x86.TT_LUT_DEFAULT).mb == mb
    # dense int8: the VNNI tile intrinsic where there is VNNI, never AVX2's vpmaddubsw (its
    # int16 pair sums overflow with full-range int8 weights)
    vnni = dataclasses.replace(popc512, features=popc512.features | {"avx512vnni"})
    i8 = make_layer(fmt="int8")
    assert measure.select_rule(i8, vnni).name == "x86.i8_avx512vnni"
    assert measure.select_rule(i8, vnni).impl_for(i8) == "tvm_int8"
    assert measure.select_rule(i8, info).name == "x86.int8"
    assert not measure.select_rule(tt, info).plan(tt, 1, info, {}).tt_acc64
    assert generic.rules()[0].impl_for(twn) == "tvm_t2_generic_a32"


def test_plan_pads_and_validates():
    spec = ops.plan_gemm(
        make_layer("conv2d", out=10, cin=3, pad=1), 2, "t2_avx2", nb=16, mb_max=4, rows_per_task=64
    )
    # a 3-channel stem: each kernel row's 3x3 = 9 fan-in padded to 16 (GemmSpec.k_row)
    assert (spec.K, spec.Kp, spec.G, spec.gs, spec.N, spec.Np) == (27, 48, 1, 48, 10, 16)
    assert spec.k_row == 16
    assert spec.M == 2 * 8 * 8 and spec.M % (spec.mb * spec.m_task) == 0
    assert spec.k_order == "ijc" and spec.input_shape == (2, 8, 8, 3)
    wide = ops.plan_gemm(make_layer("conv2d", out=10, cin=16, pad=1), 1, "t2_avx2", nb=16,
                         mb_max=4, rows_per_task=64)
    assert wide.k_row == 0 and wide.Kp == 144  # 16 channels: K needs no padding
    grouped = ops.plan_gemm(
        make_layer("conv2d", cin=4, gs=4), 1, "t2_avx2", nb=16, mb_max=4, rows_per_task=64
    )
    assert grouped.k_order == "cij" and (grouped.G, grouped.gs) == (9, 4)
    bad = dataclasses.replace(make_layer("conv2d", cin=4), output_hw=(3, 3))
    with pytest.raises(ValueError, match="output_hw"):
        ops.plan_gemm(bad, 1, "dense_blocked", nb=8, mb_max=4, rows_per_task=64)


def test_list_targets_and_version():
    got = list_targets()
    assert ("x86" in got) == _tvm.is_x86_host()
    assert {"arm", "arm-neon", "arm-sve", "cuda"} <= set(got)
    with pytest.raises(ValueError, match="unknown target 'riscv'"):
        _tvm.target_info("riscv")
    arm = _tvm.target_info("arm")
    assert arm.family == "arm" and not arm.local and arm.has("dotprod") and not arm.is_x86
    v = tvm_version()
    assert v is None or isinstance(v, str)


# ----------------------------------------------------------------------------- TVM kernels


@pytest.mark.tvm
@pytest.mark.parametrize(
    ("label", "kw", "batch", "impl"),
    [
        ("linear_pc", dict(op="linear", out=32, cin=64), 1, "t2"),
        ("linear_gs16", dict(op="linear", out=32, cin=64, gs=16), 1, "t2"),
        ("linear_gs4", dict(op="linear", out=32, cin=64, gs=4), 1, "t2"),
        ("linear_pad_nk", dict(op="linear", out=10, cin=27), 3, "t2"),
        ("conv3x3_s2", dict(op="conv2d", out=16, cin=8, hw=(9, 9), stride=2, pad=1), 2, "t2"),
        ("conv_first", dict(op="conv2d", out=8, cin=3, hw=(6, 6), pad=1, bias=False), 1, "t2"),
        # a 7x7/2 stem, int8 weights (k_row padding on the VNNI intrinsic where there is one)
        ("conv_stem_int8", dict(op="conv2d", fmt="int8", out=16, cin=3, k=7, stride=2, pad=3,
                                hw=(15, 15)), 1, "tvm_int8"),
        ("conv_gs4_s2", dict(op="conv2d", out=16, cin=4, gs=4, hw=(7, 7), stride=2), 1, "t2"),
        # FGQ's cin_contiguous groups: (kh, kw, C) im2col; N = 8 does not divide C = 12 (a
        # group runs on into the next tap) and the last group is partial
        ("conv_gs8_ijc", dict(op="conv2d", out=16, cin=12, gs=8, hw=(6, 6), order="ijc"), 2,
         "t2"),
        ("conv_gs4_ijc_s2", dict(op="conv2d", out=16, cin=16, gs=4, hw=(7, 7), stride=2,
                                 order="ijc"), 1, "t2"),
        ("conv1x1", dict(op="conv2d", out=24, cin=16, k=1, pad=0, hw=(5, 5)), 2, "t2"),
        ("conv_nopad_gs16", dict(op="conv2d", out=16, cin=16, gs=16, pad=0, hw=(6, 6)), 1, "t2"),
        ("linear_partial_gs8", dict(op="linear", out=16, cin=30, gs=8), 2, "t2"),
        ("conv_partial_gs4", dict(op="conv2d", out=8, cin=3, gs=4, hw=(5, 5)), 1, "t2"),
        ("linear_partial_gs7", dict(op="linear", out=16, cin=30, gs=7), 1, "tvm_t2_generic"),
        # groups of 6: no integer x86 group kernel (4 k per step); AMX-BF16 folds any group
        ("conv_gs6", dict(op="conv2d", out=8, cin=2, gs=6, hw=(5, 5)), 1, "bf16_or_generic"),
        ("linear_int8", dict(op="linear", fmt="int8", out=32, cin=64), 1, "tvm_int8"),
        (
            "conv_int8",
            dict(op="conv2d", fmt="int8", out=16, cin=8, hw=(7, 7), stride=2),
            2,
            "tvm_int8",
        ),
        ("linear_fp32", dict(op="linear", fmt="fp32", act="fp32", out=10, cin=64), 1, "tvm_fp32"),
        (
            "conv_fp32",
            dict(op="conv2d", fmt="fp32", act="fp32", out=8, cin=3, hw=(6, 6)),
            1,
            "tvm_fp32",
        ),
        # one input channel, stride 2: the GEMM reads the padded input itself (inline_im2col)
        ("conv_fp32_c1_s2", dict(op="conv2d", fmt="fp32", act="fp32", out=16, cin=1, hw=(9, 9),
                                 stride=2), 2, "tvm_fp32"),
        ("linear_t2_f32", dict(op="linear", act="fp32", out=16, cin=64), 1, "tvm_t2_f32"),
        ("conv_t2_f32_gs16", dict(op="conv2d", act="fp32", out=16, cin=4, gs=16, hw=(6, 6)), 2,
         "tvm_t2_f32"),
        ("conv_t2_f32_s2", dict(op="conv2d", act="fp32", out=8, cin=3, hw=(9, 9), stride=2), 1,
         "tvm_t2_f32"),
        ("linear_tt", dict(op="linear", act="ternary", out=16, cin=100), 2, "tt"),
        ("conv_tt_off", dict(op="conv2d", act="ternary", out=8, cin=8, hw=(7, 7), stride=2,
                             act_offset=0.3, w_offset=True), 1, "tt"),
        # C % 64 == 0: planes packed once per pixel (X_bits) and gathered word by word
        ("conv_tt_pixel", dict(op="conv2d", act="ternary", out=16, cin=128, hw=(7, 7),
                               stride=2), 2, "tt"),
        ("conv_tt_pixel_c16", dict(op="conv2d", act="ternary", out=16, cin=16, hw=(8, 8)), 1,
         "tt"),
        ("conv_tt_pixel_off", dict(op="conv2d", act="ternary", out=8, cin=64, hw=(6, 6),
                                   act_offset=0.3, w_offset=True), 1, "tt"),
    ],
)
def test_measure_layer(tvm_mod, label, kw, batch, impl):
    lx = make_layer(**kw, name=label)
    if "pixel" in label:
        spec = ops.plan_gemm(lx, batch, "tt_planes", nb=8, mb_max=4, rows_per_task=64)
        assert spec.pixel_bits and not spec.has_input_stage
    if "ijc" in label:
        spec = ops.plan_gemm(lx, batch, "t2_avx2", nb=16, mb_max=4, rows_per_task=64)
        assert spec.k_order == "ijc" and spec.G > 1 and not spec.k_row
        # the grouping matters: the same codes grouped along (C, kh, kw) give another layer
        from ternbench.core.reference import layer_reference
        x = torch.randn(batch, *lx.input_shape)
        other = dataclasses.replace(lx, group_order="cij")
        assert not torch.allclose(layer_reference(lx, x), layer_reference(other, x))
    lat = measure_layer(lx, batch=batch, ev=EV)
    _sane(lat, lx, batch)
    full_rate = x86.full_rate_permutes(x86_info())
    if impl == "t2":
        impl = expected_t2_impl(x86_info().features, lx, full_rate, amx_granted())
    elif impl == "tt":
        impl = expected_tt_impl(x86_info().features, lx, full_rate, amx_granted())
    elif impl == "bf16_or_generic":
        bf16 = amx_granted() and "amx-bf16" in x86_info().features
        impl = "tvm_bf16_amx" if bf16 else "tvm_t2_generic"
    assert lat.impl == impl and lat.isa == x86_info().isa
    assert lat.target_str == _tvm.host_target_string() and '"kind":"llvm"' in lat.target_str


@pytest.mark.tvm
def test_int8_act_kernel_instructions_per_isa(isa):
    """Each ISA level this CPU has builds, runs exact, and uses its own instructions: AVX-512
    one ``vpdpbusd`` per tile, AVX2 ``vpmaddubsw + vpmaddwd``, generic neither."""
    info = x86_info()
    assert info.isa == isa
    lx = make_layer()
    assert measure.select_rule(lx, info).impl_for(lx) == expected_t2_impl(info.features)
    kern = measure.select_rule(lx, info).build(lx, 1, info)
    asm = kern.module.inspect_source("asm")
    if isa in ("amx", "avx512"):
        assert "vpdpbusd" in asm and "vpmaddubsw" not in asm
        if "avx512vnni" in info.features:  # 16-wide tiles: one vpdpbusd on a zmm register
            assert kern.spec.tile_n == 16 and re.search(r"vpdpbusd\s+[^\n]*zmm", asm)
    elif isa == "avx2":
        assert "vpmaddubsw" in asm and "vpmaddwd" in asm and "vpdpbusd" not in asm
        assert "zmm" not in asm  # the forced level reaches the whole build, not only the rules
    else:
        assert "vpmaddubsw" not in asm and "ymm" not in asm
    lat = measure_layer(lx, batch=1, ev=EV)  # exact against the reference, then timed
    assert lat.isa == isa and lat.impl == kern.impl


@pytest.mark.tvm
@pytest.mark.parametrize("gs,chained", [(None, True), (16, True), (4, False)])
@pytest.mark.parametrize("sign", [1, -1])
def test_avx2_kernel_sums_16_k_in_int16_before_widening(monkeypatch, gs, chained, sign):
    """The AVX2 kernel adds four ``vpmaddubsw`` per 16 k in int16 and widens once (groups of
    16k); groups of 4 widen every 4 k. Exact at the int16 chain's largest sums: every weight
    +1 (or -1) against activation codes at +127 and at -127."""
    pytest.importorskip("tvm")
    if not _tvm.is_x86_host() or "avx2" not in _tvm.host_isa_levels():
        pytest.skip("the AVX2 kernel needs an x86 CPU with AVX2")
    monkeypatch.setenv(_tvm.ISA_ENV, "avx2")
    info = x86_info()
    lx = make_layer("conv2d", cin=16, out=16, hw=(6, 6), gs=gs)
    lx = dataclasses.replace(lx, codes=np.full_like(lx.codes, sign))
    rule = measure.select_rule(lx, info)
    assert rule.name == "x86.t2_avx2"
    kern = rule.build(lx, 2, info)
    asm = kern.module.inspect_source("asm")
    madd, widen = asm.count("vpmaddubsw"), asm.count("vpmaddwd")
    assert madd > 0
    if chained:
        assert "vpaddw" in asm and 4 * widen <= madd, (madd, widen)
    else:
        assert widen >= madd, (madd, widen)
    x = torch.full((2, *lx.input_shape), 100.0)
    x[1] = -100.0  # codes +127 and -127 (the uint8 operand's 255 and 1)
    measure.prepare_kernel(kern, lx, info, x)  # raises on any difference from the reference


@pytest.mark.tvm
@pytest.mark.parametrize("label,kw,batch,lanes", [
    ("linear_k_padded", dict(cin=100, out=24), 3, 64),  # A_in: K 100 -> Kp 128 of zeros
    ("linear", dict(cin=192, out=32), 1, 64),
    ("conv_c128_s2", dict(op="conv2d", cin=128, out=16, hw=(7, 7), stride=2), 2, 64),
    ("conv_1x1_s2", dict(op="conv2d", cin=64, out=16, hw=(6, 7), k=1, pad=0, stride=2), 2, 64),
    ("conv_c32", dict(op="conv2d", cin=32, out=16, hw=(6, 5)), 2, 32),
    ("conv_c16_off", dict(op="conv2d", cin=16, out=8, hw=(6, 6), act_offset=0.3,
                          w_offset=True), 1, 16),
    ("conv_c8", dict(op="conv2d", cin=8, out=8, hw=(5, 5), stride=2), 2, 8),
    # FGQ-style groups of 48 (each padded to 64): im2col rows, not pixels
    ("conv_groups", dict(op="conv2d", cin=16, out=8, hw=(5, 5), gs=48), 2, 64),
    ("stem_c3", dict(op="conv2d", cin=3, out=8, hw=(9, 9)), 1, 0),  # 27 bits: not packed so
])
def test_popcount_mask_words_match_reference(isa, monkeypatch, label, kw, batch, lanes):
    """The popcount kernels pack each bit-plane word with one compare into a mask
    (``GemmSpec.mask_words``: input rows, pixels of C % 64 == 0 or 8-32 channels) on every x86
    ISA level with a popcount rule, exact against the reference like the shifted-bit reduction
    they replace (``x86.TT_MASK_WORDS = False``), padding rings, K padding and offsets
    included; the words come from the LLVM helper, not a loop over bits."""
    info = x86_info()
    name = "x86.tt_popc512" if "avx512vpopcntdq" in info.features else "x86.tt_popc"
    rules = [r for r in x86.rules() if r.name == name]
    if isa == "generic" or not rules[0].applies(make_layer(act="ternary"), info):
        pytest.skip(f"{isa}: no x86 popcount rule at this level")
    rule = rules[0]
    conv = {"order": "ijc"} if kw.get("op") == "conv2d" else {}
    lx = make_layer(act="ternary", name=label, **{**conv, **kw})
    x = torch.randn(batch, *lx.input_shape)
    x[0].flatten()[:5] = torch.tensor([3.0, -3.0, 0.0, 0.5, -0.5])  # codes 1, -1, 0 at the edge
    for on in (True, False):
        monkeypatch.setattr(x86, "TT_MASK_WORDS", on)
        spec = rule.plan(lx, batch, info, rule.default_params)
        assert spec.mask_words == (on and lanes > 0) and spec.mask_lanes == lanes
        assert spec.pixel_bits == (lx.op == "conv2d" and label != "conv_groups")
        func = ops.gemm_compute(spec).script()
        assert (f"tb_mask{lanes}_nz" in func) == spec.mask_words
        kern = rule.build(lx, batch, info, rule.default_params)
        measure.prepare_kernel(kern, lx, info, x)  # raises on any difference from the reference


def test_mask_words_spec_validation():
    lx = make_layer("conv2d", act="ternary", cin=3, out=8, hw=(9, 9), order="ijc")
    spec = ops.plan_gemm(lx, 1, "tt_planes", nb=8, mb_max=4, rows_per_task=64)
    assert spec.pixel_bits and spec.mask_lanes == 0
    with pytest.raises(ValueError, match="mask_words: tt_planes specs whose words"):
        dataclasses.replace(spec, mask_words=True)
    t2 = ops.plan_gemm(make_layer(), 1, "t2_avx2", nb=16, mb_max=4, rows_per_task=64)
    with pytest.raises(ValueError, match="layout 't2_avx2'"):
        dataclasses.replace(t2, mask_words=True)
    from ternbench.schedules.ops.compute import mask_word_ir
    with pytest.raises(ValueError, match="lanes must be one of"):
        mask_word_ir(24, False)
    ir = mask_word_ir(16, True)  # float inputs against the threshold, zero-extended to i64
    assert "fcmp ogt <16 x float>" in ir and "zext i16" in ir and "@tb_mask16f_neg" in ir


def test_isa_levels_and_forcing(monkeypatch):
    pytest.importorskip("tvm")
    if not _tvm.is_x86_host():
        pytest.skip("not an x86 host")
    assert _tvm.isa_of(frozenset({"avx2", "fma"})) == "avx2"
    assert _tvm.isa_of(frozenset({"avx512f", "avx512bw", "avx512vl", "avx2"})) == "avx512"
    assert _tvm.isa_of(frozenset()) == "generic"
    monkeypatch.delenv(_tvm.ISA_ENV, raising=False)
    have = _tvm.host_isa_levels()
    assert have[0] == "generic" and _tvm.target_info("x86").isa == have[-1]
    monkeypatch.setenv(_tvm.ISA_ENV, "generic")
    info = _tvm.target_info("x86")
    assert info.isa == "generic" and info.features == frozenset() and "forced" in info.description
    monkeypatch.setenv(_tvm.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="TERNBENCH_ISA must be one of"):
        _tvm.target_info("x86")
    monkeypatch.delenv(_tvm.ISA_ENV)
    with pytest.raises(ValueError, match="isa must be one of"):
        _tvm.force_isa("sse9")
    if "avx512" not in have:
        with pytest.raises(ValueError, match="cannot run ISA level 'avx512'"):
            _tvm.force_isa("avx512")
    _tvm.force_isa(have[-1])  # the CPU's own level is no forcing
    assert _tvm.ISA_ENV not in os.environ


def test_amx_level_is_avx512_with_tiles(monkeypatch):
    """``amx`` sits above ``avx512``: forcing ``avx512`` on an AMX CPU drops the tiles (the
    AMX rules step aside, as on an AVX-512 CPU without AMX) and keeps every AVX-512 feature;
    torch's int8 convs are kept off AMX beside it."""
    pytest.importorskip("tvm")
    from ternbench.bench.kernels.env import cap_torch_isa

    assert _tvm.isa_of(frozenset({"avx512f", "avx512bw", "avx512vl", "amx-tile"})) == "avx512"
    assert _tvm.isa_of(frozenset({"avx512f", "avx512bw", "avx512vl", "amx-tile",
                                  "amx-int8"})) == "amx"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    with cap_torch_isa("avx512"):
        assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_VNNI"
    assert "ONEDNN_MAX_CPU_ISA" not in os.environ
    if not _tvm.is_x86_host() or "amx" not in _tvm.host_isa_levels():
        pytest.skip("the tile-free level is only tested on a CPU with AMX-INT8 granted")
    monkeypatch.delenv(_tvm.ISA_ENV, raising=False)
    native = _tvm.target_info("x86")
    monkeypatch.setenv(_tvm.ISA_ENV, "avx512")
    forced = _tvm.target_info("x86")
    assert forced.isa == "avx512" and "-amx-tile" in forced.target_str
    assert forced.features == native.features - {"amx-tile", "amx-int8", "amx-bf16"}
    lx = make_layer("conv2d", cin=64, out=64, hw=(6, 6))
    assert measure.select_rule(lx, native).name == "x86.t2_amx"
    assert measure.select_rule(lx, forced).name != "x86.t2_amx"


@pytest.mark.tvm
def test_generic_fallback_without_avx2(tvm_mod, monkeypatch, caplog):
    """A target without AVX2 gets the portable kernels, with a log line, still exact."""
    real = _tvm.target_info("x86")
    plain = _tvm.TargetInfo(
        name="x86",
        target_str=real.target_str,
        kind="llvm",
        mcpu=real.mcpu,
        is_x86=True,
        features=frozenset(),
    )
    monkeypatch.setattr(_tvm, "target_info", lambda name: plain)
    monkeypatch.setattr(measure, "_fallback_logged", set())
    lx = make_layer("conv2d", out=16, cin=8, hw=(9, 9), stride=2, name="conv_plain")
    with caplog.at_level(logging.WARNING, logger="ternbench.schedules.measure"):
        lat = measure_layer(lx, batch=1, ev=EV)
    assert lat.impl == "tvm_t2_generic"
    assert "not optimized for x86" in caplog.text
    _sane(lat, lx, 1)


@pytest.mark.tvm
def test_same_shape_reuses_build(tvm_mod):
    a = make_layer(out=24, cin=48, seed=1, name="a")
    b = make_layer(out=24, cin=48, seed=2, name="b")
    info = _tvm.target_info("x86")
    rule = measure.select_rule(a, info)
    ka = rule.build(a, 1, info)
    n = ops.kernel_cache_size()
    assert rule.build(b, 1, info) is ka and ops.kernel_cache_size() == n
    assert rule.build(a, 2, info) is not ka  # batch is part of the shape
    measure_layer(b, ev=EV)  # other weights through the cached kernel: still exact


@pytest.mark.tvm
def test_mismatch_raises_for_wrong_reference(tvm_mod, monkeypatch):
    lx = make_layer(out=16, cin=32, name="bad_ref")
    real = measure.reference_output
    monkeypatch.setattr(measure, "reference_output", lambda lx_, a: real(lx_, a) * 1.001)
    with pytest.raises(KernelMismatchError, match="bad_ref"):
        measure_layer(lx, ev=EV)


@pytest.mark.tvm
def test_mismatch_raises_for_corrupted_kernel_weights(tvm_mod, monkeypatch):
    lx = make_layer("conv2d", out=16, cin=4, hw=(5, 5), name="bad_kernel")
    real = ops.pack_weight_args

    def corrupt(spec, lx_):
        args = real(spec, lx_)
        args[0] = args[0].copy()
        args[0].flat[0] ^= 0b11  # one 2-bit code (or int8 weight) changes
        return args

    monkeypatch.setattr(ops.packing, "pack_weight_args", corrupt)
    with pytest.raises(KernelMismatchError, match="bad_kernel"):
        measure_layer(lx, ev=EV)


@pytest.mark.tvm
def test_measure_with_given_input_and_threads(tvm_mod):
    lx = make_layer("conv2d", out=16, cin=8, hw=(6, 6), stride=2, name="given_x")
    x = torch.randn(1, 8, 6, 6) * 3  # cycled to batch 3; quantized with act_scale 0.05 (clips)
    lat = measure_layer(lx, batch=3, ev=EV, x=x, threads=2)
    _sane(lat, lx, 3)
    assert 1 <= lat.threads <= 2
    with pytest.raises(ValueError, match="per-sample shape"):
        measure_layer(lx, ev=EV, x=torch.randn(1, 7, 6, 6))


def test_torch_fp32_baseline():
    before = torch.get_num_threads()
    for lx in (
        make_layer("conv2d", out=16, cin=8, hw=(7, 7), stride=2, name="c"),
        make_layer("linear", out=10, cin=64, bias=False, name="l"),
    ):
        lat = measure_torch_fp32(lx, batch=2, ev=EV, threads=1)
        _sane(lat, lx, 2)
        assert lat.impl == "torch_fp32" and lat.target_str == "torch" and lat.threads == 1
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- ternary activations


def test_pack_planes_roundtrip():
    """Mask/sign planes with each group padded to whole 64-bit words, decoded bit by bit."""
    rng = np.random.default_rng(6)
    w = rng.integers(-1, 2, (5, 50)).astype(np.int8)
    gs, groups, gsp = 24, 3, 64  # groups of 24, 24 and 2 codes
    wm, ws = ops.pack_planes(w, groups, gs, gsp, nb=4, np_=8)
    assert wm.shape == ws.shape == (2, 3, 4) and wm.dtype == np.uint64
    j = np.arange(64, dtype=np.uint64)
    dec = np.zeros((8, groups * gsp), np.int64)
    for n in range(8):
        for q in range(groups):
            m = (wm[n // 4, q, n % 4] >> j) & np.uint64(1)
            sg = (ws[n // 4, q, n % 4] >> j) & np.uint64(1)
            dec[n, q * 64 : (q + 1) * 64] = m.astype(np.int64) * (1 - 2 * sg.astype(np.int64))
    for g in range(groups):
        k0, k1 = g * gs, min((g + 1) * gs, 50)
        np.testing.assert_array_equal(dec[:5, g * gsp : g * gsp + k1 - k0], w[:, k0:k1])
        assert not dec[:, g * gsp + k1 - k0 : (g + 1) * gsp].any()  # group padding: no bits
    assert not dec[5:].any()
    assert not (ws & ~wm).any()  # a sign bit only where the mask is set
    with pytest.raises(ValueError, match="ternary"):
        ops.pack_planes(w * 2, groups, gs, gsp, 4, 8)


def test_ternary_affine_terms_match_reference():
    """The host-side offset terms plus the integer dot products give the layer's output
    (numpy only), for a padded conv (border term) and an unpadded one (folded into bias)."""
    rng = np.random.default_rng(7)
    for pad in (1, 0):
        lx = make_layer("conv2d", out=6, cin=3, hw=(5, 4), stride=2, pad=pad, gs=8,
                        act="ternary", act_offset=0.25, w_offset=True, seed=pad)
        spec = ops.plan_gemm(lx, 2, "tt_planes", nb=4, mb_max=4, rows_per_task=64)
        assert spec.border == bool(pad) and spec.w_off and spec.affine
        assert spec.Kp == spec.G * 64 and spec.k_order == "cij"
        a = rng.integers(-1, 2, (2, 5, 4, 3)).astype(np.int8)  # NHWC codes
        t = ops.tt_affine_terms(lx, spec)
        xc = torch.from_numpy(a).permute(0, 3, 1, 2).double()
        cols = torch.nn.functional.unfold(xc, 3, padding=pad, stride=2).transpose(1, 2)
        cols = cols.reshape(-1, 27).numpy()  # [M, K] codes, zero on padded taps
        ones = torch.nn.functional.unfold(torch.ones_like(xc[:, :1]), 3, padding=pad, stride=2)
        valid = ones.transpose(1, 2).reshape(-1, 9).numpy()  # [M, taps]
        dots = np.stack([cols[:, g * 8 : (g + 1) * 8] @ lx.codes[:, g * 8 : (g + 1) * 8].T
                         for g in range(spec.G)], -1)  # [M, N, G]
        y = (dots * lx.scales[None] * lx.act_scale).sum(-1) + t["bias"][:6]
        y = y + t["Bw"][:6] * cols.sum(1, keepdims=True)
        if spec.border:
            y = y + valid @ t["Tw"][:, :6].astype(np.float64)
            # the kernel's lookup by border class gives the same per-output sums
            ho, wo = spec.out_hw
            r = np.arange(spec.M) % (ho * wo)
            tb = t["Tb"][t["Rc"][r // wo], t["Cc"][r % wo], :6]
            np.testing.assert_allclose(tb, valid @ t["Tw"][:, :6].astype(np.float64),
                                       rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y, measure.reference_output(lx, a), rtol=1e-5, atol=1e-5)


def test_kernel_input_quantizes_ternary():
    lx = make_layer("linear", cin=4, out=8, act="ternary")
    spec = ops.plan_gemm(lx, 2, "tt_planes", nb=8, mb_max=4, rows_per_task=64)
    x = torch.tensor([[0.6, -0.6, 0.5, -0.2], [-3.0, 0.0, 0.51, -0.5]])
    a = measure.kernel_input(lx, spec, x)
    np.testing.assert_array_equal(a, [[1, -1, 0, 0], [-1, 0, 1, 0]])
    rnd = measure.kernel_input(lx, spec)
    assert rnd.dtype == np.int8 and set(np.unique(rnd)) <= {-1, 0, 1}


TT_CASES = [
    # (label, make_layer kwargs, batch)
    ("lin_pc", dict(op="linear", out=16, cin=100), 2),
    ("lin_gs16_off", dict(op="linear", out=12, cin=72, gs=16, act_offset=-0.2, w_offset=True),
     3),
    ("lin_gs24_woff", dict(op="linear", out=10, cin=100, gs=24, w_offset=True), 1),
    ("conv_pc_s2", dict(op="conv2d", out=8, cin=8, hw=(7, 7), stride=2), 2),
    ("conv_pc_s2_off", dict(op="conv2d", out=8, cin=8, hw=(7, 7), stride=2, act_offset=0.3,
                            w_offset=True), 2),
    ("conv_gs16_s2_aoff", dict(op="conv2d", out=12, cin=5, hw=(6, 5), stride=2, gs=16,
                               act_offset=0.4), 1),
    ("conv_gs64_s2_off", dict(op="conv2d", out=16, cin=16, hw=(5, 5), stride=2, gs=64,
                              act_offset=0.3, w_offset=True), 1),
    ("conv_gs16_ijc_aoff", dict(op="conv2d", out=12, cin=8, hw=(6, 5), gs=16, act_offset=0.4,
                                order="ijc"), 1),
    ("conv1x1_nopad_off", dict(op="conv2d", out=8, cin=16, k=1, pad=0, hw=(4, 4),
                               act_offset=0.3, w_offset=True), 2),
    # 64 % C == 0: several whole taps per word, packed once per pixel (CIFAR-size layers)
    ("conv_c16_pix_off", dict(op="conv2d", out=16, cin=16, hw=(6, 6), act_offset=0.3,
                              w_offset=True), 2),
    ("conv_c32_pix_s2", dict(op="conv2d", out=24, cin=32, hw=(7, 7), stride=2), 1),
    ("conv_c1_pix", dict(op="conv2d", out=8, cin=1, hw=(5, 5)), 2),
    # a stem whose whole 3x3x3 kernel fits one word (27 bits, taps in k order)
    ("conv_c3_pix_off", dict(op="conv2d", out=16, cin=3, hw=(7, 6), act_offset=0.3,
                             w_offset=True), 2),
    ("conv_c3_pix_s2", dict(op="conv2d", out=8, cin=3, hw=(7, 7), stride=2), 1),
    # strided 1x1 (ResNet shortcuts): only the pixels it reads are packed
    ("conv1x1_s2_pix_off", dict(op="conv2d", out=16, cin=32, k=1, pad=0, stride=2, hw=(7, 7),
                                act_offset=0.3, w_offset=True), 2),
    ("conv1x1_s2_pix_c64", dict(op="conv2d", out=8, cin=64, k=1, pad=0, stride=2, hw=(6, 5)),
     1),
    # >= 16 words per group: AVX-512 keeps sum popc(nz) and sum popc(neg) apart (tt_split)
    ("conv_c128_pix_split", dict(op="conv2d", out=16, cin=128, hw=(5, 5)), 1),
    ("conv_c128_pix_split_off", dict(op="conv2d", out=24, cin=128, hw=(5, 4), stride=2,
                                     act_offset=0.3, w_offset=True), 2),
    ("lin_gs1024_split", dict(op="linear", out=16, cin=2000, gs=1024), 2),
    # AVX512-VBMI byte-table lookups (tt_lut): >= 32 channels in and out, or a stem; a partial
    # last channel quad, a partial last 64-channel block, stride 2, a 7x7 stem, a partial last
    # tile of an output row (17 = 7 + 7 + 3)
    ("conv_c128_n128_lut", dict(op="conv2d", out=128, cin=128, hw=(5, 5)), 2),
    ("conv_c64_n72_w17_lut", dict(op="conv2d", out=72, cin=64, hw=(4, 17)), 2),
    ("conv_c130_n136_s2_lut", dict(op="conv2d", out=136, cin=130, hw=(7, 6), stride=2), 1),
    ("conv_c2_k7_s2_lut", dict(op="conv2d", out=24, cin=2, hw=(11, 11), k=7, stride=2, pad=3),
     2),
]


@pytest.mark.tvm
@pytest.mark.parametrize(("label", "kw", "batch"), TT_CASES, ids=[c[0] for c in TT_CASES])
def test_ternary_kernel_matches_layer_reference(tvm_mod, label, kw, batch):
    """Ternary x ternary kernel vs ``methods._deploy.layer_reference`` on a float input."""
    from ternbench.core.reference import layer_reference

    lx = make_layer(**kw, act="ternary", name=label, seed=len(label))
    x = torch.randn(batch, *lx.input_shape, generator=torch.Generator().manual_seed(batch))
    if "_pix" in label:
        spec = ops.plan_gemm(lx, batch, "tt_planes", nb=8, mb_max=4, rows_per_task=64)
        assert spec.pixel_bits and not spec.has_input_stage
        # 16 and 32 channels: words of one kernel row (X_rows), K padded per kernel row
        assert spec.row_words == (lx.in_channels in (16, 32) and lx.kernel_size[0] > 1)
        if spec.row_words:
            assert spec.Kp == 3 * spec.row_chunks * 64
    impl, y = run_layer(lx, x)
    assert impl == expected_tt_impl(x86_info().features, lx, x86.full_rate_permutes(x86_info()),
                                    amx_granted())
    ref = layer_reference(lx, x).numpy()
    assert y.shape == ref.shape
    affine = lx.act_offset != 0.0 or lx.weight_offset is not None
    rtol = measure.FLOAT_RTOL if affine else measure.INT_RTOL
    err = np.abs(y - ref).max()
    assert err <= rtol * np.abs(ref).max(), (err, np.abs(ref).max())
    assert np.abs(ref).max() > 1.0  # the check is not vacuous
    lat = measure_layer(lx, batch=batch, ev=EV, x=x)
    _sane(lat, lx, batch)


PER_TASK_CASES = [
    # (label, make_layer kwargs, batch): >= 16 row tasks of 64 rows, so the im2col rows (or the
    # ternary plane words) are built inside each row task instead of as one matrix first
    ("t2_pad", dict(op="conv2d", out=16, cin=8, hw=(32, 32)), 1),
    ("t2_gs4_cij_s2", dict(op="conv2d", out=16, cin=16, gs=4, hw=(45, 46), stride=2), 2),
    ("int8_stem_krow", dict(op="conv2d", fmt="int8", out=16, cin=3, k=7, stride=2, pad=3,
                            hw=(64, 64)), 1),
    ("tt_pixel", dict(op="conv2d", out=16, cin=16, hw=(32, 32), act="ternary"), 1),
    # K padded (FGQ groups): one im2col stage, its columns unrolled (compute.unrolled_im2col)
    ("t2_gs4_stem", dict(op="conv2d", out=16, cin=3, gs=4, hw=(32, 32), order="ijc"), 1),
    ("t2_gs64_c16", dict(op="conv2d", out=16, cin=16, gs=64, hw=(32, 32), order="ijc"), 1),
]


@pytest.mark.tvm
@pytest.mark.parametrize("max_k", [0, 64, 256])
def test_padded_im2col_one_stage_or_two(tvm_mod, max_k, monkeypatch):
    """A grouped conv whose padded im2col row (K = 27 -> Kp) is at most
    ``UNROLLED_IM2COL_MAX_K`` wide builds it in one stage with every column unrolled; a wider
    one (here: the limit 0) as the im2col proper (``A_core``) plus a padding copy. Both exact."""
    from ternbench.core.reference import layer_reference
    from ternbench.schedules.ops import compute

    monkeypatch.setattr(x86, "_applies_bf16_amx", lambda lx, target: False)
    monkeypatch.setattr(compute, "UNROLLED_IM2COL_MAX_K", max_k)
    # the kernel caches are keyed by spec, which does not hold the limit
    monkeypatch.setattr(graph, "_SCHED_CACHE", {})
    monkeypatch.setattr(ops.rules, "_CACHE", {})
    lx = make_layer("conv2d", out=16, cin=3, gs=4, hw=(9, 7), order="ijc", seed=11)
    _rule, spec, func = graph.scheduled_kernel(lx, 2, x86_info())
    assert spec.Kp != spec.K == 27 and not spec.k_row
    one_stage = spec.Kp <= max_k
    assert compute.unrolled_im2col(spec) == one_stage
    assert generic.has_block(_tvm.require_tvm().s_tir.Schedule(func), "A_core") != one_stage
    x = torch.randn(2, *lx.input_shape, generator=torch.Generator().manual_seed(2))
    _impl, y = run_layer(lx, x)
    ref = layer_reference(lx, x).numpy()
    assert np.abs(y - ref).max() <= measure.FLOAT_RTOL * np.abs(ref).max()
    assert np.abs(ref).max() > 1.0


@pytest.mark.tvm
@pytest.mark.parametrize(("label", "kw", "batch"), PER_TASK_CASES,
                         ids=[c[0] for c in PER_TASK_CASES])
def test_per_task_input_stage_matches_reference(tvm_mod, label, kw, batch, monkeypatch):
    """Convs large enough to build their im2col / plane words per row task stay exact (the
    grouped conv on the integer group kernel, not AMX-BF16's)."""
    from ternbench.core.reference import layer_reference

    monkeypatch.setattr(x86, "_applies_bf16_amx", lambda lx, target: False)
    tvm = _tvm.require_tvm()
    lx = make_layer(**kw, name=label, seed=7)
    _rule, spec, func = graph.scheduled_kernel(lx, batch, x86_info())
    assert -(-spec.M // spec.m_task) >= generic.LOCAL_IM2COL_MIN_TASKS
    # the input stage sits under the GEMM's task loop, not at the root
    sch = tvm.s_tir.Schedule(func)
    stage = "A_bits" if spec.layout == "tt_planes" else "A_in"
    task = sch.get(sch.get_loops(sch.get_sblock("out"))[0])
    assert sch.get(sch.get_loops(sch.get_sblock(stage))[0]).same_as(task)
    x = torch.randn(batch, *lx.input_shape, generator=torch.Generator().manual_seed(1))
    _impl, y = run_layer(lx, x)
    ref = layer_reference(lx, x).numpy()
    assert np.abs(y - ref).max() <= measure.FLOAT_RTOL * np.abs(ref).max()
    assert np.abs(ref).max() > 1.0


@pytest.mark.tvm
def test_ternary_generic_fallback_without_avx2(tvm_mod, monkeypatch, caplog):
    from ternbench.core.reference import layer_reference

    real = _tvm.target_info("x86")
    plain = dataclasses.replace(real, features=frozenset())
    monkeypatch.setattr(_tvm, "target_info", lambda name: plain)
    monkeypatch.setattr(measure, "_fallback_logged", set())
    lx = make_layer("conv2d", out=6, cin=3, gs=8, hw=(6, 6), stride=2, act="ternary",
                    act_offset=0.2, w_offset=True, name="tt_plain")
    x = torch.randn(2, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="ternbench.schedules.measure"):
        impl, y = run_layer(lx, x)
    assert impl == "tvm_tt_popc_generic" and "not optimized for x86" in caplog.text
    ref = layer_reference(lx, x).numpy()
    assert np.abs(y - ref).max() <= measure.FLOAT_RTOL * np.abs(ref).max()


@pytest.mark.tvm
def test_ternary_mismatch_raises(tvm_mod, monkeypatch):
    lx = make_layer("conv2d", out=8, cin=4, hw=(5, 5), act="ternary", act_offset=0.3,
                    w_offset=True, name="bad_tt")
    real_ref = measure.reference_output
    monkeypatch.setattr(measure, "reference_output", lambda lx_, a: real_ref(lx_, a) + 0.01)
    with pytest.raises(KernelMismatchError, match="bad_tt"):
        measure_layer(lx, ev=EV)
    monkeypatch.setattr(measure, "reference_output", real_ref)
    real_pack = ops.pack_weight_args

    def corrupt(spec, lx_):
        args = real_pack(spec, lx_)
        if spec.layout == "tt_lut":  # the byte-table lookups (a stem, AVX512-VBMI)
            args[0] = args[0].copy()
            args[0][0] = 80 - args[0][0]  # tap 0's indices of the negated weights
        else:
            args[1] = args[1].copy()
            args[1].flat[0] ^= np.uint64(0xFFFF)  # flip 16 sign bits: some nonzero codes flip
        return args

    monkeypatch.setattr(ops.packing, "pack_weight_args", corrupt)
    with pytest.raises(KernelMismatchError, match="bad_tt"):
        measure_layer(lx, ev=EV)


@pytest.mark.tvm
def test_twn_layer_matches_layer_reference(tvm_mod):
    from ternbench.core.reference import layer_reference

    lx = make_layer("conv2d", out=16, cin=6, gs=9, hw=(7, 7), stride=2, act="fp32", name="twn")
    x = torch.randn(2, 6, 7, 7)
    impl, y = run_layer(lx, x)
    assert impl == "tvm_t2_f32"
    ref = layer_reference(lx, x).numpy()
    assert np.abs(y - ref).max() <= measure.FLOAT_RTOL * np.abs(ref).max()


@pytest.mark.tvm
def test_new_kernels_are_vectorised(isa):
    info = x86_info()
    if isa == "generic":
        pytest.skip("the generic level has no vector popcount or FMA to look for")
    lx = make_layer(act="ternary")
    asm = measure.select_rule(lx, info).build(lx, 1, info).module.inspect_source("asm")
    if "avx512vpopcntdq" in info.features:
        assert "vpopcntq" in asm  # one instruction per 4/8 words
    else:
        assert "vpshufb" in asm and "vpsadbw" in asm  # AVX2 vector popcount: nibble lookups
    twn = make_layer(act="fp32")
    asm = measure.select_rule(twn, info).build(twn, 4, info).module.inspect_source("asm")
    assert "vcvtdq2ps" in asm  # the 2-bit codes decoded to fp32 vectors
    if "fma" in info.features:
        assert "vfmadd" in asm


def test_torch_fp32_baseline_ternary_export():
    """Ternary-activation exports (with weight offsets) time torch on float input."""
    for lx in (
        make_layer("conv2d", out=8, cin=4, hw=(6, 6), act="ternary", act_offset=0.3,
                   w_offset=True, name="tc"),
        make_layer("linear", out=10, cin=40, gs=8, act="ternary", name="tl"),
    ):
        lat = measure_torch_fp32(lx, batch=2, ev=EV, threads=1)
        _sane(lat, lx, 2)
        assert lat.impl == "torch_fp32"
        w = measure.fp32_weight(lx)
        off = 0.0 if lx.weight_offset is None else lx.weight_offset[:, None]
        np.testing.assert_array_equal(w, lx.dequantized_weight() + off)


@pytest.mark.tvm
@pytest.mark.parametrize("mcpu,rule", [("sapphirerapids", "x86.t2_avx512vnni"),
                                       ("alderlake", "x86.t2_avxvnni"),
                                       ("znver3", "x86.t2_avx2")])
def test_vnni_variant_selected_by_cpu_features(tvm_mod, mcpu, rule):
    """On a VNNI CPU the int8-activation kernel is one vpdpbusd per 8x4 tile (same packing);
    built here for that CPU and checked in its assembly (this host cannot run it)."""
    import tvm
    from tvm.target import codegen

    t = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    feats = frozenset(f for f in _tvm._GATED_FEATURES if codegen.llvm_cpu_has_features(f, t))
    info = _tvm.TargetInfo(name="x86", target_str=str(t), kind="llvm", mcpu=mcpu, is_x86=True,
                           features=feats, family="x86", local=False)
    lx = make_layer("conv2d", cin=16, out=16, hw=(6, 6))
    chosen = measure.select_rule(lx, info)
    assert chosen.name == rule
    asm = chosen.build(lx, 1, info).executable.mod.inspect_source("s")
    if "vnni" in rule:
        assert "vpdpbusd" in asm and "vpmaddubsw" not in asm
    else:
        assert "vpmaddubsw" in asm and "vpdpbusd" not in asm


@pytest.mark.tvm
@pytest.mark.parametrize("params", [{"nb": 16, "mb": 4, "rows": 64, "tn": 8},
                                    {"nb": 32, "mb": 2, "rows": 16, "tn": 16},
                                    {"nb": 16, "mb": 4, "rows": 64, "tn": 16}])
@pytest.mark.parametrize("kw", [dict(op="conv2d", cin=16, out=20, hw=(7, 7), gs=4),
                                dict(op="linear", cin=200, out=40, gs=16),
                                dict(op="conv2d", cin=8, out=24, hw=(6, 6), stride=2)],
                         ids=["conv_gs4_n20", "linear_gs16", "conv_s2"])
def test_vnni_tile_widths_are_exact(tvm_mod, params, kw, monkeypatch):
    """The AVX-512 VNNI rule's 8-wide (ymm) and 16-wide (zmm) tiles both match the reference
    (groups, padded N, strides), so a tile search may pick either (grouped convs: with
    AMX-BF16's rule off)."""
    monkeypatch.setattr(x86, "_applies_bf16_amx", lambda lx, target: False)
    info = x86_info()
    if not {"avx512vnni", "avx512vl", "avx512bw"} <= info.features:
        pytest.skip(f"this CPU (isa {info.isa}) has no AVX512-VNNI")
    lx = make_layer(**kw, name="vnni_tiles")
    rule = measure.select_rule(lx, info)
    assert rule.name == "x86.t2_avx512vnni"
    assert any(p.get("tn") == 8 for p in rule.grid) and rule.default_params["tn"] == 16
    lat = measure_layer(lx, batch=2, ev=EV, params=params)
    assert lat.impl == "tvm_t2_vnni" and np.isfinite(lat.max_abs_err)


def test_avx2_intrinsic_refuses_wide_tiles():
    pytest.importorskip("tvm")
    spec = ops.plan_gemm(make_layer(out=32), 1, "t2_avx2", nb=32, mb_max=4, rows_per_task=64,
                         tile_n=16)
    with pytest.raises(ValueError, match="8-wide tiles only"):
        x86.schedule_t2_avx2(ops.gemm_compute(spec), spec)
    with pytest.raises(ValueError, match="8 or 16"):
        ops.plan_gemm(make_layer(out=32), 1, "t2_avx2", nb=32, mb_max=4, rows_per_task=64,
                      tile_n=32)


@pytest.mark.tvm
@pytest.mark.parametrize("kw", [dict(op="conv2d", cin=16, out=16, hw=(6, 6), gs=4),
                                dict(act="ternary", cin=64, out=16),
                                dict(fmt="fp32", act="fp32", cin=32, out=16)])
def test_cpu_tiles_are_not_local_workspace_buffers(tvm_mod, kw):
    """Register tiles use generic.TILE_SCOPE: TVM 0.27 turns every "local" CPU allocation into
    a heap workspace that LLVM cannot keep in registers (FGQ N=4 ran 2.5x slower)."""
    from ternbench.schedules.graph import scheduled_kernel

    lx = make_layer(**kw, name="tiles")
    _rule, _spec, func = scheduled_kernel(lx, 1, x86_info())
    assert 'scope="local"' not in func.script()


def test_row_tiles_avoid_one_row_tiles_on_7x7_maps():
    """M = 49 (ResNet-18 layer4 at batch 1) has no divisor in 2..4: the tile takes 7 rows
    rather than 1 (one-row tiles re-read every weight and scale per row)."""
    from ternbench.schedules.ops.spec import _row_tiles

    assert _row_tiles(49, 4, 64)[0] == 7
    assert _row_tiles(784, 4, 64)[0] == 4
    assert _row_tiles(49, 2, 64)[0] == 1  # 2-row tiles (tt_popc512): 7 would spill
    assert _row_tiles(9, 4, 64)[0] == 3


def test_vnni_zmm_tile_rows_by_layer_and_cpu():
    """The AVX-512 VNNI plan takes 8-row register tiles, except 4 on one-tap layers with few
    inputs, and 4 everywhere on Zen (there FGQ's group kernels and the dense int8 stem took up
    to 2.2x the time with 8, and one group gained nothing)."""
    from ternbench.schedules import x86

    rule = next(r for r in x86.rules() if r.name == "x86.t2_avx512vnni")
    feats = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni"})

    def rows(lx, mcpu):
        info = _tvm.TargetInfo(name="x86", target_str="{}", kind="llvm", mcpu=mcpu,
                               is_x86=True, features=feats)
        assert rule.applies(lx, info)
        return rule.plan(lx, 8, info, rule.default_params).mb

    one = make_layer("conv2d", out=64, cin=64, hw=(16, 16))
    fgq = make_layer("conv2d", out=64, cin=64, hw=(16, 16), gs=4)
    short = make_layer("conv2d", out=64, cin=32, hw=(16, 16), k=1, pad=0)
    assert [rows(lx, "znver4") for lx in (one, fgq, short)] == [4, 4, 4]
    assert [rows(lx, "sapphirerapids") for lx in (one, fgq, short)] == [8, 8, 4]


def test_dense_blocks_clamped_to_the_channels():
    """The 32-wide AVX-512 FP32 default on a 16-channel conv would compute 16 padding channels;
    such a clamped conv also gets row tasks of at most ``DENSE_NARROW_ROWS``."""
    from ternbench.schedules import x86

    rule = next(r for r in x86.rules() if r.name == "x86.fp32_512")
    info = _tvm.TargetInfo(name="x86", target_str="{}", kind="llvm", mcpu="znver4",
                           is_x86=True, features=frozenset({"avx2", "avx512f"}))
    for out, nb in ((16, 16), (10, 16), (64, 32)):
        lx = make_layer("conv2d", "fp32", out=out, cin=16, act="fp32")
        assert rule.applies(lx, info)
        spec = rule.plan(lx, 2, info, rule.default_params)
        assert (spec.nb, spec.Np) == (nb, max(nb, out)), out
        # a clamped conv block also takes shorter row tasks (the 3-channel CIFAR stem ran 0.7x)
        rows = 32 if nb < 32 else 64
        assert spec.mb * spec.m_task == rows, (out, spec.mb, spec.m_task)


@pytest.mark.parametrize("cin,inlined", [(1, True), (3, True), (4, True), (8, False)])
def test_small_channel_float_convs_read_their_input_in_the_gemm(tvm_mod, cin, inlined):
    """A float conv with 1-4 input channels has no im2col stage (its GEMM reads ``X_pad``);
    wider ones keep it. Both compute the reference (``measure_layer`` checks before timing)."""
    from ternbench.schedules import generic

    lx = make_layer("conv2d", "fp32", out=16, cin=cin, hw=(7, 7), act="fp32")
    spec = ops.plan_gemm(lx, 2, "dense_blocked", nb=16, mb_max=4, rows_per_task=64)
    script = generic.schedule_blocked(ops.gemm_compute(spec), spec).script()
    assert ("A_in" in script) is not inlined
    assert "X_pad" in script  # the padding copy stays
    lat = measure_layer(lx, batch=2, ev=EV)
    _sane(lat, lx, 2)


def test_latency_rows_report_the_tile_the_plan_built():
    """``kernels.csv``'s ``tile`` column is the plan's tile, not the grid point: on Zen the VNNI
    grid point asks for 8 rows and gets 4; on a 16-channel conv the FP32 one asks for 32
    channels and gets 16."""
    from ternbench.bench.kernels.impls import kernel_tile

    feats = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni"})
    info = _tvm.TargetInfo(name="x86", target_str="{}", kind="llvm", mcpu="znver4",
                           is_x86=True, features=feats)
    rules = {r.name: r for r in x86.rules()}
    vnni, fp32 = rules["x86.t2_avx512vnni"], rules["x86.fp32_512"]
    lx = make_layer("conv2d", out=64, cin=64, hw=(16, 16))
    tile = kernel_tile(vnni.plan(lx, 8, info, vnni.default_params))
    assert (vnni.default_params["mb"], tile["mb"], tile["tn"]) == (8, 4, 16)
    lx = make_layer("conv2d", "fp32", out=16, cin=16, act="fp32")
    tile = kernel_tile(fp32.plan(lx, 2, info, fp32.default_params))
    assert (fp32.default_params["nb"], tile["nb"]) == (32, 16) and "tn" not in tile


@pytest.mark.tvm
def test_int8_tile_correction_starts_the_accumulator(tvm_mod, monkeypatch):
    """The u8 x s8 tiles' offset correction is the accumulator's initial value (no subtraction
    per group in the epilogue); the kernel stays exact (checked by the layer cases above)."""
    from ternbench.schedules.graph import scheduled_kernel

    monkeypatch.setattr(x86, "_applies_bf16_amx", lambda lx, target: False)
    lx = make_layer("conv2d", cin=16, out=16, hw=(6, 6), gs=4, name="cw_init")
    rule, _spec, func = scheduled_kernel(lx, 1, x86_info())
    if "t2" not in rule.name or "generic" in rule.name:
        pytest.skip(f"{rule.name} has no tile correction")
    text = func.script()
    # Cw block-major [Np/nb, G, nb] (ops.gemm_compute)
    assert re.search(r"= 0 - Cw\[v_n // \d+, v_g, v_n % \d+\]", text)
    assert "- Cw[" not in text.replace("= 0 - Cw[", "")
