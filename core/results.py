"""The tidy results schema: one row per cell x metric, its columns, version and reserved names.

``bench`` writes rows of this schema (``cells/*.json``, ``results.parquet``/``.csv``) and
``reports`` reads them; both take the definitions from here.

Example:
    >>> row = make_row({"method": "fgq"}, metric="top1", value=90.0, unit="%")
    >>> row["status"], row["schema_version"], list(row)[:3]
    ('ok', 1, ['schema_version', 'run_id', 'cell_key'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "COLUMNS",
    "MODEL_LAYER",
    "MODEL_TARGET",
    "SCHEMA_VERSION",
    "SWEEP_PREFIX",
    "TOTAL_LAYER",
    "make_row",
]

SCHEMA_VERSION = 1
COLUMNS = [
    "schema_version",
    "run_id",
    "cell_key",
    "method",
    "method_config",
    "profile",
    "model",
    "dataset",
    "subset",
    "seed",
    "target",
    "isa",
    "layer",
    "impl",
    "metric",
    "value",
    "unit",
    "status",
    "error",
]

#: ``target`` of accuracy and cost rows (no latency target)
MODEL_TARGET = "-"
#: ``layer`` of the sum-over-layers latency rows of a target
TOTAL_LAYER = "__total__"
#: ``layer`` of the end-to-end rows of the whole deployed model
MODEL_LAYER = "__model__"
#: prefix of the columns holding swept config fields (``sweep.<field>``, the ablation axes)
SWEEP_PREFIX = "sweep."


def make_row(base: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """A row with every column (empty by default, ``status`` ``ok``), ``base`` and ``fields``
    on top, at this :data:`SCHEMA_VERSION`."""
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    row["status"] = "ok"
    row.update(base)
    row.update(fields)
    row["schema_version"] = SCHEMA_VERSION
    return row
