"""Benchmark: one training step, FP vs vitqtool QAT (vaq W4A4 / W2A2, eager and fused quantizers).

A step is forward + loss + backward + AdamW on one fixed random batch, train mode. "W4A4 + KD + OBR"
also runs the FP teacher (online KD loss) and the OBR term, as the `quantize` loop does once OBR is
ramped on. "fused" is `quantize --fuse-quantizers` (each fake quantizer one torch.compile'd kernel per
direction; compiled during the warm-up steps).

Timing: every configuration lives in ONE process; after the warm-up steps they take turns one step at
a time (order rotated every turn), so load from other processes hits all alike; the table shows the
median. Peak memory: a fresh process per configuration runs the warm-up steps and reports its peak
(CPU: peak resident set, VmHWM, imports and model included; CUDA: `torch.cuda.max_memory_allocated`).

    python benchmarks/qat_step.py                                  # deit_tiny, 224 px, batch 8, 1 thread
    python benchmarks/qat_step.py --img-size 32 --patch-size 4 --num-classes 10 --batch 32
    python benchmarks/qat_step.py --device cuda --batch 64          # GPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CONFIGS = ("fp", "w4", "w2", "w4-full", "w4-fused", "w2-fused", "w4-full-fused")
NAMES = {"fp": "FP (timm)", "w4": "vaq W4A4", "w2": "vaq W2A2", "w4-full": "W4A4 + KD + OBR",
         "w4-fused": "vaq W4A4 fused", "w2-fused": "vaq W2A2 fused", "w4-full-fused": "W4A4 + KD + OBR fused"}


def build_step(args: argparse.Namespace, config: str):
    """The model of `config` (same random init and batch for all) and a closure running one training step."""
    import torch
    import torch.nn.functional as F

    from vitqtool.core import calibrate, prepare
    from vitqtool.core.models import resolve_model
    from vitqtool.quant import obr_loss, quant_layers, set_quantizers_fused
    from vitqtool.train.losses import kd_loss

    torch.manual_seed(0)
    margs = {"img_size": args.img_size, "num_classes": args.num_classes}
    if args.patch_size:
        margs["patch_size"] = args.patch_size
    model = resolve_model(args.model, random_init=True, model_args=margs).model.to(args.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(args.device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(args.device)
    teacher = None
    if config != "fp":
        teacher = model.eval().requires_grad_(False) if "full" in config else None
        model = prepare(model, "vaq", bits=2 if config.startswith("w2") else 4)  # a copy: the teacher keeps FP weights
        calibrate(model, [x])
        set_quantizers_fused(model, config.endswith("fused"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    layers = [m for _, m in quant_layers(model)] if teacher is not None else []

    def step() -> None:
        logits = model(x)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
            loss = kd_loss(logits, target) + 0.005 * obr_loss(layers)
        else:
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def race(args: argparse.Namespace) -> dict[str, list[float]]:
    """Warm every configuration up, then time them in turns, one step each; returns seconds per step."""
    steps = {c: build_step(args, c) for c in args.configs}
    for c, step in steps.items():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {c: [] for c in steps}
    order = list(steps)
    for turn in range(args.steps):
        k = turn % len(order)
        for c in order[k:] + order[:k]:
            _sync(args.device)
            start = time.perf_counter()
            steps[c]()
            _sync(args.device)
            times[c].append(time.perf_counter() - start)
    return times


def _peak_memory_worker(args: argparse.Namespace, config: str, queue) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    step = build_step(args, config)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        queue.put(torch.cuda.max_memory_allocated() / 2**20)
    else:  # ru_maxrss would also count the parent's peak before exec; VmHWM is this process's own
        queue.put(_vm_hwm_mib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def peak_memory(args: argparse.Namespace, config: str) -> float:
    """Peak memory (MiB) of `config`'s warm-up steps, in a fresh process so no other config's peak counts."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_worker, args=(args, config, queue))
    proc.start()
    peak = queue.get()
    proc.join()
    return peak


def main() -> None:
    """Parse flags, race the configurations, measure their memory, print a table (or JSON)."""
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=0, help="override the model's patch size (0: keep)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (the fused ones compile here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch default)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if "fp" not in args.configs:
        args.configs = ["fp", *args.configs]  # ratios need the FP baseline
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = {c: None if args.no_memory else peak_memory(args, c) for c in args.configs}  # before the race fills this process
    times = race(args)
    fp_ms = 1e3 * statistics.median(times["fp"])
    rows = []
    for c, t in times.items():
        ms = 1e3 * statistics.median(t)
        rows.append({"config": c, "name": NAMES[c], "median_ms": ms, "min_ms": 1e3 * min(t), "ratio_to_fp": ms / fp_ms,
                     "img_per_s": args.batch / (ms / 1e3), "peak_mib": peaks[c]})
    if args.json:
        print(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "rows": rows}, indent=2))
        return
    patch = f" patch {args.patch_size}" if args.patch_size else ""
    print(f"{args.model} {args.img_size} px{patch}, batch {args.batch}, {args.device}, {torch.get_num_threads()} thread(s); "
          f"median of {args.steps} round-robin steps after {args.warmup} warm-up")
    print(f"{'config':24} {'median ms':>10} {'min ms':>8} {'img/s':>7} {'x FP':>6} {'peak MiB':>9}")
    for r in rows:
        peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        print(f"{r['name']:24} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['img_per_s']:7.1f} {r['ratio_to_fp']:5.2f}x {peak}")


if __name__ == "__main__":
    main()
