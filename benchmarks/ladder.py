"""Accuracy ladder: one FP model quantized with ptq, lsq, lsq + KD and vaq at several bit widths over seeds.

    python benchmarks/ladder.py                       # W4A4/W3A3/W2A2 x 3 seeds, 2 epochs + vaq ablations at W2A2 (~25 min, 2 cores)
    python benchmarks/ladder.py --quick               # smoke run: 1 seed, W2A2, 1 epoch, small subset
    python benchmarks/ladder.py --seeds 5 --bits 4,2 --epochs 4 --jobs 2 --out benchmarks/results

Data: builtin:mnist5k. The train split trains the FP model, generates the soft labels and calibrates
and trains every QAT run; the validation split is held out and only evaluated. Every reported QAT
number is the *last* checkpoint's validation top-1 (`last_top1`): the per-epoch validation that
`quantize` logs never selects what is reported (its "best" checkpoint is ignored here). The FP model is
trained once (seed 0) and shared; a seed varies the QAT run (calibration images, data order, crops).

Contenders (all with the same schedule: epochs, images per step, lr; see `--epochs`):
    ptq      calibration only (vaq layout; every run calibrates on the same number of batches)
    lsq      plain LSQ: shared qkv step, hard labels, no KD, no OBR
    lsq+kd   lsq with online KD from the FP teacher (soft cross-entropy, no hard-label term)
    vaq      split Q/K/V steps + stored multi-crop soft-label KD (DEMO.qat_crops_per_image crops/image) + OBR
Ablations of vaq (each drops one component):
    vaq-shared-qkv   quant.split_qkv = false
    vaq-no-obr       obr.enabled = false
    vaq-online-kd    online KD from the FP teacher (1 crop/image) instead of stored multi-crop labels

Writes OUT/ladder.md (markdown tables) and OUT/ladder.json (config and every run), and prints the
tables. Run folders (~270 MB for the default run), the FP model and the soft-label store go to --work
(default TMPDIR/vitqtool-ladder; reused when present: the FP model and labels while their settings match, a
finished run while the schedule matches; delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.paired import describe, paired  # noqa: E402
from benchmarks.parallel import run_jobs  # noqa: E402


def labels_reusable(store: Path, crops: int) -> bool:
    """Whether the soft-label store at `store` exists and holds `crops` crops per image (its typed manifest says)."""
    from vitqtool.train import SoftLabelStore

    return (store / "manifest.json").is_file() and SoftLabelStore.open(store).crops_per_image == crops
METHODS = ("ptq", "lsq", "lsq+kd", "vaq")
ABLATIONS = ("vaq-shared-qkv", "vaq-no-obr", "vaq-online-kd")
LABELS = {
    "ptq": "ptq (calibration only)",
    "lsq": "lsq (hard labels, no KD)",
    "lsq+kd": "lsq + online KD",
    "vaq": "**vaq** (split QKV + multi-crop KD + OBR)",
    "vaq-shared-qkv": "vaq without split Q/K/V (shared qkv step)",
    "vaq-no-obr": "vaq without OBR",
    "vaq-online-kd": "vaq with online KD (1 crop) instead of stored multi-crop KD",
}


def demo_config():
    """The demo's model and FP schedule (vitqtool/demo.py), so the ladder and `vitqtool demo` share one ViT."""
    from vitqtool.demo import DEMO

    return DEMO


# --------------------------------------------------------------------------- one run (in a worker process)


def _variant(method: str, crops: int) -> tuple[str, str, bool]:
    """(recipe, extra override TOML, needs the soft-label store) of a contender."""
    if method == "ptq":
        return "ptq", "", False
    if method == "lsq":
        return "lsq", "", False
    if method == "lsq+kd":
        return "lsq", '[kd]\nmode = "online"\nhard_label_weight = 0.0\n', False
    stored = f'[kd]\nmode = "stored"\ncrops_per_image = {crops}\n'
    if method == "vaq":
        return "vaq", stored, True
    if method == "vaq-shared-qkv":
        return "vaq", stored + '[quant]\nsplit_qkv = false\n', True
    if method == "vaq-no-obr":
        return "vaq", stored + '[obr]\nenabled = false\n', True
    if method == "vaq-online-kd":
        return "vaq", '[kd]\nmode = "online"\ncrops_per_image = 1\n', False
    raise ValueError(method)


def run_one(job: dict) -> dict:
    """Quantize the FP model with one contender/bits/seed; returns the record (reuses a finished run folder)."""
    import torch

    torch.set_num_threads(job["threads"])
    logging.disable(logging.WARNING)
    from vitqtool.commands import quantize
    from vitqtool.core import read_run_info

    out = Path(job["out"])
    recipe, extra, stored = _variant(job["method"], job["crops_per_image"])
    run_json = out / "run.json"
    start = time.perf_counter()
    reused = False
    if run_json.is_file() and read_run_info(out).status == "done":
        reused = True
    else:
        ov = Path(job["out"] + ".toml")
        ov.parent.mkdir(parents=True, exist_ok=True)
        ov.write_text(job["augment"] + extra)
        kw = dict(bits=job["bits"], recipe=recipe, out=out, overwrite=True, overrides=[ov], seed=job["seed"],
                  batch_size=job["batch_size"], limit_train=job["limit_train"])
        kw["calib_batches"] = job["calib_batches"]
        if recipe != "ptq":
            kw.update(epochs=job["epochs"], lr=job["lr"], fuse_quantizers=job["fuse_quantizers"] or None)  # None: quantize's default
            if stored:
                kw["soft_labels"] = Path(job["soft_labels"])
        quantize(job["fp"], **kw)
    info = read_run_info(out)
    return {"method": job["method"], "bits": job["bits"], "seed": job["seed"], "top1": info.last_top1,
            "best_top1_not_reported": info.best_top1, "kd_mode": info.kd_mode, "epochs": info.epochs,
            "seconds": round(time.perf_counter() - start, 1), "reused": reused, "run": str(out)}


# --------------------------------------------------------------------------- tables


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}"


def collect(records: list[dict]) -> dict[tuple[str, int], list[float]]:
    table: dict[tuple[str, int], list[float]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        table.setdefault((r["method"], r["bits"]), []).append(r["top1"])
    return table


def render(fp_top1: float, records: list[dict], bits: list[int], abl_bits: list[int], cfg: dict) -> str:
    table = collect(records)
    n_seeds = len(cfg["seeds"])
    lines = [f"Top-1 (%) on the held-out builtin:mnist5k validation split (1,000 images), mean ± std over {n_seeds} "
             f"seed(s) {cfg['seeds']}; QAT: {cfg['epochs']} epoch(s) of {cfg['train_images']} training images, batch "
             f"{cfg['batch_size']} images, lr {cfg['lr']}; reported checkpoint: the last one (no selection on validation).",
             "", "| method | " + " | ".join(f"W{b}A{b}" for b in bits) + " |",
             "|---|" + "---|" * len(bits),
             "| FP (same model for every row) | " + " | ".join(f"{fp_top1:.2f}" for _ in bits) + " |"]
    for m in METHODS:
        lines.append(f"| {LABELS[m]} | " + " | ".join(fmt(table.get((m, b), [])) for b in bits) + " |")
    if abl_bits and any(m in ABLATIONS for m, _ in table):
        lines += ["", "vaq ablations (each row drops one component; same seeds and schedule):", "",
                  "| variant | " + " | ".join(f"W{b}A{b}" for b in abl_bits) + " |", "|---|" + "---|" * len(abl_bits)]
        for m in ("vaq", *ABLATIONS):
            lines.append(f"| {LABELS[m]} | " + " | ".join(fmt(table.get((m, b), [])) for b in abl_bits) + " |")
    seeds = by_seed(records)
    lines += ["", "Paired over seeds (each seed shares the FP model, calibration images and data order; mean difference "
              "with its 95% confidence interval, paired t, and wins out of seeds):", ""]
    lines += paired_lines(seeds, bits, METHODS, "vaq")
    lines += paired_lines(seeds, [b for b in abl_bits], (*ABLATIONS, "vaq"), "vaq")
    lines += ["", "Goals (issue 6):", ""]
    lines += [f"- {g}" for g in goals(fp_top1, table, bits, seeds)]
    return "\n".join(lines) + "\n"


def by_seed(records: list[dict]) -> dict[tuple[str, int], dict[int, float]]:
    """{(method, bits): {seed: top-1}} for paired comparisons."""
    out: dict[tuple[str, int], dict[int, float]] = {}
    for r in records:
        out.setdefault((r["method"], r["bits"]), {})[r["seed"]] = r["top1"]
    return out


def goals(fp_top1: float, table: dict, bits: list[int], seeds: dict | None = None) -> list[str]:
    """The issue's goals, checked mechanically: vaq W4A4 >= FP; vaq W2A2 within 2 points of FP and above every
    baseline, paired over seeds (each seed shares the FP model, calibration images and data order): MET when the
    95% confidence interval of the mean per-seed difference (paired t) lies above 0."""
    seeds = seeds or {}
    out = []
    if ("vaq", 4) in table:
        m, _ = mean_std(table[("vaq", 4)])
        out.append(f"vaq W4A4 >= FP: {'MET' if m >= fp_top1 else 'NOT MET'} ({m:.2f} vs FP {fp_top1:.2f}, {m - fp_top1:+.2f})")
    if ("vaq", 2) in table:
        m, _s = mean_std(table[("vaq", 2)])
        out.append(f"vaq W2A2 within 2 points of FP: {'MET' if m >= fp_top1 - 2 else 'NOT MET'} ({m:.2f} vs FP {fp_top1:.2f}, {m - fp_top1:+.2f})")
        for b in ("ptq", "lsq", "lsq+kd"):
            if (b, 2) in table:
                result = paired(seeds.get(("vaq", 2), {}), seeds.get((b, 2), {}))
                ok = result is not None and result["ci"][0] > 0
                out.append(f"vaq W2A2 above {b} (paired over seeds): {'MET' if ok else 'NOT MET'} ({describe(result, 'vaq', b)})")
    return out


def paired_lines(seeds: dict, bits: list[int], methods: tuple[str, ...], reference: str) -> list[str]:
    """`reference` against every other method at every bit width, paired over seeds."""
    lines = []
    for b in bits:
        for m in methods:
            if m != reference and (m, b) in seeds and (reference, b) in seeds:
                lines.append(f"- W{b}A{b}: {describe(paired(seeds[(reference, b)], seeds[(m, b)]), reference, m)}")
    return lines


def demo_fp(work: Path, demo) -> tuple[Path, float, dict, float | None]:
    """The demo's FP model in WORK/fp, trained once (seed 0) and reused while its settings match: (folder, top-1, settings,
    training seconds). Retraining it deletes the soft labels and run folders made from the old one."""
    import torch

    from vitqtool.commands import train_fp

    model_args = dict(demo.model_args)
    fp_dir, fp_json = work / "fp", work / "fp.json"
    fp_cfg = {"architecture": demo.architecture, "model_args": model_args, "data": demo.data, "epochs": demo.fp_epochs,
              "batch_size": demo.fp_batch_size, "lr": demo.fp_lr, "weight_decay": demo.fp_weight_decay,
              "warmup_epochs": demo.fp_warmup_epochs, "scale": list(demo.scale), "ratio": list(demo.ratio),
              "hflip": demo.hflip, "seed": demo.seed}
    if fp_json.is_file() and json.loads(fp_json.read_text())["config"] == fp_cfg and (fp_dir / "config.json").is_file():
        fp_top1 = json.loads(fp_json.read_text())["top1"]
        print(f"[ladder] FP model reused from {fp_dir}: top-1 {fp_top1:.2f}", flush=True)
    else:
        torch.set_num_threads(getattr(demo, "threads", 1))
        print(f"[ladder] training the FP model ({demo.fp_epochs} epochs) ...", flush=True)
        t = time.perf_counter()
        shutil.rmtree(work / "softlabels", ignore_errors=True)  # labels of an older teacher
        for old_runs in work.glob("runs*"):  # runs quantized from an older FP model
            shutil.rmtree(old_runs)
        fp = train_fp(demo.architecture, fp_dir, data=demo.data, model_args=model_args, epochs=demo.fp_epochs,
                      batch_size=demo.fp_batch_size, lr=demo.fp_lr, weight_decay=demo.fp_weight_decay,
                      warmup_epochs=demo.fp_warmup_epochs, scale=tuple(demo.scale), ratio=tuple(demo.ratio),
                      hflip=demo.hflip, seed=demo.seed)
        fp_top1 = fp.top1
        fp_json.write_text(json.dumps({"config": fp_cfg, "top1": fp_top1, "seconds": round(time.perf_counter() - t, 1)}))
        print(f"[ladder] FP top-1 {fp_top1:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return fp_dir, fp_top1, fp_cfg, json.loads(fp_json.read_text()).get("seconds")


def demo_soft_labels(work: Path, demo, fp_dir: Path, crops: int) -> tuple[Path, float | None]:
    """The FP teacher's stored soft labels (`crops` per training image) in WORK/softlabels, made once: (folder, seconds)."""
    import torch

    from vitqtool.commands import softlabels

    sl_dir = work / "softlabels"
    if labels_reusable(sl_dir, crops):
        return sl_dir, None
    torch.set_num_threads(getattr(demo, "threads", 1))
    print(f"[ladder] soft labels: {crops} crops per training image from the FP teacher ...", flush=True)
    s = softlabels(str(fp_dir), sl_dir, data=demo.data, crops=crops, scale=tuple(demo.scale), ratio=tuple(demo.ratio),
                   hflip=demo.hflip, seed=0, batch_size=256, overwrite=True)
    print(f"[ladder] soft labels done ({s['seconds']:.0f} s, {s['crops_per_second']:.0f} crops/s)", flush=True)
    return sl_dir, s["seconds"]


# --------------------------------------------------------------------------- main


def parse_list(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="3", help="number of seeds (N -> 0..N-1) or a comma list (default 3)")
    p.add_argument("--bits", default="4,3,2", help="bit widths of the main table (default 4,3,2)")
    p.add_argument("--ablation-bits", default="2", help="bit widths of the vaq ablations, '' for none (default 2)")
    p.add_argument("--epochs", type=int, default=2, help="QAT epochs of every QAT run (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: DEMO.qat_batch_size)")
    p.add_argument("--lr", type=float, default=None, help="QAT peak lr, cosine to 0 (default: DEMO.qat_lr)")
    p.add_argument("--crops", type=int, default=None, help="stored soft-label crops per training image (default: DEMO.label_crops)")
    p.add_argument("--crops-per-image", type=int, default=None,
                   help="stored crops vaq replays per image and step (default: DEMO.qat_crops_per_image)")
    p.add_argument("--limit-train", type=int, default=None, help="train QAT on the first N training images (default all)")
    p.add_argument("--calib-batches", type=int, default=None, help="calibration batches of every run (default: DEMO.calib_batches)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each (default 2)")
    p.add_argument("--fuse-quantizers", action="store_true", help="QAT runs insist on `quantize --fuse-quantizers` (default: quantize's own choice)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, W2A2, 1 epoch, 512 images, ablations at W2A2")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where ladder.md/ladder.json go")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vitqtool-ladder",
                   help="FP model, soft labels and run folders, reused when present (default: TMPDIR/vitqtool-ladder)")
    p.add_argument("--collect", action="store_true",
                   help="no runs: re-render OUT/ladder.md from the runs recorded in OUT/ladder.json (e.g. after a change of the tables)")
    a = p.parse_args(argv)
    if a.collect:
        recorded = json.loads((a.out / "ladder.json").read_text())
        c = recorded["config"]
        md = render(recorded["fp_top1"], recorded["runs"], c["bits"], c["ablation_bits"], c)
        md += (f"\nCommand: `{c['command']}` — wall time {recorded['wall_seconds'] / 60:.1f} min on {c['machine']['cpus']} CPU cores"
               f"{'' if recorded['complete'] else ' (partial)'}; tables re-rendered from ladder.json with `--collect`.\n")
        (a.out / "ladder.md").write_text(md)
        print(md, flush=True)
        return 0
    demo = demo_config()
    a.batch_size = a.batch_size or getattr(demo, "qat_batch_size", 64)
    a.lr = a.lr or getattr(demo, "qat_lr", 1e-3)
    a.crops = a.crops or getattr(demo, "label_crops", 8)
    a.crops_per_image = a.crops_per_image or getattr(demo, "qat_crops_per_image", 2)
    a.calib_batches = a.calib_batches or getattr(demo, "calib_batches", 4)
    if a.quick:
        a.seeds, a.bits, a.ablation_bits, a.epochs, a.limit_train = "1", "2", "2", 1, 512
    seeds = list(range(int(a.seeds))) if "," not in a.seeds else parse_list(a.seeds)
    bits, abl_bits = parse_list(a.bits), parse_list(a.ablation_bits)
    work = a.work
    # finished runs are reused only under the same schedule (and FP model: retraining it clears them)
    schedule = (f"e{a.epochs}-b{a.batch_size}-lr{a.lr:g}-k{a.crops_per_image}-s{a.crops}-c{a.calib_batches}"
                f"-n{a.limit_train or 'all'}")
    runs_dir = work / f"runs-{schedule}"
    work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from vitqtool.data import load_dataset

    t0 = time.perf_counter()
    model_args = dict(demo.model_args)
    fp_dir, fp_top1, fp_cfg, fp_seconds = demo_fp(work, demo)
    sl_dir, sl_seconds = demo_soft_labels(work, demo, fp_dir, a.crops)

    n_train = len(load_dataset(demo.data, "train"))
    train_images = min(n_train, a.limit_train) if a.limit_train else n_train
    augment = (f"[augment]\nscale = [{demo.scale[0]}, {demo.scale[1]}]\nratio = [{demo.ratio[0]}, {demo.ratio[1]}]\n"
               f"hflip = {'true' if demo.hflip else 'false'}\n")
    jobs = []
    for seed in seeds:  # seed-major: a partial run still gives every cell one seed first
        for b in bits:
            for m in METHODS:
                jobs.append((m, b, seed))
        for b in abl_bits:
            for m in ABLATIONS + (("vaq",) if b not in bits else ()):
                jobs.append((m, b, seed))
    payloads = [{"method": m, "bits": b, "seed": s, "out": str(runs_dir / f"{m.replace('+', '_')}-w{b}-s{s}"),
                 "work": str(work), "fp": str(fp_dir), "soft_labels": str(sl_dir), "augment": augment,
                 "epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size, "limit_train": a.limit_train,
                 "calib_batches": a.calib_batches, "crops_per_image": a.crops_per_image, "fuse_quantizers": a.fuse_quantizers,
                 "threads": getattr(demo, "threads", 1)} for m, b, s in jobs]
    cfg = {"data": demo.data, "architecture": demo.architecture, "model_args": model_args, "fp": fp_cfg,
           "seeds": seeds, "bits": bits, "ablation_bits": abl_bits, "epochs": a.epochs, "batch_size": a.batch_size,
           "lr": a.lr, "soft_label_crops": a.crops, "crops_per_image_vaq": a.crops_per_image, "train_images": train_images,
           "limit_train": a.limit_train, "calib_batches": a.calib_batches, "jobs": a.jobs, "fuse_quantizers": a.fuse_quantizers,
           "reported_checkpoint": "last (validation split never selects the reported checkpoint)",
           "augment": {"scale": list(demo.scale), "ratio": list(demo.ratio), "hflip": demo.hflip},
           "command": "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}
    records: list[dict] = []

    def write(final: bool) -> str:
        md = render(fp_top1, records, bits, abl_bits, cfg)
        wall = time.perf_counter() - t0
        md += f"\nCommand: `{cfg['command']}` — wall time {wall / 60:.1f} min on {os.cpu_count()} CPU cores" \
              f"{'' if final else ' (partial: run in progress)'}.\n"
        (a.out / "ladder.md").write_text(md)
        (a.out / "ladder.json").write_text(json.dumps({"config": cfg, "fp_top1": fp_top1, "fp_seconds": fp_seconds,
                                                       "soft_label_seconds": sl_seconds, "wall_seconds": round(wall, 1),
                                                       "complete": final, "runs": records}, indent=1))
        return md

    print(f"[ladder] {len(payloads)} quantization runs, {a.jobs} in parallel", flush=True)

    def keep(r: dict) -> None:
        records.append(r)
        write(False)

    failures = run_jobs(run_one, payloads, a.jobs, "ladder", lambda j: f"{j['method']:>15} W{j['bits']}A{j['bits']} seed {j['seed']}",
                        keep)
    md = write(True)
    print("\n" + md, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
