"""End to end on the embedded dataset: plan -> executor -> results store -> resume -> report."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import needs_fashion
from ternbench.bench.config import BenchConfig
from ternbench.bench.runner import plan, run

pytestmark = [needs_fashion]
ACC = ["method", "metric", "value"]


def _acc(df: pd.DataFrame) -> pd.DataFrame:
    df = df[(df.target == "-") & (df.metric != "quantize_seconds")][ACC]
    return df.sort_values(ACC[:2]).reset_index(drop=True)


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("TERNBENCH_CACHE", str(d))
    return d


def test_plan_keys_are_stable_and_distinct(tiny_profile) -> None:
    a = plan(BenchConfig(methods=("fp32", "fgq"), profile="tiny", seeds=(0, 1)))
    b = plan(BenchConfig(methods=("fp32", "fgq"), profile="tiny", seeds=(0, 1)))
    assert [c.key for c in a] == [c.key for c in b] and len({c.key for c in a}) == 4
    c = plan(BenchConfig(methods=("fgq",), profile="tiny", overrides={"fgq": {"group_size": 8}}))
    assert c[0].key not in {x.key for x in a}


@pytest.mark.tvm
def test_local_run_with_latency_resume_and_report(tiny_profile, cache, tmp_path) -> None:
    cfg = BenchConfig(
        methods=("fp32", "fgq"), profile="tiny", out=tmp_path / "run", executor="local"
    )
    s = run(cfg, progress=False)
    df = s.frame
    assert s.failed == 0, df[df.status != "ok"][["method", "error"]]
    acc = df[(df.target == "-") & (df.metric == "top1")].set_index("method").value
    assert set(acc.index) == {"fp32", "fgq"} and ((0 <= acc) & (acc <= 100)).all()
    lat = df[(df.target == "x86") & (df.metric == "latency_us")]
    assert {"torch_fp32", "tvm"} <= set(lat.impl) and (lat.value > 0).all()
    assert (df[df.metric == "kernel_max_abs_err"].value < 1e-3).all()
    total = lat[lat.layer == "__total__"]
    assert len(total) == 4  # (fp32, fgq) x (tvm, torch_fp32)
    # whole model: one TVM module per cell (the artifact), checked against the fake-quant
    # logits, evaluated on the test subset, then timed beside torch and ONNX Runtime
    model = df[df.layer == "__model__"]
    e2e = model[model.metric == "latency_us"]
    assert set(e2e.impl) == {"tvm", "torch_fp32", "torch_int8", "onnxruntime_int8"}
    assert (e2e.value > 0).all()
    tvm = model[model.impl == "tvm"]
    assert (tvm[tvm.metric == "model_top1_agreement"].value >= 0.9).all()
    assert (tvm[tvm.metric == "model_logit_rel_diff"].value < 0.05).all()
    dep = tvm[tvm.metric == "top1_deployed"].set_index("method").value
    assert set(dep.index) == {"fp32", "fgq"} and (abs(dep - acc) <= 1.0).all()
    assert (tvm[tvm.metric == "deployed_pred_agreement"].value >= 0.95).all()
    arts = list((tmp_path / "run" / "artifacts").glob("*/manifest.json"))
    assert len(arts) == 2
    for f in ("results.parquet", "results.csv", "run.json", "report.md", "report.html"):
        assert (tmp_path / "run" / f).exists(), f
    assert list((tmp_path / "run" / "subsets").glob("*.npy"))
    # resume: everything finished is kept and nothing is recomputed
    parts = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").glob("*.json")}
    s2 = run(cfg, progress=False, report=False)
    assert s2.done == 0 and s2.skipped == 4
    assert {p: p.stat().st_mtime_ns for p in parts} == parts
    pd.testing.assert_frame_equal(s2.frame, df)


@pytest.mark.ray
def test_ray_and_local_give_identical_rows(tiny_profile, cache, tmp_path) -> None:
    methods = ("fp32", "int8", "twn", "fgq")
    local = run(
        BenchConfig(
            methods=methods, profile="tiny", out=tmp_path / "l", executor="local", targets=()
        ),
        progress=False,
        report=False,
    )
    ray = run(
        BenchConfig(
            methods=methods,
            profile="tiny",
            out=tmp_path / "r",
            executor="ray",
            targets=(),
            num_cpus=2,
        ),
        progress=False,
        report=False,
    )
    assert local.failed == ray.failed == 0
    pd.testing.assert_frame_equal(_acc(local.frame), _acc(ray.frame))
    assert len(_acc(local.frame)) > 30


def test_failed_latency_is_recorded_and_accuracy_kept(tiny_profile, cache, tmp_path,
                                                      monkeypatch) -> None:
    """A kernel that fails on a target marks that part failed with its reason; the rest stays."""
    import ternbench.schedules as sched

    def broken(lx, **kw):
        raise RuntimeError(f"LLVM refused {lx.name}")

    monkeypatch.setattr(sched, "measure_layer", broken)
    cfg = BenchConfig(methods=("fp32", "fgq"), profile="tiny", out=tmp_path / "run",
                      executor="local")
    s = run(cfg, progress=False, report=False)
    df = s.frame
    assert s.failed == 2  # one latency part per cell
    bad = df[df.status == "failed"]
    assert set(bad.target) == {"x86"} and bad.error.str.contains("LLVM refused").all()
    assert len(df[(df.metric == "top1") & (df.status == "ok")]) == 2
    monkeypatch.undo()  # the next run retries only the failed parts
    s2 = run(cfg, progress=False, report=False)
    assert s2.failed == 0 and s2.done == 2 and s2.skipped == 2


def test_same_command_twice_gives_identical_rows(tiny_profile, cache, tmp_path) -> None:
    frames = [run(BenchConfig(methods=("fp32", "fgq", "twn"), profile="tiny",
                              out=tmp_path / f"r{i}", executor="local", targets=()),
                  progress=False, report=False).frame for i in range(2)]
    pd.testing.assert_frame_equal(_acc(frames[0]), _acc(frames[1]))


def test_diverging_training_fails_its_cell_with_the_reason(tiny_profile, cache, tmp_path) -> None:
    cfg = BenchConfig(methods=("fp32", "ttn_re"), profile="tiny", out=tmp_path / "run",
                      executor="local", targets=(),
                      overrides={"ttn_re": {"lr": 1e30, "epochs": 1.0}})
    s = run(cfg, progress=False, report=False)
    df = s.frame
    bad = df[df.status == "failed"]
    assert s.failed == 1 and set(bad.method) == {"ttn_re"}
    assert bad.error.str.contains("TrainingDivergedError").all(), bad.error.tolist()
    assert not (df[df.method == "ttn_re"].metric == "top1").any()  # no bogus accuracy
    assert len(df[(df.method == "fp32") & (df.metric == "top1")]) == 1


def test_user_weights_replace_the_baseline(tiny_profile, cache, tmp_path) -> None:
    import json

    import torch
    from ternbench.bench.models import create_model

    path = tmp_path / "mine.pt"
    torch.save(create_model("resnet8", in_chans=1, num_classes=10).state_dict(), path)
    cached_before = set(cache.glob("*.safetensors"))  # the cache is shared between tests
    s = run(BenchConfig(methods=("fp32",), profile="tiny", out=tmp_path / "run",
                        executor="local", targets=(), weights=str(path)),
            progress=False, report=False)
    assert s.failed == 0
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["baselines"][0]["source"] == "user"
    assert set(cache.glob("*.safetensors")) == cached_before  # nothing was trained


def test_disk_full_mid_run_keeps_earlier_rows(tiny_profile, cache, tmp_path, monkeypatch,
                                              capsys) -> None:
    import errno

    from ternbench.bench.cli import main
    from ternbench.bench.results import ResultStore

    real = ResultStore.write_part
    calls = {"n": 0}

    def full_after_one(self, key, part, rows):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.part_path(key, part)))
        return real(self, key, part, rows)

    monkeypatch.setattr(ResultStore, "write_part", full_after_one)
    out = tmp_path / "run"
    code = main(["run", "--methods", "fgq", "--profile", "tiny", "--executor", "local",
                 "--targets", "", "--no-report", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    parts = list(out.glob("cells/*.json"))
    assert len(parts) == 1 and pd.read_csv(out / "results.csv").metric.eq("top1").any()
    monkeypatch.undo()  # space freed: the re-run resumes and keeps the finished part
    before = parts[0].stat().st_mtime_ns
    assert main(["run", "--methods", "fgq", "--profile", "tiny", "--executor", "local",
                 "--targets", "", "--no-report", "--no-progress", "--out", str(out)]) == 0
    assert parts[0].stat().st_mtime_ns == before


@pytest.mark.tvm
def test_arm_and_cuda_targets_are_built_and_reported(tiny_profile, cache, tmp_path,
                                                     capsys) -> None:
    """`--targets arm,cuda` on a machine without a board or GPU: ARM kernels run bit-exact under
    qemu-user ("built and verified"), CUDA kernels are generated ("built"), the report says so."""
    from ternbench.schedules import _tvm
    from ternbench.schedules.cross import qemu_unavailable_reason

    cfg = BenchConfig(methods=("fp32", "rtn"), profile="tiny", out=tmp_path / "run",
                      executor="local", targets=("arm", "cuda"))
    s = run(cfg, progress=False)
    df = s.frame
    assert s.failed == 0, df[df.status != "ok"][["method", "target", "error"]]
    st = df[df.metric == "kernel_status"].set_index(["method", "target"]).unit
    arm_ok = not qemu_unavailable_reason()
    gpu = _tvm.cuda_arch() is not None
    for method in ("fp32", "rtn"):
        assert st[(method, "arm")].startswith("built and verified" if arm_ok else "built")
        assert st[(method, "cuda")].startswith("built and verified" if gpu else "built (")
    arm = df[df.target == "arm"]
    built = arm[arm.metric == "kernels_built"].set_index("method").value
    verified = arm[arm.metric == "kernels_verified"].set_index("method").value
    assert (built > 0).all() and ((verified == built).all() if arm_ok else True)
    assert not len(df[(df.metric == "latency_us") & df.target.isin(["arm"])])  # never timed
    # the whole model cross-built as one aarch64 module per cell (built, not run here)
    cross = arm[(arm.layer == "__model__") & (arm.metric == "artifact_kernels")]
    assert set(cross.method) == {"fp32", "rtn"}
    for unit in cross.unit:
        assert (tmp_path / "run" / unit / "model.so").exists() and unit.endswith("-arm")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Built and verified targets" in md and "qemu-aarch64" in md
    from ternbench.bench.cli import _print_summary

    _print_summary(df, tmp_path / "run")  # the run's closing table: one column per target
    out = capsys.readouterr().out
    assert "arm" in out and "cuda" in out and ("built and verified" in out or not arm_ok)
