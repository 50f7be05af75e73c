"""Side by side (`vitqtool analyze A B --compare`): the paper's variation measures for several analysed models.

Each model's `analyze` report (same data, images and bits) is reduced to one row of measures over its
block layers (every quantized Linear/Conv inside a block: the stem/patch embedding and the classifier,
at the edge bits, are left out):

- weights: spread of the per-module weight ranges across modules (`max/min`, `cv = std/mean`), the
  spread across output channels inside a module (mean over modules of the per-channel `max/min` and
  `cv`), excess kurtosis (mean and max over modules) and outlier share (beyond 3 std, mean over modules);
- activations: the same for the layer inputs (the tensors Linear/Conv layers read: block input, attention
  input, attn@V, MLP hidden, conv inputs; attention's Q/K/V and softmax operands are ViT-only and left
  out of these), plus the spread across heads (mean of the per-head `max/min` of Q/K/V and attn@V;
  null for models without heads);
- sensitivity: quartiles of the per-module KL(FP || Q) with only that layer quantized, `max/min` and `q3/q1`
  (exact or estimated: `method`, per model when `auto` chose differently);
- oscillation (when the model has a `quantize` run): share of block-layer weights whose flip EMA exceeds
  the run's threshold (weighted by parameters) and share within 0.05 of a rounding boundary.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from statistics import fmean, pstdev, quantiles
from typing import Any

from ..fileio import atomic_write, finite_or_none
from .report import csv_bytes, finite_mean, format_value, html_page, html_table, pyplot, save_png
from .variation import block_of

SCHEMA = "vitqtool.compare/1"
ATTENTION_OPERANDS = ("q_quant", "k_quant", "v_quant", "qkv_quant", "softmax_quant")
MEASURES = {  # key -> table label (rows of the table, columns of comparison.csv)
    "fp_top1": "FP top-1 % (analysed images)",
    "layers": "block layers",
    "w_range_ratio_modules": "W range max/min across modules",
    "w_range_cv_modules": "W range CV across modules",
    "w_range_ratio_channels": "W range max/min across channels",
    "w_range_cv_channels": "W range CV across channels",
    "w_kurtosis": "W kurtosis (mean)",
    "w_kurtosis_max": "W kurtosis (max)",
    "w_outlier_ratio": "W outlier share",
    "a_range_ratio_modules": "A range max/min across modules",
    "a_range_cv_modules": "A range CV across modules",
    "a_range_ratio_channels": "A range max/min across channels",
    "a_range_cv_channels": "A range CV across channels",
    "a_range_ratio_heads": "A range max/min across heads",
    "a_kurtosis": "A kurtosis (mean)",
    "a_kurtosis_max": "A kurtosis (max)",
    "a_outlier_ratio": "A outlier share",
    "kl_min": "KL min",
    "kl_q1": "KL q1",
    "kl_median": "KL median",
    "kl_q3": "KL q3",
    "kl_max": "KL max",
    "kl_max_min": "KL max/min",
    "kl_q3_q1": "KL q3/q1",
    "oscillating_share": "oscillating weights share",
    "boundary_share": "weights near a bin boundary",
}


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    """(max/min, std/mean) of positive values; (None, None) for fewer than two."""
    if len(values) < 2:
        return None, None
    lo, mean = min(values), fmean(values)
    return (max(values) / lo if lo > 0 else None), (pstdev(values) / mean if mean > 0 else None)


def _group(rows: list[dict[str, Any]], kind: str, stat: str) -> float | None:
    """Mean over `rows` of one group statistic (e.g. per_channel range_ratio), skipping rows without it."""
    return finite_mean([r.get(kind, {}).get(stat) for r in rows])


def _kl_quartiles(kls: list[float]) -> dict[str, float | None]:
    """Min, quartiles (inclusive method), max, max/min and q3/q1 of per-layer KLs (None where undefined)."""
    if not kls:
        return dict.fromkeys(("kl_min", "kl_q1", "kl_median", "kl_q3", "kl_max", "kl_max_min", "kl_q3_q1"))
    q1, median, q3 = quantiles(kls, n=4, method="inclusive") if len(kls) > 1 else (kls[0],) * 3
    lo, hi = min(kls), max(kls)
    return {"kl_min": lo, "kl_q1": q1, "kl_median": median, "kl_q3": q3, "kl_max": hi,
            "kl_max_min": hi / lo if lo > 0 else None, "kl_q3_q1": q3 / q1 if q1 > 0 else None}


def block_series(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The rows the measures are taken over: block-layer weights, layer-input activations, head rows, layer KLs."""
    acts = [a for a in report["activations"] if a["block"] is not None]
    return {
        "weights": [w for w in report["weights"] if w["block"] is not None],
        "acts": [a for a in acts if a["type"] not in ATTENTION_OPERANDS],
        "heads": [a for a in acts if "per_head" in a and a["type"] != "softmax_quant"],
        "sensitivity": [m for m in report["sensitivity"]["modules"] if m["block"] is not None and m["weight_bits"] is not None],
    }


def _weighted(rows: list[dict[str, Any]], key: str) -> float | None:
    """Parameter-weighted mean of `key` over `rows` (None when they hold no parameters)."""
    total = sum(r["params"] for r in rows)
    return sum(r[key] * r["params"] for r in rows) / total if total else None


def oscillation_measures(report: dict[str, Any]) -> dict[str, Any]:
    """Parameter-weighted oscillating share and boundary share over the block layers of the report's run (None without one)."""
    osc = report.get("oscillation")
    if osc is None:
        return {"run": None, "oscillating_share": None, "boundary_share": None}
    rows = [r for r in osc["modules"] if block_of(r["name"], report["blocks"]) is not None]
    complete = all(r["oscillating_share"] is not None for r in rows)
    return {"run": osc["run"], "oscillating_share": _weighted(rows, "oscillating_share") if complete else None,
            "boundary_share": _weighted(rows, "boundary_share")}


def model_measures(label: str, report: dict[str, Any]) -> dict[str, Any]:
    """One row of the comparison: the measures of MEASURES for one model's report."""
    series = block_series(report)
    ws, acts, heads = series["weights"], series["acts"], series["heads"]
    w_ratio, w_cv = _spread([w["range"] for w in ws])
    a_ratio, a_cv = _spread([a["range"] for a in acts])
    row: dict[str, Any] = {
        "label": label, "model": report["model"], "architecture": report["architecture"],
        "method": report["sensitivity"]["method"], "fp_top1": report["sensitivity"]["fp"]["top1"], "layers": len(ws),
        "w_range_ratio_modules": w_ratio, "w_range_cv_modules": w_cv,
        "w_range_ratio_channels": _group(ws, "per_channel", "range_ratio"), "w_range_cv_channels": _group(ws, "per_channel", "range_cv"),
        "w_kurtosis": finite_mean([w["kurtosis"] for w in ws]), "w_kurtosis_max": max((w["kurtosis"] for w in ws), default=None),
        "w_outlier_ratio": finite_mean([w.get("outlier_ratio") for w in ws]),
        "a_range_ratio_modules": a_ratio, "a_range_cv_modules": a_cv,
        "a_range_ratio_channels": _group(acts, "per_channel", "range_ratio"), "a_range_cv_channels": _group(acts, "per_channel", "range_cv"),
        "a_range_ratio_heads": _group(heads, "per_head", "range_ratio"),
        "a_kurtosis": finite_mean([a["kurtosis"] for a in acts]), "a_kurtosis_max": max((a["kurtosis"] for a in acts), default=None),
        "a_outlier_ratio": finite_mean([a.get("outlier_ratio") for a in acts]),
        **_kl_quartiles([m["kl"] for m in series["sensitivity"]]),
    }
    return {**row, **oscillation_measures(report)}


def compare_reports(labels: list[str], reports: list[dict[str, Any]], folders: list[str | None]) -> dict[str, Any]:
    """The comparison document: settings shared by the reports and one row of measures per model (+ its report folder)."""
    first = reports[0]
    methods = [r["sensitivity"]["method"] for r in reports]
    method = methods[0] if len(set(methods)) == 1 else ", ".join(f"{label}: {m}" for label, m in zip(labels, methods))
    return {"schema": SCHEMA, "data": first["data"], "split": first["split"], "bits": first["bits"], "images": first["images"],
            "recipe": first["recipe"], "what": first["sensitivity"]["what"], "method": method,
            "measures": MEASURES,
            "models": [{**model_measures(label, r), "report": folder} for label, r, folder in zip(labels, reports, folders)]}


def table_rows(comparison: dict[str, Any]) -> list[dict[str, Any]]:
    """The one table: a row per measure, a column per model."""
    return [{"measure": text, **{m["label"]: m[key] for m in comparison["models"]}} for key, text in MEASURES.items()]


def slug(index: int, label: str) -> str:
    """A folder name for the `index`-th model's own report."""
    return f"{index}_{re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('_.') or 'model'}"


# ------------------------------------------------------------------------------------------ files


def write_comparison(comparison: dict[str, Any], reports: list[dict[str, Any]], out: Path, plots: bool = True) -> dict[str, str]:
    """comparison.json, comparison.csv, overlaid PNGs (every model in every plot) and index.html into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"comparison.json": str(out / "comparison.json"), "comparison.csv": str(out / "comparison.csv"),
             "index.html": str(out / "index.html")}
    legends = render_comparison_plots(comparison, reports, out) if plots else {}
    comparison["plots"] = legends
    files.update({name: str(out / name) for name in legends})
    comparison["files"] = files
    atomic_write(out / "comparison.csv", csv_bytes(comparison["models"]))
    atomic_write(out / "comparison.json", (json.dumps(finite_or_none(comparison), indent=1, default=str) + "\n").encode())
    atomic_write(out / "index.html", render_comparison_html(comparison).encode())
    return files


def _depth(n: int) -> list[float]:
    """Relative depth 0..1 of `n` modules in execution order (models of different depth share one axis)."""
    return [i / max(n - 1, 1) for i in range(n)]


def render_comparison_plots(comparison: dict[str, Any], reports: list[dict[str, Any]], out: Path) -> dict[str, list[list[str]]]:
    """Overlaid PNGs into `out`; returns each file's legend labels per axis, read back from the figure ({} without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return {}
    labels = [m["label"] for m in comparison["models"]]
    series = [block_series(r) for r in reports]
    legends: dict[str, list[list[str]]] = {}

    def panels(name: str, title: str, specs: list[tuple[str, str, str, Any]]) -> None:
        """One figure, one axis per (series kind, y label, y scale, value of a row) spec; one line per model on every axis."""
        fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs), 3.6), squeeze=False)
        for ax, (kind, ylabel, yscale, value) in zip(axes[0], specs):
            for label, s in zip(labels, series):
                ys = [value(row) for row in s[kind]]
                ax.plot(_depth(len(ys)), [float("nan") if y is None else y for y in ys], marker="o", markersize=3, label=label)
            ax.set_xlabel("relative depth (block layers in execution order)")
            ax.set_ylabel(ylabel)
            ax.set_yscale(yscale)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        legends[name] = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes[0]]
        save_png(plt, fig, out / name)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, s in zip(labels, series):
        kls = sorted((max(m["kl"], 1e-12) for m in s["sensitivity"]), reverse=True)
        ax.plot(_depth(len(kls)), kls, marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("module rank (most sensitive first, relative)")
    ax.set_ylabel("KL(FP || only this layer quantized)")
    ax.set_title(f"Sensitivity spread at W{comparison['bits']}A{comparison['bits']}")
    ax.legend(fontsize=8)
    legends["compare_sensitivity.png"] = [[t.get_text() for t in ax.get_legend().get_texts()]]
    save_png(plt, fig, out / "compare_sensitivity.png")

    panels("compare_ranges.png", "Range of each module (variation across modules)", [
        ("weights", "weight range (max - min)", "log", lambda r: r["range"]),
        ("acts", "layer-input range (max - min)", "log", lambda r: r["range"])])
    panels("compare_channels.png", "Spread of per-channel ranges inside each module (CV = std/mean)", [
        ("weights", "weights: CV of channel ranges", "linear", lambda r: r["per_channel"]["range_cv"]),
        ("acts", "layer inputs: CV of channel ranges", "linear", lambda r: r["per_channel"]["range_cv"])])
    panels("compare_outliers.png", "Outliers: excess kurtosis of each module", [
        ("weights", "weights: excess kurtosis", "symlog", lambda r: r["kurtosis"]),
        ("acts", "layer inputs: excess kurtosis", "symlog", lambda r: r["kurtosis"])])
    oscillation = [r.get("oscillation") for r in reports]
    if all(o and o["tracked"] for o in oscillation):
        for s, report in zip(series, reports):
            s["oscillation"] = [m for m in report["oscillation"]["modules"] if block_of(m["name"], report["blocks"]) is not None]
        panels("compare_oscillation.png", "Oscillating weights after QAT (flip EMA above the threshold)", [
            ("oscillation", "share of the layer's weights", "linear", lambda r: r["oscillating_share"])])
    return legends


def render_comparison_html(comparison: dict[str, Any]) -> str:
    """index.html: settings, the one table, links to each model's own report, the plots."""
    models = comparison["models"]
    parts = [f"<h1>vitqtool analyze --compare: {html.escape(' vs '.join(m['label'] for m in models))}</h1>",
             f"<p>{html.escape(str(comparison['data']))} [{html.escape(comparison['split'])}], {comparison['images']} images, "
             f"W{comparison['bits']}/A{comparison['bits']} recipe {html.escape(comparison['recipe'])}, "
             f"sensitivity of {html.escape(comparison['what'])} ({html.escape(comparison['method'])})</p>",
             html_table([{k: format_value(v) for k, v in row.items()} for row in table_rows(comparison)])]
    links = [f"<li><a href=\"{html.escape(m['report'])}/index.html\">{html.escape(m['label'])}</a></li>" for m in models if m.get("report")]
    if links:
        parts.append(f"<h2>Each model's report</h2><ul>{''.join(links)}</ul>")
    for name in comparison.get("plots", {}):
        parts.append(f"<h2>{html.escape(name.removesuffix('.png'))}</h2><img src=\"{html.escape(name)}\" style=\"max-width:100%\">")
    return html_page("vitqtool comparison", parts)
