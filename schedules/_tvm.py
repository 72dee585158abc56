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
import json
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
    "build_target",
    "KNOWN_TARGETS",
    "ARM_TARGETS",
    "cuda_arch",
    "ISA_LEVELS",
    "ISA_ENV",
    "isa_of",
    "forced_isa",
    "force_isa",
    "x86_target_at",
    "host_isa_levels",
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
    enable_amx()
    return tvm


@functools.cache
def enable_amx() -> bool:
    """Ask Linux for this process's AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``, Linux >= 5.16) where the CPU has AMX; returns whether it is granted.
    An AMX instruction without it kills the process (SIGILL), so the AMX rules (``t2_amx``,
    ``tt_amx``, ``bf16_amx``) need this to hold; :func:`require_tvm` asks once per process,
    before any kernel runs.

    Example:
        >>> enable_amx()  # doctest: +SKIP
        True
    """
    if platform.system() != "Linux" or not is_x86_host():
        return False
    from .artifact import host_cpu_features  # /proc/cpuinfo flags, normalised ("amxtile")

    if "amxtile" not in (host_cpu_features() or ()):
        return False
    import ctypes

    arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18  # x86-64 syscall number, constants
    granted = ctypes.CDLL(None, use_errno=True).syscall(arch_prctl, req_xcomp_perm, xtiledata) == 0
    log.info("AMX tile state %s", "granted" if granted else "refused by the kernel")
    return bool(granted)


def is_x86_host() -> bool:
    """True when this machine is x86 (the "x86" target measures on the local CPU)."""
    return platform.machine().lower() in _X86_MACHINES


@dataclass(frozen=True)
class TargetInfo:
    """What the schedule rules need to know about a compilation target.

    ``features`` holds the CPU features of the target that some rule gates on (x86: queried
    from LLVM for the host CPU; ARM: from the target's ``mattr``), so that an intrinsic never
    reaches the wrong LLVM backend: that aborts the whole process instead of raising.

    ``family`` is ``"x86"``, ``"arm"`` or ``"cuda"``; ``local`` says whether kernels built for
    this target can run in this process (x86 on an x86 host, CUDA with a visible GPU); ARM
    kernels are cross-compiled and checked under qemu-user or timed on a board over RPC.
    """

    name: str  # ternbench target name, e.g. "x86", "arm", "arm-sve", "cuda"
    target_str: str  # full TVM target (JSON form, re-parseable by tvm.target.Target)
    kind: str  # TVM target kind, e.g. "llvm", "cuda"
    mcpu: str  # LLVM CPU (or the CUDA arch, e.g. "sm_90")
    is_x86: bool
    features: frozenset[str]
    family: str = "x86"
    local: bool = True
    description: str = ""
    #: x86: the ISA level the rules see (``avx512``, ``avx2`` or ``generic``; lower than the
    #: CPU's own when forced with ``--isa``/``TERNBENCH_ISA``); recorded in every latency row
    isa: str = ""

    def has(self, feature: str) -> bool:
        return feature in self.features

    def target(self) -> Any:
        """The ``tvm.target.Target`` object (built on demand; Targets are not hashable)."""
        return _parse_target(self.target_str)


@functools.cache
def _parse_target(target_str: str) -> Any:
    tvm = require_tvm()
    return tvm.target.Target(target_str)


#: features that x86 rules may gate on (queried once per target)
_GATED_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni",
                   "avxvnni", "avx512vpopcntdq", "avx512bitalg", "avx512vbmi", "amx-tile",
                   "amx-int8", "amx-bf16")

#: x86 ISA levels, lowest first, with the LLVM features each one switches off on the host CPU
#: (LLVM also drops every feature that needs a disabled one: ``-avx512f`` takes VNNI and
#: VPOPCNTDQ with it, ``-amx-tile`` AMX-INT8 and AMX-BF16). Forcing a lower level gives one
#: machine several rule sets to measure, and lets the AVX2 tests run on an AVX-512 CPU;
#: ``avx512`` on an AMX CPU is what an AVX-512 CPU without AMX (AMD znver4) runs.
ISA_LEVELS: dict[str, tuple[str, ...]] = {
    "generic": ("-avx", "-amx-tile"),
    "avx2": ("-avx512f", "-avxvnni", "-amx-tile"),
    "avx512": ("-amx-tile",),
    "amx": (),
}
#: environment variable that forces an ISA level (what ``--isa`` sets)
ISA_ENV = "TERNBENCH_ISA"
_AVX512_BASE = frozenset({"avx512f", "avx512bw", "avx512vl"})
_AMX_INT8 = frozenset({"amx-tile", "amx-int8"})


def isa_of(features: frozenset[str]) -> str:
    """The highest ISA level a feature set reaches.

    Example:
        >>> isa_of(frozenset({"avx2", "fma"}))
        'avx2'
        >>> isa_of(frozenset({"avx512f", "avx512bw", "avx512vl", "amx-tile", "amx-int8"}))
        'amx'
    """
    if _AVX512_BASE <= features:
        return "amx" if _AMX_INT8 <= features else "avx512"
    return "avx2" if "avx2" in features else "generic"


def forced_isa() -> str | None:
    """The ISA level forced through ``TERNBENCH_ISA`` (None: the CPU's own)."""
    isa = os.environ.get(ISA_ENV, "").strip().lower()
    if not isa or isa == "native":
        return None
    if isa not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV} must be one of native, {', '.join(ISA_LEVELS)}; "
                         f"got {isa!r}")
    return isa


def force_isa(isa: str | None) -> None:
    """Make the x86 rules see ISA level ``isa`` from now on (None or "native": the CPU's own).

    Raises ValueError for a level above what this CPU has.

    Example:
        >>> force_isa(None)  # back to the CPU's own features
    """
    isa = None if isa in (None, "", "native") else str(isa).lower()
    if isa is not None:
        if isa not in ISA_LEVELS:
            raise ValueError(f"isa must be one of native, {', '.join(ISA_LEVELS)}; got {isa!r}")
        avail = host_isa_levels()
        if isa not in avail:
            raise ValueError(f"this CPU cannot run ISA level {isa!r}; it has: "
                             f"{', '.join(avail)}")
        if isa == avail[-1]:  # the CPU's own level: nothing to force (torch is left alone too)
            isa = None
    if isa is not None:
        os.environ[ISA_ENV] = isa
    else:
        os.environ.pop(ISA_ENV, None)


def x86_target_at(isa: str) -> TargetInfo:
    """The local x86 target at ISA level ``isa`` whatever level is forced: what a CPU of that
    level compiles (the benchmark builds a lower level's kernel this way when it times it beside
    the chosen one). Raises ValueError above this CPU's level.

    Example:
        >>> x86_target_at("generic").isa  # doctest: +SKIP
        'generic'
    """
    if isa not in ISA_LEVELS:
        raise ValueError(f"isa must be one of {', '.join(ISA_LEVELS)}; got {isa!r}")
    return _x86_info_for(None if isa == host_isa_levels()[-1] else isa)


def host_isa_levels() -> tuple[str, ...]:
    """ISA levels this CPU can run, lowest first (``generic`` always)."""
    top = _x86_info_for(None).isa
    names = list(ISA_LEVELS)
    return tuple(names[: names.index(top) + 1])

#: cross-compiled aarch64 targets: name -> (mcpu, mattr, what it stands for). The default
#: ``arm`` is a Cortex-A76 class core (Raspberry Pi 5, Graviton 2 class: NEON + sdot).
ARM_TARGETS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "arm": ("cortex-a76", ("+neon", "+dotprod"), "aarch64 NEON + dotprod (Cortex-A76 class)"),
    "arm-neon": ("cortex-a72", ("+neon",), "aarch64 NEON only (Cortex-A72, Raspberry Pi 4)"),
    "arm-sve": ("neoverse-v1", ("+neon", "+dotprod", "+sve"),
                "aarch64 NEON + dotprod + SVE (Neoverse-V1, Graviton 3 class)"),
}
ARM_TRIPLE = "aarch64-linux-gnu"
#: CUDA arch used when no GPU is visible (codegen only); with a GPU, its own compute capability
DEFAULT_CUDA_ARCH = "sm_90"
#: every target name :func:`target_info` knows
KNOWN_TARGETS = ("x86", *ARM_TARGETS, "cuda")


def cuda_arch() -> str | None:
    """``sm_XY`` of the first visible CUDA GPU, or None without one (asks torch: cheap, and
    does not need TVM's CUDA runtime)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return f"sm_{major}{minor}"
    except Exception:  # pragma: no cover - a broken driver reads as "no GPU"
        return None


def target_info(name: str) -> TargetInfo:
    """Target description for a ternbench target name (see :data:`KNOWN_TARGETS`); ``x86``
    follows a forced ISA level (:func:`force_isa`).

    Example:
        >>> target_info("arm-neon").features
        frozenset({'neon'})
    """
    if name == "x86":
        return _x86_info_for(forced_isa())
    return _cross_info(name)


@functools.cache
def _cross_info(name: str) -> TargetInfo:
    if name in ARM_TARGETS:
        mcpu, mattr, desc = ARM_TARGETS[name]
        target = {"kind": "llvm", "mtriple": ARM_TRIPLE, "mcpu": mcpu, "mattr": list(mattr)}
        return TargetInfo(name=name, target_str=json.dumps(target, sort_keys=True),
                          kind="llvm", mcpu=mcpu, is_x86=False,
                          features=frozenset(a.lstrip("+") for a in mattr), family="arm",
                          local=False, description=desc,
                          isa="+".join(a.lstrip("+") for a in mattr))
    if name == "cuda":
        arch = cuda_arch()
        target = {"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH}
        desc = f"CUDA {target['arch']}" + ("" if arch else " (codegen only: no GPU visible)")
        return TargetInfo(name=name, target_str=json.dumps(target, sort_keys=True), kind="cuda",
                          mcpu=str(target["arch"]), is_x86=False, features=frozenset(),
                          family="cuda", local=arch is not None, description=desc,
                          isa=str(target["arch"]))
    raise ValueError(f"unknown target {name!r}; known: {list(KNOWN_TARGETS)}")


@functools.cache
def _x86_info_for(isa: str | None) -> TargetInfo:
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
    spec: dict[str, Any] = {"kind": "llvm", "mcpu": mcpu}
    host = tvm.target.Target(spec)
    host_feats = frozenset(f for f in _GATED_FEATURES if codegen.llvm_cpu_has_features(f, host))
    desc = f"local CPU ({mcpu})"
    target = host
    if isa is not None:
        names = list(ISA_LEVELS)
        if names.index(isa) > names.index(isa_of(host_feats)):
            raise ValueError(f"{ISA_ENV}={isa}: this CPU ({mcpu}) only reaches "
                             f"{isa_of(host_feats)}")
        if ISA_LEVELS[isa]:  # the whole build (not only the rules) sees the lower level
            target = tvm.target.Target({**spec, "mattr": list(ISA_LEVELS[isa])})
        desc += f", forced to {isa}"
    feats = frozenset(f for f in _GATED_FEATURES if codegen.llvm_cpu_has_features(f, target))
    if not enable_amx():  # tiles the kernel refuses to this process are not there for us
        feats -= {"amx-tile", "amx-int8", "amx-bf16"}
    info = TargetInfo(name="x86", target_str=str(target), kind="llvm", mcpu=mcpu,
                      is_x86=True, features=feats, family="x86", local=True,
                      description=desc, isa=isa_of(feats))
    log.info("target x86: %s, isa %s, features %s", info.target_str, info.isa, sorted(feats))
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
    """Compile a scheduled IRModule for ``target``; returns TVM's Executable.

    ``.jit()`` gives the runtime module of a local target (``["main"]``); cross targets are
    exported with ``export_library`` (see :mod:`.cross`). CUDA kernels get an LLVM host.
    """
    return require_tvm().compile(mod, target=build_target(target))


def build_target(target: TargetInfo) -> Any:
    """The TVM Target to compile for ``target``: CUDA gets an LLVM host (generic x86-64)."""
    tvm = require_tvm()
    if target.kind == "cuda":
        return tvm.target.Target(json.loads(target.target_str), host=_host_llvm())
    return target.target()


@functools.cache
def _host_llvm() -> Any:
    tvm = require_tvm()
    return tvm.target.Target({"kind": "llvm"})
