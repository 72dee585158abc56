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
    ConfigError,
    CostSummary,
    LayerExport,
    MethodConfig,
    QuantContext,
    QuantizedModel,
    TernaryMethod,
    config_from_mapping,
    summarize_cost,
)
from ._deploy import deploy, layer_parity, max_logit_diff
from ._layers import swap_layers
from ._registry import (
    ENTRY_POINT_GROUP,
    MethodInfo,
    UnknownMethodError,
    create_method,
    get_method_info,
    list_methods,
    register_method,
)

__all__ = [
    "ConfigError",
    "CostSummary",
    "ENTRY_POINT_GROUP",
    "LayerExport",
    "MethodConfig",
    "MethodInfo",
    "QuantContext",
    "QuantizedModel",
    "TernaryMethod",
    "UnknownMethodError",
    "config_from_mapping",
    "create_method",
    "deploy",
    "get_method_info",
    "layer_parity",
    "list_methods",
    "max_logit_diff",
    "register_method",
    "summarize_cost",
    "swap_layers",
]
