"""TRN: Ternary Residual Networks (Kundu et al., 2017, arXiv:1707.04679).

Post-training, no retraining. The base is the FGQ 8-2 model (ternary weights in groups of N,
8-bit activations, BatchNorm re-estimated and activation ranges calibrated on the base). Sensitive
layers then get *residual ternary edges*: ``R_0 = W - base``, and for edge j
``(alpha_j, T_j) = Tern(R_{j-1})``, ``R_j = R_{j-1} - alpha_j T_j``. An edge is one more sparse
ternary kernel on the layer's own 8-bit input; outputs add up.

Edges are added greedily to the layer with the largest ``eps_l * s_l`` (``eps_l`` the relative
weight error ``||W - W_hat||_F / ||W||_F`` of the current approximation, ``s_l`` the measured loss
increase on a calibration batch when layer l alone is ternarized) until every ``eps_l`` is below
``tolerance``, a layer has ``max_edges_per_layer`` edges, or the extra ternary MACs exceed
``budget`` times the base model's. The order of additions is the edge ranking; edges are
additive, so any prefix of the ranking can be switched on at run time (:func:`set_active_edges`)
without re-quantizing or retraining. With no edge enabled the model *is* its FGQ base.

Switchable BatchNorm statistics: BN re-estimated for the base weights goes stale as edges pull
the weights back toward FP32 (measured on Fashion-MNIST/ResNet-8: 86.3% with no edge, 79.4% with
all 8), while skipping re-estimation leaves the base at 60.6%. So, when ``bn_recalibrate`` is on,
the statistics are re-estimated once per prefix length at quantization time and swapped with the
switch; once BN is folded into the layer epilogue that is a per-channel scale and bias per
setting. Activation ranges stay those of the base.

Example:
    >>> from ternbench.methods import create_method
    >>> create_method("trn", active_fraction=0.5).config.max_edges_per_layer
    2
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import MethodConfig, QuantContext, QuantizedModel, _check
from ._facts import PaperDelta
from ._layers import iter_quant_layers
from ._ptq import TernaryGroupWeight, post_training_quantize
from ._registry import register_method
from .fgq import GROUP_ORDER, FGQConfig

__all__ = ["TRNConfig", "TRN", "TRNWeight", "set_active_edges"]

log = logging.getLogger(__name__)

PAPER = "Kundu et al. 2017, Ternary Residual Networks, arXiv:1707.04679"
Ranking = Literal["product", "error", "loss"]


@dataclass(frozen=True)
class TRNConfig(FGQConfig):
    """FGQ base knobs plus the residual-edge budget and the run-time switch.

    ``ranking``: ``product`` (eps * measured loss change, the paper's rule), ``error`` (eps
    only) or ``loss`` (measured loss change scaled by the remaining relative error).
    ``active_edges`` (count) overrides ``active_fraction`` (share of the ranked edges enabled).
    """

    tolerance: float = 0.1
    max_edges_per_layer: int = 2
    budget: float = 1.0
    ranking: Ranking = "product"
    active_fraction: float = 1.0
    active_edges: int | None = None
    sensitivity_batches: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        _check(self.tolerance >= 0, cls, "tolerance", ">= 0", self.tolerance)
        _check(isinstance(self.max_edges_per_layer, int) and 0 <= self.max_edges_per_layer <= 8,
               cls, "max_edges_per_layer", "an integer in [0, 8]", self.max_edges_per_layer)
        _check(self.budget >= 0, cls, "budget", ">= 0 (extra MACs / base MACs)", self.budget)
        _check(self.ranking in ("product", "error", "loss"), cls, "ranking",
               "'product', 'error' or 'loss'", self.ranking)
        _check(0.0 <= self.active_fraction <= 1.0, cls, "active_fraction", "in [0, 1]",
               self.active_fraction)
        _check(self.active_edges is None or (isinstance(self.active_edges, int)
                                              and self.active_edges >= 0),
               cls, "active_edges", "None or a non-negative integer", self.active_edges)
        _check(isinstance(self.sensitivity_batches, int) and self.sensitivity_batches >= 1, cls,
               "sensitivity_batches", "a positive integer", self.sensitivity_batches)


class TRNWeight(TernaryGroupWeight):
    """FGQ group ternarization plus frozen residual edges, the first ``active`` of them on.

    ``bypass`` returns the latent FP weight (used to measure one layer's sensitivity alone).
    """

    def __init__(self, group_size: int | None, solver: Literal["exact", "twn"],
                 group_order: Literal["cij", "ijc"] = "cij") -> None:
        super().__init__(group_size, solver, group_order=group_order)
        self.edges: list[tuple[Tensor, Tensor]] = []
        self.active = 0
        self.bypass = False

    def edge_group_size(self, fan_in: int) -> int:
        return min(self.group_size or fan_in, fan_in)

    def build_edges(self, w2d: Tensor, count: int) -> list[float]:
        """Solve ``count`` residual edges of ``w2d``; returns eps after 0..count edges."""
        w = w2d.detach().float()
        gs = self.edge_group_size(w.shape[1])
        approx = self.dequantize_base(w)
        norm = float(w.norm()) or 1.0
        eps = [float((w - approx).norm()) / norm]
        self.edges = []
        for _ in range(count):
            codes, scales = self.ternarize_groups(w - approx, gs, "exact")
            scales = scales.to(torch.float16).to(torch.float32)  # stored like the base scales
            self.edges.append((codes, scales))
            approx = approx + codes * self.expand_scales(scales, gs, w.shape[1])
            eps.append(float((w - approx).norm()) / norm)
        return eps

    def dequantize_base(self, w2d: Tensor) -> Tensor:
        codes, scales, gs = self.encode(w2d)
        return codes.to(w2d.dtype) * self.expand_scales(scales, gs, w2d.shape[1])

    def dequantize(self, w2d: Tensor) -> Tensor:
        out = self.dequantize_base(w2d)
        gs = self.edge_group_size(w2d.shape[1])
        for codes, scales in self.edges[: self.active]:
            out = out + codes.to(w2d.dtype) * self.expand_scales(scales.to(w2d.dtype), gs,
                                                                 w2d.shape[1])
        return out

    def forward(self, w: Tensor) -> Tensor:
        return w if self.bypass else super().forward(w)

    def branches(self, w2d: Tensor) -> list[tuple[Tensor, Tensor, int, bool]]:
        gs = self.edge_group_size(w2d.shape[1])
        return [(c, s, gs, j < self.active) for j, (c, s) in enumerate(self.edges)]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, edges={len(self.edges)}, active={self.active}"


def _trn_layers(module: nn.Module) -> list[tuple[str, Any, TRNWeight]]:
    return [(n, m, m.wq) for n, m in iter_quant_layers(module) if isinstance(m.wq, TRNWeight)]


def set_active_edges(qm: QuantizedModel, n: int) -> int:
    """Enable the first ``n`` edges of the ranking (run-time switch); returns how many are on.

    Example:
        >>> # set_active_edges(qm, 0) turns a TRN model back into its FGQ base
    """
    ranking: list[str] = qm.info.get("edge_ranking", [])
    n = max(0, min(n, len(ranking)))
    counts: dict[str, int] = {}
    for name in ranking[:n]:
        layer = name.split("#", 1)[0]
        counts[layer] = counts.get(layer, 0) + 1
    for name, _, wq in _trn_layers(qm.module):
        wq.active = counts.get(name, 0)
    bn_sets = getattr(qm.module, "trn_bn_sets", None)
    if bn_sets:
        _load_bn(qm.module, bn_sets[n])
    qm.info["active_edges"] = n
    return n


def _bn_state(module: nn.Module) -> dict[str, Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for k, v in m.state_dict().items()}


def _load_bn(module: nn.Module, state: dict[str, Tensor]) -> None:
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for k, v in m.state_dict().items():
                v.copy_(state[f"{name}.{k}"])


@torch.no_grad()
def _loss(module: nn.Module, batches: list[tuple[Tensor, Tensor]], device: str) -> float:
    module.eval()
    tot = n = 0.0
    for x, y in batches:
        tot += float(F.cross_entropy(module(x.to(device)), y.to(device), reduction="sum"))
        n += len(y)
    return tot / max(n, 1)


class TRN:
    name = "trn"

    def __init__(self, config: TRNConfig) -> None:
        self.config = config

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        cfg = self.config
        qm = post_training_quantize(
            model, ctx, cfg, self.name,
            lambda: TRNWeight(cfg.group_size, cfg.solver, GROUP_ORDER[cfg.group_axis]),
            finetune_epochs=cfg.finetune_epochs,
        )
        layers = _trn_layers(qm.module)
        batches = list(islice(iter(ctx.calib_loader), cfg.sensitivity_batches))
        eps: dict[str, list[float]] = {}
        macs: dict[str, int] = {}
        for name, mod, wq in layers:
            w2d = mod.weight.detach().reshape(mod.weight.shape[0], -1)
            eps[name] = wq.build_edges(w2d, cfg.max_edges_per_layer)
            ho, wo = getattr(mod, "seen_output_hw", (1, 1))
            macs[name] = int(w2d.numel()) * ho * wo
        sens = self._sensitivity(qm, layers, batches, ctx.device)
        ranking = self._rank(eps, sens, macs)
        qm.info.update({
            "edge_ranking": ranking,
            "edges_total": len(ranking),
            "sensitivity": {k: round(v, 6) for k, v in sens.items()},
            "eps_base": {k: round(v[0], 6) for k, v in eps.items()},
        })
        # only the ranked edges are part of the model; drop solved edges that were not chosen
        chosen: dict[str, int] = {}
        for e in ranking:
            chosen[e.split("#", 1)[0]] = chosen.get(e.split("#", 1)[0], 0) + 1
        for name, _, wq in layers:
            wq.edges = wq.edges[: chosen.get(name, 0)]
        if cfg.bn_recalibrate:
            self._switchable_bn(qm, len(ranking), ctx)
        n = cfg.active_edges if cfg.active_edges is not None else \
            math.floor(cfg.active_fraction * len(ranking) + 0.5)
        set_active_edges(qm, n)
        log.info("trn: %d residual edges ranked, %d enabled", len(ranking), qm.info["active_edges"])
        return qm

    def _switchable_bn(self, qm: QuantizedModel, total: int, ctx: QuantContext) -> None:
        """One set of BN statistics per number of enabled edges (set 0 is the FGQ base's)."""
        from ._flow import recalibrate_bn
        from ._layers import passthrough

        sets = [_bn_state(qm.module)]
        for n in range(1, total + 1):
            qm.module.trn_bn_sets = None  # type: ignore[assignment]
            set_active_edges(qm, n)
            with passthrough(qm.module):  # as for the base: activations pass through
                recalibrate_bn(qm.module, ctx)
            sets.append(_bn_state(qm.module))
        qm.module.trn_bn_sets = sets  # type: ignore[assignment]
        qm.module.eval()

    def _sensitivity(self, qm: QuantizedModel, layers: list[tuple[str, Any, TRNWeight]],
                     batches: list[tuple[Tensor, Tensor]], device: str) -> dict[str, float]:
        """Loss increase on calibration batches when each layer alone is ternarized."""
        for _, _, wq in layers:
            wq.bypass = True
        try:
            ref = _loss(qm.module, batches, device)
            out = {}
            for name, _, wq in layers:
                wq.bypass = False
                out[name] = max(_loss(qm.module, batches, device) - ref, 1e-6)
                wq.bypass = True
        finally:
            for _, _, wq in layers:
                wq.bypass = False
        return out

    def _rank(self, eps: dict[str, list[float]], sens: dict[str, float],
              macs: dict[str, int]) -> list[str]:
        cfg = self.config
        budget = cfg.budget * sum(macs.values())
        used = {k: 0 for k in eps}
        spent = 0
        ranking: list[str] = []
        while True:
            best, best_score = None, -1.0
            for name, e in eps.items():
                j = used[name]
                if j >= cfg.max_edges_per_layer or e[j] <= cfg.tolerance:
                    continue
                if spent + macs[name] > budget:
                    continue
                score = {"product": e[j] * sens[name], "error": e[j],
                         "loss": sens[name] * e[j] / max(e[0], 1e-12)}[cfg.ranking]
                if score > best_score:
                    best, best_score = name, score
            if best is None:
                return ranking
            used[best] += 1
            spent += macs[best]
            ranking.append(f"{best}#{used[best]}")


@register_method(
    "trn", config=TRNConfig, paper=PAPER, kind="ptq",
    default_sweep={"active_fraction": (0.0, 0.25, 0.5, 0.75, 1.0)},
    ablations={"trn-budget": {"active_fraction": (0.0, 0.25, 0.5, 0.75, 1.0)}},
    paper_deltas=(
        PaperDelta("trn", "resnet101", "imagenet", -1.0, "8-2 + residual edges ('~1% drop')",
                   "Kundu et al. 2017, abstract"),
    ),
)
def trn(config: MethodConfig) -> TRN:
    assert isinstance(config, TRNConfig)
    return TRN(config)
