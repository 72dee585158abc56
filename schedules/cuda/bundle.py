"""The GPU bundle: CUDA kernels built and compiled here, checked on a GPU host without TVM
(:func:`export_gpu_bundle`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

from .. import _tvm
from .nvrtc import compile_kernel, cuda_toolkit_root, kernel_source
from .schedules import _require

log = logging.getLogger(__name__)

#: arch of :func:`export_gpu_bundle` (the H100 the project's GPU checks run on)
DEFAULT_BUNDLE_ARCH = "sm_90"

#: the runner of :func:`export_gpu_bundle`: needs only Python, numpy, torch (CUDA) and the
#: bundled TVM runtime; every kernel's device code comes precompiled (no NVRTC on the GPU host)
_BUNDLE_RUNNER = r'''"""Check a ternbench CUDA kernel bundle: python3 run.py [--dry] [name ...]"""
import ctypes, glob, hashlib, json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "py"))
import numpy as np
import torch
import tvm_ffi

for lib in ("libcudart.so.13", "libtvm_runtime.so", "libtvm_runtime_cuda.so"):
    if os.path.exists(os.path.join(HERE, "lib", lib)):  # dependencies first (by SONAME)
        ctypes.CDLL(os.path.join(HERE, "lib", lib), mode=ctypes.RTLD_GLOBAL)
BIN = {os.path.basename(p).rsplit(".", 1)[0]: open(p, "rb").read()
       for p in glob.glob(os.path.join(HERE, "bin", "*"))}


@tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
def _compiled(code, *_):  # the CUDA module compiles its source on first load: use ours
    key = hashlib.sha256(code.encode()).hexdigest()
    if key not in BIN:
        raise RuntimeError(f"no precompiled binary for kernel source {key[:12]}")
    return bytearray(BIN[key])


dry = "--dry" in sys.argv
only = [a for a in sys.argv[1:] if a != "--dry"]
results = []
for job in json.load(open(os.path.join(HERE, "manifest.json"))):
    if only and not any(o in job["name"] for o in only):
        continue
    try:
        func = tvm_ffi.load_module(os.path.join(HERE, "k", job["name"] + ".so"))["main"]
        if dry:
            results.append(dict(name=job["name"], ok=True, loaded=True))
            continue
        data = np.load(os.path.join(HERE, "k", job["name"] + ".npz"))
        args = [torch.from_numpy(np.ascontiguousarray(data[f"arr_{i}"])).cuda()
                for i in range(job["nargs"])]
        outs = []
        for _ in range(2):  # twice, into NaN-filled outputs: no stale or missing writes
            out = torch.full((job["M"], job["N"]), float("nan"), device="cuda")
            func(*args, out)
            outs.append(out.cpu().numpy().astype(np.float64))
        ref = data["ref"].astype(np.float64)
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        err = max(float(np.abs(o - ref).max()) for o in outs)
        ok = bool(all(np.isfinite(o).all() for o in outs) and err <= job["rtol"] * scale)
        results.append(dict(name=job["name"], ok=ok, max_abs_err=err, tol=job["rtol"] * scale))
    except Exception as exc:
        results.append(dict(name=job["name"], ok=False, error=f"{type(exc).__name__}: {exc}"))
    r = results[-1]
    print(("ok  " if r["ok"] else "BAD ") + job["name"], r.get("max_abs_err", r.get("error", "")),
          flush=True)
json.dump(results, open(os.path.join(os.environ.get("OUT", HERE), "results.json"), "w"), indent=1)
print(f"{sum(r['ok'] for r in results)}/{len(results)} ok on",
      "(dry run)" if dry else torch.cuda.get_device_name(0))
sys.exit(0 if all(r["ok"] for r in results) else 1)
'''


def export_gpu_bundle(jobs: list[tuple[Any, ...]], out_dir: str | os.PathLike[str], *,
                      arch: str = DEFAULT_BUNDLE_ARCH, tvm_ffi_dir: str | None = None) -> str:
    """Write a self-contained bundle that checks CUDA kernels on a GPU host without TVM.

    For each ``(layer, batch[, rule[, params]])`` (default: the selected rule, its default
    tiles): the kernel built for ``arch`` and exported (host code
    + CUDA source), its device code compiled here with NVRTC (keyed by the source's SHA-256),
    the kernel input, packed weights and the float64 reference. Plus the TVM runtime libraries,
    the ``tvm_ffi`` package (``tvm_ffi_dir``: one built for the GPU host's Python, e.g. unpacked
    from ``pip download apache-tvm-ffi==0.1.14.post0 --python-version 3.12 --only-binary=:all:
    --no-deps``; default: this interpreter's) and ``run.py``, which runs every kernel twice and
    compares it with the reference (``results.json``; exit status 1 on any mismatch).

    Returns ``out_dir``. Example (then carry ``out_dir`` to the GPU host and run
    ``python3 <out_dir>/run.py``):
        >>> # export_gpu_bundle([(lx, 1), (lx, 64)], "build/cuda_bundle")
    """
    import hashlib

    import numpy as np

    from .. import measure

    tvm = _require()
    import tvm_ffi as local_ffi

    tinfo = dataclasses.replace(_tvm.target_info("cuda"), mcpu=arch, local=False,
                                target_str=json.dumps({"arch": arch, "kind": "cuda"},
                                                      sort_keys=True))
    out = os.fspath(out_dir)
    for sub in ("k", "bin", "lib"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    manifest = []
    for i, job in enumerate(jobs):
        lx, batch = job[0], int(job[1])
        rule = job[2] if len(job) > 2 and job[2] is not None else measure.select_rule(lx, tinfo)
        params = dict(job[3]) if len(job) > 3 and job[3] is not None else None
        kern = rule.build(lx, batch, tinfo, params)
        tiles = "".join(f"_{k}{v}" for k, v in sorted(kern.params.items()))
        name = f"{i:03d}_{lx.name}_b{batch}_{rule.name.split('.')[-1]}{tiles}"
        kern.export(os.path.join(out, "k", name + ".so"))
        key = hashlib.sha256(kernel_source(kern).encode()).hexdigest()
        binary = os.path.join(out, "bin", key + ".cubin")
        if not os.path.exists(binary):
            with open(binary, "wb") as f:
                f.write(compile_kernel(kern, arch, "nvrtc"))
        a = measure.kernel_input(lx, kern.spec)
        args = [a, *kern.pack(lx)]
        # float32 reference: its rounding (6e-8 relative) is far below every tolerance, and
        # the bundle stays small enough to copy around
        np.savez(os.path.join(out, "k", name + ".npz"), *args,
                 ref=measure.reference_output(lx, a).astype(np.float32))
        manifest.append(dict(name=name, layer=lx.name, batch=batch, rule=rule.name,
                             params=dict(kern.params), impl=kern.impl, M=kern.spec.M,
                             N=kern.spec.N, nargs=len(args),
                             rtol=measure._rtol(kern.spec), source_sha256=key))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    with open(os.path.join(out, "run.py"), "w") as f:
        f.write(_BUNDLE_RUNNER)
    lib = os.path.join(os.path.dirname(tvm.__file__), "lib")
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy(os.path.join(lib, name), os.path.join(out, "lib", name))
    root = cuda_toolkit_root()  # the CUDA runtime the TVM runtime was linked against
    for cand in ([os.path.join(root, "lib", "libcudart.so.13"),
                  os.path.join(root, "lib64", "libcudart.so.13")] if root else []):
        if os.path.exists(cand):
            shutil.copy(cand, os.path.join(out, "lib", "libcudart.so.13"))
            break
    ffi_src = tvm_ffi_dir or os.path.dirname(local_ffi.__file__)
    dst = os.path.join(out, "py", "tvm_ffi")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ffi_src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    log.info("GPU bundle of %d kernels for %s in %s", len(manifest), arch, out)
    return out
