"""ternbench.schedules.cuda: CUDA rules, codegen, emulated correctness, and GPU runs.

Without a GPU (``tvm`` marker): every format's rule is selected and builds CUDA code for sm_90
(sm_80 too), the generated source compiles with NVRTC, and every schedule is run on the CPU as
its serial equivalent with per-thread register poisoning (``cuda.emulate_layer``) against the
float64 reference. Negative tests show that the emulation and the static checks catch the
schedule bugs they are meant to catch (and the dlight double-bias bug).

With a GPU (``gpu`` marker, ``pytest -m gpu tests/test_cuda.py``): the same layers are built
for the visible device, run, checked against the reference and timed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from ternbench.schedules import (
    EvaluatorCfg,
    KernelMismatchError,
    UnsupportedLayerError,
    _tvm,
    check_layer,
    cuda,
    measure,
    measure_layer,
    ops,
)
from test_schedules import make_layer

EV = EvaluatorCfg(number=3, repeat=3, min_repeat_ms=0)

# (label, make_layer kwargs, batch, rule selected for it)
CASES = [
    ("linear_b1", dict(out=48, cin=128), 1, "cuda.t2_gemv"),  # split-K, one group
    ("linear_b64", dict(out=64, cin=128), 64, "cuda.t2_gemv"),  # tiled, shared staging
    ("linear_odd_k", dict(out=10, cin=27), 3, "cuda.t2_gemv"),  # predicated K split, N pad
    ("linear_fgq_gs4", dict(out=32, cin=64, gs=4), 1, "cuda.t2_gemv"),  # split-K over groups
    ("linear_partial_gs7", dict(out=16, cin=30, gs=7), 2, "cuda.t2_gemv"),  # G=5, last partial
    ("conv3x3_pad", dict(op="conv2d", out=32, cin=16, hw=(8, 8)), 2, "cuda.t2_gemm"),
    ("conv_first", dict(op="conv2d", out=8, cin=3, hw=(6, 6), bias=False), 1, "cuda.t2_gemm"),
    ("conv_fgq_gs4", dict(op="conv2d", out=16, cin=8, gs=4, hw=(6, 6), stride=2), 1,
     "cuda.t2_gemm"),
    ("conv1x1_tiny", dict(op="conv2d", out=24, cin=16, k=1, pad=0, hw=(2, 2)), 1,
     "cuda.t2_gemm"),  # M = 4 rows: split-K with an im2col stage
    ("linear_twn", dict(act="fp32", out=32, cin=64), 1, "cuda.t2_gemv"),
    ("conv_twn_s2", dict(op="conv2d", act="fp32", out=8, cin=3, hw=(9, 9), stride=2), 2,
     "cuda.t2_gemm"),
    ("linear_tt", dict(act="ternary", out=16, cin=100), 2, "cuda.tt_popc"),
    ("linear_tt_gs16_off", dict(act="ternary", out=12, cin=72, gs=16, act_offset=-0.2,
                                w_offset=True), 3, "cuda.tt_popc"),
    ("conv_tt_off", dict(op="conv2d", act="ternary", out=8, cin=8, hw=(7, 7), stride=2,
                         act_offset=0.3, w_offset=True), 1, "cuda.tt_popc"),
    ("conv_tt_gs16", dict(op="conv2d", act="ternary", out=12, cin=5, hw=(6, 5), stride=2,
                          gs=16, act_offset=0.4), 2, "cuda.tt_popc"),
    ("conv_tt_pixel", dict(op="conv2d", act="ternary", out=16, cin=64, hw=(5, 5),
                           w_offset=True), 1, "cuda.tt_popc"),  # X_bits per pixel (C % 64 == 0)
    ("conv_tt_rows_c32", dict(op="conv2d", act="ternary", out=16, cin=32, hw=(6, 5), stride=2,
                              act_offset=0.3, w_offset=True), 2, "cuda.tt_popc"),  # X_rows
    ("conv_tt_1x1_s2", dict(op="conv2d", act="ternary", out=8, cin=16, k=1, pad=0, stride=2,
                            hw=(7, 6), act_offset=0.3), 1, "cuda.tt_popc"),  # strided X_bits
    ("conv_gs8_ijc", dict(op="conv2d", out=16, cin=12, gs=8, hw=(6, 6), order="ijc"), 1,
     "cuda.t2_gemm"),
    ("conv_tt_stem_c3", dict(op="conv2d", act="ternary", out=8, cin=3, hw=(6, 6),
                             act_offset=0.3, w_offset=True), 1, "cuda.tt_popc"),  # one word
    ("linear_int8", dict(fmt="int8", out=32, cin=64), 1, "cuda.int8"),
    ("conv_int8", dict(op="conv2d", fmt="int8", out=16, cin=8, hw=(7, 7), stride=2), 2,
     "cuda.int8"),
    ("linear_fp32", dict(fmt="fp32", act="fp32", out=10, cin=64), 4, "cuda.fp32"),
    ("conv_fp32", dict(op="conv2d", fmt="fp32", act="fp32", out=8, cin=3, hw=(6, 6)), 1,
     "cuda.fp32"),
]
IDS = [c[0] for c in CASES]
#: realistic layer shapes, run on a GPU only (too large to emulate in the default test run)
BIG_CASES = [
    ("big_linear_4096", dict(out=4096, cin=4096), 1, "cuda.t2_gemv"),
    ("big_linear_gs64", dict(out=1024, cin=4096, gs=64), 1, "cuda.t2_gemv"),
    ("big_linear_b64", dict(out=1024, cin=1024), 64, "cuda.t2_gemv"),
    ("big_conv_56", dict(op="conv2d", out=64, cin=64, hw=(56, 56)), 4, "cuda.t2_gemm"),
    ("big_conv_fgq4", dict(op="conv2d", out=64, cin=64, gs=4, hw=(28, 28)), 2, "cuda.t2_gemm"),
    ("big_conv_tt_off", dict(op="conv2d", act="ternary", out=128, cin=64, hw=(28, 28),
                             stride=2, act_offset=0.3, w_offset=True), 2, "cuda.tt_popc"),
    ("big_conv_int8", dict(op="conv2d", fmt="int8", out=128, cin=128, hw=(14, 14)), 8,
     "cuda.int8"),
    ("big_linear_fp32", dict(fmt="fp32", act="fp32", out=1000, cin=512), 32, "cuda.fp32"),
    ("big_conv_twn", dict(op="conv2d", act="fp32", out=128, cin=64, hw=(28, 28), gs=64), 4,
     "cuda.t2_gemm"),
]
#: the dlight fallback on a cross-section (single group: its GEMV / Matmul rules; several
#: groups and the multi-stage ternary-activation funcs: Fallback)
DLIGHT_CASES = ["linear_b1", "linear_b64", "conv3x3_pad", "conv_fgq_gs4", "conv_tt_off",
                "linear_int8", "conv_fp32"]


def _layer(label: str):
    _label, kw, batch, rule = next(c for c in CASES + BIG_CASES if c[0] == label)
    return make_layer(**kw, name=label, seed=len(label)), batch, rule


def _rule(name: str) -> ops.Rule:
    return next(r for r in cuda.rules() if r.name == name)


def _cuda_target(arch: str = "sm_90") -> _tvm.TargetInfo:
    """The ``cuda`` target for ``arch`` (codegen only: ``local`` is False)."""
    base = _tvm.target_info("cuda")
    return dataclasses.replace(base, target_str=json.dumps({"arch": arch, "kind": "cuda"},
                                                           sort_keys=True),
                               mcpu=arch, local=False)


@pytest.fixture
def tvm_mod():
    return pytest.importorskip("tvm")


@pytest.fixture
def nvrtc(tvm_mod):
    why = cuda.compiler_unavailable_reason("nvrtc")
    if why:
        pytest.skip(f"cannot compile CUDA source here: {why}")


def _has_gpu() -> bool:
    return _tvm.cuda_arch() is not None


needs_gpu = pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU visible (torch.cuda)")


# ----------------------------------------------------------------------------- no TVM needed


def test_rules_cover_every_format():
    """Every format has a hand rule, dlight comes last and accepts all of them, and formats
    without a kernel raise (there is no CPU fallback for CUDA)."""
    tinfo = _tvm.target_info("cuda")
    assert tinfo.family == "cuda" and tinfo.kind == "cuda"
    names = [r.name for r in cuda.rules()]
    assert names == ["cuda.t2_gemv", "cuda.t2_gemm", "cuda.tt_popc", "cuda.int8", "cuda.fp32",
                     "cuda.dlight"]
    for label, _kw, _batch, rule in CASES:
        lx, _b, _r = _layer(label)
        assert measure.select_rule(lx, tinfo).name == rule, label
        assert _rule("cuda.dlight").applies(lx, tinfo), label
    x86 = _tvm.TargetInfo(name="x86", target_str="{}", kind="llvm", mcpu="generic", is_x86=True,
                          features=frozenset({"avx2"}))
    assert not any(r.applies(make_layer(), x86) for r in cuda.rules())
    with pytest.raises(UnsupportedLayerError, match="no CUDA kernel"):
        measure.select_rule(make_layer(fmt="int8", act="ternary"), tinfo)
    assert _rule("cuda.t2_gemv").impl_for(make_layer(act="fp32")) == "tvm_t2_gemv_cuda_a32"


def test_plan_picks_the_kernel_by_rows_and_caps_threads():
    tinfo = _tvm.target_info("cuda")
    rule = _rule("cuda.t2_gemm")
    small = rule.plan(make_layer(), 1, tinfo, rule.default_params)
    assert small.M <= cuda.GEMV_MAX_M and (small.nb, small.mb, small.m_task) == (16, 1, 1)
    big = rule.plan(make_layer(op="conv2d"), 1, tinfo, rule.default_params)
    assert (big.nb, big.mb, big.m_task) == (64, 2, 16) and big.layout == "t2_blocked"
    assert big.M % (big.mb * big.m_task) == 0 and big.Np % big.nb == 0
    # rows=64 with mb=1 would be 64 x 32 threads: capped at 1024
    capped = rule.plan(make_layer(op="conv2d"), 1, tinfo, {"nb": 64, "mb": 1, "rows": 64})
    assert capped.m_task * min(32, capped.nb) <= 1024
    for r in cuda.rules()[:-1]:
        assert r.grid and r.grid[0] == r.default_params
        assert len({json.dumps(dict(p), sort_keys=True) for p in r.grid}) == len(r.grid)


# ----------------------------------------------------------------------------- codegen


@pytest.mark.tvm
@pytest.mark.parametrize("label", ["linear_b1", "linear_b64", "conv3x3_pad", "conv_fgq_gs4",
                                   "linear_tt", "conv_tt_off", "linear_twn", "linear_int8",
                                   "conv_fp32"])
def test_cuda_codegen(tvm_mod, label):
    """``build_layer(..., "cuda")`` works without a GPU: the selected hand rule generates
    thread-bound ``__global__`` kernels with the structure it is meant to have."""
    lx, batch, rule = _layer(label)
    kern = measure.build_layer(lx, batch, "cuda")
    assert kern.rule == rule and kern.impl == _rule(rule).impl_for(lx)
    assert '"kind": "cuda"' in kern.target_str and kern.spec.M == batch * math.prod(lx.output_hw)
    src = cuda.kernel_source(kern)
    assert src.count("extern \"C\" __global__") >= 2  # declaration + definition
    assert "threadIdx.x" in src and "__launch_bounds__" in src
    if kern.spec.M <= cuda.GEMV_MAX_M:
        assert "threadIdx.y" in src and "red_buf" in src  # the cross-thread reduction
    elif kern.spec.G == 1 and (kern.spec.layout == "tt_planes" or kern.spec.K % 8 == 0):
        assert "__shared__" in src and "__syncthreads()" in src  # staged K steps
    if kern.spec.layout == "tt_planes":
        assert "__popcll" in src
    if not _has_gpu():  # built, never run or timed here
        chk = check_layer(lx, batch=batch, target="cuda")
        assert (chk.status, chk.why, chk.impl) == ("built", "no GPU visible", kern.impl)
        with pytest.raises(RuntimeError, match="does not run in this process"):
            measure_layer(lx, batch=batch, target="cuda", ev=EV)


@pytest.mark.tvm
def test_cuda_source_compiles_for_sm90_and_sm80(nvrtc):
    """The generated CUDA C compiles with NVRTC (what TVM's runtime does when the module is
    first loaded on a GPU) for Hopper and for Ampere, code generated for each arch."""
    for label in ("linear_b1", "conv3x3_pad", "conv_tt_off"):
        lx, batch, rule = _layer(label)
        for arch in ("sm_90", "sm_80"):
            tinfo = _cuda_target(arch)
            kern = measure.select_rule(lx, tinfo).build(lx, batch, tinfo)
            assert kern.rule == rule and json.loads(kern.target_str)["arch"] == arch
            cubin = cuda.compile_kernel(kern)
            assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000


@pytest.mark.tvm
def test_compile_kernel_reports_compiler_errors(nvrtc, monkeypatch):
    lx, batch, _name = _layer("linear_b1")
    kern = measure.build_layer(lx, batch, "cuda")
    src = cuda.kernel_source(kern)
    monkeypatch.setattr(cuda.nvrtc, "kernel_source",
                        lambda k: src.replace("__global__", "__global__ garbage_token", 1))
    with pytest.raises(RuntimeError, match="garbage_token"):
        cuda.compile_kernel(kern)
    with pytest.raises(ValueError, match="CUDA compiler"):
        cuda.compile_kernel(kern, compiler="clang")


# ----------------------------------------------------------------------------- emulation


@pytest.mark.tvm
@pytest.mark.parametrize("label", IDS)
def test_emulated_schedule_matches_reference(tvm_mod, label):
    """Each hand schedule, run serially on the CPU with poisoned registers (two thread
    orders), equals the float64 reference within the kernel's tolerance."""
    lx, batch, rule = _layer(label)
    name, err = cuda.emulate_layer(lx, batch)
    assert name == rule and math.isfinite(err)


@pytest.mark.tvm
@pytest.mark.parametrize("label", DLIGHT_CASES)
def test_emulated_dlight_matches_reference(tvm_mod, label):
    lx, batch, _name = _layer(label)
    name, err = cuda.emulate_layer(lx, batch, rule=_rule("cuda.dlight"))
    assert name == "cuda.dlight" and math.isfinite(err)
    kern = _rule("cuda.dlight").build(lx, batch, _tvm.target_info("cuda"))
    assert "__global__" in cuda.kernel_source(kern)


@pytest.mark.tvm
def test_plain_dlight_double_counts_the_bias(tvm_mod):
    """Why :func:`cuda.fold_unit_reductions` exists: TVM 0.27 dlight on an unfolded single-group
    PrimFunc adds the bias twice (the emulation catches it)."""
    from tvm.s_tir import dlight as dl

    def plain_dlight(func, spec):
        tvm = _tvm.require_tvm()
        with _tvm.target_info("cuda").target():
            return dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Matmul(), dl.gpu.Reduction(),
                                           dl.gpu.Fallback())(tvm.IRModule({"main": func}))

    lx = make_layer(out=16, cin=32, name="dlight_bias")
    assert lx.bias is not None and np.abs(lx.bias).max() > 0.1
    plain = dataclasses.replace(_rule("cuda.dlight"), name="plain_dlight",
                                schedule=plain_dlight)
    with pytest.raises(KernelMismatchError, match="plain_dlight"):
        cuda.emulate_layer(lx, 1, rule=plain)
    assert cuda.emulate_layer(lx, 1, rule=_rule("cuda.dlight"))[0] == "cuda.dlight"


def _strided_tiles(func, spec):
    """A wrong tiled schedule: thread tx owns channels tx and tx + 32, so the epilogue computed
    at tx covers a 33-wide box of channels, most of them other threads' registers."""
    tvm = _tvm.require_tvm()
    sch = tvm.s_tir.Schedule(func)
    acc, ep, out = (sch.get_sblock(n) for n in ("acc", "ep", "out"))
    m, g, n, kk = sch.get_loops(acc)
    bn, nr, tx = sch.split(n, [None, 2, 32])
    sch.reorder(m, bn, tx, g, kk, nr)
    sch.bind(m, "blockIdx.x")
    sch.bind(bn, "blockIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(ep, tx)
    sch.set_scope(ep, 0, "local")
    sch.reverse_compute_at(out, tx)
    sch.decompose_reduction(acc, kk)
    sch.decompose_reduction(ep, sch.get_loops(ep)[3])
    return sch.mod


@pytest.mark.tvm
def test_emulation_catches_reads_of_other_threads_registers(tvm_mod):
    """A schedule TVM builds without complaint and the static checks pass, but whose threads
    read registers they never wrote: the emulation fails it."""
    lx = make_layer(out=64, cin=32, name="strided")
    rule = dataclasses.replace(_rule("cuda.t2_gemm"), name="strided", schedule=_strided_tiles)
    tinfo = _tvm.target_info("cuda")
    spec = rule.plan(lx, 16, tinfo, {"nb": 64})
    mod = _strided_tiles(ops.gemm_compute(spec), spec)
    assert cuda.schedule_errors(mod["main"]) == []
    assert "__global__" in cuda.kernel_source(rule.build(lx, 16, tinfo, {"nb": 64}))
    with pytest.raises(KernelMismatchError, match="strided"):
        cuda.emulate_layer(lx, 16, rule=rule, params={"nb": 64})


@pytest.mark.tvm
def test_schedule_errors_flags_cross_kernel_registers_and_host_blocks(tvm_mod):
    tvm = _tvm.require_tvm()
    tinfo = _tvm.target_info("cuda")
    lx = make_layer(out=16, cin=32)
    spec = _rule("cuda.t2_gemm").plan(lx, 4, tinfo, {"nb": 16})
    assert any("not bound to GPU threads" in e
               for e in cuda.schedule_errors(ops.gemm_compute(spec)))
    sch = tvm.s_tir.Schedule(ops.gemm_compute(spec))
    for name in ("acc", "ep", "out"):  # one kernel per stage, acc kept in registers
        blk = sch.get_sblock(name)
        m, *rest = sch.get_loops(blk)
        n = rest[1] if name == "acc" else rest[0]
        sch.bind(m, "blockIdx.x")
        sch.bind(n, "threadIdx.x")
    sch.set_scope(sch.get_sblock("acc"), 0, "local")
    errors = cuda.schedule_errors(sch.mod["main"])
    assert len(errors) == 1 and "acc" in errors[0] and "different kernels" in errors[0]
    good = cuda.schedule_t2(ops.gemm_compute(spec), spec)
    assert cuda.schedule_errors(good["main"]) == []


@pytest.mark.tvm
def test_fold_unit_reductions_keeps_other_reductions(tvm_mod):
    tinfo = _tvm.target_info("cuda")
    one = _rule("cuda.dlight").plan(make_layer(), 2, tinfo, {})
    folded = cuda.fold_unit_reductions(ops.gemm_compute(one)).script()
    assert "T.init()" in folded  # acc still reduces over k
    assert folded.count("T.init()") == 1  # ep (one group) is a plain assignment now
    grouped = _rule("cuda.dlight").plan(make_layer(gs=16), 2, tinfo, {})
    func = ops.gemm_compute(grouped)
    assert cuda.fold_unit_reductions(func).script().count("T.init()") == 2  # G = 4: unchanged


@pytest.mark.tvm
def test_dlight_int8_matmul_stays_off_tensor_cores(tvm_mod):
    """dlight's Matmul would take its WMMA branch for this int8 GEMM (all extents > 64), which
    TVM 0.27 fails to lower; the rule schedules it with SIMT threads and it is correct."""
    lx = make_layer(op="conv2d", fmt="int8", out=128, cin=8, hw=(9, 9), name="int8_wmma")
    rule = _rule("cuda.dlight")
    kern = rule.build(lx, 1, _tvm.target_info("cuda"))
    assert kern.spec.M > 64 and kern.spec.N > 64 and kern.spec.K > 64
    src = cuda.kernel_source(kern)
    assert "__global__" in src and "wmma" not in src
    assert cuda.emulate_layer(lx, 1, rule=rule)[0] == "cuda.dlight"


@pytest.mark.tvm
def test_export_gpu_bundle(nvrtc, tmp_path):
    """The bundle for a GPU host without TVM: exported kernels, their device code compiled
    here, inputs and reference, the TVM runtime and a runner."""
    if shutil.which("g++") is None and shutil.which("gcc") is None:
        pytest.skip("export_library needs a host C++ compiler")
    jobs = [_layer("linear_b1")[:2], (*_layer("conv3x3_pad")[:2], _rule("cuda.dlight"))]
    out = cuda.export_gpu_bundle(jobs, tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert [m["rule"] for m in manifest] == ["cuda.t2_gemv", "cuda.dlight"]
    for m in manifest:
        assert (tmp_path / "bundle" / "k" / f"{m['name']}.so").stat().st_size > 0
        data = np.load(tmp_path / "bundle" / "k" / f"{m['name']}.npz")
        assert len(data.files) == m["nargs"] + 1 and data["ref"].shape == (m["M"], m["N"])
        binary = (tmp_path / "bundle" / "bin" / f"{m['source_sha256']}.cubin").read_bytes()
        assert binary[:4] == b"\x7fELF"
    for lib in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        assert (tmp_path / "bundle" / "lib" / lib).exists()
    assert (tmp_path / "bundle" / "py" / "tvm_ffi" / "__init__.py").exists()
    compile((tmp_path / "bundle" / "run.py").read_text(), "run.py", "exec")
    assert out == str(tmp_path / "bundle")


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.tvm
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("label", IDS)
def test_gpu_check_layer(tvm_mod, label):
    lx, batch, rule = _layer(label)
    chk = check_layer(lx, batch=batch, target="cuda")
    assert chk.status == "built and verified" and chk.checked_with == "cuda:0"
    assert chk.impl == _rule(rule).impl_for(lx)
    assert chk.max_abs_err is not None and math.isfinite(chk.max_abs_err)


@pytest.mark.tvm
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("label", IDS)
def test_gpu_measure_layer(tvm_mod, label):
    """Latency on the GPU; measure_layer checks the output against the reference first."""
    lx, batch, rule = _layer(label)
    lat = measure_layer(lx, batch=batch, target="cuda", ev=EV)
    assert lat.impl == _rule(rule).impl_for(lx) and lat.target == "cuda"
    assert lat.median_us > 0 and len(lat.raw_us) == EV.repeat
    assert lat.M == batch * math.prod(lx.output_hw) and lat.N == lx.out_channels
    assert math.isfinite(lat.max_abs_err) and '"kind": "cuda"' in lat.target_str


def _run_on_gpu(rule: ops.Rule, lx, batch: int, params=None) -> float:
    """Build ``rule`` for the visible GPU, run once, return max |err| (checked)."""
    tvm = _tvm.require_tvm()
    tinfo = _tvm.target_info("cuda")
    kern = rule.build(lx, batch, tinfo, params)
    dev = tvm.cuda(0)
    a = measure.kernel_input(lx, kern.spec)
    args = [tvm.runtime.tensor(v, dev) for v in (a, *kern.pack(lx))]
    out = tvm.runtime.empty((kern.spec.M, kern.spec.N), "float32", dev)
    kern.func(*args, out)
    return measure._check(lx.name, rule.name, out.numpy(), measure.reference_output(lx, a),
                          measure._rtol(kern.spec))


@pytest.mark.tvm
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("label", DLIGHT_CASES)
def test_gpu_dlight_fallback(tvm_mod, label):
    lx, batch, _rule_name = _layer(label)
    assert math.isfinite(_run_on_gpu(_rule("cuda.dlight"), lx, batch))


@pytest.mark.tvm
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("rule_name", ["cuda.t2_gemv", "cuda.t2_gemm"])
def test_gpu_every_grid_point(tvm_mod, rule_name):
    """Every tile setting a search may try is correct (split-K on a batch-1 linear, the tiled
    kernel on a padded conv)."""
    label = "linear_b1" if rule_name == "cuda.t2_gemv" else "conv3x3_pad"
    lx, batch, _r = _layer(label)
    rule = _rule(rule_name)
    for params in rule.grid:
        assert math.isfinite(_run_on_gpu(rule, lx, batch, params)), params


@pytest.mark.tvm
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("label", [c[0] for c in BIG_CASES])
def test_gpu_realistic_shapes(tvm_mod, label):
    """ResNet / LLM-like shapes (grids of thousands of blocks, K up to 4096), with the hand
    rule (check_layer) and with dlight."""
    lx, batch, rule = _layer(label)
    chk = check_layer(lx, batch=batch, target="cuda")
    assert chk.status == "built and verified" and chk.impl == _rule(rule).impl_for(lx)
    assert math.isfinite(_run_on_gpu(_rule("cuda.dlight"), lx, batch))


@pytest.mark.tvm
@pytest.mark.gpu
@needs_gpu
def test_gpu_bundle_runs(nvrtc, tmp_path):
    """export_gpu_bundle end to end: its runner, in a fresh process, checks the kernels."""
    jobs = [_layer("linear_fgq_gs4")[:2], _layer("conv_tt_off")[:2]]
    out = cuda.export_gpu_bundle(jobs, tmp_path / "bundle")
    env = dict(os.environ, OUT=str(tmp_path))
    res = subprocess.run([sys.executable, os.path.join(out, "run.py")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 2 and all(r["ok"] for r in results)
