"""Kernel benchmark: ternary TVM kernels vs torch FP32 / INT8 and TVM dense GEMMs, per layer shape.

For each layer shape (ResNet-18 at ImageNet 224, the CIFAR ResNet-20 shapes, the 4608x512
GEMV/GEMM probe shape) and batch, one process measures, interleaved round by round:

* ``tvm_t2_avx2`` (ternary weights, int8 activations) and ``tvm_tt_popc`` (ternary weights and
  activations): the rules the x86 target selects (the generic ones on a CPU without AVX2);
  ``--generic`` adds the portable rules for comparison, ``--metaschedule N`` a MetaSchedule
  baseline (``tvm_metaschedule``, ``N`` trials, cached);
* ``tvm_int8`` / ``tvm_fp32``: blocked dense GEMMs with int8 / fp32 weights, same loop nest;
* ``torch_fp32`` (``F.conv2d`` / ``F.linear``, MKL / oneDNN) and ``torch_int8`` (fbgemm:
  ``torch.ao.nn.quantized.dynamic.Linear`` for linears, which quantizes its float input per
  call; ``torch.ao.nn.quantized.Conv2d`` on a quint8 channels-last input for convs).

Every TVM kernel is checked against the float64 reference of its layer before it is timed (a
mismatch is a failed row, never a time); torch's outputs are compared with a float64 torch run
(``max_abs_err``: int8 rows carry their quantization error). Single-thread DRAM read bandwidth
is measured in the same run; ``roofline_fraction = bytes / time / bandwidth`` with ``bytes``
the data a call must move at least (input, packed weights with scales and bias, output). A
fraction above 1 means the working set was served from the caches, which the benchmark loop
keeps warm.

Writes ``OUT/kernels.csv`` (one row per shape x batch x impl) and ``OUT/kernels.md``.

Example:
    >>> from ternbench.bench import kernels
    >>> [s.name for s in kernels.select_shapes("gemv")]
    ['gemv.4608x512']

Modules (one job each; every public name is re-exported here, ``ternbench.bench.kernels.X``):
:mod:`.shapes` (the shape suites), :mod:`.layers` (synthetic layers), :mod:`.env` (thread pools,
bandwidth, provenance), :mod:`.peaks` (the CPU's instruction peaks per inner recipe),
:mod:`.impls` (the measured implementations), :mod:`.benchmark`
(:func:`run_kernels`), :mod:`.output` (CSV rows and the Markdown summary), :mod:`.ab` (a paired
A/B of one rule built under two settings; a tool run as ``python -m
ternbench.bench.kernels.ab``, not re-exported).
"""

from __future__ import annotations

from .benchmark import QUICK_ROUNDS, QUICK_SAMPLE_S, ROUNDS, SAMPLE_S, KernelsResult, run_kernels
from .env import cap_torch_isa, configure_env, measure_bandwidth
from .impls import loop_timer
from .layers import ACT_MODES, synthetic_layer
from .output import COLUMNS
from .peaks import RECIPES, measure_peaks
from .shapes import (
    SUITES,
    KernelShape,
    bitnet_shapes,
    cifar_shapes,
    gemv_shapes,
    resnet18_shapes,
    select_shapes,
)

__all__ = [
    "SUITES",
    "ACT_MODES",
    "COLUMNS",
    "KernelShape",
    "KernelsResult",
    "resnet18_shapes",
    "cifar_shapes",
    "gemv_shapes",
    "select_shapes",
    "synthetic_layer",
    "configure_env",
    "cap_torch_isa",
    "measure_bandwidth",
    "measure_peaks",
    "RECIPES",
    "run_kernels",
    # also module attributes of the former single module, used by other modules and tests
    "bitnet_shapes",
    "loop_timer",
    "ROUNDS",
    "QUICK_ROUNDS",
    "SAMPLE_S",
    "QUICK_SAMPLE_S",
]
