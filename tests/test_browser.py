"""The HTML report in a real browser: headless Chromium renders it over HTTP.

A report is built from a small synthetic tidy frame (real schema), served from a local
``http.server`` on 127.0.0.1 and loaded in headless Chromium with external hosts unresolvable.
The checks: the rendered DOM holds the tables and inline SVG plots, every ``<img>``, ``<link>`` and
``<script>`` reference resolves locally (no http(s) to elsewhere, no missing file, no 4xx from the
server), the console shows no uncaught JS error, and the screenshot is not blank.
``test_checks_catch_a_broken_page`` runs the same checks on a page broken on purpose, so they are
known to fail when they should.

Needs the Debian package ``chromium`` (``apt-get install -y chromium``); skipped without it.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import pytest
from ternbench.reports import build_report


def _find_chromium() -> str | None:
    for cand in (
        os.environ.get("TERNBENCH_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = _find_chromium()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="headless Chromium not found (/usr/bin/chromium): apt-get install -y chromium, "
        "or point TERNBENCH_CHROMIUM at a chromium binary",
    ),
]

WINDOW = (1280, 2400)
# (method, config, top1, effective bits, sparsity, muls, adds, kernel, per-layer µs)
VARIANTS = [
    ("fp32", {"act_bits": 32}, 91.5, 32.0, 0.0, 1_000_000, 1_000_000, "tvm_fp32", (100.0, 50.0)),
    ("twn", {"act_bits": 8}, 88.25, 2.01, 0.40, 20_000, 600_000, "tvm_t2_avx2", (40.0, 20.0)),
    ("fgq", {"act_bits": 8, "group_size": 4}, 90.75, 2.5, 0.35, 250_000, 650_000, "tvm_t2_avx2",
     (50.0, 25.0)),
]  # fmt: skip
LAYERS = ("conv1", "fc")
TORCH_US = (200.0, 100.0)


def synthetic_results() -> pd.DataFrame:
    """Accuracy/cost rows, per-layer and total latency (x86) and one failed cell."""
    rows: list[dict] = []

    def row(method: str, cfg: dict, **kw: object) -> None:
        rows.append(
            {
                "schema_version": 1,
                "run_id": "browser",
                "cell_key": f"{method}-{json.dumps(cfg, sort_keys=True)}",
                "method": method,
                "method_config": json.dumps(cfg, sort_keys=True),
                "profile": "smoke",
                "model": "resnet8",
                "dataset": "fashion-mnist",
                "subset": "test:1000@seed0",
                "seed": 0,
                "target": "-",
                "layer": "",
                "impl": "",
                "value": float("nan"),
                "unit": "",
                "status": "ok",
                "error": "",
                **kw,
            }
        )

    for method, cfg, top1, bits, sparsity, muls, adds, kernel, lat in VARIANTS:
        for metric, value, unit in (
            ("top1", top1, "%"),
            ("top5", 99.0, "%"),
            ("effective_bits", bits, "bits/weight"),
            ("sparsity", sparsity, "fraction"),
            ("muls", muls, "ops"),
            ("adds", adds, "ops"),
            ("params", 10_000, "count"),
        ):
            row(method, cfg, metric=metric, value=float(value), unit=unit)
        for impl, per_layer in ((kernel, lat), ("torch_fp32", TORCH_US)):
            for layer, us in (*zip(LAYERS, per_layer, strict=True), ("__total__", sum(per_layer))):
                row(method, cfg, target="x86", layer=layer, impl=impl, metric="latency_us",
                    value=us, unit="us")  # fmt: skip
    row("fgq", {"act_bits": 8, "group_size": 64}, metric="error", status="failed",
        error="ValueError: group_size 64 does not divide fan_in 36")  # fmt: skip
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- server and browser


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves one folder; records (path, status) of every request instead of logging it."""

    def __init__(self, *args: object, requests: list[tuple[str, int]], **kw: object) -> None:
        self._requests = requests
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._requests.append((unquote(urlsplit(self.path).path), int(code)))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def serve(folder: Path) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """Serve ``folder`` on 127.0.0.1 at a free port in a thread; yields (base URL, requests)."""
    requests: list[tuple[str, int]] = []
    handler = functools.partial(_Handler, directory=str(folder), requests=requests)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="report-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class Render:
    url: str
    dom: str  # the DOM after scripts ran (--dump-dom)
    log: str  # Chromium's stderr, console messages included
    png: bytes  # the screenshot
    requests: list[tuple[str, int]]  # what the page fetched from our server


def render(folder: Path, page: str, workdir: Path) -> Render:
    """Load ``folder/page`` over HTTP in headless Chromium; DOM, console log and screenshot."""
    assert CHROMIUM is not None
    shot = workdir / "screenshot.png"
    with serve(folder) as (base, requests):
        url = f"{base}/{page}"
        cmd = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # a fresh profile: a reused one can serve a cached page
            f"--user-data-dir={tempfile.mkdtemp(prefix='profile-', dir=workdir)}",
            "--virtual-time-budget=5000",
            # offline like CI: every host but ours fails to resolve (and is reported below)
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--dump-dom",
            url,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, cwd=workdir, check=False
        )
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert shot.is_file(), f"chromium wrote no screenshot:\n{proc.stderr[-3000:]}"
    return Render(url, proc.stdout, proc.stderr, shot.read_bytes(), list(requests))


class _Collect(HTMLParser):
    """Tags of interest in a DOM: resource references and counts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.count: dict[str, int] = {}
        self.svg_in_figure = 0
        self._figure_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.count[tag] = self.count.get(tag, 0) + 1
        a = dict(attrs)
        if tag == "figure":
            self._figure_depth += 1
        elif tag == "svg" and self._figure_depth and "plot" in (a.get("class") or "").split():
            self.svg_in_figure += 1
        for attr in {"img": ("src", "srcset"), "script": ("src",), "link": ("href",)}.get(tag, ()):
            if a.get(attr):
                self.refs.append((tag, attr, str(a[attr]).strip()))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure" and self._figure_depth:
            self._figure_depth -= 1


def problems(r: Render, folder: Path) -> list[str]:
    """Everything wrong with a rendered page: external or missing references, failed
    requests, uncaught JS errors."""
    out: list[str] = []
    dom = _Collect()
    dom.feed(r.dom)
    ours = urlsplit(r.url).netloc
    for tag, attr, value in dom.refs:
        for ref in value.split(",") if attr == "srcset" else [value]:
            ref = ref.strip().split(" ")[0]
            parts = urlsplit(ref)
            if parts.scheme == "data" or ref.startswith("#"):
                continue
            if parts.scheme or ref.startswith("//"):
                if parts.scheme not in ("http", "https") or parts.netloc != ours:
                    out.append(f"external reference <{tag} {attr}={ref!r}>")
                    continue
                path = unquote(parts.path).lstrip("/")
            else:
                path = str(Path(urlsplit(r.url).path).parent / unquote(parts.path)).lstrip("/")
            if not (folder / path).is_file():
                out.append(f"missing file <{tag} {attr}={ref!r}>")
    for path, code in r.requests:
        if code >= 400 and path != "/favicon.ico":  # the browser asks for a favicon on its own
            out.append(f"HTTP {code} for {path}")
    out += [f"JS error: {line.strip()}" for line in r.log.splitlines() if "Uncaught" in line]
    return out


# --------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser-report")
    meta = [{"run_id": "browser", "cpu": "test-cpu", "git": {"sha": "abc1234", "dirty": False}}]
    return build_report(synthetic_results(), out, formats=("html",), meta=meta)["html"]


@pytest.fixture(scope="module")
def rendered(report: Path, tmp_path_factory: pytest.TempPathFactory) -> Render:
    return render(report.parent, report.name, tmp_path_factory.mktemp("chromium"))


def test_report_loads_cleanly(rendered: Render, report: Path) -> None:
    assert ("/report.html", 200) in rendered.requests
    assert problems(rendered, report.parent) == []


def test_rendered_dom_has_tables_and_inline_plots(rendered: Render) -> None:
    dom = _Collect()
    dom.feed(rendered.dom)
    # runs, accuracy, latency, per-layer latency, failed cells
    assert dom.count.get("table", 0) >= 5, dom.count
    assert len(re.findall(r'<table[^>]*class="[^"]*\btb\b', rendered.dom)) >= 5
    # acc-vs-bits, acc-vs-latency, per-layer bars, group-size ablation: inline, inside figures
    assert dom.svg_in_figure >= 3, dom.count
    assert dom.count.get("img", 0) == 0  # plots are inline SVG, not files
    for text in ("ternbench report", "91.50", "88.25", "fgq", "twn", "group_size 64 does not"):
        assert text in rendered.dom, text


def test_screenshot_is_not_blank(rendered: Render) -> None:
    from PIL import Image

    assert rendered.png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rendered.png) > 30_000, len(rendered.png)
    img = Image.open(io.BytesIO(rendered.png))
    assert img.size == WINDOW
    hist = img.convert("L").histogram()  # 256 grey levels
    used = [level for level, n in enumerate(hist) if n]
    assert used[-1] - used[0] > 150, (used[0], used[-1])  # dark text on a light page
    background = max(hist)
    inked = 1 - background / sum(hist)
    assert inked > 0.01, f"only {inked:.2%} of the pixels differ from the background"
    colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # None: more than 65536 colours


def test_checks_catch_a_broken_page(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # served 200: not a problem
    (site / "page.html").write_text(
        "<!DOCTYPE html><html><head>"
        '<link rel="stylesheet" href="https://cdn.example.com/bootstrap.css">'
        '<script src="missing.js"></script></head><body><p>broken on purpose</p>'
        '<img src="ok.png"><img src="plots/none.png">'
        "<script>undefinedFunction();</script></body></html>",
        encoding="utf-8",
    )
    found = problems(render(site, "page.html", tmp_path), site)
    text = "\n".join(found)
    assert "external reference <link href='https://cdn.example.com/bootstrap.css'>" in text
    assert "missing file <script src='missing.js'>" in text
    assert "missing file <img src='plots/none.png'>" in text
    assert "HTTP 404 for /plots/none.png" in text and "HTTP 404 for /missing.js" in text
    assert "JS error:" in text and "undefinedFunction" in text
    assert "ok.png" not in text
