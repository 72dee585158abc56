"""ternbench.schedules.tuning: the cached grid search, its keys, and build_layer's use of it.

The cache lives in a per-test folder (``TERNBENCH_CACHE``); compiling tests are marked ``tvm``
and use tiny layers and a tiny evaluator, so they check plumbing, never speed.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
from ternbench.bench.kernels import KernelShape, synthetic_layer
from ternbench.schedules import _tvm, measure, tuning, x86
from ternbench.schedules.measure import EvaluatorCfg

EV = EvaluatorCfg(number=1, repeat=2, min_repeat_ms=0)
LIN = KernelShape("t", "t.lin", "linear", 64, 24)
CONV = KernelShape("t", "t.conv", "conv2d", 8, 16, (6, 6), 3, 1, 1)
#: a target description that needs no TVM (plans and keys are pure Python)
FAKE = _tvm.TargetInfo(name="x86", target_str='{"kind":"llvm","mcpu":"fake"}', kind="llvm",
                       mcpu="fake", is_x86=True, features=frozenset({"avx2"}))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TERNBENCH_CACHE", str(tmp_path / "cache"))
    tuning._MEMO.clear()
    yield tmp_path / "cache" / "tuning"
    tuning._MEMO.clear()


def _t2_rule(grid=None):
    rule = next(r for r in x86.rules() if r.name == "x86.t2_avx2")
    return rule if grid is None else dataclasses.replace(rule, grid=tuple(grid))


def _has_avx2() -> bool:
    return "avx2" in _tvm.target_info("x86").features


def _counting(monkeypatch):
    calls: list[dict] = []
    real = tuning.measure_rule

    def counted(rule, lx, batch, tinfo, params=None, **kw):
        calls.append(dict(params or {}))
        return real(rule, lx, batch, tinfo, params, **kw)

    monkeypatch.setattr(tuning, "measure_rule", counted)
    return calls


# ----------------------------------------------------------------------------- no TVM needed


def test_tuning_dir_follows_ternbench_cache(_cache, monkeypatch):
    assert tuning.tuning_dir() == _cache
    monkeypatch.delenv("TERNBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/y")
    assert str(tuning.tuning_dir()) == "/x/y/ternbench/tuning"


def test_key_covers_shape_target_rule_code_and_tvm_version(monkeypatch):
    rule = _t2_rule()
    lx = synthetic_layer(LIN)
    key = tuning.tuning_key(rule, lx, 4, FAKE)
    assert key["shape"]["M"] == 4 and key["shape"]["K"] == 64 and key["shape"]["N"] == 24
    assert key["shape"]["G"] == 1 and key["shape"]["act_dtype"] == "int8"
    assert key["rule"] == "x86.t2_avx2" and key["target"] == FAKE.target_str
    assert not {"nb", "mb", "m_task", "Np"} & set(key["shape"])  # tiles are the searched part
    base = tuning.cache_path(key)
    assert base.name.startswith("x86.t2_avx2-") and base.suffix == ".json"

    def path(**kw):
        return tuning.cache_path(tuning.tuning_key(kw.get("rule", rule), kw.get("lx", lx),
                                                   kw.get("batch", 4), kw.get("tinfo", FAKE)))

    assert path() == base  # stable
    assert path(batch=8) != base
    assert path(lx=synthetic_layer(CONV)) != base
    assert path(lx=synthetic_layer(LIN, seed=5)) == base  # weights are runtime arguments
    assert path(tinfo=dataclasses.replace(FAKE, target_str='{"mcpu":"other"}')) != base
    assert path(rule=dataclasses.replace(rule, schedule=lambda f, s: None)) != base  # code
    monkeypatch.setattr(_tvm, "tvm_version", lambda: "0.99.0")
    assert path() != base
    # the tile parameters and the thread count identify a point inside a file
    assert tuning.point_id({"nb": 8, "mb": 4}, 1) != tuning.point_id({"nb": 16, "mb": 4}, 1)
    assert tuning.point_id({"nb": 8}, 1) != tuning.point_id({"nb": 8}, 2)
    assert tuning.point_id({"mb": 4, "nb": 8}, 1) == tuning.point_id({"nb": 8, "mb": 4}, 1)


def _write_points(rule, lx, batch, pts):
    key = tuning.tuning_key(rule, lx, batch, FAKE)
    tuning._store(tuning.cache_path(key), key, {
        tuning.point_id(p.params, p.threads): p for p in pts})
    return tuning.cache_path(key)


def test_cached_params_picks_fastest_grid_point_per_thread_count():
    rule = _t2_rule()
    lx = synthetic_layer(LIN)
    g0, g1, g2 = (dict(p) for p in rule.grid[:3])
    assert tuning.cached_params(rule, lx, 4, FAKE) is None  # nothing searched yet
    _write_points(rule, lx, 4, [
        tuning.PointResult(g0, 1, "ok", 10.0), tuning.PointResult(g1, 1, "ok", 5.0),
        tuning.PointResult(g2, 1, "failed", why="boom"),
        tuning.PointResult(g2, 2, "ok", 1.0), tuning.PointResult(g0, 2, "ok", 3.0),
        tuning.PointResult({"nb": 999}, 1, "ok", 0.1),  # no longer in the grid: ignored
    ])
    assert tuning.cached_params(rule, lx, 4, FAKE) == g1  # 1 thread by default
    assert tuning.cached_params(rule, lx, 4, FAKE, threads=2) == g2
    assert tuning.cached_params(rule, lx, 4, FAKE, threads=3) is None
    assert tuning.cached_params(rule, lx, 8, FAKE) is None  # another shape


def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(caplog):
    rule = _t2_rule()
    lx = synthetic_layer(LIN)
    path = _write_points(rule, lx, 4, [tuning.PointResult(dict(rule.grid[1]), 1, "ok", 2.0)])
    assert tuning.cached_params(rule, lx, 4, FAKE) == dict(rule.grid[1])
    for bad in ("{not json", json.dumps({"format": 1, "key": {"rule": "other"}, "points": []}),
                json.dumps({"format": 1, "key": json.loads(path.read_text())["key"],
                            "points": [{"params": {}, "threads": 1, "status": "ok"}]}),
                "[]"):
        path.write_text(bad)
        tuning._MEMO.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ternbench.schedules.tuning"):
            assert tuning.cached_params(rule, lx, 4, FAKE) is None
        assert "ignoring corrupt tuning cache" in caplog.text
    # the next store replaces the corrupt file with a valid one
    _write_points(rule, lx, 4, [tuning.PointResult(dict(rule.grid[2]), 1, "ok", 2.0)])
    assert tuning.cached_params(rule, lx, 4, FAKE) == dict(rule.grid[2])


def test_cached_params_never_raises_for_unplannable_layers():
    rule = _t2_rule()
    lx = synthetic_layer(LIN, act="ternary")  # t2_avx2 cannot plan ternary activations
    assert tuning.cached_params(rule, lx, 1, FAKE) is None


# ----------------------------------------------------------------------------- compiling


@pytest.mark.tvm
def test_search_writes_cache_then_reuses_it_without_building(_cache, monkeypatch):
    pytest.importorskip("tvm")
    if not _has_avx2():
        pytest.skip("host has no AVX2")
    base = _t2_rule()
    # three distinct kernels: nb 16 / 8 with row tiles; the fourth equals the third
    grid = [dict(base.grid[0]), {"nb": 8, "mb": 2, "rows": 16}, {"nb": 8, "mb": 4, "rows": 64},
            {"nb": 8, "mb": 4, "rows": 256}]
    rule = _t2_rule(grid[:3])
    lx = synthetic_layer(LIN)
    calls = _counting(monkeypatch)
    res = tuning.search(lx, 4, rule=rule, ev=EV)
    assert (res.measured, res.reused) == (3, 0) and len(calls) == 3
    assert res.path.exists() and res.path.parent == _cache
    doc = json.loads(res.path.read_text())
    assert doc["key"]["tvm"] == _tvm.tvm_version() and len(doc["points"]) == 3
    assert all(p["status"] == "ok" and p["median_us"] > 0 for p in doc["points"])
    assert all(p["max_abs_err"] <= 1e-3 for p in doc["points"])  # checked before timing
    assert res.best in grid[:3] and res.best_us == min(p["median_us"] for p in doc["points"])
    info = _tvm.target_info("x86")
    assert tuning.cached_params(rule, lx, 4, info) == res.best

    again = tuning.search(lx, 4, rule=rule, ev=EV)  # all cached: nothing built or timed
    assert (again.measured, again.reused) == (0, 3) and len(calls) == 3
    assert again.best == res.best

    calls.clear()  # a grid grown by one point measures that point only; it is the same kernel
    grown = tuning.search(lx, 4, rule=_t2_rule(grid), ev=EV)  # as grid[2]: no build either
    assert (grown.measured, grown.reused) == (1, 3) and calls == []
    assert "same kernel" in grown.points[3].why
    assert grown.points[3].median_us == grown.points[2].median_us

    calls.clear()  # another thread count is another point
    tuning.search(lx, 4, rule=rule, ev=EV, threads=2, max_points=1)
    assert len(calls) == 1


@pytest.mark.tvm
def test_search_skips_failing_points_and_respects_limits(monkeypatch, caplog):
    pytest.importorskip("tvm")
    if not _has_avx2():
        pytest.skip("host has no AVX2")
    base = _t2_rule()
    rule = _t2_rule([dict(base.grid[0]), {"nb": 12, "mb": 4, "rows": 64},
                     {"nb": 8, "mb": 2, "rows": 16}])
    lx = synthetic_layer(LIN)
    with caplog.at_level(logging.INFO, logger="ternbench.schedules.tuning"):
        res = tuning.search(lx, 2, rule=rule, ev=EV)
    bad = res.points[1]
    assert bad.status == "failed" and "multiple of 8" in bad.why  # nb=12 cannot be planned
    assert "skipping" in caplog.text
    assert res.best != {"nb": 12, "mb": 4, "rows": 64}
    assert tuning.cached_params(rule, lx, 2, _tvm.target_info("x86")) == res.best
    calls = _counting(monkeypatch)
    one = tuning.search(synthetic_layer(CONV), 1, rule=rule, ev=EV, max_points=1)
    assert len(one.points) == 1 and len(calls) == 1
    calls.clear()
    tuning.search(synthetic_layer(CONV), 2, rule=rule, ev=EV, budget_s=0.0)
    assert len(calls) == 1  # the first point is always measured, then the budget is spent
    with pytest.raises(ValueError, match="max_points"):
        tuning.search(lx, 1, rule=rule, max_points=0)


@pytest.mark.tvm
def test_search_records_mismatch_and_never_picks_it(monkeypatch):
    pytest.importorskip("tvm")
    base = next(r for r in x86.rules() if r.name == "x86.int8")
    rule = dataclasses.replace(base, grid=(dict(base.grid[0]), {"nb": 8, "mb": 2, "rows": 16}))
    lx = synthetic_layer(LIN, "int8", "int8")
    real = measure.reference_output
    monkeypatch.setattr(measure, "reference_output", lambda lx_, a: real(lx_, a) + 1.0)
    with pytest.raises(RuntimeError, match="no grid point"):
        tuning.search(lx, 3, rule=rule, ev=EV)
    key = tuning.tuning_key(rule, lx, 3, _tvm.target_info("x86"))
    pts = json.loads(tuning.cache_path(key).read_text())["points"]
    assert {p["status"] for p in pts} == {"mismatch"}
    assert tuning.cached_params(rule, lx, 3, _tvm.target_info("x86")) is None


@pytest.mark.tvm
def test_build_layer_uses_cached_params():
    pytest.importorskip("tvm")
    tuning.ops.clear_kernel_cache()  # a kernel of an equal spec may carry other grid params
    info = _tvm.target_info("x86")
    lx = synthetic_layer(CONV, "int8", "int8")
    rule = measure.select_rule(lx, info)
    default = dict(rule.default_params)
    other = next(dict(p) for p in rule.grid if p["nb"] != default["nb"])
    assert measure.build_layer(lx, 2, "x86").params == default  # nothing cached
    key = tuning.tuning_key(rule, lx, 2, info)
    tuning._store(tuning.cache_path(key), key, {
        tuning.point_id(default, 1): tuning.PointResult(default, 1, "ok", 9.0),
        tuning.point_id(other, 1): tuning.PointResult(other, 1, "ok", 4.0)})
    kern = measure.build_layer(lx, 2, "x86")
    assert kern.params == other and kern.spec.nb == other["nb"]
    assert measure.build_layer(lx, 2, "x86", params=default).params == default  # explicit wins
    assert measure.build_layer(lx, 1, "x86").params == default  # other batch: not tuned
    lat = measure.measure_layer(lx, batch=2, ev=EV)  # measure_layer builds the tuned kernel
    assert lat.max_abs_err <= 1e-3 and np.isfinite(lat.median_us)


@pytest.mark.tvm
@pytest.mark.slow
def test_metaschedule_tiny(tmp_path):
    """A few MetaSchedule trials (about 1-2 minutes on 2 cores: worker start-up dominates)."""
    pytest.importorskip("tvm")
    pytest.importorskip("cloudpickle")
    info = _tvm.target_info("x86")
    lx = synthetic_layer(KernelShape("t", "t.ms", "linear", 64, 32))
    wd = tmp_path / "ms"
    kern = tuning.tune_metaschedule(lx, 4, trials=4, work_dir=wd)
    assert kern.impl == "tvm_metaschedule" and kern.spec.layout == "t2_decoded"
    assert '"num-cores":1' in kern.target_str.replace(" ", "")
    prep = tuning.prepare_kernel(kern, lx, info)  # checked against the reference
    assert prep.max_abs_err <= measure.INT_RTOL * np.abs(measure.reference_output(
        lx, prep.a)).max()
    assert (wd / "database_tuning_record.json").exists()
    again = tuning.tune_metaschedule(lx, 4, trials=4, work_dir=wd)  # reuses the database
    assert again.build_s < kern.build_s
    with pytest.raises(tuning.ops.UnsupportedLayerError):
        tuning.metaschedule_layout(dataclasses.replace(
            synthetic_layer(LIN, act="ternary"), weight_offset=np.ones(24, np.float32)))
