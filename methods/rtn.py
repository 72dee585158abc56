"""RTN: Reparameterized Ternary Network (Li et al., AAAI'20, arXiv:1912.02057).

Ternary weights *and* ternary activations, each reparameterized as ``gamma * T + beta``: a
fixed-direction ternary code ``T`` in {-1, 0, +1} times a full-precision learnable scale
``gamma`` plus a learnable offset ``beta`` (per layer for activations, per output channel for
weights). Scale and offset decouple the range of the quantized values from the code and keep
receiving gradient where the clipped STE saturates.

Exact parametrization used here (the paper's normalisation constants were not retrieved; this
is our reading and ``info["deviations"]`` says so):

* activations, per layer, with a clip range ``c > 0`` fixed at calibration::

      u    = clamp(x / c, -1, 1)
      T(x) = sign(u) * [|u| > 0.5]  =  sign(x) * [|x| > Delta],    Delta = 0.5 * c
      x_q  = gamma_a * T(x) + beta_a

  ``Delta`` is chosen on calibration samples, among |x| quantiles and an even grid up to
  max|x|, to minimise the least-squares error of the best ``gamma T + beta`` fit; that fit
  initialises ``gamma_a, beta_a``.
* weights, per output channel ``k``, normalised by ``c_k = 2 * Delta_k`` where
  ``Delta_k = ratio * mean|W_k|`` (TWN's threshold) is recomputed from the latent weight at
  every forward::

      T(W_k) = sign(W_k) * [|W_k| > Delta_k]
      W_q    = gamma_k * T(W_k) + beta_k

  ``gamma_k, beta_k`` start at the least-squares fit of ``W_k ~ gamma T + beta``.

Gradients: STE through ``T`` with the clip, ``dT/dx = 1[|x| < c] / c`` (zero outside the clip
range); exact gradients for the reparameterization, ``d x_q / d gamma = T`` and
``d x_q / d beta = 1``.

Deployment (:class:`~ternbench.methods.LayerExport`): ``codes = T(W)``, ``scales = gamma_w``
``[out, 1]``, ``weight_offset = beta_w``, ``act_scale = gamma_a``, ``act_offset = beta_a``,
``act_threshold = Delta``, ``act_mode = "ternary"``. A kernel computes
``gamma_a gamma_w dot(a, t) + gamma_a beta_w sum(a) + beta_a gamma_w sum(t) + n beta_a beta_w``
(``n`` the valid, non-padded taps): one ternary x ternary dot plus a correction.

In a plain ResNet every ternarized conv reads a ReLU output, so its activation codes are
{0, +1} only; the offset ``beta_a`` then places the two levels. First conv and last linear
stay FP32 (``first_last="fp32"``, the paper's policy).

Evaluation runs the layers in float64 (:class:`ExactEval`): exact accumulation like the integer
kernel, so near-threshold activations do not flip between the evaluated and the deployed model.

The ternary-activation helpers RTN shares with STTN (:func:`ternary_code`,
:func:`hard_forward`, :class:`ExactEval`, ...) live in :mod:`ternbench.methods._ternary`.

Example:
    >>> from ternbench.methods import create_method
    >>> cfg = create_method("rtn").config
    >>> (cfg.act_bits, cfg.first_last, cfg.optimizer, cfg.kd)
    (2, 'fp32', 'adam', True)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._base import MethodConfig, QuantContext, QuantInfo, QuantizedModel, _check
from ._flow import calibrate_activations, quantize_flow, recalibrate_bn
from ._layers import ActQuantizer, Position, WeightQuantizer, calibrating
from ._qat import QATMethodConfig, QATTraining
from ._registry import register_method
from ._ternary import (
    ExactConv2d,
    ExactEval,
    ExactLinear,
    first_last_layer,
    fit_affine,
    hard_forward,
    ternary_code,
    wrap_layer,
)

__all__ = [
    "RTNConfig",
    "RTN",
    "RTNAct",
    "RTNWeight",
    "calibrate_rtn",
    # re-exported from ._ternary (their home since the STTN split)
    "ternary_code",
    "hard_forward",
    "fit_affine",
    "ExactEval",
    "ExactConv2d",
    "ExactLinear",
]

log = logging.getLogger(__name__)

PAPER = (
    "Li, Dong, Zhang, Bai, Chen, Wang 2020, RTN: Reparameterized Ternary Network, AAAI'20, "
    "arXiv:1912.02057"
)

#: what the paper reports about its training (the harness cannot reproduce ImageNet runs)
PAPER_RECIPE: dict[str, Any] = {
    "init": "pretrained FP32 ResNet-18 (ImageNet)",
    "optimizer": "not retrieved",
    "epochs": "not retrieved",
    "quantized": "ternary weights and activations, gamma*T+beta with learnable gamma, beta",
    "first_last": "fp32",
}
PAPER_RECIPE_TEXT = json.dumps(PAPER_RECIPE, sort_keys=True)


# ---------------------------------------------------------------------------- quantizers


class RTNAct(ActQuantizer):
    """Per-layer ternary activation ``gamma * T(x) + beta`` (see the module docstring).

    While ``calibrating`` it passes the input through and keeps a random sample of its values;
    :meth:`fit` then sets the clip range, ``gamma`` and ``beta`` from the sample.

    Example:
        >>> q = RTNAct()
        >>> _ = q.clip.fill_(2.0)  # Delta = 1
        >>> q(torch.tensor([-3.0, -0.5, 1.5])).tolist()
        [-1.0, 0.0, 1.0]
    """

    clip: Tensor
    beta: Tensor

    #: values kept per calibration batch and in total
    per_batch: int = 8192
    max_samples: int = 1 << 16

    def __init__(self, learn_scale: bool = True, learn_offset: bool = True) -> None:
        super().__init__(bits=2)
        self.learn_offset = learn_offset
        self.gamma = nn.Parameter(torch.ones(()), requires_grad=learn_scale)
        if learn_offset:
            self.beta = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("beta", torch.zeros(()))
        self.register_buffer("clip", torch.ones(()))
        self._samples: list[Tensor] = []
        self._n_samples = 0

    @property
    def threshold(self) -> Tensor:
        return self.clip * 0.5  # exact in binary floating point: export and forward agree

    def reset_samples(self) -> None:
        self._samples, self._n_samples = [], 0

    def _record(self, x: Tensor) -> None:
        if self._n_samples >= self.max_samples:
            return
        flat = x.detach().reshape(-1)
        k = min(flat.numel(), self.per_batch, self.max_samples - self._n_samples)
        if k <= 0:
            return
        # a local generator seeded by the batch count: reproducible, nothing unpicklable kept
        gen = torch.Generator().manual_seed(len(self._samples))
        idx = torch.randint(flat.numel(), (k,), generator=gen)
        self._samples.append(flat[idx.to(flat.device)].float().cpu())
        self._n_samples += k

    @torch.no_grad()
    def fit(self, n_grid: int = 33) -> None:
        """Set clip range, gamma and beta by least squares on the recorded sample."""
        if not self._samples:
            log.warning(
                "RTNAct.fit: no calibration sample recorded; keeping clip %.4g", float(self.clip)
            )
            return
        s = torch.cat(self._samples).double()
        self.reset_samples()
        a = s.abs()
        if float(a.max()) == 0.0:
            return  # an all-zero input: any threshold codes it as 0
        # candidates: quantiles of |x| (dense where the data is) and an even grid up to max|x|
        # (covers gaps between clusters, where the best threshold lies)
        qs = torch.quantile(a, torch.linspace(0.05, 0.95, n_grid, dtype=torch.float64))
        even = torch.linspace(0.0, float(a.max()), n_grid + 2, dtype=torch.float64)[1:-1]
        deltas = torch.cat([qs, even])
        # a zero threshold would make the clip range (and the STE window) empty
        deltas = deltas[deltas > 0]
        if deltas.numel() == 0:
            deltas = 0.5 * a.max().reshape(1)
        t = torch.sign(s)[None] * (a[None] > deltas[:, None])
        x = s[None].expand_as(t)
        gamma, beta = fit_affine(x, t, dim=1, offset=self.learn_offset)
        err = ((x - gamma[:, None] * t - beta[:, None]) ** 2).mean(1)
        best = int(torch.argmin(err))
        self.clip.fill_(2.0 * float(deltas[best]))
        self.gamma.fill_(float(gamma[best]))
        self.beta.fill_(float(beta[best]))

    def value64(self, x: Tensor) -> Tensor:
        """``gamma * T(x) + beta`` in float64 (the exact evaluation path)."""
        t = ternary_code(x.detach().to(torch.float64), float(self.threshold))
        return t * float(self.gamma.detach()) + float(self.beta.detach())

    def export_fields(self) -> dict[str, object]:
        return {
            "act_mode": "ternary",
            "act_bits": 2,
            "act_scale": float(self.gamma.detach()),
            "act_threshold": float(self.threshold),
            "act_offset": float(self.beta.detach()),
        }

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self._record(x)
            return x
        c = self.clip
        t = ternary_code(x, self.threshold)
        soft = x / c * (x.abs() < c).to(x.dtype)  # d/dx = 1[|x| < c] / c
        return self.gamma * hard_forward(t, soft) + self.beta

    def extra_repr(self) -> str:
        return f"clip={float(self.clip):.4g}, offset={'learned' if self.learn_offset else 'off'}"


class RTNWeight(WeightQuantizer):
    """Per-output-channel ternary weight ``gamma_k * T(W_k) + beta_k`` (module docstring).

    Built from the layer's initial weight, which sets ``gamma`` and ``beta`` by least squares.
    """

    fmt = "ternary"
    scale_bits = 32
    beta: Tensor

    def __init__(
        self,
        weight: Tensor,
        ratio: float = 0.7,
        learn_scale: bool = True,
        learn_offset: bool = True,
    ) -> None:
        super().__init__()
        self.ratio = ratio
        self.learn_offset = learn_offset
        w2d = weight.detach().reshape(weight.shape[0], -1).float()
        gamma, beta = fit_affine(w2d, self.code(w2d), dim=1, offset=learn_offset)
        self.gamma = nn.Parameter(gamma[:, None].clone(), requires_grad=learn_scale)
        if learn_offset:
            self.beta = nn.Parameter(beta.clone())
        else:
            self.register_buffer("beta", torch.zeros_like(beta))

    def threshold(self, w2d: Tensor) -> Tensor:
        """``Delta_k = ratio * mean|W_k|`` [out, 1] (treated as a constant: no gradient)."""
        return self.ratio * w2d.detach().abs().mean(1, keepdim=True)

    def code(self, w2d: Tensor) -> Tensor:
        return ternary_code(w2d.detach(), self.threshold(w2d))

    def encode(self, w2d: Tensor) -> tuple[Tensor, Tensor, int]:
        return self.code(w2d), self.gamma.detach().to(w2d), w2d.shape[1]

    def offset(self, w2d: Tensor) -> Tensor | None:
        return self.beta.detach().float().cpu() if self.learn_offset else None

    def dequantize(self, w2d: Tensor) -> Tensor:
        return self.gamma.detach().to(w2d) * self.code(w2d) + self.beta.detach().to(w2d)[:, None]

    def forward(self, w: Tensor) -> Tensor:
        w2d = w.reshape(w.shape[0], -1)
        delta = self.threshold(w2d)
        c = (2.0 * delta).clamp_min(1e-12)
        soft = w2d / c * (w2d.abs() < c).to(w2d.dtype)  # d/dW = 1[|W| < c] / c
        q = self.gamma * hard_forward(ternary_code(w2d.detach(), delta), soft)
        return (q + self.beta[:, None]).reshape(w.shape)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, offset={'learned' if self.learn_offset else 'off'}"


@torch.no_grad()
def calibrate_rtn(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: str = "cpu"
) -> int:
    """Record activation samples on ``loader`` and fit every :class:`RTNAct` (int8 quantizers
    record their ranges in the same pass); returns the number of samples seen."""
    acts = [m for m in model.modules() if isinstance(m, RTNAct)]
    for q in acts:
        q.reset_samples()
    n = calibrate_activations(model, loader, device)
    for q in acts:
        q.fit()
    return n


# ---------------------------------------------------------------------------- the method


@dataclass(frozen=True)
class RTNConfig(QATMethodConfig):
    """RTN knobs. ``weight_ratio``: weight threshold ``Delta_k = ratio * mean|W_k|``.
    ``learn_scale`` / ``learn_offset``: the paper's ablations (offset off = pure scale; the
    export then has no offsets). ``bn_recalibrate``: re-estimate BatchNorm after the layer swap,
    before training. ``exact_eval``: evaluate in float64 like the integer kernel (see
    :class:`ExactEval`). Training fields: see :class:`~ternbench.methods._qat.QATRecipe`
    (harness default: SGD lr 0.01 cosine, KD from the FP32 model). Measured on Fashion-MNIST
    ResNet-8, one epoch of QAT, one seed: SGD lr 0.01 76.5%, Adam lr 1e-3 wd 0 83.3%
    (FP32 88.5%).
    """

    act_bits: int = 2
    first_last: Literal["fp32", "int8", "same"] = "fp32"
    bn_recalibrate: bool = True
    weight_ratio: float = 0.7
    learn_scale: bool = True
    learn_offset: bool = True
    exact_eval: bool = True
    # Adam: one epoch on Fashion-MNIST/ResNet-8 gave 83.3% vs 76.5% with SGD lr 0.01
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    kd: bool = True

    allowed_act_bits = (2,)

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        _check(0 < self.weight_ratio < 2, cls, "weight_ratio", "in (0, 2)", self.weight_ratio)
        for name in ("learn_scale", "learn_offset", "exact_eval"):
            _check(isinstance(getattr(self, name), bool), cls, name, "a bool", getattr(self, name))


class RTN:
    name = "rtn"

    def __init__(self, config: RTNConfig) -> None:
        self.config = config

    def _make(self, name: str, mod: nn.Module, pos: Position) -> nn.Module:
        cfg = self.config
        fixed = first_last_layer(cfg.first_last, mod, pos, cfg.exact_eval)
        if fixed is not None:
            return fixed
        assert isinstance(mod, nn.Conv2d | nn.Linear)
        wq = RTNWeight(mod.weight, cfg.weight_ratio, cfg.learn_scale, cfg.learn_offset)
        return wrap_layer(mod, wq, RTNAct(cfg.learn_scale, cfg.learn_offset), cfg.exact_eval)

    def _prepare(self, m: nn.Module, ctx: QuantContext) -> QuantInfo:
        """BN statistics with ternary weights (activations passing through), then activation
        calibration, then BN statistics again with the ternary activations on."""
        cfg = self.config
        info = QuantInfo(bn_recalibrated=False)
        if cfg.bn_recalibrate:
            with calibrating(m):
                recalibrate_bn(m, ctx)
        info["calib_samples"] = calibrate_rtn(m, ctx.calib_loader, ctx.device)
        if cfg.bn_recalibrate:
            info["bn_batches"] = recalibrate_bn(m, ctx)
            info["bn_recalibrated"] = True
        return info

    def _deviations(self, epochs: float) -> list[str]:
        cfg = self.config
        dev = [
            "paper's optimizer and epochs not retrieved; harness recipe "
            f"({cfg.optimizer} lr {cfg.lr:g}, {cfg.schedule}, {epochs:g} epochs) "
            "fine-tuned from the FP32 baseline",
            "normalisation constants are ours: activation clip range c fitted on calibration "
            "data (Delta = c/2), weight Delta_k = "
            f"{cfg.weight_ratio:g}*mean|W_k|",
        ]
        if cfg.kd:
            dev.append("KD from the FP32 baseline (not in the paper)")
        return dev

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        cfg = self.config
        training = QATTraining(self.name, cfg.recipe(), PAPER_RECIPE_TEXT, self._deviations)
        return quantize_flow(
            model, ctx, cfg, self.name, self._make, prepare=self._prepare, train=training
        )


# ternary activations need signed inputs: BN before the activation (the STTN-repo block)
# no paper numbers: RTN's absolute top-1 was not retrieved
@register_method("rtn", config=RTNConfig, paper=PAPER, kind="qat", block="preact", whole_model=0)
def rtn(config: MethodConfig) -> RTN:
    assert isinstance(config, RTNConfig)
    return RTN(config)
