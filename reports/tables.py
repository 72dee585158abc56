"""Pivot the tidy ``ternbench`` results into the report's numeric tables.

The runner writes one long-form row per cell x metric (``schema_version`` 1, see
:data:`COLUMNS`). This module turns that frame into a :class:`ReportData` bundle of *numeric*
tables (accuracy/cost, model latency per target, per-layer latency, failed cells, run metadata).
Plots and templates consume the same numeric tables, so every number in a report comes from one
place. Loading and the schema are in :mod:`.loading`, the ``format_*`` display helpers in
:mod:`.formatting`; both are re-exported here (``ternbench.reports.tables`` keeps its names).

Example:
    >>> from ternbench.reports.tables import load_results, prepare
    >>> df, metas = load_results("runs/2026-01-01")          # doctest: +SKIP
    >>> data = prepare(df, metas)                            # doctest: +SKIP
    >>> data.accuracy[["label", "model", "top1", "delta_top1"]]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .formatting import (
    DASH,
    fmt_num,
    fmt_ops,
    format_accuracy,
    format_failed,
    format_latency,
    format_layers,
    format_meta,
    format_model,
    format_status,
)
from .loading import (
    COLUMNS,
    MODEL_LAYER,
    MODEL_TARGET,
    SCHEMA_VERSION,
    SWEEP_PREFIX,
    TORCH_IMPL,
    TOTAL_LAYER,
    TVM_FP32_IMPL,
    ResultsError,
    load_results,
    normalize_results,
    results_file,
)

__all__ = [
    "COLUMNS",
    "DASH",
    "MODEL_LAYER",
    "MODEL_TARGET",
    "SCHEMA_VERSION",
    "SWEEP_PREFIX",
    "TORCH_IMPL",
    "TOTAL_LAYER",
    "TVM_FP32_IMPL",
    "ReportData",
    "ResultsError",
    "fmt_num",
    "fmt_ops",
    "format_accuracy",
    "format_failed",
    "format_latency",
    "format_model",
    "format_status",
    "format_layers",
    "format_meta",
    "load_results",
    "normalize_results",
    "prepare",
    "reference_method",
    "registry_order",
    "results_file",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- variants


def registry_order() -> list[str]:
    """Method names in registry order (``ternbench.methods.list_methods``), or [] if unavailable."""
    try:
        from ternbench.methods import list_methods

        return list(list_methods())
    except Exception as exc:  # the report must still build without torch / a broken plugin
        log.info("method registry unavailable (%s); ordering methods by name", exc)
        return []


def reference_method() -> str:
    """The registry's reference method (deltas and speed-ups are taken against it), or "" when
    the registry is unavailable (no deltas then)."""
    try:
        from ternbench.methods import reference_method as registered

        return registered() or ""
    except Exception as exc:  # the report must still build without torch / a broken plugin
        log.info("method registry unavailable (%s); no reference method", exc)
        return ""


def method_rank(methods: Iterable[str], registry: Sequence[str] | None = None) -> dict[str, int]:
    """Stable rank per method: ``registry`` order first (default: the method registry's), then
    the other names sorted."""
    reg = list(registry_order() if registry is None else registry)
    extra = sorted(set(methods) - set(reg))
    return {m: i for i, m in enumerate([*reg, *extra])}


def _canonical_config(raw: str) -> str:
    try:
        parsed = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return raw
    return json.dumps(parsed, sort_keys=True) if isinstance(parsed, dict) else raw


def _config_dict(raw: str) -> dict[str, Any]:
    try:
        parsed = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _fmt_cfg_value(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, str | int | float | bool) or v is None:
        return str(v)
    return json.dumps(v, sort_keys=True)


def _sort_value(v: Any) -> tuple[int, float, str]:
    if isinstance(v, bool) or v is None:
        return (1, 0.0, str(v))
    if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)):
        return (0, float(v), "")
    return (1, 0.0, json.dumps(v, sort_keys=True, default=str))


def _build_variants(
    df: pd.DataFrame, run_ids: list[str], registry: Sequence[str] | None, sweep_cols: list[str]
) -> pd.DataFrame:
    """One row per (run_id, method, canonical config) with a display label and an order."""
    keys = df[["run_id", "method", "config_key"]].drop_duplicates().reset_index(drop=True)
    rank = method_rank(keys["method"], registry)
    run_pos = {r: i for i, r in enumerate(run_ids)}
    compare = len(run_ids) > 1
    labels: dict[int, str] = {}
    order: dict[int, tuple] = {}
    for method, grp in keys.groupby("method", sort=False):
        configs = list(dict.fromkeys(grp["config_key"]))
        dicts = {c: _config_dict(c) for c in configs}
        fields: list[str] = []
        if len(configs) > 1:
            all_keys = sorted({k for d in dicts.values() for k in d})
            fields = [
                k
                for k in all_keys
                if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in dicts.values()})
                > 1
            ]
        idx: Any
        for idx, row in grp.iterrows():
            d = dicts[row["config_key"]]
            if fields:
                label = f"{method} ({', '.join(f'{k}={_fmt_cfg_value(d.get(k))}' for k in fields)})"
            elif len(configs) > 1:  # configs that do not parse as JSON objects: short hash
                digest = hashlib.sha1(row["config_key"].encode()).hexdigest()[:6]
                label = f"{method} ({digest})"
            else:
                label = str(method)
            if compare:
                label += f" [{row['run_id']}]"
            labels[int(idx)] = label
            order[int(idx)] = (
                rank.get(str(method), len(rank)),
                tuple(_sort_value(d.get(k)) for k in fields),
                run_pos.get(row["run_id"], len(run_pos)),
                int(idx),
            )
    keys["label"] = [labels[int(i)] for i in keys.index]
    ordered = sorted(keys.index, key=lambda i: order[int(i)])
    keys = keys.loc[ordered].reset_index(drop=True)
    # label collisions are impossible for distinct canonical configs, but stay safe
    dup = keys["label"].duplicated(keep=False)
    if dup.any():
        keys.loc[dup, "label"] = [f"{lab} #{i + 1}" for i, lab in enumerate(keys.loc[dup, "label"])]
    keys.insert(0, "vid", np.arange(len(keys), dtype="int64"))
    keys["method_rank"] = keys["method"].map(rank).astype("int64")
    # per-variant sweep values (first non-empty value over the variant's rows)
    for col in sweep_cols:
        vals = df[["run_id", "method", "config_key", col]]
        vals = vals[vals[col].notna() & vals[col].astype(str).ne("")]
        first = vals.drop_duplicates(["run_id", "method", "config_key"])
        keys = keys.merge(first, on=["run_id", "method", "config_key"], how="left")
    return keys


# --------------------------------------------------------------------------- report data


@dataclass
class ReportData:
    """Numeric tables behind a report (all pandas, one row per displayed line)."""

    df: pd.DataFrame  #: normalized tidy frame with ``vid`` and ``label`` columns
    variants: pd.DataFrame  #: vid, run_id, method, config_key, label, method_rank, sweep.*
    run_ids: list[str]
    sweep_cols: list[str]
    accuracy: pd.DataFrame  #: vid x model/dataset/subset: top1, delta_top1, effective_bits, ...
    latency: pd.DataFrame  #: vid x model/dataset x target x kernel impl: totals and speed-ups
    layers: pd.DataFrame  #: vid x model/dataset x target x kernel impl x layer
    failed: pd.DataFrame  #: failed cells with their reasons
    meta: pd.DataFrame  #: run metadata, one column per run
    metas: list[dict[str, Any]] = field(default_factory=list)  #: the run.json dicts
    #: vid x model/dataset x target: end-to-end TVM model vs torch FP32 eager / INT8
    model: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: vid x target: kernels built / verified where they were not timed (ARM, CUDA)
    status: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def compare(self) -> bool:
        return len(self.run_ids) > 1

    @property
    def targets(self) -> list[str]:
        return list(dict.fromkeys(self.latency["target"])) if len(self.latency) else []

    @property
    def status_targets(self) -> list[str]:
        """Targets with build/verification status rows (not timed here)."""
        return list(dict.fromkeys(self.status["target"])) if len(self.status) else []


def prepare(
    df: pd.DataFrame,
    metas: Sequence[Mapping[str, Any]] | None = None,
    *,
    registry: Sequence[str] | None = None,
) -> ReportData:
    """Normalize ``df`` and compute every numeric table of the report.

    ``registry`` is the method order (``ternbench.methods.list_methods()``, passed by
    ``bench``; None: methods by name).
    """
    df = normalize_results(df)
    if df.empty:
        raise ResultsError("the results table is empty: nothing to report")
    metas = [dict(m) for m in (metas or [])]
    run_ids = list(
        dict.fromkeys(
            [str(m["run_id"]) for m in metas if m.get("run_id")] + list(df["run_id"].unique())
        )
    )
    run_ids = [r for r in run_ids if r in set(df["run_id"])] or run_ids
    sweep_cols = [c for c in df.columns if str(c).startswith(SWEEP_PREFIX)]
    df["config_key"] = df["method_config"].map(_canonical_config)
    variants = _build_variants(df, run_ids, registry, sweep_cols)
    df = df.merge(
        variants[["vid", "label", "run_id", "method", "config_key"]],
        on=["run_id", "method", "config_key"],
        how="left",
    )
    accuracy = _accuracy_table(df, variants, sweep_cols)
    latency, layers = _latency_tables(df, variants, sweep_cols)
    return ReportData(
        df=df,
        variants=variants,
        run_ids=run_ids,
        sweep_cols=sweep_cols,
        accuracy=accuracy,
        latency=latency,
        layers=layers,
        model=_model_table(df),
        status=_status_table(df),
        failed=_failed_table(df),
        meta=_meta_table(metas, df, run_ids),
        metas=[dict(m) for m in metas],
    )


_ACC_METRICS = (
    "top1",
    "top5",
    "loss",
    "n_eval",
    "effective_bits",
    "sparsity",
    "muls",
    "adds",
    "params",
    "ternary_fraction",
    "deploy_max_abs_diff",
    "bn_recalibrated",
)


#: a finished cell whose accuracy collapsed: its numbers are real and shown, flagged in red
DEGRADED = "degraded"


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"].isin(["ok", DEGRADED]) & df["metric"].ne("error")]


def _accuracy_table(
    df: pd.DataFrame, variants: pd.DataFrame, sweep_cols: list[str]
) -> pd.DataFrame:
    rows = _ok(df)
    rows = rows[rows["target"].eq(MODEL_TARGET) & rows["layer"].eq("")]
    keys = ["vid", "model", "dataset", "subset"]
    cols = [
        "vid",
        "label",
        "run_id",
        "method",
        "model",
        "dataset",
        "subset",
        *_ACC_METRICS,
        "delta_top1",
        "is_reference",
        "n_seeds",
        "fp32_top1",
        "block",
        "converged",
        "degraded",
        *sweep_cols,
    ]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    # seeds are averaged; n_seeds tells the reader how many went into a mean
    wide = rows.pivot_table(index=keys, columns="metric", values="value", aggfunc="mean")
    wide.columns = [str(c) for c in wide.columns]
    wide = wide.reset_index()
    nseed = rows.groupby(keys)["seed"].nunique().rename("n_seeds").reset_index()
    wide = wide.merge(nseed, on=keys, how="left")
    for m in (*_ACC_METRICS, "fp32_top1", "converged"):
        if m not in wide.columns:
            wide[m] = np.nan
    # the block form the method ran on (unit of the `block` row) and why a cell collapsed
    blk = rows[rows["metric"].eq("block")].groupby(keys)["unit"].first().rename("block")
    wide = wide.drop(columns=[c for c in ("block",) if c in wide.columns])  # the 0/1 pivot
    bad = rows[rows["status"].eq(DEGRADED) & rows["metric"].eq("top1")]
    why = bad.groupby(keys)["error"].first().rename("degraded")
    wide = wide.merge(blk.reset_index(), on=keys, how="left").merge(
        why.reset_index(), on=keys, how="left")
    wide["block"] = wide["block"].where(wide["block"].notna(), "")
    wide["degraded"] = wide["degraded"].where(wide["degraded"].notna(), "")
    wide = wide.merge(
        variants[["vid", "label", "run_id", "method", "method_rank", *sweep_cols]],
        on="vid",
        how="left",
    )

    # reference: the first variant of the registry's reference method (FP32) of the same
    # run / model / dataset (subset if possible)
    ref = wide[wide["method"].eq(reference_method()) & wide["top1"].notna()].sort_values("vid")
    exact = ref.drop_duplicates(["run_id", "model", "dataset", "subset"])
    loose = ref.drop_duplicates(["run_id", "model", "dataset"])
    exact_map: dict[Any, Any] = {
        (r.run_id, r.model, r.dataset, r.subset): (r.vid, r.top1) for r in exact.itertuples()
    }
    loose_map: dict[Any, Any] = {
        (r.run_id, r.model, r.dataset): (r.vid, r.top1) for r in loose.itertuples()}
    deltas, is_ref = [], []
    r: Any
    for r in wide.itertuples():
        hit = exact_map.get((r.run_id, r.model, r.dataset, r.subset)) or loose_map.get(
            (r.run_id, r.model, r.dataset)
        )
        own = float(pd.to_numeric(getattr(r, "fp32_top1", np.nan)))
        if hit is not None:
            deltas.append(float(r.top1) - float(hit[1]))
            is_ref.append(int(r.vid) == int(hit[0]))
        elif own == own:  # not NaN: no fp32 row on this model (a method's own block form)
            deltas.append(float(pd.to_numeric(r.top1)) - own)
            is_ref.append(False)
        else:
            deltas.append(np.nan)
            is_ref.append(False)
    wide["delta_top1"] = deltas
    wide["is_reference"] = is_ref
    wide = wide.sort_values(["model", "dataset", "subset", "vid"], kind="stable")
    return wide[cols].reset_index(drop=True)


COMPOSITE_IMPL = "tvm"  # the runner's model total over each layer's own TVM kernel


def _kernel_impls(impls: Iterable[str], method: str) -> list[str]:
    """The method's own TVM kernel impls among ``impls`` (tvm_fp32 only for the reference).

    A model-total row over the per-layer kernels (impl ``"tvm"``) is the method's figure when
    present: its layers may use different kernels (FGQ's int8 first/last layers).
    """
    impls = list(impls)
    if COMPOSITE_IMPL in impls:
        return [COMPOSITE_IMPL]
    tvm = [i for i in impls if i.startswith("tvm_")]
    own = [i for i in tvm if i != TVM_FP32_IMPL]
    if method == reference_method() or not own:
        return tvm
    return own


def _latency_tables(
    df: pd.DataFrame, variants: pd.DataFrame, sweep_cols: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    lat_cols = [
        "vid",
        "label",
        "run_id",
        "method",
        "model",
        "dataset",
        "target",
        "impl",
        "latency_us",
        "torch_fp32_us",
        "speedup_torch",
        "tvm_fp32_us",
        "speedup_tvm_fp32",
        "primary",
        *sweep_cols,
    ]
    layer_cols = [
        "vid",
        "label",
        "run_id",
        "method",
        "model",
        "dataset",
        "target",
        "impl",
        "layer",
        "layer_order",
        "latency_us",
        "torch_fp32_us",
        "speedup_torch",
    ]
    rows = _ok(df)
    rows = rows[
        rows["metric"].eq("latency_us") & rows["target"].ne(MODEL_TARGET) & rows["impl"].ne("")
        & rows["layer"].ne(MODEL_LAYER)
    ]
    if rows.empty:
        return pd.DataFrame(columns=lat_cols), pd.DataFrame(columns=layer_cols)

    cell = [
        "vid",
        "run_id",
        "method",
        "model",
        "dataset",
        "target",
        "impl",
        "seed",
        "subset",
        "cell_key",
    ]
    is_total = rows["layer"].isin([TOTAL_LAYER, ""])
    total = rows[is_total].groupby(cell)["value"].mean()
    # a cell without any __total__ row gets the sum of its per-layer rows (per impl); a cell
    # with totals is not re-summed per impl (that would time a subset of its layers)
    with_total = set(rows.loc[is_total, "cell_key"])
    summed = rows[~is_total & ~rows["cell_key"].isin(with_total)].groupby(cell)["value"].sum()
    totals = total.combine_first(summed).rename("value").reset_index()
    mod = ["vid", "run_id", "method", "model", "dataset", "target", "impl"]
    totals = totals.groupby(mod)["value"].mean().rename("latency_us").reset_index()

    # torch FP32: the variant's own baseline rows, else the run-wide mean on the same model
    torch_rows = totals[totals["impl"].eq(TORCH_IMPL)]
    torch_own = torch_rows.set_index(["vid", "model", "dataset", "target"])["latency_us"]
    torch_run = torch_rows.groupby(["run_id", "model", "dataset", "target"])["latency_us"].mean()
    # TVM FP32: the reference method's tvm_fp32 kernel of the same run, else the variant's own
    ref_method = reference_method()
    tvm32 = totals[
        totals["impl"].eq(TVM_FP32_IMPL)
        | (totals["method"].eq(ref_method) & totals["impl"].eq(COMPOSITE_IMPL))
    ]
    tvm32_ref = (
        tvm32[tvm32["method"].eq(ref_method)]
        .sort_values("vid")
        .drop_duplicates(["run_id", "model", "dataset", "target"])
        .set_index(["run_id", "model", "dataset", "target"])["latency_us"]
    )
    tvm32_own = tvm32.set_index(["vid", "model", "dataset", "target"])["latency_us"]

    def lookup(s: pd.Series, key: tuple) -> float:
        return float(s.get(key, np.nan)) if len(s) else np.nan

    out = []
    for (vid, run_id, method, model, dataset, target), grp in totals.groupby(
        ["vid", "run_id", "method", "model", "dataset", "target"], sort=False
    ):
        kernels = _kernel_impls(list(grp["impl"]), str(method))
        if not kernels:
            continue
        t_us = lookup(torch_own, (vid, model, dataset, target))
        if math.isnan(t_us):
            t_us = lookup(torch_run, (run_id, model, dataset, target))
        f_us = lookup(tvm32_ref, (run_id, model, dataset, target))
        if math.isnan(f_us):
            f_us = lookup(tvm32_own, (vid, model, dataset, target))
        sub = grp[grp["impl"].isin(kernels)]
        best = sub["latency_us"].min()
        r: Any
        for r in sub.itertuples():
            lat_us = float(r.latency_us)
            out.append(
                {
                    "vid": vid,
                    "run_id": run_id,
                    "method": method,
                    "model": model,
                    "dataset": dataset,
                    "target": target,
                    "impl": r.impl,
                    "latency_us": lat_us,
                    "torch_fp32_us": t_us,
                    "speedup_torch": _ratio(t_us, lat_us),
                    "tvm_fp32_us": f_us,
                    "speedup_tvm_fp32": _ratio(f_us, lat_us),
                    "primary": bool(lat_us == best),
                }
            )
    lat = pd.DataFrame(out, columns=[c for c in lat_cols if c not in ("label", *sweep_cols)])
    lat = lat.merge(variants[["vid", "label", *sweep_cols]], on="vid", how="left")
    # keep one primary per variant/model/target even on exact ties
    # targets in the order the runner measured them, not alphabetically
    t_order = {t: i for i, t in enumerate(dict.fromkeys(rows["target"]))}
    lat = (
        lat.assign(_t=lat["target"].map(t_order))
        .sort_values(["_t", "model", "dataset", "vid", "impl"], kind="stable")
        .drop(columns="_t")
    )
    first = lat[lat["primary"]].drop_duplicates(["vid", "model", "dataset", "target"]).index
    lat["primary"] = lat.index.isin(first)
    lat = lat[lat_cols].reset_index(drop=True)

    layers = _layer_table(rows[~is_total], lat, variants)
    return lat, layers[layer_cols] if len(layers) else pd.DataFrame(columns=layer_cols)


def _layer_table(rows: pd.DataFrame, lat: pd.DataFrame, variants: pd.DataFrame) -> pd.DataFrame:
    if rows.empty or lat.empty:
        return pd.DataFrame()
    order = {name: i for i, name in enumerate(dict.fromkeys(rows["layer"]))}
    key = ["vid", "run_id", "model", "dataset", "target", "impl", "layer"]
    per = rows.groupby(key)["value"].mean().rename("latency_us").reset_index()
    torch = per[per["impl"].eq(TORCH_IMPL)]
    torch_own = torch.set_index(["vid", "model", "dataset", "target", "layer"])["latency_us"]
    torch_run = torch.groupby(["run_id", "model", "dataset", "target", "layer"])[
        "latency_us"
    ].mean()
    kernels = lat[["vid", "model", "dataset", "target", "impl"]].drop_duplicates()
    # a composite model total ("tvm") covers each layer's own kernel, whatever its impl
    comp = kernels[kernels["impl"].eq(COMPOSITE_IMPL)].drop(columns="impl")
    own = per[per["impl"].str.startswith("tvm_")].merge(
        comp, on=["vid", "model", "dataset", "target"], how="inner")
    per = pd.concat([
        per.merge(kernels, on=["vid", "model", "dataset", "target", "impl"], how="inner"), own,
    ], ignore_index=True)
    t_us = [
        torch_own.get((r.vid, r.model, r.dataset, r.target, r.layer), np.nan)
        for r in per.itertuples()
    ]
    t_run = [
        torch_run.get((r.run_id, r.model, r.dataset, r.target, r.layer), np.nan)
        for r in per.itertuples()
    ]
    per["torch_fp32_us"] = [
        float(a) if not pd.isna(a) else float(b) for a, b in zip(t_us, t_run, strict=True)
    ]
    per["speedup_torch"] = [
        _ratio(t, v) for t, v in zip(per["torch_fp32_us"], per["latency_us"], strict=True)
    ]
    per["layer_order"] = per["layer"].map(order).astype("int64")
    per = per.merge(variants[["vid", "label", "method"]], on="vid", how="left")
    t_order = {t: i for i, t in enumerate(dict.fromkeys(lat["target"]))}
    per = per.assign(_t=per["target"].map(t_order))
    return (
        per.sort_values(["_t", "model", "dataset", "vid", "impl", "layer_order"], kind="stable")
        .drop(columns="_t")
        .reset_index(drop=True)
    )


def _ratio(num: float, den: float) -> float:
    if num is None or den is None or pd.isna(num) or pd.isna(den) or den <= 0:
        return np.nan
    return float(num) / float(den)


def _failed_table(df: pd.DataFrame) -> pd.DataFrame:
    cols = [
        "vid",
        "label",
        "run_id",
        "model",
        "dataset",
        "subset",
        "seed",
        "target",
        "layer",
        "impl",
        "cell_key",
        "error",
    ]
    bad = df[~df["status"].isin(["ok", DEGRADED])]
    if bad.empty:
        return pd.DataFrame(columns=cols)
    bad = bad.drop_duplicates(["run_id", "cell_key", "target", "layer", "impl", "error"])
    return (
        bad[cols]
        .sort_values(["vid", "model", "dataset", "seed"], kind="stable")
        .reset_index(drop=True)
    )


# --------------------------------------------------------------------------- metadata

_META_ORDER = (
    "run_id",
    "started",
    "finished",
    "profile",
    "executor",
    "git",
    "versions",
    "python",
    "torch",
    "torchvision",
    "tvm",
    "ray",
    "cpu",
    "threads",
    "seeds",
    "argv",
)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested run metadata as one field per leaf; a list of mappings (``sessions``: one per
    start of a resumed run; ``baselines``) numbers its items from 1, so no cell holds a dict.

    Example:
        >>> _flatten({"sessions": [{"argv": ["ternbench", "run"],
        ...                         "versions": {"torch": "2.14.1"}}]})
        {'sessions.1.argv': ['ternbench', 'run'], 'sessions.1.versions.torch': '2.14.1'}
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, list | tuple) and v and all(isinstance(x, Mapping) for x in v):
            for i, item in enumerate(v, 1):
                out.update(_flatten(item, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def _meta_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list | tuple):
        return (
            " ".join(str(x) for x in v)
            if all(isinstance(x, str) for x in v)
            else ", ".join(str(x) for x in v)
        )
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _meta_table(
    metas: Sequence[Mapping[str, Any]], df: pd.DataFrame, run_ids: list[str]
) -> pd.DataFrame:
    by_run = {str(m.get("run_id")): m for m in metas if m.get("run_id")}
    cols: dict[str, dict[str, str]] = {}
    for rid in run_ids:
        meta = {k: v for k, v in by_run.get(rid, {"run_id": rid}).items()
                if k != "ledger"}  # the ledger has its own section
        flat = {k: _meta_value(v) for k, v in _flatten(meta).items()}
        flat["run_id"] = rid
        sub = df[df["run_id"].eq(rid)]
        flat["rows"] = str(len(sub))
        flat["cells"] = str(sub["cell_key"].nunique())
        flat["failed cells"] = str(sub.loc[sub["status"].ne("ok"), "cell_key"].nunique())
        cols[rid] = flat
    fields = list(dict.fromkeys(k for c in cols.values() for k in c))

    def rank(k: str) -> tuple[int, str]:
        head = k.split(".")[0]
        if k in ("rows", "cells", "failed cells"):
            return (len(_META_ORDER) + 1, "")
        return (_META_ORDER.index(head) if head in _META_ORDER else len(_META_ORDER), "")

    fields.sort(key=rank)  # stable: keeps first-seen order inside one rank
    table = pd.DataFrame(
        {rid: [c.get(f, "") for f in fields] for rid, c in cols.items()},
        index=pd.Index(fields, name="field"),
    )
    return table


_MODEL_IMPLS = {"tvm": "tvm_us", "torch_fp32": "torch_fp32_us",
                "torch_fp32_eager": "torch_fp32_us",  # runs before the artifact (issue 12)
                "torch_int8": "torch_int8_us", "onnxruntime_int8": "ort_int8_us"}
#: |top1_deployed - top1| above this many points is flagged
DEPLOYED_FLAG_POINTS = 0.1


def _model_table(df: pd.DataFrame) -> pd.DataFrame:
    """End-to-end latency of the deployed model (``__model__`` rows: the artifact and its
    peers), one row per variant x model x dataset x target, speed-ups taken within the same
    cell (same run, same input), beside the sum of the per-layer kernels (``__total__``) and
    the artifact's own top-1 beside the fake-quant one."""
    cols = ["vid", "label", "method", "model", "dataset", "target", "tvm_us", "kernel_sum_us",
            "overhead", "kernel_chain_us", "glue", "torch_fp32_us", "torch_int8_us",
            "ort_int8_us", "speedup_fp32", "speedup_int8", "speedup_ort", "other_us",
            "logit_rel_diff", "top1_agreement", "top1", "top1_deployed", "top1_delta",
            "pred_agreement", "flag"]
    rows = _ok(df)
    rows = rows[rows["layer"].eq(MODEL_LAYER)]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    key = ["vid", "label", "method", "model", "dataset", "target"]
    lat = rows[rows["metric"].eq("latency_us")]
    if lat.empty:  # built or emulated only (ARM without a board, CUDA without a GPU)
        return pd.DataFrame(columns=cols)
    wide = lat.pivot_table(index=key, columns="impl", values="value", aggfunc="mean")
    wide = wide.T.groupby(lambda c: _MODEL_IMPLS.get(str(c), str(c))).mean().T
    tvm_rows = rows[rows["impl"].eq("tvm")]
    for metric, col in (("model_other_us", "other_us"), ("model_logit_rel_diff", "logit_rel_diff"),
                        ("model_top1_agreement", "top1_agreement"),
                        ("top1_deployed", "top1_deployed"),
                        ("deployed_pred_agreement", "pred_agreement")):
        m = tvm_rows[tvm_rows["metric"].eq(metric)].groupby(key)["value"].mean()
        wide[col] = m.reindex(wide.index)
    ok = _ok(df)
    tot = ok[ok["layer"].eq(TOTAL_LAYER) & ok["metric"].eq("latency_us") & ok["impl"].eq("tvm")]
    wide["kernel_sum_us"] = tot.groupby(key)["value"].mean()
    # the kernel sum timed in the artifact's own rounds, where the run has it
    same = tvm_rows[tvm_rows["metric"].eq("kernel_sum_us")].groupby(key)["value"].mean()
    same = same[same.index.isin(wide.index)]
    wide.loc[same.index, "kernel_sum_us"] = same
    chain = tvm_rows[tvm_rows["metric"].eq("kernel_chain_us")].groupby(key)["value"].mean()
    wide["kernel_chain_us"] = chain.reindex(wide.index)
    acc = ok[ok["metric"].eq("top1") & ok["target"].eq(MODEL_TARGET) & ok["layer"].eq("")]
    top1 = acc.groupby(key[:-1])["value"].mean()
    wide = wide.reset_index()
    wide["top1"] = [top1.get(tuple(r[k] for k in key[:-1]), np.nan)
                    for _i, r in wide.iterrows()]
    for c in cols:
        if c not in wide.columns:
            wide[c] = np.nan
    wide["speedup_fp32"] = wide["torch_fp32_us"] / wide["tvm_us"]
    wide["speedup_int8"] = wide["torch_int8_us"] / wide["tvm_us"]
    wide["speedup_ort"] = wide["ort_int8_us"] / wide["tvm_us"]
    wide["overhead"] = wide["tvm_us"] / wide["kernel_sum_us"]
    wide["glue"] = wide["tvm_us"] / wide["kernel_chain_us"]
    wide["top1_delta"] = wide["top1_deployed"] - wide["top1"]
    wide["flag"] = [
        "" if pd.isna(d) or abs(d) <= DEPLOYED_FLAG_POINTS
        else f"deployed top-1 differs by {d:+.2f} points" for d in wide["top1_delta"]]
    return wide[cols]


def _status_table(df: pd.DataFrame) -> pd.DataFrame:
    """Targets that were built (and checked) but not timed here: one row per variant x model x
    target, with the runner's status text (e.g. "built and verified (26/26 layers checked:
    qemu-aarch64)")."""
    cols = ["vid", "label", "method", "model", "dataset", "target", "status_text", "built",
            "verified", "model_top1_agreement", "model_logit_rel_diff", "model_checked_by"]
    rows = _ok(df)
    rows = rows[rows["layer"].eq(TOTAL_LAYER) & rows["metric"].isin(
        ["kernel_status", "kernels_built", "kernels_verified"])]
    st = rows[rows["metric"].eq("kernel_status")]
    if st.empty:
        return pd.DataFrame(columns=cols)
    key = ["vid", "label", "method", "model", "dataset", "target"]
    out = st.groupby(key)["unit"].first().rename("status_text").to_frame()
    for metric, col in (("kernels_built", "built"), ("kernels_verified", "verified")):
        out[col] = rows[rows["metric"].eq(metric)].groupby(key)["value"].max()
    # the whole model run under emulation (ARM without a board), checked against fake-quant
    whole = _ok(df)
    whole = whole[whole["layer"].eq(MODEL_LAYER) & whole["impl"].eq("tvm")]
    for metric in ("model_top1_agreement", "model_logit_rel_diff"):
        m = whole[whole["metric"].eq(metric)].groupby(key)["value"].mean()
        out[metric] = m.reindex(out.index)
    how = whole[whole["metric"].eq("model_top1_agreement")].groupby(key)["unit"].first()
    out["model_checked_by"] = how.reindex(out.index).map(
        lambda u: str(u).partition("(")[2].rstrip(")") if isinstance(u, str) else "")
    return out.reset_index()[cols]
