"""TTQ: Trained Ternary Quantization (Zhu, Han, Mao & Dally, ICLR'17, arXiv:1612.01064).

Weight-only QAT with two *learned* scales per layer. With ``Δ = t · max|W|`` (t = 0.05)::

    ŵ = +W_p  where w >  Δ        (positive set I_p)
    ŵ =  0    where |w| ≤ Δ       (zero set)
    ŵ = -W_n  where w < -Δ        (negative set I_n)

Gradients as in the paper, on the weights normalised to [-1, 1] (``w' = w / max|W_0|``, the
paper's normalisation; ``norm`` buffer): ``dL/dW_p = Σ_{I_p} dL/dŵ'``, ``dL/dW_n = -Σ_{I_n}
dL/dŵ'``, and the latent weight gets ``dL/dŵ'`` scaled by ``W_p`` on I_p, by 1 on the zero set
and by ``W_n`` on I_n. The first conv and last linear stay FP32 (``first_last="fp32"``);
activations FP32. W_p / W_n have their own learning-rate multiplier (``scale_lr_mult``) and no
weight decay.

Why the normalisation matters (the bug that stalled TTQ near 55% on ResNet-8/Fashion-MNIST):
learning W_p in raw weight units, where W_p ≈ 0.04 but its gradient sums thousands of weights
(measured dL/dW_p ≈ 5 in ``layer3.0.conv2``), moved the scale by more than its own value every
SGD step at lr 0.01, and the latent gradients were scaled by W_p ≈ 0.05 instead of ≈ 1. In the
normalised coordinates both are the size the paper's rules assume.

Initialisation (documented deviation): the official code starts ``W_p = W_n = 1``; we start
them at the mean |w'| of the positive / negative set (the L2 fit of the FP32 weights, so the
fine-tune starts from the FP32 function up to ternarisation).

Export: the asymmetric pair {+W_p, -W_n} is not "codes × one scale", so a TTQ layer is exported
*exactly* as two branches of the same input: branch 0 (``name``) holds the positive codes
(∈ {0, 1}) with scale ``W_p``; branch 1 (``name#1``, ``branch_of=name``, no bias) holds the
negative codes (∈ {0, -1}) with scale ``W_n``. Their sum is the TTQ weight. The cost summary
therefore counts 2 × 2 bits per weight (a 3-level kernel could store 2 bits and two scales).

Example:
    >>> from ternbench.methods import create_method
    >>> create_method("ttq").config.first_last
    'fp32'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ._base import MethodConfig, QuantContext, QuantizedModel, _check
from ._facts import PaperDelta, PaperNumber
from ._layers import Position, QuantLayer, WeightQuantizer
from ._ptq import policy_layer
from ._qat import QATMethodConfig, qat_quantize
from ._registry import register_method

__all__ = ["TTQConfig", "TTQWeight", "TTQ", "PAPER"]

PAPER = "Zhu, Han, Mao & Dally 2017, Trained Ternary Quantization, ICLR'17, arXiv:1612.01064"
PAPER_RECIPE_TEXT = (
    "CIFAR-10 ResNets fine-tuned from FP32, AlexNet on ImageNet trained from scratch; "
    "t = 0.05, W_p = W_n = 1 on weights normalised to [-1, 1] (official code); the exact "
    "learning-rate schedule is not recorded in our notes"
)


class TTQWeight(WeightQuantizer):
    """TTQ codes with learned per-layer scales ``wp`` / ``wn`` (call :meth:`init_scales`).

    As in the paper, the scales live on the weights normalised to [-1, 1]: ``norm`` (a buffer,
    ``max|w|`` of the starting weights) maps them back, so the layer's weight is
    ``norm * (wp * I_p - wn * I_n)``. The learned parameters ``wp`` / ``wn`` are therefore
    dimensionless (about 0.3..1), and their gradient ``norm * Σ dL/dŵ`` and the latent-weight
    gradient ``norm**2 * {wp, 1, wn} * dL/dŵ`` are the paper's rules in the normalised
    coordinates (``w' = w / norm``, ``ŵ' = ŵ / norm``) written for the un-normalised weight.
    """

    fmt = "ternary"
    scale_bits = 32
    norm: Tensor

    def __init__(self, t: float = 0.05) -> None:
        super().__init__()
        self.t = float(t)
        self.wp = nn.Parameter(torch.ones(()))
        self.wn = nn.Parameter(torch.ones(()))
        self.register_buffer("norm", torch.ones(()))

    def masks(self, w2d: Tensor) -> tuple[Tensor, Tensor]:
        """Boolean positive and negative sets of ``w2d`` for ``Δ = t · max|W|``."""
        w = w2d.detach()
        th = self.t * w.abs().max()
        return w > th, w < -th

    @torch.no_grad()
    def init_scales(self, weight: Tensor) -> None:
        """``norm`` = max|w|; ``W_p`` / ``W_n`` = mean |w| / norm of the positive / negative set
        (mean |w| / norm if a set is empty): the L2 fit of the starting weights."""
        w2d = weight.detach().reshape(weight.shape[0], -1).float()
        norm = float(w2d.abs().max()) or 1.0
        self.norm.fill_(norm)
        pos, neg = self.masks(w2d)
        fallback = float(w2d.abs().mean()) / norm
        self.wp.fill_(float(w2d[pos].mean()) / norm if pos.any() else fallback)
        self.wn.fill_(float(-w2d[neg].mean()) / norm if neg.any() else fallback)

    def scales(self) -> tuple[Tensor, Tensor]:
        """The positive and negative scale in weight units (``norm * wp``, ``norm * wn``)."""
        return self.norm * self.wp.detach(), self.norm * self.wn.detach()

    def _scale(self, s: Tensor, rows: int) -> Tensor:
        return s.detach().float().cpu().reshape(1, 1).expand(rows, 1).contiguous()

    def encode(self, w2d: Tensor) -> tuple[Tensor, Tensor, int]:
        pos, _ = self.masks(w2d)
        return pos.to(w2d.dtype), self._scale(self.scales()[0], w2d.shape[0]), int(w2d.shape[1])

    def branches(self, w2d: Tensor) -> list[tuple[Tensor, Tensor, int, bool]]:
        _, neg = self.masks(w2d)
        codes = -neg.to(w2d.dtype)
        return [(codes, self._scale(self.scales()[1], w2d.shape[0]), int(w2d.shape[1]), True)]

    def dequantize(self, w2d: Tensor) -> Tensor:
        pos, neg = self.masks(w2d)
        sp, sn = (s.to(w2d.device) for s in self.scales())
        return sp * pos.to(w2d.dtype) - sn * neg.to(w2d.dtype)

    def forward(self, w: Tensor) -> Tensor:
        w2d = w.reshape(w.shape[0], -1)
        pos, neg = self.masks(w2d)
        p, n = pos.to(w2d.dtype), neg.to(w2d.dtype)
        norm = self.norm.to(w2d.dtype)
        # autograd gives dL/dW_p = norm * Σ_{I_p} dL/dŵ and dL/dW_n = -norm * Σ_{I_n} dL/dŵ
        hat = norm * (self.wp * p - self.wn * n)
        gscale = (self.wp.detach() * p + (1.0 - p - n) + self.wn.detach() * n) * norm**2
        # latent-weight gradient scaled per set; the second term is exactly 0 in the forward
        return (hat + (w2d - w2d.detach()) * gscale).reshape(w.shape)

    def extra_repr(self) -> str:
        return f"t={self.t}"


@dataclass(frozen=True)
class TTQConfig(QATMethodConfig):
    """TTQ knobs: threshold factor ``t`` plus the QAT recipe fields."""

    first_last: Literal["fp32", "int8", "same"] = "fp32"
    act_bits: int = 32
    t: float = 0.05
    #: re-estimate BatchNorm after training: ternarising moves every layer's output statistics
    #: and a short budget leaves the FP32 running statistics stale (smoke: 21% without)
    bn_recalibrate: bool = True

    allowed_act_bits = (8, 32)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            isinstance(self.t, int | float) and not isinstance(self.t, bool) and 0 < self.t < 1,
            type(self).__name__,
            "t",
            "a number in (0, 1)",
            self.t,
        )
        object.__setattr__(self, "t", float(self.t))


class TTQ:
    name = "ttq"

    def __init__(self, config: TTQConfig) -> None:
        self.config = config

    def deviations(self, ctx: QuantContext) -> list[str]:
        cfg = self.config
        rec = cfg.recipe()
        sched = rec.schedule if rec.schedule != "step" else f"step@{rec.milestones}"
        out = [
            f"{rec.optimizer} lr {rec.lr:g} {sched} schedule for {rec.resolve_epochs(ctx):g} "
            "epochs (profile budget), not the paper's schedule",
            "W_p/W_n start at the mean |w'| of the positive/negative sets (L2 fit of the FP32 "
            "weights) instead of 1.0",
        ]
        if cfg.first_last != "fp32":
            out.append(f"first/last layers {cfg.first_last} instead of FP32")
        if cfg.act_bits != 32:
            out.append(f"{cfg.act_bits}-bit activations instead of FP32")
        return out

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        cfg = self.config
        base = policy_layer(cfg, lambda: TTQWeight(cfg.t))

        def make(name: str, mod: nn.Module, pos: Position) -> nn.Module:
            layer = base(name, mod, pos)
            if isinstance(layer, QuantLayer) and isinstance(layer.wq, TTQWeight):
                layer.wq.init_scales(layer.weight)
            return layer

        return qat_quantize(
            model,
            ctx,
            cfg,
            self.name,
            make,
            paper_recipe=PAPER_RECIPE_TEXT,
            deviations=lambda _epochs: self.deviations(ctx),
        )


@register_method(
    "ttq", config=TTQConfig, paper=PAPER, kind="qat", budget_scale=4.0, order=3,
    paper_numbers=(
        PaperNumber("ttq", "resnet20", "cifar10", 91.13, 91.77, "error 8.87% vs FP 8.23%",
                    "Zhu et al., ICLR'17 / github.com/czhu95/ternarynet"),
    ),
    paper_deltas=(
        PaperDelta("ttq", "alexnet", "imagenet", 0.3, "from scratch (error 42.5% vs 42.8%)",
                   "Zhu et al., ICLR'17"),
    ),
)
def ttq(config: MethodConfig) -> TTQ:
    assert isinstance(config, TTQConfig)
    return TTQ(config)
