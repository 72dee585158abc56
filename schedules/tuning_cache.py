"""The tuning cache: per-shape timings of a rule's grid points on disk, and the best point.

One JSON file per (rule, shape) under :func:`tuning_dir` (the ternbench cache root plus
``tuning/``), written atomically under a lock. The file's key holds everything that decides the
kernel apart from the tile parameters: op, GEMM geometry, activation dtype, weight layout, target
string, rule name, a fingerprint of the rule's plan/schedule code and the TVM version; each point
is stored per (params, threads) with its median µs. :func:`cached_params` returns the best stored
point of a shape, which :func:`.measure.build_layer` uses when no params are given;
:func:`.tuning.search` fills the files. This module measures nothing (no TVM import): it sits
below both ``measure`` and ``tuning``.

Example:
    >>> point_id({"nb": 8, "mb": 4}, 1)
    '{"mb":4,"nb":8}@1t'
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ternbench.core.files import atomic_write, cache_root

from . import _tvm
from .ops import Params, Rule

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

__all__ = [
    "FORMAT",
    "PointResult",
    "cache_path",
    "cached_params",
    "key_digest",
    "point_id",
    "tuning_dir",
    "tuning_key",
]

#: the cache belongs to the search: it logs under ``ternbench.schedules.tuning``
log = logging.getLogger(f"{__package__}.tuning")

#: bump when the cache layout or the meaning of a key changes (old files then simply miss)
FORMAT = 1
#: GemmSpec fields that come from the tile parameters (everything else is the shape)
_TILE_FIELDS = ("nb", "mb", "m_task")
_PARAM_DEPENDENT = frozenset({*_TILE_FIELDS, "Np"})
_STATUSES = ("ok", "failed", "mismatch")


def tuning_dir() -> Path:
    """Folder of the search cache: :func:`ternbench.core.files.cache_root` plus ``tuning/``."""
    return cache_root() / "tuning"


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
        atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())
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
