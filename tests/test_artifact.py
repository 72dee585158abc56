"""The whole-model artifact: one TVM module reproduces the fake-quant model, loads with the TVM
runtime alone, and a tampered or foreign artifact is refused with one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ternbench.methods import QuantContext, create_method
from torch import nn

pytestmark = pytest.mark.tvm
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "run_artifact.py"
BATCH = 4


def _resnet8() -> nn.Module:
    from ternbench.bench.models import create_model

    return create_model("resnet8", in_chans=1, num_classes=10).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)


def _quantize(name: str, data, model: nn.Module | None = None):
    torch.manual_seed(0)
    x, y = data
    ctx = QuantContext(calib_loader=[(x, y)], train_loader=[(x, y)], bn_batches=1,
                       progress=False)
    kw = {"epochs": 0} if name in ("rtn", "sttn") else {}
    qm = create_method(name, **kw).quantize(model if model is not None else _resnet8(), ctx)
    qm.module.eval()
    with torch.no_grad():
        ref = qm.module(x)
    return qm, ref


@pytest.fixture(scope="module")
def built(tmp_path_factory, data):
    """One RTN ResNet-8 artifact (batch 4) and the fake-quant logits it must reproduce."""
    from ternbench.schedules.artifact import write_artifact
    from ternbench.schedules.graph import build_graph, compile_graph

    qm, ref = _quantize("rtn", data)
    gm = build_graph(qm.module, qm.export(), batch=BATCH, input_shape=(1, 28, 28))
    ex = compile_graph(gm)
    path = write_artifact(tmp_path_factory.mktemp("art") / "rtn", ex, gm.params,
                          input_shape=gm.input_shape, output_shape=gm.output_shape,
                          target=gm.target, mean=(0.286,), std=(0.353,))
    return path, gm, ref


def test_graph_is_one_module_with_every_kernel(built) -> None:
    _path, gm, _ref = built
    names = {gv.name_hint for gv in gm.mod.functions}
    assert "main" in names
    # every conv/linear of ResNet-8 (9 convs incl. the shortcut ones, 1 linear) is a call
    assert len(gm.kernels) == 10 and all(k.func in names for k in gm.kernels)
    assert gm.folded_bn >= 9 and gm.output_shape == (BATCH, 10)


def test_artifact_reproduces_fake_quant_logits(built, data) -> None:
    from ternbench.schedules.artifact import load_artifact
    from ternbench.schedules.model import compare_logits

    path, _gm, ref = built
    art = load_artifact(path)
    got = art.predict(data[0].numpy())  # 16 samples = 4 batches of the compiled batch
    check = compare_logits(got, ref.numpy())
    assert check.samples == 16 and check.top1_agreement >= 0.9 and check.rel_diff < 1e-3


def test_manifest_records_what_a_deployer_needs(built) -> None:
    path, _gm, _ref = built
    m = json.loads((path / "manifest.json").read_text())
    assert m["input"]["shape"] == [BATCH, 1, 28, 28] and m["input"]["layout"] == "NCHW"
    assert m["input"]["normalize"] == {"mean": [0.286], "std": [0.353]}
    assert m["target"]["arch"] == "x86_64" and m["target"]["mcpu"]
    assert json.loads(m["target"]["target"])["kind"] == "llvm"
    assert set(m["files"]) == {"model.so", "params.npz"}
    assert m["tvm_version"] and len(m["params"]["order"]) == len(m["params"]["names"])


def test_runtime_only_loading_reproduces_the_logits(built, data, tmp_path) -> None:
    """docs/examples/run_artifact.py, run in a fresh interpreter that imports only tvm and
    numpy (ternbench must not be imported on the way)."""
    path, _gm, ref = built
    _run_example(path, data[0][:BATCH].numpy(), ref[:BATCH].numpy(), tmp_path)


def test_runtime_only_loading_runs_amx_kernels(data, tmp_path) -> None:
    """An artifact with ``t2_amx`` kernels (TWN, 8-bit activations, on AMX-INT8) runs from the
    example script too: it asks Linux for the tile state itself."""
    from conftest import amx_granted
    from ternbench.schedules.artifact import write_artifact
    from ternbench.schedules.graph import compile_graph

    if not amx_granted():
        pytest.skip("needs AMX-INT8 and the tile state")
    _qm, gm, ref = _conv128("twn", data, act_bits=8)
    assert "tvm_t2_amx" in [k.impl for k in gm.kernels]
    path = write_artifact(tmp_path / "twn8", compile_graph(gm), gm.params,
                          input_shape=gm.input_shape, output_shape=gm.output_shape,
                          target=gm.target)
    _run_example(path, data[0][:8].numpy(), ref[:8].numpy(), tmp_path)


def _run_example(path: Path, x: np.ndarray, ref: np.ndarray, tmp_path: Path) -> None:
    from ternbench.schedules.model import compare_logits

    np.save(tmp_path / "x.npy", x)
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['run_artifact.py', {str(path)!r}, {str(tmp_path / 'x.npy')!r}]\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'ternbench')\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    compare_logits(np.asarray(out["logits"]), ref)


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_tampered_artifact_is_refused_in_one_line(built, tmp_path) -> None:
    from ternbench.schedules.artifact import ArtifactError, load_artifact

    art = _copy(built[0], tmp_path)
    raw = bytearray((art / "params.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (art / "params.npz").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError) as exc:
        load_artifact(art)
    msg = str(exc.value)
    assert "params.npz" in msg and "sha256" in msg and "\n" not in msg
    # the runtime-only example refuses it too
    res = subprocess.run([sys.executable, str(EXAMPLE), str(art)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0 and "sha256" in res.stderr


@pytest.mark.parametrize("edit, words", [
    ({"arch": "aarch64"}, "built for aarch64"),
    ({"cpu_features": ["avx2", "sme2"]}, "sme2, which this CPU lacks"),
])
def test_artifact_for_another_target_is_refused(built, tmp_path, edit, words) -> None:
    from ternbench.schedules.artifact import ArtifactError, load_artifact

    art = _copy(built[0], tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["target"].update(edit)
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as exc:
        load_artifact(art)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_missing_manifest_is_named(tmp_path) -> None:
    from ternbench.schedules.artifact import ArtifactError, verify_artifact

    with pytest.raises(ArtifactError, match="no manifest.json"):
        verify_artifact(tmp_path)



def _run_in_process(qm, data) -> np.ndarray:
    """The whole model of ``qm`` as one Relax module (batch 8), run here on 16 images."""
    import tvm
    from ternbench.schedules.graph import build_graph, compile_graph

    gm = build_graph(qm.module, qm.export(), batch=8, input_shape=(1, 28, 28))
    vm = tvm.relax.VirtualMachine(compile_graph(gm), tvm.cpu())
    ps = [tvm.runtime.tensor(a) for _n, a in gm.params]
    return np.concatenate([vm["main"](tvm.runtime.tensor(data[0][i:i + 8].numpy()), *ps).numpy()
                           for i in (0, 8)])

@pytest.mark.parametrize("method", ["sttn", "fgq"])
def test_other_methods_lower_and_match(method, data) -> None:
    """STTN (ternary activations, PReLU/Hardtanh-free ResNet-8) and FGQ (grouped ternary
    weights, int8 activations) as whole modules, run in process."""
    from ternbench.schedules.model import compare_logits

    qm, ref = _quantize(method, data)
    compare_logits(_run_in_process(qm, data), ref.numpy())


def test_tvm_round_is_half_to_even_on_the_cpu() -> None:
    """The quantize stages round with ``tirx.round``: on the CPU (LLVM) it must round half to
    even like torch.round / ``ActQuantizer``, in a vectorised loop and at its tail."""
    import tvm
    from tvm import te

    vals = np.arange(-130, 130, 0.5, dtype=np.float32)  # every half from -130 to 129.5
    x = te.placeholder((len(vals),), "float32", name="x")
    out = te.compute((len(vals),), lambda i: tvm.tirx.round(x[i]), name="r")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, out]))
    _outer, inner = sch.split(sch.get_loops(sch.get_sblock("r"))[0], [None, 16])
    sch.vectorize(inner)
    mod = tvm.compile(sch.mod, target="llvm")
    got = tvm.runtime.tensor(np.zeros_like(vals))
    mod(tvm.runtime.tensor(vals), got)
    assert np.array_equal(got.numpy(), np.rint(vals))
    assert np.array_equal(got.numpy(), torch.round(torch.from_numpy(vals)).numpy())


def test_quantize_stages_vectorise_whole_pixels_and_run_once(data) -> None:
    """On x86 a stage over a 16-channel map vectorises two pixels (32 lanes) at a time: on one
    16-lane vector LLVM vectorised the pixel loop around it once more, with gathers (a 28x28x16
    int8 quantize took 9.0 µs against 1.3). A downsampling block's first conv and its shortcut
    read the same codes (one quantize stage: 8 for ResNet-8's 10 convs/linear, not 10). The
    int8 ResNet-8 built that way still matches."""
    import re

    from ternbench.schedules.graph import build_graph
    from ternbench.schedules.model import compare_logits

    qm, ref = _quantize("int8", data)
    gm = build_graph(qm.module, qm.export(), batch=8, input_shape=(1, 28, 28))
    lanes: dict[str, tuple[int, list[int]]] = {}
    for gv, func in gm.mod.functions.items():
        if gv.name_hint.startswith(("quant_", "act_")):
            text = func.script()
            out_shape = re.findall(r"T\.Buffer\(\(([^)]*)\)", text)[-1]
            lanes[gv.name_hint] = (int(out_shape.split(",")[-1]),
                                   [int(v) for v in re.findall(r"T\.vectorized\((\d+)\)", text)])
    sixteen = [v for c, v in lanes.values() if c == 16]
    assert len(sixteen) >= 4 and all(v == [32] for v in sixteen), lanes
    assert sum(name.startswith("quant_") for name in lanes) == 8, sorted(lanes)
    # rounding by tirx.round (vectorisable; llvm.nearbyint), not tirx.nearbyint (which TVM
    # 0.27 scalarises inside a vectorised loop)
    quant = [f.script() for gv, f in gm.mod.functions.items() if gv.name_hint.startswith("quant_")]
    assert any("T.round(" in t for t in quant) and not any("T.nearbyint(" in t for t in quant)
    compare_logits(_run_in_process(qm, data), ref.numpy())


def _conv128(method: str, data, depth: int = 1, **kw):
    """A 1-channel stem and ``depth`` 128-channel 3x3/1 convs (each with a ReLU) quantized by
    ``method`` (every layer, ``first_last="same"``), its whole-model graph (batch 8) and its
    fake-quant logits."""
    from ternbench.schedules.graph import build_graph

    convs = [m for _ in range(depth) for m in (nn.Conv2d(128, 128, 3, padding=1), nn.ReLU())]
    model = nn.Sequential(nn.Conv2d(1, 128, 3, padding=1), nn.ReLU(), *convs,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
    torch.manual_seed(0)
    x, y = data
    ctx = QuantContext(calib_loader=[(x, y)], train_loader=[(x, y)], bn_batches=1,
                       progress=False)
    qm = create_method(method, first_last="same", **kw).quantize(model, ctx)
    qm.module.eval()
    with torch.no_grad():
        ref = qm.module(x)
    return qm, build_graph(qm.module, qm.export(), batch=8, input_shape=(1, 28, 28)), ref


def test_table_lookup_convs_lower_and_match(data) -> None:
    """TWN with int8 activations on every layer: on AVX-512BW the 1-channel stem (writing the
    next conv's int8 codes) and the 128-channel 3x3/1 conv run the table-lookup kernel inside
    the one module (the conv on CPUs with full-rate permutes; on AMX the conv runs
    ``t2_amx``), and the module reproduces the fake-quant logits."""
    from conftest import amx_granted
    from ternbench.schedules import _tvm, x86
    from ternbench.schedules.model import compare_logits

    qm, gm, ref = _conv128("twn", data, act_bits=8)
    impls = [k.impl for k in gm.kernels]
    info = _tvm.target_info("x86")
    lut = {"avx512f", "avx512bw"} <= info.features
    # the 128-channel conv takes them on a CPU with full-rate permutes only (Zen 4, not Intel),
    # and the AMX kernel first where the process has the tile state; the stem, read by the conv
    # through a ReLU, writes the conv's codes (``_q8``)
    want = ["tvm_t2_lut_q8", "tvm_t2_lut" if x86.full_rate_permutes(info) else "tvm_t2_vnni"]
    if amx_granted():
        want[1] = "tvm_t2_amx"
    assert impls[:2] == (want if lut else impls[:2]) and len(impls) == 3
    compare_logits(_run_in_process(qm, data), ref.numpy())


@pytest.mark.parametrize("method", ["sttn", "rtn"])
def test_wide_ternary_convs_lower_and_match(method, data) -> None:
    """Ternary activations on a 128-channel 3x3 conv inside the one module, which reproduces the
    fake-quant logits. On AVX512-VBMI with full-rate permutes (Zen 4) the byte-table lookup
    kernel, fed activation codes, for STTN (no offsets) and RTN (offsets: window sums and
    border terms in its epilogue); on AMX-INT8 the AMX kernel, fed the same codes (the same
    terms); elsewhere the popcount kernel, quantizing its float input while packing; with
    VPOPCNTDQ it keeps the two popcount sums apart (18 words per output)."""
    from conftest import amx_granted
    from ternbench.schedules import _tvm, x86
    from ternbench.schedules.model import compare_logits

    qm, gm, ref = _conv128(method, data)
    conv = gm.kernels[1]
    text = gm.mod[conv.func].script()
    info = _tvm.target_info("x86")
    feats = info.features
    amx = amx_granted()
    lut = not amx and {"avx512bw", "avx512vbmi"} <= feats and x86.full_rate_permutes(info)
    assert conv.impl == ("tvm_tt_amx" if amx else "tvm_tt_lut" if lut else "tvm_tt_popc")
    x_dtype = "int8" if lut or amx else "float32"  # codes, or quantized while packing
    assert f'X: T.Buffer((8, 28, 28, 128), "{x_dtype}")' in text
    split = not (lut or amx) and {"avx512vpopcntdq", "avx512dq"} <= feats
    assert ('sblock("acc_pair_update")' in text) == split  # combines the two sums
    compare_logits(_run_in_process(qm, data), ref.numpy())


@pytest.mark.parametrize(("method", "kw", "impl", "need"), [
    ("twn", {"act_bits": 8}, "tvm_t2_lut", ({"avx512f", "avx512bw"}, "AVX-512BW")),
    ("rtn", {}, "tvm_tt_lut", ({"avx512bw", "avx512vbmi"}, "AVX512-VBMI")),
])
def test_streaming_lookups_lower_and_match(stream_everything, method, kw, impl, need,
                                           data) -> None:
    """Every lookup kernel of a whole module with non-temporal stores (forced): each imports
    the store helper, the module links it once, and it reproduces the fake-quant logits."""
    from conftest import amx_granted, require_x86_features
    from ternbench.schedules.model import compare_logits

    require_x86_features(need[0], f"{impl.removeprefix('tvm_')} needs {need[1]}")
    qm, gm, ref = _conv128(method, data, **kw)
    # (the popcount kernels import their mask-word helpers the same way: look for the store)
    streaming = [k for k in gm.kernels if "tb_stream_f32" in gm.mod[k.func].script()]
    amx = {"tvm_t2_lut": "tvm_t2_amx", "tvm_tt_lut": "tvm_tt_amx"}[impl]
    want = {impl, amx} if amx_granted() else {impl}
    assert {k.impl for k in streaming} == want  # at least one, all of these kinds
    compare_logits(_run_in_process(qm, data), ref.numpy())


@pytest.mark.parametrize(("method", "kw"), [("twn", {"act_bits": 8}), ("sttn", {}),
                                          ("rtn", {})])
def test_output_quantizer_fused_into_int8_output_convs(method, kw, data, monkeypatch) -> None:
    """conv -> ReLU -> conv on a kernel that can write int8 outputs (AMX int8 tiles; the table
    lookups on AVX-512): the first 128-channel conv writes the second's int8 (or ternary) codes
    from its epilogue (``_q8``, the ReLU in the clip), no quantize stage runs between them, and
    the module reproduces the fake-quant logits; the second conv, read by a pooling stage,
    keeps float32 outputs."""
    from ternbench.schedules.graph import build_graph
    from ternbench.schedules.model import compare_logits

    qm, gm, ref = _conv128(method, data, depth=2, **kw)
    impls = [k.impl for k in gm.kernels]
    base = impls[2]  # the second conv's kernel, the same rule as the first's
    if base not in ("tvm_t2_amx", "tvm_tt_amx", "tvm_t2_lut", "tvm_tt_lut"):
        pytest.skip(f"{base} writes float32 outputs only (int8 outputs: AMX int8 tiles, "
                    "table lookups)")
    assert impls[1:3] == [base + "_q8", base], impls
    text = gm.mod[gm.kernels[1].func].script()
    assert 'out: T.Buffer((6272, 128), "int8")' in text
    compare_logits(_run_in_process(qm, data), ref.numpy())
    # a quantize stage fewer per fused conv than with the fusion off (float32 out, a stage
    # quantizes it): on the lookups the 1-channel stem fuses as well
    from ternbench.schedules import graph

    monkeypatch.setattr(graph, "_conv_consumers", lambda gm, mods: {})
    plain = build_graph(qm.module, qm.export(), batch=8, input_shape=(1, 28, 28))
    assert [k.impl for k in plain.kernels][1:3] == [base, base]
    stages = [gm.mod["main"].script().count("quant_"), plain.mod["main"].script().count("quant_")]
    fused = sum(k.impl.endswith("_q8") for k in gm.kernels)
    assert fused == 1 + (impls[0] == f"{base}_q8") and stages[0] == stages[1] - fused > 0
    # the kernel sum times the module's int8-output kernels where it runs them (checked as
    # codes), the float32 ones elsewhere
    from ternbench.schedules import measure
    from ternbench.schedules.graph import kernel_sum_timer

    clips = gm.out_clips()
    assert sorted(clips) == sorted(k.layer for k in gm.kernels if k.impl.endswith("_q8"))
    assert all(c[0] == 0 for c in clips.values())  # each through a ReLU
    seen = []

    def spy(kern, *a, **kw):
        seen.append(kern.spec.out_clip)
        return prepare(kern, *a, **kw)

    prepare = measure.prepare_kernel
    monkeypatch.setattr(measure, "prepare_kernel", spy)
    timer = kernel_sum_timer(qm.export(), 8, out_clips=clips)
    assert sorted(c for c in seen if c is not None) == sorted(clips.values())
    assert timer(1) > 0


def test_unsupported_op_is_named(data) -> None:
    from ternbench.schedules.graph import UnsupportedGraphError, build_graph

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 28 * 28, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.sigmoid(self.conv(x)).flatten(1))

    qm, _ref = _quantize("fgq", data, Odd().eval())
    with pytest.raises(UnsupportedGraphError, match="sigmoid"):
        build_graph(qm.module, qm.export(), batch=1, input_shape=(1, 28, 28))


def test_backends_are_timed_in_interleaved_rounds() -> None:
    from ternbench.bench.artifact_eval import time_backends

    order: list[str] = []

    def make(k: str):
        def run(n: int) -> float:
            order.append(k)
            return 1e-4

        return run

    raw = time_backends({"a": make("a"), "b": make("b")}, repeat=3, min_repeat_ms=1.0)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert raw == {"a": [100.0] * 3, "b": [100.0] * 3}


def test_report_shows_both_top1_and_flags_a_gap() -> None:
    from ternbench.reports.tables import _model_table, format_model

    base = {"status": "ok", "vid": 0, "label": "rtn", "method": "rtn", "model": "resnet8",
            "dataset": "fashion-mnist", "unit": "", "error": ""}
    rows = [
        {**base, "target": "-", "layer": "", "impl": "", "metric": "top1", "value": 90.0},
        {**base, "target": "x86", "layer": "__total__", "impl": "tvm", "metric": "latency_us",
         "value": 200.0},
    ]
    for impl, us in (("tvm", 220.0), ("torch_fp32", 700.0), ("torch_int8", 400.0),
                     ("onnxruntime_int8", 440.0)):
        rows.append({**base, "target": "x86", "layer": "__model__", "impl": impl,
                     "metric": "latency_us", "value": us})
    rows.append({**base, "target": "x86", "layer": "__model__", "impl": "tvm",
                 "metric": "top1_deployed", "value": 89.5})
    t = _model_table(pd.DataFrame(rows))
    r = t.iloc[0]
    assert r.overhead == pytest.approx(1.1) and r.speedup_ort == pytest.approx(2.0)
    # the kernel sum timed in the artifact's own rounds wins over the per-layer rows' sum
    same = {**base, "target": "x86", "layer": "__model__", "impl": "tvm",
            "metric": "kernel_sum_us", "value": 110.0}
    assert _model_table(pd.DataFrame([*rows, same])).iloc[0].overhead == pytest.approx(2.0)
    assert r.top1 == 90.0 and r.top1_deployed == 89.5 and "-0.50" in r.flag
    disp = format_model(t)
    assert disp.loc[0, "Top-1 deployed (%)"] == "89.50" and disp.loc[0, "Flag"]
    rows[-1]["value"] = 90.05
    assert _model_table(pd.DataFrame(rows)).iloc[0].flag == ""


def test_onnxruntime_int8_baseline_agrees_with_fp32(data) -> None:
    pytest.importorskip("onnxruntime")
    from ternbench.bench.ort_baseline import ort_int8_model

    torch.manual_seed(0)
    m = _resnet8()
    x = data[0]
    ort = ort_int8_model(m, x, threads=1)
    with torch.no_grad():
        ref = m(x).numpy()
    got = np.concatenate([ort(x[i:i + 1].numpy()) for i in range(len(x))])
    assert got.shape == ref.shape
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.8
    assert np.abs(got - ref).max() < 0.2 * np.abs(ref).max()


def test_aarch64_artifact_is_cross_built_and_refused_here(data, tmp_path) -> None:
    """The whole model cross-built for the ARM target (Cortex-A76, dotprod): a real aarch64
    library, which this x86 host refuses to load with one line."""
    import shutil as _sh

    if _sh.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64 cross gcc (apt-get install gcc-aarch64-linux-gnu)")
    from ternbench.schedules.artifact import ArtifactError, load_artifact, write_artifact
    from ternbench.schedules.graph import build_graph, compile_graph

    qm, _ref = _quantize("sttn", data)
    gm = build_graph(qm.module, qm.export(), batch=1, input_shape=(1, 28, 28), target="arm")
    path = write_artifact(tmp_path / "arm", compile_graph(gm), gm.params,
                          input_shape=gm.input_shape, output_shape=gm.output_shape,
                          target=gm.target)
    assert (path / "model.so").read_bytes()[18] == 0xB7  # ELF e_machine: EM_AARCH64
    assert json.loads((path / "manifest.json").read_text())["target"]["arch"] == "aarch64"
    with pytest.raises(ArtifactError) as exc:
        load_artifact(path)
    assert "built for aarch64" in str(exc.value) and "\n" not in str(exc.value)


def test_accuracy_latency_plot_uses_the_whole_model_figure() -> None:
    from types import SimpleNamespace

    from ternbench.reports.plots import _whole_model_latency

    lat = pd.DataFrame({"vid": [0, 1], "model": ["m", "m"], "dataset": ["d", "d"],
                        "latency_us": [300.0, 500.0], "torch_fp32_us": [400.0, 400.0]})
    model = pd.DataFrame({"vid": [0], "model": ["m"], "dataset": ["d"], "target": ["x86"],
                          "tvm_us": [250.0], "torch_fp32_us": [700.0]})
    out, whole = _whole_model_latency(SimpleNamespace(model=model), lat, "x86")
    assert out.latency_us.tolist() == [250.0, 500.0] and not whole  # vid 1 has no artifact
    assert out.torch_fp32_us.tolist() == [700.0, 400.0]
    out, whole = _whole_model_latency(SimpleNamespace(model=model), lat[:1], "x86")
    assert whole and list(out.columns) == list(lat.columns)


def test_max_pooling_and_residual_graph_matches(data) -> None:
    """Max pooling (padded 3x3/2 as in ResNet-18's stem, and 2x2 ceil-mode as in STTN's
    shortcut), an unfolded BatchNorm, PReLU and Hardtanh, lowered and run in process."""
    import tvm
    from ternbench.schedules.graph import build_graph, compile_graph
    from ternbench.schedules.model import compare_logits

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(16)
            self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
            self.bn2 = nn.BatchNorm2d(16)  # unfolded: fed by the pool, not by a conv
            self.act = nn.Hardtanh()
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.prelu = nn.PReLU(16)
            self.pool2 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.fc = nn.Linear(16 * 7 * 7, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.pool1(torch.relu(self.bn1(self.conv1(x))))  # 28 -> 14
            y = self.prelu(self.conv2(self.act(self.bn2(y))) + y)
            return self.fc(self.pool2(y).flatten(1))  # 14 -> 7

    torch.manual_seed(0)
    qm, ref = _quantize("fgq", data, Net().eval())
    gm = build_graph(qm.module, qm.export(), batch=8, input_shape=(1, 28, 28))
    vm = tvm.relax.VirtualMachine(compile_graph(gm), tvm.cpu())
    ps = [tvm.runtime.tensor(a) for _n, a in gm.params]
    got = np.concatenate([vm["main"](tvm.runtime.tensor(data[0][i:i + 8].numpy()), *ps).numpy()
                          for i in (0, 8)])
    check = compare_logits(got, ref.numpy())
    assert check.rel_diff < 1e-3


def test_sttn_layout_model_lowers_and_matches(data) -> None:
    """The STTN repository's block (BN -> Hardtanh -> conv -> BN -> + parameter-free shortcut
    (2x2 ceil max pool, zero channels) -> PReLU), quantized by STTN."""
    import re

    from ternbench.bench.models import create_model
    from ternbench.schedules.graph import build_graph
    from ternbench.schedules.model import compare_logits

    torch.manual_seed(0)
    qm, ref = _quantize("sttn", data, create_model("sttn_resnet8", in_chans=1,
                                                   num_classes=10).eval())
    compare_logits(_run_in_process(qm, data), ref.numpy())
    # max pooling is not pointwise: one pixel per vector (2 pixels' windows in one vector ran
    # 7x slower), where the 16-channel pointwise stages span 2 pixels
    gm = build_graph(qm.module, qm.export(), batch=8, input_shape=(1, 28, 28))
    lanes = {gv.name_hint: re.findall(r"T\.vectorized\((\d+)\)", f.script())
             for gv, f in gm.mod.functions.items()
             if gv.name_hint.startswith(("maxpool_", "quant_", "act_"))}
    pools = [v for n, v in lanes.items() if n.startswith("maxpool_")]
    assert ["16"] in pools and all(v in (["16"], ["32"]) for v in pools), lanes
    assert ["32"] in [v for n, v in lanes.items() if not n.startswith("maxpool_")], lanes
    # nor are stages that read per-channel parameters (BatchNorm, PReLU) spread over pixels:
    # lane % C would index them (a gather: FGQ on this block took 1.30x the time)
    with_params = [lanes[gv.name_hint] for gv, f in gm.mod.functions.items()
                   if gv.name_hint in lanes and "T.Buffer((16,)" in f.script()
                   and re.findall(r"T\.Buffer\(\(([^)]*)\)", f.script())[-1].endswith(" 16")]
    assert with_params and all(v == ["16"] for v in with_params), lanes


def test_straight_line_plan_mirrors_main(built) -> None:
    """The plan a runtime-free driver executes: one call per ``call_tir`` of ``main``, in
    order, plain float hand-offs between layers as views (no copy stage), parameters aligned."""
    from ternbench.schedules.graph import straight_line_plan

    _path, gm, _ref = built
    plan = straight_line_plan(gm)
    names = [n for n, _a in plan.calls]
    assert set(names) == {gv.name_hint for gv in plan.prim_mod.functions}
    assert [k.func for k in gm.kernels] == [n for n in names if n.startswith("k")]
    assert len(plan.param_ids) == len(gm.params)
    for pid, (_n, a) in zip(plan.param_ids, gm.params, strict=True):
        assert plan.tensors[pid].shape == a.shape and plan.tensors[pid].dtype == str(a.dtype)
    views = [t for t in plan.tensors if t.view_of is not None]
    assert views, "the C=1 input and the pooled vector reach their kernels as views"
    for t in views:
        src = plan.tensors[t.view_of]
        assert np.prod(t.shape) == np.prod(src.shape) and t.dtype == src.dtype
    assert plan.tensors[plan.output_id].shape == gm.output_shape


@pytest.mark.parametrize("method", ["rtn", "fgq"])
def test_whole_model_runs_under_qemu_and_matches(method, data) -> None:
    """The whole ARM model (every kernel and stage in one aarch64 library, driven by the
    harness's plan) under qemu-user reproduces the fake-quant logits."""
    from ternbench.schedules import cross
    from ternbench.schedules.graph import build_graph, straight_line_plan
    from ternbench.schedules.model import compare_logits

    why = cross.qemu_unavailable_reason()
    if why:
        pytest.skip(f"ARM models cannot run here: {why} (.ci/run installs them)")
    qm, ref = _quantize(method, data)
    gm = build_graph(qm.module, qm.export(), batch=2, input_shape=(1, 28, 28), target="arm")
    got = cross.run_plan_under_qemu(straight_line_plan(gm), [a for _n, a in gm.params],
                                    data[0][:6].numpy(), gm.target)
    assert got.shape == (6, 10)
    check = compare_logits(got, ref[:6].numpy(), "ARM model under qemu")
    assert check.top1_agreement == 1.0
    # each sample matches to float32 rounding, except where that rounding flipped one int8
    # activation code at a tie (FGQ's fake-quant convs run in float32, the kernels sum exact
    # integer groups: a sample then moves by ~1e-3; a wrong kernel moves every sample far more)
    per = np.abs(got - ref[:6].numpy()).max(axis=1) / np.abs(ref[:6].numpy()).max()
    assert np.median(per) < 1e-5 and per.max() < 1e-2, per
    # a wrong parameter is caught before anything runs, naming it
    params = [a for _n, a in gm.params]
    params[1] = params[1][..., :-1]
    with pytest.raises(ValueError, match="parameter 1"):
        cross.run_plan_under_qemu(straight_line_plan(gm), params, data[0][:2].numpy(),
                                  gm.target)


@pytest.fixture(scope="module")
def cuda_built(tmp_path_factory, data):
    """The STTN ResNet-8 whole model built for CUDA (batch 2) as an artifact."""
    from ternbench.schedules.artifact import write_artifact
    from ternbench.schedules.graph import build_graph, compile_graph

    qm, ref = _quantize("sttn", data)
    gm = build_graph(qm.module, qm.export(), batch=2, input_shape=(1, 28, 28), target="cuda")
    ex = compile_graph(gm)
    path = write_artifact(tmp_path_factory.mktemp("art") / "cuda", ex, gm.params,
                          input_shape=gm.input_shape, output_shape=gm.output_shape,
                          target=gm.target)
    return path, gm, ex, ref


def test_cuda_whole_model_matches_in_serial_emulation(cuda_built, data) -> None:
    """Every kernel and stage of the CUDA module, thread loops made serial and thread storage
    poisoned, run on the CPU: the fake-quant logits."""
    from ternbench.schedules import cuda
    from ternbench.schedules.model import compare_logits

    _path, gm, _ex, ref = cuda_built
    assert {k.impl for k in gm.kernels} >= {"tvm_tt_popc_cuda"}
    got = cuda.emulate_graph(gm, data[0][:6].numpy())
    check = compare_logits(got, ref[:6].numpy(), "CUDA model (serial emulation)")
    assert check.rel_diff < 1e-3 and check.top1_agreement == 1.0
    with pytest.raises(ValueError, match="whole batches"):
        cuda.emulate_graph(gm, data[0][:3].numpy())


def test_cuda_whole_model_device_code_compiles(cuda_built) -> None:
    from ternbench.schedules import cuda

    why = cuda.compiler_unavailable_reason()
    if why:
        pytest.skip(f"cannot compile CUDA source here: {why}")
    _path, _gm, ex, _ref = cuda_built
    assert "__global__" in cuda.nvrtc.module_source(ex)
    assert len(cuda.compile_module_source(ex, "sm_80")) > 1000


def test_cuda_artifact_needs_a_gpu(cuda_built) -> None:
    from ternbench.schedules.artifact import ArtifactError, load_artifact

    path, _gm, _ex, _ref = cuda_built
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"]["device"] == "cuda" and manifest["target"]["mcpu"].startswith("sm_")
    if _gpu_visible():
        pytest.skip("a GPU is visible: the gpu tier runs this artifact")
    with pytest.raises(ArtifactError) as exc:
        load_artifact(path)
    assert "CUDA GPU" in str(exc.value) and "\n" not in str(exc.value)


def _gpu_visible() -> bool:
    from ternbench.schedules import _tvm

    return _tvm.cuda_arch() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_visible(), reason="no CUDA GPU visible")
def test_cuda_artifact_runs_on_the_gpu(cuda_built, data) -> None:
    from ternbench.schedules.artifact import load_artifact
    from ternbench.schedules.model import compare_logits

    path, _gm, _ex, ref = cuda_built
    got = load_artifact(path).predict(data[0][:6].numpy())
    check = compare_logits(got, ref[:6].numpy(), "CUDA artifact on the GPU")
    assert check.top1_agreement == 1.0


def test_kernel_chain_timer_runs_the_kernels_in_sequence(built) -> None:
    """The kernels-in-sequence figure: every kernel of main once per pass, no stages."""
    from ternbench.schedules.graph import kernel_chain_timer

    _path, gm, _ref = built
    t = kernel_chain_timer(gm)
    assert 0 < t(3) < 1.0


def test_compare_logits_strict_and_lenient() -> None:
    """Strict: both the logit gap and the top-1 agreement must hold. Not strict (random-weight
    models): one of them suffices, both failing still raises."""
    from ternbench.schedules.model import ModelCheckError, compare_logits

    ref = np.tile(np.array([[1.0, 0.99, -1.0]]), (8, 1))
    flipped = ref.copy()
    flipped[0, :2] = [0.98, 1.0]  # a 2% gap flips a near tie: 7 of 8 agree
    with pytest.raises(ModelCheckError, match="agreement 87.5%"):
        compare_logits(flipped, ref)
    assert compare_logits(flipped, ref, strict=False).top1_agreement == 0.875
    drift = ref * 1.5  # 50% gap, every top-1 kept
    with pytest.raises(ModelCheckError):
        compare_logits(drift, ref)
    assert compare_logits(drift, ref, strict=False).rel_diff == pytest.approx(0.5)
    garbage = ref[:, ::-1] * 3  # far off and every top-1 wrong
    with pytest.raises(ModelCheckError):
        compare_logits(garbage, ref, strict=False)
