"""Fake-quant conv/linear layers, weight and activation quantizers, and the module-swap helper.

Every quantized layer is a :class:`QuantConv2d` or :class:`QuantLinear` carrying a weight
quantizer (how codes and scales are derived from the latent FP weight) and an activation
quantizer (how the layer input is rounded). Methods differ only in the quantizers they plug in,
so export, cost and the deployed integer reference are shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from ternbench.core.export import act_qmax, ijc_permutation
from ternbench.core.reference import quantize_activation
from torch import Tensor, nn

from ._base import LayerExport, WeightFormat

__all__ = [
    "WeightQuantizer",
    "IdentityWeight",
    "Int8ChannelWeight",
    "ActQuantizer",
    "QuantLayer",
    "QuantConv2d",
    "QuantLinear",
    "swap_layers",
    "calibrating",
    "passthrough",
    "ste",
    "Position",
]

Position = Literal["first", "middle", "last"]


def ste(x: Tensor, x_hat: Tensor) -> Tensor:
    """Straight-through estimator: forward ``x_hat``, gradient of the identity."""
    return x + (x_hat - x).detach()


class WeightQuantizer(nn.Module):
    """Maps a latent FP weight to (codes, scales, group_size) and back to a fake-quant weight.

    Subclasses implement :meth:`encode`; :meth:`forward` returns ``codes * scales`` with an STE
    so the same object serves post-training methods and QAT.
    """

    fmt: WeightFormat = "ternary"
    scale_bits: int = 32
    #: fan-in order the groups run along (see ``LayerExport.group_order``); ``"ijc"`` takes
    #: effect once a conv layer has set :attr:`kernel_shape`
    group_order: Literal["cij", "ijc"] = "cij"
    #: (C, kh, kw) of the conv this quantizer belongs to (set by :class:`QuantConv2d`)
    kernel_shape: tuple[int, int, int] | None = None

    def encode(self, w2d: Tensor) -> tuple[Tensor, Tensor, int]:
        """``w2d`` [out, fan_in] -> codes [out, fan_in], scales [out, G], group_size.

        ``w2d`` and the codes are in (C, kh, kw) order; the groups (and ``scales``) follow
        :meth:`group_perm`."""
        raise NotImplementedError  # abstract: subclasses define the quantizer

    def group_perm(self, fan_in: int) -> Tensor | None:
        """Fan-in indices in group order, or None for the (C, kh, kw) order itself."""
        if self.group_order == "cij" or self.kernel_shape is None:
            return None
        c, kh, kw = self.kernel_shape
        if c * kh * kw != fan_in:
            raise ValueError(f"kernel_shape {self.kernel_shape} does not match fan-in {fan_in}")
        return torch.from_numpy(ijc_permutation(c, (kh, kw)))

    def export_group_order(self) -> Literal["cij", "ijc"]:
        """The ``LayerExport.group_order`` of this quantizer's layer."""
        return "ijc" if self.kernel_shape is not None and self.group_order == "ijc" else "cij"

    def expand_scales(self, scales: Tensor, gs: int, fan_in: int) -> Tensor:
        """[out, G] group scales -> [out, fan_in] in (C, kh, kw) order."""
        full = scales.repeat_interleave(gs, dim=1)[:, :fan_in]
        perm = self.group_perm(fan_in)
        if perm is None:
            return full
        out = torch.empty_like(full)
        out[:, perm.to(full.device)] = full
        return out

    def branches(self, w2d: Tensor) -> list[tuple[Tensor, Tensor, int, bool]]:
        """Extra additive branches ``(codes, scales, group_size, enabled)`` (TRN's residual
        edges); plain quantizers have none."""
        return []

    def offset(self, w2d: Tensor) -> Tensor | None:
        """Per-output-channel weight offset [out] (RTN's beta_w); ``None`` for symmetric codes."""
        return None

    def dequantize(self, w2d: Tensor) -> Tensor:
        codes, scales, gs = self.encode(w2d)
        return codes.to(w2d.dtype) * self.expand_scales(scales, gs, w2d.shape[1])

    def forward(self, w: Tensor) -> Tensor:
        w2d = w.reshape(w.shape[0], -1)
        return ste(w2d, self.dequantize(w2d)).reshape(w.shape)


class IdentityWeight(WeightQuantizer):
    """FP32 weights (baselines and FP first/last layers)."""

    fmt: WeightFormat = "fp32"

    def encode(self, w2d: Tensor) -> tuple[Tensor, Tensor, int]:
        return w2d, torch.ones(w2d.shape[0], 1, dtype=w2d.dtype, device=w2d.device), w2d.shape[1]

    def forward(self, w: Tensor) -> Tensor:
        return w


class Int8ChannelWeight(WeightQuantizer):
    """Symmetric per-output-channel 8-bit weights: ``s = max|w| / 127``."""

    fmt: WeightFormat = "int8"

    def encode(self, w2d: Tensor) -> tuple[Tensor, Tensor, int]:
        s = w2d.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        codes = torch.clamp(torch.round(w2d.detach() / s), -127, 127)
        return codes, s, w2d.shape[1]


class ActQuantizer(nn.Module):
    """Symmetric per-tensor activation quantizer with a max-abs calibrated step.

    ``bits == 32`` passes the input through. While ``calibrating`` is set (see
    :func:`calibrating`) it records the running max |x| and passes the input through.
    """

    max_abs: Tensor

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits
        self.calibrating = False
        self.passthrough = False  # neither round nor record (BN re-estimation)
        self.register_buffer("max_abs", torch.zeros(()))

    @property
    def qmax(self) -> int:
        return act_qmax(self.bits)

    @property
    def scale(self) -> float:
        if self.bits >= 32:
            return 1.0
        m = float(self.max_abs)
        return m / self.qmax if m > 0 else 1.0

    def export_fields(self) -> dict[str, object]:
        """The activation part of a ``LayerExport`` (ternary quantizers override this)."""
        return {"act_mode": "fp32" if self.bits >= 32 else "int", "act_bits": self.bits,
                "act_scale": float(self.scale)}

    def forward(self, x: Tensor) -> Tensor:
        if self.bits >= 32 or self.passthrough:
            return x
        if self.calibrating:
            self.max_abs = torch.maximum(self.max_abs, x.detach().abs().amax())
            return x
        s = self.scale
        return ste(x, quantize_activation(x, "int", scale=s, qmax=self.qmax) * s)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class QuantLayer:
    """Mixin shared by :class:`QuantConv2d` and :class:`QuantLinear`."""

    wq: WeightQuantizer
    aq: ActQuantizer
    weight: Tensor
    bias: Tensor | None
    seen_input_shape: tuple[int, ...]
    seen_output_hw: tuple[int, int]

    def _record_shapes(self, x: Tensor, y: Tensor) -> None:
        self.seen_input_shape = tuple(int(s) for s in x.shape[1:])
        self.seen_output_hw = (int(y.shape[2]), int(y.shape[3])) if y.dim() == 4 else (1, 1)

    def quantized_weight(self) -> Tensor:
        return self.wq(self.weight)

    def exports(self, name: str) -> list[LayerExport]:
        """All branches of this layer; plain layers have one (see ``LayerExport``)."""
        main = self.export(name)
        w2d = self.weight.detach().reshape(self.weight.shape[0], -1).float().cpu()
        out = [main]
        for j, (codes, scales, gs, enabled) in enumerate(self.wq.branches(w2d), start=1):
            out.append(dataclasses.replace(
                main, name=f"{name}#{j}", codes=codes.numpy().astype(np.int8),
                scales=scales.float().numpy().astype(np.float32), group_size=int(gs), bias=None,
                weight_offset=None, branch_of=name, enabled=bool(enabled),
            ))
        return out

    def export(self, name: str) -> LayerExport:
        w2d = self.weight.detach().reshape(self.weight.shape[0], -1).float().cpu()
        codes, scales, gs = self.wq.encode(w2d)
        fmt = self.wq.fmt
        code_np = codes.numpy().astype(np.float32 if fmt == "fp32" else np.int8)
        is_conv = isinstance(self, nn.Conv2d)
        bias = self.bias
        offset = self.wq.offset(w2d)
        return LayerExport(
            name=name,
            op="conv2d" if is_conv else "linear",
            weight_format=fmt,
            codes=code_np,
            scales=scales.detach().float().cpu().numpy().astype(np.float32),
            group_size=int(gs),
            bias=None if bias is None else bias.detach().float().cpu().numpy(),
            weight_offset=None if offset is None else offset.detach().float().numpy(),
            in_channels=int(self.weight.shape[1]),
            out_channels=int(self.weight.shape[0]),
            kernel_size=tuple(self.kernel_size) if is_conv else (1, 1),  # type: ignore[attr-defined]
            stride=tuple(self.stride) if is_conv else (1, 1),  # type: ignore[attr-defined]
            padding=tuple(self.padding) if is_conv else (0, 0),  # type: ignore[attr-defined]
            scale_bits=self.wq.scale_bits,
            group_order=self.wq.export_group_order(),
            input_shape=getattr(self, "seen_input_shape", ()),
            output_hw=getattr(self, "seen_output_hw", (1, 1)),
            **self.aq.export_fields(),  # type: ignore[arg-type]
        )


class QuantConv2d(nn.Conv2d, QuantLayer):  # type: ignore[misc]
    """``nn.Conv2d`` whose input and weight pass through quantizers."""

    def __init__(self, conv: nn.Conv2d, wq: WeightQuantizer, aq: ActQuantizer) -> None:
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("QuantConv2d supports groups=1, dilation=1, zero padding only")
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            bias=conv.bias is not None,
        )
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)  # type: ignore[union-attr]
        self.wq = wq
        self.aq = aq
        wq.kernel_shape = (conv.in_channels, *conv.kernel_size)  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv_forward(self.aq(x), self.quantized_weight(), self.bias)
        self._record_shapes(x, y)
        return y


class QuantLinear(nn.Linear, QuantLayer):  # type: ignore[misc]
    """``nn.Linear`` whose input and weight pass through quantizers."""

    def __init__(self, lin: nn.Linear, wq: WeightQuantizer, aq: ActQuantizer) -> None:
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None)
        with torch.no_grad():
            self.weight.copy_(lin.weight)
            if lin.bias is not None:
                self.bias.copy_(lin.bias)  # type: ignore[union-attr]
        self.wq = wq
        self.aq = aq

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(self.aq(x), self.quantized_weight(), self.bias)
        self._record_shapes(x, y)
        return y


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def swap_layers(
    model: nn.Module,
    make: Callable[[str, nn.Module, Position], nn.Module | None],
) -> nn.Module:
    """Replace every Conv2d/Linear in ``model`` (in place) by ``make(name, module, position)``.

    ``position`` is ``"first"`` for the first conv/linear in module order, ``"last"`` for the
    last one, else ``"middle"``; ``make`` returning ``None`` keeps the module.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> _ = swap_layers(m, lambda n, mod, pos: None)
    """
    targets = _targets(model)
    for i, (name, mod) in enumerate(targets):
        pos: Position = "first" if i == 0 else "last" if i == len(targets) - 1 else "middle"
        new = make(name, mod, pos)
        if new is None:
            continue
        parent = model
        *path, leaf = name.split(".")
        for p in path:
            parent = getattr(parent, p)
        setattr(parent, leaf, new)
    return model


class calibrating:
    """Context manager: activation quantizers record ranges instead of rounding."""

    def __init__(self, model: nn.Module) -> None:
        self.qs = [m for m in model.modules() if isinstance(m, ActQuantizer)]

    def __enter__(self) -> calibrating:
        for q in self.qs:
            q.calibrating = True
        return self

    def __exit__(self, *exc: object) -> None:
        for q in self.qs:
            q.calibrating = False


class passthrough:
    """Context manager: activation quantizers neither round nor record ranges."""

    def __init__(self, model: nn.Module) -> None:
        self.qs = [m for m in model.modules() if isinstance(m, ActQuantizer)]

    def __enter__(self) -> passthrough:
        for q in self.qs:
            q.passthrough = True
        return self

    def __exit__(self, *exc: object) -> None:
        for q in self.qs:
            q.passthrough = False


def iter_quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for n, m in model.named_modules():
        if isinstance(m, QuantLayer):
            yield n, m
