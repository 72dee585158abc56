"""ternbench.core: the floor every other package stands on; it imports none of them.

What several packages share lives here once:

* :mod:`.errors`: :class:`ConfigError`;
* :mod:`.export`: the export contract, :class:`LayerExport` (numpy);
* :mod:`.reference`: its integer semantics, the one activation quantizer
  (``quantize_activation``) and the float64 reference kernels are checked against (torch);
* :mod:`.export_io`: the export file format (``exports/<key>.npz``, graph state);
* :mod:`.results`: the tidy results schema (columns, version, reserved names, ``make_row``);
* :mod:`.files`: the one atomic write and the one cache root;
* :mod:`.train`: the training loop, evaluation and BatchNorm re-estimation (torch).

Importing ``ternbench.core`` loads only the light modules below (stdlib and numpy); the torch
ones (``reference``, ``train``) are imported by name where needed.

Example:
    >>> from ternbench.core import COLUMNS, cache_root
    >>> COLUMNS[0]
    'schema_version'
"""

from __future__ import annotations

from .errors import ConfigError
from .export import ActMode, LayerExport, WeightFormat, act_qmax
from .files import atomic_write, cache_root
from .results import (
    COLUMNS,
    MODEL_LAYER,
    MODEL_TARGET,
    SCHEMA_VERSION,
    SWEEP_PREFIX,
    TOTAL_LAYER,
    make_row,
)

__all__ = [
    "COLUMNS",
    "MODEL_LAYER",
    "MODEL_TARGET",
    "SCHEMA_VERSION",
    "SWEEP_PREFIX",
    "TOTAL_LAYER",
    "ActMode",
    "ConfigError",
    "LayerExport",
    "WeightFormat",
    "act_qmax",
    "atomic_write",
    "cache_root",
    "make_row",
]
