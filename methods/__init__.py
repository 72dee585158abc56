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
    summarize_cost,
)
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
    "create_method",
    "get_method_info",
    "list_methods",
    "register_method",
    "summarize_cost",
]
