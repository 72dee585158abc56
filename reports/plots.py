"""Report plots: Pareto scatter plots, per-layer latency bars and ablation curves.

Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure`, no pyplot),
so no global backend is selected or changed: ``Figure.savefig`` renders PNG with Agg and SVG
with the SVG backend directly, which is safe in headless processes and Ray workers. Each plot
is written as ``NAME.png`` (150 dpi) and ``NAME.svg``.

Each method keeps one colour across all plots and reports, taken from its position in the
method registry (``ternbench.methods.list_methods()``, which the caller passes as ``registry``);
variants of one method share the colour and differ by marker.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from .tables import ReportData, method_rank

__all__ = [
    "Plot",
    "method_colors",
    "pareto_mask",
    "plot_ablation",
    "plot_accuracy_vs_bits",
    "plot_accuracy_vs_latency",
    "plot_layer_breakdown",
    "render_all",
]

log = logging.getLogger(__name__)

DPI = 150
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
_DOMINATED = "#c8c8c8"
_TORCH_COLOR = "#444444"
_RUN_HATCHES = (None, "..", "xx", "--", "oo")  # bars of the 2nd, 3rd... compared run
_TORCH_SHADES = ("#444444", "#7a7a7a", "#a0a0a0")
_FRONT_STYLES = ("-", "--", ":", "-.")
_ANNOTATE_MAX = 8  # more point labels than this overlap; the legend still names every point
# fixed hash salt and no date: the same results give byte-identical SVGs
_RC: dict[Any, Any] = {
    "svg.hashsalt": "ternbench",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@dataclass(frozen=True)
class Plot:
    """One saved figure: ``png``/``svg`` paths and a caption for the report."""

    name: str
    title: str
    png: Path
    svg: Path
    section: str  # "accuracy", "latency:<target>", "layers:<target>", "ablation"


def method_colors(methods: Iterable[str], registry: Sequence[str] | None = None) -> dict[str, str]:
    """Stable hex colour per method from its registry position (tab10, then tab20).

    Example:
        >>> method_colors(["fgq", "fp32"], registry=["fp32", "int8", "fgq"])
        {'fgq': '#2ca02c', 'fp32': '#1f77b4'}
    """
    names = list(dict.fromkeys(methods))
    rank = method_rank(names, registry)
    n = max(rank.values(), default=0) + 1
    cmap = colormaps["tab10" if n <= 9 else "tab20"]
    # greys are left out: dominated points are drawn grey
    palette = [to_hex(cmap(i)) for i in range(cmap.N)]
    palette = [c for c in palette if len({c[1:3], c[3:5], c[5:7]}) > 1]
    return {m: palette[rank[m] % len(palette)] for m in names}


def pareto_mask(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """True where a point is on the Pareto front (smaller ``x`` and larger ``y`` are better).

    Points with NaN coordinates are never on the front.

    Example:
        >>> pareto_mask([1, 2, 3], [50, 40, 60]).tolist()
        [True, False, True]
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    ok = ~(np.isnan(xs) | np.isnan(ys))
    mask = ok.copy()
    for i in np.flatnonzero(ok):
        better = ok & (xs <= xs[i]) & (ys >= ys[i]) & ((xs < xs[i]) | (ys > ys[i]))
        if better.any():
            mask[i] = False
    return mask


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") or "x" for p in parts)


def _save(fig: Figure, out_dir: Path, name: str, title: str, section: str) -> Plot:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    with matplotlib.rc_context(_RC):
        fig.savefig(png, dpi=DPI)
        fig.savefig(svg, metadata={"Date": None})
    fig.clear()  # Figure objects are not tracked by pyplot; clearing frees the artists now
    log.debug("wrote %s (+ .svg)", png)
    return Plot(name=name, title=title, png=png, svg=svg, section=section)


class _Styles:
    """Colour and marker per variant id (colour from the method, marker from its variant rank)."""

    def __init__(self, data: ReportData, registry: Sequence[str] | None = None) -> None:
        v = data.variants
        self.colors = method_colors(v.sort_values("method_rank")["method"], registry)
        self.color: dict[int, str] = {}
        self.marker: dict[int, str] = {}
        self.label: dict[int, str] = {}
        seen: dict[str, int] = {}
        r: Any
        for r in v.itertuples():
            k = seen.get(r.method, 0)
            seen[r.method] = k + 1
            self.color[int(r.vid)] = self.colors[r.method]
            self.marker[int(r.vid)] = _MARKERS[k % len(_MARKERS)]
            self.label[int(r.vid)] = r.label

    def handle(self, vid: int) -> Line2D:
        return Line2D(
            [],
            [],
            ls="none",
            marker=self.marker[vid],
            color=self.color[vid],
            markersize=7,
            label=self.label[vid],
        )


def _panels(n: int, width: float = 5.2, height: float = 3.8) -> tuple[Figure, list[Any]]:
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols + 2.6, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _sweep_curves(ax: Any, pts: pd.DataFrame, x: str, y: str, data: ReportData,
                  styles: _Styles) -> None:
    """Join each method's sweep points (one run) in the order of its swept value, so an
    ablation reads as a curve (FGQ group size, TRN enabled edges) among the other methods."""
    if not data.sweep_cols:
        return
    cols = ["vid", "method", *data.sweep_cols]
    merged = pts.merge(data.variants[cols], on="vid", how="left", suffixes=("", "_v"))
    for _, grp in merged.groupby(["run_id", "method"], sort=False):
        if len(grp) < 2:
            continue
        axis = next((c for c in data.sweep_cols if grp[c].nunique(dropna=True) > 1), None)
        if axis is None:
            continue
        g = grp.dropna(subset=[axis])
        try:
            g = g.sort_values(axis)
        except TypeError:  # mixed types: keep the run order
            pass
        ax.plot(g[x], g[y], color=styles.color[int(g["vid"].iloc[0])], lw=1.0, alpha=0.55,
                zorder=1)


def _pareto_scatter(
    ax: Any, pts: pd.DataFrame, x: str, y: str, styles: _Styles, annotate: bool, per_run: bool
) -> list[Any]:
    """Scatter ``pts`` (columns vid, run_id, x, y), grey dominated points, draw fronts as steps.

    With ``per_run`` each run gets its own front (runs may come from different machines, so
    one run's point should not dominate another's); returns legend handles for the fronts.
    """
    groups = list(pts.groupby("run_id", sort=False)) if per_run else [("", pts)]
    handles: list[Any] = []
    for k, (run_id, grp) in enumerate(groups):
        front = pareto_mask(list(grp[x]), list(grp[y]))
        r: Any
        for r, on_front in zip(grp.itertuples(), front, strict=True):
            vid = int(r.vid)
            xv, yv = getattr(r, x), getattr(r, y)
            ax.scatter(
                [xv],
                [yv],
                s=48 if on_front else 36,
                marker=styles.marker[vid],
                facecolors=styles.color[vid] if on_front else _DOMINATED,
                edgecolors=styles.color[vid] if on_front else "#8a8a8a",
                linewidths=1.0,
                zorder=3 if on_front else 2,
                alpha=1.0 if on_front else 0.8,
            )
            if annotate:
                ax.annotate(
                    styles.label[vid],
                    (xv, yv),
                    xytext=(4, 4),
                    textcoords="offset points",
                    fontsize=7,
                    color="#222222" if on_front else "#8a8a8a",
                )
        fp = grp[front].sort_values(x)
        ls = _FRONT_STYLES[k % len(_FRONT_STYLES)]
        if len(fp) > 1:
            # where="post": between two front points the best reachable accuracy is the left one's
            ax.step(fp[x], fp[y], where="post", color="#333333", ls=ls, lw=1.1, alpha=0.7, zorder=1)
        name = f"Pareto front [{run_id!s}]" if per_run else "Pareto front"
        handles.append(Line2D([], [], color="#333333", ls=ls, lw=1.1, alpha=0.7, label=name))
    handles.append(
        Line2D(
            [],
            [],
            ls="none",
            marker="o",
            markerfacecolor=_DOMINATED,
            markeredgecolor="#8a8a8a",
            label="dominated",
        )
    )
    return handles


def _plain_log_axis(axis: Any, values: Sequence[float]) -> None:
    """Log axis with plain tick labels (``60``, ``200``) instead of ``6×10^1``."""
    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    axis.set_major_formatter(fmt)
    vals = [v for v in values if v > 0]
    narrow = bool(vals) and max(vals) / min(vals) < 30
    # within ~1.5 decades the major ticks are too few, so label the minor ones as well, but
    # only 2x, 3x and 5x a power of ten: labels at 6, 7, 8, 9x ran into each other
    minor = FuncFormatter(lambda v, _pos: f"{v:g}" if _leading_digit(v) in (2, 3, 5) else "")
    axis.set_minor_formatter(minor if narrow else NullFormatter())


def _leading_digit(v: float) -> int:
    """The first significant digit of ``v > 0`` (``_leading_digit(300.0) == 3``)."""
    return int(f"{v:e}"[0])


def _legend(fig: Figure, handles: list[Any]) -> None:
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)


def _model_groups(df: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(df["model"], df["dataset"], strict=True)))


def _top1_by_model(data: ReportData) -> pd.DataFrame:
    acc = data.accuracy
    out: Any = acc.groupby(["vid", "model", "dataset"], as_index=False)["top1"].mean()
    return out  # a DataFrame (as_index=False); the stubs type it as a Series


def _whole_model_latency(data: ReportData, lat: pd.DataFrame, target: str
                         ) -> tuple[pd.DataFrame, bool]:
    """``lat`` with the whole-model figures (the deployed artifact, and torch FP32 eager on
    the same input) in place of the kernel sums where the run measured them; and whether it
    did for every point."""
    model = getattr(data, "model", None)
    if model is None or not len(model) or "tvm_us" not in model:
        return lat, False
    m = model[model["target"].eq(target) & model["tvm_us"].notna()]
    if m.empty:
        return lat, False
    keys = ["vid", "model", "dataset"]
    m = m.groupby(keys, as_index=False)[["tvm_us", "torch_fp32_us"]].mean()
    out = lat.merge(m.rename(columns={"torch_fp32_us": "_fp32_model"}), on=keys, how="left")
    has = out["tvm_us"].notna()
    out.loc[has, "latency_us"] = out.loc[has, "tvm_us"]
    out.loc[has, "torch_fp32_us"] = out.loc[has, "_fp32_model"]
    out = out.drop(columns=["tvm_us", "_fp32_model"])
    return out, bool(has.all())


def plot_accuracy_vs_latency(
    data: ReportData, target: str, out_dir: Path, styles: _Styles | None = None
) -> Plot | None:
    """Top-1 vs model total latency (log x) of each variant's fastest kernel on ``target``."""
    styles = styles or _Styles(data)
    lat = data.latency[data.latency["target"].eq(target) & data.latency["primary"]]
    lat, whole = _whole_model_latency(data, lat, target)
    pts = lat.merge(_top1_by_model(data), on=["vid", "model", "dataset"], how="inner")
    pts = pts[pts["latency_us"].gt(0) & pts["top1"].notna()]
    if pts.empty:
        return None
    groups = _model_groups(pts)
    with matplotlib.rc_context(_RC):
        fig, axes = _panels(len(groups))
        for ax, (model, dataset) in zip(axes, groups, strict=True):
            p = pts[pts["model"].eq(model) & pts["dataset"].eq(dataset)]
            _sweep_curves(ax, p, "latency_us", "top1", data, styles)
            fronts = _pareto_scatter(
                ax,
                p,
                "latency_us",
                "top1",
                styles,
                annotate=len(p) <= _ANNOTATE_MAX,
                per_run=data.compare,
            )
            torch_us = p.groupby("run_id")["torch_fp32_us"].mean().dropna()
            for run_id, t in torch_us.items():
                if t > 0:
                    ax.axvline(t, color=_TORCH_COLOR, ls="--", lw=0.9, alpha=0.8)
                    ax.annotate(
                        f"torch FP32{f' [{run_id}]' if data.compare else ''}",
                        (t, 0.02),
                        xycoords=("data", "axes fraction"),
                        rotation=90,
                        fontsize=7,
                        color=_TORCH_COLOR,
                        xytext=(3, 0),
                        textcoords="offset points",
                    )
            ax.set_xscale("log")
            _plain_log_axis(ax.xaxis, [*p["latency_us"], *torch_us])
            ax.set_xlabel(f"whole-model latency on {target}: deployed TVM artifact "
                          "(µs, log scale)" if whole else
                          f"model latency on {target}: sum of kernels (µs, log scale)")
            ax.set_ylabel("top-1 accuracy (%)")
            ax.set_title(f"{model} / {dataset}")
            ax.grid(True, which="both", alpha=0.25)
        vids = list(dict.fromkeys(int(v) for v in pts["vid"]))
        handles = [styles.handle(v) for v in vids] + fronts
        handles.append(Line2D([], [], color=_TORCH_COLOR, ls="--", label="torch FP32 latency"))
        _legend(fig, handles)
        fig.suptitle(f"Accuracy vs latency — {target}")
        return _save(
            fig,
            out_dir,
            _slug("acc_vs_latency", target),
            f"Accuracy vs model latency on {target}",
            f"latency:{target}",
        )


def plot_accuracy_vs_bits(
    data: ReportData, out_dir: Path, styles: _Styles | None = None
) -> Plot | None:
    """Top-1 vs effective bits per weight, Pareto front of (fewer bits, higher accuracy)."""
    styles = styles or _Styles(data)
    acc = data.accuracy
    pts = acc.groupby(["vid", "run_id", "model", "dataset"], as_index=False)[
        ["top1", "effective_bits"]
    ].mean()
    pts = pts[pts["top1"].notna() & pts["effective_bits"].notna()]
    if pts.empty:
        return None
    groups = _model_groups(pts)
    with matplotlib.rc_context(_RC):
        fig, axes = _panels(len(groups))
        for ax, (model, dataset) in zip(axes, groups, strict=True):
            p = pts[pts["model"].eq(model) & pts["dataset"].eq(dataset)]
            _sweep_curves(ax, p, "effective_bits", "top1", data, styles)
            fronts = _pareto_scatter(
                ax,
                p,
                "effective_bits",
                "top1",
                styles,
                annotate=len(p) <= _ANNOTATE_MAX,
                per_run=data.compare,
            )
            ax.set_xlabel("effective bits per weight")
            ax.set_ylabel("top-1 accuracy (%)")
            ax.set_title(f"{model} / {dataset}")
            ax.grid(True, alpha=0.25)
        vids = list(dict.fromkeys(int(v) for v in pts["vid"]))
        _legend(fig, [styles.handle(v) for v in vids] + fronts)
        fig.suptitle("Accuracy vs effective bits")
        return _save(
            fig, out_dir, "acc_vs_bits", "Accuracy vs effective bits per weight", "accuracy"
        )


def plot_layer_breakdown(
    data: ReportData,
    target: str,
    model: str,
    dataset: str,
    out_dir: Path,
    styles: _Styles | None = None,
) -> Plot | None:
    """Grouped bars per layer: each variant's fastest kernel and the torch FP32 baseline."""
    styles = styles or _Styles(data)
    prim = data.latency[
        data.latency["target"].eq(target)
        & data.latency["primary"]
        & data.latency["model"].eq(model)
        & data.latency["dataset"].eq(dataset)
    ]
    keys = ["vid", "model", "dataset", "target"]
    exact = data.layers.merge(prim[[*keys, "impl"]], on=[*keys, "impl"], how="inner")
    # with a composite model total ("tvm"), each layer's own tvm_* kernel is the series
    comp = prim[prim["impl"].eq("tvm")][keys]
    own = data.layers[data.layers["impl"].str.startswith("tvm_")].merge(comp, on=keys)
    lay = pd.concat([exact, own], ignore_index=True)
    if lay.empty:
        return None
    layer_names = list(lay.sort_values("layer_order")["layer"].drop_duplicates())
    series: list[tuple[str, str, str | None, dict[str, float]]] = []  # label, colour, hatch, vals
    run_pos = {r: i for i, r in enumerate(data.run_ids)}
    vid: Any
    for vid, grp in lay.groupby("vid", sort=True):
        vals = dict(zip(grp["layer"], grp["latency_us"], strict=True))
        hatch = _RUN_HATCHES[run_pos.get(grp["run_id"].iloc[0], 0) % len(_RUN_HATCHES)]
        series.append((styles.label[int(vid)], styles.color[int(vid)], hatch, vals))
    run_id: Any
    for run_id, grp in lay.groupby("run_id", sort=False):
        t = grp.groupby("layer")["torch_fp32_us"].mean().dropna()
        if len(t):
            name = f"torch FP32 [{run_id}]" if data.compare else "torch FP32"
            shade = _TORCH_SHADES[run_pos.get(run_id, 0) % len(_TORCH_SHADES)]
            series.append((name, shade, "//", {str(k): float(v) for k, v in t.items()}))
    x = np.arange(len(layer_names))
    width = 0.8 / len(series)
    vals_all = [v for *_, vals in series for v in vals.values() if v > 0]
    with matplotlib.rc_context(_RC):
        fig = Figure(
            figsize=(min(16.0, 3.0 + 0.9 * len(layer_names) * max(1, len(series)) / 2), 4.2),
            layout="constrained",
        )
        ax = fig.add_subplot()
        handles = []
        for k, (label, color, hatch, vals) in enumerate(series):
            ys = [vals.get(name, np.nan) for name in layer_names]
            ax.bar(
                x - 0.4 + width * (k + 0.5),
                ys,
                width,
                color=color,
                hatch=hatch,
                edgecolor="white" if hatch is None else "#dddddd",
                linewidth=0.5,
            )
            handles.append(
                Patch(
                    facecolor=color,
                    hatch=hatch,
                    label=label,
                    edgecolor="white" if hatch is None else "#dddddd",
                )
            )
        if vals_all and max(vals_all) / min(vals_all) > 50:
            ax.set_yscale("log")  # layers span orders of magnitude; linear would hide small ones
            _plain_log_axis(ax.yaxis, vals_all)
        ax.set_xticks(
            x,
            layer_names,
            rotation=30 if len(layer_names) > 4 else 0,
            ha="right" if len(layer_names) > 4 else "center",
            fontsize=8,
        )
        ax.set_ylabel(f"latency on {target} (µs)")
        ax.set_title(f"Per-layer latency — {model} / {dataset} on {target}")
        ax.grid(True, axis="y", alpha=0.25)
        _legend(fig, handles)
        return _save(
            fig,
            out_dir,
            _slug("layers", target, model, dataset),
            f"Per-layer latency of {model}/{dataset} on {target}",
            f"layers:{target}",
        )


def _as_numeric(values: pd.Series) -> pd.Series | None:
    num = pd.to_numeric(values, errors="coerce")
    return num if num.notna().all() else None


def plot_ablation(
    data: ReportData, axis: str, out_dir: Path, styles: _Styles | None = None
) -> Plot | None:
    """Curves of top-1, effective bits and (first target's) latency along one ``sweep.*`` axis.

    One curve per (run, method, model, dataset, values of the other sweep axes).
    """
    styles = styles or _Styles(data)
    v = data.variants
    v = v[v[axis].notna() & v[axis].astype(str).ne("")]
    if v.empty:
        return None
    others = [c for c in data.sweep_cols if c != axis]
    base = data.accuracy.groupby(["vid", "model", "dataset"], as_index=False)[
        ["top1", "effective_bits"]
    ].mean()
    pts = base.merge(v[["vid", "run_id", "method", axis, *others]], on="vid", how="inner")
    panels = [("top1", "top-1 accuracy (%)"), ("effective_bits", "effective bits per weight")]
    targets = data.targets
    if targets:
        lat = data.latency[data.latency["target"].eq(targets[0]) & data.latency["primary"]]
        lat, whole = _whole_model_latency(data, lat, targets[0])
        pts = pts.merge(
            lat[["vid", "model", "dataset", "latency_us"]],
            on=["vid", "model", "dataset"],
            how="left",
        )
        if pts["latency_us"].notna().any():
            what = "whole-model (artifact)" if whole else "sum-of-kernels"
            panels.append(("latency_us", f"{what} latency on {targets[0]} (µs)"))
    if pts.empty:
        return None
    xnum = _as_numeric(pts[axis])
    if xnum is not None:
        pts = pts.assign(_x=xnum)
        cats: list[str] = []
    else:
        cats = list(dict.fromkeys(pts[axis].astype(str)))
        pts = pts.assign(_x=pts[axis].astype(str).map({c: i for i, c in enumerate(cats)}))
    short = axis.removeprefix("sweep.")
    group_cols = ["run_id", "method", "model", "dataset", *others]
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(4.2 * len(panels) + 2.8, 3.6), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False).ravel()
        handles = []
        for k, (keys, grp) in enumerate(pts.groupby(group_cols, sort=False, dropna=False)):
            grp = grp.sort_values("_x")
            run_id, method, model, dataset, *rest = keys
            color = styles.colors.get(str(method), "#333333")
            marker = _MARKERS[k % len(_MARKERS)]
            extra = ", ".join(
                f"{c.removeprefix('sweep.')}={o}" for c, o in zip(others, rest, strict=True)
            )
            label = (
                f"{method} {model}/{dataset}"
                + (f" ({extra})" if extra else "")
                + (f" [{run_id}]" if data.compare else "")
            )
            for ax, (col, _) in zip(axes, panels, strict=True):
                g = grp[grp[col].notna()]
                if len(g):
                    ax.plot(g["_x"], g[col], marker=marker, color=color, lw=1.3, ms=5)
            handles.append(Line2D([], [], color=color, marker=marker, label=label))
        for ax, (_col, ylabel) in zip(axes, panels, strict=True):
            ax.set_xlabel(short)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.25)
            if cats:
                ax.set_xticks(range(len(cats)), cats)
            elif xnum is not None and xnum.min() > 0 and xnum.max() / xnum.min() >= 8:
                ax.set_xscale("log", base=2)  # group sizes and the like grow geometrically
                ticks = sorted(set(xnum.tolist()))
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
                ax.minorticks_off()
        _legend(fig, handles)
        fig.suptitle(f"Ablation over {short}")
        return _save(fig, out_dir, _slug("ablation", short), f"Ablation over {short}", "ablation")


def plot_training_curves(
    data: ReportData, out_dir: Path, styles: _Styles | None = None
) -> Plot | None:
    """Validation top-1 and training loss against (fractional) epochs for every training-time
    variant; a dashed line marks a curve whose last segment still gained > 0.3 point."""
    styles = styles or _Styles(data)
    df = data.df
    cur = df[df["metric"].isin(["val_top1", "train_loss"]) & df["layer"].str.startswith("epoch=")
             & df["status"].isin(["ok", "degraded"])].copy()
    if cur.empty:
        return None
    cur["epoch"] = pd.to_numeric(cur["layer"].str.removeprefix("epoch="), errors="coerce")
    keys = ["vid", "model", "dataset", "metric", "epoch"]
    pts = cur.groupby(keys, as_index=False)["value"].mean()
    conv_rows = df[df["metric"].eq("converged")]
    conv = {int(str(k)): float(v) for k, v in
            zip(conv_rows["vid"], conv_rows["value"], strict=True)}
    with matplotlib.rc_context(_RC):
        fig, axes = _panels(2)
        handles = []
        for (vid, model, _ds), g in pts.groupby(["vid", "model", "dataset"], sort=True):
            v = int(str(vid))
            unconverged = v in conv and conv[v] < 0.5
            style: dict[str, Any] = {"color": styles.color[v], "marker": styles.marker[v],
                                     "markersize": 4, "ls": "--" if unconverged else "-"}
            for ax, metric in zip(axes, ("val_top1", "train_loss"), strict=True):
                m = g[g["metric"].eq(metric)].sort_values("epoch")
                ax.plot(m["epoch"], m["value"], **style)
            label = f"{styles.label[v]} ({model})" + (" - not converged" if unconverged else "")
            handles.append(Line2D([], [], label=label, **style))
        axes[0].set_ylabel("validation top-1 (%)")
        axes[1].set_ylabel("training loss (mean over the segment)")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.25)
        _legend(fig, handles)
        fig.suptitle("Training curves")
        return _save(fig, out_dir, "training_curves", "Training curves (QAT)", "curves")


def render_all(
    data: ReportData, out_dir: Path, registry: Sequence[str] | None = None
) -> list[Plot]:
    """Every plot the data supports, in report order; plots without data are skipped."""
    styles = _Styles(data, registry)
    plots: list[Plot | None] = [plot_accuracy_vs_bits(data, out_dir, styles),
                                plot_training_curves(data, out_dir, styles)]
    for target in data.targets:
        plots.append(plot_accuracy_vs_latency(data, target, out_dir, styles))
        lay = data.layers[data.layers["target"].eq(target)]
        for model, dataset in _model_groups(lay):
            plots.append(plot_layer_breakdown(data, target, model, dataset, out_dir, styles))
    for axis in data.sweep_cols:
        plots.append(plot_ablation(data, axis, out_dir, styles))
    return [p for p in plots if p is not None]
