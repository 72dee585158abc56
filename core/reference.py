"""Integer semantics of :class:`~.export.LayerExport`: the activation quantizer and the
float64 reference every kernel is checked against (torch).

:func:`quantize_activation` is the one activation rule of ternbench: the fake-quant layers
(``methods``), the deployed reference (:func:`layer_reference`) and the kernel inputs of the
schedules all call it, each in the dtype it computes in.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .export import LayerExport

__all__ = ["export_activation", "integer_reference", "layer_reference", "quantize_activation"]


def quantize_activation(x: Tensor, mode: str, *, scale: float = 1.0, qmax: int = 127,
                        threshold: float | Tensor = 0.0) -> Tensor:
    """Activation codes of ``x``, computed in ``x``'s own dtype (the ``LayerExport`` rule):

    * ``"int"``: ``clamp(round(x / scale), -qmax, qmax)`` (half to even);
    * ``"ternary"``: ``sign(x) * [|x| > threshold]`` in {-1, 0, +1};
    * ``"fp32"``: ``x`` unchanged.

    The dtype matters: a float32 and a float64 division can round a near-tie differently, so
    every caller quantizes in the dtype its counterpart does.

    Example:
        >>> quantize_activation(torch.tensor([-2.6, 0.5, 1.5, 9.0]), "int", scale=1.0,
        ...                     qmax=7).tolist()
        [-3.0, 0.0, 2.0, 7.0]
        >>> quantize_activation(torch.tensor([-1.0, 0.2, 0.7]), "ternary", threshold=0.5).tolist()
        [-1.0, 0.0, 1.0]
    """
    if mode == "fp32":
        return x
    if mode == "ternary":
        return torch.sign(x) * (x.abs() > threshold)
    if mode != "int":
        raise ValueError(f"unknown activation mode {mode!r}")
    return torch.clamp(torch.round(x / scale), -qmax, qmax)


def export_activation(lx: LayerExport, x: Tensor) -> Tensor:
    """:func:`quantize_activation` with the quantizer of ``lx`` (in ``x``'s dtype)."""
    return quantize_activation(x, lx.act_mode, scale=lx.act_scale, qmax=lx.act_qmax,
                               threshold=lx.act_threshold)


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
    order = lx.group_perm() if g > 1 else None
    perm = None if order is None else torch.from_numpy(order)
    if perm is not None:
        codes = codes[:, perm]  # group order (the im2col columns below are permuted alike)
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
            cols = cols.transpose(1, 2)  # K: (C, kh, kw)
            if perm is not None:
                cols = cols[:, :, perm]
            cols = F.pad(cols, (0, kg - k)).reshape(-1, g, gs)
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
    """Output of layer ``lx`` on float input ``x`` (NCHW or NF), computed from the export.

    The activation codes are rounded in ``x``'s own dtype, as the fake-quant graph rounds them,
    so both see the same codes for the same input.
    """
    return integer_reference(lx, export_activation(lx, x).to(torch.float64))
