"""Plan a run, execute its accuracy cells through an executor, time the exported layers with
TVM, and keep every finished part on disk (see :mod:`ternbench.bench.results`).

Example:
    >>> from ternbench.bench.config import BenchConfig
    >>> plan(BenchConfig(methods=("fgq",), profile="smoke"))[0].method
    'fgq'
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from ternbench.core.export_io import load_exports
from ternbench.core.files import atomic_write
from ternbench.methods import ROW_COUNTS, create_method, get_method_info, list_methods
from tqdm.auto import tqdm

from .config import BenchConfig, split_block
from .executor import CellOutcome, Executor, make_executor
from .results import SCHEMA_VERSION, ResultStore, make_row
from .tasks import CellSpec, eval_indices, merge_shards

__all__ = ["plan", "run", "RunSummary", "RunLockedError", "out_lock", "preflight"]

log = logging.getLogger(__name__)
ACC_PART = "accuracy"


@dataclass
class RunSummary:
    frame: pd.DataFrame
    failed: int
    done: int
    skipped: int
    out: Any
    #: accuracy cells of the run that collapsed (status ``degraded``), with the reason
    degraded: list[str] = dataclasses.field(default_factory=list)


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


@functools.lru_cache(maxsize=32)
def _n_train(dataset: str, root: str | None, image_size: int | None = None) -> int | None:
    from .data import dataset_info, load_dataset

    try:
        splits = dataset_info(dataset, root, image_size).splits
        split = "train" if "train" in splits else splits[0]
        return len(load_dataset(dataset, split, root, image_size=image_size))  # type: ignore[arg-type]
    except Exception:  # missing data: preflight reports it; plan stays usable (dry runs)
        return None


def fp32_cfg_for(cfg: BenchConfig, dataset: str) -> Any:
    """The FP32 recipe of ``dataset`` under the run's profile: at least ``fp32_min_steps``
    optimizer steps, whatever the dataset size (:meth:`Profile.fp32_recipe`)."""
    prof = cfg.profile_obj
    n = _n_train(dataset, cfg.data_root, cfg.image_size)
    return prof.fp32 if n is None else prof.fp32_recipe(n)


def baseline_key_for(cfg: BenchConfig, model: str, dataset: str) -> str:
    from .cache import baseline_key

    if cfg.weights is not None:  # the user's file: keyed by its content (and the data's)
        from .data import dataset_fingerprint

        h = hashlib.sha256(Path(cfg.weights).read_bytes())
        h.update(json.dumps(dataset_fingerprint(dataset, cfg.data_root, cfg.image_size),
                            sort_keys=True).encode())
        return f"{model}-{dataset}-user-{h.hexdigest()[:16]}"
    return baseline_key(model, dataset, fp32_cfg_for(cfg, dataset), root=cfg.data_root,
                        image_size=cfg.image_size)


def cell_device(cfg: BenchConfig, method: str) -> str:
    """Where a cell trains/quantizes with the local executor: ``cfg.device``; ``auto`` is
    cuda for training-time (QAT) cells when a GPU is visible, else cpu."""
    if cfg.device == "cpu" or cfg.executor != "local":  # Ray places GPU cells itself
        return "cpu"
    visible = torch.cuda.is_available()
    if cfg.device == "cuda":
        if not visible:
            raise RuntimeError("--device cuda: no CUDA device is visible to torch")
        return "cuda"
    return "cuda" if visible and get_method_info(method).kind == "qat" else "cpu"


def method_variants(cfg: BenchConfig, method: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(overrides, sweep point) for every point of ``method``'s sweep (one point if none).

    A method may declare a default sweep (TRN sweeps its enabled residual edges); a sweep given
    by the user for that method replaces it.
    """
    info = get_method_info(method)
    base = split_block(method, cfg.overrides.get(method, {}))[1]  # the block picks the model
    if cfg.profile_obj.apply_paper_recipes and info.paper_overrides:
        base = {**info.paper_overrides, **base}  # the user's --set still wins
    axes = cfg.sweeps.get(method) or info.default_sweep
    if not axes:
        return [(base, {})]
    names = list(axes)
    out = []
    for values in itertools.product(*(axes[n] for n in names)):
        point = dict(zip(names, values, strict=True))
        out.append(({**base, **point}, point))
    return out


def plan(cfg: BenchConfig) -> list[CellSpec]:
    """The grid: method variants x model x dataset x seed, each with a stable key (for resume)."""
    import dataclasses

    cells = []
    prof = cfg.profile_obj
    if cfg.subset is not None:  # --subset N replaces the profile's evaluation count
        prof = dataclasses.replace(prof, n_eval=cfg.subset)
    from .models import model_for_block

    for requested in cfg.models:
        for dataset in cfg.datasets:
            for method in cfg.methods:
                want = cfg.block_for(method, cfg.overrides.get(method, {}))
                # the method's paper block: --model resnet8 builds e.g. sttn_resnet8 for RTN
                # (the user's --weights fit the model as named only)
                model = requested if cfg.weights is not None else model_for_block(requested, want)
                block = want if model != requested else "plain"
                if want != block:
                    log.info("%s wants the %s block form; %s has none here, it runs as named",
                             method, want, requested)
                bkey = baseline_key_for(cfg, model, dataset)
                device = cell_device(cfg, method)
                for overrides, point in method_variants(cfg, method):
                    mcfg = create_method(method, overrides).config.to_json()
                    for seed in cfg.seeds:
                        payload = {
                            "v": SCHEMA_VERSION,
                            "method": method,
                            "config": mcfg,
                            "model": model,
                            "dataset": dataset,
                            "seed": seed,
                            "profile": prof.digest(),
                            "baseline": bkey,
                            "threads": cfg.accuracy_threads,
                        }
                        if cfg.subset is not None:
                            payload["stratified"] = True
                        if cfg.image_size is not None:
                            payload["image_size"] = cfg.image_size
                        if device != "cpu":  # keeps the keys of CPU runs as they were
                            payload["device"] = device
                        scale = get_method_info(method).budget_scale
                        if scale != 1.0:  # the method's share of the profile's QAT steps
                            payload["budget_scale"] = scale
                        key = _key(payload)
                        cells.append(
                            CellSpec(
                                key=key,
                                method=method,
                                overrides=overrides,
                                method_config=mcfg,
                                model=model,
                                dataset=dataset,
                                seed=seed,
                                prof=prof,
                                data_root=cfg.data_root,
                                checkpoint_dir=str(cfg.out / "checkpoints" / key),
                                threads=cfg.accuracy_threads,
                                baseline_key=bkey,
                                sweep=point,
                                image_size=cfg.image_size,
                                stratified=cfg.subset is not None,
                                device=device,
                                extra={"block": block, "requested_model": requested},
                            )
                        )
    return cells


def _base_fields(cell: CellSpec, run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "cell_key": cell.key,
        "method": cell.method,
        "method_config": cell.method_config,
        "profile": cell.profile,
        "model": cell.model,
        "dataset": cell.dataset,
        "subset": cell.subset,
        "seed": cell.seed,
        "target": "-",
        "layer": "",
        "impl": "",
        "status": "ok",
        "error": "",
        **{f"sweep.{k}": v for k, v in cell.sweep.items()},
    }


def _failed_rows(base: dict[str, Any], exc: BaseException, **fields: Any) -> list[dict[str, Any]]:
    msg = f"{type(exc).__name__}: {exc}"
    return [
        make_row(
            base, **fields, metric="error", value=float("nan"), unit="", status="failed", error=msg
        )
    ]


#: a cell this many top-1 points under its own FP32 baseline has collapsed
DEGRADED_DROP = 30.0


def degraded_reason(top1: float, fp32_top1: float | None, num_classes: int) -> str | None:
    """Why a cell's accuracy counts as collapsed, or None: at chance level (top-1 within
    max(2, chance/2) points of 100/classes) or more than ``DEGRADED_DROP`` points under FP32.

    Example:
        >>> degraded_reason(10.3, 89.1, 10)
        'top-1 10.30% is at chance level (10.00% for 10 classes)'
        >>> degraded_reason(55.0, 89.1, 10)
        'top-1 55.00% is 34.10 points under its FP32 baseline (89.10%)'
        >>> degraded_reason(87.0, 89.1, 10) is None
        True
    """
    chance = 100.0 / max(num_classes, 1)
    if top1 <= chance + max(2.0, chance / 2):
        return f"top-1 {top1:.2f}% is at chance level ({chance:.2f}% for {num_classes} classes)"
    if fp32_top1 is not None and fp32_top1 - top1 > DEGRADED_DROP:
        return (f"top-1 {top1:.2f}% is {fp32_top1 - top1:.2f} points under its FP32 baseline "
                f"({fp32_top1:.2f}%)")
    return None


def curve_rows(base: dict[str, Any], curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training-curve rows: ``train_loss`` and ``val_top1`` per evaluation point (``layer`` =
    ``epoch=<fractional epoch>``, ``impl`` = ``step=<n>``) and ``converged`` (1/0: whether
    the last segment gained at most 0.3 point of validation top-1)."""
    from ternbench.core.train import curve_converged

    rows = []
    for p in curve:
        where = {"layer": f"epoch={float(p['epoch']):.3g}", "impl": f"step={int(p['step'])}"}
        rows.append(make_row(base, **where, metric="train_loss", value=float(p["train_loss"]),
                             unit="nats"))
        rows.append(make_row(base, **where, metric="val_top1", value=float(p["val_top1"]),
                             unit="%"))
    conv = curve_converged(curve)
    if conv is not None:
        rows.append(make_row(base, metric="converged", value=float(conv), unit="bool"))
    return rows


def accuracy_rows(cell: CellSpec, out: CellOutcome, run_id: str,
                  fp32_top1: float | None = None) -> list[dict[str, Any]]:
    from .data import get_dataset_info

    base = _base_fields(cell, run_id)
    if out.error is not None:
        return _failed_rows(base, out.error)
    assert out.info is not None and out.shards is not None
    merged = merge_shards(out.shards)
    reason = degraded_reason(merged["top1"], fp32_top1, get_dataset_info(cell.dataset).num_classes)
    if reason is not None:
        base = {**base, "status": "degraded", "error": reason}
    rows = []
    units = {"top1": "%", "top5": "%", "loss": "nats", "n_eval": "count"}
    for metric, value in merged.items():
        rows.append(make_row(base, metric=metric, value=value, unit=units[metric]))
    if fp32_top1 is not None:
        rows.append(make_row(base, metric="fp32_top1", value=fp32_top1, unit="%"))
    block = str(cell.extra.get("block", "plain"))
    rows.append(make_row(base, metric="block", value=float(block != "plain"), unit=block,
                         impl=str(cell.extra.get("requested_model", cell.model))))
    rows += curve_rows(base, out.info.get("curve") or [])
    for metric, (value, unit) in out.info["cost"].items():
        rows.append(make_row(base, metric=metric, value=float(value), unit=unit))
    mi = out.info["method_info"]
    rows.append(
        make_row(
            base,
            metric="bn_recalibrated",
            value=float(bool(mi.get("bn_recalibrated", False))),
            unit="bool",
        )
    )
    rows.append(
        make_row(
            base,
            metric="deploy_max_abs_diff",
            value=float(out.info["deploy_max_abs_diff"]),
            unit="logit",
        )
    )
    rows.append(make_row(base, metric="deploy_layer_rel_err",
                         value=float(out.info["deploy_layer_rel_err"]), unit="relative"))
    for key in ROW_COUNTS:
        if key in mi:  # the counts a method records (residual edges, QAT epochs)
            rows.append(make_row(base, metric=key, value=float(mi[key]), unit="count"))
    rows.append(
        make_row(
            base, metric="quantize_seconds", value=float(out.info["quantize_seconds"]), unit="s"
        )
    )
    return rows


def _save_subsets(store: ResultStore, cells: list[CellSpec]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    by_subset: dict[tuple[str, str], np.ndarray] = {}
    for c in cells:
        k = (c.dataset, c.subset)
        if k not in by_subset:
            by_subset[k] = eval_indices(c)
            name = f"{c.dataset}-{c.subset.replace(':', '-').replace('@', '-')}.npy"
            buf = io.BytesIO()
            np.save(buf, by_subset[k], allow_pickle=False)
            atomic_write(store.root / "subsets" / name, buf.getvalue())
        out[c.key] = by_subset[k]
    return out


def _user_model(cell: CellSpec, path: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The user's FP32 weights in the cell's model; a file that does not fit is refused."""
    from .cache import CheckpointError, load_state_dict_file

    state = load_state_dict_file(path)
    model = cell.build_model()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"--weights {path} does not fit {cell.model} for {cell.dataset}: "
            f"{first[1].strip() if len(first) > 1 else first[0]}") from None
    return model.eval(), {"key": cell.baseline_key, "path": str(path), "source": "user"}


def _baselines(
    cfg: BenchConfig, cells: list[CellSpec], progress: bool | None
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    from .cache import load_or_train_fp32

    states: dict[str, dict[str, torch.Tensor]] = {}
    infos = []
    for c in cells:
        if c.baseline_key in states:
            continue
        if cfg.weights is not None:
            model, info = _user_model(c, cfg.weights)
        else:
            model, info = load_or_train_fp32(
                c.model, c.dataset, fp32_cfg_for(cfg, c.dataset), root=cfg.data_root,
                progress=progress, image_size=cfg.image_size,
            )
            _warn_unconverged_fp32(c, info)
        states[c.baseline_key] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        infos.append(
            {
                "model": c.model,
                "dataset": c.dataset,
                **{k: v for k, v in info.items() if isinstance(v, str | int | float)},
            }
        )
    return states, infos


def _warn_unconverged_fp32(cell: CellSpec, info: dict[str, Any]) -> None:
    """A freshly trained FP32 baseline that did not converge (every delta is measured against
    it): the plateau rule hit its cap (``train`` logs that), or, for a fixed-length recipe, its
    last epoch still gained more than 0.3 point of training accuracy."""
    history = info.get("history") or {}
    if "converged" in history:
        return  # the plateau rule decided, and logged it
    epochs = history.get("epochs") or []
    if len(epochs) >= 2:
        gain = 100.0 * (float(epochs[-1]["acc"]) - float(epochs[-2]["acc"]))
        if gain > 0.3:
            log.warning(
                "FP32 baseline %s may be unconverged: its last epoch still gained %.2f points "
                "of training accuracy (use schedule 'plateau' or raise fp32_min_steps)",
                cell.baseline_key, gain)


@torch.no_grad()
def fp32_accuracy(cells: list[CellSpec], baselines: dict[str, dict[str, torch.Tensor]],
                  indices: dict[str, np.ndarray]) -> dict[str, float]:
    """Top-1 (%) of every cell's own FP32 baseline on the cell's evaluation subset (each
    baseline and subset evaluated once): the reference of the cell's delta and collapse check."""
    from .tasks import eval_shard

    done: dict[tuple[str, str], float] = {}
    out: dict[str, float] = {}
    for c in cells:
        k = (c.baseline_key, c.subset)
        if k not in done and c.baseline_key in baselines:
            m = c.build_model()
            m.load_state_dict(baselines[c.baseline_key])
            r = eval_shard(c, m.eval(), indices[c.key])
            done[k] = 100.0 * r["correct1"] / max(r["n"], 1)
        if k in done:
            out[c.key] = done[k]
    return out


def latency_rows(
    cell: CellSpec,
    target: str,
    store: ResultStore,
    cfg: BenchConfig,
    run_id: str,
    torch_cache: dict[tuple, Any],
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """Latency (or build/verification) rows of every exported layer of ``cell`` on ``target``.

    * local targets (x86; CUDA with a GPU): each kernel checked against the reference, then
      timed, beside torch FP32 on the same shape (CPU); on x86 also the whole model as ONE
      deployable TVM module (:func:`model_rows`: the artifact, its accuracy and latency);
    * ARM with ``cfg.rpc``: checked and timed on the board over TVM RPC;
    * ARM without a board: built and run bit-exact under qemu-user ("built and verified"),
      never timed; CUDA without a GPU: "built".
    """
    from ternbench import schedules

    tinfo = schedules.target_info(target)
    base = {**_base_fields(cell, run_id), "target": target, "isa": tinfo.isa}
    exports = load_exports(store.root / "exports" / f"{cell.key}.npz")
    if tinfo.family == "arm" and cfg.rpc:
        return _timed_rows(cell, target, exports, base, cfg, torch_cache, rpc=cfg.rpc)
    if not tinfo.local:
        rows = _checked_rows(target, exports, base, cfg)
        if tinfo.family == "arm" and cfg.whole_model:
            from .artifact_eval import cross_artifact_rows

            try:  # the whole model cross-built as one module, run whole under qemu
                rows += cross_artifact_rows(cell, store, cfg, base, exports, target)
            except Exception as exc:
                log.error("whole model %s on %s failed: %s", cell.method, target, exc)
                rows += _failed_rows({**base, "layer": "__model__", "impl": "tvm"}, exc)
        if tinfo.family == "cuda" and cfg.whole_model:
            rows += _cuda_model_rows(cell, store, cfg, base, exports)
        return rows
    rows = _timed_rows(cell, target, exports, base, cfg, torch_cache)
    if tinfo.family == "cuda" and cfg.whole_model:
        rows += _cuda_model_rows(cell, store, cfg, base, exports)
    if tinfo.family == "x86" and cfg.whole_model:
        try:
            rows += model_rows(cell, store, cfg, base, exports, executor)
        except Exception as exc:  # the kernel rows stay; the whole-model part reports why
            log.error("whole model %s on %s failed: %s", cell.method, target, exc)
            log.debug("whole-model failure", exc_info=True)
            rows += _failed_rows({**base, "layer": "__model__", "impl": "tvm"}, exc)
    return rows


def _cuda_model_rows(cell: CellSpec, store: ResultStore, cfg: BenchConfig,
                     base: dict[str, Any], exports: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole model built for CUDA, emulated (and run and timed where a GPU is)."""
    from .artifact_eval import cuda_artifact_rows

    try:
        return cuda_artifact_rows(cell, store, cfg, base, exports)
    except Exception as exc:
        log.error("whole model %s on cuda failed: %s", cell.method, exc)
        log.debug("whole-model failure", exc_info=True)
        return _failed_rows({**base, "layer": "__model__", "impl": "tvm"}, exc)


def _evaluator(cfg: BenchConfig) -> Any:
    from ternbench.schedules import EvaluatorCfg

    prof = cfg.profile_obj
    return EvaluatorCfg(number=prof.latency_number, repeat=prof.latency_repeat,
                        min_repeat_ms=prof.latency_min_repeat_ms)


def _timed_rows(cell: CellSpec, target: str, exports: dict[str, Any], base: dict[str, Any],
                cfg: BenchConfig, torch_cache: dict[tuple, Any], rpc: str | None = None
                ) -> list[dict[str, Any]]:
    from ternbench.schedules import measure_layer, measure_torch_fp32

    ev = _evaluator(cfg)
    rows: list[dict[str, Any]] = []
    tot = {"tvm": 0.0, "torch_fp32": 0.0}
    with_torch = target == "x86"  # torch FP32 runs on this CPU: only comparable with x86
    if rpc:
        from ternbench.schedules.rpc import RpcEndpoint, measure_layer_rpc

        endpoint = RpcEndpoint.parse(rpc)
    for name, lx in exports.items():
        if rpc:
            lat = measure_layer_rpc(lx, endpoint=endpoint, target=target,
                                    batch=cfg.latency_batch, ev=ev)
        else:
            lat = measure_layer(lx, batch=cfg.latency_batch, target=target, ev=ev,
                                threads=cfg.latency_threads)
        rows.append(make_row(base, layer=name, impl=lat.impl, metric="latency_us",
                             value=lat.median_us, unit="us"))
        rows.append(make_row(base, layer=name, impl=lat.impl, metric="kernel_max_abs_err",
                             value=lat.max_abs_err, unit="abs"))
        tot["tvm"] += lat.median_us
        if lx.branch_of or not with_torch:  # a residual edge has no FP32 twin
            continue
        shape = (lx.op, lx.input_shape, lx.out_channels, lx.kernel_size, lx.stride, lx.padding)
        ref = torch_cache.get(shape)
        if ref is None:  # FP32 depends on the shape only: time it once per run and reuse
            ref = measure_torch_fp32(
                lx, batch=cfg.latency_batch, ev=ev, threads=cfg.latency_threads
            )
            torch_cache[shape] = ref
        rows.append(make_row(base, layer=name, impl=ref.impl, metric="latency_us",
                             value=ref.median_us, unit="us"))
        tot["torch_fp32"] += ref.median_us
    rows.append(make_row(base, layer="__total__", impl="tvm", metric="latency_us",
                         value=tot["tvm"], unit="us"))
    if with_torch:
        rows.append(make_row(base, layer="__total__", impl="torch_fp32", metric="latency_us",
                             value=tot["torch_fp32"], unit="us"))
    rows.append(make_row(base, layer="__total__", impl="tvm", metric="threads",
                         value=float(cfg.latency_threads), unit="count"))
    if rpc:
        rows.append(make_row(base, layer="__total__", impl="tvm", metric="kernel_status",
                             value=1.0, unit=f"timed over RPC {rpc}"))
    return rows


def _checked_rows(target: str, exports: dict[str, Any], base: dict[str, Any],
                  cfg: BenchConfig) -> list[dict[str, Any]]:
    """Build every layer for a target that cannot be timed here; run it where possible."""
    from ternbench.schedules import check_layer

    rows: list[dict[str, Any]] = []
    built = verified = 0
    how = ""
    for name, lx in exports.items():
        chk = check_layer(lx, batch=cfg.latency_batch, target=target)
        built += 1
        rows.append(make_row(base, layer=name, impl=chk.impl, metric="build_s",
                             value=chk.build_s, unit="s"))
        if chk.status == "built and verified":
            verified += 1
            how = chk.checked_with
            rows.append(make_row(base, layer=name, impl=chk.impl, metric="kernel_max_abs_err",
                                 value=float(chk.max_abs_err or 0.0), unit="abs"))
        else:
            how = how or chk.why
    status = "built and verified" if verified == built else "built"
    detail = f"{status} ({verified}/{built} layers checked: {how})" if verified else (
        f"built ({built} layers; not run: {how})")
    rows.append(make_row(base, layer="__total__", impl="tvm", metric="kernels_built",
                         value=float(built), unit="layers"))
    rows.append(make_row(base, layer="__total__", impl="tvm", metric="kernels_verified",
                         value=float(verified), unit="layers"))
    rows.append(make_row(base, layer="__total__", impl="tvm", metric="kernel_status",
                         value=float(verified == built), unit=detail))
    log.info("%s on %s: %s", base.get("method"), target, detail)
    return rows


def model_rows(cell: CellSpec, store: ResultStore, cfg: BenchConfig, base: dict[str, Any],
               exports: dict[str, Any], executor: Executor | None = None
               ) -> list[dict[str, Any]]:
    """Whole model on x86: the cell's deployable artifact (one TVM module), checked against
    the fake-quant logits, evaluated on the test subset (``top1_deployed``) and timed beside
    torch FP32 eager, torch INT8 and ONNX Runtime INT8 (:mod:`.artifact_eval`)."""
    from .artifact_eval import artifact_rows

    return artifact_rows(cell, store, cfg, base, exports, executor)


def preflight(cfg: BenchConfig) -> None:
    """Fail fast on inputs that would only break mid-run: datasets that are not where they
    should be or whose files are broken (every split the run reads), a class count that does
    not match, weights that are unsafe, not finite or do not fit, an out path that is a file, a
    run directory of another schema."""
    from ternbench.methods import ConfigError

    from .data import DatasetMissingError, dataset_info, load_dataset

    for dataset in cfg.datasets:
        info = dataset_info(dataset, cfg.data_root, cfg.image_size)
        if info.image_folder and cfg.weights is None and "train" not in info.splits:
            raise DatasetMissingError(
                f"{dataset}: {cfg.data_root or 'the data root'} has no train/ folder to train "
                "the FP32 baseline on: pass --weights FILE (your FP32 weights for the model) "
                "or give a train/ folder beside val/")
        if cfg.num_classes is not None and cfg.num_classes != info.num_classes:
            raise ConfigError(
                f"--num-classes {cfg.num_classes} does not match {dataset}: its data has "
                f"{info.num_classes} classes"
                + (" (class folders)" if info.image_folder else ""))
        for split in info.splits:  # reads (and checks) every file the run will read
            load_dataset(dataset, split, cfg.data_root, image_size=cfg.image_size)
    if cfg.weights is not None:  # refuse an unsafe or unfitting file before anything is written
        for c in plan(cfg)[:1]:
            _user_model(c, cfg.weights)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise NotADirectoryError(f"--out {cfg.out} is a file, not a run directory")
    ResultStore(cfg.out).read_meta()  # raises SchemaMismatchError for an incompatible run


class RunLockedError(RuntimeError):
    """Another ternbench run holds the lock of this output directory."""


@contextlib.contextmanager
def out_lock(out: Path, *, wait: bool = False) -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``OUT/.lock`` for the whole run; the file holds the
    holder's PID. A second run raises :class:`RunLockedError` naming it, or waits with
    ``wait=True``. The lock goes with the process, so a killed run never leaves it stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            if not wait:
                raise RunLockedError(
                    f"--out {out} is in use by another ternbench run (PID {holder}); wait for "
                    "it to finish, pass --wait-lock, or choose another --out") from None
            log.info("--out %s is in use by PID %s; waiting for it to finish", out, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class _Heartbeat:
    """Periodic progress log lines (parts done/total, ETA) for runs whose stderr is not a
    terminal (CI logs, files), where tqdm's bar switches itself off."""

    def __init__(self, total: int, enabled: bool, every_s: float = 30.0) -> None:
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def update(self, what: str) -> None:
        self.done += 1
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every_s and self.done < self.total):
            return
        self.last = now
        rate = (now - self.t0) / max(self.done, 1)
        eta = rate * (self.total - self.done)
        log.info("progress: %d/%d parts done (%s), %s elapsed, ETA %s", self.done, self.total,
                 what, _hms(now - self.t0), _hms(eta) if self.done < self.total else "0s")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def log_progress(progress: bool | None) -> bool:
    """Log lines instead of bars: progress not switched off and stderr not a terminal."""
    return progress is None and not sys.stderr.isatty()


def run(
    cfg: BenchConfig,
    *,
    argv: list[str] | None = None,
    executor: Executor | None = None,
    progress: bool | None = None,
    report: bool = True,
    on_event: Callable[[str], None] | None = None,
    wait_lock: bool = False,
) -> RunSummary:
    """Run the grid of ``cfg``; finished parts already in ``cfg.out`` are skipped (resume).

    One run at a time per output directory (:func:`out_lock`)."""
    preflight(cfg)  # bad input fails here, before anything in cfg.out is touched
    with out_lock(cfg.out, wait=wait_lock):
        return _run_locked(cfg, argv=argv, executor=executor, progress=progress, report=report)


def _run_locked(
    cfg: BenchConfig,
    *,
    argv: list[str] | None,
    executor: Executor | None,
    progress: bool | None,
    report: bool,
) -> RunSummary:
    store = ResultStore(cfg.out)
    meta = store.open_session(argv or [], cfg.to_dict())
    run_id = meta["run_id"]
    cells = plan(cfg)
    indices = _save_subsets(store, cells)
    todo = [c for c in cells if not store.is_done(c.key, ACC_PART)]
    lat_todo = [
        (c, t) for c in cells for t in cfg.targets if not store.is_done(c.key, f"latency-{t}")
    ]
    skipped = (len(cells) - len(todo)) + (len(cells) * len(cfg.targets) - len(lat_todo))
    if skipped:
        log.info("resuming: %d finished parts in %s are kept", skipped, cfg.out)
    failed = done = 0
    total = len(todo) + len(lat_todo)
    # tqdm's disable=None switches itself off when stderr is not a terminal
    bar = tqdm(
        total=total, desc="cells", unit="part", disable=None if progress is None else not progress
    )
    beat = _Heartbeat(total, log_progress(progress))
    t0 = time.time()
    own = executor is None
    ex: Executor | None = executor
    try:
        if todo:
            baselines, binfo = _baselines(cfg, todo, progress)
            meta["baselines"] = binfo
            store.write_meta(meta)
            fp32_top1 = fp32_accuracy(todo, baselines, indices)
            ex = ex or make_executor(cfg.executor, cfg.ray_address, cfg.num_cpus)
            meta["sessions"][-1]["executor"] = ex.name
            store.write_meta(meta)
            for cell, outcome in ex.run_cells(todo, baselines, indices):
                rows = accuracy_rows(cell, outcome, run_id, fp32_top1.get(cell.key))
                if rows and rows[0]["status"] == "degraded":
                    log.error("cell %s degraded: %s/%s/%s: %s", cell.key, cell.method,
                              cell.model, cell.dataset, rows[0]["error"])
                if outcome.info is not None and outcome.info.get("ledger"):
                    meta.setdefault("ledger", {})[cell.key] = {
                        "method": cell.method, "model": cell.model, "dataset": cell.dataset,
                        "profile": cell.profile, "sweep": cell.sweep, **outcome.info["ledger"],
                    }
                    store.write_meta(meta)
                if outcome.info is not None:
                    exp = store.root / "exports"
                    atomic_write(exp / f"{cell.key}.npz", outcome.info["export_npz"])
                    for suffix, k in ((".graph.safetensors", "graph_state"),
                                      (".check.npz", "check_npz")):
                        if outcome.info.get(k) is not None:
                            atomic_write(exp / f"{cell.key}{suffix}", outcome.info[k])
                    if outcome.shards and all("pred" in p for p in outcome.shards):
                        # fake-quant top-1 per image, in subset order: the artifact's agreement
                        buf = io.BytesIO()
                        np.save(buf, np.concatenate([p["pred"] for p in outcome.shards]),
                                allow_pickle=False)
                        atomic_write(exp / f"{cell.key}.pred.npy", buf.getvalue())
                store.write_part(cell.key, ACC_PART, rows)
                if outcome.error is not None:
                    failed += 1
                    log.error(
                        "cell %s/%s/%s failed: %s",
                        cell.method,
                        cell.model,
                        cell.dataset,
                        outcome.error,
                    )
                else:
                    done += 1
                store.consolidate()
                bar.update(1)
                bar.set_postfix_str(f"{cell.method} done")
                beat.update(f"{cell.method} accuracy")
        torch_cache: dict[tuple, Any] = {}
        for cell, target in lat_todo:
            part = f"latency-{target}"
            if not (store.root / "exports" / f"{cell.key}.npz").exists():
                bar.update(1)
                beat.update(f"{cell.method} {target} skipped")
                continue  # its accuracy part failed; nothing was exported to time
            try:
                rows = latency_rows(cell, target, store, cfg, run_id, torch_cache, ex)
                done += 1
            except Exception as exc:  # one failed target must not lose the others
                log.error("latency %s on %s failed: %s", cell.method, target, exc)
                log.debug("latency failure", exc_info=True)
                rows = _failed_rows({**_base_fields(cell, run_id), "target": target}, exc)
                failed += 1
            store.write_part(cell.key, part, rows)
            store.consolidate()
            bar.update(1)
            bar.set_postfix_str(f"{cell.method} {target} timed")
            beat.update(f"{cell.method} {target} latency")
    finally:
        if own and ex is not None:
            ex.close()
    bar.close()
    frame = store.consolidate()
    meta["sessions"][-1]["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["sessions"][-1]["seconds"] = round(time.time() - t0, 1)
    store.write_meta(meta)
    if report and len(frame):
        from ternbench.reports import build_report

        try:
            build_report(store.root, store.root, registry=list_methods())
        except Exception as exc:  # the results are safe on disk; a report can be rebuilt
            log.error("report failed (results are kept; rebuild with `ternbench report %s`): %s",
                      store.root, exc)
            log.debug("report failure", exc_info=True)
    return RunSummary(frame=frame, failed=failed, done=done, skipped=skipped, out=cfg.out,
                      degraded=degraded_cells(frame))


def degraded_cells(frame: pd.DataFrame) -> list[str]:
    """``"method/model/dataset: reason"`` of every collapsed cell in the run (resumed ones too)."""
    if not len(frame) or "status" not in frame:
        return []
    bad = frame[frame["status"].eq("degraded") & frame["metric"].eq("top1")]
    return [f"{r.method}/{r.model}/{r.dataset}: {r.error}" for r in bad.itertuples()]
