"""Benchmark: one training step, FP vs vitqtool QAT as `quantize` trains it (default, eager, --compile).

A step is forward + loss + backward + AdamW (as the training loops build it, `train.schedule.adamw`: torch's fused
kernel) on one fixed random batch, train mode; a QAT step then also does what the `quantize` loop does after each
update (quantizer step floors, the oscillation tracker of the vaq recipe). The loss is cross-entropy for every configuration, so the table compares
the models' cost, not the KD recipe (`w4-kd` adds the online teacher and the OBR term).

    qat       vaq W4A4, quantizers as `quantize` trains by default (fused kernels where they equal eager)
    eager     vaq W4A4 with --eager-quantizers (the reference arithmetic)
    compile   vaq W4A4 with --compile (torch.compile of the QAT model; the quantizers eager inside it)
    fp        the timm FP model;  fp-compile: torch.compile of it (for reference)
    w2, w4-kd vaq W2A2; W4A4 + online KD teacher + OBR (default quantizers)

Timing: every configuration lives in a process of its own (`--one-process`: all in one); after the
warm-up steps, taken one configuration after the other (where the compiled ones compile: the first
step's time is reported as the cold start, with an empty compiler cache unless --warm-cache), they
take turns one step at a time (order rotated every turn), so load from other processes hits all
alike; the table shows the median wall and process-CPU time per step and their ratios to FP (CPU
time is the steadier one on a shared machine), the lowest and highest CPU ratio of a configuration's step
to the FP step of the same turn (the spread within the run), and each process's peak memory. Several `--sizes`
run one after the other in the same invocation.

    python benchmarks/qat_step.py --sizes 32 224 --batch 32              # deit_tiny-shaped, 1 thread (the README's run)
    python benchmarks/qat_step.py --sizes 224 --configs fp qat eager --batch 8
    python benchmarks/qat_step.py --device cuda --batch 64 --sizes 224   # GPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CONFIGS = ("fp", "qat", "eager", "compile", "fp-compile", "w2", "w4-kd")
DEFAULT_CONFIGS = ("fp", "qat", "eager", "compile", "fp-compile")
NAMES = {"fp": "FP (timm)", "qat": "QAT W4A4 (default)", "eager": "QAT W4A4 eager", "compile": "QAT W4A4 --compile",
         "fp-compile": "FP torch.compile", "w2": "QAT W2A2 (default)", "w4-kd": "QAT W4A4 + KD + OBR"}
SIZES = {32: {"img_size": 32, "patch_size": 4, "num_classes": 10}, 224: {"img_size": 224, "num_classes": 1000}}


def build_step(args: argparse.Namespace, config: str, size: int):
    """The model of `config` at `size` px (same random init and batch for all) and a closure running one training step."""
    import torch
    import torch.nn.functional as F

    from vitqtool.core import calibrate, prepare
    from vitqtool.core.models import resolve_model
    from vitqtool.quant import OscillationTracker, check_fused_kernels, iter_quantizers, obr_loss, quant_layers, set_quantizers_fused
    from vitqtool.recipe import load_recipe
    from vitqtool.train.losses import kd_loss
    from vitqtool.train.schedule import adamw

    torch.manual_seed(0)
    margs = SIZES[size]
    model = resolve_model(args.model, random_init=True, model_args=margs).model.to(args.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=gen).to(args.device)
    y = torch.randint(0, margs["num_classes"], (args.batch,), generator=gen).to(args.device)
    teacher, quantizers, tracker = None, [], None
    if not config.startswith("fp"):
        teacher = model.eval().requires_grad_(False) if config == "w4-kd" else None
        recipe = load_recipe("vaq", set_fields={"quant.bits": 2 if config == "w2" else 4})
        model = prepare(model, recipe)  # a copy: the teacher keeps FP weights
        calibrate(model, [x])
        if config not in ("eager", "compile"):
            try:  # what `quantize` checks before it picks the fused kernels by default
                check_fused_kernels(args.device)
                set_quantizers_fused(model, True)
            except Exception as exc:  # noqa: BLE001 - as `quantize`: no working compiler or another result means eager
                print(f"{config}: eager quantizers ({type(exc).__name__}: {exc})", flush=True)
        quantizers = [q for _, q in iter_quantizers(model)]
        o = recipe.oscillation
        fused = any(q.fused for q in quantizers)  # as `quantize`: the tracker's update compiled with the quantizers
        tracker = OscillationTracker(model, momentum=o.momentum, threshold=o.threshold, freeze=o.freeze, fused=fused)
    model.train()
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    layers = [m for _, m in quant_layers(model)] if teacher is not None else []
    run = torch.compile(model) if config.endswith("compile") else model

    def step() -> None:
        logits = run(x)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
            loss = kd_loss(logits, target) + 0.005 * obr_loss(layers)
        else:
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for q in quantizers:
            q.project_()
        if tracker is not None:
            tracker.update()

    return step


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(step, device: str) -> tuple[float, float]:
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _worker(args: argparse.Namespace, size: int, conn) -> None:
    """Host some configurations in this process and run their steps on request from `race` (see there)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {}
    while True:
        command, config = conn.recv()
        if command == "build":  # build, time the first step (the cold start), run the other warm-up steps
            steps[config] = build_step(args, config, size)
            cold = _timed(steps[config], args.device)
            for _ in range(args.warmup - 1):
                steps[config]()
            conn.send(cold)
        elif command == "step":
            conn.send(_timed(steps[config], args.device))
        elif command == "peak":  # this process's peak memory, MiB
            cuda = args.device.startswith("cuda")
            conn.send(torch.cuda.max_memory_allocated() / 2**20 if cuda else _vm_hwm_mib())
        else:
            return


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def race(args: argparse.Namespace, size: int) -> tuple[dict, dict, dict, dict]:
    """Warm every configuration up (first step = cold start), one after the other, then time them in turns, one step each.

    Each configuration lives in a process of its own, as a user's run does: in one shared process a step inherits
    the heap the other configurations' steps left, which a user's run never sees (at 224 px a QAT step that followed
    an FP step faulted in 28,500 pages, alone 10,000). `--one-process` hosts them all in one process instead.
    Returns (cold-start (wall, cpu), wall seconds per step, CPU seconds per step, peak MiB or None) per
    configuration; peak memory is a configuration's own only with a process of its own.
    """
    ctx = mp.get_context("spawn")
    groups = [list(args.configs)] if args.one_process else [[c] for c in args.configs]
    workers, host = [], {}
    for group in groups:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(args, size, child), daemon=True)
        proc.start()
        workers.append((proc, parent))
        host.update({c: parent for c in group})
    cold = {}
    for c in args.configs:
        host[c].send(("build", c))
        cold[c] = host[c].recv()
    walls: dict[str, list[float]] = {c: [] for c in args.configs}
    cpus: dict[str, list[float]] = {c: [] for c in args.configs}
    order = list(args.configs)
    for turn in range(args.steps):
        k = turn % len(order)
        for c in order[k:] + order[:k]:
            host[c].send(("step", c))
            wall, cpu = host[c].recv()
            walls[c].append(wall)
            cpus[c].append(cpu)
    peaks: dict[str, float | None] = dict.fromkeys(args.configs)
    if not args.one_process:
        for c in args.configs:
            host[c].send(("peak", c))
            peaks[c] = host[c].recv()
    for proc, conn in workers:
        conn.send(("stop", None))
        proc.join()
    return cold, walls, cpus, peaks


def main() -> None:
    """Parse flags, race the configurations at every size, print a table per size (or one JSON document)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--sizes", type=int, nargs="+", choices=sorted(SIZES), default=[224],
                   help="32: patch 4, 10 classes; 224: the model's own patch 16, 1000 classes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration, the first one the cold start")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch default)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS))
    p.add_argument("--warm-cache", action="store_true", help="keep torch.compile's on-disk cache (default: a fresh one)")
    p.add_argument("--one-process", action="store_true",
                   help="host every configuration in one process (default: a process each, as users run them)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.warm_cache:  # the cold start a first run sees (set before torch reads it)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="qat_step_inductor_")
    import torch

    if "fp" not in args.configs:
        args.configs = ["fp", *args.configs]  # ratios need the FP baseline
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for size in args.sizes:
        cold, walls, cpus, peaks = race(args, size)
        fp_wall, fp_cpu = statistics.median(walls["fp"]), statistics.median(cpus["fp"])
        rows = []
        for c in args.configs:
            wall, cpu = statistics.median(walls[c]), statistics.median(cpus[c])
            turn_ratios = sorted(a / b for a, b in zip(cpus[c], cpus["fp"], strict=True))  # each turn's CPU time / FP's
            rows.append({"config": c, "name": NAMES[c], "wall_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu, "wall_ratio": wall / fp_wall,
                         "cpu_ratio": cpu / fp_cpu, "turn_cpu_ratio_range": (turn_ratios[0], turn_ratios[-1]),
                         "img_per_s": args.batch / wall, "cold_start_s": cold[c][0],
                         "cold_start_cpu_s": cold[c][1], "peak_mib": peaks[c]})
        results.append({"size": size, "model_args": SIZES[size], "rows": rows})
    if args.json:
        print(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "results": results}, indent=2))
        return
    for result in results:
        print(f"\n{args.model} {result['size']} px {result['model_args']}, batch {args.batch}, {args.device}, "
              f"{torch.get_num_threads()} thread(s); median of {args.steps} round-robin steps after {args.warmup} warm-up; "
              f"cold start = first step ({'warm' if args.warm_cache else 'empty'} compiler cache)")
        print(f"{'config':22} {'wall ms':>9} {'x FP':>6} {'CPU ms':>9} {'x FP':>6} {'turns x FP':>11} {'img/s':>7} {'cold start wall/CPU s':>22} "
              f"{'peak MiB':>9}")
        for r in result["rows"]:
            peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
            cold = f"{r['cold_start_s']:.1f} / {r['cold_start_cpu_s']:.1f}"
            turns = "{:.2f}-{:.2f}".format(*r["turn_cpu_ratio_range"])
            print(f"{r['name']:22} {r['wall_ms']:9.1f} {r['wall_ratio']:5.2f}x {r['cpu_ms']:9.1f} {r['cpu_ratio']:5.2f}x {turns:>11} "
                  f"{r['img_per_s']:7.1f} {cold:>22} {peak}")


if __name__ == "__main__":
    main()
