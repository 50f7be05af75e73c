"""Render an analysis report: summary tables, analysis.json, CSV files, PNG plots, index.html, overrides.toml.

Every file is written through a temporary file in the report folder and `os.replace`, so a crash never
leaves a half-written report file. Plots need matplotlib (`pip install vitqtool[plots]`); without it
they are skipped with one warning.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from statistics import fmean
from typing import Any

from ..fileio import atomic_write, finite_or_none, new_dirs_removed_on_failure, staging_dir, translate_write_errors
from .allocation import overrides_toml
from .sensitivity import DESCRIPTIONS

log = logging.getLogger(__name__)

TOP = 10
GROUP_KINDS = ("per_channel", "per_token", "per_head")
SENS_FIELDS = ("rank", "name", "type", "block", "kl", "delta_loss", "delta_top1", "top1_agreement")


def finite_mean(values: list[Any]) -> float | None:
    """Mean of the finite numbers in `values` (None when there are none)."""
    clean = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return fmean(clean) if clean else None


def _acts_of_type(report: dict[str, Any], t: str) -> list[dict[str, Any]]:
    return [a for a in report["activations"] if a["block"] is not None and a["type"] in (t, f"{t}.a_quant")]


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The short summary (`--json`, terminal tables): top sensitive modules, variation by type and by block."""
    sens = report["sensitivity"]
    by_type = []
    for row in sens["types"]:
        acts = _acts_of_type(report, row["name"])
        ws = [w for w in report["weights"] if w["block"] is not None and w["type"] == row["name"]]
        by_type.append({
            "type": row["name"], "modules": sum(1 for m in sens["modules"] if m["block"] is not None and m["type"] == row["name"]),
            "kl": row["kl"], "weight_sqnr_db": finite_mean([w.get("sqnr_db") for w in ws]),
            "act_sqnr_db": finite_mean([a.get("sqnr_db") for a in acts]), "act_kurtosis": finite_mean([a["kurtosis"] for a in acts]),
            "act_outlier_ratio": finite_mean([a.get("outlier_ratio") for a in acts]),
            "head_range_ratio": finite_mean([a.get("per_head", {}).get("range_ratio") for a in acts]),
        })
    block_kl = {row["name"]: row["kl"] for row in sens["blocks"]}
    by_block = []
    for block in report["blocks"]:
        acts = [a for a in report["activations"] if a["block"] == block]
        ws = [w for w in report["weights"] if w["block"] == block]
        by_block.append({
            "block": block, "kl": block_kl.get(block), "weight_sqnr_db": finite_mean([w.get("sqnr_db") for w in ws]),
            "act_sqnr_db": finite_mean([a.get("sqnr_db") for a in acts]),
            "head_range_cv": finite_mean([a.get("per_head", {}).get("range_cv") for a in acts]),
            "channel_range_ratio": finite_mean([a.get("per_channel", {}).get("range_ratio") for a in acts]),
        })
    osc = report.get("oscillation")
    return {
        "model": report["model"], "data": report["data"], "split": report["split"], "bits": report["bits"],
        "what": sens["what"], "method": sens["method"], "method_description": DESCRIPTIONS[sens["method"]],
        "method_note": sens.get("method_note"), "images": report["images"], "fp": sens["fp"],
        "top_sensitive": [{k: m[k] for k in SENS_FIELDS} for m in sens["modules"][:TOP]],
        "by_type": by_type, "by_block": by_block,
        "oscillation": None if osc is None else {
            "run": osc["run"], "tracked": osc["tracked"],
            "mean_oscillating_share": finite_mean([m["oscillating_share"] for m in osc["modules"]]),
            "mean_boundary_share": finite_mean([m["boundary_share"] for m in osc["modules"]])},
        "allocation": report.get("allocation"), "seconds": report["seconds"],
    }


# ------------------------------------------------------------------------------------------ files


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row: scalar fields, shapes as `AxB`, and `<group>_range_ratio`/`_range_cv` of each group kind."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in GROUP_KINDS and isinstance(value, dict):
            for stat in ("n", "range_ratio", "range_cv"):
                out[f"{key}_{stat}"] = value.get(stat)
        elif key == "shape":
            out[key] = "x".join(str(v) for v in value)
        elif key == "quantizers":
            out[key] = " ".join(value)
        elif not isinstance(value, (dict, list)):
            out[key] = value
    return out


def csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    """CSV text of `rows` (flattened by `flat_row`; columns in first-seen order)."""
    flat = [flat_row(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue().encode()


def write_report(report: dict[str, Any], out: Path, plots: bool = True, advance: Callable[..., None] | None = None) -> dict[str, str]:
    """Write analysis.json, CSVs, PNGs (if possible), overrides.toml (if allocated) and index.html into `out`.

    Everything is written into a staging folder first and moved into `out` only when all of it was
    written, so a full disk or a crash adds no half-written report to `out`.
    """
    files: dict[str, str] = {}
    with new_dirs_removed_on_failure(out), staging_dir(out) as stage:
        def put(name: str, data: bytes) -> None:
            atomic_write(stage / name, data)
            files[name] = str(out / name)

        sens = report["sensitivity"]
        tables = {"weights.csv": report["weights"], "activations.csv": report["activations"],
                  "sensitivity.csv": sens["modules"], "sensitivity_blocks.csv": sens["blocks"], "sensitivity_types.csv": sens["types"]}
        if report.get("oscillation"):
            tables["oscillation.csv"] = report["oscillation"]["modules"]
        for name, rows in tables.items():
            put(name, csv_bytes(rows))
        if report.get("allocation"):
            alloc = report["allocation"]
            what = f"--budget-bits {alloc['budget_bits']}" if alloc["mode"] == "budget" else f"--keep {alloc['keep']}"
            comment = (f"vitqtool analyze {report['model']} --bits {report['bits']} {what}: average weight bits over block layers "
                       f"{alloc['base_average_bits']:.3f} -> {alloc['average_bits']:.3f}\n"
                       f"use: vitqtool quantize MODEL --recipe {report['recipe']} --bits {report['bits']} --overrides overrides.toml")
            put("overrides.toml", overrides_toml(alloc, comment).encode())
        images = {key: Path(path).name for key, path in (render_plots(report, stage, advance) if plots else {}).items()}
        for key, name in images.items():
            files[key] = str(out / name)
        files["analysis.json"] = str(out / "analysis.json")
        files["index.html"] = str(out / "index.html")
        put("analysis.json", (json.dumps(finite_or_none({**report, "files": files}), indent=1, default=str) + "\n").encode())
        put("index.html", render_html(report, images).encode())
        with translate_write_errors(out):
            for path in sorted(stage.iterdir()):
                os.replace(path, out / path.name)
    return files


# ------------------------------------------------------------------------------------------ plots


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend; None, with one warning, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping plots (pip install 'vitqtool[plots]')")
        return None
    return plt


def save_png(plt: Any, fig: Any, path: Path) -> None:
    """Write `fig` as a PNG to `path` (atomically) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def render_plots(report: dict[str, Any], out: Path, advance: Callable[..., None] | None = None) -> dict[str, str]:
    """PNG plots into `out` (`advance()` after each); {} with a warning when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return {}
    made: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        save_png(plt, fig, out / name)
        made[name] = str(out / name)
        if advance is not None:
            advance()

    mods = report["sensitivity"]["modules"]
    shown = mods[:40]
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(shown) + 1.2))
    ax.barh([m["name"] for m in shown][::-1], [max(m["kl"], 1e-12) for m in shown][::-1], color="tab:red")
    ax.set_xscale("log")
    ax.set_xlabel("KL(FP || quantized) of the logits" + (" (second-order estimate)" if report["sensitivity"]["method"] == "taylor" else ""))
    ax.set_title(f"Sensitivity: only this module at W{report['bits']}/A{report['bits']} ({report['sensitivity']['what']}); "
                 f"top {len(shown)} of {len(mods)}")
    ax.tick_params(axis="y", labelsize=7)
    save(fig, "sensitivity.png")

    per_type: dict[str, list[tuple[int, float]]] = defaultdict(list)
    index = {b: i for i, b in enumerate(report["blocks"])}
    for a in report["activations"]:
        ratio = a.get("per_head", {}).get("range_ratio")
        if a["block"] is not None and ratio is not None:
            per_type[a["type"]].append((index[a["block"]], ratio))
    if per_type:
        fig, ax = plt.subplots(figsize=(8, 4))
        for t, points in sorted(per_type.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=t)
        ax.set_xlabel("block")
        ax.set_ylabel("max / min of per-head ranges")
        ax.set_yscale("log")
        ax.set_title("Variation across heads per block")
        ax.legend(fontsize=8)
        save(fig, "head_variation.png")

    hist_rows = _histogram_rows(report)
    if hist_rows:
        fig, axes = plt.subplots(1, len(hist_rows), figsize=(4 * len(hist_rows), 3.2), squeeze=False)
        for ax, (title, row) in zip(axes[0], hist_rows):
            h = row["histogram"]
            width = (h["max"] - h["min"]) / len(h["counts"]) or 1.0
            ax.bar([h["min"] + width * (i + 0.5) for i in range(len(h["counts"]))], h["counts"], width=width)
            ax.set_yscale("log")
            ax.set_title(title, fontsize=8)
        save(fig, "histograms.png")

    osc = report.get("oscillation")
    if osc and osc["modules"]:
        fig, ax = plt.subplots(figsize=(8, 0.2 * len(osc["modules"]) + 1.2))
        names = [m["name"] for m in osc["modules"]][::-1]
        ax.barh(names, [m["boundary_share"] for m in osc["modules"]][::-1], alpha=0.6, label="within 0.05 of a bin boundary")
        if osc["tracked"]:
            ax.barh(names, [m["oscillating_share"] or 0.0 for m in osc["modules"]][::-1], alpha=0.8, label=f"oscillating (EMA > {osc['threshold']})")
        ax.set_xlabel("share of weights")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=8)
        save(fig, "oscillation.png")
    return made


def _histogram_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(title, stats row) for the weights and input activations of the most and least sensitive module."""
    mods = report["sensitivity"]["modules"]
    if not mods:
        return []
    weights = {w["name"]: w for w in report["weights"]}
    acts = {a["name"]: a for a in report["activations"]}
    out = []
    for label, m in (("most", mods[0]), ("least", mods[-1])):
        for q in m["quantizers"]:
            row = acts.get(q) or weights.get(q.removesuffix(".w_quant"))
            if row is not None and "histogram" in row:
                kind = "weights" if q.endswith(".w_quant") else "activations"
                out.append((f"{label} sensitive: {m['name']} ({kind})", row))
    return out


# ------------------------------------------------------------------------------------------ html


def html_table(rows: list[dict[str, Any]]) -> str:
    """An HTML table of `rows` (columns of the first row; cells escaped)."""
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def format_value(value: Any) -> str:
    """Short text for a table cell (4 significant digits for small floats, 2 decimals otherwise)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def render_html(report: dict[str, Any], images: dict[str, str]) -> str:
    """A self-contained index.html: the summary tables and the PNGs next to it."""
    s = report["summary"]
    parts = [f"<h1>vitqtool analyze: {html.escape(str(report['model']))}</h1>",
             f"<p>{html.escape(str(report['data']))} [{html.escape(report['split'])}], {report['images']} images, "
             f"W{report['bits']}/A{report['bits']} recipe {html.escape(report['recipe'])}, "
             f"sensitivity of {s['what']}: {s['method']}, {html.escape(s['method_description'])}</p>",
             "<h2>Most sensitive modules</h2>", html_table(s["top_sensitive"]),
             "<h2>Variation by module type</h2>", html_table(s["by_type"]),
             "<h2>Variation by block</h2>", html_table(s["by_block"])]
    if s.get("allocation"):
        alloc = s["allocation"]
        parts += ["<h2>Bit allocation (overrides.toml)</h2>",
                  f"<p>average weight bits {alloc['base_average_bits']:.3f} &rarr; {alloc['average_bits']:.3f}</p>",
                  html_table([{"module": k, **v} for k, v in alloc["overrides"].items()])]
    for key, name in images.items():
        parts.append(f"<h2>{html.escape(key.removesuffix('.png'))}</h2><img src=\"{html.escape(name)}\" style=\"max-width:100%\">")
    return html_page("vitqtool analysis", parts)


def html_page(title: str, parts: list[str]) -> str:
    """A self-contained HTML page from body fragments (already escaped)."""
    style = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>{style}</head>"
            f"<body>{''.join(parts)}</body></html>\n")
