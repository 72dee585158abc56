"""Instruction-throughput peaks of this CPU for the kernels' inner recipes (1 thread).

A kernel's time means little without the bound it works against. :func:`measure_peaks` compiles a
small C program (the host's ``cc``; nothing is downloaded) whose loops keep every operand in
registers and run one recipe with enough independent accumulators to hide latency, and reports
GMAC/s per recipe:

* ``fp32_fma``: one 16-lane (AVX-512) or 8-lane (AVX2) FMA per 16 / 8 MACs: torch FP32's bound;
* ``int8_vpdpbusd``: u8 x s8 ``vpdpbusd`` on zmm, 64 MACs per instruction: the bound of torch
  INT8 (fbgemm) and of every int8-activation ternary kernel that multiplies (``tvm_t2_vnni``);
* ``int8_vpmaddubsw``: AVX2's ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` per 32 MACs
  (``tvm_t2_avx2`` with groups of 4, 8 or 12);
* ``int8_vpmaddubsw_chain``: four ``vpmaddubsw`` summed in int16 (three ``vpaddw``), then one
  ``vpmaddwd`` + ``vpaddd``, per 128 MACs (``tvm_t2_avx2``'s int16 chain over 16 k);
* ``fgq4``: FGQ N=4's step, ``vpdpbusd`` onto the group's correction, ``vcvtdq2ps``, one FMA
  with the group scale: 64 MACs per three instructions;
* ``tt_popcount``: ternary x ternary, per 64-bit word and 8 lanes ``vpandq``, ``vpternlogq``, two
  ``vpopcntq`` and two ``vpaddq`` (512 MACs): the bound of ``tvm_tt_popc`` on AVX-512;
* ``lut_exact``: a T-MAC style lookup step that stays exact: weights as two binary planes, groups
  of 4 int8 activations, 16-entry int16 tables split into lo/hi bytes for ``vpshufb``; per plane
  two shuffles, two unpacks and two adds for 64 lanes x 4 activations;
* ``lut_vpermw``: the lookup of ``tvm_t2_lut``: one ``vpermw`` (AVX512-BW: 32 int16 lanes from
  a 32-entry table, i.e. three ternary weights' 27 sums of three int8 activations) and one
  ``vpaddw`` per 96 MACs;
* ``tt_vpermi2b``: the lookup of ``tvm_tt_lut`` (ternary x ternary): one ``vpermi2b`` (AVX512-VBMI:
  64 int8 lanes from a 128-entry table held in two registers, i.e. four ternary weights' 81 sums
  of four ternary activations, a table that depends only on the activations' code) and one
  ``vpaddb`` per 256 MACs;
* ``int8_amx``: AMX ``tdpbssd`` (16 x 16 int32 tile += a 16 x 64 by 64 x 16 int8 product,
  16384 MACs) into four accumulator tiles: the bound of torch INT8's convs on a CPU with AMX
  (oneDNN's ``brg_conv_fwd:..._amx``), and of the ``tvm_t2_amx`` / ``tvm_tt_amx`` kernels;
* ``bf16_amx``: AMX ``tdpbf16ps`` (16 x 16 fp32 tile += a 16 x 32 by 32 x 16 bf16 product,
  8192 MACs): the bound of ``tvm_bf16_amx`` (FGQ), which runs it once per bf16 piece of the
  weights (two for FGQ's FP16 scales).

Recipes whose instructions the CPU lacks are left out (AMX also where Linux refuses the tile
state). Example::

    >>> from ternbench.bench.kernels.peaks import measure_peaks
    >>> peaks = measure_peaks()  # doctest: +SKIP
    >>> round(peaks["int8_vpdpbusd"])  # doctest: +SKIP
    235
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["RECIPES", "measure_peaks"]

#: recipe -> CPU flags (``/proc/cpuinfo``) it needs
RECIPES: dict[str, tuple[str, ...]] = {
    "fp32_fma": ("avx2", "fma"),
    "int8_vpdpbusd": ("avx512f", "avx512bw", "avx512_vnni"),
    "int8_vpmaddubsw": ("avx2",),
    "int8_vpmaddubsw_chain": ("avx2",),
    "fgq4": ("avx512f", "avx512bw", "avx512_vnni"),
    "tt_popcount": ("avx512f", "avx512_vpopcntdq"),
    "lut_exact": ("avx512f", "avx512bw"),
    "lut_vpermw": ("avx512f", "avx512bw"),
    "tt_vpermi2b": ("avx512f", "avx512bw", "avx512vbmi"),
    "int8_amx": ("amx_tile", "amx_int8"),
    "bf16_amx": ("amx_tile", "amx_bf16"),
}

# peaks.c: each recipe is a function compiled for its own ISA (target attribute) and selected by
# name, so the binary runs on a CPU without AVX-512 as long as only its recipes are asked for;
# empty asm statements make the operands opaque, so nothing is hoisted out of the loop.
_SOURCE = Path(__file__).with_name("peaks.c")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def measure_peaks(recipes: tuple[str, ...] | None = None) -> dict[str, float]:
    """GMAC/s of each recipe this CPU can run (best of 5 samples of ~10-60 ms, 1 thread).

    Empty when there is no C compiler or the CPU is not x86 (``/proc/cpuinfo`` without the
    flags); ``fp32_fma`` is the 16-lane AVX-512 figure where the CPU has AVX-512F, else AVX2's.
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    flags = _cpu_flags()
    if cc is None or not flags:
        log.info("instruction peaks skipped: %s", "no C compiler" if cc is None else
                 "no x86 CPU flags")
        return {}
    names = [r for r in (recipes or tuple(RECIPES)) if set(RECIPES[r]) <= flags]
    args = [("fp32_fma512" if "avx512f" in flags else "fp32_fma256") if r == "fp32_fma" else r
            for r in names]
    if not args:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "peaks"
        # no -funroll-loops: the loops unroll by pragma; unrolling the outer loop as well
        # adds register copies to the lookup recipes (vpermw 290 instead of 320-350 GMAC/s)
        build = subprocess.run([cc, "-O2", str(_SOURCE), "-o", str(exe)],
                               capture_output=True, text=True)
        if build.returncode != 0:
            log.warning("instruction peaks skipped: %s cannot build them: %s", cc,
                        build.stderr.strip().splitlines()[-1:] or "?")
            return {}
        run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                             check=True)
    out: dict[str, float] = {}
    for line in run.stdout.splitlines():
        name, value = line.split()
        out["fp32_fma" if name.startswith("fp32_fma") else name] = float(value)
    return out
