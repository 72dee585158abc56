"""The deployable artifact of a cell: one compiled TVM module, its parameters and a manifest.

Layout of ``OUT/artifacts/<cell key>/``::

    model.so        the whole model (Relax VM executable + every kernel), ``export_library``
    params.npz      the runtime parameters, in call order (numpy .npz, no pickle)
    manifest.json   input shape/layout/normalisation, output shape, target string, CPU
                    architecture and features, TVM version, parameter names, the sha256 of
                    model.so and params.npz, and the kernels it calls

``main(x, *params)`` takes the *normalised* image batch (NCHW float32: ``(img - mean) / std``
per channel, as in the manifest) and returns the logits. :func:`load_artifact` refuses, with
one line, an artifact whose files do not match their sha256 or that was built for another
CPU (architecture, or CPU features this host lacks). ``docs/artifact.md`` shows the same with
the TVM runtime alone.

Example:
    >>> from ternbench.schedules.artifact import ArtifactError, MANIFEST
    >>> MANIFEST, issubclass(ArtifactError, RuntimeError)
    ('manifest.json', True)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _tvm

__all__ = [
    "ArtifactError",
    "Artifact",
    "FORMAT",
    "MANIFEST",
    "LIBRARY",
    "PARAMS",
    "write_artifact",
    "load_artifact",
    "verify_artifact",
    "host_cpu_features",
]

log = logging.getLogger(__name__)

FORMAT = "ternbench-artifact/1"
MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.npz"
_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


class ArtifactError(RuntimeError):
    """The artifact is damaged, tampered with, or built for another machine (one line)."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _machine(m: str | None = None) -> str:
    m = (m or platform.machine()).lower()
    return _MACHINE_ALIASES.get(m, m)


def _norm_feature(f: str) -> str:
    return f.lower().lstrip("+").replace("_", "").replace("-", "").replace(".", "")


def host_cpu_features() -> frozenset[str] | None:
    """CPU feature flags of this host (``/proc/cpuinfo``, normalised: lower case, no ``_``),
    or None where they cannot be read (then the feature check is skipped, and logged)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(_norm_feature(f) for f in val.split())
    return None


def _pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_artifact(out_dir: str | Path, executable: Any, params: list[tuple[str, np.ndarray]],
                   *, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                   target: _tvm.TargetInfo, mean: tuple[float, ...] = (),
                   std: tuple[float, ...] = (), info: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir`` (replaced as a whole: written next to it, then renamed)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if target.family == "arm":  # cross-built: linked by the aarch64 cross gcc
            from .cross import cross_compiler

            executable.export_library(str(tmp / LIBRARY), fcompile=cross_compiler())
        else:
            executable.export_library(str(tmp / LIBRARY))
        arrays = {f"p{i:03d}": np.ascontiguousarray(a) for i, (_n, a) in enumerate(params)}
        np.savez(tmp / PARAMS, **arrays)  # type: ignore[arg-type]
        manifest = {
            "format": FORMAT,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "entry": "main",
            "input": {"shape": list(input_shape), "dtype": "float32", "layout": "NCHW",
                      "normalize": {"mean": list(mean), "std": list(std)},
                      "note": "main(x, *params): x = (image - mean) / std per channel"},
            "output": {"shape": list(output_shape), "dtype": "float32", "what": "logits"},
            "target": {"name": target.name, "target": target.target_str, "mcpu": target.mcpu,
                       "arch": "aarch64" if target.family == "arm" else _machine(),
                       "device": "cuda" if target.family == "cuda" else "cpu",
                       "cpu_features": sorted(target.features)},
            "tvm_version": _tvm.tvm_version(),
            "tvm_ffi_version": _pkg_version("apache-tvm-ffi"),
            "params": {"file": PARAMS, "order": [f"p{i:03d}" for i in range(len(params))],
                       "names": [n for n, _a in params]},
            "files": {name: sha256_file(tmp / name) for name in (LIBRARY, PARAMS)},
            **({"info": dict(info)} if info else {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("artifact written to %s", out)
    return out


def verify_artifact(path: str | Path) -> dict[str, Any]:
    """The manifest of the artifact at ``path`` after checking its files and target; raises
    :class:`ArtifactError` (one line) otherwise."""
    root = Path(path)
    mpath = root / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{root}: not an artifact (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{mpath}: format {got!r} is not {FORMAT!r}")
    files = manifest.get("files") or {}
    for name in (LIBRARY, PARAMS):
        if name not in files:
            raise ArtifactError(f"{mpath}: no sha256 recorded for {name}")
        fpath = root / name
        if not fpath.is_file():
            raise ArtifactError(f"{root}: {name} is missing")
        got = sha256_file(fpath)
        if got != files[name]:
            raise ArtifactError(
                f"{fpath}: sha256 {got[:12]}... does not match the manifest's "
                f"{str(files[name])[:12]}...: the artifact was modified; refusing to load it")
    tgt = manifest.get("target") or {}
    arch, host = _machine(str(tgt.get("arch", ""))), _machine()
    if arch != host:
        raise ArtifactError(f"{root}: built for {arch} ({tgt.get('target')}), but this host is "
                            f"{host}; rebuild it for this machine")
    feats = host_cpu_features()
    need = sorted(str(f) for f in tgt.get("cpu_features", []))
    if feats is None:
        log.warning("%s: cannot read this CPU's features; not checking %s", root, need)
    else:
        lacking = [f for f in need if _norm_feature(f) not in feats]
        if lacking:
            raise ArtifactError(f"{root}: built for CPU {tgt.get('mcpu')} with "
                                f"{', '.join(lacking)}, which this CPU lacks; rebuild it here")
    if tgt.get("device", "cpu") == "cuda" and not _has_cuda_gpu():
        raise ArtifactError(f"{root}: built for a CUDA GPU ({tgt.get('mcpu')}), but this host "
                            "has none; run it on a machine with an NVIDIA GPU")
    return manifest


def _has_cuda_gpu() -> bool:
    try:
        return bool(_tvm.require_tvm().cuda(0).exist)
    except Exception:  # a TVM without its CUDA runtime
        return False


@dataclass
class Artifact:
    """A loaded artifact: ``run(x)`` returns the logits of a normalised NCHW batch."""

    path: Path
    manifest: dict[str, Any]
    vm: Any
    params: list[Any]  # tvm tensors, in call order
    device: Any

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.manifest["input"]["shape"])

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def tensor(self, x: np.ndarray) -> Any:
        tvm = _tvm.require_tvm()
        a = np.ascontiguousarray(x, dtype=np.float32)
        if a.shape != self.input_shape:
            raise ValueError(f"{self.path}: input shape {a.shape}, artifact takes "
                             f"{self.input_shape}")
        return tvm.runtime.tensor(a, self.device)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits of one batch of the artifact's shape."""
        return np.asarray(self.vm["main"](self.tensor(x), *self.params).numpy())

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits of any number of samples (run batch by batch; a last partial batch is
        padded with zeros)."""
        b = self.batch
        n = int(x.shape[0])
        outs = []
        for i in range(0, n, b):
            chunk = np.asarray(x[i:i + b], np.float32)
            if chunk.shape[0] < b:
                pad = np.zeros((b - chunk.shape[0], *chunk.shape[1:]), np.float32)
                chunk = np.concatenate([chunk, pad])
            outs.append(self.run(chunk))
        return np.concatenate(outs)[:n] if outs else np.zeros((0,), np.float32)

    def timer(self, x: np.ndarray, number: int) -> Any:
        """A callable returning the mean seconds per call over ``number`` calls (C++ loop)."""
        ev = self.vm.time_evaluator("main", self.device, number=number, repeat=1)
        args = [self.tensor(x), *self.params]
        return lambda: float(ev(*args).mean)


def load_artifact(path: str | Path) -> Artifact:
    """Verify (:func:`verify_artifact`) and load an artifact for the local CPU (or, for a
    CUDA artifact, the local GPU)."""
    manifest = verify_artifact(path)
    tvm = _tvm.require_tvm()
    root = Path(path)
    lib = tvm.runtime.load_module(str(root / LIBRARY))
    cuda = manifest["target"].get("device", "cpu") == "cuda"
    dev = tvm.cuda(0) if cuda else tvm.cpu(0)
    vm = tvm.relax.VirtualMachine(lib, dev)  # (the VM adds the CPU for a GPU module)
    with np.load(root / PARAMS, allow_pickle=False) as z:
        params = [tvm.runtime.tensor(np.ascontiguousarray(z[k]), dev)
                  for k in manifest["params"]["order"]]
    return Artifact(path=root, manifest=manifest, vm=vm, params=params, device=dev)
