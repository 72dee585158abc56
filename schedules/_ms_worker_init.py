"""Initializer of MetaSchedule's builder workers (picklable by reference: a module-level function).

MetaSchedule's ``default_build`` runs ``import tvm.s_tir.tensor_intrin``, which parses ~500
TVMScript functions, each calling ``inspect.stack()``: 54-180 s per fresh worker on a small VM,
longer than any sane builder timeout, so *every* trial failed with "LocalBuilder: Timeout"
(``shared/notes/tvm.md`` §3). The workloads tuned here use no tensor intrinsic (the llvm rules
only tensorize with VNNI / AVX-512 ones), so the package is replaced by an empty module inside
the worker. Never call this in the main process: it would hide TVM's built-in intrinsics there.
"""

from __future__ import annotations

import sys
import types

__all__ = ["skip_tensor_intrin", "STUB_NAME"]

STUB_NAME = "tvm.s_tir.tensor_intrin"


def skip_tensor_intrin() -> None:
    """Register an empty ``tvm.s_tir.tensor_intrin`` module (no-op when it is already loaded)."""
    sys.modules.setdefault(STUB_NAME, types.ModuleType(STUB_NAME))
