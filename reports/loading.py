"""The tidy results schema a report reads, and loading it from run directories.

The runner writes one long-form row per cell x metric (``schema_version`` 1, see
:data:`COLUMNS`); :func:`load_results` reads one or several run directories (``results.parquet``
or ``.csv`` plus ``run.json``) and :func:`normalize_results` checks and normalizes the frame.
The pivots are in :mod:`.tables`, the display strings in :mod:`.formatting`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from ternbench.core.results import COLUMNS as _RESULTS_COLUMNS
from ternbench.core.results import (  # reserved names of the schema
    MODEL_LAYER,
    MODEL_TARGET,
    SWEEP_PREFIX,
    TOTAL_LAYER,
)
from ternbench.core.results import SCHEMA_VERSION as _RESULTS_SCHEMA_VERSION

__all__ = [
    "COLUMNS",
    "SCHEMA_VERSION",
    "ResultsError",
    "MODEL_TARGET",
    "TOTAL_LAYER",
    "MODEL_LAYER",
    "TORCH_IMPL",
    "TVM_FP32_IMPL",
    "SWEEP_PREFIX",
    "load_results",
    "normalize_results",
    "results_file",
]

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

TORCH_IMPL = "torch_fp32"  # baseline measured in the same run on the same shapes
TVM_FP32_IMPL = "tvm_fp32"


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
