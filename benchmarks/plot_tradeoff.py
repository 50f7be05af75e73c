"""Accuracy against export size: one panel per results file of benchmarks/ladder.py or benchmarks/ptq.py.

    python benchmarks/plot_tradeoff.py                                   # the ladders -> results/ladder_tradeoff.png
    python benchmarks/plot_tradeoff.py benchmarks/results/ptq.json --out benchmarks/results/ptq_tradeoff.png

Each point is a method at one bit width: top-1 on the 1,000 held-out digits (mean over seeds, bar = std) against
the size of its verified `.safetensors` export (float32 FP tensors). The size depends only on the architecture and
the bit widths, not on training, so it is measured once per (model, bits) by exporting a random-init copy with the
`vaq` layout (benchmarks/export_size.py); the FP point is the float32 safetensors of the FP model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
LADDERS = (RESULTS / "ladder.json", RESULTS / "ladder-4ep" / "ladder.json", RESULTS / "ladder-8ep" / "ladder.json")
ABLATIONS = ("vaq-", "ort-")  # method names that are ablations or peers, not rows of the trade-off


def panels(path: Path) -> list[dict]:
    """(title, architecture, model_args, FP top-1, {method: {bits: [top-1 per seed]}}) of a ladder or ptq results file."""
    doc = json.loads(path.read_text())
    if "runs" in doc:  # benchmarks/ladder.py
        cfg = doc["config"]
        rows: dict[str, dict[int, list[float]]] = {}
        for r in doc["runs"]:
            rows.setdefault(r["method"], {}).setdefault(r["bits"], []).append(r["top1"])
        title = f"demo ViT, {cfg['epochs']} QAT epochs, {len(cfg['seeds'])} seeds ({path.relative_to(RESULTS)})"
        return [{"title": title, "architecture": cfg["architecture"], "model_args": cfg["model_args"],
                 "fp_top1": doc["fp_top1"], "rows": rows}]
    from benchmarks.compare_cnn_vit import MODELS  # benchmarks/ptq.py: its models are the demo ViT and ResNet-10

    out = []
    for name, info in doc["models"].items():
        architecture, model_args = next(v[:2] for k, v in MODELS.items() if k.lower() == name.lower())
        rows = {}
        for c in doc["cells"]:
            if c["model"] == name:
                rows.setdefault(c["row"], {}).setdefault(c["bits"], []).append(c["top1"])
        out.append({"title": f"{name}: PTQ and QAT ({path.relative_to(RESULTS)})", "architecture": architecture,
                    "model_args": model_args, "fp_top1": info["fp_top1"], "rows": rows})
    return out


def sizes(architecture: str, model_args: dict, bits: list[int]) -> tuple[float, dict[int, float]]:
    """(FP32 safetensors MB, {bits: export MB}) of the architecture, from random-init exports."""
    from benchmarks.export_size import measure

    with tempfile.TemporaryDirectory() as tmp:
        measured = {b: measure(architecture, b, "float32", Path(tmp), model_args=model_args) for b in bits}
    return next(iter(measured.values()))["fp32_file_MB"], {b: m["export_MB"] for b, m in measured.items()}


def plot(all_panels: list[dict], out: Path) -> None:
    """One panel per results file: top-1 against export size, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(all_panels), figsize=(5.5 * len(all_panels), 4.5), squeeze=False)
    for ax, p in zip(axes[0], all_panels):
        bits = sorted({b for row in p["rows"].values() for b in row}, reverse=True)
        fp_mb, mb = sizes(p["architecture"], p["model_args"], bits)
        ax.scatter([fp_mb], [p["fp_top1"]], marker="*", s=160, color="black", zorder=3, label=f"FP ({fp_mb:.2f} MB)")
        for method, row in p["rows"].items():
            if method.startswith(ABLATIONS):
                continue
            points = sorted(row)
            means = [statistics.mean(row[b]) for b in points]
            stds = [statistics.stdev(row[b]) if len(row[b]) > 1 else 0.0 for b in points]
            ax.errorbar([mb[b] for b in points], means, yerr=stds, marker="o", capsize=3, label=method)
        for b in bits:
            ax.annotate(f"W{b}A{b}", (mb[b], ax.get_ylim()[0]), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=8, color="gray")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if round(v * 10) in (2, 3, 5) else ""))
        ax.set_xlabel("export size, MB (log scale)")
        ax.set_ylabel("top-1 % (mean ± std over seeds)")
        ax.set_title(p["title"], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", type=Path, help="ladder.json / ptq.json files (default: the three ladders)")
    p.add_argument("--out", type=Path, default=RESULTS / "ladder_tradeoff.png")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    files = [f.resolve() for f in a.results] or [f for f in LADDERS if f.exists()]
    plot([panel for f in files for panel in panels(f)], a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
