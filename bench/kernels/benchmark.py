"""The benchmark run (:func:`run_kernels`): per (shape, batch) build and check every impl,
calibrate and time them interleaved round by round, then write the CSV and the summary."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .env import _cpu_name, _git_describe, configure_env, measure_bandwidth
from .impls import _Impl, _quiet_torch_quant, _torch_fp32_impl, _torch_int8_impl, _tvm_impl
from .layers import ACT_MODES, synthetic_layer
from .output import COLUMNS, _markdown, _rows
from .peaks import measure_peaks
from .shapes import KernelShape, select_shapes

log = logging.getLogger(__name__)

#: interleaved rounds and minimum duration of one timing sample (normal / --quick)
ROUNDS, QUICK_ROUNDS = 15, 3
SAMPLE_S, QUICK_SAMPLE_S = 0.02, 0.002


# ----------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class KernelsResult:
    """Outcome of :func:`run_kernels`: the rows (a pandas DataFrame), the files, the
    failures (``(shape, batch, impl, error)``), the bandwidth used and this CPU's instruction
    peaks (GMAC/s per recipe, :func:`.peaks.measure_peaks`; empty without a C compiler)."""

    frame: Any
    csv_path: Path
    md_path: Path
    failures: tuple[tuple[str, int, str, str], ...]
    bandwidth_gbs: float
    peaks: dict[str, float] = dataclasses.field(default_factory=dict)


def _calibrate(run_n: Callable[[int], float], min_s: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_s`` (also the warm-up)."""
    n = 1
    while True:
        per = max(run_n(n), 1e-9)
        if per * n >= min_s or n >= 1 << 22:
            return n
        n = min(1 << 22, max(2 * n, math.ceil(1.2 * min_s / per)))


def _group(shape: KernelShape, batch: int, *, threads: int, act_modes: Sequence[str],
           tinfo: Any, tune: bool, tune_points: int | None, tune_budget_s: float | None,
           ms_trials: int, generic: bool, failures: list[tuple[str, int, str, str]],
           pbar: Any, group_sizes: Sequence[int] = (),
           group_axes: Sequence[str] = ("cin_contiguous",)) -> list[_Impl]:
    """Prepare (build + check) every impl of one (shape, batch); failures become noted rows."""
    from ternbench.schedules import generic as gen_mod
    from ternbench.schedules import measure, tuning

    tvm = _import_tvm()
    dev = tvm.cpu(0)
    impls: list[_Impl] = []

    def attempt(impl: str, act_mode: str, backend: str, make: Callable[[], _Impl],
                chosen: bool = False) -> None:
        pbar.set_postfix_str(f"{shape.name} b{batch} {impl}", refresh=True)
        try:
            impls.append(dataclasses.replace(make(), chosen=chosen))
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            log.error("%s batch %d %s failed: %s", shape.name, batch, impl, msg)
            failures.append((shape.label, batch, impl, msg))
            impls.append(_Impl(impl=impl, act_mode=act_mode, backend=backend,
                               note=f"failed: {msg}"[:500], chosen=chosen))

    def tvm_case(lx: Any, act_mode: str, rule: Any, impl: str | None = None,
                 out_clip: tuple[int, int] | None = None) -> Callable[[], _Impl]:
        def make() -> _Impl:
            target = _rule_target(rule, tinfo)
            if tune and len(rule.grid) > 1 and target is tinfo:
                tuning.search(lx, batch, tinfo.name, rule=rule, threads=threads,
                              max_points=tune_points, budget_s=tune_budget_s)
            prep = tuning.prepare_rule(rule, lx, batch, target, out_clip=out_clip)
            return _tvm_impl(prep, act_mode, rule.name, dev, impl)

        return make

    dense = {"fp32": synthetic_layer(shape, "fp32", "fp32"),
             "int8": synthetic_layer(shape, "int8", "int8")}
    attempt("torch_fp32", "fp32", "torch", lambda: _torch_fp32_impl(dense["fp32"], batch, threads))
    attempt("torch_int8", "int8", "torch", lambda: _torch_int8_impl(dense["fp32"], batch))
    for mode in ("fp32", "int8"):
        lx = dense[mode]
        rule = measure.select_rule(lx, tinfo)
        attempt(rule.impl_for(lx), mode, "tvm", tvm_case(lx, mode, rule))
    gen = {r.name: r for r in gen_mod.rules()}
    for mode in act_modes:
        lx = synthetic_layer(shape, "ternary", mode)
        rule = measure.select_rule(lx, tinfo)
        attempt(rule.impl_for(lx), mode, "tvm", tvm_case(lx, mode, rule), chosen=True)
        for alt in _alternatives(lx, rule, tinfo):  # the other recipes, same run
            attempt(alt.impl_for(lx), mode, "tvm", tvm_case(lx, mode, alt))
        for q8 in _int8_output_rules(lx, tinfo):  # ``_q8``: int8 outputs, as torch int8's
            attempt(f"{q8.impl_for(lx)}{Q8_SUFFIX}", mode, "tvm",
                    tvm_case(lx, mode, q8, f"{q8.impl_for(lx)}{Q8_SUFFIX}", Q8_CLIP))
        if generic:
            g = gen["generic.t2" if mode == "int8" else "generic.tt_popc"]
            if g.name != rule.name:
                attempt(g.impl_for(lx), mode, "tvm", tvm_case(lx, mode, g))
        if ms_trials:
            def make_ms(lx: Any = lx, mode: str = mode) -> _Impl:
                kern = tuning.tune_metaschedule(lx, batch, tinfo.name, trials=ms_trials,
                                                threads=threads)
                return _tvm_impl(tuning.prepare_kernel(kern, lx, tinfo), mode,
                                 "metaschedule", dev)

            attempt("tvm_metaschedule", mode, "tvm", make_ms)
    from ternbench.methods.fgq import GROUP_ORDER

    for gs in group_sizes:  # FGQ: one scale per group of gs weights, int8 activations
        for axis in group_axes:  # flat_fanin rows are suffixed: the default is cin_contiguous
            lx = synthetic_layer(shape, "ternary", "int8", group_size=gs,
                                 group_order=GROUP_ORDER[axis])
            rule = measure.select_rule(lx, tinfo)
            tag = f"_g{gs}" + ("" if axis == "cin_contiguous" else "_flat")
            name = f"{rule.impl_for(lx)}{tag}"
            attempt(name, "int8", "tvm", tvm_case(lx, "int8", rule, name))
            for alt in _group_alternatives(lx, rule, tinfo):  # ``_alt``: not chosen
                name = f"{alt.impl_for(lx)}{tag}_alt"
                attempt(name, "int8", "tvm", tvm_case(lx, "int8", alt, name))
    return impls


def _group_alternatives(lx: Any, chosen: Any, tinfo: Any) -> list[Any]:
    """Where FGQ's grouped layer runs on AMX-BF16 (``tvm_bf16_amx``), the integer group kernel
    of the highest ISA this CPU has, timed beside it (what a CPU without AMX runs)."""
    if tinfo.family != "x86" or chosen.name != "x86.bf16_amx":
        return []
    from ternbench.schedules import x86

    return [r for r in x86.rules() if r.name in _INT8_ACT_RULES and r.applies(lx, tinfo)][:1]


#: x86 rules of an ISA level below AVX-512 that are timed beside the chosen kernels there
_RULE_LEVEL = {"x86.t2_avx2": "avx2"}


def _rule_target(rule: Any, tinfo: Any) -> Any:
    """The target to build ``rule`` for: a lower ISA level's rule (``x86.t2_avx2`` on an
    AVX-512 CPU) is compiled as for a CPU of that level (LLVM ``mattr`` ``-avx512f``...), as
    that CPU would run it. Built for the whole host CPU instead, LLVM's AVX-512 code around its
    AVX2 intrinsics took 0.98-1.56x the time on the CIFAR convs (one process, Intel
    emeraldrapids: docs/measured/ab-x86-emr-avx2-build-target.txt)."""
    level = _RULE_LEVEL.get(rule.name)
    if tinfo.family != "x86" or level is None or level == tinfo.isa:
        return tinfo
    from ternbench.schedules import x86_target_at

    return x86_target_at(level)


#: the x86 int8-activation ternary rules besides the table lookups, highest ISA first
_INT8_ACT_RULES = ("x86.t2_avx512vnni", "x86.t2_avxvnni", "x86.t2_avx2")
#: the x86 ternary-activation popcount rules, highest ISA first
_TT_ACT_RULES = ("x86.tt_popc512", "x86.tt_popc")


def _alternatives(lx: Any, chosen: Any, tinfo: Any) -> list[Any]:
    """Every other ternary recipe this CPU runs for the layer's activations, timed beside the
    chosen one; x86 only. int8 activations: table lookups (``tvm_t2_lut``, convs), AMX
    ``tdpbssd`` (``tvm_t2_amx``, convs with 64k input channels, on AMX-INT8), ``vpdpbusd``
    tiles (``tvm_t2_vnni``) and AVX2's ``vpmaddubsw`` int16 chains (``tvm_t2_avx2``, built
    for the avx2 level: :func:`_rule_target`). Ternary activations: AMX tiles
    (``tvm_tt_amx``, convs with 64k input channels), byte-table lookups (``tvm_tt_lut``,
    convs) and the popcount kernel (``tvm_tt_popc``)."""
    if tinfo.family != "x86" or lx.act_mode not in ("int", "ternary"):
        return []
    from ternbench.schedules import x86

    if lx.act_mode == "ternary":
        rules = [x86.tt_amx_rule(where_chosen=False), x86.tt_lut_rule(where_chosen=False),
                 *(r for r in x86.rules() if r.name in _TT_ACT_RULES)]
    else:
        rules = [x86.lut_rule(where_chosen=False), x86.amx_rule(where_chosen=False),
                 *(r for r in x86.rules() if r.name in _INT8_ACT_RULES)]
    seen, out = {chosen.impl}, []
    for rule in rules:
        if rule.impl not in seen and rule.applies(lx, tinfo):
            seen.add(rule.impl)
            out.append(rule)
    return out


#: impl suffix of the kernels timed with int8 outputs (requantized in their epilogue, as torch's
#: quantized conv writes quint8), and their clip range
Q8_SUFFIX, Q8_CLIP = "_q8", (-128, 127)


def _int8_output_rules(lx: Any, tinfo: Any) -> list[Any]:
    """The rule timed again with int8 outputs (:attr:`.ops.GemmSpec.out_clip`) beside the
    float32-output kernels the per-layer figures hold: on x86 the AMX rule of the layer's
    activations where it applies (convs with 64k input channels on AMX-INT8), else the
    table-lookup rule where it can run (one-group convs on AVX-512BW; chosen or not)."""
    if tinfo.family != "x86" or lx.act_mode not in ("int", "ternary"):
        return []
    from ternbench.schedules import x86

    tt = lx.act_mode == "ternary"
    for make in ((x86.tt_amx_rule, x86.tt_lut_rule) if tt else (x86.amx_rule, x86.lut_rule)):
        rule = make(where_chosen=False)
        if rule.applies(lx, tinfo):
            return [rule]
    return []


def _import_tvm() -> Any:
    from ternbench import schedules

    return schedules.require_tvm()


def _time_group(impls: list[_Impl], *, threads: int, rounds: int, min_s: float) -> None:
    """Calibrate, then time all impls interleaved: each round takes one sample of each, in a
    rotating order (no impl always runs right after the same neighbour)."""
    import torch
    from ternbench import schedules

    live = [i for i in impls if i.run_n is not None]
    prev_torch, prev_tvm = torch.get_num_threads(), schedules.num_threads()
    try:
        torch.set_num_threads(threads)
        tvm_used = schedules.set_num_threads(threads)
        with _quiet_torch_quant(), torch.inference_mode():
            for i in live:
                i.threads = tvm_used if i.backend == "tvm" else torch.get_num_threads()
                i.number = _calibrate(i.run_n, min_s)  # type: ignore[arg-type]
            for r in range(rounds):
                for j in range(len(live)):
                    i = live[(j + r) % len(live)]
                    i.samples.append(i.run_n(i.number))  # type: ignore[misc]
    finally:
        torch.set_num_threads(prev_torch)
        schedules.set_num_threads(prev_tvm)


def run_kernels(out: str | Path, *, threads: int = 1, suites: str | Iterable[str] = "all",
                batches: Sequence[int] = (1, 64), act_modes: Sequence[str] = ACT_MODES,
                tune: bool = False, tune_points: int | None = None,
                tune_budget_s: float | None = None, metaschedule_trials: int = 0,
                generic: bool = False, quick: bool = False, rounds: int | None = None,
                layers: Sequence[str] | None = None, shapes: Sequence[KernelShape] | None = None,
                progress: bool | None = None, group_sizes: Sequence[int] = (),
                group_axes: Sequence[str] = ("cin_contiguous",)) -> KernelsResult:
    """Run the kernel benchmark into ``out`` (``kernels.csv``, ``kernels.md``).

    ``layers`` keeps the layers matching a pattern (see :func:`select_shapes`); ``shapes``
    overrides ``suites`` and ``layers`` (any :class:`KernelShape`); ``tune`` runs the cached grid
    search (:func:`ternbench.schedules.tuning.search`, ``tune_points`` / ``tune_budget_s``
    per rule and shape) before building; ``metaschedule_trials`` > 0 adds the MetaSchedule
    baseline for int8 activations. ``group_sizes``: also the int8-activation ternary kernel
    with FGQ group scales of each size (impl ``<impl>_g<N>``), for each of ``group_axes``
    (FGQ's ``cin_contiguous``, or ``flat_fanin``: impl ``<impl>_g<N>_flat``). ``quick``: 3
    rounds of >= 2 ms samples and a smaller bandwidth buffer (tests, CI). Failed impls are rows
    with an empty time and a ``note``.
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    bad = [b for b in batches if int(b) < 1]
    if bad or not batches:
        raise ValueError(f"batches must be >= 1, got {list(batches)}")
    bad_modes = [m for m in act_modes if m not in ACT_MODES]
    if bad_modes:
        raise ValueError(f"act modes must be among {ACT_MODES}, got {bad_modes}")
    from ternbench.methods.fgq import GROUP_ORDER

    bad_axes = [a for a in group_axes if a not in GROUP_ORDER]
    if bad_axes or not group_axes:
        raise ValueError(f"group axes must be among {tuple(GROUP_ORDER)}, got {list(group_axes)}")
    for note in configure_env(threads):
        log.warning(note)
    from ternbench import schedules

    shapes = list(shapes) if shapes is not None else select_shapes(suites, layers)
    n_rounds = rounds or (QUICK_ROUNDS if quick else ROUNDS)
    min_s = QUICK_SAMPLE_S if quick else SAMPLE_S
    tinfo = schedules.target_info("x86")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bw = measure_bandwidth(quick)
    log.info("1-thread read bandwidth %.1f GB/s; %d shapes x %d batches, %d thread(s)", bw,
             len(shapes), len(batches), threads)
    peaks = measure_peaks()
    if peaks:
        log.info("1-thread instruction peaks (GMAC/s): %s",
                 ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    prov = {"tvm_version": schedules.tvm_version() or "", "torch_version": torch.__version__,
            "cpu": f"{_cpu_name()} ({tinfo.mcpu})", "isa": tinfo.isa, "git": _git_describe()}
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, int, str, str]] = []
    groups = [(s, int(b)) for s in shapes for b in batches]
    show = (sys.stderr.isatty() if progress is None else progress)
    with tqdm(groups, desc="kernels", unit="shape", disable=not show) as pbar:
        for done, (shape, batch) in enumerate(pbar, 1):
            impls = _group(shape, batch, threads=threads, act_modes=act_modes, tinfo=tinfo,
                           tune=tune, tune_points=tune_points, tune_budget_s=tune_budget_s,
                           ms_trials=metaschedule_trials, generic=generic, failures=failures,
                           pbar=pbar, group_sizes=group_sizes, group_axes=group_axes)
            pbar.set_postfix_str(f"{shape.name} b{batch} timing", refresh=True)
            _time_group(impls, threads=threads, rounds=n_rounds, min_s=min_s)
            rows += _rows(shape, batch, impls, bandwidth_gbs=bw, rounds=n_rounds, prov=prov)
            if not show:  # no bar (not a terminal): one line per shape instead
                # (a disabled bar does not count: pbar.n stays 0)
                log.info("[%d/%d] %s batch %d: %d impls timed", done, len(groups),
                         shape.name, batch, sum(1 for i in impls if i.samples))
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    csv_path, md_path = out / "kernels.csv", out / "kernels.md"
    df.to_csv(csv_path, index=False)
    meta = {"when": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "threads": threads, "bandwidth_gbs": bw, "rounds": n_rounds, "peaks": peaks,
            **prov}
    md_path.write_text(_markdown(df, meta))
    log.info("wrote %s and %s (%d rows, %d failed)", csv_path, md_path, len(df), len(failures))
    return KernelsResult(frame=df, csv_path=csv_path, md_path=md_path,
                         failures=tuple(failures), bandwidth_gbs=bw, peaks=peaks)

