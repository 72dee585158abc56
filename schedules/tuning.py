"""Per-shape tuning: a search over a rule's tile grid, cached on disk; MetaSchedule opt-in.

Tier 1 (:func:`search`, seconds to minutes): every point of ``Rule.grid`` (first = default) is
planned, built, checked against the float64 reference of the layer *before* it is timed, and
timed with ``time_evaluator``; the fastest median wins. Points whose plan, schedule or build
raises are skipped (logged with the reason); grid points that plan to the same kernel (e.g.
every ``mb`` at batch 1) are built and timed once.

Results go to one JSON file per (rule, shape) under :func:`tuning_dir` (``$TERNBENCH_CACHE/
tuning``, else ``$XDG_CACHE_HOME/ternbench/tuning``, else ``~/.cache/ternbench/tuning``),
written atomically. The file's key holds everything that decides the kernel apart from the tile
parameters: op, GEMM geometry (M, K, N, G, gs, padding, conv geometry), activation dtype,
weight layout, target string, rule name, a fingerprint of the rule's plan/schedule code and
the TVM version; each point is stored per (params, threads) with its median µs.
:func:`cached_params` returns the best stored point of a shape, which
:func:`ternbench.schedules.measure.build_layer` uses when no params are given. The cache
itself lives in :mod:`.tuning_cache` (below both this module and ``measure``, which therefore
do not import each other in a circle); its names are re-exported here. Building, checking and
timing a kernel are :func:`.measure.prepare_kernel` and :func:`.measure.time_kernel`, the same
code ``measure_layer`` runs.

Tier 2 (:func:`tune_metaschedule`, opt-in, minutes to hours): TVM's MetaSchedule on a
single-producer workload (``t2_decoded``: decode stage -> int32 GEMM -> scale epilogue;
``tt_planes`` for ternary activations), with the builder fixes of ``shared/notes/tvm.md``
§3. It serves as a baseline (``tvm_metaschedule``): it cannot find the AVX2 ``vpmaddubsw``
formulation of the hand schedule.

Example:
    >>> from ternbench.schedules import tuning
    >>> tuning.point_id({"nb": 8, "mb": 4}, 1)
    '{"mb":4,"nb":8}@1t'
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _tvm, measure, ops
from .measure import (
    EvaluatorCfg,
    KernelMismatchError,
    LayerLatency,
    PreparedKernel,
    prepare_kernel,
    time_kernel,
)
from .ops import Params, Rule
from .tuning_cache import (  # the cache is re-exported: tuning.cached_params, ...
    _MEMO,  # noqa: F401  (tests clear it)
    _PARAM_DEPENDENT,
    _TILE_FIELDS,
    FORMAT,
    PointResult,
    _read,
    _store,
    cache_path,
    cached_params,
    key_digest,
    point_id,
    tuning_dir,
    tuning_key,
)

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

__all__ = [
    "FORMAT",
    "SEARCH_EV",
    "PointResult",
    "SearchResult",
    "PreparedKernel",
    "tuning_dir",
    "tuning_key",
    "key_digest",
    "cache_path",
    "point_id",
    "search",
    "cached_params",
    "prepare_kernel",
    "prepare_rule",
    "measure_rule",
    "metaschedule_layout",
    "tune_metaschedule",
]

log = logging.getLogger(__name__)

#: evaluator of the search: short, since only the ranking of the points matters
SEARCH_EV = EvaluatorCfg(number=5, repeat=5, min_repeat_ms=10)


# ----------------------------------------------------------------------------- measuring


def prepare_rule(rule: Rule, lx: LayerExport, batch: int, tinfo: _tvm.TargetInfo,
                 params: Params | None = None, *,
                 out_clip: tuple[int, int] | None = None) -> PreparedKernel:
    """Build ``rule``'s kernel for ``lx`` (``params`` None: the cached best point, else the
    rule's default; ``out_clip``: int8 outputs, :attr:`.ops.GemmSpec.out_clip`), then
    :func:`~.measure.prepare_kernel` (seeded input, checked)."""
    if params is None:
        params = cached_params(rule, lx, batch, tinfo)
    return prepare_kernel(rule.build(lx, batch, tinfo, params, out_clip=out_clip), lx, tinfo)


def measure_rule(rule: Rule, lx: LayerExport, batch: int, tinfo: _tvm.TargetInfo,
                 params: Params | None = None, *, ev: EvaluatorCfg = SEARCH_EV,
                 threads: int = 1) -> tuple[LayerLatency, ops.Kernel]:
    """:func:`~.measure.measure_layer` for an explicit rule and grid point: build, check against
    the reference, then time with ``time_evaluator`` on ``threads`` threads."""
    prep = prepare_rule(rule, lx, batch, tinfo, params)
    return time_kernel(prep, lx, tinfo, ev=ev, threads=threads), prep.kernel


# ----------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class SearchResult:
    """Outcome of :func:`search` for one (rule, shape, threads).

    ``measured`` counts the points planned/built/timed by this call, ``reused`` those taken
    from the cache file; ``points`` lists every point considered, in grid order.
    """

    rule: str
    layer: str
    path: Path
    best: dict[str, int]
    best_us: float
    default_us: float | None
    points: tuple[PointResult, ...] = field(repr=False)
    measured: int = 0
    reused: int = 0

    @property
    def gain(self) -> float | None:
        """Default median / best median (>= 1), when the default point was timed."""
        return None if not self.default_us else self.default_us / self.best_us


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def search(lx: LayerExport, batch: int = 1, target: str = "x86", *, rule: Rule | None = None,
           threads: int = 1, max_points: int | None = None, budget_s: float | None = None,
           ev: EvaluatorCfg = SEARCH_EV, force: bool = False) -> SearchResult:
    """Time the grid points of ``rule`` (default: the rule ``target`` selects for ``lx``) and
    cache the medians; returns the fastest point.

    ``max_points`` keeps the first points of the grid (the default is first); ``budget_s``
    stops measuring new points once that many seconds have passed (the first point is always
    measured). Points already in the cache are not rebuilt unless ``force``. Raises
    :class:`RuntimeError` when no point could be timed.

    Example:
        >>> res = search(layer, batch=1, max_points=3)  # doctest: +SKIP
        >>> res.best, res.best_us                        # doctest: +SKIP
        ({'nb': 8, 'mb': 2, 'rows': 16}, 41.7)
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if max_points is not None and max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    tinfo = _tvm.target_info(target)
    if not tinfo.local:
        raise RuntimeError(f"target {target!r} ({tinfo.description}) cannot be timed here")
    rule = rule or measure.select_rule(lx, tinfo)
    key = tuning_key(rule, lx, batch, tinfo)
    path = cache_path(key)
    stored = {} if force else _read(path, key)
    grid = [{k: int(v) for k, v in p.items()} for p in (rule.grid or ({},))]
    if max_points is not None:
        grid = grid[:max_points]
    t0 = time.monotonic()
    seen: dict[tuple[int, ...], PointResult] = {}  # tiles -> timed point (same kernel)
    for p in stored.values():
        if p.status == "ok" and p.tiles and p.threads == threads:
            seen.setdefault(tuple(p.tiles[f] for f in _TILE_FIELDS), p)
    results: list[PointResult] = []
    new: dict[str, PointResult] = {}
    measured = reused = 0
    for params in grid:
        pid = point_id(params, threads)
        if pid in stored:
            results.append(stored[pid])
            reused += 1
            continue
        if budget_s is not None and measured and time.monotonic() - t0 > budget_s:
            log.info("%s/%s: tuning budget of %.0f s spent after %d new points", rule.name,
                     lx.name, budget_s, measured)
            break
        res = _measure_point(rule, lx, batch, tinfo, params, threads, ev, seen)
        results.append(res)
        new[pid] = res
        measured += 1
        _store(path, key, {pid: res})  # per point: an interrupted search keeps its progress
    ok = [r for r in results if r.status == "ok"]
    if not ok:
        why = "; ".join(f"{r.params}: {r.why}" for r in results)
        raise RuntimeError(f"{rule.name}/{lx.name}: no grid point could be timed ({why})")
    best = min(ok, key=lambda r: float(r.median_us))  # type: ignore[arg-type]
    default = next((r for r in results if r.params == grid[0] and r.status == "ok"), None)
    log.info("%s %s batch %d: best %s %.1f us (%d new, %d cached)", rule.name, lx.name, batch,
             best.params, best.median_us, measured, reused)
    return SearchResult(rule=rule.name, layer=lx.name, path=path, best=dict(best.params),
                        best_us=float(best.median_us),  # type: ignore[arg-type]
                        default_us=None if default is None else default.median_us,
                        points=tuple(results), measured=measured, reused=reused)


def _measure_point(rule: Rule, lx: LayerExport, batch: int, tinfo: _tvm.TargetInfo,
                   params: dict[str, int], threads: int, ev: EvaluatorCfg,
                   seen: dict[tuple[int, ...], PointResult]) -> PointResult:
    """Plan, build, check and time one grid point (or reuse the timing of the same kernel)."""
    try:
        spec = rule.plan(lx, batch, tinfo, params)
    except Exception as exc:
        log.info("%s %s: skipping %s: plan failed: %s", rule.name, lx.name, params, exc)
        return PointResult(params, threads, "failed", why=f"plan: {exc}", when=_now())
    tiles = {f: int(getattr(spec, f)) for f in _TILE_FIELDS}
    same = seen.get(tuple(tiles.values()))
    if same is not None:  # another grid point already gave this exact kernel
        return PointResult(params, threads, "ok", same.median_us, tiles, 0.0, same.max_abs_err,
                           why=f"same kernel as {same.params}", when=_now())
    try:
        lat, kern = measure_rule(rule, lx, batch, tinfo, params, ev=ev, threads=threads)
    except KernelMismatchError as exc:  # a schedule bug: loud, and never chosen
        log.error("%s %s: %s gives wrong results, skipped: %s", rule.name, lx.name, params, exc)
        return PointResult(params, threads, "mismatch", tiles=tiles, why=str(exc), when=_now())
    except Exception as exc:  # TVM raises plain errors from schedule primitives and codegen
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
        log.info("%s %s: skipping %s: %s", rule.name, lx.name, params, msg)
        return PointResult(params, threads, "failed", tiles=tiles, why=msg, when=_now())
    res = PointResult(params, threads, "ok", lat.median_us, tiles, round(kern.build_s, 4),
                      lat.max_abs_err, when=_now())
    seen[tuple(tiles.values())] = res
    return res


# ----------------------------------------------------------------------------- MetaSchedule


def metaschedule_layout(lx: LayerExport) -> ops.WeightLayout:
    """The single-producer workload MetaSchedule tunes for ``lx``.

    Ternary weights with int8 / float activations: ``t2_decoded`` (the 2-bit codes decoded to
    the accumulator type in a stage of their own, then a plain GEMM and the scale epilogue:
    every stage has one producer, which MetaSchedule's rules need; the two-producer epilogue
    of the AVX2 layout aborts tuning). Ternary activations: ``tt_planes`` without offsets
    (bit-plane stage, popcount GEMM, epilogue). int8 / fp32 weights: ``dense_blocked``.
    """
    if lx.act_mode == "ternary":
        if lx.weight_format != "ternary":
            raise ops.UnsupportedLayerError(f"{lx.name}: ternary activations need ternary "
                                            "weights")
        if ops.layer_offsets(lx)[1]:
            # `out` then has two producers (ep and asum): MetaSchedule's rules fail on it
            raise ops.UnsupportedLayerError(
                f"{lx.name}: no MetaSchedule workload for ternary layers with weight offsets")
        return "tt_planes"
    return "t2_decoded" if lx.weight_format == "ternary" else "dense_blocked"


def _ms_target(tinfo: _tvm.TargetInfo, threads: int) -> Any:
    tvm = _tvm.require_tvm()
    # MetaSchedule's CPU rules read "num-cores" (parallel extents); the hand schedules leave
    # it out so that one build serves every thread count
    return tvm.target.Target({**json.loads(tinfo.target_str), "num-cores": int(threads)})


def tune_metaschedule(lx: LayerExport, batch: int = 1, target: str = "x86", *,
                      trials: int = 64, work_dir: str | Path | None = None, threads: int = 1,
                      cost_model: str = "random", seed: int = 0,
                      max_workers: int | None = None, builder_timeout_s: float = 120.0
                      ) -> ops.Kernel:
    """Tune ``lx`` at ``batch`` with MetaSchedule and return the best kernel (impl
    ``tvm_metaschedule``), *not yet checked*: pass it to :func:`prepare_kernel`, which checks
    it against the reference before anything times it.

    The database lives in ``work_dir`` (default: under :func:`tuning_dir`, keyed by shape,
    target, TVM version, trials, threads, cost model and seed); a later call with the same key
    compiles the stored best schedule without tuning again. Builder workers get
    ``timeout_sec >= 120`` and :func:`._ms_worker_init.skip_tensor_intrin` (see that module).
    ``cost_model``: ``"random"`` (no extra dependency) or ``"xgb"`` (needs xgboost).
    Needs ``cloudpickle`` (TVM's worker pool pickles with it).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    try:
        import cloudpickle  # noqa: F401  (TVM's popen pool imports it in every worker)
    except ImportError as exc:
        raise ImportError("MetaSchedule needs cloudpickle: pip install cloudpickle") from exc
    tinfo = _tvm.target_info(target)
    if tinfo.family != "x86" or not tinfo.local:
        raise RuntimeError(f"MetaSchedule tuning runs on the local x86 target, not {target!r}")
    tvm = _tvm.require_tvm()
    from tvm.s_tir import meta_schedule as ms

    from . import _ms_worker_init

    layout = metaschedule_layout(lx)
    # the tiles of the spec only fix the packed weight layout (nb); MetaSchedule re-tiles loops
    spec = ops.plan_gemm(lx, batch, layout, nb=8, mb_max=1, rows_per_task=1)
    mod = tvm.IRModule({"main": ops.gemm_compute(spec)})
    tgt = _ms_target(tinfo, threads)
    shape = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _PARAM_DEPENDENT}
    key = {"format": FORMAT, "workload": layout, "shape": json.loads(json.dumps(shape)),
           "target": str(tgt), "tvm": _tvm.tvm_version() or "unknown", "trials": int(trials),
           "threads": int(threads), "cost_model": cost_model, "seed": int(seed)}
    wd = Path(work_dir) if work_dir is not None else (
        tuning_dir() / "metaschedule" / f"{spec.op}-{key_digest(key)}")
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sch = None
    if (wd / "database_tuning_record.json").exists():
        db = ms.database.JSONDatabase(work_dir=str(wd))
        if len(db.get_all_tuning_records()):
            sch = ms.tir_integration.compile_tir(db, mod, tgt)
            if sch is not None:
                log.info("metaschedule %s: reusing the database in %s", lx.name, wd)
    if sch is None:
        workers = max_workers or max(1, min(2, os.cpu_count() or 1))
        log.info("metaschedule %s (%s, M=%d K=%d N=%d): %d trials in %s", lx.name, layout,
                 spec.M, spec.K, spec.N, trials, wd)
        db = ms.tir_integration.tune_tir(
            mod, tgt, work_dir=str(wd), max_trials_global=int(trials),
            num_trials_per_iter=min(int(trials), 32), cost_model=cost_model,
            builder=ms.builder.LocalBuilder(
                max_workers=workers, timeout_sec=max(120.0, float(builder_timeout_s)),
                initializer=_ms_worker_init.skip_tensor_intrin),
            runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(
                number=3, repeat=1, min_repeat_ms=20)),
            num_tuning_cores=workers, seed=int(seed))
        sch = ms.tir_integration.compile_tir(db, mod, tgt)
    if sch is None:
        raise RuntimeError(f"metaschedule found no valid schedule for {lx.name} in {trials} "
                           f"trials (see the logs in {wd / 'logs'})")
    exe = tvm.compile(sch.mod, target=tgt)
    return ops.Kernel(rule="metaschedule", impl="tvm_metaschedule", spec=spec,
                      target_str=str(tgt), executable=exe, build_s=time.perf_counter() - t0,
                      params={"trials": int(trials)})

