"""The export contract: :class:`LayerExport`, the deployable form of one conv/linear layer.

Methods produce it (``QuantizedModel.export()``), ``exports/<key>.npz`` stores it
(:mod:`.export_io`), the schedules build kernels from it, and :mod:`.reference` runs it as integer
arithmetic. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["ActMode", "LayerExport", "WeightFormat", "act_qmax", "ijc_permutation"]

WeightFormat = Literal["ternary", "int8", "fp32"]
ActMode = Literal["fp32", "int", "ternary"]


def act_qmax(bits: int) -> int:
    """Largest code of a symmetric ``bits``-bit activation quantizer: ``2**(bits-1) - 1``."""
    return 2 ** (bits - 1) - 1


def ijc_permutation(in_channels: int, kernel_size: tuple[int, int]) -> np.ndarray:
    """The (C, kh, kw) fan-in indices of a conv listed in (kh, kw, C) order.

    Example:
        >>> ijc_permutation(2, (1, 2)).tolist()
        [0, 2, 1, 3]
    """
    kh, kw = kernel_size
    return np.arange(in_channels * kh * kw).reshape(in_channels, kh, kw).transpose(1, 2, 0).ravel()


@dataclass(frozen=True)
class LayerExport:
    """Deployable form of one conv/linear layer.

    Semantics (``x`` is the layer input, flattened per output position to the fan-in order of
    ``weight.reshape(out, -1)``, i.e. (C, kh, kw) for convs)::

        a   = clamp(round(x / act_scale), -qmax, qmax)          # act_mode == "int"
        acc = sum_{k in group g} a[k] * codes[o, k]             # exact integer
        y_o = act_scale * sum_g scales[o, g] * acc_g + bias[o]

    Group ``g`` holds fan-in indices ``[g*group_size, (g+1)*group_size)`` of the fan-in listed in
    ``group_order``: ``"cij"`` the (C, kh, kw) order above (FGQ's ``flat_fanin`` axis), ``"ijc"``
    a conv's (kh, kw, C) order, so that groups run along the input channels of one kernel tap
    (FGQ's ``cin_contiguous`` axis; ``codes`` stay in (C, kh, kw) order either way, only the
    grouping and the order of ``scales`` follow ``group_order``). When the group size does not
    divide the fan-in the last group is shorter (a kernel may zero-pad it).

    For ``act_mode == "fp32"`` the activation is used as is (``act_scale`` is 1).

    Ternary activations (``act_mode == "ternary"``, RTN/STTN)::

        a   = sign(x) * [|x| > act_threshold]                   # in {-1, 0, +1}
        x_q = act_scale * a + act_offset                        # the value the layer sees
        w   = scales[o, g] * codes[o, k] + weight_offset[o]     # weight_offset None -> 0
        y_o = sum_k x_q[k] * w[o, k] + bias[o]

    Convolution zero-pads ``x_q`` (padded taps contribute nothing, offsets included), exactly as
    the fake-quant graph does.

    Multi-branch layers (residual edges of TRN, TTN-RE's expansion): the layer's output is the
    sum of its branches, all fed the same input. Branch ``j >= 1`` is exported under
    ``f"{name}#{j}"`` with ``branch_of == name`` and no bias; the primary (``name``) has
    ``branch_of == ""``. ``enabled`` False marks an edge switched off at run time.
    """

    name: str
    op: Literal["conv2d", "linear"]
    weight_format: WeightFormat
    codes: np.ndarray  # int8 [out, fan_in]; {-1,0,1} when ternary; float32 when fp32
    scales: np.ndarray  # float32 [out, ceil(fan_in / group_size)]; the last group may be partial
    group_size: int
    bias: np.ndarray | None  # float32 [out]
    act_mode: ActMode
    act_bits: int
    act_scale: float
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    scale_bits: int = 32  # storage precision of ``scales`` (their values are exact in it)
    act_threshold: float = 0.0  # ternary activations only
    act_offset: float = 0.0  # ternary activations only (RTN's beta)
    weight_offset: np.ndarray | None = None  # float32 [out] (RTN's beta_w)
    branch_of: str = ""
    enabled: bool = True
    input_shape: tuple[
        int, ...
    ] = ()  # per-sample input shape seen in calibration: (C, H, W) or (F,)
    output_hw: tuple[int, int] = (1, 1)
    group_order: Literal["cij", "ijc"] = "cij"

    def __post_init__(self) -> None:
        if self.group_order not in ("cij", "ijc"):
            raise ValueError(f"{self.name}: group_order must be 'cij' or 'ijc', "
                             f"got {self.group_order!r}")
        if self.group_order == "ijc" and self.op != "conv2d":
            raise ValueError(f"{self.name}: group_order 'ijc' is for convs, not {self.op}")

    def group_perm(self) -> np.ndarray | None:
        """Fan-in indices in group order (``codes[:, perm]`` is grouped contiguously), or None
        for the (C, kh, kw) order itself.

        Example:
            >>> lx = LayerExport("c", "conv2d", "ternary", np.zeros((1, 8), np.int8),
            ...                  np.ones((1, 2), np.float32), 4, None, "int", 8, 1.0, 2, 1,
            ...                  kernel_size=(2, 2), group_order="ijc")
            >>> lx.group_perm().tolist()  # tap (0,0) of both channels, then tap (0,1), ...
            [0, 4, 1, 5, 2, 6, 3, 7]
        """
        if self.group_order == "cij":
            return None
        return ijc_permutation(self.in_channels, self.kernel_size)

    @property
    def fan_in(self) -> int:
        return int(self.codes.shape[1])

    @property
    def act_qmax(self) -> int:
        return act_qmax(self.act_bits)

    def weight_bits(self) -> int:
        """Storage bits for this layer's weights including scales (bias excluded)."""
        n = self.codes.size
        per = {"ternary": 2, "int8": 8, "fp32": 32}[self.weight_format]
        extra = self.scales.size * self.scale_bits if self.weight_format != "fp32" else 0
        return n * per + extra

    def dequantized_weight(self) -> np.ndarray:
        """float32 [out, fan_in]: codes times their group scale."""
        if self.weight_format == "fp32":
            return self.codes.astype(np.float32)
        g = np.repeat(self.scales, self.group_size, axis=1)[:, : self.fan_in]
        perm = self.group_perm()
        if perm is not None:  # the scale of fan-in index perm[j] is the j-th in group order
            g_cij = np.empty_like(g)
            g_cij[:, perm] = g
            g = g_cij
        return self.codes.astype(np.float32) * g

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def macs_per_sample(self) -> int:
        ho, wo = self.output_hw
        return self.out_channels * self.fan_in * ho * wo
