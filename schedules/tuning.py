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
:func:`ternbench.schedules.measure.build_layer` uses when no params are given.

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

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _tvm, measure, ops
from .measure import EvaluatorCfg, KernelMismatchError, LayerLatency
from .ops import Params, Rule

if TYPE_CHECKING:
    from ternbench.methods._base import LayerExport

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

#: bump when the cache layout or the meaning of a key changes (old files then simply miss)
FORMAT = 1
#: evaluator of the search: short, since only the ranking of the points matters
SEARCH_EV = EvaluatorCfg(number=5, repeat=5, min_repeat_ms=10)
#: GemmSpec fields that come from the tile parameters (everything else is the shape)
_TILE_FIELDS = ("nb", "mb", "m_task")
_PARAM_DEPENDENT = frozenset({*_TILE_FIELDS, "Np"})
_STATUSES = ("ok", "failed", "mismatch")


def tuning_dir() -> Path:
    """Folder of the search cache.

    Same root as :func:`ternbench.bench.cache.cache_dir` (``$TERNBENCH_CACHE``, else
    ``$XDG_CACHE_HOME/ternbench``, else ``~/.cache/ternbench``), plus ``tuning/``; resolved
    here rather than imported, since ``ternbench.bench`` depends on the schedules, not the
    other way round.
    """
    env = os.environ.get("TERNBENCH_CACHE")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ternbench"
    return root / "tuning"


# ----------------------------------------------------------------------------- keys


@functools.cache
def _code_fingerprint(*funcs: Any) -> str:
    """Short hash of the source of a rule's plan/schedule functions: editing a schedule makes
    its old timings miss instead of steering the new code."""
    h = hashlib.sha256()
    for f in funcs:
        try:
            src = inspect.getsource(f)
        except (OSError, TypeError):  # no source (built-in, REPL): the qualified name
            src = f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', repr(f))}"
        h.update(src.encode())
    return h.hexdigest()[:16]


def tuning_key(rule: Rule, lx: LayerExport, batch: int, tinfo: _tvm.TargetInfo) -> dict[str, Any]:
    """Everything that decides ``rule``'s kernel for ``lx`` at ``batch`` except the tile
    parameters (JSON-able; its hash names the cache file).

    The shape part is the rule's :class:`~.ops.GemmSpec` at its default point without the tile
    fields (``nb``, ``mb``, ``m_task``, and ``Np``, which follows ``nb``).
    """
    spec = rule.plan(lx, batch, tinfo, dict(rule.default_params))
    shape = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _PARAM_DEPENDENT}
    shape["M"] = spec.M
    return {
        "format": FORMAT,
        "op": spec.op,
        "shape": json.loads(json.dumps(shape)),  # tuples -> lists, as they come back from disk
        "act_mode": lx.act_mode,
        "weight_format": lx.weight_format,
        "target": tinfo.target_str,
        "rule": rule.name,
        "code": _code_fingerprint(rule.plan, rule.schedule),
        "tvm": _tvm.tvm_version() or "unknown",
    }


def key_digest(key: Mapping[str, Any]) -> str:
    """Stable 20-hex digest of a key (sorted JSON)."""
    blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cache_path(key: Mapping[str, Any]) -> Path:
    """``tuning_dir() / <rule>-<digest>.json``."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(key["rule"]))
    return tuning_dir() / f"{safe}-{key_digest(key)}.json"


def point_id(params: Params, threads: int) -> str:
    """Identity of one measured point: its params (sorted JSON) and the thread count."""
    p = json.dumps({k: int(v) for k, v in params.items()}, sort_keys=True, separators=(",", ":"))
    return f"{p}@{int(threads)}t"


# ----------------------------------------------------------------------------- cache files


@dataclass(frozen=True)
class PointResult:
    """One grid point of one shape: ``status`` ``ok`` (timed), ``failed`` (plan, schedule or
    build raised: ``why``) or ``mismatch`` (built but disagreed with the reference)."""

    params: dict[str, int]
    threads: int
    status: str
    median_us: float | None = None
    tiles: dict[str, int] | None = None  # the spec's (nb, mb, m_task): equal tiles = one kernel
    build_s: float | None = None
    max_abs_err: float | None = None
    why: str = ""
    when: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> PointResult:
        if not isinstance(d, dict):
            raise ValueError(f"point is {type(d).__name__}, not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        if not {"params", "threads", "status"} <= set(d) or set(d) - names:
            raise ValueError(f"point has fields {sorted(d)}")
        if d["status"] not in _STATUSES or not isinstance(d["params"], dict):
            raise ValueError(f"bad point {d!r}")
        med = d.get("median_us")
        if d["status"] == "ok" and not (isinstance(med, int | float) and math.isfinite(med)
                                        and med > 0):
            raise ValueError(f"ok point without a positive median: {d!r}")
        return cls(**{**d, "params": {str(k): int(v) for k, v in d["params"].items()},
                      "threads": int(d["threads"])})


def _read(path: Path, key: Mapping[str, Any]) -> dict[str, PointResult]:
    """The points stored for ``key`` (empty when the file is missing; a corrupt or foreign file
    is ignored with a warning and will be overwritten by the next search)."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("ignoring unreadable tuning cache %s: %s", path, exc)
        return {}
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a tuning cache file of this format")
        if doc.get("key") != json.loads(json.dumps(dict(key))):
            raise ValueError("its key differs from the expected one")
        pts = [PointResult.from_json(p) for p in doc.get("points", [])]
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        log.warning("ignoring corrupt tuning cache %s: %s", path, exc)
        return {}
    return {point_id(p.params, p.threads): p for p in pts}


_MEMO: dict[Path, tuple[tuple[int, int], dict[str, PointResult]]] = {}


def _read_memo(path: Path, key: Mapping[str, Any]) -> dict[str, PointResult]:
    """:func:`_read`, remembered per (mtime, size): build_layer asks on every build."""
    try:
        st = path.stat()
    except OSError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _MEMO.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    pts = _read(path, key)
    _MEMO[path] = (stamp, pts)
    return pts


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock on ``<path>.lock`` (POSIX), so concurrent searches merge their points."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: last writer wins
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _store(path: Path, key: Mapping[str, Any], new: Mapping[str, PointResult]) -> None:
    """Merge ``new`` into the file (re-read under the lock) and replace it atomically."""
    with _locked(path):
        pts = {**_read(path, key), **new}
        doc = {"format": FORMAT, "key": dict(key),
               "points": [p.to_json() for p in pts.values()]}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    _MEMO.pop(path, None)


def _in_grid(params: Mapping[str, int], rule: Rule) -> bool:
    return any({k: int(v) for k, v in g.items()} == dict(params) for g in rule.grid)


def cached_params(rule: Rule, lx: LayerExport, batch: int, tinfo: _tvm.TargetInfo,
                  threads: int | None = None) -> Params | None:
    """Best cached grid point of ``rule`` for this shape, or None (no search result yet).

    Only points still in the rule's grid count. ``threads``: the points measured with that
    thread count; by default those of 1 thread, else of the smallest count searched. Never
    raises: a layer the rule cannot plan simply has no cached point.
    """
    try:
        key = tuning_key(rule, lx, batch, tinfo)
    except Exception as exc:  # the build that follows raises the real error
        log.debug("no tuning key for %s/%s: %s", rule.name, lx.name, exc)
        return None
    ok = [p for p in _read_memo(cache_path(key), key).values()
          if p.status == "ok" and _in_grid(p.params, rule)]
    if not ok:
        return None
    counts = {p.threads for p in ok}
    want = threads if threads is not None else (1 if 1 in counts else min(counts))
    pts = [p for p in ok if p.threads == want]
    if not pts:
        return None
    best = min(pts, key=lambda p: float(p.median_us))  # type: ignore[arg-type]
    return dict(best.params)


# ----------------------------------------------------------------------------- measuring


@dataclass
class PreparedKernel:
    """A built kernel with its runtime arguments, already checked against the reference.

    ``nbytes`` is the data a call must move at least: kernel input, weight arguments (packed
    weights, scales, bias) and the float32 output.
    """

    kernel: ops.Kernel
    a: np.ndarray
    args: list[Any]
    out: Any
    max_abs_err: float
    nbytes: int

    def __call__(self) -> None:
        self.kernel.func(*self.args, self.out)


def prepare_kernel(kern: ops.Kernel, lx: LayerExport, tinfo: _tvm.TargetInfo) -> PreparedKernel:
    """Runtime arguments for ``kern`` (seeded input), one run, and the reference check.

    Raises :class:`~.measure.KernelMismatchError` when the output disagrees with
    :func:`~.measure.reference_output`; a kernel that fails here is never timed.
    """
    if not tinfo.local:
        raise RuntimeError(f"target {tinfo.name!r} does not run in this process")
    tvm = _tvm.require_tvm()
    dev = tvm.cuda(0) if tinfo.family == "cuda" else tvm.cpu(0)
    a = measure.kernel_input(lx, kern.spec)
    weights = kern.pack(lx)
    args = [tvm.runtime.tensor(v, dev) for v in (a, *weights)]
    out = tvm.runtime.empty((kern.spec.M, kern.spec.N), "float32", dev)
    kern.func(*args, out)
    err = measure._check(lx.name, kern.impl, out.numpy(), measure.reference_output(lx, a),
                         measure._rtol(kern.spec))
    nbytes = a.nbytes + sum(w.nbytes for w in weights) + kern.spec.M * kern.spec.N * 4
    return PreparedKernel(kern, a, args, out, err, int(nbytes))


def prepare_rule(rule: Rule, lx: LayerExport, batch: int, tinfo: _tvm.TargetInfo,
                 params: Params | None = None) -> PreparedKernel:
    """Build ``rule``'s kernel for ``lx`` (``params`` None: the cached best point, else the
    rule's default), then :func:`prepare_kernel`."""
    if params is None:
        params = cached_params(rule, lx, batch, tinfo)
    return prepare_kernel(rule.build(lx, batch, tinfo, params), lx, tinfo)


def measure_rule(rule: Rule, lx: LayerExport, batch: int, tinfo: _tvm.TargetInfo,
                 params: Params | None = None, *, ev: EvaluatorCfg = SEARCH_EV,
                 threads: int = 1) -> tuple[LayerLatency, ops.Kernel]:
    """:func:`~.measure.measure_layer` for an explicit rule and grid point: build, check against
    the reference, then time with ``time_evaluator`` on ``threads`` threads."""
    prep = prepare_rule(rule, lx, batch, tinfo, params)
    kern, spec = prep.kernel, prep.kernel.spec
    tvm = _tvm.require_tvm()
    dev = tvm.cuda(0) if tinfo.family == "cuda" else tvm.cpu(0)
    cpu = tinfo.family != "cuda"
    prev = _tvm.num_threads()
    try:
        used = _tvm.set_num_threads(threads) if cpu else 0
        timer = kern.module.time_evaluator("main", dev, number=ev.number, repeat=ev.repeat,
                                           min_repeat_ms=ev.min_repeat_ms)
        res = timer(*prep.args, prep.out)
    finally:
        if cpu:
            _tvm.set_num_threads(prev)
    raw = tuple(float(r) * 1e6 for r in res.results)
    lat = LayerLatency(layer=lx.name, impl=kern.impl, target=tinfo.name,
                       median_us=float(statistics.median(raw)), raw_us=raw, threads=used,
                       batch=batch, M=spec.M, K=spec.K, N=spec.N, max_abs_err=prep.max_abs_err,
                       target_str=kern.target_str)
    return lat, kern


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
        if lx.weight_offset is not None and np.any(np.asarray(lx.weight_offset)):
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

