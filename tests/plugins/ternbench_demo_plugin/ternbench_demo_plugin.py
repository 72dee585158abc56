"""A third-party post-training method, registered only through the ``ternbench.methods``
entry-point group (``ternbench_demo_plugin-0.1.dist-info/entry_points.txt``): nothing in
ternbench names it. ``tests/test_plugin.py`` puts this folder on ``PYTHONPATH`` and runs the
CLI with it.

The method: per-channel TWN-rule ternary weights with a chosen threshold ratio, 8-bit
activations, FP32 first and last layers, through the public post-training flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ternbench.methods import (
    ConfigError,
    MethodConfig,
    PaperDelta,
    QuantContext,
    QuantizedModel,
    TernaryGroupWeight,
    post_training_quantize,
    register_method,
)
from torch import nn

NAME = "demo_ptq"


@dataclass(frozen=True)
class DemoConfig(MethodConfig):
    """``ratio``: the per-channel threshold ``ratio * mean|W_k|``."""

    first_last: Literal["fp32", "int8", "same"] = "fp32"
    ratio: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.ratio < 2:
            raise ConfigError(f"DemoConfig.ratio must be in (0, 2), got {self.ratio!r}")


class DemoPTQ:
    name = NAME

    def __init__(self, config: DemoConfig) -> None:
        self.config = config

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        cfg = self.config
        return post_training_quantize(
            model, ctx, cfg, self.name, lambda: TernaryGroupWeight(None, "twn", ratio=cfg.ratio)
        )


@register_method(
    NAME,
    config=DemoConfig,
    paper="Demo plugin 2026 (tests only)",
    kind="ptq",
    ablations={"demo-ratio": {"ratio": (0.5, 0.7)}},
    paper_deltas=(PaperDelta(NAME, "resnet8", "fashion-mnist", -1.0, "made up", "tests"),),
)
def demo_ptq(config: MethodConfig) -> DemoPTQ:
    assert isinstance(config, DemoConfig)
    return DemoPTQ(config)
