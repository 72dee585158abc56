"""FGQ: Ternary Neural Networks with Fine-Grained Quantization (Mellempudi et al., 2017).

Post-training ternarization of a pre-trained FP32 model with one scale per group of N weights
along the reduction (fan-in) axis, and 8-bit activations. Inside a group the N products are
add/sub of 8-bit activations; one multiply by the group scale remains, so 1 - 1/N of the
multiplications go away.

``group_axis`` picks the fan-in order the groups are contiguous in (the spec's two axes, recorded
in every export as ``group_order``):

* ``cin_contiguous`` (default): a conv's (kh, kw, C) order, so a group is N input channels of one
  kernel tap (when N does not divide C a group runs on into the next tap); the deployed kernel's
  im2col then copies whole channel runs;
* ``flat_fanin``: ``weight.reshape(out, -1)`` order, (C, kh, kw): a group is N consecutive taps
  of one channel, running on into the next channel.

Linear layers have one order. When N does not divide the fan-in the last group is shorter.

Example:
    >>> from ternbench.methods import create_method
    >>> create_method("fgq", group_size=16, solver="twn").config.solver
    'twn'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ._base import MethodConfig, QuantContext, QuantizedModel, _check
from ._facts import PaperDelta
from ._ptq import TernaryGroupWeight, post_training_quantize
from ._registry import register_method

PAPER = (
    "Mellempudi et al. 2017, Ternary Neural Networks with Fine-Grained Quantization, "
    "arXiv:1705.01462"
)


#: FGQConfig.group_axis -> LayerExport.group_order
GROUP_ORDER: dict[str, Literal["cij", "ijc"]] = {"cin_contiguous": "ijc", "flat_fanin": "cij"}


@dataclass(frozen=True)
class FGQConfig(MethodConfig):
    """FGQ knobs. ``solver``: ``exact`` (L2-optimal top-k search) or ``twn`` (0.7 mean rule)."""

    group_size: int = 4
    solver: Literal["exact", "twn"] = "exact"
    #: the fan-in order groups are contiguous in (see the module docstring)
    group_axis: Literal["cin_contiguous", "flat_fanin"] = "cin_contiguous"
    #: optional short STE fine-tune after ternarization (epochs over the training subset)
    finetune_epochs: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        _check(
            isinstance(self.group_size, int) and self.group_size >= 1,
            cls,
            "group_size",
            "a positive integer (the paper uses 4, 8, 16, 32, 64)",
            self.group_size,
        )
        _check(self.solver in ("exact", "twn"), cls, "solver", "'exact' or 'twn'", self.solver)
        _check(self.group_axis in GROUP_ORDER, cls, "group_axis",
               "'cin_contiguous' or 'flat_fanin'", self.group_axis)
        _check(self.finetune_epochs >= 0, cls, "finetune_epochs", ">= 0", self.finetune_epochs)


class FGQ:
    name = "fgq"

    def __init__(self, config: FGQConfig) -> None:
        self.config = config

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        cfg = self.config
        return post_training_quantize(
            model,
            ctx,
            cfg,
            self.name,
            lambda: TernaryGroupWeight(cfg.group_size, cfg.solver,
                                       group_order=GROUP_ORDER[cfg.group_axis]),
            finetune_epochs=cfg.finetune_epochs,
        )


@register_method(
    "fgq", config=FGQConfig, paper=PAPER, kind="ptq", default_run=True, whole_model=2,
    ablations={
        "fgq-group-size": {"group_size": (4, 8, 16, 32, 64)},
        "fgq-solver": {"solver": ("exact", "twn")},
        "fgq-group-axis": {"group_axis": ("cin_contiguous", "flat_fanin")},
        "act-bits": {"act_bits": (8, 4)},
        "first-last": {"first_last": ("fp32", "int8", "same")},
        "bn-recalibration": {"bn_recalibrate": (True, False)},
    },
    paper_deltas=(
        PaperDelta("fgq", "resnet50", "imagenet", -4.2, "N=4, 8-bit activations, no retraining "
                   "('within 4.2%')", "Mellempudi et al. 2017, abstract"),
        PaperDelta("fgq", "resnet101", "imagenet", -3.7, "N=4, 8-bit activations, no retraining",
                   "Mellempudi et al. 2017, abstract"),
    ),
)
def fgq(config: MethodConfig) -> FGQ:
    assert isinstance(config, FGQConfig)
    return FGQ(config)
