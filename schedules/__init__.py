"""ternbench.schedules: TVM kernels and per-layer latency of exported layers.

The only package of ternbench that uses Apache TVM, and it imports it lazily: importing
``ternbench.schedules`` is cheap; the first build or measurement imports tvm (3-8 s). The
target, thread-pool and version helpers other packages need (``target_info``,
``set_num_threads``, ``force_isa``, ...) are exported here; ``_tvm`` itself stays private.

Example:
    >>> from ternbench.schedules import EvaluatorCfg, list_targets
    >>> "x86" in list_targets() or list_targets() == []
    True
"""

from __future__ import annotations

from ._tvm import (
    ISA_ENV,
    KNOWN_TARGETS,
    TargetInfo,
    cuda_arch,
    force_isa,
    forced_isa,
    host_target_string,
    num_threads,
    require_tvm,
    set_num_threads,
    target_info,
    tvm_version,
    x86_target_at,
)
from .measure import (
    EvaluatorCfg,
    KernelMismatchError,
    LayerCheck,
    LayerLatency,
    PreparedKernel,
    UnsupportedLayerError,
    build_layer,
    check_layer,
    list_targets,
    measure_layer,
    measure_torch_fp32,
    prepare_kernel,
    run_layer,
    time_kernel,
)

__all__ = [
    "EvaluatorCfg",
    "ISA_ENV",
    "KNOWN_TARGETS",
    "KernelMismatchError",
    "LayerCheck",
    "LayerLatency",
    "PreparedKernel",
    "TargetInfo",
    "build_layer",
    "check_layer",
    "cuda_arch",
    "force_isa",
    "forced_isa",
    "UnsupportedLayerError",
    "host_target_string",
    "list_targets",
    "measure_layer",
    "measure_torch_fp32",
    "num_threads",
    "prepare_kernel",
    "require_tvm",
    "run_layer",
    "set_num_threads",
    "target_info",
    "time_kernel",
    "tvm_version",
    "x86_target_at",
]
