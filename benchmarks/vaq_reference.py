"""`vaq` against four choices of the paper's released code, at W2A2 on the ladder's setup (docs/vaq-vs-reference.md).

    python benchmarks/vaq_reference.py                                  # 5 variants x seeds 0,1,2, 2 epochs, 1 job
    python benchmarks/vaq_reference.py --fp DIR --soft-labels DIR       # reuse the demo's seed-0 FP model and labels

Variants (each changes exactly one thing; the reference behaviour is patched into a worker process, so
vitqtool itself is unchanged):
    vaq              vitqtool's choices
    ref-drop-path    (b) drop_path_rate 0.1 during QAT (timm's linear per-block schedule), as the reference
    ref-unsigned-qp  (c) unsigned activation steps (softmax, GELU output) initialised with the *signed* Qp,
                     `2 mean|x| / sqrt(2^(b-1) - 1)`, as the reference, instead of the unsigned `2^b - 1`
    ref-seq-calib    (d) activation steps initialised on the partly quantized network: one forward with every
                     quantizer on, each activation quantizer initialised from its own (already quantized) input
                     when it is first reached, as the reference's init-on-first-forward does; vitqtool runs the
                     calibration forward in FP. Both see the same calibration images (the batches are
                     concatenated into one forward here, so mean|x| is the same average).
    ref-obr-gscale   (e) the OBR term reaches the weight step through the step's LSQ gradient scale
                     `1/sqrt(Qp ||W||_1)`, as in the reference (the value is unchanged; only d OBR / d s shrinks)

Setup = benchmarks/ladder.py's: the demo's FP model (DEMO, seed 0), stored soft labels (DEMO.label_crops crops per
image), QAT with the `vaq` recipe and DEMO's augmentation, `--epochs` epochs, batch DEMO.qat_batch_size, lr
DEMO.qat_lr, DEMO.qat_crops_per_image crops per image, DEMO.calib_batches calibration batches; the last
checkpoint's validation top-1 is reported (nothing is selected on validation).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import math
import multiprocessing as mp
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
from benchmarks.report_md import publish  # noqa: E402

VARIANTS = ("vaq", "ref-drop-path", "ref-unsigned-qp", "ref-seq-calib", "ref-obr-gscale")
LABELS = {
    "vaq": "**vaq** (vitqtool: no drop path, unsigned Qp, FP calibration, OBR at full strength)",
    "ref-drop-path": "(b) drop_path_rate 0.1 during QAT",
    "ref-unsigned-qp": "(c) unsigned steps initialised with the signed Qp",
    "ref-seq-calib": "(d) calibration on the partly quantized network",
    "ref-obr-gscale": "(e) OBR's step gradient scaled by the LSQ grad scale",
}


# --------------------------------------------------------------------------- the reference's choices, as patches


def patch(variant: str) -> None:
    """Switch this (worker) process to the reference's choice for `variant`."""
    import torch

    if variant == "vaq":
        return
    if variant == "ref-drop-path":
        from vitqtool.core import models

        create = models._create

        def _create(name, pretrained, kwargs, pretrained_cfg=None):
            return create(name, pretrained, {**kwargs, "drop_path_rate": 0.1}, pretrained_cfg)

        models._create = _create
        return
    if variant == "ref-unsigned-qp":
        from vitqtool.quant.lsq import LSQQuantizer

        original = LSQQuantizer.init_from_statistic

        @torch.no_grad()
        def init_from_statistic(self, value):
            if self.spec.signed:
                return original(self, value)
            self.step.fill_(2 * float(value) / math.sqrt(2 ** (self.spec.bits - 1) - 1))
            self.project_()
            self.mark_initialized()

        LSQQuantizer.init_from_statistic = init_from_statistic
        return
    if variant == "ref-seq-calib":
        from vitqtool import quant
        from vitqtool.quant.calibrate import init_weight_steps, iter_quantizers

        @torch.no_grad()
        def calibrate(model, batches, forward=None):
            init_weight_steps(model)
            images = torch.cat(list(batches))
            act = {name: q for name, q in iter_quantizers(model) if q.kind == "act"}
            seen: dict[str, float] = {}
            hooks = []
            for name, q in act.items():
                def hook(mod, args, name=name):
                    if name not in seen:  # first time reached: init from the (partly quantized) input, then quantize
                        seen[name] = float(mod.activation_statistic(args[0]))
                        mod.init_from_statistic(seen[name])
                hooks.append(q.register_forward_pre_hook(hook))
            was_training = model.training
            model.eval()
            try:
                (forward or (lambda m, x: m(x)))(model, images)
            finally:
                for h in hooks:
                    h.remove()
                model.train(was_training)
            missing = [n for n in act if n not in seen]
            if missing:
                raise ValueError(f"calibration never reached {missing[:5]}")
            return seen

        quant.calibrate = calibrate
        return
    if variant == "ref-obr-gscale":
        from vitqtool.quant import obr

        original = obr._layer_obr

        class _Scaled:
            """The layer seen by OBR with a step whose value is unchanged but whose gradient is scaled."""

            def __init__(self, layer):
                self.weight, self._q = layer.weight, layer.w_quant
                self.w_quant = self

            @property
            def spec(self):
                return self._q.spec

            def scale_for(self, w):
                s = self._q.scale_for(w)
                g = self._q.grad_scale(w)
                g = g.view_as(s).to(s.dtype) if isinstance(g, torch.Tensor) else g
                return (s - s * g).detach() + s * g

        obr._layer_obr = lambda layer: original(_Scaled(layer))
        return
    raise ValueError(variant)


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    logging.disable(logging.WARNING)
    patch(job["variant"])
    from vitqtool.commands import quantize
    from vitqtool.core import read_run_info

    out = Path(job["out"])
    start = time.perf_counter()
    reused = (out / "run.json").is_file() and read_run_info(out).status == "done"
    if not reused:
        ov = Path(job["out"] + ".toml")
        ov.parent.mkdir(parents=True, exist_ok=True)
        ov.write_text(job["overrides"])
        quantize(job["fp"], bits=job["bits"], recipe="vaq", out=out, overwrite=True, overrides=[ov], seed=job["seed"],
                 batch_size=job["batch_size"], epochs=job["epochs"], lr=job["lr"], calib_batches=job["calib_batches"],
                 soft_labels=Path(job["soft_labels"]))
    info = read_run_info(out)
    return {"variant": job["variant"], "bits": job["bits"], "seed": job["seed"], "top1": info.last_top1,
            "seconds": round(time.perf_counter() - start, 1), "reused": reused, "run": str(out)}


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each (default 1)")
    p.add_argument("--fp", type=Path, default=None, help="FP model folder (default: train DEMO's into WORK/fp)")
    p.add_argument("--soft-labels", type=Path, default=None, help="soft-label store of that model (default: WORK/softlabels)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vitqtool-vaq-reference")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    a = p.parse_args(argv)
    from vitqtool.demo import DEMO

    seeds = [int(s) for s in a.seeds.split(",") if s]
    variants = [v for v in a.variants.split(",") if v]
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import torch

    if a.fp is None:
        from vitqtool.commands import train_fp

        a.fp = a.work / "fp"
        if not (a.fp / "config.json").is_file():
            torch.set_num_threads(DEMO.threads)
            train_fp(DEMO.architecture, a.fp, data=DEMO.data, model_args=dict(DEMO.model_args), epochs=DEMO.fp_epochs,
                     batch_size=DEMO.fp_batch_size, lr=DEMO.fp_lr, weight_decay=DEMO.fp_weight_decay,
                     warmup_epochs=DEMO.fp_warmup_epochs, scale=DEMO.scale, ratio=DEMO.ratio, hflip=DEMO.hflip, seed=DEMO.seed)
    if a.soft_labels is None:
        from vitqtool.commands import softlabels

        a.soft_labels = a.work / "softlabels"
        if not (a.soft_labels / "manifest.json").is_file():
            torch.set_num_threads(DEMO.threads)
            softlabels(str(a.fp), a.soft_labels, DEMO.data, crops=DEMO.label_crops, topk=DEMO.label_topk, scale=DEMO.scale,
                       ratio=DEMO.ratio, hflip=DEMO.hflip, seed=0, batch_size=DEMO.label_batch_size, overwrite=True)
    overrides = (f"[augment]\nscale = {list(DEMO.scale)}\nratio = {list(DEMO.ratio)}\nhflip = {str(DEMO.hflip).lower()}\n\n"
                 f'[kd]\nmode = "stored"\ncrops_per_image = {DEMO.qat_crops_per_image}\n')
    runs = a.work / f"runs-w{a.bits}-e{a.epochs}"
    jobs = [{"variant": v, "bits": a.bits, "seed": s, "out": str(runs / f"{v}-s{s}"), "fp": str(a.fp),
             "soft_labels": str(a.soft_labels), "overrides": overrides, "epochs": a.epochs, "lr": DEMO.qat_lr,
             "batch_size": DEMO.qat_batch_size, "calib_batches": DEMO.calib_batches, "threads": DEMO.threads}
            for s in seeds for v in variants]
    records = []
    # one fresh process per run: the patches of one variant must never leak into the next run
    with cf.ProcessPoolExecutor(max_workers=max(1, a.jobs), mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_one, j): j for j in jobs}
        for fut in cf.as_completed(futures):
            r = fut.result()
            records.append(r)
            print(f"[vaq_reference] {len(records)}/{len(jobs)} {r['variant']:>16} seed {r['seed']}: top-1 {r['top1']:.2f} "
                  f"({r['seconds']:.0f} s{', reused' if r['reused'] else ''})", flush=True)
    wall = time.perf_counter() - t0
    by = {v: [r["top1"] for r in sorted(records, key=lambda r: r["seed"]) if r["variant"] == v] for v in variants}
    cmd = "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:]))
    lines = [(f"W{a.bits}A{a.bits} top-1 (%) on the 1,000 held-out validation digits, seeds {seeds} (per seed, then mean ± std); "
              f"QAT `vaq`, {a.epochs} epoch(s) of 4,000 images, batch {DEMO.qat_batch_size}, lr {DEMO.qat_lr}, "
              f"{DEMO.qat_crops_per_image} stored crops/image, {DEMO.calib_batches} calibration batches; FP model "
              f"`{a.fp}`; last checkpoint reported."), "",
             "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | vs vaq (mean) |",
             "|---|" + "---|" * (len(seeds) + 2)]
    base = statistics.fmean(by["vaq"]) if by.get("vaq") else None
    for v in variants:
        vals = by[v]
        diff = f"{statistics.fmean(vals) - base:+.2f}" if base is not None and vals and v != "vaq" else "–"
        lines.append(f"| {LABELS[v]} | " + " | ".join(f"{x:.2f}" for x in vals) + f" | {fmt(vals)} | {diff} |")
    lines += ["", (f"Command: `{cmd}` — wall time {wall / 60:.1f} min on {os.cpu_count()} CPU cores "
                   f"(Python {platform.python_version()}, torch {torch.__version__}, {a.jobs} job(s), 1 thread each).")]
    publish(lines, a.md, {"runs": records, "wall_seconds": round(wall, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
