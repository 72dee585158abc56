"""Ternary quantization methods behind one registry and one interface.

Example:
    >>> from ternbench.methods import create_method, list_methods
    >>> "fgq" in list_methods()
    True
    >>> m = create_method("fgq", group_size=4)
    >>> m.config.group_size
    4
"""

from __future__ import annotations

from ._base import (
    ROW_COUNTS,
    ConfigError,
    CostSummary,
    LayerExport,
    MethodConfig,
    QuantContext,
    QuantInfo,
    QuantizedModel,
    TernaryMethod,
    config_from_mapping,
    summarize_cost,
)
from ._deploy import deploy, layer_parity, max_logit_diff
from ._facts import PaperDelta, PaperNumber
from ._flow import quantize_flow
from ._layers import swap_layers
from ._ptq import TernaryGroupWeight, post_training_quantize
from ._qat import QATMethodConfig, qat_quantize
from ._registry import (
    ENTRY_POINT_GROUP,
    MethodInfo,
    UnknownMethodError,
    ablations,
    create_method,
    default_methods,
    get_method_info,
    list_methods,
    paper_deltas,
    paper_numbers,
    reference_method,
    register_method,
    whole_model_methods,
)

__all__ = [
    "ConfigError",
    "CostSummary",
    "ENTRY_POINT_GROUP",
    "LayerExport",
    "MethodConfig",
    "MethodInfo",
    "PaperDelta",
    "PaperNumber",
    "QATMethodConfig",
    "QuantContext",
    "QuantInfo",
    "QuantizedModel",
    "ROW_COUNTS",
    "TernaryGroupWeight",
    "TernaryMethod",
    "UnknownMethodError",
    "ablations",
    "config_from_mapping",
    "create_method",
    "default_methods",
    "deploy",
    "get_method_info",
    "layer_parity",
    "list_methods",
    "max_logit_diff",
    "paper_deltas",
    "paper_numbers",
    "post_training_quantize",
    "qat_quantize",
    "quantize_flow",
    "reference_method",
    "register_method",
    "summarize_cost",
    "swap_layers",
    "whole_model_methods",
]
