"""TTN-RE: ternarized weights with residual expansion (He, Gong & Fan, WACV'19, arXiv:1807.07948).

Training-time (QAT) ternarization of the weights; activations stay FP32 (weight-only) unless
``act_bits=8``. Per layer (one threshold and one scale per tensor, as in the official code):

* threshold ``Δ = δ · max|W|`` (δ = 0.05), codes ``T = sign(W) · 1[|W| ≥ Δ]``;
* "statistical weight scaling" ``α = mean{|W| : |W| ≥ Δ}`` (the L2-optimal α for that support);
* backward: straight-through identity, zeroed where ``|W| ≥ 1``.

Residual expansion (``t_ex`` ∈ {1, 2, 4}): ``t_ex`` ternary branches from the *same* latent
weight with thresholds ``δ·j`` for ``j = 1..t_ex`` (0.05/0.1 and 0.05/0.1/0.15/0.2 at the paper's
δ), each with its own α; their outputs are summed, i.e. the layer uses ``Σ_j α_j T_j``, a
(2·t_ex + 1)-level weight. In fake-quant this is one conv with the summed weight; the export
has one :class:`LayerExport` per branch (branch ``j ≥ 1`` as ``name#j``, no bias). Each branch
passes the identity gradient, so the latent gradient is ``t_ex`` times the single-branch one,
as in the official code (there the bias is added once per branch; here once per layer).

All layers, first conv and last linear included, are ternary by default (``first_last="same"``,
as in the paper's CIFAR and REL ResNet-18 results).

Example:
    >>> from ternbench.methods import create_method
    >>> create_method("ttn_re", t_ex=2).config.thresholds()
    (0.05, 0.1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ._base import MethodConfig, QuantContext, QuantizedModel, _check
from ._facts import PaperNumber
from ._layers import WeightQuantizer
from ._ptq import policy_layer
from ._qat import QATMethodConfig, QATRecipe, qat_quantize, recipe_deviations
from ._registry import register_method

__all__ = ["TTNREConfig", "TTNREWeight", "TTNRE", "ttn_threshold_codes", "PAPER", "PAPER_RECIPE"]

PAPER = (
    "He, Gong & Fan 2019, Optimize Deep Convolutional Neural Network with Ternarized Weights "
    "and High Accuracy (TTN, residual expansion), WACV'19, arXiv:1807.07948"
)
#: the paper's CIFAR-10 recipe (official train_CIFAR10.sh): trained from scratch
PAPER_RECIPE = QATRecipe(
    epochs=200,
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    nesterov=True,
    weight_decay=3e-4,
    schedule="step",
    milestones=(0.4, 0.6, 0.8),
    gammas=(0.1, 0.1, 0.5),
)
PAPER_RECIPE_TEXT = (
    "CIFAR-10 from scratch: SGD Nesterov 0.9, lr 0.1, 200 epochs, steps at 80/120/160 "
    "(gamma 0.1/0.1/0.5), batch 128, wd 3e-4; ImageNet: fine-tune from FP32 with Adam lr 1e-4, "
    "50 epochs, steps 30/40/45 (gamma 0.2/0.2/0.5), batch 256, wd 5e-6"
)


def ttn_threshold_codes(w2d: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """Codes ``sign(W)·1[|W| ≥ δ·max|W|]`` and the tensor-wise ``α = mean{|W| ≥ Δ}``.

    Example:
        >>> codes, alpha = ttn_threshold_codes(torch.tensor([[1.0, -0.5, 0.04, 0.06]]), 0.05)
        >>> codes.tolist(), round(float(alpha), 4)
        ([[1.0, -1.0, 0.0, 1.0]], 0.52)
    """
    a = w2d.detach().abs()
    keep = a >= delta * a.max()
    codes = torch.sign(w2d.detach()) * keep
    n = keep.sum()
    alpha = (a * keep).sum() / n.clamp_min(1)  # an empty support (all-zero weight) gives 0
    return codes, alpha


class TTNREWeight(WeightQuantizer):
    """Tensor-wise TTN ternarization with ``len(deltas)`` residual-expansion branches.

    ``encode`` gives branch 0 (threshold ``deltas[0]``); :meth:`branches` the others.
    """

    fmt = "ternary"
    scale_bits = 32  # one FP32 α per tensor and branch

    def __init__(self, deltas: tuple[float, ...] = (0.05,)) -> None:
        super().__init__()
        if not deltas:
            raise ValueError("TTNREWeight needs at least one threshold")
        self.deltas = tuple(float(d) for d in deltas)

    def _branch(self, w2d: Tensor, delta: float) -> tuple[Tensor, Tensor, int]:
        codes, alpha = ttn_threshold_codes(w2d, delta)
        scales = alpha.detach().float().cpu().reshape(1, 1).expand(w2d.shape[0], 1).contiguous()
        return codes, scales, int(w2d.shape[1])

    def encode(self, w2d: Tensor) -> tuple[Tensor, Tensor, int]:
        return self._branch(w2d, self.deltas[0])

    def branches(self, w2d: Tensor) -> list[tuple[Tensor, Tensor, int, bool]]:
        return [(*self._branch(w2d, d), True) for d in self.deltas[1:]]

    def dequantize(self, w2d: Tensor) -> Tensor:
        out = torch.zeros_like(w2d)
        for d in self.deltas:
            codes, alpha = ttn_threshold_codes(w2d, d)
            out = out + alpha * codes
        return out

    def forward(self, w: Tensor) -> Tensor:
        w2d = w.reshape(w.shape[0], -1)
        hat = self.dequantize(w2d.detach())
        # STE: each branch passes the identity gradient except where |W| >= 1 (official code);
        # the forward value is exactly ``hat`` (the second term is 0).
        gate = (w2d.detach().abs() < 1).to(w2d.dtype) * len(self.deltas)
        return (hat + (w2d - w2d.detach()) * gate).reshape(w.shape)

    def extra_repr(self) -> str:
        return f"deltas={self.deltas}"


@dataclass(frozen=True)
class TTNREConfig(QATMethodConfig):
    """TTN-RE knobs: ``delta`` (threshold factor δ), ``t_ex`` (residual expansion branches),
    plus the QAT recipe fields of :class:`~ternbench.methods._qat.QATMethodConfig`."""

    first_last: Literal["fp32", "int8", "same"] = "same"
    act_bits: int = 32
    delta: float = 0.05
    t_ex: int = 1

    allowed_act_bits = (8, 32)

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        _check(
            isinstance(self.t_ex, int)
            and not isinstance(self.t_ex, bool)
            and self.t_ex in (1, 2, 4),
            cls,
            "t_ex",
            "one of (1, 2, 4)",
            self.t_ex,
        )
        _check(
            isinstance(self.delta, int | float)
            and not isinstance(self.delta, bool)
            and 0 < self.delta * self.t_ex < 1,
            cls,
            "delta",
            f"a number in (0, 1/t_ex) = (0, {1 / self.t_ex:g})",
            self.delta,
        )
        object.__setattr__(self, "delta", float(self.delta))

    def thresholds(self) -> tuple[float, ...]:
        """Branch threshold factors ``δ·j``, ``j = 1..t_ex`` (rounded to 12 digits)."""
        return tuple(round(self.delta * j, 12) for j in range(1, self.t_ex + 1))


class TTNRE:
    name = "ttn_re"

    def __init__(self, config: TTNREConfig) -> None:
        self.config = config

    def deviations(self, ctx: QuantContext) -> list[str]:
        cfg = self.config
        rec = cfg.recipe()
        used = QATRecipe(**{**rec.to_dict(), "epochs": rec.resolve_epochs(ctx)})
        out = recipe_deviations(used, PAPER_RECIPE)
        out.append("fine-tuned from the FP32 baseline instead of trained from scratch (CIFAR)")
        if cfg.first_last != "same":
            out.append(f"first/last layers {cfg.first_last} instead of ternary")
        if cfg.act_bits != 32:
            out.append(f"{cfg.act_bits}-bit activations instead of FP32")
        return out

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        cfg = self.config
        deltas = cfg.thresholds()
        qm = qat_quantize(
            model,
            ctx,
            cfg,
            self.name,
            policy_layer(cfg, lambda: TTNREWeight(deltas)),
            paper_recipe=PAPER_RECIPE_TEXT,
            deviations=lambda _epochs: self.deviations(ctx),
        )
        qm.info["thresholds"] = list(deltas)
        return qm


@register_method(
    "ttn_re", config=TTNREConfig, paper=PAPER, kind="qat", budget_scale=4.0,
    paper_overrides={
        "epochs": PAPER_RECIPE.epochs, "optimizer": PAPER_RECIPE.optimizer, "lr": PAPER_RECIPE.lr,
        "momentum": PAPER_RECIPE.momentum, "nesterov": PAPER_RECIPE.nesterov,
        "weight_decay": PAPER_RECIPE.weight_decay, "schedule": PAPER_RECIPE.schedule,
        "milestones": PAPER_RECIPE.milestones, "gammas": PAPER_RECIPE.gammas,
    },
    paper_numbers=(
        PaperNumber("ttn_re", "resnet20", "cifar10", 91.65, 91.70, "all layers ternary",
                    "He & Fan, github.com/elliothe/Ternarized_Neural_Network README"),
        PaperNumber("ttn_re", "resnet18", "imagenet", 66.01, 69.75, "t_ex=1",
                    "He & Fan, official README"),
        PaperNumber("ttn_re", "resnet18", "imagenet", 68.35, 69.75,
                    "REL t_ex=2, ternary first/last", "He & Fan, official README"),
        PaperNumber("ttn_re", "resnet18", "imagenet", 69.44, 69.75,
                    "REL t_ex=4, ternary first/last", "He & Fan, official README"),
    ),
)
def ttn_re(config: MethodConfig) -> TTNRE:
    assert isinstance(config, TTNREConfig)
    return TTNRE(config)
