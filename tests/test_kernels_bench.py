"""ternbench.bench.kernels and ``ternbench kernels``: shapes, rows, checks, consistency.

The benchmark runs on tiny shapes in quick mode: these tests check the plumbing (every kernel
checked, speed-ups from the same run, roofline arithmetic), never the speed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from ternbench.bench import cli, kernels
from ternbench.bench.kernels import KernelShape
from ternbench.schedules import _tvm, measure, ops

TINY = [KernelShape("t", "t.conv", "conv2d", 8, 16, (6, 6), 3, 2, 1),
        KernelShape("t", "t.lin", "linear", 64, 24)]
BASELINES = {"torch_fp32", "torch_int8", "tvm_fp32", "tvm_int8"}
#: impl -> (weight format, activations) of the synthetic layer it ran
LAYER_OF = {"tvm_fp32": ("fp32", "fp32"), "tvm_int8": ("int8", "int8"),
            "tvm_t2_avx2": ("ternary", "int8"), "tvm_t2_generic": ("ternary", "int8"),
            "tvm_t2_vnni": ("ternary", "int8"), "tvm_t2_lut": ("ternary", "int8"),
            "tvm_tt_popc": ("ternary", "ternary"), "tvm_tt_popc_generic": ("ternary", "ternary"),
            "tvm_t2_amx": ("ternary", "int8"), "tvm_tt_lut": ("ternary", "ternary"),
            "tvm_tt_amx": ("ternary", "ternary"), "tvm_t2_lut_q8": ("ternary", "int8"),
            "tvm_tt_lut_q8": ("ternary", "ternary")}


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    # a private tuning cache, and the thread-pool variables restored after the test
    monkeypatch.setenv("TERNBENCH_CACHE", str(tmp_path / "cache"))
    for var in ("TVM_THREAD_POOL_SPIN_COUNT", "OMP_WAIT_POLICY", "TVM_NUM_THREADS"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------- no TVM needed


def test_shape_suites():
    r18 = kernels.resnet18_shapes()
    assert len(r18) == 12 and len({s.label for s in r18}) == 12
    stem = r18[0]
    assert (stem.k, stem.stride, stem.pad, stem.out_hw) == (7, 2, 3, (112, 112))
    assert stem.label == "conv 7x7/2 3x224x224->64"
    assert {s.hw[0] for s in r18 if s.k == 3 and s.stride == 1} == {56, 28, 14, 7}
    assert {(s.cin, s.cout, s.hw[0]) for s in r18 if s.k == 1 and s.op == "conv2d"} == {
        (64, 128, 56), (128, 256, 28), (256, 512, 14)}
    assert r18[-1].label == "linear 512->1000" and r18[-1].macs(64) == 64 * 512 * 1000
    cifar = kernels.cifar_shapes()
    assert {s.cout for s in cifar if s.op == "conv2d"} == {16, 32, 64}
    assert {s.out_hw for s in cifar if s.op == "conv2d"} == {(32, 32), (16, 16), (8, 8)}
    assert [s.label for s in kernels.gemv_shapes()] == ["linear 4608->512"]
    assert [(s.fan_in, s.cout) for s in kernels.bitnet_shapes()] == [
        (2560, 2560), (2560, 6912), (6912, 2560)]
    assert len(kernels.select_shapes("all")) == 12 + len(cifar) + 1 + 3
    assert kernels.select_shapes("gemv,cifar")[0].suite == "gemv"
    assert [s.name for s in kernels.select_shapes("resnet18", ["*fc", "*.layer4.conv"])] == [
        "resnet18.layer4.conv", "resnet18.fc"]
    with pytest.raises(ValueError, match="unknown shape suite"):
        kernels.select_shapes("vgg")
    with pytest.raises(ValueError, match="matches"):
        kernels.select_shapes("cifar", ["nothing*"])


@pytest.mark.parametrize("shape", [*kernels.cifar_shapes()[:3], *TINY])
@pytest.mark.parametrize(("fmt", "act"), [("ternary", "int8"), ("ternary", "ternary"),
                                          ("int8", "int8"), ("fp32", "fp32")])
def test_synthetic_layers_are_valid_exports(shape, fmt, act):
    lx = kernels.synthetic_layer(shape, fmt, act)
    assert ops.layer_geometry(lx)[1] == shape.out_hw
    assert lx.codes.shape == (shape.cout, shape.fan_in) and lx.scales.shape[1] == 1
    if fmt == "ternary":
        assert set(np.unique(lx.codes)) <= {-1, 0, 1}
    assert lx.act_mode == {"int8": "int", "ternary": "ternary", "fp32": "fp32"}[act]
    # the fp32 layer holds the float weights of the ternary layer of the same seed
    if fmt == "fp32":
        tern = kernels.synthetic_layer(shape, "ternary", "int8")
        np.testing.assert_array_equal(lx.codes, tern.dequantized_weight())


def test_configure_env_sets_only_unset_variables(monkeypatch):
    monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    notes = kernels.configure_env(2)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice stays
    if "tvm" in sys.modules:
        assert any("TVM_THREAD_POOL_SPIN_COUNT" in n for n in notes)
    else:
        assert os.environ["TVM_THREAD_POOL_SPIN_COUNT"] == "0"


_CAP_PROBE = """
import os, sys, torch
from ternbench.bench import kernels
from ternbench.schedules import forced_isa
if sys.argv[1] == "late":
    torch.ones(2).sum()  # torch picks its kernels before the cap
with kernels.cap_torch_isa(forced_isa()) as notes:
    inside = os.environ.get("ONEDNN_MAX_CPU_ISA", "-")
print(torch.backends.cpu.get_cpu_capability(), len(notes), inside,
      os.environ.get("ONEDNN_MAX_CPU_ISA", "-"))
"""


@pytest.mark.parametrize("isa,want", [("generic", "DEFAULT"), ("avx2", "AVX2"),
                                      ("avx512", "AVX512")])
def test_forced_isa_caps_torch_baselines(isa, want):
    """A forced ISA level caps torch too (fresh processes: torch reads the cap once), and only
    within the block: afterwards the variables are gone (no cap leaks into later Ray workers).
    ``avx512`` caps oneDNN only (off AMX), ATen keeps its AVX-512 kernels."""
    import subprocess

    if not _tvm.is_x86_host():
        pytest.skip("x86 ISA levels only")
    if isa not in _tvm.host_isa_levels():
        pytest.skip(f"this CPU has no {isa}")
    env = {**os.environ, "TERNBENCH_ISA": isa}
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS"):
        env.pop(var, None)
    out = {when: subprocess.run([sys.executable, "-c", _CAP_PROBE, when], env=env,
                                capture_output=True, text=True, check=True).stdout.split()
           for when in ("early", "late")}
    onednn = {"avx512": "AVX512_CORE_VNNI", "avx2": "AVX2", "generic": "SSE41"}[isa]
    # capped inside the block (inherited by processes started there), restored after it
    assert out["early"] == [want, "0", onednn, "-"]
    native = _tvm.host_isa_levels()[-1]
    if native != isa and isa != "avx512":  # too late: torch kept its own kernels, a note says
        assert out["late"][0] != want and out["late"][1] == "1"


_TIMER_PROBE = """
import sys
if sys.argv[1] == "ours":
    from ternbench.schedules import measure
    measure._torch_timer()
else:
    import torch.utils.benchmark
"""


def test_torch_timer_import_drops_the_cuda_home_warning(tmp_path):
    """Importing torch's benchmark Timer warns "No CUDA runtime is found" wherever a CUDA
    toolkit is found without a GPU (here: ``CUDA_HOME`` set); the CPU baselines' import drops
    that one message (fresh processes: torch warns once, when cpp_extension is imported)."""
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: torch does not warn")
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}
    err = {who: subprocess.run([sys.executable, "-c", _TIMER_PROBE, who], env=env,
                               capture_output=True, text=True, check=True).stderr
           for who in ("torch", "ours")}
    assert "No CUDA runtime is found" in err["torch"]  # the control: torch does warn here
    assert "No CUDA runtime is found" not in err["ours"]


def test_lower_level_kernels_are_built_for_their_level(monkeypatch):
    """On an AVX-512 CPU the AVX2 kernel timed beside the chosen ones is compiled as for an
    AVX2 CPU (``-avx512f``); every other rule, and every rule under a forced level, for the
    target the run uses."""
    pytest.importorskip("tvm")
    from ternbench.bench.kernels.benchmark import _rule_target
    from ternbench.schedules import x86

    if not _tvm.is_x86_host() or "avx512" not in _tvm.host_isa_levels():
        pytest.skip("needs an AVX-512 CPU (a lower level to build for)")
    monkeypatch.delenv(_tvm.ISA_ENV, raising=False)
    native = _tvm.target_info("x86")
    by_name = {r.name: r for r in x86.rules()}
    lower = _rule_target(by_name["x86.t2_avx2"], native)
    assert lower.isa == "avx2" and "-avx512f" in lower.target_str
    assert "avx512f" not in lower.features and native.isa in ("avx512", "amx")
    assert _rule_target(by_name["x86.t2_avx512vnni"], native) is native
    forced = _tvm.x86_target_at("avx2")
    assert _rule_target(by_name["x86.t2_avx2"], forced) is forced


def test_cli_help_teaches(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["kernels", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--threads", "--metaschedule", "--tune", "--quick", "roofline_fraction",
                   "OMP_WAIT_POLICY=PASSIVE", "kernels.csv", "tvm_t2_avx2", "torch_int8",
                   "nox -s kernels"):
        assert needle in text, needle


@pytest.mark.parametrize("bad", [["--batches", "0"], ["--shapes", "vgg"], ["--threads", "0"],
                                 ["--act-modes", "int4"]])
def test_cli_rejects_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["kernels", *bad])
    assert exc.value.code == 2


def test_cli_unknown_layer_pattern(tmp_path, capsys):
    assert cli.main(["kernels", "--layers", "nope*", "--out", str(tmp_path)]) == 2
    assert "matches" in capsys.readouterr().err


# ----------------------------------------------------------------------------- compiling


def _ref_scale(shape: KernelShape, batch: int, impl: str) -> float:
    """max |y| of the reference output the impl's kernel was checked against."""
    fmt, act = LAYER_OF[impl]
    lx = kernels.synthetic_layer(shape, fmt, act)
    layout = "tt_planes" if act == "ternary" else "dense_blocked" if fmt != "ternary" \
        else "t2_blocked"
    spec = ops.plan_gemm(lx, batch, layout, nb=8, mb_max=1, rows_per_task=1)
    return float(np.abs(measure.reference_output(lx, measure.kernel_input(lx, spec))).max())


@pytest.mark.tvm
def test_quick_benchmark_rows(tmp_path):
    pytest.importorskip("tvm")
    res = kernels.run_kernels(tmp_path / "k", shapes=TINY, batches=(2,), quick=True,
                              progress=False)
    assert res.failures == ()
    df = pd.read_csv(res.csv_path)
    assert list(df.columns) == list(kernels.COLUMNS)
    # 4 baselines + every ternary recipe the CPU runs for each activation kind (the chosen one
    # and the others beside it): int8 act table lookups on convs, vpdpbusd, vpmaddubsw;
    # ternary act byte-table lookups on convs (AVX512-VBMI) and the popcount kernel
    from conftest import x86_info

    feats = x86_info().features
    for shape in TINY:
        want = {"tvm_t2_avx2"} if "avx2" in feats else {"tvm_t2_generic"}
        if {"avx512vnni", "avx512vl"} <= feats or "avxvnni" in feats:
            want.add("tvm_t2_vnni")
        # the lookups on convs, each also with int8 outputs (``_q8``; these 8 channels are
        # too few for AMX)
        if {"avx512f", "avx512bw"} <= feats and shape.op == "conv2d":
            want |= {"tvm_t2_lut", "tvm_t2_lut_q8"}
        want_tt = {"tvm_tt_popc"} if "avx2" in feats else {"tvm_tt_popc_generic"}
        if {"avx512bw", "avx512vbmi"} <= feats and shape.op == "conv2d":
            want_tt |= {"tvm_tt_lut", "tvm_tt_lut_q8"}
        rows = df[df["shape"] == shape.label]
        assert set(rows.loc[rows["act_mode"] == "int8", "impl"]) - BASELINES == want
        assert set(rows.loc[rows["act_mode"] == "ternary", "impl"]) == want_tt
        assert len(rows) == 4 + len(want_tt) + len(want)
    assert df["median_us"].notna().all() and (df["median_us"] > 0).all()
    assert set(df["threads"]) == {1} and set(df["batch"]) == {2}
    assert (df["rounds"] == kernels.QUICK_ROUNDS).all()
    assert df["tvm_version"].notna().all() and df["cpu"].notna().all()
    for (label, batch), g in df.groupby(["shape", "batch"]):
        shape = next(s for s in TINY if s.label == label)
        by = g.set_index("impl")
        assert BASELINES <= set(by.index)
        assert {"int8", "ternary"} <= set(g["act_mode"])
        t_fp32, t_int8 = by.loc["torch_fp32", "median_us"], by.loc["torch_int8", "median_us"]
        for r in g.itertuples():
            # speed-ups come from the medians of this same run
            assert math.isclose(r.speedup_vs_torch_fp32, t_fp32 / r.median_us, rel_tol=1e-9)
            assert math.isclose(r.speedup_vs_torch_int8, t_int8 / r.median_us, rel_tol=1e-9)
            assert math.isclose(r.gmacs, shape.macs(batch) / (r.median_us * 1e-6) / 1e9,
                                rel_tol=1e-9)
            assert 0 < r.roofline_fraction <= 100
            assert math.isclose(r.roofline_fraction, r.bytes / (r.median_us * 1e-6)
                                / (r.bandwidth_gbs * 1e9), rel_tol=1e-9)
            assert (r.M, r.K, r.N) == (batch * shape.out_hw[0] * shape.out_hw[1],
                                       shape.fan_in, shape.cout)
            assert r.p25_us <= r.median_us <= r.p75_us
            if r.backend == "tvm":  # every TVM kernel matched the reference before timing
                ref = _ref_scale(shape, batch, r.impl)
                if r.impl.endswith("_q8"):  # int8 codes of max |ref| / 127: rounding only
                    assert 0 < r.max_abs_err <= ref / 127 / 2 * (1 + 1e-5)
                else:
                    assert r.max_abs_err <= measure.FLOAT_RTOL * ref
                assert r.rule and r.params.startswith("{")
                # the tile the plan built from the grid point: no more rows than asked, but
                # the lookup tiles may take one more pixel where that pads the row less
                tile, asked = json.loads(r.tile), json.loads(r.params)
                assert {"nb", "mb", "m_task"} <= set(tile)
                extra = 1 if "_lut" in r.impl else 0
                assert tile["mb"] <= asked.get("mb", tile["mb"]) + extra, (r.impl, tile, asked)
            else:
                assert np.isfinite(r.max_abs_err)
        assert by.loc["torch_fp32", "speedup_vs_torch_fp32"] == 1.0
    assert 0.1 < res.bandwidth_gbs < 10_000
    # one chosen kernel per layer and activation kind: the one the rules select
    chosen = df[df["chosen"]]
    assert (chosen.groupby(["shape", "batch", "act_mode"]).size() == 1).all()
    assert set(chosen["act_mode"]) == {"int8", "ternary"} and len(chosen) == 2 * len(TINY)
    for r in chosen.itertuples():
        lx = kernels.synthetic_layer(next(s for s in TINY if s.label == r.shape), "ternary",
                                     r.act_mode)
        assert r.rule == measure.select_rule(lx, x86_info()).name
    assert not df.loc[df["backend"] == "torch", "chosen"].any()
    md = res.md_path.read_text()
    assert "| shape | batch |" in md and all(s.label in md for s in TINY)
    assert "Geometric-mean speed-up" in md
    assert "chosen, int8 act: x torch fp32, x torch int8" in md
    conv = chosen[(chosen["act_mode"] == "ternary") & (chosen["op"] == "conv2d")]
    from ternbench.bench.kernels.output import _layer_kind

    kind = _layer_kind(conv["shape"].iloc[0])
    row = next(x for x in md.splitlines() if x.startswith(f"| t | {kind} | 2 |"))
    assert f"{conv['speedup_vs_torch_fp32'].median():.2f}" in row


@pytest.mark.tvm
def test_wrong_kernel_is_reported_not_timed(tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    real = ops.pack_weight_args

    def corrupt(spec, lx):
        args = real(spec, lx)
        if spec.layout in ("t2_avx2", "t2_blocked"):  # the int8-activation ternary kernel
            args[0] = args[0].copy()
            args[0].flat[0] ^= 0b11
        return args

    monkeypatch.setattr(ops.packing, "pack_weight_args", corrupt)
    res = kernels.run_kernels(tmp_path / "k", shapes=TINY[1:], batches=(1,), quick=True,
                              act_modes=("int8",), progress=False)
    df = res.frame
    bad = df[df["impl"].str.startswith("tvm_t2")]  # the chosen kernel and any beside it
    assert len(bad) >= 1 and bad["median_us"].isna().all()
    assert bad["note"].str.contains("disagrees with the torch reference").all()
    assert len(res.failures) == len(bad)
    ok = df[~df["impl"].str.startswith("tvm_t2")]
    assert ok["median_us"].notna().all() and set(ok["impl"]) == BASELINES
    assert "Failed (not timed)" in res.md_path.read_text()


@pytest.mark.tvm
def test_cli_quick_run(tmp_path, capsys):
    pytest.importorskip("tvm")
    out = tmp_path / "cli"
    rc = cli.main(["kernels", "--shapes", "cifar", "--layers", "resnet20.fc", "--batches", "1",
                   "--act-modes", "ternary", "--quick", "--no-progress", "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out / "kernels.csv")
    assert set(df["layer"]) == {"resnet20.fc"} and set(df["shape"]) == {"linear 64->10"}
    assert {"torch_fp32", "torch_int8", "tvm_fp32", "tvm_int8"} < set(df["impl"])
    assert df[df["act_mode"] == "ternary"]["impl"].str.startswith("tvm_tt_popc").all()
    printed = capsys.readouterr().out
    assert "kernels.md" in printed and "| linear 64->10 | 1 |" in printed


@pytest.mark.tvm
def test_cli_whole_model(tmp_path, capsys):
    """`kernels --whole-model`: the model is compiled into one TVM module (an artifact under
    OUT/artifacts/), checked against its fake-quant logits, then timed beside torch FP32 eager,
    torch INT8 and ONNX Runtime INT8; model.csv / model_layers.csv / model.md are written."""
    rc = cli.main(["kernels", "--whole-model", "resnet20", "--model-methods", "rtn",
                   "--model-only", "--quick", "--rounds", "1", "--out", str(tmp_path)])
    assert rc == 0
    df = pd.read_csv(tmp_path / "model.csv")
    r = df.iloc[0]
    assert (r.model, r.method, r.batch) == ("resnet20", "rtn", 1)
    assert r.tvm_artifact_us > 0 and r.torch_fp32_eager_us > 0 and r.torch_int8_us > 0
    assert r.onnxruntime_int8_us > 0 and r.kernel_sum_us > 0
    assert math.isclose(r.speedup_vs_torch_fp32, r.torch_fp32_eager_us / r.tvm_artifact_us)
    assert (tmp_path / "artifacts" / "resnet20-rtn" / "manifest.json").exists()
    assert r.logit_rel_diff < 1e-5 and r.top1_agreement == 1.0
    layers = pd.read_csv(tmp_path / "model_layers.csv")
    assert len(layers) == 22 and (layers.us > 0).all()  # resnet20: 19 convs, 2 shortcuts, fc
    assert "Whole model" in (tmp_path / "model.md").read_text()
    assert cli.main(["kernels", "--whole-model", "resnet99", "--out", str(tmp_path)]) == 2


@pytest.mark.tvm
def test_cli_whole_model_with_config_overrides(tmp_path, capsys):
    """`--set METHOD.FIELD=VALUE` changes a whole-model method's config (TWN with 8-bit
    activations: its convs run the int8-activation ternary kernels); the row and the artifact
    carry the override in their name. A --set for a method that is not run, or without
    --whole-model, is refused with the reason."""
    rc = cli.main(["kernels", "--whole-model", "resnet8", "--model-methods", "twn",
                   "--set", "twn.act_bits=8", "--model-only", "--quick", "--rounds", "1",
                   "--out", str(tmp_path)])
    assert rc == 0
    r = pd.read_csv(tmp_path / "model.csv").iloc[0]
    assert r.method == "twn+act_bits=8" and r.top1_agreement == 1.0
    assert (tmp_path / "artifacts" / "resnet8-twn+act_bits=8" / "manifest.json").exists()
    impls = set(pd.read_csv(tmp_path / "model_layers.csv").impl)
    assert impls & {"tvm_t2_lut", "tvm_t2_vnni", "tvm_t2_avx2"}, impls  # int8 activations
    capsys.readouterr()
    assert cli.main(["kernels", "--whole-model", "resnet8", "--model-methods", "rtn",
                     "--set", "twn.act_bits=8", "--out", str(tmp_path)]) == 2
    assert "'twn' is not one of the whole-model methods being run (rtn)" in capsys.readouterr().err
    assert cli.main(["kernels", "--set", "twn.act_bits=8", "--out", str(tmp_path)]) == 2
    assert "--set applies to --whole-model" in capsys.readouterr().err


@pytest.mark.tvm
def test_fgq_group_rows(tmp_path):
    """``group_sizes`` adds the int8-activation kernel with FGQ group scales, checked against
    the reference like every kernel (fan-in 72 with N=64: a partial, zero-padded last group)."""
    pytest.importorskip("tvm")
    from conftest import amx_granted, x86_info

    wide = KernelShape("t", "t.conv32", "conv2d", 32, 32, (6, 6), 3, 1, 1)
    res = kernels.run_kernels(tmp_path / "k", shapes=[TINY[0], wide], batches=(1,), quick=True,
                              act_modes=("int8",), progress=False, group_sizes=(4, 64),
                              group_axes=("cin_contiguous", "flat_fanin"))
    assert res.failures == ()
    df = pd.read_csv(res.csv_path)
    grouped = df[df["impl"].str.contains("_g")]
    assert grouped["median_us"].notna().all() and (grouped["max_abs_err"] < 1e-3).all()
    assert not grouped["impl"].str.contains("generic").any()  # no fallback for N=64 on 72
    bf16 = amx_granted() and "amx-bf16" in x86_info().features
    for _shape, rows in grouped.groupby("shape"):
        alt = rows["impl"].str.endswith("_alt")
        sizes = rows.loc[~alt, "impl"].str.extract(r"_g(\d+)(_flat)?$")
        assert sorted(sizes[0].astype(int)) == [4, 4, 64, 64]
        assert sizes[1].notna().sum() == 2  # one flat_fanin row per size
        # on AMX-BF16 both convs run bf16_amx, the integer group kernel beside it
        assert rows.loc[~alt, "impl"].str.startswith("tvm_bf16_amx").all() == bf16
        assert alt.sum() == (4 if bf16 else 0)
    lx = kernels.synthetic_layer(TINY[0], "ternary", "int8", group_size=64)
    assert lx.scales.shape == (16, 2) and lx.group_size == 64
    assert lx.group_order == ("ijc" if lx.op == "conv2d" else "cij")
    with pytest.raises(ValueError, match="group axes"):
        kernels.run_kernels(tmp_path / "bad", shapes=TINY[:1], group_sizes=(4,),
                            group_axes=("channels",))


def test_instruction_peaks(monkeypatch):
    """Every recipe the CPU has gets a positive GMAC/s figure; those it lacks are left out; no
    C compiler means no figures (and no error)."""
    from ternbench.bench.kernels import peaks

    flags = peaks._cpu_flags()
    if not flags or (shutil.which("cc") or shutil.which("gcc")) is None:
        pytest.skip("needs an x86 /proc/cpuinfo and a C compiler")
    got = peaks.measure_peaks()
    want = {r for r, need in peaks.RECIPES.items() if set(need) <= flags}
    # AMX also needs Linux to hand out the tile state (>= 5.16); refused, it is left out
    assert set(got) <= want and want - set(got) <= {"int8_amx", "bf16_amx"}
    assert all(v > 0 for v in got.values())
    if {"fp32_fma", "int8_vpdpbusd"} <= set(got):  # 64 MACs per instruction vs 16 lanes
        assert got["int8_vpdpbusd"] > 2 * got["fp32_fma"]
    monkeypatch.setattr(peaks.shutil, "which", lambda name: None)
    assert peaks.measure_peaks() == {}


def test_int8_output_rows_and_summary(monkeypatch):
    """The AMX kernels are timed again with int8 outputs (``_q8``) where they apply, else the
    table lookups where they can run (AVX-512BW; ternary activations: VBMI), and the summary
    gives their speed-up over torch int8 in a column of its own."""
    import dataclasses

    from conftest import x86_info
    from ternbench.bench.kernels import benchmark
    from ternbench.bench.kernels.output import _chosen_summary
    from ternbench.schedules import _tvm

    base = x86_info()
    amx = dataclasses.replace(base, features=base.features | {"amx-tile", "amx-int8"})
    monkeypatch.setattr(_tvm, "enable_amx", lambda: True)
    shape = next(s for s in kernels.select_shapes("resnet18") if "256x14x14->256" in s.label)
    for act, rule in (("int8", "x86.t2_amx"), ("ternary", "x86.tt_amx")):
        lx = kernels.synthetic_layer(shape, "ternary", act)
        assert [r.name for r in benchmark._int8_output_rules(lx, amx)] == [rule]
        no_amx = dataclasses.replace(base, features=base.features - {"amx-tile", "amx-int8"})
        zen4 = dataclasses.replace(no_amx, mcpu="znver4", features=no_amx.features | {
            "avx512f", "avx512bw", "avx512vbmi"})
        lut = rule.replace("amx", "lut")
        assert [r.name for r in benchmark._int8_output_rules(lx, zen4)] == [lut]
        avx2 = dataclasses.replace(no_amx, features=frozenset({"avx2", "fma"}))
        assert benchmark._int8_output_rules(lx, avx2) == []
    df = pd.DataFrame({"shape": ["conv 3x3/1 64x8x8->64"] * 4, "suite": "s", "batch": 1,
                       "impl": ["tvm_t2_amx", "tvm_t2_amx_q8", "tvm_tt_amx", "tvm_tt_amx_q8"],
                       "act_mode": ["int8", "int8", "ternary", "ternary"],
                       "chosen": [True, False, True, False],
                       "speedup_vs_torch_fp32": [8.0, 9.0, 10.0, 11.0],
                       "speedup_vs_torch_int8": [1.0, 1.25, 1.5, 1.75]})
    lines = _chosen_summary(df)
    head = next(x for x in lines if x.startswith("| suite"))
    assert "int8 outputs (`_q8`), int8 act: x torch int8 | int8 outputs (`_q8`), ternary" in head
    assert "| s | 3x3 convs | 1 | 1 | 8.00, 1.00 | 10.00, 1.50 | 1.25 | 1.75 | 8.00 |" in lines


def _target_rows() -> pd.DataFrame:
    """A run's rows just around issue 11's bounds (see ``test_targets_are_checked``)."""
    rows = []

    def add(suite, shape, batch, act, impl, fp32, int8, chosen=True, us=10.0):
        rows.append(dict(suite=suite, shape=shape, batch=batch, act_mode=act, impl=impl,
                         chosen=chosen, median_us=us, speedup_vs_torch_fp32=fp32,
                         speedup_vs_torch_int8=int8))

    # the last as in ResNet-18: a 3x3 conv on a 7x7 map (not a second "7x7" conv)
    convs = [f"conv 3x3/1 {c}x8x8->{c}" for c in (8, 16, 32, 64, 128, 256)]
    convs.append("conv 3x3/1 512x7x7->512")
    for b, lo in ((1, 1.5), (64, 1.2)):  # 3 below, 4 at or above the bound: median 4th = lo
        for i, s in enumerate(convs):
            add("resnet18", s, b, "int8", "tvm_t2_lut", 4.0, lo + (i - 3) * 0.1)
        add("resnet18", "conv 7x7/2 3x224x224->64", b, "int8", "tvm_t2_lut", 4.0, 2.0)
        for i, s in enumerate(convs):  # FGQ: N=4 at 2x, N=16 above N=64 at batch 64 only
            add("resnet18", s, b, "int8", "tvm_t2_vnni_g4", 2.0 + i * 0.01, 0.5, chosen=False)
            add("resnet18", s, b, "int8", "tvm_t2_vnni_g16", 3.0 if b == 1 else 5.0, 1.0,
                chosen=False)
            add("resnet18", s, b, "int8", "tvm_t2_vnni_g64", 4.0, 1.0, chosen=False)
            add("resnet18", s, b, "int8", "tvm_t2_vnni_g4_flat", 0.1, 0.1, chosen=False)
    for i, s in enumerate(convs):
        add("resnet18", s, 1, "ternary", "tvm_tt_lut", 12.0 + i, 3.0 + i)
    add("resnet18", convs[0], 1, "ternary", "tvm_tt_popc", 1.0, 0.5, chosen=False)
    add("gemv", "linear 4608->512", 1, "ternary", "tvm_tt_popc", 24.9, 9.0, us=6.0)
    for b, low in ((1, 1.0), (64, 0.99)):  # batch 64: one kernel below torch FP32
        add("cifar", "conv 3x3/1 16x32x32->16", b, "int8", "tvm_t2_vnni", 3.0, 1.0)
        add("cifar", "linear 64->10", b, "ternary", "tvm_tt_popc", low, 1.0, chosen=False)
        add("cifar", "linear 64->10", b, "fp32", "tvm_fp32", 0.5, 0.2, chosen=False)
    return pd.DataFrame(rows)


def test_targets_are_checked():
    """Each target reads the rows it names: the chosen kernels' medians (8 convs with the stem
    for int8 activations), FGQ's ``_g<N>`` variants (not ``_flat``), every ternary CIFAR
    kernel (not the dense TVM ones), and says "not in this run" where the rows are missing."""
    from ternbench.bench.kernels.targets import check_targets, targets_markdown

    got = {r.target.split(":")[0]: r for r in check_targets(_target_rows())}
    verdicts = [r.verdict for r in got.values()]
    assert verdicts == ["yes", "yes", "yes", "no", "yes", "no", "no"]
    int8 = next(r for k, r in got.items() if "batch 1" in k and "int8 act" in k)
    assert int8.measured.startswith("1.550x (8 convs; the 7 3x3 convs 1.50x, 1.20-1.80x)")
    assert next(r for k, r in got.items() if "N=64" in k).measured == (
        "batch 1: 4.00x vs 3.00x; batch 64: 4.00x vs 5.00x")
    assert next(r for k, r in got.items() if "CIFAR" in k).measured == (
        "every kernel >= 1.00x / >= 0.99x")
    assert next(r for k, r in got.items() if "N=4" in k).measured == "2.03x / 2.03x"
    assert next(r for k, r in got.items() if "ternary act" in k).measured == (
        "15.00x / 6.00x (7 convs)")  # the chosen kernels only, not the popcount row beside
    # a bound missed by a hair: the 8-conv median (the 4th and 5th conv) is what counts
    df = _target_rows()
    for shape, v in (("conv 3x3/1 64x8x8->64", 1.19), ("conv 3x3/1 128x8x8->128", 1.2)):
        df.loc[(df["batch"] == 64) & (df["shape"] == shape), "speedup_vs_torch_int8"] = v
    assert check_targets(df)[1].met is False
    assert check_targets(df)[1].measured.startswith("1.195x")
    # rows of another suite only: nothing to say
    only = df[df["suite"] == "gemv"]
    assert [r.verdict for r in check_targets(only)].count("not in this run") == 6
    md = targets_markdown(df, threads=2)
    assert md[0].endswith("(this run: 2 threads; the targets are for 1):")
    assert targets_markdown(df[df["suite"] == "bitnet"], threads=1) == []


# ----------------------------------------------------------------------------- A/B tool


def test_ab_settings_parse_and_restore():
    from ternbench.bench.kernels import ab
    from ternbench.schedules.ops import compute

    s = ab.Setting.parse("ternbench.schedules.ops.compute.UNROLLED_IM2COL_MAX_K = 0")
    assert (s.module, s.name, s.value) == ("ternbench.schedules.ops.compute",
                                           "UNROLLED_IM2COL_MAX_K", 0)
    for bad, words in (("UNROLLED_IM2COL_MAX_K", "MODULE.NAME=VALUE"),
                       ("ternbench.schedules.ops.compute.UNROLLED_IM2COL_MAX_K=abc", "literal"),
                       ("ternbench.nowhere.X=1", "cannot import"),
                       ("ternbench.schedules.ops.compute.NO_SUCH=1", "no attribute")):
        with pytest.raises(ValueError, match=words):
            ab.Setting.parse(bad)
    before = compute.UNROLLED_IM2COL_MAX_K
    with ab.applied([s]):
        assert compute.UNROLLED_IM2COL_MAX_K == 0
    assert compute.UNROLLED_IM2COL_MAX_K == before
    with pytest.raises(RuntimeError), ab.applied([s]):  # restored on an error too
        raise RuntimeError
    assert compute.UNROLLED_IM2COL_MAX_K == before


def test_ab_cli_reports_bad_input(capsys):
    from ternbench.bench.kernels import ab

    assert ab.main(["--rule", "x86.t2_avx2", "--a", "nothing"]) == 2
    assert "ab: error: setting 'nothing'" in capsys.readouterr().err
    # dense layers take their own activations: an --act beside them is refused, not ignored
    assert ab.main(["--rule", "x86.int8", "--weights", "int8", "--act", "ternary"]) == 2
    assert "--act ternary applies to ternary weights" in capsys.readouterr().err


@pytest.mark.tvm
def test_ab_times_both_variants_beside_torch():
    """The one-stage im2col (B, as is) against the two stages (A) on a small grouped stem: both
    built, checked and timed; a control with one group builds the same kernel both ways."""
    pytest.importorskip("tvm")
    from ternbench.bench.kernels import ab

    info = _tvm.target_info("x86")
    if not info.has("avx2"):
        pytest.skip("x86.t2_avx2 needs an x86 CPU with AVX2")
    with pytest.raises(ValueError, match="did you mean 'x86.t2_avx2'"):
        ab.run_ab("x86.t2_avx3", [])
    shape = KernelShape("t", "t.stem", "conv2d", 3, 16, (12, 12), 3, 1, 1)
    a = [ab.Setting.parse("ternbench.schedules.ops.compute.UNROLLED_IM2COL_MAX_K=0")]
    rows = ab.run_ab("x86.t2_avx2", a, shapes=[shape], batches=[2], group_sizes=[4, 0],
                     rounds=3, sample_s=0.001)
    assert [(r.shape, r.group_size, r.batch) for r in rows] == [
        ("conv 3x3/1 3x12x12->16", 4, 2), ("conv 3x3/1 3x12x12->16", 0, 2)]
    for r in rows:
        assert all(math.isfinite(v) and v > 0 for v in
                   (r.a_us, r.b_us, r.torch_fp32_us, r.b_over_a, r.a_x_fp32, r.b_x_fp32))
        assert "B/A" in r.line()
    # the setting changes the grouped kernel only; the control says so on its line
    assert [r.same_code for r in rows] == [False, True]
    assert rows[1].line().endswith("| A and B built the same code")


@pytest.mark.tvm
def test_ab_dense_weights_reach_the_dense_rules():
    """``weights="fp32"``: the dense FP32 rule's layer (float weights and activations, one
    group whatever the group sizes say), its default block against a clamp-free variant."""
    pytest.importorskip("tvm")
    from ternbench.bench.kernels import ab

    with pytest.raises(ValueError, match="weights must be one of"):
        ab.run_ab("x86.fp32", [], weights="int4")
    shape = KernelShape("t", "t.conv", "conv2d", 3, 16, (8, 8), 3, 1, 1)
    a = [ab.Setting.parse("ternbench.schedules.x86.DENSE_CLAMP_LANES=1024")]
    rows = ab.run_ab("x86.fp32", a, shapes=[shape], batches=[2], group_sizes=[4, 0],
                     rounds=1, sample_s=0.001, weights="fp32")
    assert [(r.group_size, r.batch) for r in rows] == [(0, 2)]
    assert all(math.isfinite(v) and v > 0 for v in (rows[0].a_us, rows[0].b_us))


def test_ab_variant_reaches_the_rules_default_tile_parameters(monkeypatch):
    """A variant may change a rule's default grid point (a module constant read when the rule
    list is made): each variant's kernel is built with its own register tile."""
    pytest.importorskip("tvm")
    from ternbench.bench.kernels import ab
    from ternbench.schedules import measure

    if not _tvm.target_info("x86").has("avx2"):
        pytest.skip("x86.t2_avx2 needs an x86 CPU with AVX2")
    seen = []
    real = measure.prepare_kernel

    def spy(kern, *args, **kwargs):
        seen.append(kern.spec.mb)
        return real(kern, *args, **kwargs)

    monkeypatch.setattr(measure, "prepare_kernel", spy)
    shape = KernelShape("t", "t.conv", "conv2d", 16, 16, (12, 12), 3, 1, 1)
    a = [ab.Setting.parse('ternbench.schedules.x86.T2_DEFAULT={"nb": 8, "mb": 2, "rows": 16}')]
    ab.run_ab("x86.t2_avx2", a, shapes=[shape], batches=[2], rounds=1, sample_s=0.001)
    from ternbench.schedules import x86

    assert seen == [2, x86.T2_MB]
