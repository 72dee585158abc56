"""Post-training methods' hooks of the one quantize flow (:mod:`._flow`): the layer policy,
BatchNorm re-estimation + calibration, the optional fine-tune; and the group-ternary weight."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import torch
from torch import Tensor, nn

from ._base import MethodConfig, QuantContext, QuantInfo, QuantizedModel
from ._flow import Step, calibrate, calibrate_activations, quantize_flow, recalibrate_bn
from ._layers import (
    ActQuantizer,
    IdentityWeight,
    Int8ChannelWeight,
    Position,
    QuantConv2d,
    QuantLinear,
    WeightQuantizer,
    passthrough,
)
from ._ternarize import Solver, ternarize_rows

__all__ = [
    "TernaryGroupWeight",
    "Finetune",
    "post_training_quantize",
    "ptq_prepare",
    "policy_layer",
    "make_layer",
    "calibrate_activations",
]

log = logging.getLogger(__name__)


class TernaryGroupWeight(WeightQuantizer):
    """Ternary codes with one scale per contiguous fan-in group (per channel when ``group_size``
    is None, per tensor when ``per_tensor``).

    In eval mode the codes of an unchanged weight are cached, so evaluating a post-training model
    does not re-solve the groups on every batch.
    """

    fmt = "ternary"
    scale_bits = 16  # scales are rounded to FP16 values, as in the FGQ paper's storage count

    def __init__(
        self,
        group_size: int | None = None,
        solver: Solver = "exact",
        per_tensor: bool = False,
        ratio: float = 0.7,
        group_order: Literal["cij", "ijc"] = "cij",
    ) -> None:
        super().__init__()
        self.ratio = ratio
        self.group_size = group_size
        self.solver: Solver = solver
        self.per_tensor = per_tensor
        self.group_order = group_order
        self._cache: tuple[tuple[int, int], tuple[Tensor, Tensor, int]] | None = None

    def encode(self, w2d: Tensor) -> tuple[Tensor, Tensor, int]:
        key = (w2d.data_ptr(), w2d._version)
        if not self.training and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        w = w2d.detach()
        if self.per_tensor:
            codes, alpha = ternarize_rows(w.reshape(1, -1), w.numel(), self.solver, self.ratio)
            res = (codes.reshape(w.shape), alpha.expand(w.shape[0], 1).contiguous(), w.shape[1])
        else:
            gs = min(self.group_size or w.shape[1], w.shape[1])
            codes, scales = self.ternarize_groups(w, gs, self.solver, self.ratio)
            res = (codes, scales, gs)
        # round scales to FP16 values: what is counted (16 bits) is what the kernels use
        res = (res[0], res[1].to(torch.float16).to(w.dtype), res[2])
        if not self.training:
            self._cache = (key, res)
        return res

    def ternarize_groups(self, w2d: Tensor, gs: int, solver: Solver,
                         ratio: float = 0.7) -> tuple[Tensor, Tensor]:
        """``ternarize_rows`` over the groups of :meth:`group_perm`'s order: codes in (C, kh, kw)
        order, scales [out, G] in group order."""
        perm = self.group_perm(w2d.shape[1])
        codes, scales = ternarize_rows(w2d if perm is None else w2d[:, perm], gs, solver, ratio)
        if perm is not None:  # codes back to (C, kh, kw) order; scales stay in group order
            codes = torch.empty_like(codes).index_copy_(1, perm.to(codes.device), codes)
        return codes, scales

    def extra_repr(self) -> str:
        g = "tensor" if self.per_tensor else self.group_size or "channel"
        order = f", order={self.group_order}" if self.group_order != "cij" else ""
        return f"group={g}, solver={self.solver}{order}"


def make_layer(mod: nn.Module, wq: WeightQuantizer, act_bits: int) -> QuantConv2d | QuantLinear:
    aq = ActQuantizer(act_bits)
    if isinstance(mod, nn.Conv2d):
        return QuantConv2d(mod, wq, aq)
    assert isinstance(mod, nn.Linear)
    return QuantLinear(mod, wq, aq)


def policy_layer(
    cfg: MethodConfig,
    ternary: Callable[[], WeightQuantizer],
) -> Callable[[str, nn.Module, Position], nn.Module]:
    """Layer factory applying ``cfg.first_last`` to the first and last conv/linear."""

    def make(name: str, mod: nn.Module, pos: Position) -> nn.Module:
        if pos != "middle" and cfg.first_last == "fp32":
            return make_layer(mod, IdentityWeight(), 32)
        if pos != "middle" and cfg.first_last == "int8":
            return make_layer(mod, Int8ChannelWeight(), 8)
        return make_layer(mod, ternary(), cfg.act_bits)

    return make


def ptq_prepare(cfg: MethodConfig) -> Step:
    """The post-training ``prepare`` hook: BatchNorm statistics re-estimated with the quantized
    weights (activations passing through) when ``cfg.bn_recalibrate``, then activation ranges
    recorded on the corrected network.

    Order matters: BN statistics go stale with quantized weights (20% -> 85% top-1 on
    Fashion-MNIST in our notes), and the activation ranges must be those of the corrected net.
    """

    def prepare(m: nn.Module, ctx: QuantContext) -> QuantInfo:
        info = QuantInfo(bn_recalibrated=False)
        if cfg.bn_recalibrate:
            with passthrough(m):  # activations pass through while BN statistics are gathered
                info["bn_batches"] = recalibrate_bn(m, ctx)
            info["bn_recalibrated"] = True
        info.update(calibrate(m, ctx))
        return info

    return prepare


@dataclass(frozen=True)
class Finetune:
    """The ``train`` hook of post-training methods: an optional short STE fine-tune (SGD lr
    1e-3, cosine) for ``epochs`` over the training loader; 0 trains nothing."""

    method: str
    epochs: float = 0.0

    def __call__(self, m: nn.Module, ctx: QuantContext, teacher: nn.Module) -> QuantInfo:
        if self.epochs <= 0:
            return QuantInfo(finetune_epochs=0.0)
        if ctx.train_loader is None:
            raise ValueError(f"{self.method}: finetune_epochs > 0 needs a training loader")
        from ternbench.core.train import TrainCfg, train

        tcfg = TrainCfg(
            epochs=self.epochs,
            lr=1e-3,
            optimizer="sgd",
            schedule="cosine",
            weight_decay=1e-4,
            label_smoothing=0.0,
            seed=ctx.seed,
        )
        train(m, ctx.train_loader, tcfg, device=ctx.device, desc=f"{self.method} fine-tune")
        return QuantInfo(finetune_epochs=self.epochs)


def post_training_quantize(
    model: nn.Module,
    ctx: QuantContext,
    cfg: MethodConfig,
    method: str,
    ternary: Callable[[], WeightQuantizer],
    finetune_epochs: float = 0.0,
) -> QuantizedModel:
    """:func:`~ternbench.methods._flow.quantize_flow` for a post-training method: layers per
    ``cfg`` (:func:`policy_layer` with ``ternary`` weights), :func:`ptq_prepare`, then the
    optional :class:`Finetune`. The caller's model is untouched."""
    return quantize_flow(
        model,
        ctx,
        cfg,
        method,
        policy_layer(cfg, ternary),
        prepare=ptq_prepare(cfg),
        train=Finetune(method, finetune_epochs),
    )


def first_batches(loader: Iterable[tuple[Tensor, Tensor]], n: int) -> list[tuple[Tensor, Tensor]]:
    return list(islice(iter(loader), n))
