"""The single doorway to Apache TVM: lazy import, target detection, thread pool, compile.

Nothing here imports ``tvm`` at module import time; the first call to :func:`require_tvm`
does (3-8 s). Every other module of ``ternbench.schedules`` reaches TVM through this one.

Example:
    >>> from ternbench.schedules import _tvm
    >>> _tvm.tvm_version() is None or _tvm.tvm_version().startswith("0.")
    True
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "TESTED_TVM",
    "TargetInfo",
    "require_tvm",
    "tvm_version",
    "host_target_string",
    "target_info",
    "is_x86_host",
    "num_threads",
    "set_num_threads",
    "compile_prim_module",
]

log = logging.getLogger(__name__)

#: the TVM release these schedules were written and checked against (API names changed in 0.27:
#: ``tvm.s_tir.Schedule``, ``get_sblock``, ``tvm.compile``, dict-only targets)
TESTED_TVM = "0.27.0.post1"
_X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})


def tvm_version() -> str | None:
    """Installed ``apache-tvm`` version, read from package metadata (does not import tvm)."""
    for dist in ("apache-tvm", "tvm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.cache
def require_tvm() -> ModuleType:
    """Import and return ``tvm``, or raise an ImportError that says how to get it.

    The runtime thread pool is sized once, when it is created: its upper bound is
    ``TVM_NUM_THREADS`` (default: the *physical* core count, 1 on a 2-vCPU VM) and
    ``runtime.config_threadpool`` can only lower it later. We therefore default the bound to
    the logical CPU count before the import, and pick the real count per measurement with
    :func:`set_num_threads`.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        import tvm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "TVM latency needs Apache TVM: pip install 'apache-tvm=="
            f"{TESTED_TVM}' 'apache-tvm-ffi==0.1.14.post0' (tested with {TESTED_TVM})"
        ) from exc
    if not hasattr(tvm, "s_tir"):  # pragma: no cover - only with an old/new incompatible TVM
        raise ImportError(
            f"ternbench.schedules needs the TVM 0.27 API (tvm.s_tir); found tvm {tvm.__version__}"
        )
    ver = tvm_version()
    if ver is not None and ver != TESTED_TVM:
        log.warning("apache-tvm %s is installed; schedules were tested with %s", ver, TESTED_TVM)
    return tvm


def is_x86_host() -> bool:
    """True when this machine is x86 (the "x86" target measures on the local CPU)."""
    return platform.machine().lower() in _X86_MACHINES


@dataclass(frozen=True)
class TargetInfo:
    """What the schedule rules need to know about a compilation target.

    ``features`` holds the CPU features that were queried from LLVM for this target (only the
    ones some rule gates on), so that an x86 intrinsic never reaches a non-x86 LLVM backend:
    that aborts the whole process instead of raising.
    """

    name: str  # ternbench target name, e.g. "x86"
    target_str: str  # full TVM target (JSON form, re-parseable by tvm.target.Target)
    kind: str  # TVM target kind, e.g. "llvm"
    mcpu: str
    is_x86: bool
    features: frozenset[str]

    def has(self, feature: str) -> bool:
        return feature in self.features

    def target(self) -> Any:
        """The ``tvm.target.Target`` object (built on demand; Targets are not hashable)."""
        return _parse_target(self.target_str)


@functools.cache
def _parse_target(target_str: str) -> Any:
    tvm = require_tvm()
    return tvm.target.Target(target_str)


#: features that rules may gate on (queried once per target)
_GATED_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni")


@functools.cache
def target_info(name: str) -> TargetInfo:
    """Target description for a ternbench target name (only "x86", the local CPU, for now)."""
    if name != "x86":
        raise ValueError(f"unknown target {name!r}; known: ['x86']")
    if not is_x86_host():
        raise RuntimeError(
            f"target 'x86' measures on the local CPU, but this host is {platform.machine()}"
        )
    tvm = require_tvm()
    from tvm.target import codegen

    # "mcpu": "native" is rejected by the wheel's LLVM and silently becomes "generic" (SSE2
    # code), so ask LLVM for the host CPU name. No "num-cores": it only matters for tuning and
    # would make one build per thread count.
    mcpu = str(codegen.llvm_get_system_cpu())
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    feats = frozenset(f for f in _GATED_FEATURES if codegen.llvm_cpu_has_features(f, target))
    info = TargetInfo(name=name, target_str=str(target), kind="llvm", mcpu=mcpu,
                      is_x86=True, features=feats)
    log.info("target %s: %s, features %s", name, info.target_str, sorted(feats))
    return info


def host_target_string() -> str:
    """Full TVM target string of the local CPU, e.g. ``{"kind":"llvm",...,"mcpu":"znver3"}``."""
    return target_info("x86").target_str


def num_threads() -> int:
    """Threads the TVM runtime pool uses for the next parallel call."""
    tvm = require_tvm()
    return int(tvm.get_global_func("runtime.NumThreads")())


def set_num_threads(n: int) -> int:
    """Resize the TVM thread pool to ``n`` threads; returns the count really in use.

    The pool cannot grow past the bound fixed when it was created (``TVM_NUM_THREADS``, see
    :func:`require_tvm`); a larger request is logged and clipped.
    """
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    tvm = require_tvm()
    tvm.get_global_func("runtime.config_threadpool")(0, int(n))  # 0 = default affinity mode
    got = num_threads()
    if got != n:
        log.warning("TVM thread pool gives %d threads, %d requested (TVM_NUM_THREADS=%s)",
                    got, n, os.environ.get("TVM_NUM_THREADS"))
    return got


def compile_prim_module(mod: Any, target: TargetInfo) -> Any:
    """Compile a scheduled IRModule for ``target``; returns the runtime module (``["main"]``)."""
    tvm = require_tvm()
    ex = tvm.compile(mod, target=target.target())
    return ex.jit()
