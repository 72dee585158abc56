"""STTN: Soft Threshold Ternary Networks (Xu et al., IJCAI'20, arXiv:2204.01234).

Ternary weights and ternary activations, with no hard weight threshold: every ternary conv is
trained as **two binary convs** with independent latent weights ``W1``, ``W2`` and one shared
per-output-channel scale (github.com/WeixiangXu/STTN, ``util.py``)::

    alpha_k = (||W1_k||_1 + ||W2_k||_1) / (2 n)          # n = fan-in
    y       = conv(x, alpha sign(W1)) + conv(x, alpha sign(W2))
            = conv(x, 2 alpha * (sign(W1) + sign(W2)) / 2)

so the merged kernel is ternary, ``{-2 alpha, 0, +2 alpha}``: a weight is 0 exactly where the two
signs disagree (the "soft threshold"). ``sign(0) = +1`` here (binary signs), which keeps the
merged codes integral. Latent weights are clamped to [-1, 1] before every training forward.

Gradient (``grad_rule``): ``"repo"`` (default) reproduces the repo's rule for each branch j,
``dL/dW_j = g_j + sign(W_j) * mean_k(sign(W_j) * g_j)`` with ``g_j = dL/dB_j`` (an STE for the
sign plus the XNOR-Net term from alpha, without the alpha factor on the STE term);
``"exact"`` is autograd of ``alpha(W1, W2) * ste(sign(W_j))``. Adam is insensitive to the
overall gradient scale either rule implies.

Activations: ternary with fixed thresholds, ``a = sign(x) * [|x| > 0.5]`` in {-1, 0, +1}
(scale 1, offset 0); the STE passes the gradient where ``|x| < 1``. They are parameter-free, so
they stay on during calibration (BatchNorm statistics are re-estimated with them).

Initialisation from the FP32 model (the paper trains from scratch): per output channel
``W1 = W + d_k``, ``W2 = W - d_k`` with ``d_k = init_shift * mean|W_k|``. Since
``sign(W + d) + sign(W - d) = 2 sign(W) [|W| > d]`` the initial merged kernel is exactly TWN's
ternarization of the pretrained weight with threshold ``d_k`` (a small ``init_shift`` gives the
"W plus/minus a small perturbation" start: almost binary). The latent weights must lie in the
clamp range [-1, 1]: with ``latent_scale="fit"`` (default) a layer is scaled down by
``1 / max|W +- d|`` only when that exceeds 1 (pretrained conv weights rarely do);
``latent_scale="unit"`` always scales to fill the range, which makes Adam's steps small relative
to the weights (a common factor only rescales alpha, which the following BatchNorm absorbs; its
statistics are re-estimated right after). On Fashion-MNIST ResNet-8, one epoch of QAT gave
80.4% with "fit" and 76.4% with "unit" (one seed).

Inference merge (the repo's ``merge_from_bwx2_to_ternary.py``): ``codes = (sign W1 + sign W2)
/ 2`` in {-1, 0, 1} with scale ``2 alpha``: one ternary kernel. The export has
``act_mode="ternary"``, ``act_scale=1``, ``act_threshold=0.5``, ``act_offset=0``. In eval mode
the two branches are computed in float64 (``exact_eval``, see
:class:`~ternbench.methods._ternary.ExactEval`), so the evaluated model and the deployed merged one
agree without near-threshold flips.

The repo's block (BN -> ternary act -> two binary convs -> BN -> + shortcut -> PReLU, with a
parameter-free 2x2 max-pool + zero-channel shortcut) is the model ``sttn_resnet8`` (and
``sttn_resnet20``, ``sttn_resnet18``) in the bench package's ``models``; on a plain ResNet the
ternary activation is placed before each ternarized conv (it then reads a ReLU output, so its
codes are {0, +1}).

Example:
    >>> from ternbench.methods import create_method
    >>> cfg = create_method("sttn").config
    >>> (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.kd, cfg.kd_alpha)
    ('adam', 0.001, 0.0, True, 1.0)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import MethodConfig, QuantContext, QuantInfo, QuantizedModel, _check
from ._facts import PaperNumber
from ._flow import calibrate, quantize_flow, recalibrate_bn
from ._layers import ActQuantizer, Position, WeightQuantizer, calibrating
from ._qat import QATMethodConfig, QATTraining
from ._registry import register_method
from ._ternary import (
    ExactConv2d,
    ExactLinear,
    first_last_layer,
    hard_forward,
    ternary_code,
    wrap_layer,
)

__all__ = [
    "STTNConfig",
    "STTN",
    "STTNAct",
    "STTNWeight",
    "STTNConv2d",
    "STTNLinear",
    "binary_sign",
]

log = logging.getLogger(__name__)

PAPER = (
    "Xu, He, Zhao, Hu, Wang, Cheng 2020, Soft Threshold Ternary Networks, IJCAI'20, "
    "arXiv:2204.01234"
)

#: the recipe of the official repository (ImageNet ResNet-18, 68.2% top-1)
PAPER_RECIPE: dict[str, Any] = {
    "init": "from scratch (Gaussian, std 1/fan-in)",
    "optimizer": "adam",
    "lr": 5e-3,
    "weight_decay": 0.0,
    "epochs": 256,
    "schedule": "cosine",
    "batch_size": 256,
    "loss": "KD only: soft cross entropy (temperature 1) to a pretrained torchvision ResNet-50",
    "first_last": "fp32",
    "model": "modified ResNet-18 (BN-TernAct-conv-BN-add-PReLU, parameter-free downsampling)",
}
PAPER_RECIPE_TEXT = json.dumps(PAPER_RECIPE, sort_keys=True)


def binary_sign(w: Tensor) -> Tensor:
    """``+1`` where ``w >= 0`` else ``-1`` (never 0, unlike ``torch.sign``)."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


class _RepoBinarize(torch.autograd.Function):
    """``alpha * sign(w)`` with the repository's gradient ``g + sign(w) mean(sign(w) g)``."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, alpha: Tensor) -> Tensor:
        s = binary_sign(w)
        ctx.save_for_backward(s)
        return alpha * s

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (s,) = ctx.saved_tensors
        return g + s * (s * g).mean(1, keepdim=True), None


class STTNAct(ActQuantizer):
    """Fixed-threshold ternary activation ``sign(x) [|x| > threshold]`` with an STE on |x| < 1.

    Example:
        >>> STTNAct()(torch.tensor([-2.0, -0.4, 0.5, 0.6])).tolist()
        [-1.0, 0.0, 0.0, 1.0]
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__(bits=2)
        self.threshold = float(threshold)

    def export_fields(self) -> dict[str, object]:
        return {
            "act_mode": "ternary",
            "act_bits": 2,
            "act_scale": 1.0,
            "act_threshold": self.threshold,
            "act_offset": 0.0,
        }

    def value64(self, x: Tensor) -> Tensor:
        return ternary_code(x.detach().to(torch.float64), self.threshold)

    def forward(self, x: Tensor) -> Tensor:
        # parameter-free: it quantizes during calibration too (nothing to record)
        soft = x * (x.abs() < 1).to(x.dtype)  # d/dx = 1[|x| < 1], the repo's STE
        return hard_forward(ternary_code(x, self.threshold), soft)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class STTNWeight(WeightQuantizer):
    """The pair of binary latent weights: the layer's ``weight`` is ``W1``, ``latent2`` is ``W2``.

    :meth:`binary_kernels` gives the two binary kernels ``alpha sign(W_j)`` of the training graph;
    :meth:`encode` the merged ternary kernel. Call :meth:`init_latents` once with the layer's
    weight (the layer classes below do).
    """

    fmt = "ternary"
    scale_bits = 32

    def __init__(
        self,
        init_shift: float = 0.7,
        latent_scale: Literal["unit", "fit"] = "fit",
        grad_rule: Literal["repo", "exact"] = "repo",
    ) -> None:
        super().__init__()
        self.init_shift = init_shift
        self.latent_scale = latent_scale
        self.grad_rule = grad_rule
        self.latent2 = nn.Parameter(torch.zeros(0))

    @torch.no_grad()
    def init_latents(self, weight: Tensor) -> None:
        """Set ``weight`` (W1, in place) and ``latent2`` (W2) from the FP32 weight it holds."""
        w = weight.detach().reshape(weight.shape[0], -1).float()
        d = self.init_shift * w.abs().mean(1, keepdim=True)
        w1, w2 = w + d, w - d
        peak = float(torch.maximum(w1.abs().max(), w2.abs().max())) if w.numel() else 0.0
        k = 1.0
        if peak > 0 and (self.latent_scale == "unit" or peak > 1.0):
            k = 1.0 / peak
        weight.copy_((w1 * k).reshape(weight.shape))
        self.latent2 = nn.Parameter((w2 * k).reshape(weight.shape).to(weight).clone())

    @torch.no_grad()
    def clamp_(self, weight: Tensor) -> None:
        """Clamp both latent weights to [-1, 1] in place (the repo does it before each step)."""
        weight.clamp_(-1.0, 1.0)
        self.latent2.clamp_(-1.0, 1.0)

    def _latents(self, w: Tensor) -> tuple[Tensor, Tensor]:
        w1 = w.reshape(w.shape[0], -1).clamp(-1.0, 1.0)
        w2 = self.latent2.reshape(w1.shape).to(w1).clamp(-1.0, 1.0)
        return w1, w2

    @staticmethod
    def alpha(w1: Tensor, w2: Tensor) -> Tensor:
        """``(||W1_k||_1 + ||W2_k||_1) / (2n)`` as [out, 1]."""
        return (w1.abs().sum(1, keepdim=True) + w2.abs().sum(1, keepdim=True)) / (2 * w1.shape[1])

    def binary_kernels(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The two binary kernels ``alpha sign(W1)``, ``alpha sign(W2)`` shaped like ``w``."""
        w1, w2 = self._latents(w)
        if self.grad_rule == "repo":
            a = self.alpha(w1, w2).detach()
            b1, b2 = _RepoBinarize.apply(w1, a), _RepoBinarize.apply(w2, a)
        else:
            a = self.alpha(w1, w2)
            b1 = a * hard_forward(binary_sign(w1.detach()), w1)
            b2 = a * hard_forward(binary_sign(w2.detach()), w2)
        return b1.reshape(w.shape), b2.reshape(w.shape)

    def encode(self, w2d: Tensor) -> tuple[Tensor, Tensor, int]:
        w1, w2 = self._latents(w2d.detach())
        w2 = w2.detach()
        codes = (binary_sign(w1) + binary_sign(w2)) / 2  # exactly -1, 0 or 1
        return codes, 2 * self.alpha(w1, w2), w2d.shape[1]

    def kernels64(self, w: Tensor) -> list[Tensor]:
        """The two binary kernels in float64 from the float32 alpha the export uses."""
        w1, w2 = self._latents(w.detach())
        a = self.alpha(w1, w2.detach()).to(torch.float64)
        return [a * binary_sign(w1).to(torch.float64), a * binary_sign(w2).to(torch.float64)]

    def forward(self, w: Tensor) -> Tensor:
        b1, b2 = self.binary_kernels(w)
        return b1 + b2

    def extra_repr(self) -> str:
        return f"grad={self.grad_rule}, latent_scale={self.latent_scale}"


class STTNConv2d(ExactConv2d):
    """A ternary conv trained as two binary convs on the same (ternary) input (evaluated with
    both branches in float64, see :class:`~ternbench.methods._ternary.ExactEval`)."""

    wq: STTNWeight

    def __init__(self, conv: nn.Conv2d, wq: STTNWeight, aq: ActQuantizer) -> None:
        super().__init__(conv, wq, aq)
        wq.init_latents(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self._use_exact():
            return super().forward(x)
        if self.training:
            self.wq.clamp_(self.weight)
        xq = self.aq(x)
        # conv(x, B1) + conv(x, B2) == conv(x, B1 + B2), and autograd hands both kernels the
        # same gradient either way: one conv instead of two (half the QAT compute)
        b1, b2 = self.wq.binary_kernels(self.weight)
        y = self._conv_forward(xq, b1 + b2, self.bias)
        self._record_shapes(x, y)
        return y


class STTNLinear(ExactLinear):
    """A ternary linear layer trained as two binary ones (used with ``first_last="same"``)."""

    wq: STTNWeight

    def __init__(self, lin: nn.Linear, wq: STTNWeight, aq: ActQuantizer) -> None:
        super().__init__(lin, wq, aq)
        wq.init_latents(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self._use_exact():
            return super().forward(x)
        if self.training:
            self.wq.clamp_(self.weight)
        xq = self.aq(x)
        b1, b2 = self.wq.binary_kernels(self.weight)
        y = F.linear(xq, b1 + b2, self.bias)  # one GEMM, as in STTNConv2d
        self._record_shapes(x, y)
        return y


@dataclass(frozen=True)
class STTNConfig(QATMethodConfig):
    """STTN knobs. ``act_threshold``: the fixed activation threshold (0.5 in the paper).
    ``init_shift``, ``latent_scale``, ``grad_rule``: see the module docstring. ``exact_eval``:
    evaluate in float64 like the integer kernel (:class:`~ternbench.methods._ternary.ExactEval`).
    ``bn_recalibrate``: re-estimate BatchNorm after the layer swap, before training. Training
    fields: :class:`~ternbench.methods._qat.QATRecipe` (harness default: Adam lr 1e-3, wd 0,
    cosine, KD-only from the FP32 model; the paper: lr 5e-3, 256 epochs, ResNet-50 teacher).
    """

    act_bits: int = 2
    first_last: Literal["fp32", "int8", "same"] = "fp32"
    bn_recalibrate: bool = True
    act_threshold: float = 0.5
    init_shift: float = 0.7
    latent_scale: Literal["unit", "fit"] = "fit"
    grad_rule: Literal["repo", "exact"] = "repo"
    exact_eval: bool = True
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    kd: bool = True
    kd_alpha: float = 1.0
    # the repo's loss is the plain soft cross entropy to the teacher, i.e. temperature 1 (the
    # harness default 4 gave 88.63 vs 89.04 here: sttn_resnet8 / Fashion-MNIST, 938 steps)
    kd_temperature: float = 1.0

    allowed_act_bits = (2,)

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        _check(0 < self.act_threshold < 1, cls, "act_threshold", "in (0, 1)", self.act_threshold)
        _check(0 <= self.init_shift < 2, cls, "init_shift", "in [0, 2)", self.init_shift)
        _check(
            self.latent_scale in ("unit", "fit"),
            cls,
            "latent_scale",
            "'unit' or 'fit'",
            self.latent_scale,
        )
        _check(
            self.grad_rule in ("repo", "exact"),
            cls,
            "grad_rule",
            "'repo' or 'exact'",
            self.grad_rule,
        )
        _check(isinstance(self.exact_eval, bool), cls, "exact_eval", "a bool", self.exact_eval)


class STTN:
    name = "sttn"

    def __init__(self, config: STTNConfig) -> None:
        self.config = config

    def _make(self, name: str, mod: nn.Module, pos: Position) -> nn.Module:
        cfg = self.config
        fixed = first_last_layer(cfg.first_last, mod, pos, cfg.exact_eval)
        if fixed is not None:
            return fixed
        wq = STTNWeight(cfg.init_shift, cfg.latent_scale, cfg.grad_rule)
        return wrap_layer(mod, wq, STTNAct(cfg.act_threshold), cfg.exact_eval,
                          STTNConv2d, STTNLinear)

    def _prepare(self, m: nn.Module, ctx: QuantContext) -> QuantInfo:
        """BN statistics with the ternary layers on (int8 first/last pass through), then the
        int8 ranges and layer shapes on the calibration set."""
        info = QuantInfo(bn_recalibrated=False)
        if self.config.bn_recalibrate:
            with calibrating(m):
                info["bn_batches"] = recalibrate_bn(m, ctx)
            info["bn_recalibrated"] = True
        info.update(calibrate(m, ctx))
        return info

    def _deviations(self, epochs: float) -> list[str]:
        cfg = self.config
        dev = [
            f"fine-tuned from the FP32 baseline for {epochs:g} epochs instead of 256 epochs "
            "from scratch",
            f"{cfg.optimizer} lr {cfg.lr:g} wd {cfg.weight_decay:g} {cfg.schedule} "
            "(paper: adam lr 5e-3 wd 0 cosine, batch 256)",
            "latent init W1/W2 = W +- "
            f"{cfg.init_shift:g}*mean|W_k| (TWN-like start), scaled ({cfg.latent_scale})",
        ]
        if cfg.kd:
            dev.append(
                "no KD teacher ResNet-50 (unavailable offline); KD from the FP32 baseline"
                + (" (KD only, as in the repo)" if cfg.kd_alpha == 1.0 else "")
            )
        else:
            dev.append("no KD (the repo trains with KD only from a ResNet-50)")
        if cfg.grad_rule != "repo":
            dev.append("exact autograd gradient instead of the repo's rule")
        return dev

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        cfg = self.config
        training = QATTraining(self.name, cfg.recipe(), PAPER_RECIPE_TEXT, self._deviations)
        return quantize_flow(
            model, ctx, cfg, self.name, self._make, prepare=self._prepare, train=training
        )


@register_method(
    "sttn", config=STTNConfig, paper=PAPER, kind="qat", block="preact",  # the repo's block
    # the repo's recipe; the ResNet-50 teacher is not available offline, the FP32 baseline teaches
    paper_overrides={"epochs": 256, "optimizer": "adam", "lr": 5e-3, "weight_decay": 0.0,
                     "schedule": "cosine", "kd": True, "kd_alpha": 1.0, "kd_temperature": 1.0},
    # two binary branches, ternary activations, KD: ~2 epochs to settle from the FP32 weights
    # (938 steps: -2.70 vs its FP32, 625: -3.33; docs/measured/fidelity.md)
    budget_scale=2.0,
    whole_model=1,
    paper_numbers=(
        PaperNumber("sttn", "resnet18", "imagenet", 66.2, 69.3, "IJCAI'20", "Xu et al., IJCAI'20"),
        PaperNumber("sttn", "resnet18", "imagenet", 68.2, 69.3,
                    "modified ResNet-18, 256 epochs, KD from ResNet-50",
                    "github.com/WeixiangXu/STTN README"),
    ),
)
def sttn(config: MethodConfig) -> STTN:
    assert isinstance(config, STTNConfig)
    return STTN(config)
