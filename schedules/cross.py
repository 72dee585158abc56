"""Cross-compiled aarch64 kernels: export with the Debian cross gcc, check under qemu-user.

ARM kernels are built on this (x86) machine and cannot be loaded by this process. Two ways
run them:

* :func:`run_under_qemu` (correctness only, e.g. in CI): the exported library is run by a small
  C harness (``schedules/harness/tb_arm_harness.c``) that needs no TVM runtime, under
  ``qemu-aarch64 -cpu max``. Timings under emulation mean nothing and are never taken.
* :mod:`.rpc` (latency): the library is uploaded to a board running TVM's RPC server.

Needs ``aarch64-linux-gnu-gcc`` and ``qemu-aarch64`` (Debian: ``gcc-aarch64-linux-gnu``,
``qemu-user``); :func:`qemu_unavailable_reason` says what is missing.

Example:
    >>> from ternbench.schedules import cross
    >>> isinstance(cross.qemu_unavailable_reason(), str)
    True
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ternbench.core.files import atomic_write, cache_root

from . import _tvm

if TYPE_CHECKING:
    from .graph import GraphPlan
    from .ops import Kernel

__all__ = [
    "CROSS_CC",
    "QEMU",
    "SYSROOT",
    "cross_compiler",
    "export_arm",
    "qemu_unavailable_reason",
    "harness_source",
    "build_harness",
    "run_under_qemu",
    "run_plan_under_qemu",
]

log = logging.getLogger(__name__)

#: the Debian cross compiler (package gcc-aarch64-linux-gnu) used as TVM's ``fcompile``
CROSS_CC = os.environ.get("TERNBENCH_ARM_CC", "aarch64-linux-gnu-gcc")
#: qemu user-mode emulator (package qemu-user)
QEMU = os.environ.get("TERNBENCH_QEMU", "qemu-aarch64")
#: aarch64 libc / dynamic loader the emulated harness runs against (``qemu -L``)
SYSROOT = Path(os.environ.get("TERNBENCH_ARM_SYSROOT", "/usr/aarch64-linux-gnu"))
#: parallel tasks per launch in the harness (run one after another: this covers the task split
#: of every parallel loop without threads)
HARNESS_TASKS = 3
#: wall-clock limit of one emulated kernel run (s); small test layers take well under a second
QEMU_TIMEOUT_S = 300.0

_DL_CODES = {"i": 0, "u": 1, "f": 2}  # DLPack type codes: int, uint, float
_HARNESS_LOCK = threading.Lock()


def _cache_root() -> Path:
    """:func:`ternbench.core.files.cache_root` plus ``/arm``."""
    return cache_root() / "arm"


def cross_compiler() -> Callable[..., Any]:
    """TVM ``fcompile`` that links an exported library with :data:`CROSS_CC`."""
    tvm = _tvm.require_tvm()
    return tvm.support.cc.cross_compiler(CROSS_CC)


def export_arm(kern: Kernel, path: str | os.PathLike[str]) -> Path:
    """Export an ARM kernel as an aarch64 shared library at ``path`` (returned).

    Raises RuntimeError when the cross compiler is missing or the link fails.
    """
    if shutil.which(CROSS_CC) is None:
        raise RuntimeError(f"cannot export an aarch64 kernel: {CROSS_CC} not found "
                           "(apt-get install gcc-aarch64-linux-gnu)")
    if '"aarch64' not in kern.target_str:
        raise ValueError(f"kernel {kern.rule} was built for {kern.target_str}, not aarch64")
    out = Path(path)
    try:
        kern.export(out, fcompile=cross_compiler())
    except Exception as exc:  # TVM wraps the compiler's stderr in its own error type
        raise RuntimeError(f"exporting {kern.rule} with {CROSS_CC} failed: "
                           f"{_tail(str(exc))}") from exc
    return out


def qemu_unavailable_reason() -> str:
    """Why ARM kernels cannot be run here under qemu ('' when they can)."""
    missing = [f"{tool} ({pkg})" for tool, pkg in ((CROSS_CC, "gcc-aarch64-linux-gnu"),
                                                   (QEMU, "qemu-user"))
               if shutil.which(tool) is None]
    if missing:
        return "missing " + ", ".join(missing)
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        return f"no aarch64 libc under {SYSROOT} (apt-get install libc6-arm64-cross)"
    try:
        _ffi_include()
    except RuntimeError as exc:
        return str(exc)
    return ""


def harness_source() -> Path:
    """The C source of the no-runtime harness (package data)."""
    return Path(__file__).resolve().parent / "harness" / "tb_arm_harness.c"


def _ffi_include() -> Path:
    """Include folder of tvm-ffi (``tvm/ffi/c_api.h`` and ``dlpack/dlpack.h``), found without
    importing tvm_ffi (its import pulls in torch)."""
    import importlib.util

    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("apache-tvm-ffi is not installed (its C headers build the harness)")
    for loc in spec.submodule_search_locations:
        inc = Path(loc) / "include"
        if (inc / "tvm" / "ffi" / "c_api.h").exists() and (inc / "dlpack" / "dlpack.h").exists():
            return inc
    raise RuntimeError("apache-tvm-ffi has no C headers (tvm/ffi/c_api.h, dlpack/dlpack.h)")


@functools.cache
def build_harness() -> Path:
    """Compile the harness once per process, cached on disk by a hash of its inputs (source,
    headers, compiler) under the ternbench cache (``.../ternbench/arm``)."""
    with _HARNESS_LOCK:
        src = harness_source()
        inc = _ffi_include()
        h = hashlib.sha256(src.read_bytes())
        for header in (inc / "tvm" / "ffi" / "c_api.h", inc / "dlpack" / "dlpack.h"):
            h.update(header.read_bytes())
        h.update(CROSS_CC.encode())
        dest = _cache_root() / f"tb_arm_harness-{h.hexdigest()[:16]}"
        if dest.exists():
            return dest

        def compile_to(tmp: Path) -> None:
            cmd = [CROSS_CC, "-O2", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-rdynamic",
                   f"-I{inc}", "-o", str(tmp), str(src), "-ldl"]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise RuntimeError(f"building the ARM harness failed ({' '.join(cmd)}): "
                                   f"{_tail(res.stderr)}")

        # built next to the destination, then renamed: concurrent processes never see a
        # half-written binary
        atomic_write(dest, compile_to, mode=0o755)
        log.info("built the ARM harness: %s", dest)
        return dest


def _dl_type(a: np.ndarray) -> tuple[int, int]:
    if a.dtype.kind not in _DL_CODES or a.dtype.byteorder == ">":
        raise TypeError(f"unsupported kernel argument dtype {a.dtype}")
    return _DL_CODES[a.dtype.kind], a.dtype.itemsize * 8


def _tensor_line(kind: str, code: int, bits: int, shape: Sequence[int], path: Path) -> str:
    return f"{kind} {code} {bits} {len(shape)} {' '.join(str(int(d)) for d in shape)} {path}"


def run_under_qemu(kern: Kernel, args: Sequence[np.ndarray], out_shape: Sequence[int],
                   *, timeout: float = QEMU_TIMEOUT_S) -> np.ndarray:
    """Run an ARM kernel once under qemu-user; returns its float32 output of ``out_shape``.

    ``args`` are the kernel's inputs in PrimFunc order (``[x, *kern.pack(lx)]``); the output
    tensor is appended. Raises RuntimeError (with the tail of stderr) when the tools are
    missing, the export fails or the emulated run fails.
    """
    why = qemu_unavailable_reason()
    if why:
        raise RuntimeError(f"cannot run ARM kernels under qemu: {why}")
    harness = build_harness()
    with tempfile.TemporaryDirectory(prefix="tb-arm-") as tmp:
        d = Path(tmp)
        lib = export_arm(kern, d / "kernel.so")
        lines = [f"tasks {HARNESS_TASKS}"]
        for i, a in enumerate(args):
            arr = np.ascontiguousarray(np.asarray(a))
            code, bits = _dl_type(arr)
            p = d / f"in{i}.bin"
            arr.tofile(p)
            lines.append(_tensor_line("in", code, bits, arr.shape, p))
        out_path = d / "out.bin"
        lines.append(_tensor_line("out", 2, 32, out_shape, out_path))
        manifest = d / "manifest"
        manifest.write_text("\n".join(lines) + "\n")
        _run_harness(harness, lib, manifest, kern.rule, timeout)
        y = np.fromfile(out_path, dtype=np.float32)
    n = int(np.prod(out_shape))
    if y.size != n:
        raise RuntimeError(f"{kern.rule} under qemu wrote {y.size} values, expected {n}")
    return y.reshape(tuple(int(v) for v in out_shape))


def run_plan_under_qemu(plan: GraphPlan, params: Sequence[np.ndarray], x: np.ndarray,
                        target: _tvm.TargetInfo, *, timeout: float = QEMU_TIMEOUT_S
                        ) -> np.ndarray:
    """Run a whole model (:func:`.graph.straight_line_plan`) for ``target`` under qemu-user,
    one sample batch after another: ``x`` is ``[n * batch, ...]`` float32, the result the
    stacked outputs. The layers' kernels and the stages between them are one aarch64 library
    driven by the harness's ``plan`` mode (no TVM runtime, no Python between layers).

    Raises RuntimeError (with the tail of stderr) when the tools are missing, the export fails
    or the emulated run fails.
    """
    why = qemu_unavailable_reason()
    if why:
        raise RuntimeError(f"cannot run the ARM model under qemu: {why}")
    if target.family != "arm":
        raise ValueError(f"the plan was built for {target.name}, not an ARM target")
    tin = plan.tensors[plan.input_id]
    tout = plan.tensors[plan.output_id]
    per = int(np.prod(tin.shape))
    xs = np.ascontiguousarray(np.asarray(x, np.float32)).reshape(-1)
    if xs.size == 0 or xs.size % per:
        raise ValueError(f"input of {xs.size} values is not a whole number of {tin.shape}")
    count = xs.size // per
    harness = build_harness()
    with tempfile.TemporaryDirectory(prefix="tb-arm-model-") as tmp:
        d = Path(tmp)
        lib = d / "model.so"
        try:
            _tvm.compile_prim_module(plan.prim_mod, target).export_library(
                str(lib), fcompile=cross_compiler())
        except Exception as exc:
            raise RuntimeError(f"exporting the ARM model with {CROSS_CC} failed: "
                               f"{_tail(str(exc))}") from exc
        lines = ["plan", f"tasks {HARNESS_TASKS}"]
        for t in plan.tensors:
            dims = f"{len(t.shape)} {' '.join(str(v) for v in t.shape)}"
            if t.view_of is not None:
                lines.append(f"view {t.id} {t.view_of} {dims}")
            else:
                code, bits = _dl_type(np.zeros(0, t.dtype))
                lines.append(f"tensor {t.id} {code} {bits} {dims}")
        if len(params) != len(plan.param_ids):
            raise ValueError(f"{len(params)} parameters for a plan of {len(plan.param_ids)}")
        for i, (pid, a) in enumerate(zip(plan.param_ids, params, strict=True)):
            arr = np.ascontiguousarray(a)
            want = plan.tensors[pid]
            if arr.shape != want.shape or str(arr.dtype) != want.dtype:
                raise ValueError(f"parameter {i}: {arr.dtype}{list(arr.shape)}, the plan "
                                 f"wants {want.dtype}{list(want.shape)}")
            p = d / f"p{i}.bin"
            arr.tofile(p)
            lines.append(f"load {pid} {p}")
        xs.tofile(d / "x.bin")
        lines.append(f"input {plan.input_id} {d / 'x.bin'} {count}")
        lines.append(f"output {plan.output_id} {d / 'y.bin'}")
        lines += [f"call {name} {' '.join(str(i) for i in args)}" for name, args in plan.calls]
        manifest = d / "plan"
        manifest.write_text("\n".join(lines) + "\n")
        _run_harness(harness, lib, manifest, "the ARM model", timeout)
        y = np.fromfile(d / "y.bin", dtype=tout.dtype)
    n = count * int(np.prod(tout.shape))
    if y.size != n:
        raise RuntimeError(f"the ARM model under qemu wrote {y.size} values, expected {n}")
    return y.reshape(count * tout.shape[0], *tout.shape[1:])


def _run_harness(harness: Path, lib: Path, manifest: Path, what: str, timeout: float) -> None:
    """Run the harness on ``lib`` and ``manifest`` under qemu-user; RuntimeError (with the tail
    of stderr) when it fails or times out."""
    cmd = [QEMU, "-cpu", "max", "-L", str(SYSROOT), str(harness), str(lib), str(manifest)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what} under qemu timed out after {timeout:g} s") from exc
    if res.returncode != 0:
        raise RuntimeError(f"{what} under qemu failed (exit {res.returncode}): "
                           f"{_tail(res.stderr or res.stdout)}")


def _tail(text: str, n: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]
