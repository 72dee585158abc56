"""The deployed form run as integer arithmetic: the reference the fake-quant model must match.

:func:`deploy` rebuilds a model whose conv/linear layers compute from :class:`LayerExport` alone
(integer activation codes, integer codes, float group scales), exactly as a kernel does. Integer
accumulations are carried in float64, which is exact for these magnitudes (< 2**53).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import LayerExport, QuantizedModel
from ._layers import QuantLayer, swap_layers

__all__ = [
    "IntegerLayer", "deploy", "integer_reference", "layer_reference", "max_logit_diff",
    "layer_parity",
]


def _quantize_input(lx: LayerExport, x: Tensor) -> Tensor:
    """Integer activation codes (or the float input for ``act_mode == "fp32"``).

    The rounding is done in the input's own dtype, as the fake-quant graph does it, so both see
    the same codes for the same input (a float64 division could round a near-tie differently).
    """
    if lx.act_mode == "fp32":
        return x.to(torch.float64)
    if lx.act_mode == "ternary":
        return (torch.sign(x) * (x.abs() > lx.act_threshold)).to(torch.float64)
    q = lx.act_qmax
    return torch.clamp(torch.round(x / lx.act_scale), -q, q).to(torch.float64)


def _with_offsets(lx: LayerExport, a: Tensor) -> Tensor:
    """Float64 path for affine (offset) activations or weights: conv of the dequantized values."""
    xq = a * lx.act_scale + lx.act_offset
    w = torch.from_numpy(lx.dequantized_weight()).to(torch.float64)
    if lx.weight_offset is not None:
        w = w + torch.from_numpy(lx.weight_offset).to(torch.float64)[:, None]
    b = None if lx.bias is None else torch.from_numpy(lx.bias).to(torch.float64)
    if lx.op == "conv2d":
        w4 = w.reshape(lx.out_channels, lx.in_channels, *lx.kernel_size)
        return F.conv2d(xq, w4, b, stride=lx.stride, padding=lx.padding)
    return F.linear(xq, w, b)


def integer_reference(lx: LayerExport, a: Tensor) -> Tensor:
    """Layer output (float64, NCHW / [B, N]) from activation codes ``a`` (NCHW / [B, F]).

    ``act_scale * sum_g scales[o, g] * acc_g + bias``: each group's ``acc_g`` is an integer
    accumulation done in float64 (exact far below 2**53), through F.conv2d / F.linear for one
    group and through F.unfold + einsum, chunked to ~32 MiB, for many (FGQ N=4 on a ResNet-18
    layer has >1000 groups). Affine (offset) activations or weights use the dequantized values.
    This is the one reference for the deployed form: the TVM kernels are checked against it.
    """
    a = a.to(torch.float64)
    if lx.act_offset != 0.0 or lx.weight_offset is not None:
        return _with_offsets(lx, a)
    n, k = lx.out_channels, lx.fan_in
    codes = torch.from_numpy(np.asarray(lx.codes, dtype=np.float64))
    if lx.weight_format == "fp32":
        g, gs, scales = 1, k, torch.ones(n, 1, dtype=torch.float64)
    else:
        gs, g = int(lx.group_size), lx.n_groups
        scales = torch.from_numpy(np.asarray(lx.scales, dtype=np.float64))
        if g == 1:
            gs = k
    act_scale = 1.0 if lx.act_mode == "fp32" else float(lx.act_scale)
    kg = g * gs
    if lx.op == "linear":
        if g == 1:
            y = F.linear(a, codes) * scales[:, 0]
        else:
            w_g = F.pad(codes, (0, kg - k)).reshape(n, g, gs)
            acc = torch.einsum("bgk,ogk->bog", F.pad(a, (0, kg - k)).reshape(-1, g, gs), w_g)
            y = (acc * scales).sum(-1)
    else:
        kh, kw = lx.kernel_size
        if g == 1:
            y = F.conv2d(a, codes.reshape(n, lx.in_channels, kh, kw), stride=lx.stride,
                         padding=lx.padding) * scales[:, 0, None, None]
        else:
            ho = (a.shape[2] + 2 * lx.padding[0] - kh) // lx.stride[0] + 1
            wo = (a.shape[3] + 2 * lx.padding[1] - kw) // lx.stride[1] + 1
            cols = F.unfold(a, (kh, kw), padding=lx.padding, stride=lx.stride)  # [B, K, L]
            cols = F.pad(cols.transpose(1, 2), (0, kg - k)).reshape(-1, g, gs)  # K: (C, kh, kw)
            w_g = F.pad(codes, (0, kg - k)).reshape(n, g, gs)
            flat = torch.zeros(cols.shape[0], n, dtype=torch.float64)
            step = max(1, (4 << 20) // max(1, cols.shape[0] * n))
            for g0 in range(0, g, step):
                part = torch.einsum("mgk,ngk->mng", cols[:, g0:g0 + step], w_g[:, g0:g0 + step])
                flat += (part * scales[:, g0:g0 + step]).sum(-1)
            y = flat.reshape(a.shape[0], ho, wo, n).permute(0, 3, 1, 2)
    y = y * act_scale
    if lx.bias is not None:
        b = torch.from_numpy(np.asarray(lx.bias, dtype=np.float64))
        y = y + (b[None, :, None, None] if lx.op == "conv2d" else b[None])
    return y


def layer_reference(lx: LayerExport, x: Tensor) -> Tensor:
    """Output of layer ``lx`` on float input ``x`` (NCHW or NF), computed from the export."""
    return integer_reference(lx, _quantize_input(lx, x))


class IntegerLayer(nn.Module):
    """A conv/linear computed from its export only: the sum of its enabled branches (float64
    inside, float32 out)."""

    def __init__(self, lx: LayerExport, branches: list[LayerExport] | None = None) -> None:
        super().__init__()
        self.lx = lx
        self.branches = list(branches or [])

    def forward(self, x: Tensor) -> Tensor:
        y = layer_reference(self.lx, x)
        for b in self.branches:
            if b.enabled:
                y = y + layer_reference(b, x)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.lx.op} {self.lx.weight_format} groups={self.lx.n_groups} "
                f"branches={1 + len(self.branches)}")


def deploy(qm: QuantizedModel) -> nn.Module:
    """A copy of ``qm.module`` whose quantized layers are :class:`IntegerLayer` from the export."""
    exports = qm.export(include_disabled=True)
    m = copy.deepcopy(qm.module).eval()

    def make(name: str, mod: nn.Module, pos: str) -> nn.Module | None:
        if not isinstance(mod, QuantLayer):
            return None
        branches = [lx for lx in exports.values() if lx.branch_of == name]
        return IntegerLayer(exports[name], branches)

    return swap_layers(m, make)  # type: ignore[arg-type]


@torch.no_grad()
def max_logit_diff(qm: QuantizedModel, x: Tensor) -> float:
    """max |logits(fake-quant) - logits(deployed)| on ``x``."""
    qm.module.eval()
    ref = qm.module(x)
    dep = deploy(qm)(x)
    return float((ref - dep).abs().max())


@torch.no_grad()
def layer_parity(qm: QuantizedModel, x: Tensor) -> float:
    """Largest relative error of any deployed layer fed exactly the fake-quant layer's input.

    End to end, a float32 graph and an integer one drift apart by rounding flips of near-tie
    activations, which then propagate; layer by layer, on the same input, they must agree to
    float precision. Relative to the layer output's max |y|.
    """
    exports = qm.export(include_disabled=True)
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = []
    for name, mod in qm.module.named_modules():
        if isinstance(mod, QuantLayer):
            def hook(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
                seen[name] = (inp[0].detach(), out.detach())

            hooks.append(mod.register_forward_hook(hook))  # type: ignore[attr-defined]
    try:
        qm.module.eval()
        qm.module(x)
    finally:
        for h in hooks:
            h.remove()
    worst = 0.0
    for name, (inp, out) in seen.items():
        layer = IntegerLayer(exports[name], [lx for lx in exports.values() if lx.branch_of == name])
        dep = layer(inp)
        scale = float(out.abs().max()) or 1.0
        worst = max(worst, float((dep - out).abs().max()) / scale)
    return worst
