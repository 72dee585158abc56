"""CUDA schedules: hand-written split-K GEMV and thread-tiled GEMM nests, dlight as fallback.

Same function name as the other target modules (``rules()``). :func:`.measure.select_rule`
has no generic fallback for CUDA (the generic rules are CPU loop nests), so these rules cover
every format a layer can have: ternary weights with int8 / fp32 / ternary activations and dense
int8 / fp32 weights, conv2d and linear, any group size. The TE computes are those of
:mod:`.ops`, unchanged (same packed weights and runtime arguments as on the CPU); only the
schedules differ:

* **split-K** (``M <= GEMV_MAX_M`` rows, e.g. batch-1 linears): a thread block owns ``nb``
  output channels (``threadIdx.x``) of one row (``blockIdx.y``); ``ks`` threads
  (``threadIdx.y``) each reduce an interleaved slice of the reduction (one group: the ``k``
  loop; several groups: whole groups, each finished with its scale in the thread), and a
  cross-thread reduction (``rfactor`` + a reduction loop bound to ``threadIdx.y``, lowered by
  TVM through shared memory) combines the partial sums. Adjacent threads read adjacent bytes of
  the ``[N/nb, K/4, nb]`` packed weights, so a warp's loads are coalesced.
* **tiled** (larger M: convs, batched linears): a thread block computes a ``rows x nb`` output
  tile; thread ``(ty, tx)`` owns ``mb`` rows and ``nb / 32`` adjacent channels, accumulates
  each group in registers and applies the group's scale at once: the CPU nest of
  :func:`.generic.schedule_gemm` with threads instead of parallel/vector loops. With one group,
  the activation and weight tiles of each K step (up to 32 deep; ternary x ternary: 4 words)
  are staged in shared memory by all threads of the block, and a conv's im2col (and zero
  padding) is inlined into that copy (implicit GEMM): it never goes to global memory.
* **stages** that stay kernels of their own (im2col of grouped convs, the ternary activations'
  bit-planes ``A_bits``, the row sums ``asum`` and then ``out`` of weight-offset layers): one
  thread per output element, any reduction serial inside the thread.

``cuda.dlight`` (``tvm.s_tir.dlight``: ``GEMV, Matmul, Reduction, Fallback``) is the last rule
and accepts every layer. TVM 0.27's dlight mis-schedules the single-group epilogue of these
PrimFuncs: ``normalize_prim_func`` drops the unit group loop of ``ep`` but keeps its ``init``,
then ``reverse_compute_inline(out)`` adds ``+ bias`` to both the init and the update (the bias
counted twice). :func:`fold_unit_reductions` rewrites such reductions into plain assignments
first; dlight's ``GEMV`` / ``Matmul`` rules then match single-group layers, ``Fallback`` (one
thread per output, the reduction serial) the others.

TVM keeps the device code as CUDA C in the built module and compiles it (NVRTC by default,
``TVM_CUDA_COMPILE_MODE=nvcc`` for nvcc) when the module is first loaded on a GPU;
:func:`compile_kernel` does that compilation without a GPU.

Checking without a GPU (``docs/cuda.md``): :func:`serial_equivalent` turns a scheduled module
into the same loop nest with every thread-bound loop serial, which builds for the host CPU and
computes what the GPU kernel must compute (thread binding only changes *who* runs an
iteration); :func:`poison_thread_storage` makes each thread's registers start as garbage, as on
a GPU, and :func:`schedule_errors` checks statically what serial execution cannot see (buffers
shared across kernels, blocks bound to no thread). :func:`emulate_layer` runs all of it against
the reference. TVM's GPU lowering (cross-thread reductions, barriers) and the kernels' numbers
on a device are checked by the ``gpu`` tests.

Modules (one job each; every public name is re-exported here, ``ternbench.schedules.cuda.X``):
:mod:`.schedules` (the hand schedules), :mod:`.dlight` (the dlight fallback and its workaround),
:mod:`.emulation` (the no-GPU checks), :mod:`.nvrtc` (compiling without a GPU), :mod:`.bundle`
(the GPU bundle), :mod:`.ruleset` (``rules()``).
"""

from __future__ import annotations

from .bundle import DEFAULT_BUNDLE_ARCH, export_gpu_bundle
from .dlight import fold_unit_reductions, schedule_dlight
from .emulation import (
    emulate_graph,
    emulate_layer,
    poison_thread_storage,
    schedule_errors,
    serial_equivalent,
)
from .nvrtc import (
    compile_kernel,
    compile_module_source,
    compiler_unavailable_reason,
    cuda_toolkit_root,
    ensure_cuda_path,
    kernel_source,
)
from .ruleset import rules
from .schedules import (
    GEMV_DEFAULT,
    GEMV_MAX_M,
    MAX_THREADS,
    SPLITK_THREADS,
    STAGE_K,
    STAGE_K_WORDS,
    STAGE_THREADS,
    TILED_DEFAULT,
    WARP,
    schedule_splitk,
    schedule_t2,
    schedule_tiled,
)

__all__ = [
    "rules",
    "schedule_t2",
    "schedule_splitk",
    "schedule_tiled",
    "schedule_dlight",
    "fold_unit_reductions",
    "serial_equivalent",
    "poison_thread_storage",
    "schedule_errors",
    "emulate_layer",
    "emulate_graph",
    "kernel_source",
    "compile_kernel",
    "compile_module_source",
    "compiler_unavailable_reason",
    "cuda_toolkit_root",
    "ensure_cuda_path",
    "export_gpu_bundle",
    "GEMV_MAX_M",
    # the tile constants and defaults (module attributes of the former single module)
    "GEMV_DEFAULT",
    "TILED_DEFAULT",
    "SPLITK_THREADS",
    "STAGE_THREADS",
    "STAGE_K",
    "STAGE_K_WORDS",
    "WARP",
    "MAX_THREADS",
    "DEFAULT_BUNDLE_ARCH",
]
