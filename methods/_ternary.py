"""Ternary-activation building blocks shared by RTN and STTN.

* :func:`ternary_code`: ``sign(x) * [|x| > threshold]``, the ``LayerExport`` activation rule;
* :func:`hard_forward`: a hard value forward with a soft gradient backward (STEs);
* :func:`fit_affine`: the least-squares ``gamma * t + beta`` fit of a code;
* :class:`ExactEval` and the layers :class:`ExactConv2d` / :class:`ExactLinear`: evaluation in
  float64 from the layer's own quantizers, so the evaluated model is the deployed integer one;
* :func:`wrap_layer`, :func:`first_last_layer`: the layer factories both methods use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ternbench.core.reference import quantize_activation
from torch import Tensor, nn

from ._layers import (
    ActQuantizer,
    IdentityWeight,
    Int8ChannelWeight,
    Position,
    QuantConv2d,
    QuantLinear,
    WeightQuantizer,
)

__all__ = [
    "ternary_code",
    "hard_forward",
    "fit_affine",
    "act_value64",
    "kernels64",
    "ExactEval",
    "ExactConv2d",
    "ExactLinear",
    "wrap_layer",
    "first_last_layer",
]


def ternary_code(x: Tensor, threshold: Tensor | float) -> Tensor:
    """``sign(x) * [|x| > threshold]`` in ``x``'s dtype (the ``LayerExport`` activation rule).

    Example:
        >>> ternary_code(torch.tensor([-1.0, -0.5, 0.2, 0.5, 0.7]), 0.5).tolist()
        [-1.0, -0.0, 0.0, 0.0, 1.0]
    """
    return quantize_activation(x, "ternary", threshold=threshold)


def hard_forward(hard: Tensor, soft: Tensor) -> Tensor:
    """``hard`` in the forward pass, bit for bit; the gradient of ``soft`` in the backward pass.

    (``soft + (hard - soft).detach()`` can be off by one rounding in the forward value; adding
    ``soft - soft.detach()``, which is exactly 0, is not.)
    """
    return hard + (soft - soft.detach())


def fit_affine(x: Tensor, t: Tensor, dim: int = -1, offset: bool = True) -> tuple[Tensor, Tensor]:
    """Least-squares ``(gamma, beta)`` of ``x ~ gamma * t + beta`` along ``dim``.

    Without ``offset`` beta is 0 and ``gamma = <x, t> / <t, t>``. A constant code (no
    variance) falls back to ``gamma = mean|x|``.

    Example:
        >>> g, b = fit_affine(torch.tensor([0.1, 2.1, 2.1]), torch.tensor([0.0, 1.0, 1.0]))
        >>> round(float(g), 6), round(float(b), 6)
        (2.0, 0.1)
    """
    if not offset:
        tt = (t * t).sum(dim)
        gamma = torch.where(tt > 0, (x * t).sum(dim) / tt.clamp_min(1e-30), x.abs().mean(dim))
        return gamma, torch.zeros_like(gamma)
    tm = t.mean(dim, keepdim=True)
    xm = x.mean(dim, keepdim=True)
    var = ((t - tm) ** 2).mean(dim)
    cov = ((t - tm) * (x - xm)).mean(dim)
    gamma = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), x.abs().mean(dim))
    beta = xm.squeeze(dim) - gamma * tm.squeeze(dim)
    return gamma, beta


def act_value64(aq: ActQuantizer, x: Tensor) -> Tensor:
    """The value a layer sees after ``aq``, computed in float64 (exact for ternary codes)."""
    fn = getattr(aq, "value64", None)
    if fn is not None:
        return fn(x)
    x64 = x.detach().to(torch.float64)
    if aq.bits >= 32:
        return x64
    s = float(aq.scale)
    return quantize_activation(x64, "int", scale=s, qmax=aq.qmax) * s


def kernels64(wq: WeightQuantizer, weight: Tensor) -> list[Tensor]:
    """The layer's kernel(s) in float64 [out, fan_in], built from the same float32 codes,
    scales and offsets the export carries (one per branch; STTN has two)."""
    fn = getattr(wq, "kernels64", None)
    if fn is not None:
        return fn(weight)
    w2d = weight.detach().reshape(weight.shape[0], -1)
    if wq.fmt == "fp32":
        return [w2d.to(torch.float64)]
    codes, scales, gs = wq.encode(w2d)
    full = wq.expand_scales(scales.detach().to(torch.float64), gs, w2d.shape[1])
    w = codes.to(torch.float64) * full
    off = wq.offset(w2d)
    if off is not None:
        w = w + off.to(device=w.device, dtype=torch.float64)[:, None]
    return [w]


class ExactEval:
    """Mixin for the layers of the ternary-activation methods: in eval mode (and not while
    calibrating) the layer is computed in float64 from its own quantizers and cast back.

    Why: the deployed kernel accumulates ternary codes exactly (integers). A float32 fake-quant
    conv differs from it by rounding, and a ternary activation turns such a 1-ulp difference
    near its threshold into a full step, which then propagates (on real data, batches of 64
    Fashion-MNIST images showed logit differences up to 0.05). With exact accumulation the
    evaluated model *is* the deployed one up to float64 rounding. Training stays float32.
    ``exact_eval = False`` gives the plain float32 fake-quant graph.
    """

    exact_eval: bool = True
    wq: WeightQuantizer
    aq: ActQuantizer
    weight: Tensor
    training: bool

    def _use_exact(self) -> bool:
        return self.exact_eval and not self.training and not self.aq.calibrating

    def _exact(self, x: Tensor) -> Tensor:
        xq = act_value64(self.aq, x)
        b0: Tensor | None = getattr(self, "bias", None)
        bias = None if b0 is None else b0.detach().to(torch.float64)
        y: Tensor | None = None
        for i, k in enumerate(kernels64(self.wq, self.weight)):
            b = bias if i == 0 else None
            if isinstance(self, nn.Conv2d):
                yi = F.conv2d(xq, k.reshape(self.weight.shape), b, self.stride, self.padding)
            else:
                yi = F.linear(xq, k, b)
            y = yi if y is None else y + yi
        assert y is not None
        return y.to(x.dtype)


class _ExactForward(ExactEval):
    """``forward`` of the exact layers: the exact path when it applies, else the fake-quant
    layer's own (the next class in the MRO)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._use_exact():
            return super().forward(x)  # type: ignore[misc]
        y = self._exact(x)
        self._record_shapes(x, y)  # type: ignore[attr-defined]
        return y


class ExactConv2d(_ExactForward, QuantConv2d):  # type: ignore[misc]
    """:class:`QuantConv2d` with the exact evaluation path of :class:`ExactEval`."""


class ExactLinear(_ExactForward, QuantLinear):  # type: ignore[misc]
    """:class:`QuantLinear` with the exact evaluation path of :class:`ExactEval`."""


def wrap_layer(
    mod: nn.Module, wq: WeightQuantizer, aq: ActQuantizer, exact_eval: bool = True,
    conv_cls: type[ExactConv2d] | None = None, linear_cls: type[ExactLinear] | None = None,
) -> ExactConv2d | ExactLinear:
    """``mod`` (a conv or linear) as ``conv_cls`` / ``linear_cls`` (default the exact layers)
    with the quantizers ``wq`` and ``aq``."""
    layer: ExactConv2d | ExactLinear
    if isinstance(mod, nn.Conv2d):
        layer = (conv_cls or ExactConv2d)(mod, wq, aq)
    else:
        assert isinstance(mod, nn.Linear)
        layer = (linear_cls or ExactLinear)(mod, wq, aq)
    layer.exact_eval = exact_eval
    return layer


def first_last_layer(
    first_last: str, mod: nn.Module, pos: Position, exact_eval: bool = True
) -> ExactConv2d | ExactLinear | None:
    """The FP32 / 8-8 layer for the first and last conv/linear under ``first_last``; None when
    the method's own quantizers apply."""
    if pos == "middle" or first_last == "same":
        return None
    if first_last == "fp32":
        return wrap_layer(mod, IdentityWeight(), ActQuantizer(32), exact_eval)
    return wrap_layer(mod, Int8ChannelWeight(), ActQuantizer(8), exact_eval)
