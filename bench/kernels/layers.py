"""Synthetic layers of a shape (seeded codes and scales): what the kernel benchmark builds,
checks and times."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .shapes import KernelShape

#: activation modes of the ternary layers: int8 codes (``t2``) or ternary codes (``tt``)
ACT_MODES = ("int8", "ternary")
#: the int8 activation scale and the ternary activation quantizer of the synthetic layers
_ACT = {"int8": ("int", 8, 0.05), "ternary": ("ternary", 2, 0.7), "fp32": ("fp32", 32, 1.0)}


# ----------------------------------------------------------------------------- layers


def synthetic_layer(shape: KernelShape, weight_format: str = "ternary", act: str = "int8",
                    seed: int = 0, group_size: int | None = None,
                    group_order: str = "ijc") -> Any:
    """A LayerExport of ``shape`` with seeded codes and per-channel scales (ternary with
    ``group_size``: one scale per group of that many fan-in weights, FGQ style, the last group
    partial when the fan-in is not a multiple, the scales FP16 values as FGQ stores them; a
    conv's groups run along ``group_order``:
    ``ijc`` = FGQ's default ``cin_contiguous`` axis, ``cij`` = ``flat_fanin``).

    ``weight_format``: ``ternary`` (codes in {-1, 0, 1}), ``int8`` or ``fp32`` (the float
    weights ``scale * code`` of the ternary layer of the same seed); ``act``: ``int8`` (8-bit
    codes, scale 0.05), ``ternary`` (threshold 0.5, scale 0.7, no offsets) or ``fp32``.
    """
    from ternbench.core.export import LayerExport

    if act not in _ACT:
        raise ValueError(f"act must be one of {sorted(_ACT)}, got {act!r}")
    rng = np.random.default_rng(seed)
    n, k = shape.cout, shape.fan_in
    tern = rng.integers(-1, 2, (n, k)).astype(np.int8)
    scales = (rng.random((n, 1)) * 0.5 + 0.5).astype(np.float32) / math.sqrt(k)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    gs = k
    extra_scale: dict[str, int] = {}
    if weight_format == "ternary":
        codes: np.ndarray = tern
        if group_size is not None:
            gs = int(group_size)
            scales = (rng.random((n, -(-k // gs))) * 0.5 + 0.5).astype(np.float32) / math.sqrt(k)
            # FP16 values, as FGQ stores them (``TernaryGroupWeight.scale_bits``)
            scales = scales.astype(np.float16).astype(np.float32)
            extra_scale = {"scale_bits": 16}
    elif weight_format == "int8":
        codes = rng.integers(-127, 128, (n, k)).astype(np.int8)
        scales = scales / 127
    elif weight_format == "fp32":
        codes, scales = (tern * scales).astype(np.float32), np.ones((n, 1), np.float32)
    else:
        raise ValueError(f"weight_format must be ternary, int8 or fp32, got {weight_format!r}")
    mode, bits, act_scale = _ACT[act]
    extra = {"act_threshold": 0.5} if act == "ternary" else {}
    conv = shape.op == "conv2d"
    return LayerExport(
        name=f"{shape.name}[{weight_format},{act}]", op=shape.op, weight_format=weight_format,  # type: ignore[arg-type]
        codes=codes, scales=scales, group_size=gs, bias=bias, act_mode=mode,  # type: ignore[arg-type]
        group_order=group_order if conv and gs < k else "cij",  # type: ignore[arg-type]
        act_bits=bits, act_scale=act_scale, in_channels=shape.cin, out_channels=n,
        kernel_size=(shape.k, shape.k), stride=(shape.stride, shape.stride),
        padding=(shape.pad, shape.pad),
        input_shape=(shape.cin, *shape.hw) if conv else (shape.cin,),
        output_hw=shape.out_hw, **extra, **extra_scale)  # type: ignore[arg-type]
