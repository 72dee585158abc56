"""ARM (aarch64) kernels: rule gating, cross-compilation, bit-exact runs under qemu-user.

Kernels are cross-compiled with ``aarch64-linux-gnu-gcc`` and run by the no-runtime harness
under ``qemu-aarch64 -cpu max``; the tests skip (with the reason) when either tool is missing.
Shapes are tiny: this checks correctness, never speed (qemu timings mean nothing).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from ternbench.schedules import _tvm, arm, cross, measure, ops, x86
from ternbench.schedules.measure import KernelMismatchError
from test_schedules import make_layer

pytestmark = pytest.mark.tvm

ARM = ("arm", "arm-neon", "arm-sve")


@pytest.fixture(scope="module")
def qemu():
    pytest.importorskip("tvm")
    why = cross.qemu_unavailable_reason()
    if why:
        pytest.skip(f"ARM kernels cannot run here: {why} (.ci/run installs them)")
    cross.build_harness()


def _t2_impl(target: str) -> str:
    return "tvm_t2_neon" if target == "arm-neon" else "tvm_t2_sdot"


# (label, make_layer kwargs, batch, expected impl: "t2" = sdot or neon by target)
CASES = [
    ("conv_pad_s2", dict(op="conv2d", out=16, cin=8, hw=(7, 7), stride=2, pad=1), 2, "t2"),
    ("linear", dict(op="linear", out=20, cin=64), 1, "t2"),
    ("linear_pad_k", dict(op="linear", out=10, cin=27), 3, "t2"),
    ("linear_gs4", dict(op="linear", out=16, cin=30, gs=4), 2, "t2"),
    ("conv_gs16", dict(op="conv2d", out=12, cin=4, gs=16, hw=(6, 6)), 1, "t2"),
    ("linear_gs6", dict(op="linear", out=16, cin=30, gs=6), 1, "tvm_t2_neon"),
    ("conv_tt_off", dict(op="conv2d", out=8, cin=8, hw=(7, 7), stride=2, act="ternary",
                         act_offset=0.3, w_offset=True), 1, "tvm_tt_popc"),
    ("linear_tt_gs16", dict(op="linear", out=12, cin=72, gs=16, act="ternary"), 2,
     "tvm_tt_popc"),
    ("conv_tt_rows_c16", dict(op="conv2d", out=8, cin=16, hw=(6, 6), act="ternary",
                              act_offset=0.3, w_offset=True), 1, "tvm_tt_popc"),
    ("conv_tt_1x1_s2", dict(op="conv2d", out=8, cin=32, k=1, pad=0, stride=2, hw=(7, 7),
                            act="ternary", w_offset=True), 1, "tvm_tt_popc"),
    ("conv_gs8_ijc", dict(op="conv2d", out=16, cin=12, gs=8, hw=(6, 6), stride=2,
                          order="ijc"), 1, "t2"),
    ("conv_tt_stem_c3", dict(op="conv2d", out=8, cin=3, hw=(6, 6), act="ternary",
                             act_offset=0.3, w_offset=True), 1, "tvm_tt_popc"),
]


@pytest.mark.parametrize("target", ARM)
@pytest.mark.parametrize(("label", "kw", "batch", "impl"), CASES, ids=[c[0] for c in CASES])
def test_arm_kernel_bit_exact_under_qemu(qemu, target, label, kw, batch, impl):
    lx = make_layer(**kw, name=label, seed=len(label))
    chk = measure.check_layer(lx, batch=batch, target=target)
    assert chk.status == "built and verified" and chk.checked_with == "qemu-aarch64", chk
    assert chk.impl == (_t2_impl(target) if impl == "t2" else impl)
    assert chk.target == target and chk.build_s >= 0 and not chk.why
    # integer accumulation: only the float epilogue rounds (offsets add float terms)
    spec = measure.build_layer(lx, batch, target).spec
    assert chk.max_abs_err is not None
    a = measure.kernel_input(lx, spec)
    scale = np.abs(measure.reference_output(lx, a)).max()
    assert scale > 1.0  # the comparison is not vacuous
    assert chk.max_abs_err <= measure._rtol(spec) * scale


@pytest.mark.parametrize(
    ("label", "kw", "impl"),
    [
        ("twn_conv", dict(op="conv2d", act="fp32", out=8, cin=3, hw=(6, 6), gs=9), "tvm_t2_f32"),
        ("int8_linear", dict(op="linear", fmt="int8", out=16, cin=40), "tvm_int8"),
        ("fp32_conv", dict(op="conv2d", fmt="fp32", act="fp32", out=8, cin=3, hw=(5, 5),
                           stride=2), "tvm_fp32"),
    ],
)
def test_other_formats_build_and_run_on_arm(qemu, label, kw, impl):
    """Float-activation ternary (own rule), int8 and fp32 dense (generic rules) on aarch64."""
    lx = make_layer(**kw, name=label)
    chk = measure.check_layer(lx, batch=2, target="arm")
    assert chk.status == "built and verified" and chk.impl == impl


def test_rule_choice_by_target_features():
    """sdot needs +dotprod (arm, arm-sve), never on arm-neon; no x86 rule applies to ARM."""
    t2 = make_layer()
    for name, rule in (("arm", "arm.t2_sdot"), ("arm-sve", "arm.t2_sdot"),
                       ("arm-neon", "arm.t2_neon")):
        info = _tvm.target_info(name)
        assert measure.select_rule(t2, info).name == rule
        assert measure.select_rule(make_layer(gs=4), info).name == rule
        # group sizes that are not whole sdot steps use the inline-decode kernel everywhere
        assert measure.select_rule(make_layer(cin=66, gs=6), info).name == "arm.t2_neon"
        assert measure.select_rule(make_layer(act="ternary"), info).name == "arm.tt_popc"
        assert measure.select_rule(make_layer(act="fp32"), info).name == "arm.t2_f32"
        assert measure.select_rule(make_layer(fmt="int8"), info).name == "generic.int8"
        assert measure.select_rule(make_layer(fmt="fp32", act="fp32"), info).name == \
            "generic.fp32"
    assert not arm.rules()[0].applies(t2, _tvm.target_info("arm-neon"))
    assert [r.name for r in arm.rules()] == [
        "arm.t2_sdot", "arm.tt_popc", "arm.t2_neon", "arm.t2_f32"]


def test_x86_rules_never_apply_to_arm_and_back():
    layers = [make_layer(), make_layer(gs=4), make_layer(act="ternary"), make_layer(act="fp32"),
              make_layer(fmt="int8"), make_layer(fmt="fp32", act="fp32"),
              make_layer("conv2d", cin=4, gs=16)]
    x86_like = _tvm.TargetInfo(name="x86", target_str="{}", kind="llvm", mcpu="znver3",
                               is_x86=True, features=frozenset({"avx2", "fma"}))
    for name in ARM:
        info = _tvm.target_info(name)
        # even an ARM target claiming x86 features gets no x86 rule (the family gates)
        fake = dataclasses.replace(info, features=info.features | {"avx2", "avx512vnni"})
        for lx in layers:
            for rule in x86.rules():
                assert not rule.applies(lx, info) and not rule.applies(lx, fake), rule.name
    for lx in layers:
        for rule in arm.rules():
            assert not rule.applies(lx, x86_like), rule.name
    cuda = _tvm.target_info("cuda")
    assert not any(r.applies(lx, cuda) for r in arm.rules() for lx in layers)


def test_grids_lead_with_the_default_and_fit_the_tiles():
    for rule in arm.rules():
        assert rule.grid and rule.default_params == rule.grid[0]
        assert len({tuple(sorted(p.items())) for p in rule.grid}) == len(rule.grid)
    sdot = arm.rules()[0]
    assert all(p["nb"] % arm.SDOT_N == 0 for p in sdot.grid)
    with pytest.raises(ValueError, match="multiple of 4"):
        sdot.plan(make_layer(), 1, _tvm.target_info("arm"), {"nb": 6})


def test_sdot_plan_joins_k_padding_into_one_group():
    spec = arm.rules()[0].plan(make_layer(cin=27, out=10), 2, _tvm.target_info("arm"), {})
    assert spec.layout == "t2_decoded" and (spec.K, spec.Kp, spec.G, spec.gs) == (27, 28, 1, 28)
    grouped = arm.rules()[0].plan(make_layer(cin=30, gs=4), 1, _tvm.target_info("arm"), {})
    assert (grouped.G, grouped.gs, grouped.Kp) == (8, 4, 32)


def test_kernels_use_the_expected_instructions(qemu):
    lx = make_layer(out=32, cin=64)

    def asm(target: str, layer=lx) -> str:
        return measure.build_layer(layer, 1, target).executable.mod.inspect_source("asm")

    for target in ("arm", "arm-sve"):
        assert re.search(r"\bsdot\b", asm(target))
    plain = asm("arm-neon")
    assert not re.search(r"\bsdot\b", plain) and re.search(r"\b(smlal|mla)\b", plain)
    assert re.search(r"\bcnt\b", asm("arm", make_layer(act="ternary")))  # NEON popcount


def test_non_default_tiles_are_exact(qemu):
    lx = make_layer("conv2d", out=24, cin=8, hw=(5, 5), pad=1, name="tiles")
    info = _tvm.target_info("arm")
    rule = arm.rules()[0]
    params = {"nb": 8, "mb": 2, "rows": 16}
    kern = rule.build(lx, 2, info, params)
    assert kern.params == params and kern.spec.nb == 8 and kern.spec.m_task > 1
    a = measure.kernel_input(lx, kern.spec)
    y = cross.run_under_qemu(kern, [a, *kern.pack(lx)], (kern.spec.M, kern.spec.N))
    ref = measure.reference_output(lx, a)
    assert np.abs(y - ref).max() <= measure.INT_RTOL * np.abs(ref).max()


def test_corrupted_weights_are_caught_under_qemu(qemu, monkeypatch):
    lx = make_layer("conv2d", out=16, cin=4, hw=(5, 5), name="bad_arm")
    real = ops.pack_weight_args

    def corrupt(spec, lx_):
        args = real(spec, lx_)
        args[0] = args[0].copy()
        args[0].flat[0] ^= 0b11  # one 2-bit code changes
        return args

    monkeypatch.setattr(ops.packing, "pack_weight_args", corrupt)
    with pytest.raises(KernelMismatchError, match="bad_arm"):
        measure.check_layer(lx, target="arm")


def test_harness_errors_are_clear(qemu):
    lx = make_layer(name="short_args")
    kern = measure.build_layer(lx, 1, "arm")
    a = measure.kernel_input(lx, kern.spec)
    with pytest.raises(RuntimeError, match="under qemu failed") as exc:
        cross.run_under_qemu(kern, [a], (kern.spec.M, kern.spec.N))  # weights missing
    assert "kernel" in str(exc.value)
    with pytest.raises(ValueError, match="not aarch64"):
        cross.export_arm(dataclasses.replace(kern, target_str='{"kind":"llvm"}'),
                         "/tmp/never.so")


def test_missing_qemu_gives_built_status(monkeypatch):
    pytest.importorskip("tvm")
    monkeypatch.setattr(cross, "QEMU", "qemu-aarch64-that-does-not-exist")
    why = cross.qemu_unavailable_reason()
    assert "qemu-aarch64-that-does-not-exist" in why and "qemu-user" in why
    lx = make_layer(name="no_qemu")
    chk = measure.check_layer(lx, target="arm-neon")
    assert chk.status == "built" and chk.max_abs_err is None and chk.why == why
    with pytest.raises(RuntimeError, match="cannot run ARM kernels"):
        kern = measure.build_layer(lx, 1, "arm-neon")
        cross.run_under_qemu(kern, [], (1, 1))



def test_harness_plan_errors_are_clear(qemu, tmp_path):
    """The harness's whole-model ``plan`` mode names a missing function or a bad view."""
    import subprocess

    lx = make_layer(name="plan_errors")
    kern = measure.build_layer(lx, 1, "arm")
    lib = cross.export_arm(kern, tmp_path / "k.so")
    cases = {"function not in the library": "tensor 0 2 32 1 4\ncall nope 0\n",
             "view changes the byte size": "tensor 0 2 32 1 4\nview 1 0 1 5\n",
             "needs an input and an output": "tensor 0 2 32 1 4\ncall main 0\n"}
    for words, body in cases.items():
        (tmp_path / "plan").write_text("plan\n" + body)
        res = subprocess.run([cross.QEMU, "-cpu", "max", "-L", str(cross.SYSROOT),
                              str(cross.build_harness()), str(lib), str(tmp_path / "plan")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and words in res.stderr, (words, res.stderr)
