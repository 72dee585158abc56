"""Baselines: FP32, INT8 (8-bit weights and activations) and TWN (Li & Liu 2016).

Example:
    >>> from ternbench.methods import create_method
    >>> create_method("twn").config.ratio
    0.7
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ._base import MethodConfig, QuantContext, QuantizedModel, _check
from ._facts import PaperNumber
from ._flow import quantize_flow
from ._layers import IdentityWeight, Int8ChannelWeight
from ._ptq import TernaryGroupWeight, make_layer, post_training_quantize
from ._registry import register_method


@dataclass(frozen=True)
class FP32Config(MethodConfig):
    """The unquantized reference; every layer is FP32."""

    act_bits: int = 32
    first_last: Literal["fp32", "int8", "same"] = "same"
    bn_recalibrate: bool = False

    allowed_act_bits = (32,)


class FP32:
    name = "fp32"

    def __init__(self, config: FP32Config) -> None:
        self.config = config

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        # FP32 layers; the calibration pass records the layer shapes for the export
        return quantize_flow(model, ctx, self.config, self.name,
                             lambda n, mod, pos: make_layer(mod, IdentityWeight(), 32))


@dataclass(frozen=True)
class Int8Config(MethodConfig):
    """8-8: per-output-channel symmetric int8 weights, per-tensor int8 activations, all layers."""

    first_last: Literal["fp32", "int8", "same"] = "same"
    bn_recalibrate: bool = False

    allowed_act_bits = (8,)


class Int8:
    name = "int8"

    def __init__(self, config: Int8Config) -> None:
        self.config = config

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        return post_training_quantize(model, ctx, self.config, self.name, Int8ChannelWeight)


@dataclass(frozen=True)
class TWNConfig(MethodConfig):
    """TWN rule ``delta = ratio * mean|W|``, ``alpha = mean{|W| > delta}``.

    The paper keeps activations in floating point and uses one (delta, alpha) per layer
    (``granularity="tensor"``); the official detection code uses per-channel with ratio 0.75.
    """

    act_bits: int = 32
    first_last: Literal["fp32", "int8", "same"] = "fp32"
    ratio: float = 0.7
    granularity: Literal["tensor", "channel"] = "tensor"
    finetune_epochs: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        _check(0 < self.ratio < 2, cls, "ratio", "in (0, 2)", self.ratio)
        _check(
            self.granularity in ("tensor", "channel"),
            cls,
            "granularity",
            "'tensor' or 'channel'",
            self.granularity,
        )
        _check(self.finetune_epochs >= 0, cls, "finetune_epochs", ">= 0", self.finetune_epochs)


class TWN:
    name = "twn"

    def __init__(self, config: TWNConfig) -> None:
        self.config = config

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        cfg = self.config

        def wq() -> TernaryGroupWeight:
            return TernaryGroupWeight(None, "twn", cfg.granularity == "tensor", cfg.ratio)

        return post_training_quantize(model, ctx, cfg, self.name, wq, cfg.finetune_epochs)


@register_method("fp32", config=FP32Config, paper="FP32 reference", kind="baseline",
                 reference=True, order=0, default_run=True)
def fp32(config: MethodConfig) -> FP32:
    assert isinstance(config, FP32Config)
    return FP32(config)


@register_method(
    "int8", config=Int8Config, paper="8-bit weights and activations (8-8)", kind="baseline",
    order=1, default_run=True,
)
def int8(config: MethodConfig) -> Int8:
    assert isinstance(config, Int8Config)
    return Int8(config)


@register_method(
    "twn",
    config=TWNConfig,
    paper="Li & Liu 2016, Ternary Weight Networks, arXiv:1605.04711",
    kind="ptq",
    order=2,
    default_run=True,
    whole_model=3,
    ablations={"bn-recalibration": {"bn_recalibrate": (True, False)}},
    paper_numbers=(
        PaperNumber("twn", "resnet18", "imagenet", 61.8, 65.4, "ResNet-18B, trained (not PTQ)",
                    "Li & Liu 2016, v1 tables (unverified)"),
    ),
)
def twn(config: MethodConfig) -> TWN:
    assert isinstance(config, TWNConfig)
    return TWN(config)
