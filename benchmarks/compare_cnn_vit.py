"""ViT against CNN variation (the paper's premise) on builtin:mnist5k: `analyze --compare` over seeds and bit widths.

    python benchmarks/compare_cnn_vit.py                          # 3 seeds x W4A4, W2A2 (6-9 min, 1 thread)
    python benchmarks/compare_cnn_vit.py --seeds 1 --bits 2       # one seed, W2A2 only

Per seed (a seed sets the FP init and data order and the QAT run's; the analysed images are the same for every seed):
1. train two FP models on the 4,000 training digits with `vitqtool.commands.train_fp` to similar top-1: the demo's
   ViT (`vit_tiny_patch16_224` at 28 px, 7 px patches, 96 dims, 3 blocks, 3 heads; the demo's 16-epoch schedule)
   and a ResNet-10 (timm `resnet18` layout with one BasicBlock per stage, 16..128 channels, 28 px input; 2 epochs,
   lr 5e-4, zero_init_last=False: about the ViT's top-1 and parameter count);
2. at every bit width, a short plain-LSQ QAT run of each (recipe `lsq` with split Q/K/V, i.e. the layout `analyze`
   measures; hard labels, no KD, no OBR; 3 epochs, the demo's augmentation and QAT lr) for the oscillating-weight share;
3. `vitqtool.commands.compare` of the two FP models (with their runs) at that bit width on the same 256 evenly spaced
   validation digits (calibration: the recipe's one batch of 64 evenly spaced training digits).

Writes OUT/summary.json (settings, every measure per seed, model and bits, QAT top-1, seconds), OUT/summary.md
(the tables the README quotes) and, for the first seed, the full comparison folders OUT/seed<S>/w<B>/ (table,
comparison.json/.csv, overlaid plots, index.html, each model's report). FP models and runs go to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vitqtool import commands  # noqa: E402
from vitqtool.demo import DEMO  # noqa: E402
from vitqtool.fileio import atomic_write, finite_or_none, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESNET_ARGS = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16, "num_classes": 10, "zero_init_last": False,
               "pretrained_cfg_overlay": {"input_size": [3, 28, 28]}}
MODELS = {  # label -> (timm name, model args, FP epochs, FP lr)
    "ViT": (DEMO.architecture, DEMO.model_args, DEMO.fp_epochs, DEMO.fp_lr),
    "ResNet": ("resnet18", RESNET_ARGS, 2, 5e-4),
}
QAT_OVERRIDES = (f'[quant]\nsplit_qkv = true\n\n[augment]\nscale = [{DEMO.scale[0]}, {DEMO.scale[1]}]\n'
                 f'ratio = [{DEMO.ratio[0]}, {DEMO.ratio[1]}]\nhflip = false\n')
VARIATION = {  # FP statistics of the two models: the same at every bit width (rows of the first README table)
    "fp_val_top1": "FP top-1 % (1,000 validation digits)",
    "w_range_cv_modules": "weight range CV across modules",
    "w_range_cv_channels": "weight range CV across channels (mean over modules)",
    "w_kurtosis": "weight kurtosis (mean over modules)",
    "a_range_cv_modules": "layer-input range CV across modules",
    "a_range_cv_channels": "layer-input range CV across channels",
    "a_kurtosis": "layer-input kurtosis (mean)",
    "a_kurtosis_max": "layer-input kurtosis (max)",
    "a_outlier_ratio": "layer-input outlier share (> 3 std)",
    "a_range_ratio_heads": "Q/K/V, attn@V range max/min across heads",
}
PER_BITS = {  # measures at one bit width (rows of the second README table, one group per bit width)
    "kl_max_min": "sensitivity spread: KL max/min",
    "kl_q3_q1": "sensitivity spread: KL q3/q1",
    "kl_median": "KL median",
    "oscillating_share": "oscillating weights after QAT",
    "qat_top1": "top-1 % after QAT (plain LSQ)",
}


def train(label: str, spec: tuple, seed: int, work: Path) -> tuple[Path, float, float]:
    """Train (or reuse, when its folder holds one with the same settings) FP model `spec` for `seed`: (folder, top-1, seconds)."""
    name, args, epochs, lr = spec
    folder = work / f"seed{seed}" / f"{label.lower()}_fp"
    stamp = folder / "bench.json"
    settings = json.loads(json.dumps({"model": spec, "seed": seed, "demo": DEMO.fp_settings()}))
    start = time.perf_counter()
    if not stamp.is_file() or json.loads(stamp.read_text())["settings"] != settings:
        result = commands.train_fp(name, folder, model_args=args, epochs=epochs, lr=lr, batch_size=DEMO.fp_batch_size,
                                   weight_decay=DEMO.fp_weight_decay, warmup_epochs=DEMO.fp_warmup_epochs, scale=DEMO.scale,
                                   ratio=DEMO.ratio, hflip=DEMO.hflip, seed=seed)
        write_json(stamp, {"settings": settings, "top1": result.top1})
    return folder, json.loads(stamp.read_text())["top1"], time.perf_counter() - start


def qat(label: str, fp: Path, bits: int, seed: int, work: Path, epochs: int) -> tuple[Path, float, float]:
    """One plain-LSQ QAT run of an FP model folder; (run folder, last top-1, seconds)."""
    out = work / f"seed{seed}" / f"{label.lower()}_w{bits}"
    overrides = atomic_write(work / "qat_overrides.toml", QAT_OVERRIDES)
    start = time.perf_counter()
    info = commands.quantize(str(fp), bits=bits, recipe="lsq", out=out, overwrite=True, overrides=[overrides], seed=seed,
                             epochs=epochs, lr=DEMO.qat_lr, batch_size=DEMO.qat_batch_size, calib_batches=DEMO.calib_batches)
    return out, info.last_top1, time.perf_counter() - start


def table(records: list[dict], seeds: list[int], bit_widths: list[int], measures: dict[str, str]) -> list[str]:
    """Markdown table: each measure (at each bit width) per seed for ViT and ResNet, their means, and in how many seeds ViT is larger."""
    head = ["measure"] + [f"{m} s{s}" for m in MODELS for s in seeds] + [f"{m} mean" for m in MODELS] + ["ViT > ResNet"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for bits in bit_widths:
        rows = {r["seed"]: r["models"] for r in records if r["bits"] == bits}
        for key, text in measures.items():
            values = {m: [rows[s][m][key] for s in seeds] for m in MODELS}
            means = {m: statistics.fmean(v) if None not in v else None for m, v in values.items()}
            pairs = [(v, c) for v, c in zip(values["ViT"], values["ResNet"]) if v is not None and c is not None]
            cells = ([f"W{bits}A{bits} {text}" if len(bit_widths) > 1 else text] + [_num(v) for m in MODELS for v in values[m]]
                     + [_num(means[m]) for m in MODELS] + [f"{sum(v > c for v, c in pairs)}/{len(pairs)}" if pairs else "-"])
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _num(value: float | None) -> str:
    """Three significant digits (whole numbers from 100 on), '-' for a missing value."""
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every seed and bit width, write and print the summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--bits", default="4,2", help="bit widths, comma separated (default 4,2)")
    p.add_argument("--qat-epochs", type=int, default=3, help="epochs of each oscillation QAT run (default 3)")
    p.add_argument("--batches", type=int, default=4, help="analysis batches of --batch-size validation digits (default 4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_cnn_vit")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vitqtool-compare-cnn-vit",
                   help="FP models and QAT runs (FP models are reused when present)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--zero-init-last", action="store_true",
                   help="timm's default ResNet init (each block's last BatchNorm scale starts at 0) instead of zero_init_last=False")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {**MODELS, "ResNet": ("resnet18", {**RESNET_ARGS, "zero_init_last": args.zero_init_last}, *MODELS["ResNet"][2:])}
    seeds, bit_widths = list(range(args.seeds)), [int(b) for b in args.bits.split(",")]
    started = time.perf_counter()
    records, seconds = [], {"train_fp": 0.0, "qat": 0.0, "compare": 0.0}
    for seed in seeds:
        fps, fp_top1 = {}, {}
        for label, spec in models.items():
            folder, top1, took = train(label, spec, seed, args.work)
            fps[label], fp_top1[label] = folder, top1
            seconds["train_fp"] += took
            print(f"seed {seed}: {label} FP top-1 {top1:.2f} ({took:.0f} s)", flush=True)
        for bits in bit_widths:
            runs, qat_top1 = {}, {}
            for label in MODELS:
                runs[label], qat_top1[label], took = qat(label, fps[label], bits, seed, args.work, args.qat_epochs)
                seconds["qat"] += took
            start = time.perf_counter()
            full = seed == seeds[0]
            comparison = commands.compare([str(fps[m]) for m in MODELS], labels=list(MODELS), bits=bits, batches=args.batches,
                                          batch_size=args.batch_size, runs=runs, plots=full,
                                          out=args.out / f"seed{seed}" / f"w{bits}" if full else None)
            seconds["compare"] += time.perf_counter() - start
            measured = {m["label"]: {**m, "fp_val_top1": fp_top1[m["label"]], "qat_top1": qat_top1[m["label"]]}
                        for m in comparison["models"]}
            records.append({"seed": seed, "bits": bits, "images": comparison["images"], "models": measured})
            print(f"seed {seed} W{bits}A{bits}: " + "; ".join(
                f"{m}: KL max/min {_num(v['kl_max_min'])}, osc {_num(v['oscillating_share'])}, QAT top-1 {_num(v['qat_top1'])}"
                for m, v in measured.items()), flush=True)
    total = time.perf_counter() - started
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    settings = {"seeds": seeds, "bits": bit_widths, "qat_epochs": args.qat_epochs, "images": records[0]["images"],
                "threads": args.threads, "models": {m: {"architecture": v[0], "model_args": v[1], "fp_epochs": v[2], "fp_lr": v[3]}
                                                     for m, v in models.items()}}
    write_json(args.out / "summary.json", finite_or_none({"settings": settings, "seconds": seconds, "total_seconds": round(total, 1),
                                                         "records": records}))
    lines = [f"builtin:mnist5k, {records[0]['images']} evenly spaced validation digits analysed, seeds {seeds}, "
             f"{args.qat_epochs}-epoch QAT runs; total {total / 60:.1f} min on {args.threads} thread(s) (FP training {seconds['train_fp']:.0f} s, "
             f"QAT {seconds['qat']:.0f} s, compare {seconds['compare']:.0f} s).", ""]
    lines += ["Variation of the FP models (the same at every bit width):", "", *table(records, seeds, bit_widths[:1], VARIATION), "",
              "Sensitivity spread, oscillation and accuracy at each bit width:", "", *table(records, seeds, bit_widths, PER_BITS), ""]
    text = "\n".join(lines)
    atomic_write(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
