"""The pure task functions every executor runs: they take names and configs, never live state
from the driver, except the FP32 baseline weights and (for evaluation) the quantized module that
an earlier task of the same cell produced.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ternbench.core.export_io import exports_to_bytes, graph_state_to_bytes
from ternbench.core.train import evaluate, seed_everything
from ternbench.methods import (
    QuantContext,
    QuantInfo,
    create_method,
    get_method_info,
    layer_parity,
    max_logit_diff,
    summarize_cost,
)
from torch import nn

from .config import Profile
from .data import (
    dataset_info,
    dataset_labels,
    get_dataset_info,
    load_dataset,
    loader_workers,
    make_loader,
    stratified_indices,
    subset_indices,
)
from .models import create_model

__all__ = ["CellSpec", "quantize_cell", "eval_shard", "eval_indices", "shard_indices"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellSpec:
    """One accuracy cell: a method variant on a model/dataset/seed under a profile."""

    key: str
    method: str
    overrides: dict[str, Any]
    method_config: str  # JSON of the full resolved config
    model: str
    dataset: str
    seed: int
    prof: Profile  # carried whole: workers need not know profiles registered in the driver
    data_root: str | None = None
    checkpoint_dir: str | None = None  # QAT checkpoints of this cell (resume after a kill)
    threads: int = 1
    device: str = "cpu"  # where quantize/train runs ("cuda" when the executor got a GPU)
    baseline_key: str = ""
    sweep: dict[str, Any] = field(default_factory=dict)  # the swept config fields of this cell
    extra: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # ImageFolder datasets: centre-crop side (default 224)
    stratified: bool = False  # the evaluation subset keeps every class's share (--subset)

    @property
    def profile(self) -> str:
        return self.prof.name

    @property
    def profile_obj(self) -> Profile:
        return self.prof

    @property
    def subset(self) -> str:
        n = self.profile_obj.n_eval
        kind = "stratified:" if self.stratified and n is not None else ""
        return f"test:{kind}{'all' if n is None else n}@seed{self.seed}"

    @property
    def test_split(self) -> str:
        """The split the cell evaluates on (the dataset's ``test_split``)."""
        return get_dataset_info(self.dataset).test_split

    def load(self, split: str, *, augment: bool = False) -> Any:
        return load_dataset(self.dataset, split, self.data_root, augment=augment,
                            image_size=self.image_size)

    def build_model(self) -> nn.Module:
        info = dataset_info(self.dataset, self.data_root, self.image_size)
        return create_model(
            self.model,
            in_chans=info.in_chans,
            num_classes=info.num_classes,
            image_size=info.image_size,
        )


def eval_indices(spec: CellSpec) -> np.ndarray:
    """The test-set indices a cell evaluates (deterministic in the seed)."""
    ds = spec.load(spec.test_split)
    n = spec.profile_obj.n_eval
    if spec.stratified and n is not None:
        return stratified_indices(dataset_labels(ds), n, spec.seed)
    return subset_indices(len(ds), n, spec.seed)


def shard_indices(idx: np.ndarray, shards: int) -> list[np.ndarray]:
    return [s for s in np.array_split(idx, max(1, min(shards, len(idx)))) if len(s)]


def _context(spec: CellSpec) -> QuantContext:
    prof = spec.profile_obj
    # an ImageFolder without a train/ folder calibrates on its val images (PTQ with --weights)
    has_train = "train" in dataset_info(spec.dataset, spec.data_root, spec.image_size).splits
    split = "train" if has_train else "val"
    train = spec.load(split)
    train_aug = spec.load(split, augment=True) if has_train else train
    n = len(train)
    workers = loader_workers(spec.dataset)
    # calibration and training draws use seeds derived from the cell seed, apart from eval's
    calib = make_loader(train, subset_indices(n, prof.n_calib, spec.seed + 1), prof.batch_size,
                        num_workers=workers)
    tr_idx = subset_indices(n, prof.train_subset, spec.seed + 2)
    train_loader = make_loader(train_aug, tr_idx, 128, shuffle=True, seed=spec.seed,
                               num_workers=workers)
    val_loader = None
    if prof.eval_points > 0 and prof.n_val > 0:  # the training curve's held-out images
        test = spec.load(spec.test_split)
        val_idx = subset_indices(len(test), prof.n_val, spec.seed + 3)  # type: ignore[arg-type]
        val_loader = make_loader(test, val_idx, prof.batch_size, num_workers=workers)
    return QuantContext(
        calib_loader=calib,
        train_loader=train_loader,
        val_loader=val_loader,
        eval_points=prof.eval_points,
        seed=spec.seed,
        train_epochs=prof.qat_epochs(len(train_loader), get_method_info(spec.method).budget_scale),
        checkpoint_dir=spec.checkpoint_dir,
        progress=False,
        device=spec.device,
        bn_batches=prof.bn_batches,
    )


def quantize_cell(
    spec: CellSpec, baseline_state: dict[str, torch.Tensor]
) -> tuple[nn.Module, dict]:
    """Quantize the FP32 baseline with the cell's method; returns the fake-quant module and a
    dict with the cost summary, method info, parity check and the export (npz bytes)."""
    torch.set_num_threads(spec.threads)
    seed_everything(spec.seed)
    t0 = time.perf_counter()
    model = spec.build_model()
    model.load_state_dict(baseline_state)
    model.eval()
    method = create_method(spec.method, spec.overrides)
    qm = method.quantize(model.to(spec.device), _context(spec))
    qm.module.to("cpu")  # export, parity and evaluation are CPU work
    exports = qm.export()
    cost = summarize_cost(exports.values())
    test = spec.load(spec.test_split)
    idx = eval_indices(spec)[: spec.profile_obj.deploy_check_samples]
    x = torch.stack([test[int(i)][0] for i in idx])
    info = {
        "cost": cost.as_metrics(),
        "method_info": {k: v for k, v in qm.info.items() if isinstance(v, int | float | bool)},
        "deploy_max_abs_diff": max_logit_diff(qm, x),
        "deploy_layer_rel_err": layer_parity(qm, x),
        "method_config": qm.config.to_json(),
        # the recipe actually used, the paper's, and how they differ (training-time methods)
        "ledger": _ledger(qm.info),
        # the training curve (validation top-1 and train loss per evaluation point)
        "curve": list(qm.info.get("train_curve") or []),
        "export_npz": exports_to_bytes(exports),
        # with the exports, these rebuild and check the deployed model end to end (TVM)
        "graph_state": graph_state_to_bytes(qm.module),
        "check_npz": _check_npz(qm.module, x),
        "quantize_seconds": time.perf_counter() - t0,
    }
    return qm.module.to("cpu"), info  # evaluation shards run on CPU workers


@torch.no_grad()
def _check_npz(module: nn.Module, x: torch.Tensor) -> bytes:
    """The deploy-check inputs and the fake-quant model's logits on them (npz bytes)."""
    import io

    module.eval()
    buf = io.BytesIO()
    np.savez(buf, x=x.numpy(), logits=module(x).numpy())
    return buf.getvalue()


def _ledger(info: QuantInfo) -> dict[str, Any]:
    """The deviations ledger of ``run.json``: recipe (as JSON text), paper recipe (text) and
    deviations (list of text) of a training-time method; empty for the others."""
    out: dict[str, Any] = {}
    if "recipe" in info:
        out["recipe"] = json.dumps(info["recipe"], sort_keys=True, default=str)
    if "paper_recipe" in info:
        out["paper_recipe"] = info["paper_recipe"]
    if "deviations" in info:
        out["deviations"] = list(info["deviations"])
    return out


@torch.no_grad()
def eval_shard(spec: CellSpec, module: nn.Module, indices: np.ndarray) -> dict[str, Any]:
    """Exact counts on one shard of the cell's evaluation subset (merged by summing)."""
    torch.set_num_threads(spec.threads)
    test = spec.load(spec.test_split)
    loader = make_loader(test, indices, spec.profile_obj.batch_size,
                         num_workers=loader_workers(spec.dataset))
    preds: list[torch.Tensor] = []  # top-1 per image, in index order (deployed agreement)
    hook = module.register_forward_hook(lambda _m, _i, out: preds.append(out.argmax(1)))
    try:
        counts = evaluate(module.eval(), loader)
    finally:
        hook.remove()
    pred = torch.cat(preds).numpy().astype(np.int32) if preds else np.zeros(0, np.int32)
    return {**counts, "pred": pred}


def merge_shards(parts: list[dict[str, Any]]) -> dict[str, float]:
    n = sum(int(p["n"]) for p in parts)
    c1 = sum(int(p["correct1"]) for p in parts)
    c5 = sum(int(p.get("correct5", 0)) for p in parts)
    loss = sum(float(p["loss_sum"]) for p in parts)
    return {
        "top1": 100.0 * c1 / max(n, 1),
        "top5": 100.0 * c5 / max(n, 1),
        "loss": loss / max(n, 1),
        "n_eval": float(n),
    }
