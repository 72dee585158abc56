"""The deployed form run as integer arithmetic: the reference the fake-quant model must match.

:func:`deploy` rebuilds a model whose conv/linear layers compute from :class:`LayerExport` alone
(integer activation codes, integer codes, float group scales), exactly as a kernel does. Integer
accumulations are carried in float64, which is exact for these magnitudes (< 2**53).
"""

from __future__ import annotations

import copy

import torch
from ternbench.core.reference import integer_reference, layer_reference
from torch import Tensor, nn

from ._base import LayerExport, QuantizedModel
from ._layers import QuantLayer, swap_layers

__all__ = [
    "IntegerLayer", "deploy", "integer_reference", "layer_reference", "max_logit_diff",
    "layer_parity",
]


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
