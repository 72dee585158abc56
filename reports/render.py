"""Render a results table into ``report.md`` / ``report.html`` plus ``plots/*.png|svg``.

The Markdown report references the PNGs by relative path (``plots/NAME.png``); the HTML report
is self-contained: the SVGs are inlined (ids prefixed per figure so several plots can share one
document) and the CSS is embedded, so the file can be mailed or archived on its own.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from . import plots as _plots
from .tables import (
    ReportData,
    format_accuracy,
    format_failed,
    format_latency,
    format_layers,
    format_meta,
    format_model,
    format_status,
    load_results,
    prepare,
    reference_method,
)

__all__ = ["build_report", "inline_svg", "render_templates"]

log = logging.getLogger(__name__)

FORMATS = ("md", "html")
_TEMPLATE_PKG = "ternbench.reports"


# --------------------------------------------------------------------------- templates


def _load_template_source(name: str) -> str:
    # importlib.resources works for wheels, editable installs and zip imports alike
    return resources.files(_TEMPLATE_PKG).joinpath("templates", name).read_text(encoding="utf-8")


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template_source),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html.j2",), default_for_string=False
        ),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a template typo fails loudly instead of rendering ""
    )


# --------------------------------------------------------------------------- tables


def _md_table(df: pd.DataFrame, index: bool = False) -> str:
    """GitHub Markdown table; pipes and newlines inside cells are escaped."""
    if df.empty:
        return "_(none)_"
    clean = df.copy()
    for col in clean.columns:
        clean[col] = [str(v).replace("|", "\\|").replace("\n", " ") for v in clean[col]]
    clean.columns = [str(c).replace("|", "\\|") for c in clean.columns]
    return clean.to_markdown(index=index, tablefmt="github", disable_numparse=True)


def _html_table(
    df: pd.DataFrame, css: pd.DataFrame | None = None, caption: str | None = None, uuid: str = "t"
) -> str:
    """HTML table via :class:`pandas.io.formats.style.Styler`; ``css`` gives per-cell styles."""
    if df.empty:
        return "<p class='note'>(none)</p>"
    styler = df.style.hide(axis="index").format(escape="html")
    styler = styler.set_uuid(uuid).set_table_attributes('class="tb"')
    if css is not None:
        styler = styler.apply(
            lambda _: css.reindex(index=df.index, columns=df.columns, fill_value=""), axis=None
        )
    if caption:
        styler = styler.set_caption(html.escape(caption))
    return styler.to_html(doctype_html=False, cell_ids=False)


def _speed_css(df: pd.DataFrame, numeric: pd.DataFrame, pairs: Mapping[str, str]) -> pd.DataFrame:
    """Green for speed-ups above 1, red below (display column -> numeric column)."""
    css = pd.DataFrame("", index=df.index, columns=df.columns)
    for disp, num in pairs.items():
        if disp not in df.columns:
            continue
        vals = pd.to_numeric(numeric[num], errors="coerce").to_numpy()
        css[disp] = [
            ""
            if pd.isna(v)
            else ("color:#137333;font-weight:600" if v > 1 else "color:#b3261e" if v < 1 else "")
            for v in vals
        ]
    return css


def _acc_css(df: pd.DataFrame, acc: pd.DataFrame) -> pd.DataFrame:
    css = pd.DataFrame("", index=df.index, columns=df.columns)
    col = "Δ Top-1 vs fp32 (pp)"
    vals = pd.to_numeric(acc["delta_top1"], errors="coerce").to_numpy()
    css[col] = [
        ""
        if pd.isna(v) or ref
        else ("color:#b3261e" if v < -1.0 else "color:#137333" if v >= 0 else "")
        for v, ref in zip(vals, acc["is_reference"], strict=True)
    ]
    # bold the best top-1 per model / dataset / run
    best = acc.groupby(["run_id", "model", "dataset"])["top1"].transform("max")
    css["Top-1 (%)"] = [
        "font-weight:700" if pd.notna(t) and t == b else ""
        for t, b in zip(acc["top1"], best, strict=True)
    ]
    red = "color:#b3261e;font-weight:700"
    if "Status" in css.columns:  # collapsed cells: the whole row in red
        for i, w in enumerate(acc["degraded"].astype(str)):
            if w:
                css.iloc[i, :] = red
    if "Training" in css.columns:
        css["Training"] = [red if t == "not converged" else "" for t in df["Training"]]
    return css


# --------------------------------------------------------------------------- svg inlining

_SVG_PROLOG = re.compile(r"<\?xml.*?\?>|<!DOCTYPE[^>]*>|<metadata>.*?</metadata>", re.S)
_SVG_ID = re.compile(r'\bid="([^"]+)"')
_SVG_REF = re.compile(r'(href="#|url\(#)([^")]+)')


def inline_svg(svg_text: str, prefix: str) -> str:
    """An SVG file's text made fit for inlining into HTML.

    Drops the XML prolog, DOCTYPE (an external DTD link) and RDF metadata, prefixes every
    ``id`` and ``#ref`` with ``prefix`` (matplotlib reuses ids such as ``figure_1`` and glyph
    ids across files) and makes the figure scale with the page.
    """
    text = _SVG_PROLOG.sub("", svg_text).strip()
    text = _SVG_ID.sub(lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = _SVG_REF.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", text)
    return re.sub(r"<svg\b", '<svg class="plot" role="img"', text, count=1)


# --------------------------------------------------------------------------- context


@dataclass
class _Section:
    target: str
    table_md: str
    table_html: str
    plots: list[dict[str, str]] = field(default_factory=list)
    layers_md: str = ""
    layers_html: str = ""
    layer_plots: list[dict[str, str]] = field(default_factory=list)


def _plot_ctx(p: _plots.Plot, out_dir: Path, idx: int, with_svg: bool) -> dict[str, str]:
    ctx = {"title": p.title, "png": p.png.relative_to(out_dir).as_posix(), "svg": ""}
    if with_svg:
        ctx["svg"] = inline_svg(p.svg.read_text(encoding="utf-8"), f"fig{idx}")
    return ctx


def _context(
    data: ReportData, plots: list[_plots.Plot], out_dir: Path, title: str, with_svg: bool
) -> dict[str, Any]:
    pctx = {p.name: _plot_ctx(p, out_dir, i, with_svg) for i, p in enumerate(plots)}
    by_section: dict[str, list[dict[str, str]]] = {}
    for p in plots:
        by_section.setdefault(p.section, []).append(pctx[p.name])

    meta = format_meta(data.meta)
    acc_disp = format_accuracy(data.accuracy, data.sweep_cols)
    sections: list[_Section] = []
    for target in data.targets:
        lat = data.latency[data.latency["target"].eq(target)].reset_index(drop=True)
        disp = format_latency(lat, data.sweep_cols)
        css = _speed_css(
            disp,
            lat,
            {"Speed-up vs torch": "speedup_torch", "Speed-up vs TVM FP32": "speedup_tvm_fp32"},
        )
        lay = data.layers[data.layers["target"].eq(target)].reset_index(drop=True)
        lay_disp = format_layers(lay)
        lay_css = _speed_css(lay_disp, lay, {"Speed-up vs torch": "speedup_torch"})
        sections.append(
            _Section(
                target=target,
                table_md=_md_table(disp),
                table_html=_html_table(disp, css, uuid=f"lat{len(sections)}"),
                plots=by_section.get(f"latency:{target}", []),
                layers_md=_md_table(lay_disp) if len(lay) else "",
                layers_html=_html_table(lay_disp, lay_css, uuid=f"lay{len(sections)}")
                if len(lay)
                else "",
                layer_plots=by_section.get(f"layers:{target}", []),
            )
        )
    model_disp = format_model(data.model) if len(data.model) else pd.DataFrame()
    status_disp = format_status(data.status) if len(data.status) else pd.DataFrame()
    ledger = _ledger_table(metas_of(data))
    papers = _paper_table(data)
    fidelity = fidelity_table(data)
    failed = format_failed(data.failed)
    failed_md = format_failed(data.failed, max_error=300)
    n_fail_cells = data.failed[["run_id", "cell_key"]].drop_duplicates().shape[0]
    return {
        "title": title,
        "generated": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "n_rows": len(data.df),
        "n_variants": len(data.variants),
        "run_ids": data.run_ids,
        "compare": data.compare,
        "meta_md": _md_table(meta),
        "meta_html": _html_table(meta, uuid="meta"),
        "acc_md": _md_table(acc_disp) if len(acc_disp) else "",
        "acc_html": _html_table(acc_disp, _acc_css(acc_disp, data.accuracy), uuid="acc")
        if len(acc_disp)
        else "",
        "acc_plots": by_section.get("accuracy", []),
        "latency": sections,
        "model_md": _md_table(model_disp) if len(model_disp) else "",
        "model_html": _html_table(model_disp, uuid="model") if len(model_disp) else "",
        "status_md": _md_table(status_disp) if len(status_disp) else "",
        "status_html": _html_table(status_disp, uuid="status") if len(status_disp) else "",
        "failed_md": _md_table(failed_md) if len(failed) else "",
        "failed_html": _html_table(failed, uuid="fail") if len(failed) else "",
        "n_failed": n_fail_cells,
        "ablation_plots": by_section.get("ablation", []),
        "ledger_md": _md_table(ledger) if len(ledger) else "",
        "papers_md": _md_table(papers) if len(papers) else "",
        "fidelity_md": _md_table(fidelity) if len(fidelity) else "",
        "fidelity_html": _html_table(fidelity, uuid="fidelity") if len(fidelity) else "",
        "curve_plots": by_section.get("curves", []),
        "degraded_md": "\n".join(f"- **degraded** {w}" for w in _degraded_list(data)),
        "degraded_html": "".join(
            f'<li style="color:#b3261e"><b>degraded</b> {html.escape(w)}</li>'
            for w in _degraded_list(data)),
        "papers_html": _html_table(papers, uuid="papers") if len(papers) else "",
        "ledger_html": _html_table(ledger, uuid="ledger") if len(ledger) else "",
        "sweep_cols": [c.removeprefix("sweep.") for c in data.sweep_cols],
    }


def _degraded_list(data: ReportData) -> list[str]:
    acc = data.accuracy
    if not len(acc) or "degraded" not in acc:
        return []
    return [f"{r.label} on {r.model} / {r.dataset}: {r.degraded}"
            for r in acc.itertuples() if str(r.degraded)]


def _sign(v: float, tol: float) -> int:
    return 0 if abs(v) <= tol else (1 if v > 0 else -1)


def fidelity_table(data: ReportData, tol: float = 0.5) -> pd.DataFrame:
    """Our Δ top-1 vs FP32 beside the paper's Δ vs its own FP32, per method variant.

    The paper's number is the one for the same model and dataset where it has one, else the
    closest (same dataset, then same model, then the first listed). ``Sign`` agrees when both
    deltas have the same sign, deltas within ±``tol`` points counting as 0 (both "on par");
    ``Ordering`` counts the pairs of methods (with a paper delta each) that the two columns
    order the same way.
    """
    from .paper_numbers import closest_delta

    acc = data.accuracy
    if not len(acc):
        return pd.DataFrame()
    ref = reference_method()
    rows: list[dict[str, Any]] = []
    for rec in acc.to_dict("records"):
        method, model, dataset = str(rec["method"]), str(rec["model"]), str(rec["dataset"])
        delta = float(rec["delta_top1"])
        if method == ref or delta != delta:  # NaN: no reference
            continue
        pd_ = closest_delta(method, model, dataset)
        setting = ""
        if pd_ is not None:
            near = "" if pd_.exact_for(model, dataset) else " (closest)"
            setting = f"{pd_.model} / {pd_.dataset}{near}: {pd_.setting}"
        rows.append({
            "Method": str(rec["label"]), "Model / dataset": f"{model} / {dataset}",
            "ours": delta,
            "paper": None if pd_ is None else pd_.delta,
            "Paper's setting": setting,
            "method": method,
        })
    if not rows:
        return pd.DataFrame()
    have = [x for x in rows if x["paper"] is not None]
    for x in rows:
        if x["paper"] is None:
            x["Sign"], x["Ordering"] = "no paper delta", ""
            continue
        x["Sign"] = "agrees" if _sign(x["ours"], tol) == _sign(x["paper"], tol) else "DIFFERS"
        pairs = [y for y in have if y is not x and y["method"] != x["method"]]
        same = sum((x["ours"] - y["ours"]) * (x["paper"] - y["paper"]) > 0 for y in pairs)
        x["Ordering"] = f"{same}/{len(pairs)} pairs agree" if pairs else ""
    return pd.DataFrame([{
        "Method": x["Method"], "Model / dataset": x["Model / dataset"],
        "Our Δ vs FP32 (pp)": f"{x['ours']:+.2f}",
        "Paper's Δ vs its FP32 (pp)": "" if x["paper"] is None else f"{x['paper']:+.2f}",
        "Paper's setting": x["Paper's setting"], "Sign": x["Sign"], "Ordering": x["Ordering"],
    } for x in rows])


def _paper_table(data: ReportData) -> pd.DataFrame:
    """The papers' reported top-1 for the models/datasets of this report, beside our best
    variant of the same method (or "not run")."""
    from .paper_numbers import matching

    acc = data.accuracy
    if not len(acc):
        return pd.DataFrame()
    pairs = {(str(m), str(d)) for m, d in zip(acc["model"], acc["dataset"], strict=True)}
    ref = reference_method()
    rows = []
    for p in matching(pairs):
        ours = acc[(acc["method"] == p.method) & (acc["model"] == p.model)
                   & (acc["dataset"] == p.dataset)]
        fp = acc[(acc["method"] == ref) & (acc["model"] == p.model)
                 & (acc["dataset"] == p.dataset)]
        rows.append({
            "Method": p.method, "Model / dataset": f"{p.model} / {p.dataset}",
            "Reported top-1": f"{p.top1:.2f}",
            "Reported FP32": "" if p.fp32_top1 is None else f"{p.fp32_top1:.2f}",
            "Setting (paper)": p.setting,
            "Ours top-1 (best variant)": f"{ours['top1'].max():.2f}" if len(ours) else "not run",
            "Our FP32": f"{fp['top1'].max():.2f}" if len(fp) else "",
            "Source": p.source,
        })
    return pd.DataFrame(rows)


def metas_of(data: ReportData) -> list[dict[str, Any]]:
    return list(getattr(data, "metas", []) or [])


def _ledger_table(metas: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per method variant whose recipe deviates from its paper's (from run.json)."""
    rows = []
    for meta in metas:
        for entry in (meta.get("ledger") or {}).values():
            devs = entry.get("deviations") or []
            sweep = ", ".join(f"{k}={v}" for k, v in (entry.get("sweep") or {}).items())
            paper = entry.get("paper_recipe", "")
            rows.append({
                "Method": entry.get("method", "") + (f" ({sweep})" if sweep else ""),
                "Profile": str(entry.get("profile", "")),
                "Paper recipe": paper if isinstance(paper, str) else json.dumps(paper),
                "Deviations": "; ".join(map(str, devs)) if devs else "none",
            })
    return pd.DataFrame(rows).drop_duplicates() if rows else pd.DataFrame()


def render_templates(context: Mapping[str, Any], formats: Sequence[str]) -> dict[str, str]:
    """Render the packaged ``report.<fmt>.j2`` templates with ``context``."""
    env = _environment()
    return {fmt: env.get_template(f"report.{fmt}.j2").render(**context) for fmt in formats}


# --------------------------------------------------------------------------- entry point


def _load(
    results: str | Path | pd.DataFrame | Sequence[str | Path], meta: list[dict] | None
) -> tuple[pd.DataFrame, list[dict]]:
    if isinstance(results, pd.DataFrame):
        return results, list(meta or [])
    if isinstance(results, str | Path):
        df, metas = load_results(results)
    elif isinstance(results, Sequence):
        df, metas = load_results(*results)
    else:
        raise TypeError(
            f"results must be a path, a list of paths or a DataFrame, got {type(results).__name__}"
        )
    return df, list(meta) if meta is not None else metas


def build_report(
    results: str | Path | pd.DataFrame | Sequence[str | Path],
    out_dir: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    meta: list[dict] | None = None,
    title: str | None = None,
    registry: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write a comparative report of one or more runs into ``out_dir``.

    ``results`` is a run directory, a list of run directories (compared side by side, methods
    labelled by run id) or a tidy results DataFrame (then ``meta`` gives the run.json dicts).
    Writes ``report.md`` and/or ``report.html`` plus ``plots/*.png`` and ``plots/*.svg`` and
    returns ``{"md": path, "html": path, "plots": plots_dir}`` for what was written.
    ``registry`` orders the methods and picks their colours: the method registry's order
    (``ternbench.methods.list_methods()``), which ``bench`` passes; None orders them by name.

    Example:
        >>> paths = build_report(["runs/a", "runs/b"], "reports/a_vs_b")   # doctest: +SKIP
        >>> paths["html"].name                                               # doctest: +SKIP
        'report.html'
    """
    fmts = [f.lower().lstrip(".") for f in formats]
    unknown = sorted(set(fmts) - set(FORMATS))
    if unknown or not fmts:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    df, metas = _load(results, meta)
    data = prepare(df, metas, registry=registry)
    out = Path(out_dir)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    figs = _plots.render_all(data, plots_dir, registry)
    if title is None:
        title = (
            f"ternbench report — {data.run_ids[0]}"
            if len(data.run_ids) == 1
            else f"ternbench comparison — {' vs '.join(data.run_ids)}"
        )
    ctx = _context(data, figs, out, title, with_svg="html" in fmts)
    rendered = render_templates(ctx, fmts)
    paths: dict[str, Path] = {}
    for fmt, text in rendered.items():
        path = out / f"report.{fmt}"
        path.write_text(text, encoding="utf-8")
        paths[fmt] = path
    paths["plots"] = plots_dir
    log.info("report written to %s (%d plots, %d variants)", out, len(figs), len(data.variants))
    return paths
