"""The `vitqtool demo` pipeline over several seeds: FP / W4A4 / W2A2 top-1 per seed and the wall time.

    python benchmarks/demo_seeds.py                               # DEMO, seeds 0,1,2, 1 thread
    python benchmarks/demo_seeds.py --seeds 0 --threads 2         # thread dependence of one seed
    python benchmarks/demo_seeds.py --qat-epochs 1,3 --md out.md  # another QAT schedule (per entry of DEMO.qat_bits)

Each seed runs `vitqtool.demo.demo(WORK/seed-S, config=replace(DEMO, seed=S, ...))`: the seed changes the
FP model's initialisation and data order as well as the QAT runs (the FP model is trained once per seed and
reused for both bit widths; a later call with the same FP settings reuses it from WORK, and the table says
so). Every figure is the final evaluation on the 1,000 held-out validation digits; nothing is selected on them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report_md import publish  # noqa: E402


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.replace(" ", "").split(",") if t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: DEMO.threads)")
    p.add_argument("--qat-epochs", default=None, help="QAT epochs per entry of DEMO.qat_bits, e.g. 2,2 (default: DEMO's)")
    p.add_argument("--retrain", action="store_true", help="train the FP models even when WORK holds matching ones")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vitqtool-demo-seeds",
                   help="one demo folder per seed (default: TMPDIR/vitqtool-demo-seeds)")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown table to this file")
    a = p.parse_args(argv)

    import torch

    from vitqtool.demo import DEMO, demo

    cfg = DEMO
    if a.threads is not None:
        cfg = replace(cfg, threads=a.threads)
    if a.qat_epochs:
        cfg = replace(cfg, qat_epochs=parse_ints(a.qat_epochs))
    seeds = parse_ints(a.seeds)
    names = ["FP"] + [f"W{b}A{b}" for b in cfg.qat_bits]
    rows = []
    t0 = time.perf_counter()
    for s in seeds:
        doc = demo(a.work / f"seed-{s}", config=replace(cfg, seed=s), retrain=a.retrain)
        top1 = {m["model"]: m["top1"] for m in doc["models"]}
        steps = {r["step"]: r["seconds"] for r in doc["steps"]}
        rows.append((s, top1, doc["total_seconds"], doc["fp_cached"], steps))
        print(f"[demo_seeds] seed {s}: " + " ".join(f"{n} {top1[n]:.2f}" for n in names)
              + f" ({doc['total_seconds']:.0f} s{', FP reused' if doc['fp_cached'] else ''})", flush=True)
    wall = time.perf_counter() - t0

    cmd = "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:]))
    sched = ", ".join(f"W{b}A{b} {e} epoch(s)" for b, e in zip(cfg.qat_bits, cfg.qat_epochs))
    lines = [(f"`vitqtool demo` pipeline per seed: FP {cfg.fp_epochs} epochs, QAT ({cfg.recipe}, stored soft labels) {sched}, "
              f"lr {cfg.qat_lr}, batch {cfg.qat_batch_size}, {cfg.qat_crops_per_image} crops/image, {cfg.threads} torch "
              f"thread(s). Top-1 (%) on the 1,000 held-out validation digits."), "",
             "| seed | " + " | ".join(names) + " | W4A4 >= W2A2 | demo wall s | FP trained here |",
             "|---|" + "---|" * (len(names) + 3)]
    for s, top1, secs, cached, _ in rows:
        ok = top1.get("W4A4", 0) >= top1.get("W2A2", 0)
        lines.append(f"| {s} | " + " | ".join(f"{top1[n]:.2f}" for n in names)
                     + f" | {'yes' if ok else 'NO'} | {secs:.0f} | {'no (reused)' if cached else 'yes'} |")
    lines += ["", "Per-step seconds: " + "; ".join(
        f"seed {s}: " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items()) for s, _, _, _, steps in rows)]
    lines += ["", (f"Command: `{cmd}` — wall time {wall / 60:.1f} min in all on {os.cpu_count()} CPU cores "
                   f"({platform.processor() or platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}).")]
    publish(lines, a.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
