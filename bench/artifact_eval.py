"""The deployed artifact of a cell, built, checked, evaluated and timed (x86).

:func:`artifact_rows` is the whole-model part of a cell's x86 latency:

1. lower the deployed model into ONE TVM module (:mod:`ternbench.schedules.graph`) and write
   ``OUT/artifacts/<cell key>/`` (:mod:`ternbench.schedules.artifact`);
2. load it back (sha256 and target checked) and compare its logits with the fake-quant
   model's on the deploy-check images (``schedules.model`` tolerances): nothing is timed or
   evaluated otherwise;
3. evaluate the artifact itself on the cell's test subset, in shards (the run's executor: Ray
   tasks by default): ``top1_deployed`` beside the fake-quant ``top1`` and the share of images
   where both predict the same class;
4. time it, interleaved round by round on the same input, with torch FP32 eager, torch INT8
   (FX static, fbgemm) and ONNX Runtime INT8 (QDQ, per channel), the latter two calibrated on
   the cell's calibration images: one ``__model__`` row per backend.

Example:
    >>> from ternbench.bench.artifact_eval import BACKENDS
    >>> BACKENDS
    ('tvm', 'torch_fp32', 'torch_int8', 'onnxruntime_int8')
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .results import make_row
from .tasks import CellSpec, shard_indices

__all__ = ["BACKENDS", "artifact_rows", "build_cell_artifact", "eval_artifact_shard",
           "cross_artifact_rows", "cuda_artifact_rows",
           "time_backends", "calibration_images", "TOP1_FLAG_POINTS"]

log = logging.getLogger(__name__)

#: whole-model backends, in the order they are timed within a round
BACKENDS = ("tvm", "torch_fp32", "torch_int8", "onnxruntime_int8")
#: |top1_deployed - top1| above this (percentage points) is flagged in the report
TOP1_FLAG_POINTS = 0.1
MODEL_LAYER = "__model__"


def artifact_dir(root: Path, cell_key: str) -> Path:
    return Path(root) / "artifacts" / cell_key


def build_cell_artifact(cell: CellSpec, graph: torch.nn.Module, exports: dict[str, Any],
                        out_dir: Path, batch: int, target: str = "x86"
                        ) -> tuple[Path, Any, Any]:
    """Lower, compile and write the artifact of ``cell``; returns (path, GraphModule, the
    compiled executable)."""
    from ternbench.schedules.artifact import write_artifact
    from ternbench.schedules.graph import build_graph, compile_graph

    from .data import get_dataset_info

    info = get_dataset_info(cell.dataset)
    shape = (info.in_chans, info.image_size, info.image_size)
    gm = build_graph(graph, exports, batch=batch, input_shape=shape, target=target)
    t0 = time.perf_counter()
    ex = compile_graph(gm)
    gm.build_s += time.perf_counter() - t0
    path = write_artifact(
        out_dir, ex, gm.params, input_shape=gm.input_shape, output_shape=gm.output_shape,
        target=gm.target, mean=tuple(info.mean), std=tuple(info.std),
        info={"cell_key": cell.key, "method": cell.method, "model": cell.model,
              "dataset": cell.dataset, "folded_batchnorms": gm.folded_bn,
              "kernels": [{"layer": k.layer, "impl": k.impl, "func": k.func}
                          for k in gm.kernels]})
    return path, gm, ex


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def eval_artifact_shard(spec: CellSpec, files: dict[str, bytes], indices: np.ndarray
                        ) -> dict[str, Any]:
    """Top-1 counts and predictions of the artifact (its files' bytes) on one shard of the
    cell's test subset; the artifact is verified and loaded in this process."""
    from ternbench import schedules
    from ternbench.schedules.artifact import load_artifact

    torch.set_num_threads(spec.threads)
    with tempfile.TemporaryDirectory(prefix="ternbench-artifact-") as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        art = load_artifact(d)
        schedules.set_num_threads(spec.threads)
        test = spec.load(spec.test_split)
        preds, labels = [], []
        step = max(art.batch, 64)
        for i in range(0, len(indices), step):
            items = [test[int(j)] for j in indices[i:i + step]]
            x = torch.stack([it[0] for it in items]).numpy()
            preds.append(art.predict(x).argmax(1))
            labels += [int(it[1]) for it in items]
    pred = np.concatenate(preds).astype(np.int32) if preds else np.zeros(0, np.int32)
    y = np.asarray(labels, np.int64)
    return {"n": len(pred), "correct1": int((pred == y).sum()), "pred": pred}


def calibration_images(cell: CellSpec, limit: int = 256) -> torch.Tensor:
    """The cell's calibration images (the ones the methods calibrated on), at most ``limit``."""
    from .tasks import _context

    xs: list[torch.Tensor] = []
    for x, _y in _context(cell).calib_loader:
        xs.append(x)
        if sum(len(t) for t in xs) >= limit:
            break
    return torch.cat(xs)[:limit].float()


def time_backends(runs: dict[str, Callable[[int], float]], *, repeat: int,
                  min_repeat_ms: float) -> dict[str, list[float]]:
    """Interleaved rounds: in each round every backend runs ``number`` calls (sized once so
    that a round lasts ``min_repeat_ms``); returns µs per call for every round."""
    numbers = {}
    for k, fn in runs.items():
        per = max(fn(1), 1e-7)  # warm-up and a first estimate
        numbers[k] = max(1, int(min_repeat_ms / 1e3 / per) + 1)
    raw: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, fn in runs.items():
            raw[k].append(fn(numbers[k]) * 1e6)
    return raw


def artifact_rows(cell: CellSpec, store: Any, cfg: Any, base: dict[str, Any],
                  exports: dict[str, Any], executor: Any = None) -> list[dict[str, Any]]:
    """Build, check, evaluate and time the cell's artifact (see the module docstring)."""
    from ternbench import schedules
    from ternbench.core.export_io import load_graph_state
    from ternbench.schedules.artifact import load_artifact
    from ternbench.schedules.model import compare_logits, torch_int8_model

    from .kernels import loop_timer
    from .ort_baseline import ort_available, ort_int8_model
    from .tasks import eval_indices

    exp = store.root / "exports"
    gpath, cpath = exp / f"{cell.key}.graph.safetensors", exp / f"{cell.key}.check.npz"
    if not (gpath.exists() and cpath.exists()):
        log.warning("%s: no graph state / check logits in %s (written by an older ternbench);"
                    " whole-model artifact skipped", cell.method, exp)
        return []
    graph = load_graph_state(cell.build_model(), gpath.read_bytes()).eval()
    with np.load(cpath) as z:
        x_check, ref = z["x"].astype(np.float32), z["logits"]
    mb = {**base, "layer": MODEL_LAYER}
    t0 = time.perf_counter()
    path, gm, ex = build_cell_artifact(cell, graph, exports, artifact_dir(store.root, cell.key),
                                   cfg.latency_batch)
    art = load_artifact(path)
    build_s = time.perf_counter() - t0
    check = compare_logits(art.predict(x_check), ref, f"artifact {path}")
    rows = [
        make_row(mb, impl="tvm", metric="artifact_build_s", value=build_s, unit="s"),
        make_row(mb, impl="tvm", metric="model_logit_rel_diff", value=check.rel_diff,
                 unit="relative"),
        make_row(mb, impl="tvm", metric="model_top1_agreement", value=check.top1_agreement,
                 unit="fraction"),
        make_row(mb, impl="tvm", metric="artifact_kernels", value=float(len(gm.kernels)),
                 unit=str(path.relative_to(store.root))),
    ]
    rows += _accuracy(cell, store, path, executor, eval_indices(cell), mb)
    # --- latency, interleaved
    threads = cfg.latency_threads
    batch = art.batch
    x = torch.from_numpy(np.ascontiguousarray(x_check[:batch]))
    if x.shape[0] < batch:
        x = x.repeat(-(-batch // x.shape[0]), 1, 1, 1)[:batch]
    calib = calibration_images(cell)
    q8 = torch_int8_model(graph, calib)
    ort = ort_int8_model(graph, calib, threads=threads) if ort_available() else None
    if ort is None:
        log.warning("onnxruntime is not installed: no onnxruntime_int8 row")
    # the baselines are checked too (against the FP32 model they quantize), never timed blind
    with torch.inference_mode():
        fp_logits = graph(torch.from_numpy(x_check)).numpy()
        base_checks = {"torch_int8": q8(torch.from_numpy(x_check)).numpy()}
    if ort is not None:
        base_checks["onnxruntime_int8"] = np.concatenate(
            [ort(x_check[i:i + 1]) for i in range(len(x_check))])
    for k, got in base_checks.items():
        agree = float((got.argmax(1) == fp_logits.argmax(1)).mean())
        if agree < 0.5:  # a broken quantization of this model: its time is no baseline
            log.warning("%s of %s agrees with the FP32 model on %.0f%% of the check images: "
                        "its latency is not a valid baseline", k, cell.model, 100 * agree)
        rows.append(make_row(mb, impl=k, metric="model_top1_agreement", value=agree,
                             unit="fraction vs torch_fp32"))
    xn = x.numpy()
    from ternbench.schedules.graph import kernel_chain_timer, kernel_sum_timer

    runs: dict[str, Callable[[int], float]] = {
        "tvm": lambda n: art.timer(xn, n)(),
        # the same kernels one by one, timed in the same rounds (the glue's cost)
        "kernel_sum": kernel_sum_timer(exports, cfg.latency_batch, out_clips=gm.out_clips()),
        # ... and one after another in one VM function, without the stages between them
        "kernel_chain": kernel_chain_timer(gm),
        "torch_fp32": loop_timer(lambda: graph(x)),
        "torch_int8": loop_timer(lambda: q8(x)),
    }
    if ort is not None:
        runs["onnxruntime_int8"] = loop_timer(lambda: ort(xn))
    prof = cfg.profile_obj
    prev_torch, prev_tvm = torch.get_num_threads(), schedules.num_threads()
    try:
        torch.set_num_threads(threads)
        schedules.set_num_threads(threads)
        with torch.inference_mode():
            raw = time_backends(runs, repeat=max(5, prof.latency_repeat),
                                min_repeat_ms=float(max(prof.latency_min_repeat_ms, 1) * 5))
    finally:
        torch.set_num_threads(prev_torch)
        schedules.set_num_threads(prev_tvm)
    for k, vals in raw.items():
        if k in ("kernel_sum", "kernel_chain"):
            rows.append(make_row(mb, impl="tvm", metric=f"{k}_us",
                                 value=float(statistics.median(vals)), unit="us"))
            continue
        rows.append(make_row(mb, impl=k, metric="latency_us",
                             value=float(statistics.median(vals)), unit="us"))
    rows.append(make_row(mb, impl="tvm", metric="threads", value=float(threads), unit="count"))
    log.info("%s artifact: %s", cell.method, ", ".join(
        f"{k} {statistics.median(v):.0f} us" for k, v in raw.items()))
    return rows


def _build_other_target(cell: CellSpec, store: Any, cfg: Any, base: dict[str, Any],
                        exports: dict[str, Any], target: str) -> tuple[Any, ...] | None:
    """Build ``artifacts/<key>-<target>/`` from the stored graph state: (path, GraphModule,
    executable, model-row base, the build rows), or None without a graph state."""
    from ternbench.core.export_io import load_graph_state

    gpath = store.root / "exports" / f"{cell.key}.graph.safetensors"
    if not gpath.exists():
        return None
    graph = load_graph_state(cell.build_model(), gpath.read_bytes()).eval()
    t0 = time.perf_counter()
    path, gm, ex = build_cell_artifact(cell, graph, exports,
                                       artifact_dir(store.root, f"{cell.key}-{target}"),
                                       cfg.latency_batch, target=target)
    mb = {**base, "layer": MODEL_LAYER}
    rows = [make_row(mb, impl="tvm", metric="artifact_build_s",
                     value=time.perf_counter() - t0, unit="s"),
            make_row(mb, impl="tvm", metric="artifact_kernels", value=float(len(gm.kernels)),
                     unit=str(path.relative_to(store.root)))]
    return path, gm, ex, mb, rows


def cross_artifact_rows(cell: CellSpec, store: Any, cfg: Any, base: dict[str, Any],
                        exports: dict[str, Any], target: str) -> list[dict[str, Any]]:
    """The whole model cross-built for an ARM target as ``artifacts/<key>-<target>/`` (the
    Relax executable: running it needs an aarch64 TVM runtime, e.g. on the board) and, where
    qemu-user is installed, the same kernels and stages run whole under emulation (the
    harness's runtime-free plan, :func:`ternbench.schedules.cross.run_plan_under_qemu`) on
    the deploy-check images and compared with the fake-quant logits: never timed."""
    from ternbench.schedules import cross
    from ternbench.schedules.graph import straight_line_plan
    from ternbench.schedules.model import compare_logits

    built = _build_other_target(cell, store, cfg, base, exports, target)
    if built is None:
        return []
    _path, gm, _ex, mb, rows = built
    cpath = store.root / "exports" / f"{cell.key}.check.npz"
    why = cross.qemu_unavailable_reason()
    if why or not cpath.exists():
        log.info("%s on %s: whole model built, not run (%s)", cell.method, target,
                 why or "no check logits")
        return rows
    with np.load(cpath) as z:
        x_check, ref = z["x"].astype(np.float32), z["logits"]
    n = (len(x_check) // gm.batch) * gm.batch
    got = cross.run_plan_under_qemu(straight_line_plan(gm), [a for _n, a in gm.params],
                                    x_check[:n], gm.target)
    check = compare_logits(got, ref[:n], f"whole model on {target} under qemu")
    rows += [make_row(mb, impl="tvm", metric="model_logit_rel_diff", value=check.rel_diff,
                      unit="relative (qemu)"),
             make_row(mb, impl="tvm", metric="model_top1_agreement",
                      value=check.top1_agreement, unit="fraction (qemu)")]
    return rows


def cuda_artifact_rows(cell: CellSpec, store: Any, cfg: Any, base: dict[str, Any],
                       exports: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole model built for CUDA as ``artifacts/<key>-cuda/`` (host code for x86-64,
    device code as CUDA source that the runtime compiles on first load), checked without a
    GPU: its device source compiled (NVRTC or nvcc, where installed) and the whole module run
    in serial emulation on the host CPU against the fake-quant logits
    (:func:`ternbench.schedules.cuda.emulate_graph`). Where a GPU is present the artifact is
    also loaded there, compared and timed (``latency_us``, impl ``tvm``)."""
    from ternbench.schedules import cuda
    from ternbench.schedules.artifact import ArtifactError, load_artifact
    from ternbench.schedules.model import compare_logits

    cpath = store.root / "exports" / f"{cell.key}.check.npz"
    built = _build_other_target(cell, store, cfg, base, exports, "cuda")
    if built is None:
        return []
    path, gm, ex, mb, rows = built
    why = cuda.compiler_unavailable_reason()
    if why:
        log.info("%s on cuda: device code not compiled here (%s)", cell.method, why)
    else:
        binary = cuda.compile_module_source(ex)
        rows.append(make_row(mb, impl="tvm", metric="device_code_bytes",
                             value=float(len(binary)), unit="bytes"))
    if not cpath.exists():
        return rows
    with np.load(cpath) as z:
        x_check, ref = z["x"].astype(np.float32), z["logits"]
    n = (len(x_check) // gm.batch) * gm.batch
    check = compare_logits(cuda.emulate_graph(gm, x_check[:n]), ref[:n],
                           "whole CUDA model in serial emulation")
    rows += [make_row(mb, impl="tvm", metric="model_logit_rel_diff", value=check.rel_diff,
                      unit="relative (serial emulation)"),
             make_row(mb, impl="tvm", metric="model_top1_agreement",
                      value=check.top1_agreement, unit="fraction (serial emulation)")]
    try:
        art = load_artifact(path)
    except ArtifactError as exc:  # no GPU here: built and emulated only
        log.info("%s", exc)
        return rows
    check = compare_logits(art.predict(x_check[:n]), ref[:n], f"artifact {path} on the GPU")
    rows += [make_row(mb, impl="tvm", metric="model_logit_rel_diff", value=check.rel_diff,
                      unit="relative (gpu)"),
             make_row(mb, impl="tvm", metric="model_top1_agreement",
                      value=check.top1_agreement, unit="fraction (gpu)")]
    xb = x_check[:gm.batch]
    prof = cfg.profile_obj
    raw = time_backends({"tvm": lambda k: art.timer(xb, k)()}, repeat=max(5, prof.latency_repeat),
                        min_repeat_ms=float(max(prof.latency_min_repeat_ms, 1) * 5))
    rows.append(make_row(mb, impl="tvm", metric="latency_us",
                         value=float(statistics.median(raw["tvm"])), unit="us"))
    return rows


def _accuracy(cell: CellSpec, store: Any, path: Path, executor: Any, indices: np.ndarray,
              mb: dict[str, Any]) -> list[dict[str, Any]]:
    files = _files(path)
    shards = shard_indices(indices, cell.profile_obj.eval_shards)
    args = [(cell, files, s) for s in shards]
    run_tasks = getattr(executor, "run_tasks", None)
    parts = run_tasks(eval_artifact_shard, args) if run_tasks else [
        eval_artifact_shard(*a) for a in args]
    n = sum(int(p["n"]) for p in parts)
    c1 = sum(int(p["correct1"]) for p in parts)
    pred = np.concatenate([p["pred"] for p in parts]) if parts else np.zeros(0, np.int32)
    rows = [make_row(mb, impl="tvm", metric="top1_deployed", value=100.0 * c1 / max(n, 1),
                     unit="%"),
            make_row(mb, impl="tvm", metric="n_eval_deployed", value=float(n), unit="count")]
    ppath = store.root / "exports" / f"{cell.key}.pred.npy"
    if ppath.exists():
        fq = np.load(ppath, allow_pickle=False)
        if len(fq) == len(pred):
            rows.append(make_row(mb, impl="tvm", metric="deployed_pred_agreement",
                                 value=float((fq == pred).mean()), unit="fraction"))
        else:
            log.warning("%s: %d fake-quant predictions for %d deployed ones; no agreement",
                        cell.method, len(fq), len(pred))
    log.info("%s artifact: top-1 %.2f%% on %d images", cell.method, 100.0 * c1 / max(n, 1), n)
    return rows
