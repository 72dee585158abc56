"""Compiling a built CUDA kernel's source without a GPU (NVRTC or nvcc), and finding the CUDA
toolkit headers NVRTC needs."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Any

from .. import _tvm
from .schedules import _require

log = logging.getLogger(__name__)


def kernel_source(kernel: Any) -> str:
    """CUDA C source of a built CUDA kernel (:class:`.ops.Kernel`); ``""`` for other targets.

    TVM 0.27 keeps the device code as CUDA source in the built module and compiles it when the
    module is first loaded on a GPU (see :func:`compile_kernel`).
    """
    return module_source(kernel.executable)


def module_source(executable: Any) -> str:
    """CUDA C source inside a built module (a kernel's or a whole model's Relax executable,
    where the device module hangs below the host one); ``""`` when there is none."""
    todo = [getattr(executable, "mod", executable)]
    while todo:
        mod = todo.pop()
        for imp in mod.imports:
            if imp.kind == "cuda":
                return str(imp.inspect_source("cuda"))
            todo.append(imp)
    return ""


def _compiler(compiler: str | None) -> str:
    mode = (compiler or os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc")).lower()
    if mode not in ("nvrtc", "nvcc"):
        raise ValueError(f"CUDA compiler must be 'nvrtc' or 'nvcc', got {mode!r}")
    return mode


def _has_cuda_headers(root: str) -> bool:
    """Whether ``root`` holds what TVM's NVRTC path includes: ``cuda_runtime.h`` and the CCCL
    ``cuda/std`` headers (pip's ``nvidia/cu13`` has the former only)."""
    incs = [os.path.join(root, "include"),
            *glob.glob(os.path.join(root, "targets", "*", "include"))]
    runtime = any(os.path.isfile(os.path.join(i, "cuda_runtime.h")) for i in incs)
    cccl = any(os.path.isdir(os.path.join(i, *sub, "cuda", "std"))
               for i in incs for sub in ((), ("cccl",)))
    return runtime and cccl


def cuda_toolkit_root() -> str | None:
    """A CUDA toolkit root with the headers NVRTC needs, or None: ``CUDA_PATH``,
    ``CUDA_HOME``, ``/usr/local/cuda``, then the newest ``/usr/local/cuda-*``."""
    cands = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in cands if c and _has_cuda_headers(c)), None)


def ensure_cuda_path() -> str | None:
    """Point ``CUDA_PATH`` at :func:`cuda_toolkit_root` when it is unset or lacks headers.

    TVM finds the CUDA headers for NVRTC through ``CUDA_PATH``, else ``which nvcc``/../..,
    which goes wrong when ``nvcc`` is a wrapper script (``/usr/local/bin/nvcc`` here) or
    absent (a GPU host with only the driver and pip CUDA libraries). The runtime compiles a
    kernel's source when the module is first loaded on a GPU, so this is set before any build.
    """
    cur = os.environ.get("CUDA_PATH")
    if cur and _has_cuda_headers(cur):
        return cur
    root = cuda_toolkit_root()
    if root is not None and root != cur:
        os.environ["CUDA_PATH"] = root
        log.info("CUDA_PATH=%s (CUDA headers for NVRTC)", root)
    return root


def compiler_unavailable_reason(compiler: str | None = None) -> str:
    """Why CUDA source cannot be compiled here (``""`` when it can). NVRTC (TVM's default)
    needs the ``cuda-bindings`` package, a loadable ``libnvrtc`` (pip ``nvidia-cuda-nvrtc``) and
    a CUDA toolkit's headers (:func:`cuda_toolkit_root`); nvcc needs ``nvcc``. ``compiler``
    defaults to ``TVM_CUDA_COMPILE_MODE`` (else NVRTC), as in TVM's runtime."""
    mode = _compiler(compiler)
    if mode == "nvcc":
        if shutil.which("nvcc") or cuda_toolkit_root():
            return ""
        return "nvcc not found (PATH, CUDA_PATH, /usr/local/cuda)"
    try:
        from cuda.bindings import nvrtc

        err, _major, _minor = nvrtc.nvrtcVersion()
        if int(err) != 0:
            return f"libnvrtc is not usable ({err})"
    except Exception as exc:  # ImportError, or the bindings failing to load libnvrtc
        return (f"NVRTC unavailable: {type(exc).__name__}: {exc} "
                "(pip install cuda-bindings nvidia-cuda-nvrtc)")
    if cuda_toolkit_root() is None:
        return "no CUDA toolkit headers (cuda_runtime.h + CCCL) for NVRTC: set CUDA_PATH"
    return ""


def compile_kernel(kernel: Any, arch: str | None = None, compiler: str | None = None) -> bytes:
    """Compile a built CUDA kernel's source to a device binary without a GPU: an NVRTC cubin
    or an nvcc fatbin for ``arch`` (default: the kernel's target arch), the compilation TVM's
    CUDA runtime would do on first load. Raises ``RuntimeError`` with the compiler's log when
    the source does not compile.

    Example:
        >>> # compile_kernel(build_layer(lx, 1, "cuda"), "sm_80")[:4]  ->  b"\\x7fELF"
    """
    src = kernel_source(kernel)
    if not src:
        raise ValueError(f"{kernel.rule}: not a CUDA kernel (target {kernel.target_str})")
    if arch is None:
        arch = str(json.loads(kernel.target_str).get("arch", _tvm.DEFAULT_CUDA_ARCH))
    return _compile_source(src, arch, compiler)


def compile_module_source(executable: Any, arch: str | None = None,
                          compiler: str | None = None) -> bytes:
    """:func:`compile_kernel` for any built module holding CUDA source (e.g. a whole model's
    Relax executable); ``arch`` defaults to ``DEFAULT_CUDA_ARCH``."""
    src = module_source(executable)
    if not src:
        raise ValueError("the module holds no CUDA source")
    return _compile_source(src, arch or _tvm.DEFAULT_CUDA_ARCH, compiler)


def _compile_source(src: str, arch: str, compiler: str | None) -> bytes:
    tvm = _require()
    from tvm.support import nvcc

    mode = _compiler(compiler)
    ensure_cuda_path()
    # nvcc takes explicit -gencode flags; both read the arch of the current target otherwise
    # (and would ask the GPU for it)
    arch_arg: Any = arch
    if mode == "nvcc":
        arch_arg = ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        binary = nvcc.compile_cuda(src, target_format="cubin" if mode == "nvrtc" else "fatbin",
                                   arch=arch_arg, compiler=mode)
    return bytes(binary)
