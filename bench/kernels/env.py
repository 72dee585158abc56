"""The measuring environment: thread-pool variables, DRAM read bandwidth and the provenance
(CPU name, git checkout) recorded with every row."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- environment


def configure_env(threads: int) -> list[str]:
    """Thread-pool environment for benchmarking TVM and torch in one process.

    Both pools spin-wait by default and fight over the cores when calls alternate
    (``shared/notes/tvm.md`` §7): sets ``TVM_THREAD_POOL_SPIN_COUNT=0``,
    ``OMP_WAIT_POLICY=PASSIVE`` and a ``TVM_NUM_THREADS`` bound of at least ``threads``
    (unless already set). They only act when set before the libraries load; returns a note for
    each one that came too late (the CLI logs them: export them in the shell instead).
    """
    notes = []
    wanted = {"TVM_THREAD_POOL_SPIN_COUNT": ("0", "tvm"), "OMP_WAIT_POLICY": ("PASSIVE", "torch"),
              "TVM_NUM_THREADS": (str(max(threads, os.cpu_count() or 1)), "tvm")}
    for var, (value, lib) in wanted.items():
        if var in os.environ:
            continue
        if lib in sys.modules:
            if var != "OMP_WAIT_POLICY" or threads > 1:  # one thread: no pool to spin
                notes.append(f"{var}={value} not applied ({lib} already imported); export it "
                             "before starting ternbench")
            continue
        os.environ[var] = value
    return notes


#: per forced ISA level, what caps torch's own kernels to it: ATen's vectorised ops, oneDNN
#: (torch's FP32 convs and the ``x86`` engine's int8 convs) and fbgemm (int8 linears; it needs
#: AVX2, so it has no lower level). Each is read once, on first use. ``avx512`` (forced on an
#: AMX CPU) keeps oneDNN off the tiles: its int8 convs then run ``vpdpbusd``
#: (``brg_conv_fwd:avx512_core_vnni``), as on an AVX-512 CPU without AMX; fbgemm has no AMX.
TORCH_ISA_CAPS: dict[str, dict[str, str]] = {
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
    "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


@contextlib.contextmanager
def cap_torch_isa(isa: str | None) -> Iterator[list[str]]:
    """Within the block, torch's kernels are capped to the ISA level forced on the TVM rules
    (``--isa``), so that the torch FP32 / INT8 baselines of a forced run are what a CPU of that
    level runs: ``--isa avx2`` on an AVX-512 machine compares the AVX2 kernels with AVX2
    torch, not with torch's AVX-512 or AMX kernels. Processes started inside the block (Ray
    workers) inherit the cap; the variables are restored after it. Variables the user set
    stay. Yields notes: one when this process's torch had already picked its kernels (the
    cap then does not apply here: start a fresh process).

    Example:
        >>> with cap_torch_isa(None) as notes:  # the CPU's own level: torch is left alone
        ...     notes
        []
    """
    caps = TORCH_ISA_CAPS.get(isa or "", {})
    added = [var for var in caps if var not in os.environ]
    for var in added:
        os.environ[var] = caps[var]
    notes: list[str] = []
    try:
        if "ATEN_CPU_CAPABILITY" in caps:
            import torch

            want = os.environ["ATEN_CPU_CAPABILITY"].upper()
            got = torch.backends.cpu.get_cpu_capability()
            if got.upper() != want:
                notes.append(f"torch runs {got} kernels, not {want}: it chose them before "
                             f"--isa {isa} capped them; export ATEN_CPU_CAPABILITY and "
                             "ONEDNN_MAX_CPU_ISA before starting ternbench")
        yield notes
    finally:
        for var in added:
            os.environ.pop(var, None)


def _l3_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        with contextlib.suppress(ValueError):
            best = max(best, int(txt.rstrip("KMG")) * mult)
    return best or 32 << 20


def measure_bandwidth(quick: bool = False) -> float:
    """Single-thread DRAM read bandwidth in GB/s: median over repeats of ``torch.sum`` of a
    float32 buffer larger than the last-level cache (2x in quick mode, else max(4x, 256 MiB))."""
    import torch

    l3 = _l3_bytes()
    nbytes = 2 * l3 if quick else max(4 * l3, 256 << 20)
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        buf.sum()  # page in
        ts = []
        for _ in range(3 if quick else 11):
            t = time.perf_counter()
            buf.sum()
            ts.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(prev)
    return nbytes / float(np.median(ts)) / 1e9


@functools.cache
def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return name


@functools.cache
def _git_describe() -> str:
    """``git describe --always --dirty`` of the source checkout, '' outside one."""
    src = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty",
                              "--abbrev=12"], capture_output=True, text=True, timeout=5,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""
