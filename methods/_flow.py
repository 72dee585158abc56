"""The one quantize flow every method runs, with hooks for what differs between methods.

:func:`quantize_flow` does the common steps in this order:

1. deep-copy the FP32 model (the caller's stays untouched) and move it to ``ctx.device``;
2. swap every conv/linear for the method's fake-quant layer (``make``);
3. ``prepare``: BatchNorm re-estimation and activation calibration (post-training methods:
   :func:`ternbench.methods._ptq.ptq_prepare`; training-time methods calibrate only, or do
   their own, e.g. RTN's threshold fit);
4. ``train``: QAT (:class:`ternbench.methods._qat.QATTraining`) or a post-training method's
   optional fine-tune (:class:`ternbench.methods._ptq.Finetune`); None trains nothing;
5. ``finish``: anything after training (BatchNorm re-estimated with the trained weights);
6. return the eval-mode :class:`QuantizedModel` with the :class:`QuantInfo` the steps recorded.

Each hook returns the :class:`QuantInfo` entries it contributes; one set of keys for all.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ._base import MethodConfig, QuantContext, QuantInfo, QuantizedModel
from ._layers import Position, calibrating, swap_layers

__all__ = [
    "Step",
    "TrainStep",
    "quantize_flow",
    "calibrate",
    "calibrate_activations",
    "recalibrate_bn",
    "bn_loader",
]

#: a flow hook: works on the swapped model in place, returns the info entries it records
Step = Callable[[nn.Module, QuantContext], QuantInfo]
#: the training hook also gets the caller's FP32 model (the KD teacher)
TrainStep = Callable[[nn.Module, QuantContext, nn.Module], QuantInfo]
LayerFactory = Callable[[str, nn.Module, Position], nn.Module | None]


def quantize_flow(
    model: nn.Module,
    ctx: QuantContext,
    cfg: MethodConfig,
    method: str,
    make: LayerFactory,
    *,
    prepare: Step | None = None,
    train: TrainStep | None = None,
    finish: Step | None = None,
) -> QuantizedModel:
    """Copy ``model``, swap its layers with ``make``, then run ``prepare`` (default:
    :func:`calibrate`), ``train`` and ``finish``; see the module docstring."""
    m = copy.deepcopy(model).to(ctx.device).eval()
    swap_layers(m, make)
    m.to(ctx.device)  # after the swap: the new layers are built on the CPU
    info = QuantInfo(bn_recalibrated=False)
    info.update((prepare or calibrate)(m, ctx))
    if train is not None:
        info.update(train(m, ctx, model))
        m.eval()
    if finish is not None:
        info.update(finish(m, ctx))
    return QuantizedModel(module=m.eval(), method=method, config=cfg, info=info)


@torch.no_grad()
def calibrate_activations(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: str = "cpu"
) -> int:
    """Record activation ranges (and the layer shapes the export needs) on ``loader``; returns
    the number of samples seen."""
    model.eval()
    n = 0
    with calibrating(model):
        for x, _ in loader:
            model(x.to(device))
            n += int(x.shape[0])
    return n


def calibrate(m: nn.Module, ctx: QuantContext) -> QuantInfo:
    """The default ``prepare``: activation ranges on the calibration set, nothing else."""
    return QuantInfo(calib_samples=calibrate_activations(m, ctx.calib_loader, ctx.device))


def bn_loader(ctx: QuantContext) -> Iterable[tuple[Tensor, Tensor]]:
    """Where BatchNorm statistics are re-estimated: the training loader, else calibration's."""
    return ctx.train_loader if ctx.train_loader is not None else ctx.calib_loader


def recalibrate_bn(m: nn.Module, ctx: QuantContext) -> int:
    """Re-estimate ``m``'s BatchNorm statistics on ``ctx.bn_batches`` batches of
    :func:`bn_loader` with the quantizers as they are (callers choose: ``passthrough``,
    ``calibrating`` or active); returns the batches used."""
    from ternbench.core.train import recalibrate_bn as _recal

    return _recal(m, bn_loader(ctx), batches=ctx.bn_batches, device=ctx.device)
