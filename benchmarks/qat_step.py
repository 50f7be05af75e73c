"""Benchmark: time of one training step, FP vs fake-quant QAT (vaq W4A4 / W2A2), same model and batch.

Each configuration runs in a fresh process so its peak memory is its own (CPU: peak RSS from
getrusage; GPU: torch.cuda.max_memory_allocated). A step is forward + cross-entropy + backward +
AdamW step on random images; "vaq full" also runs the FP teacher (online KD) and the OBR term, as the
`quantize` loop does once OBR is ramped on. `--profile` prints where the W4A4 step spends its time.

    python benchmarks/qat_step.py --model deit_tiny_patch16_224 --img-size 224 --batch 16 --steps 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

CONFIGS = ("fp", "w4", "w2", "w4-full")


def _build(args: argparse.Namespace, config: str):
    import torch

    from vitqtool.api import calibrate, prepare
    from vitqtool.models import resolve_model

    torch.manual_seed(0)
    margs = {"img_size": args.img_size, "num_classes": args.num_classes}
    if args.patch_size:
        margs["patch_size"] = args.patch_size
    fp = resolve_model(args.model, random_init=True, model_args=margs).model.to(args.device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=args.device)
    if config == "fp":
        return fp.train(), None, x, y
    bits = 2 if config == "w2" else 4
    teacher = fp.eval().requires_grad_(False) if config == "w4-full" else None
    model = prepare(fp, "vaq", bits=bits)  # a copy: the teacher keeps the FP weights
    calibrate(model, [x])
    return model.train(), teacher, x, y


def _step_fn(model, teacher, x, y):
    import torch
    import torch.nn.functional as F

    from vitqtool.quant import obr_loss, quant_layers
    from vitqtool.train.losses import kd_loss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    layers = [m for _, m in quant_layers(model)] if teacher is not None else []

    def step() -> None:
        logits = model(x)
        if teacher is not None:
            with torch.no_grad():
                t = teacher(x)
            loss = kd_loss(logits, t) + 0.005 * obr_loss(layers)
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


def _run(args: argparse.Namespace, config: str, queue) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, teacher, x, y = _build(args, config)
    step = _step_fn(model, teacher, x, y)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        _sync(args.device)
        t0 = time.perf_counter()
        step()
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    queue.put({"config": config, "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "peak_mib": peak})
    if args.profile and config == "w4":
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                step()
        key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18), flush=True)


def main() -> None:
    """Parse flags, run every configuration in its own process, print a table (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=0, help="override the model's patch size (0: keep)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch default)")
    p.add_argument("--profile", action="store_true", help="print the torch.profiler table of the W4A4 step")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for config in CONFIGS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(args, config, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    fp = rows[0]["median_ms"]
    for r in rows:
        r["ratio_to_fp"] = r["median_ms"] / fp
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        return
    patch = f" patch {args.patch_size}" if args.patch_size else ""
    print(f"{args.model} img {args.img_size}{patch} batch {args.batch} device {args.device} ({args.steps} timed steps)")
    print(f"{'config':10} {'median ms':>10} {'min ms':>8} {'x FP':>6} {'peak MiB':>9}")
    names = {"fp": "FP", "w4": "vaq W4A4", "w2": "vaq W2A2", "w4-full": "W4A4+KD+OBR"}
    for r in rows:
        print(f"{names[r['config']]:10} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['ratio_to_fp']:6.2f} {r['peak_mib']:9.0f}")


if __name__ == "__main__":
    main()
