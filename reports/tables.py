"""Load tidy ``ternbench`` result tables and pivot them into the report's tables.

The runner writes one long-form row per cell x metric (``schema_version`` 1, see
:data:`COLUMNS`). This module turns that frame into a :class:`ReportData` bundle of *numeric*
tables (accuracy/cost, model latency per target, per-layer latency, failed cells, run metadata)
and offers ``format_*`` helpers that render them as display strings. Plots and templates consume
the same numeric tables, so every number in a report comes from one place.

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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "COLUMNS",
    "SCHEMA_VERSION",
    "ReportData",
    "ResultsError",
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
]

from ternbench.bench.results import COLUMNS as _RESULTS_COLUMNS  # noqa: E402
from ternbench.bench.results import SCHEMA_VERSION as _RESULTS_SCHEMA_VERSION  # noqa: E402

log = logging.getLogger(__name__)

# the tidy schema is the runner's; one definition of its columns and version
SCHEMA_VERSION = _RESULTS_SCHEMA_VERSION
COLUMNS = tuple(_RESULTS_COLUMNS)
_STR_COLUMNS = tuple(c for c in COLUMNS if c not in ("schema_version", "seed", "value"))
# columns a report cannot be built without; the rest get neutral defaults when absent
_REQUIRED = (
    "run_id",
    "method",
    "method_config",
    "model",
    "dataset",
    "target",
    "layer",
    "impl",
    "metric",
    "value",
    "status",
)

MODEL_TARGET = "-"  # target of accuracy and cost rows
TOTAL_LAYER = "__total__"  # layer of the sum-over-layers latency row
MODEL_LAYER = "__model__"  # layer of the end-to-end (whole deployed model) rows
TORCH_IMPL = "torch_fp32"  # baseline measured in the same run on the same shapes
TVM_FP32_IMPL = "tvm_fp32"
SWEEP_PREFIX = "sweep."


class ResultsError(ValueError):
    """A results directory or frame cannot be read as a ternbench results table."""


# --------------------------------------------------------------------------- loading


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    # keep "" as "" (layer/impl/error are often empty); only the value column may be missing
    return pd.read_csv(path, keep_default_na=False, na_values={"value": ["", "nan", "NaN", "NA"]})


def _find_results(src: Path) -> tuple[Path, Path]:
    """(results file, run.json path) for a run directory or a results file."""
    if src.is_file():
        return src, src.parent / "run.json"
    if not src.is_dir():
        raise ResultsError(f"results path {str(src)!r} does not exist")
    return results_file(src), src / "run.json"


def results_file(src: Path) -> Path:
    """The results table of a run directory: ``results.parquet``, or ``results.csv`` when only
    it exists or it is newer (edited by hand after the run); the choice is logged."""
    if src.is_file():
        return src
    pq, csv = src / "results.parquet", src / "results.csv"
    if pq.is_file() and csv.is_file() and csv.stat().st_mtime_ns > pq.stat().st_mtime_ns:
        log.info("%s is newer than %s (edited after the run?): reading the csv", csv, pq.name)
        return csv
    for path in (pq, csv):
        if path.is_file():
            return path
    raise ResultsError(
        f"{str(src)!r} holds no results.parquet or results.csv; pass the output directory of "
        "`ternbench run` (the folder with run.json)"
    )


def load_results(*dirs: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """Concatenate the results of one or more run directories.

    Returns the normalized tidy frame and the list of ``run.json`` dicts, one per directory in
    the order given. ``results.parquet`` is preferred over ``results.csv``. A directory without
    a results table, or with another ``schema_version``, raises :class:`ResultsError`. When two
    directories carry the same ``run_id`` the later one is renamed ``<run_id>#2`` so both stay
    apart in comparisons.

    Example:
        >>> df, metas = load_results("runs/a", "runs/b")   # doctest: +SKIP
    """
    if not dirs:
        raise ResultsError("load_results needs at least one results directory")
    frames: list[pd.DataFrame] = []
    metas: list[dict] = []
    seen: set[str] = set()
    for d in dirs:
        table, run_json = _find_results(Path(d))
        try:
            raw = _read_table(table)
        except (OSError, ValueError, ImportError) as exc:
            raise ResultsError(f"cannot read {str(table)!r}: {exc}") from exc
        df = normalize_results(raw, source=str(table))
        meta: dict[str, Any] = {}
        if run_json.is_file():
            try:
                meta = json.loads(run_json.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ResultsError(f"cannot read {str(run_json)!r}: {exc}") from exc
            if not isinstance(meta, dict):
                raise ResultsError(f"{str(run_json)!r} must hold a JSON object")
            sv = meta.get("schema_version")
            if sv is not None and int(sv) != SCHEMA_VERSION:
                raise ResultsError(_schema_msg(str(run_json), [sv]))
        else:
            log.warning("%s has no run.json; the metadata table will be sparse", table.parent)
        run_ids = list(dict.fromkeys(df["run_id"]))
        if not meta.get("run_id"):
            meta["run_id"] = run_ids[0] if run_ids else table.parent.name
        # rename clashing run ids so a run compared with its own copy stays two columns
        rename: dict[str, str] = {}
        for rid in [*run_ids, str(meta["run_id"])]:
            if rid in seen and rid not in rename:
                n = 2
                while f"{rid}#{n}" in seen:
                    n += 1
                rename[rid] = f"{rid}#{n}"
                log.warning(
                    "run_id %r appears in several inputs; %s is shown as %r",
                    rid,
                    table.parent,
                    rename[rid],
                )
        if rename:
            df["run_id"] = df["run_id"].replace(rename)
            meta["run_id"] = rename.get(str(meta["run_id"]), meta["run_id"])
        seen.update(df["run_id"].unique())
        seen.add(str(meta["run_id"]))
        meta.setdefault("source", str(table.parent))
        frames.append(df)
        metas.append(meta)
    out = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    return out, metas


def _schema_msg(source: str, found: Iterable[Any]) -> str:
    return (
        f"{source}: results schema_version {sorted({str(v) for v in found})} is not supported: "
        f"this ternbench reads schema_version {SCHEMA_VERSION}. Re-run `ternbench run` or use the "
        "ternbench version that wrote these results."
    )


def normalize_results(df: pd.DataFrame, source: str = "<DataFrame>") -> pd.DataFrame:
    """Check the schema and return a copy with clean dtypes.

    String columns get ``""`` for missing values (CSV round trips turn ``""`` into NaN),
    ``value`` becomes float and ``seed`` int; absent optional columns get neutral defaults.
    """
    if not isinstance(df, pd.DataFrame):
        raise ResultsError(f"{source}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise ResultsError(
            f"{source}: not a ternbench results table, missing column(s) {missing}; "
            f"schema_version {SCHEMA_VERSION} has columns {list(COLUMNS)}"
        )
    out = df.copy()
    if "schema_version" in out.columns:
        versions = pd.to_numeric(out["schema_version"], errors="coerce")
        bad = out["schema_version"][versions.ne(SCHEMA_VERSION) | versions.isna()]
        if len(bad):
            raise ResultsError(_schema_msg(source, bad.unique()))
    out["schema_version"] = SCHEMA_VERSION
    for col in _STR_COLUMNS:
        if col not in out.columns:
            out[col] = "ok" if col == "status" else ""
        out[col] = out[col].astype(object).where(out[col].notna(), "").astype(str)
    out["value"] = pd.to_numeric(out["value"], errors="coerce").astype(float)
    seed = out["seed"] if "seed" in out.columns else pd.Series(0, index=out.index)
    out["seed"] = pd.to_numeric(seed, errors="coerce").fillna(0).astype("int64")
    out["status"] = out["status"].str.lower()
    return out


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
    """Stable rank per method: registry order first, then unknown names sorted."""
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

    ``registry`` overrides the method order (default: ``ternbench.methods.list_methods()``).
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
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
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


# --------------------------------------------------------------------------- formatting

DASH = "—"


def fmt_num(v: Any, spec: str, suffix: str = "") -> str:
    """``format(v, spec) + suffix``, or an em dash for missing values."""
    if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
        return DASH
    try:
        return f"{format(float(v), spec)}{suffix}"
    except (TypeError, ValueError):
        return str(v)


def fmt_ops(v: Any) -> str:
    """Operation counts with SI suffix: 1234567 -> '1.23M'."""
    if v is None or pd.isna(v):
        return DASH
    v = float(v)
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suf}"
    return f"{v:.0f}"


def _fmt_sweep(v: Any) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return DASH
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v)


def format_accuracy(acc: pd.DataFrame, sweep_cols: Sequence[str] = ()) -> pd.DataFrame:
    """Display strings for the accuracy/cost table.

    top1 and Δtop1 with 2 decimals (the fp32 reference row reads ``ref``), bits 2 decimals,
    sparsity as a percentage, MULs/ADDs with SI suffixes. Subset and seed-count columns are shown
    only when they carry information.
    """
    out = pd.DataFrame({"Method": acc["label"].astype(str)})
    for c in sweep_cols:
        out[c] = [_fmt_sweep(v) for v in acc[c]]
    out["Model"] = acc["model"].astype(str)
    if "block" in acc and acc["block"].isin(["", "plain"]).sum() < len(acc):
        out["Block"] = [b or "plain" for b in acc["block"].astype(str)]
    out["Dataset"] = acc["dataset"].astype(str)
    if acc["subset"].nunique() > 1:
        out["Subset"] = acc["subset"].astype(str)
    out["Top-1 (%)"] = [fmt_num(v, ".2f") for v in acc["top1"]]
    out["Δ Top-1 vs fp32 (pp)"] = [
        "ref" if ref else fmt_num(d, "+.2f")
        for d, ref in zip(acc["delta_top1"], acc["is_reference"], strict=True)
    ]
    if "fp32_top1" in acc and acc["fp32_top1"].notna().any():  # each cell's own FP32 baseline
        out["Own FP32 (%)"] = [fmt_num(v, ".2f") for v in acc["fp32_top1"]]
    if "converged" in acc and acc["converged"].notna().any():
        out["Training"] = ["" if pd.isna(c) else "converged" if c >= 0.5 else "not converged"
                           for c in acc["converged"]]
    if "degraded" in acc and acc["degraded"].astype(str).ne("").any():
        out["Status"] = [f"degraded: {w}" if w else "ok" for w in acc["degraded"].astype(str)]
    out["Eff. bits"] = [fmt_num(v, ".2f") for v in acc["effective_bits"]]
    out["Sparsity"] = [
        fmt_num(100 * v if not pd.isna(v) else v, ".1f", "%") for v in acc["sparsity"]
    ]
    out["MULs"] = [fmt_ops(v) for v in acc["muls"]]
    out["ADDs"] = [fmt_ops(v) for v in acc["adds"]]
    if len(acc) and pd.to_numeric(acc["n_seeds"], errors="coerce").max() > 1:
        out["Seeds"] = acc["n_seeds"].astype(str)
    return out.reset_index(drop=True)


def format_latency(lat: pd.DataFrame, sweep_cols: Sequence[str] = ()) -> pd.DataFrame:
    """Display strings for one target's model-latency table (µs 1 decimal, speed-ups ``1.23×``)."""
    out = pd.DataFrame({"Method": lat["label"].astype(str)})
    for c in sweep_cols:
        out[c] = [_fmt_sweep(v) for v in lat[c]]
    out["Model"] = lat["model"].astype(str)
    out["Dataset"] = lat["dataset"].astype(str)
    out["Kernel"] = lat["impl"].astype(str)
    out["Latency (µs)"] = [fmt_num(v, ".1f") for v in lat["latency_us"]]
    out["Torch FP32 (µs)"] = [fmt_num(v, ".1f") for v in lat["torch_fp32_us"]]
    out["Speed-up vs torch"] = [fmt_num(v, ".2f", "×") for v in lat["speedup_torch"]]
    if lat["tvm_fp32_us"].notna().any():
        out["TVM FP32 (µs)"] = [fmt_num(v, ".1f") for v in lat["tvm_fp32_us"]]
        out["Speed-up vs TVM FP32"] = [fmt_num(v, ".2f", "×") for v in lat["speedup_tvm_fp32"]]
    return out.reset_index(drop=True)


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
            "overhead", "torch_fp32_us", "torch_int8_us", "ort_int8_us", "speedup_fp32",
            "speedup_int8", "speedup_ort", "other_us", "logit_rel_diff", "top1_agreement",
            "top1", "top1_deployed", "top1_delta", "pred_agreement", "flag"]
    rows = _ok(df)
    rows = rows[rows["layer"].eq(MODEL_LAYER)]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    key = ["vid", "label", "method", "model", "dataset", "target"]
    lat = rows[rows["metric"].eq("latency_us")]
    wide = lat.pivot_table(index=key, columns="impl", values="value", aggfunc="mean")
    wide = wide.T.groupby(lambda c: _MODEL_IMPLS.get(str(c), str(c))).mean().T
    tvm_rows = rows[rows["impl"].eq("tvm")]
    for metric, col in (("model_other_us", "other_us"), ("model_logit_rel_diff", "logit_rel_diff"),
                        ("model_top1_agreement", "top1_agreement"),
                        ("top1_deployed", "top1_deployed"),
                        ("deployed_pred_agreement", "pred_agreement")):
        m = tvm_rows[tvm_rows["metric"].eq(metric)].groupby(key)["value"].mean()
        wide[col] = m
    ok = _ok(df)
    tot = ok[ok["layer"].eq(TOTAL_LAYER) & ok["metric"].eq("latency_us") & ok["impl"].eq("tvm")]
    wide["kernel_sum_us"] = tot.groupby(key)["value"].mean()
    # the kernel sum timed in the artifact's own rounds, where the run has it
    same = tvm_rows[tvm_rows["metric"].eq("kernel_sum_us")].groupby(key)["value"].mean()
    same = same[same.index.isin(wide.index)]
    wide.loc[same.index, "kernel_sum_us"] = same
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
            "verified"]
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
    return out.reset_index()[cols]


def format_model(model: pd.DataFrame) -> pd.DataFrame:
    """Display strings for the end-to-end (deployed artifact) table."""
    out = pd.DataFrame(
        {
            "Method": model["label"].astype(str),
            "Model": model["model"].astype(str),
            "Target": model["target"].astype(str),
            "TVM artifact (µs)": [fmt_num(v, ".0f") for v in model["tvm_us"]],
            "Kernel sum (µs)": [fmt_num(v, ".0f") for v in model["kernel_sum_us"]],
            "Artifact / kernels": [fmt_num(v, ".2f", "×") for v in model["overhead"]],
            "Torch FP32 eager (µs)": [fmt_num(v, ".0f") for v in model["torch_fp32_us"]],
            "Torch INT8 (µs)": [fmt_num(v, ".0f") for v in model["torch_int8_us"]],
            "ORT INT8 (µs)": [fmt_num(v, ".0f") for v in model["ort_int8_us"]],
            "Speed-up vs FP32": [fmt_num(v, ".2f", "×") for v in model["speedup_fp32"]],
            "Speed-up vs INT8": [fmt_num(v, ".2f", "×") for v in model["speedup_int8"]],
            "Speed-up vs ORT INT8": [fmt_num(v, ".2f", "×") for v in model["speedup_ort"]],
            "Top-1 fake-quant (%)": [fmt_num(v, ".2f") for v in model["top1"]],
            "Top-1 deployed (%)": [fmt_num(v, ".2f") for v in model["top1_deployed"]],
            "Same prediction": [fmt_num(100 * v, ".1f", "%") for v in model["pred_agreement"]],
            "Logit Δ vs fake-quant": [fmt_num(v, ".1e") for v in model["logit_rel_diff"]],
            "Flag": [str(f) if isinstance(f, str) else "" for f in model["flag"]],
        }
    )
    if model["other_us"].notna().any():  # runs with the chained (torch glue) model
        out["Non-GEMM ops (µs)"] = [fmt_num(v, ".0f") for v in model["other_us"]]
    return out.reset_index(drop=True)


def format_status(status: pd.DataFrame) -> pd.DataFrame:
    """Display strings for the built / verified (not timed) targets."""
    return pd.DataFrame(
        {
            "Method": status["label"].astype(str),
            "Model": status["model"].astype(str),
            "Target": status["target"].astype(str),
            "Status": status["status_text"].astype(str),
        }
    ).reset_index(drop=True)


def format_layers(layers: pd.DataFrame) -> pd.DataFrame:
    """Display strings for one target's per-layer latency table."""
    return pd.DataFrame(
        {
            "Method": layers["label"].astype(str),
            "Model": layers["model"].astype(str),
            "Kernel": layers["impl"].astype(str),
            "Layer": layers["layer"].astype(str),
            "Latency (µs)": [fmt_num(v, ".1f") for v in layers["latency_us"]],
            "Torch FP32 (µs)": [fmt_num(v, ".1f") for v in layers["torch_fp32_us"]],
            "Speed-up vs torch": [fmt_num(v, ".2f", "×") for v in layers["speedup_torch"]],
        }
    ).reset_index(drop=True)


def format_failed(failed: pd.DataFrame, max_error: int | None = None) -> pd.DataFrame:
    """Display strings for the failed cells; ``max_error`` truncates long reasons."""

    def err(e: str) -> str:
        e = " ".join(str(e).split())  # tracebacks become one line
        if max_error is not None and len(e) > max_error:
            return e[: max_error - 1] + "…"
        return e or "(no reason recorded)"

    def where(r: Any) -> str:
        parts = [p for p in (r.target if r.target != MODEL_TARGET else "", r.layer, r.impl) if p]
        return " / ".join(parts) or "accuracy"

    return pd.DataFrame(
        {
            "Method": failed["label"].astype(str),
            "Model": failed["model"].astype(str),
            "Dataset": failed["dataset"].astype(str),
            "Seed": failed["seed"].astype(str),
            "Stage": [where(r) for r in failed.itertuples()],
            "Cell": failed["cell_key"].astype(str),
            "Error": [err(e) for e in failed["error"]],
        }
    ).reset_index(drop=True)


def format_meta(meta: pd.DataFrame) -> pd.DataFrame:
    """The metadata table with its field index as a first column."""
    return meta.reset_index().rename(columns={"field": "Field"})
