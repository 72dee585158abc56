"""The tidy results store: one row per cell x metric, written so that nothing finished is lost.

Layout of a run directory::

    run.json                 metadata (argv, git, versions, hardware, seeds), one entry per session
    config.json              the BenchConfig of the latest session
    cells/<key>.<part>.json  rows of one finished part of a cell (accuracy, latency-x86), atomic
    exports/<key>.npz        the deployable form of a cell's quantized model (no pickle)
    subsets/*.npy            the exact sample indices used
    results.parquet/.csv     all rows, rebuilt from cells/ after every part (atomic replace)

A re-run with the same ``--out`` skips every part whose file holds ``status == "ok"``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from ternbench.core.files import atomic_write
from ternbench.core.results import COLUMNS, SCHEMA_VERSION, SWEEP_PREFIX, make_row

__all__ = [
    "SCHEMA_VERSION",
    "COLUMNS",
    "ResultStore",
    "SchemaMismatchError",
    "collect_env",
    "make_row",
]

log = logging.getLogger(__name__)


class SchemaMismatchError(RuntimeError):
    """The run directory was written by an incompatible version of ternbench."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_env() -> dict[str, Any]:
    """Versions, git state and hardware, recorded with every run (BiBench ``collect_env``)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in (
        "ternbench",
        "torch",
        "torchvision",
        "apache-tvm",
        "apache-tvm-ffi",
        "ray",
        "numpy",
        "pandas",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    sha = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain")) if sha else None
    env: dict[str, Any] = {
        "versions": versions,
        "git_sha": sha,
        "git_dirty": dirty,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    try:
        import torch

        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch without CUDA support or a broken driver: record, don't fail
        env["gpu"] = None
    return env


@dataclass
class ResultStore:
    """A run directory (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # -- metadata ------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def read_meta(self) -> dict[str, Any] | None:
        if not self.run_json.exists():
            return None
        meta = json.loads(self.run_json.read_text())
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise SchemaMismatchError(
                f"{self.root} holds results of schema version {meta.get('schema_version')!r}, "
                f"this ternbench writes version {SCHEMA_VERSION}; use a new --out directory"
            )
        return meta

    def open_session(self, argv: list[str], config: Mapping[str, Any]) -> dict[str, Any]:
        """Create or extend run.json; the run_id stays the same across resumed sessions."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".write-test-{uuid.uuid4().hex[:6]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OSError(f"results directory {self.root} is not writable: {exc}") from exc
        meta = self.read_meta() or {
            "schema_version": SCHEMA_VERSION,
            "run_id": time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6],
            "sessions": [],
        }
        meta["sessions"].append(
            {
                "argv": list(argv),
                "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **collect_env(),
            }
        )
        meta["config"] = dict(config)
        self.write_meta(meta)
        atomic_write(
            self.root / "config.json", json.dumps(config, indent=2, default=str).encode()
        )
        return meta

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        atomic_write(self.run_json, json.dumps(meta, indent=2, default=str).encode())

    # -- cells ---------------------------------------------------------------------------
    def part_path(self, key: str, part: str) -> Path:
        return self.root / "cells" / f"{key}.{part}.json"

    def is_done(self, key: str, part: str) -> bool:
        p = self.part_path(key, part)
        if not p.exists():
            return False
        try:
            rows = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable %s; the part will be recomputed", p)
            return False
        return bool(rows) and all(r.get("status") == "ok" for r in rows)

    def write_part(self, key: str, part: str, rows: Iterable[Mapping[str, Any]]) -> None:
        data = json.dumps(list(rows), default=_json_default).encode()
        atomic_write(self.part_path(key, part), data)

    def rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in sorted((self.root / "cells").glob("*.json")):
            try:
                out.extend(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("skipping unreadable %s: %s", p, exc)
        return out

    def frame(self) -> pd.DataFrame:
        rows = self.rows()
        # swept config fields become columns `sweep.<field>` (ablation axes of the report)
        extra = sorted({k for r in rows for k in r if k.startswith(SWEEP_PREFIX)})
        df = pd.DataFrame(rows, columns=COLUMNS + extra)
        df["value"] = pd.to_numeric(df["value"], errors="coerce")
        df["seed"] = pd.to_numeric(df["seed"], errors="coerce").fillna(-1).astype(int)
        df["schema_version"] = SCHEMA_VERSION
        for c in COLUMNS:
            if c not in ("value", "seed", "schema_version"):
                df[c] = df[c].fillna("").astype(str)
        for c in extra:  # numeric axes stay numeric; mixed or textual ones become strings
            num = pd.to_numeric(df[c], errors="coerce")
            df[c] = num if num.notna().sum() == df[c].notna().sum() else df[c].astype("string")
        return df

    def consolidate(self) -> pd.DataFrame:
        """Rewrite results.parquet and results.csv from cells/ (each replaced atomically)."""
        df = self.frame()
        atomic_write(self.root / "results.csv", df.to_csv(index=False).encode())
        atomic_write(self.root / "results.parquet", lambda tmp: df.to_parquet(tmp, index=False))
        return df


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
