"""BenchConfig validation, the CLI's clear errors, and the results store's resume/atomicity."""

from __future__ import annotations

import json

import pytest
from ternbench.bench.cli import main
from ternbench.bench.config import BenchConfig, parse_override
from ternbench.bench.results import (
    SCHEMA_VERSION,
    ResultStore,
    SchemaMismatchError,
    make_row,
)
from ternbench.core.files import atomic_write as atomic_write_bytes
from ternbench.methods import ConfigError, UnknownMethodError


def test_wildcards_expand_and_validate() -> None:
    cfg = BenchConfig(methods=("fg*", "int8"), profile="smoke")
    assert cfg.methods == ("fgq", "int8")


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"methods": ("fgqq",)}, UnknownMethodError, "Did you mean 'fgq'"),
        ({"methods": ()}, ConfigError, "methods must be a non-empty"),
        ({"models": ("resnet9",)}, ConfigError, "resnet8"),
        ({"datasets": ("fashion_mnist",)}, ConfigError, "fashion-mnist"),
        ({"profile": "smok"}, ConfigError, "smoke"),
        ({"seeds": (-1,)}, ConfigError, "seeds"),
        ({"targets": ("riscv",)}, ConfigError, "unknown target 'riscv'"),
        ({"targets": ("amr",)}, ConfigError, "Did you mean 'arm'"),
        ({"targets": ("x86", "x86")}, ConfigError, "targets must be distinct"),
        ({"rpc": "10.0.0.2:9090"}, ConfigError, "rpc must be used with an ARM target"),
        ({"latency_threads": 0}, ConfigError, "latency_threads"),
        ({"overrides": {"fgq": {"group_size": 0}}, "methods": ("fgq",)}, ConfigError, "group_size"),
        ({"overrides": {"twn": {"ratio": 0.5}}, "methods": ("fgq",)}, ConfigError, "overrides"),
    ],
)
def test_bad_config(kw, exc, match) -> None:
    with pytest.raises(exc, match=match):
        BenchConfig(**kw)


def test_parse_override() -> None:
    assert parse_override("fgq.group_size=8") == ("fgq", "group_size", 8)
    assert parse_override("fgq.solver=twn") == ("fgq", "solver", "twn")
    assert parse_override("twn.ratio=0.75") == ("twn", "ratio", 0.75)
    with pytest.raises(ConfigError, match="METHOD.FIELD=VALUE"):
        parse_override("group_size=8")


def test_toml_config(tmp_path) -> None:
    p = tmp_path / "b.toml"
    p.write_text(
        '[run]\nmethods = "fgq,int8"\nprofile = "smoke"\n\n[methods.fgq]\ngroup_size = 16\n'
    )
    cfg = BenchConfig.from_toml(p)
    assert cfg.methods == ("fgq", "int8") and cfg.overrides == {"fgq": {"group_size": 16}}
    cfg = BenchConfig.from_toml(p, profile="default")  # the command line wins
    assert cfg.profile == "default"
    p.write_text('[run]\nmethod = "fgq"\n')
    with pytest.raises(ConfigError, match="Did you mean 'methods'"):
        BenchConfig.from_toml(p)
    p.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        BenchConfig.from_toml(p)


def test_cli_unknown_method_exits_nonzero(capsys) -> None:
    assert main(["run", "--methods", "fgqq", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "fgq" in err and "Traceback" not in err


def test_cli_dry_run_prints_grid(capsys, tmp_path) -> None:
    assert (
        main(
            [
                "run",
                "--methods",
                "fgq,int8",
                "--profile",
                "smoke",
                "--dry-run",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 cells" in out and "fgq" in out and "fp32" in out  # fp32 joins as the reference
    assert not (tmp_path / "r").exists()


def test_cli_list(capsys) -> None:
    assert main(["list", "methods", "fg*"]) == 0
    assert capsys.readouterr().out.startswith("fgq")


def test_store_resume_and_schema(tmp_path) -> None:
    store = ResultStore(tmp_path / "run")
    meta = store.open_session(["x"], {"a": 1})
    assert not store.is_done("k", "accuracy")
    store.write_part("k", "accuracy", [make_row({"cell_key": "k"}, metric="top1", value=1.0)])
    assert store.is_done("k", "accuracy")
    store.write_part(
        "j", "accuracy", [make_row({"cell_key": "j"}, metric="error", status="failed")]
    )
    assert not store.is_done("j", "accuracy")  # failed parts are retried
    df = store.consolidate()
    assert len(df) == 2 and (tmp_path / "run" / "results.parquet").exists()
    again = store.open_session(["y"], {"a": 1})
    assert again["run_id"] == meta["run_id"] and len(again["sessions"]) == 2
    raw = json.loads(store.run_json.read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    store.run_json.write_text(json.dumps(raw))
    with pytest.raises(SchemaMismatchError, match="new --out"):
        store.open_session(["z"], {})


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch) -> None:
    p = tmp_path / "results.csv"
    atomic_write_bytes(p, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["results.csv"]  # no temp file left
