"""Tests for ternbench.reports on a small synthetic results table in the real tidy schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from ternbench.reports import ResultsError, build_report, load_results, prepare
from ternbench.reports.plots import method_colors, pareto_mask
from ternbench.reports.render import inline_svg

MODEL, DATASET, SUBSET = "tinycnn", "fashion-mnist", "test:1000@seed0"
LAYERS = ("conv1", "fc")
FAIL_REASON = "ValueError: group_size 64 does not divide fan_in 36 | see worker log"

# (method, config, sweep.group_size, top1, bits, sparsity, muls, adds, kernel, per-layer µs)
VARIANTS = [
    (
        "fp32",
        {"act_bits": 32, "first_last": "fp32"},
        None,
        91.50,
        32.0,
        0.0,
        1_000_000,
        1_000_000,
        "tvm_fp32",
        (100.0, 50.0),
    ),
    (
        "twn",
        {"act_bits": 8, "first_last": "int8"},
        None,
        88.25,
        2.01,
        0.40,
        20_000,
        600_000,
        "tvm_t2_avx2",
        (40.0, 20.0),
    ),
    (
        "fgq",
        {"act_bits": 8, "first_last": "int8", "group_size": 4},
        4,
        90.75,
        2.50,
        0.35,
        250_000,
        650_000,
        "tvm_t2_avx2",
        (50.0, 25.0),
    ),
    (
        "fgq",
        {"act_bits": 8, "first_last": "int8", "group_size": 16},
        16,
        89.10,
        2.12,
        0.37,
        62_500,
        630_000,
        "tvm_t2_avx2",
        (30.0, 20.0),
    ),
]
TORCH_LAYERS = (200.0, 100.0)  # torch FP32 per layer -> 300 µs total


def _row(run_id: str, method: str, cfg: dict, sweep: object, **kw: object) -> dict:
    base = {
        "schema_version": 1,
        "run_id": run_id,
        "cell_key": f"{method}-{sweep}-{kw.get('target')}",
        "method": method,
        "method_config": json.dumps(cfg, sort_keys=True),
        "profile": "smoke",
        "model": MODEL,
        "dataset": DATASET,
        "subset": SUBSET,
        "seed": 0,
        "target": "-",
        "layer": "",
        "impl": "",
        "metric": "",
        "value": float("nan"),
        "unit": "",
        "status": "ok",
        "error": "",
        "sweep.group_size": sweep,
    }
    base.update(kw)
    return base


def make_results(
    run_id: str = "run_a",
    top1_shift: float = 0.0,
    latency: bool = True,
    methods: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """The synthetic tidy frame: fp32, twn, fgq x2 (+ one failed fgq cell), 2 layers, x86."""
    rows = []
    for method, cfg, sweep, top1, bits, sp, muls, adds, kernel, lat in VARIANTS:
        if methods is not None and method not in methods:
            continue
        for metric, value, unit in (
            ("top1", top1 + top1_shift, "%"),
            ("top5", 99.0, "%"),
            ("loss", 0.3, ""),
            ("n_eval", 1000, "count"),
            ("bn_recalibrated", 0, "bool"),
            ("deploy_max_abs_diff", 0.0, ""),
            ("effective_bits", bits, "bits/weight"),
            ("sparsity", sp, "fraction"),
            ("muls", muls, "ops"),
            ("adds", adds, "ops"),
            ("params", 10_000, "count"),
            ("ternary_fraction", 0.0 if method == "fp32" else 0.9, "fraction"),
        ):
            rows.append(
                _row(
                    run_id,
                    method,
                    cfg,
                    sweep,
                    metric=metric,
                    value=float(value),
                    unit=unit,
                    target="-",
                )
            )
        if not latency:
            continue
        for impl, per_layer in ((kernel, lat), ("torch_fp32", TORCH_LAYERS)):
            for layer, us in zip(LAYERS, per_layer, strict=True):
                rows.append(
                    _row(
                        run_id,
                        method,
                        cfg,
                        sweep,
                        target="x86",
                        layer=layer,
                        impl=impl,
                        metric="latency_us",
                        value=us,
                        unit="us",
                    )
                )
            rows.append(
                _row(
                    run_id,
                    method,
                    cfg,
                    sweep,
                    target="x86",
                    layer="__total__",
                    impl=impl,
                    metric="latency_us",
                    value=sum(per_layer),
                    unit="us",
                )
            )
    if methods is None or "fgq" in methods:
        rows.append(
            _row(
                run_id,
                "fgq",
                {"act_bits": 8, "first_last": "int8", "group_size": 64},
                64,
                metric="error",
                status="failed",
                error=FAIL_REASON,
            )
        )
    df = pd.DataFrame(rows)
    df["sweep.group_size"] = df["sweep.group_size"].astype("float64")
    return df


def write_run(d: Path, df: pd.DataFrame, run_id: str, fmt: str = "parquet") -> Path:
    d.mkdir(parents=True)
    if fmt == "parquet":
        df.to_parquet(d / "results.parquet", index=False)
    df.to_csv(d / "results.csv", index=False)
    meta = {
        "run_id": run_id,
        "argv": ["ternbench", "run", "--profile", "smoke"],
        "git": {"sha": "abc1234", "dirty": False},
        "versions": {
            "torch": "2.14.1",
            "torchvision": "0.29.1",
            "tvm": "0.27.0",
            "ray": "2.60.0",
            "python": "3.11.7",
        },
        "cpu": "test-cpu",
        "threads": 2,
        "seeds": [0],
        "profile": "smoke",
        "started": "2026-01-01T00:00:00Z",
        "finished": "2026-01-01T00:05:00Z",
        "executor": "local",
    }
    (d / "run.json").write_text(json.dumps(meta), encoding="utf-8")
    return d


def _md_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], str, str]:
    out = tmp_path_factory.mktemp("report")
    paths = build_report(make_results(), out, meta=[{"run_id": "run_a", "cpu": "test-cpu"}])
    return (
        paths,
        paths["md"].read_text(encoding="utf-8"),
        paths["html"].read_text(encoding="utf-8"),
    )


def test_numbers_computed_by_hand() -> None:
    data = prepare(make_results(), registry=["fp32", "int8", "twn", "fgq"])
    acc = data.accuracy.set_index("label")
    assert list(acc.index) == ["fp32", "twn", "fgq (group_size=4)", "fgq (group_size=16)"]
    assert acc.loc["twn", "delta_top1"] == pytest.approx(88.25 - 91.50)
    assert acc.loc["fgq (group_size=4)", "delta_top1"] == pytest.approx(-0.75)
    assert bool(acc.loc["fp32", "is_reference"])
    lat = data.latency.set_index("label")
    assert lat.loc["twn", "latency_us"] == pytest.approx(60.0)
    assert lat.loc["twn", "torch_fp32_us"] == pytest.approx(300.0)
    assert lat.loc["twn", "speedup_torch"] == pytest.approx(5.0)
    assert lat.loc["twn", "speedup_tvm_fp32"] == pytest.approx(2.5)
    assert lat.loc["fgq (group_size=16)", "speedup_torch"] == pytest.approx(6.0)
    assert set(data.layers["layer"]) == set(LAYERS)
    assert len(data.failed) == 1 and data.failed.loc[0, "error"] == FAIL_REASON


def test_total_is_summed_when_missing() -> None:
    df = make_results()
    df = df[df["layer"].ne("__total__")]
    lat = prepare(df, registry=[]).latency.set_index("label")
    assert lat.loc["fgq (group_size=4)", "latency_us"] == pytest.approx(75.0)
    assert lat.loc["fgq (group_size=4)", "speedup_tvm_fp32"] == pytest.approx(2.0)


def test_markdown_report(single: tuple[dict[str, Path], str, str]) -> None:
    paths, md, _ = single
    assert paths["md"].is_file() and paths["html"].is_file()
    for text in (
        "91.50",
        "-3.25",
        "-0.75",
        "-2.40",
        "| ref",
        "2.50",
        "35.0%",
        "1.00M",
        "250.00k",
        "60.0",
        "300.0",
        "5.00×",
        "2.50×",
        "6.00×",
        "fgq (group_size=16)",
        "sweep.group_size",
        "test-cpu",
        "Per-layer latency",
        "conv1",
    ):
        assert text in md, text
    # failed cell with its reason; the pipe inside the reason is escaped for the table
    assert "group_size 64 does not divide fan_in 36 \\| see worker log" in md
    images = _md_images(md)
    assert images and all(p.startswith("plots/") and p.endswith(".png") for p in images)
    for rel in images:
        assert (paths["md"].parent / rel).is_file(), rel


def test_plots_png_and_svg(single: tuple[dict[str, Path], str, str]) -> None:
    plots = single[0]["plots"]
    names = {p.stem for p in plots.glob("*.png")}
    assert {"acc_vs_bits", "acc_vs_latency_x86", "ablation_group_size"} <= names
    assert any(n.startswith("layers_x86") for n in names)
    for n in names:
        png, svg = plots / f"{n}.png", plots / f"{n}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in svg.read_text(encoding="utf-8")[:2000]


def test_html_self_contained(single: tuple[dict[str, Path], str, str]) -> None:
    paths, _, html = single
    assert html.count("<svg") >= 4
    assert "<details>" in html and "<img" not in html
    refs = re.findall(r'\b(?:href|src)\s*=\s*["\']([^"\']*)', html)
    assert not [r for r in refs if re.match(r"https?:|//", r)]
    for r in refs:  # anything not in-page or inline data must exist next to the report
        if not r.startswith(("#", "data:")):
            assert (paths["html"].parent / r).is_file(), r
    assert "<!DOCTYPE svg" not in html and "<?xml" not in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "inlined SVG ids collide"
    assert "5.00×" in html and "group_size 64 does not divide" in html


def test_two_run_comparison(tmp_path: Path) -> None:
    d1 = write_run(tmp_path / "a", make_results("run_a"), "run_a")
    d2 = write_run(tmp_path / "b", make_results("run_b", top1_shift=1.0), "run_b", fmt="csv")
    df, metas = load_results(d1, d2)
    assert [m["run_id"] for m in metas] == ["run_a", "run_b"]
    assert set(df["run_id"]) == {"run_a", "run_b"}
    # empty strings survive the CSV round trip (layer "" marks model-level rows)
    assert (df.loc[df["run_id"].eq("run_b") & df["metric"].eq("top1"), "layer"] == "").all()
    paths = build_report([d1, d2], tmp_path / "out", formats=("md",))
    assert "html" not in paths
    md = paths["md"].read_text(encoding="utf-8")
    assert "fgq (group_size=4) [run_a]" in md and "fgq (group_size=4) [run_b]" in md
    assert "92.50" in md and "91.50" in md  # each run's own fp32 is the reference
    meta_header = next(line for line in md.splitlines() if line.startswith("| Field"))
    assert "run_a" in meta_header and "run_b" in meta_header
    assert "2.14.1" in md and "abc1234" in md


def test_resumed_run_metadata_is_one_field_per_line(tmp_path: Path) -> None:
    """run.json as the runner writes it: one ``sessions`` entry per start of a resumed run,
    ``baselines`` a list too. Each leaf gets its own row, no dict is dumped into a cell."""
    d = write_run(tmp_path / "a", make_results("run_a"), "run_a")
    session = {"argv": ["ternbench", "run", "--methods", "fgq"], "git_sha": "abc1234",
               "versions": {"torch": "2.14.1", "apache-tvm": "0.27.0.post1"}, "cpu": "AMD EPYC"}
    meta = {"schema_version": 1, "run_id": "run_a",
            "sessions": [session, {**session, "git_sha": "def5678"}],
            "config": {"methods": ["fgq"], "latency_threads": 1},
            "baselines": [{"model": "resnet8", "source": "shipped"}]}
    (d / "run.json").write_text(json.dumps(meta), encoding="utf-8")
    md = build_report([d], tmp_path / "out", formats=("md",))["md"].read_text(encoding="utf-8")
    runs = md.split("## Runs", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in runs.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["sessions.1.argv"] == "ternbench run --methods fgq"
    assert rows["sessions.2.git_sha"] == "def5678"
    assert rows["sessions.1.versions.apache-tvm"] == "0.27.0.post1"
    assert rows["baselines.1.source"] == "shipped"
    assert "{'" not in runs and "[{" not in runs


def test_same_run_twice_stays_two_columns(tmp_path: Path) -> None:
    d1 = write_run(tmp_path / "a", make_results("run_a"), "run_a")
    df, metas = load_results(d1, d1)
    assert [m["run_id"] for m in metas] == ["run_a", "run_a#2"]
    assert set(df["run_id"]) == {"run_a", "run_a#2"}


def test_wrong_schema_and_missing_results(tmp_path: Path) -> None:
    bad = make_results()
    bad["schema_version"] = 2
    d = write_run(tmp_path / "v2", bad, "run_a")
    with pytest.raises(ResultsError, match=r"schema_version.*'2'.*reads schema_version 1"):
        load_results(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="no results.parquet or results.csv"):
        build_report(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ResultsError, match="missing column"):
        prepare(make_results().drop(columns=["metric"]))


def test_no_latency_single_method(tmp_path: Path) -> None:
    paths = build_report(make_results(latency=False, methods=("twn",)), tmp_path, title="only twn")
    md = paths["md"].read_text(encoding="utf-8")
    assert md.startswith("# only twn")
    assert "No latency rows" in md and "88.25" in md
    assert "None: every cell finished." in md
    assert (tmp_path / "plots" / "acc_vs_bits.svg").is_file()
    assert not list((tmp_path / "plots").glob("acc_vs_latency*"))


def test_pareto_and_colors() -> None:
    assert pareto_mask([1, 2, 3, 4], [50, 40, 60, float("nan")]).tolist() == [
        True,
        False,
        True,
        False,
    ]
    reg = ["fp32", "int8", "twn", "fgq"]
    full = method_colors(["fp32", "twn", "fgq"], registry=reg)
    alone = method_colors(["fgq"], registry=reg)
    assert alone["fgq"] == full["fgq"] and len(set(full.values())) == 3
    # unknown methods still get a colour
    assert set(method_colors(["zzz", "fp32"], registry=reg)) == {"zzz", "fp32"}


def test_inline_svg_prefixes_ids() -> None:
    svg = (
        '<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "x" "http://www.w3.org/x.dtd">\n'
        '<svg><metadata><a rdf:resource="http://x"/></metadata><defs><path id="m1"/></defs>'
        '<use xlink:href="#m1"/><g clip-path="url(#p2)"/></svg>'
    )
    out = inline_svg(svg, "f0")
    assert 'id="f0-m1"' in out and 'href="#f0-m1"' in out and "url(#f0-p2)" in out
    assert "http://" not in out and out.startswith('<svg class="plot"')


def test_paper_numbers_shown_only_for_matching_model_and_dataset(tmp_path) -> None:
    """Reported numbers appear, labelled, beside ours when model and dataset match."""
    import pandas as pd
    from ternbench.reports import build_report

    rows = []
    for method, top1 in (("fp32", 91.0), ("ttn_re", 90.1)):
        rows.append({"schema_version": 1, "run_id": "r", "cell_key": method, "method": method,
                     "method_config": "{}", "profile": "default", "model": "resnet20",
                     "dataset": "cifar10", "subset": "test:all@seed0", "seed": 0, "target": "-",
                     "layer": "", "impl": "", "metric": "top1", "value": top1, "unit": "%",
                     "status": "ok", "error": ""})
    paths = build_report(pd.DataFrame(rows), tmp_path / "a")
    md = paths["md"].read_text()
    assert "Reported in the papers (not measured here)" in md
    assert "91.65" in md and "90.10" in md
    other = pd.DataFrame([{**r, "model": "resnet8", "dataset": "fashion-mnist"} for r in rows])
    md2 = build_report(other, tmp_path / "b")["md"].read_text()
    assert "Reported in the papers" not in md2


def test_narrow_log_axis_labels_only_1_2_3_5_times_powers_of_ten() -> None:
    """A latency axis within ~1.5 decades labels its minor ticks too, but not 6-9x a power of
    ten (those labels ran into each other: "600700800900")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ternbench.reports.plots import _plain_log_axis

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_xlim(60, 1100)
    _plain_log_axis(ax.xaxis, [60.0, 1100.0])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.xaxis.get_ticklabels(minor=True) + ax.xaxis.get_ticklabels()
              if t.get_text()]
    plt.close(fig)
    assert {"100", "200", "300", "500", "1000"} <= set(labels)
    assert not {"60", "70", "80", "90", "600", "700", "800", "900"} & set(labels), labels
