"""Comparative Markdown/HTML reports with plots from ternbench result tables.

``ternbench run`` writes ``DIR/results.parquet`` (+ ``results.csv``) and ``DIR/run.json``; this
package turns one or several such directories into ``report.md`` (PNG plots by relative path),
a self-contained ``report.html`` (inline SVG) and ``plots/*.png|svg``.

Example:
    >>> from ternbench.reports import build_report
    >>> paths = build_report(["runs/a", "runs/b"], "reports/a_vs_b")   # doctest: +SKIP
    >>> sorted(paths)                                                   # doctest: +SKIP
    ['html', 'md', 'plots']
"""

from __future__ import annotations

from .render import build_report
from .tables import SCHEMA_VERSION, ReportData, ResultsError, load_results, prepare

__all__ = [
    "SCHEMA_VERSION",
    "ReportData",
    "ResultsError",
    "build_report",
    "load_results",
    "prepare",
]
