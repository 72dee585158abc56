"""ternbench.schedules: TVM kernels and per-layer latency of exported layers.

The only package of ternbench that uses Apache TVM, and it imports it lazily: importing
``ternbench.schedules`` is cheap; the first build or measurement imports tvm (3-8 s).

Example:
    >>> from ternbench.schedules import EvaluatorCfg, list_targets
    >>> "x86" in list_targets() or list_targets() == []
    True
"""

from __future__ import annotations

from ._tvm import host_target_string, tvm_version
from .measure import (
    EvaluatorCfg,
    KernelMismatchError,
    LayerCheck,
    LayerLatency,
    UnsupportedLayerError,
    build_layer,
    check_layer,
    list_targets,
    measure_layer,
    measure_torch_fp32,
    run_layer,
)

__all__ = [
    "EvaluatorCfg",
    "KernelMismatchError",
    "LayerCheck",
    "LayerLatency",
    "build_layer",
    "check_layer",
    "UnsupportedLayerError",
    "host_target_string",
    "list_targets",
    "measure_layer",
    "measure_torch_fp32",
    "run_layer",
    "tvm_version",
]
