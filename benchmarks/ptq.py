"""PTQ or QAT: calibration-only PTQ, reparameterized and reconstructed PTQ, onnxruntime's static quantization, and
short QAT from plain calibration or from `ptq-recon`, over seeds of calibration sampling (docs/ptq.md).

    nice python benchmarks/ptq.py                          # demo ViT + ResNet, W4A4/W3A3/W2A2, 5 seeds, every row
    nice python benchmarks/ptq.py --models vit --seeds 0,  # seed 0 of the ViT only (cells already done are reused)
    python benchmarks/ptq.py --collect                     # only the tables, from the cells done so far

Models: the demo's ViT (`vitqtool/demo.py`: FP trained once, seed 0, the same model as benchmarks/ladder.py) and
the demo-sized ResNet-10 of benchmarks/compare_cnn_vit.py (FP seed 0). Data: builtin:mnist5k; calibration and QAT
use the 4,000 training digits, every figure is top-1 on the 1,000 held-out validation digits (QAT: the last
checkpoint). A seed selects the calibration images (the first images of that seed's calibration order: 256 for the
step init, batch 64 x 4 as in the ladder, and 1,024 for reconstruction) and the QAT data order; within a seed every
row shares the FP model, the calibration images and the data order, so rows are compared paired over seeds.

Rows (W = A bits inside blocks; patch embedding / stem and head at 8 bits, as every vitqtool recipe):
    ptq               recipe ptq: steps from calibration only
    ptq+reparam       ptq with [calibration] reparam = "ln-channel" (ViT only: a ResNet has no LayerNorm -> Linear pair)
    ptq-recon         recipe ptq-recon: reparam, calibration, block-wise reconstruction (AdaRound rounding + steps)
    ptq-recon+qdrop   ptq-recon with [reconstruct] drop = 0.5
    ort-w8a8/w4a8     onnxruntime.quantization.quantize_static of the FP ONNX graph (QDQ, per-tensor, MinMax on the
                      same 256 calibration images; int8 activations; int8 or int4 weights everywhere it quantizes)
    vaq               2 epochs of vaq QAT (stored multi-crop soft labels, as the ladder) from plain calibration
    vaq-from-recon    the same QAT started from ptq-recon (its reparameterization and reconstruction first)

Every cell (model, row, bits, seed) is one job writing WORK/cells/<model>/<row>-w<bits>-s<seed>.json; a cell whose
file exists is not run again, so the script can be stopped and restarted, run per seed, and `--collect`ed.
Writes OUT/ptq.md and OUT/ptq.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.ladder import fmt  # noqa: E402
from benchmarks.paired import describe, paired  # noqa: E402
from benchmarks.parallel import run_jobs  # noqa: E402

ROWS = ("ptq", "ptq+reparam", "ptq-recon", "ptq-recon+qdrop", "vaq", "vaq-from-recon")
ORT_ROWS = ("ort-w8a8", "ort-w4a8")
LABELS = {
    "ptq": "`ptq` (calibration only)",
    "ptq+reparam": "`ptq` + ln-channel reparam",
    "ptq-recon": "**`ptq-recon`** (reparam + block reconstruction)",
    "ptq-recon+qdrop": "`ptq-recon` + QDrop (drop 0.5)",
    "vaq": "2 epochs `vaq` QAT from calibration",
    "vaq-from-recon": "2 epochs `vaq` QAT from `ptq-recon`",
    "ort-w8a8": "onnxruntime `quantize_static` W8A8",
    "ort-w4a8": "onnxruntime `quantize_static` W4A8 (int4 weights)",
}
RECIPES = {  # row -> (recipe, override TOML, trains)
    "ptq": ("ptq", "", False),
    "ptq+reparam": ("ptq", '[calibration]\nreparam = "ln-channel"\n', False),
    "ptq-recon": ("ptq-recon", "", False),
    "ptq-recon+qdrop": ("ptq-recon", "[reconstruct]\ndrop = 0.5\n", False),
    "vaq": ("vaq", "", True),
    "vaq-from-recon": ("vaq", '[calibration]\nreparam = "ln-channel"\n\n[reconstruct]\nblocks = true\n', True),
}
CALIB_BATCH, CALIB_BATCHES = 64, 4  # 256 step-init images per seed, as the ladder


# --------------------------------------------------------------------------- one cell (in a worker process)


def run_cell(job: dict) -> dict:
    """Run one (model, row, bits, seed) and write its result file; returns the record."""
    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    record = ort_cell(job) if job["row"] in ORT_ROWS else vitq_cell(job)
    record = {**{k: job[k] for k in ("model", "row", "bits", "seed")}, **record, "seconds": round(time.perf_counter() - start, 1)}
    path = Path(job["cell"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def vitq_cell(job: dict) -> dict:
    """A `vitqtool quantize` run of the row's recipe; its last validation top-1 and what post-training did."""
    from vitqtool.commands import quantize

    recipe, extra, trains = RECIPES[job["row"]]
    out = Path(job["run"])
    overrides = out.with_suffix(".toml")
    overrides.parent.mkdir(parents=True, exist_ok=True)
    qat = job["qat"]
    augment = (f"[augment]\nscale = [{qat['scale'][0]}, {qat['scale'][1]}]\nratio = [{qat['ratio'][0]}, {qat['ratio'][1]}]\n"
               f"hflip = {'true' if qat['hflip'] else 'false'}\n")
    kd = f'[kd]\nmode = "stored"\ncrops_per_image = {qat["crops_per_image"]}\n' if trains else ""
    overrides.write_text(augment + kd + extra)
    kw = dict(bits=job["bits"], recipe=recipe, out=out, overwrite=True, overrides=[overrides], seed=job["seed"],
              batch_size=CALIB_BATCH, calib_batches=CALIB_BATCHES)
    if trains:
        kw.update(epochs=qat["epochs"], lr=qat["lr"], soft_labels=Path(job["soft_labels"]))
    info = quantize(job["fp"], **kw)
    blocks = ((info.calibration or {}).get("reconstruct") or {}).get("blocks", [])
    return {"top1": info.last_top1, "calibration": info.calibration,
            "reconstruct_seconds": round(sum(b["seconds"] for b in blocks), 1) if blocks else None}


def _calibration_images(job: dict):
    """The seed's first 256 calibration images (the order `quantize` calibrates on), eval transform."""
    import torch

    from vitqtool.core.models import resolve_model
    from vitqtool.data import TransformedDataset, eval_transform, load_dataset
    from vitqtool.train.sampling import CALIBRATION, epoch_permutation

    cfg = resolve_model(job["fp"]).data_config
    train = load_dataset("builtin:mnist5k", "train")
    order = epoch_permutation(len(train), job["seed"], 0, CALIBRATION)[:CALIB_BATCH * CALIB_BATCHES].tolist()
    data = TransformedDataset(train, eval_transform(cfg))
    return torch.stack([data[i][0] for i in order]), cfg


def ort_cell(job: dict) -> dict:
    """onnxruntime's own static quantization of the FP ONNX graph, calibrated on the seed's images; validation top-1."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from vitqtool.data import load_dataset, make_eval_loader

    images, cfg = _calibration_images(job)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images[i:i + 32].numpy()} for i in range(0, images.shape[0], 32)])

        def get_next(self):
            return next(self.batches, None)

    weight = QuantType.QInt4 if job["row"] == "ort-w4a8" else QuantType.QInt8
    out = Path(job["run"]).with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(job["fp_onnx"], str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=weight, per_channel=False, calibrate_method=CalibrationMethod.MinMax)
    graph = onnx.load(str(out))
    int4 = sum(1 for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT4)  # int4 weight codes in the graph
    int8 = sum(1 for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2)
    session = _session(out)
    correct = n = 0
    for x, y in make_eval_loader(load_dataset("builtin:mnist5k", "validation"), cfg, 250):
        logits = session.run(None, {"input": x.numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        n += y.numel()
    return {"top1": 100.0 * correct / n, "int4_weights": int4, "int8_weight_matrices": int8}


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- FP models, soft labels, FP ONNX


def prepare_models(work: Path, names: list[str], crops: int) -> dict[str, dict]:
    """FP model folder, top-1, soft-label store and FP ONNX graph of each model (made once, reused)."""
    import torch

    from benchmarks.compare_cnn_vit import MODELS, train
    from benchmarks.ladder import demo_fp, demo_soft_labels
    from vitqtool.core.models import resolve_model
    from vitqtool.demo import DEMO

    torch.set_num_threads(1)
    out = {}
    for name in names:
        if name == "vit":
            fp_dir, top1, _, _ = demo_fp(work / "vit", DEMO)
        else:
            fp_dir, top1, _ = train("ResNet", MODELS["ResNet"], 0, work / "resnet")
        labels, _ = demo_soft_labels(work / name, DEMO, fp_dir, crops)
        fp_onnx = work / name / "fp.onnx"
        if not fp_onnx.is_file():
            loaded = resolve_model(str(fp_dir))
            size = tuple(loaded.data_config["input_size"])
            torch.onnx.export(loaded.model.eval(), torch.zeros(1, *size), str(fp_onnx), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
        out[name] = {"fp": str(fp_dir), "fp_top1": top1, "soft_labels": str(labels), "fp_onnx": str(fp_onnx)}
    return out


# --------------------------------------------------------------------------- tables


def load_cells(work: Path) -> list[dict]:
    """Every finished cell's record."""
    return [json.loads(p.read_text()) for p in sorted((work / "cells").glob("*/*.json"))]


def render(cells: list[dict], models: dict[str, dict], bits: list[int], cfg: dict) -> list[str]:
    """The markdown tables, paired comparisons and goals of the cells done so far."""
    seeds: dict[tuple, dict[int, float]] = {}
    for c in cells:
        seeds.setdefault((c["model"], c["row"], c["bits"]), {})[c["seed"]] = c["top1"]
    lines = [f"Top-1 (%) on the 1,000 held-out builtin:mnist5k validation digits, mean ± std over the seeds done "
             f"(of {cfg['seeds']}); a seed selects the calibration images and the QAT data order, the FP model is the same. "
             "Machine: 2 CPU cores shared with other jobs, 1 torch thread per run.", ""]
    for model, info in models.items():
        lines += [f"### {model}: FP {info['fp_top1']:.2f}", "", "| row | " + " | ".join(f"W{b}A{b}" for b in bits) + " |",
                  "|---|" + "---|" * len(bits), "| FP | " + " | ".join(f"{info['fp_top1']:.2f}" for _ in bits) + " |"]
        for row in ROWS:
            if row == "ptq+reparam" and model != "vit":
                continue
            lines.append(f"| {LABELS[row]} | " + " | ".join(fmt(list(seeds.get((model, row, b), {}).values())) for b in bits) + " |")
        lines += ["", "| peer | top-1 |", "|---|---|"]
        for row in ORT_ROWS:
            lines.append(f"| {LABELS[row]} | {fmt(list(seeds.get((model, row, 8), {}).values()))} |")
        recon = [c["reconstruct_seconds"] for c in cells if c["model"] == model and c["row"] == "ptq-recon" and c.get("reconstruct_seconds")]
        if recon:
            blocks = len(next(c for c in cells if c["model"] == model and c["row"] == "ptq-recon")["calibration"]["reconstruct"]["blocks"])
            lines += ["", f"Reconstruction cost ({model}, `ptq-recon`: {blocks} segments, {cfg['recon_iters']} steps of "
                      f"{cfg['recon_batch']} images each): median {statistics.median(recon):.0f} s per run "
                      f"({statistics.median(recon) / blocks:.0f} s per segment) on the shared machine."]
        lines += ["", "Paired over seeds (mean difference, 95% CI by paired t, wins out of seeds):", ""]
        comparisons = [("ptq+reparam", "ptq"), ("ptq-recon", "ptq"), ("ptq-recon", "ptq+reparam"), ("ptq-recon+qdrop", "ptq-recon"),
                       ("vaq-from-recon", "vaq"), ("vaq", "ptq-recon")]
        for b in bits:
            for x, y in comparisons:
                if (model, x, b) in seeds and (model, y, b) in seeds:
                    lines.append(f"- {model} W{b}A{b}: " + describe(paired(seeds[(model, x, b)], seeds[(model, y, b)]), x, y))
        lines.append("")
    if "vit" in models:
        fp = models["vit"]["fp_top1"]
        lines += ["Goals (issue 21, demo ViT):", ""]
        for b, gap in ((4, 2.0), (3, 6.0)):
            values = list(seeds.get(("vit", "ptq-recon", b), {}).values())
            if values:
                m = statistics.fmean(values)
                lines.append(f"- `ptq-recon` W{b}A{b} >= FP - {gap:g}: {'MET' if m >= fp - gap else 'NOT MET'} "
                             f"({m:.2f} vs FP {fp:.2f}, {m - fp:+.2f}; {len(values)} seeds)")
        values = list(seeds.get(("vit", "ptq-recon", 2), {}).values())
        if values:
            lines.append(f"- `ptq-recon` W2A2 (no goal): {fmt(values)}, {statistics.fmean(values) - fp:+.2f} vs FP")
        for b in bits:
            if ("vit", "vaq-from-recon", b) in seeds and ("vit", "vaq", b) in seeds:
                r = paired(seeds[("vit", "vaq-from-recon", b)], seeds[("vit", "vaq", b)])
                beyond = r is not None and r["ci"][0] > 0
                lines.append(f"- QAT from `ptq-recon` beats QAT from calibration beyond the seed spread at W{b}A{b}: "
                             f"{'YES' if beyond else 'NO'} ({describe(r, 'vaq-from-recon', 'vaq')})")
    return lines


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit,resnet", help="vit and/or resnet (default both)")
    p.add_argument("--seeds", default="5", help="number of seeds (N -> 0..N-1) or a comma list ('3,' is seed 3 alone; default 5)")
    p.add_argument("--bits", default="4,3,2", help="bit widths (default 4,3,2)")
    p.add_argument("--rows", default=",".join(ROWS + ORT_ROWS), help="rows to run (default all)")
    p.add_argument("--jobs", type=int, default=2, help="cells in parallel, one torch thread each (default 2)")
    p.add_argument("--collect", action="store_true", help="run nothing: tables from the cells done so far")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where ptq.md / ptq.json go")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vitqtool-ptq",
                   help="FP models, soft labels, run folders and cell results (reused; default TMPDIR/vitqtool-ptq)")
    a = p.parse_args(argv)
    from vitqtool.demo import DEMO
    from vitqtool.recipe import load_recipe

    names = [m for m in a.models.split(",") if m]
    seeds = list(range(int(a.seeds))) if "," not in a.seeds else [int(s) for s in a.seeds.split(",") if s]
    bits = [int(b) for b in a.bits.split(",")]
    rows = [r for r in a.rows.split(",") if r]
    unknown = set(rows) - set(ROWS + ORT_ROWS) | set(names) - {"vit", "resnet"}
    if unknown:
        p.error(f"unknown rows/models: {', '.join(sorted(unknown))}")
    a.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    models = prepare_models(a.work, names, DEMO.label_crops)
    recon = load_recipe("ptq-recon").reconstruct
    qat = {"epochs": 2, "lr": DEMO.qat_lr, "batch_size": CALIB_BATCH, "crops_per_image": DEMO.qat_crops_per_image,
           "scale": list(DEMO.scale), "ratio": list(DEMO.ratio), "hflip": DEMO.hflip}
    cfg = {"seeds": seeds, "bits": bits, "models": names, "qat": qat, "recon_iters": recon.iters, "recon_batch": recon.batch_size,
           "recon_images": recon.images, "calibration_images": CALIB_BATCH * CALIB_BATCHES,
           "command": "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    jobs = []
    for seed in seeds:  # seed-major: a partial run gives every cell its first seeds
        for name in names:
            for row in rows:
                if row == "ptq+reparam" and name != "vit":
                    continue
                for b in ([8] if row in ORT_ROWS else bits):
                    cell = a.work / "cells" / name / f"{row}-w{b}-s{seed}.json"
                    if cell.is_file():
                        continue
                    jobs.append({"model": name, "row": row, "bits": b, "seed": seed, "cell": str(cell), "qat": qat,
                                 "run": str(a.work / "runs" / name / f"{row.replace('+', '_')}-w{b}-s{seed}"), **models[name]})

    def write(final: bool) -> None:
        cells = [c for c in load_cells(a.work) if c["model"] in names and c["seed"] in seeds]
        lines = render(cells, models, bits, cfg)
        lines.append(f"Command: `{cfg['command']}`; {'complete' if final else 'partial (cells still running)'}, "
                     f"{len(cells)} cells; this invocation {(time.perf_counter() - t0) / 60:.1f} min.")
        (a.out / "ptq.md").write_text("\n".join(lines) + "\n")
        (a.out / "ptq.json").write_text(json.dumps({"config": cfg, "models": models, "cells": cells}, indent=1))
        if final:
            print("\n".join(lines), flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    if a.collect or not jobs:
        write(True)
        return 0
    print(f"[ptq] {len(jobs)} cells to run, {a.jobs} in parallel", flush=True)
    failures = run_jobs(run_cell, jobs, a.jobs, "ptq", lambda j: f"{j['model']} {j['row']:>16} W{j['bits']} seed {j['seed']}",
                        lambda r: write(False))
    write(True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
