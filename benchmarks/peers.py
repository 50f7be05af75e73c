"""QAT training-step speed and peak memory: vitqtool `vaq` W4A4 vs torchao QAT vs Brevitas vs FP timm.

    python benchmarks/peers.py                                   # deit_tiny, 224 px, batch 8
    python benchmarks/peers.py --img-size 32 --batch 32 --model-args '{"patch_size": 4, "num_classes": 10}'
    python benchmarks/peers.py --profile vitqtool                # torch.profiler table of one contender
    options: --model --img-size --batch --steps --warmup --repeats --threads --device --contenders --json

One QAT step = forward + cross-entropy on random labels + backward + AdamW step, train mode, the same
random-init model (copied into every contender), the same batch, the same process and threads.
Timing: every contender lives in ONE process; after `--warmup` untimed steps each, the contenders take
turns one step at a time (round-robin, the order rotated every turn) until each has `--steps` x
`--repeats` timed steps; the table reports the median step, so load from other processes hits every
contender alike. Peak memory (CPU): a fresh subprocess per contender builds it, records its resident
set, resets the kernel's high-water mark and reports how far two training steps push it (`step MB`,
the memory a training step needs on top of the built model, batch and imports; the second step is the
first with gradients, AdamW state and activations all alive) and the absolute peak (`RSS MB`). On
`--device cuda` memory is torch.cuda.max_memory_allocated over the warm-up steps, in-process.
Wall clock and process CPU time are both reported: on a shared machine CPU time is the steadier of the two.

torchao and Brevitas are optional benchmark extras (never vitqtool runtime dependencies): a missing
one prints a skip line. What each contender quantizes differs, and the output states it; the numbers
compare the cost of each library's closest W4A4-style QAT layout, not identical arithmetic.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CONTENDERS = ("fp", "vitqtool", "vitqtool-fused", "torchao", "brevitas")
LABELS = {"fp": "FP (timm)", "vitqtool": "vitqtool vaq W4A4", "vitqtool-fused": "vitqtool vaq W4A4 --fuse-quantizers",
          "torchao": "torchao QAT W4/A8",
          "brevitas": "brevitas W4A4"}


class Skip(Exception):
    """A contender cannot run here (optional package missing or unsupported); the message says why."""


# ----------------------------------------------------------------------------------------------- build

def make_fp(args: argparse.Namespace) -> nn.Module:
    """The stock timm model, random init with a fixed seed (identical in every process)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(args.model, pretrained=False, img_size=args.img_size, **args.model_args)


def make_batch(args: argparse.Namespace, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen)
    y = torch.randint(0, num_classes, (args.batch,), generator=gen)
    return x.to(args.device), y.to(args.device)


def build_fp(fp: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, str]:
    return copy.deepcopy(fp), "nothing: stock timm model (fused scaled_dot_product_attention)"


def build_vitqtool(fp: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, str]:
    from vitqtool import core

    model = core.prepare(fp, recipe="vaq", bits=4)  # deep copy
    core.calibrate(model, [x])
    rows = core.quant_summary(model)
    layers = [r for r in rows if r["weight_bits"] is not None]
    acts = [r for r in rows if r["type"] == "activation"]
    by_bits: dict[int, list[str]] = {}
    for r in layers:
        by_bits.setdefault(r["weight_bits"], []).append(re.sub(r"^(layers\.\d+\.)?(blocks\.\d+\.)?", "", r["name"]))
    weights = "; ".join(f"{len(v)} layers W{b} ({', '.join(sorted(set(v)))})" for b, v in sorted(by_bits.items()))
    n_in = sum(1 for r in layers if r["act_bits"] is not None)
    kinds = sorted({re.sub(r"^(layers\.\d+\.)?(blocks\.\d+\.)?", "", r["name"]) for r in acts})
    return model, (f"LSQ learned per-tensor steps (backprop through the steps). Weights: {weights}. "
                   f"Activations: the inputs of {n_in} of those layers (A4 in blocks, A8 at patch embed/head; "
                   f"fc2 input unsigned with learned offset) plus {len(acts)} standalone A4 quantizers "
                   f"({', '.join(kinds)}). Attention is un-fused "
                   f"(explicit softmax) so Q/K/V/softmax can be quantized; Q/K/V projections split.")


def build_vitqtool_fused(fp: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, str]:
    from vitqtool.quant import set_quantizers_fused

    model, what = build_vitqtool(fp, x, args)
    set_quantizers_fused(model, True)
    return model, what + " Each fake quantizer runs as one torch.compile'd kernel per direction (compiled in warm-up)."


def build_torchao(fp: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, str]:
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except Exception as exc:  # noqa: BLE001 - ImportError or a torch/torchao version clash
        raise Skip(f"torchao not importable ({type(exc).__name__}: {exc})") from None
    model = copy.deepcopy(fp)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if args.torchao_group:
        bad = sorted({m.in_features for m in linears if m.in_features % args.torchao_group})
        if bad:
            raise Skip(f"in_features {bad} not divisible by --torchao-group {args.torchao_group}; use --torchao-group 0")
        wcfg = IntxFakeQuantizeConfig(torch.int4, group_size=args.torchao_group, is_symmetric=True)
        wdesc = f"per-group (group {args.torchao_group})"
    else:
        wcfg = IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True)
        wdesc = "per-output-channel"
    acfg = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    quantize_(model, QATConfig(activation_config=acfg, weight_config=wcfg, step="prepare"))
    return model, (f"every nn.Linear ({len(linears)}: fused qkv, proj, fc1, fc2, head) -> FakeQuantizedLinear: "
                   f"int4 symmetric {wdesc} weights, int8 asymmetric per-token dynamic input activations; "
                   f"scales recomputed from min/max every step (no learned scales). Not quantized: patch-embed "
                   f"conv, Q/K/V, softmax, attention matmuls (timm's fused SDPA kept).")


def build_brevitas(fp: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, str]:
    try:
        from brevitas.graph.calibrate import calibration_mode
        from brevitas.nn import QuantLinear
        from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"brevitas not importable ({type(exc).__name__}: {exc})") from None
    model = copy.deepcopy(fp)
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = QuantLinear(child.in_features, child.out_features, bias=child.bias is not None,
                            weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4,
                            input_quant=Int8ActPerTensorFloat, input_bit_width=4,
                            device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                q.weight.copy_(child.weight)
                if child.bias is not None:
                    q.bias.copy_(child.bias)
            setattr(parent, name, q)
            n += 1
    # Initialise the learned input scales from one batch, as vitqtool's calibrate does; otherwise the
    # timed steps would all sit in Brevitas's 300-step statistics-collection phase.
    model.eval()
    with torch.no_grad(), calibration_mode(model):
        model(x)
    return model, (f"every nn.Linear ({n}: fused qkv, proj, fc1, fc2, head) -> brevitas QuantLinear: 4-bit narrow "
                   f"per-tensor weights (Int8WeightPerTensorFloat, scale from max|W| each step), 4-bit signed "
                   f"per-tensor inputs (Int8ActPerTensorFloat, learned scale, calibrated on one batch). Not quantized: "
                   f"patch-embed conv, Q/K/V, softmax, attention matmuls (timm's fused SDPA kept).")


BUILDERS = {"fp": build_fp, "vitqtool": build_vitqtool, "vitqtool-fused": build_vitqtool_fused, "torchao": build_torchao,
            "brevitas": build_brevitas}


class Runner:
    """One contender: its model, AdamW optimizer and a `step()` that runs one QAT training step."""

    def __init__(self, name: str, model: nn.Module, what: str, x: torch.Tensor, y: torch.Tensor, device: str) -> None:
        self.name, self.what, self.x, self.y, self.device = name, what, x, y, device
        self.model = model.to(device).train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.times: list[float] = []  # wall seconds per timed step
        self.cpu: list[float] = []  # process CPU seconds per timed step (all threads)
        self.peak_mb: float | None = None

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def timed_step(self) -> None:
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        sync()
        cpu, start = time.process_time(), time.perf_counter()
        self.step()
        sync()
        self.times.append(time.perf_counter() - start)
        self.cpu.append(time.process_time() - cpu)


def build_runner(name: str, fp: nn.Module, args: argparse.Namespace) -> Runner:
    num_classes = fp.num_classes
    x, y = make_batch(args, num_classes)
    fp = fp.to(args.device)
    model, what = BUILDERS[name](fp, x, args)
    return Runner(name, model, what, x, y, args.device)


# ---------------------------------------------------------------------------------------------- memory

def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_worker(name: str, args: argparse.Namespace) -> dict:
    """In a fresh process: build `name`, then measure how far warm-up + one step push the resident set."""
    import resource

    fp = make_fp(args)
    runner = build_runner(name, fp, args)
    del fp
    gc.collect()
    rss = _proc_status_mb("VmRSS")
    try:  # Linux >= 4.0: "5" resets the peak-RSS high-water mark, so build-time transients do not count
        Path("/proc/self/clear_refs").write_text("5")
        reset = _proc_status_mb("VmHWM") is not None
    except OSError:
        reset = False
    if not reset or rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(2):  # the second step is the first with AdamW state, gradients and activations all alive
        runner.step()
    peak = _proc_status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_mb": max(0.0, peak - rss), "rss_mb": peak, "hwm_reset": reset}


def measure_memory_subprocess(name: str, args: argparse.Namespace) -> dict:
    cfg = {k: v for k, v in vars(args).items() if k not in ("json", "memory_worker", "config", "profile")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", name, "--_config", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- profile

def profile(name: str, args: argparse.Namespace, top: int = 15) -> dict:
    """torch.profiler over `--steps` steps of one contender: top ops by self CPU and the LSQ fake-quant share."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile

    fp = make_fp(args)
    runner = build_runner(name, fp, args)
    lsq_tag = "LSQQuantizer.forward"
    if name.startswith("vitqtool"):  # tag the quantizer forward (benchmark process only; vitqtool code unchanged)
        from vitqtool.quant.lsq import LSQQuantizer

        original = LSQQuantizer.forward

        def tagged(self, x):
            with record_function(lsq_tag):
                return original(self, x)
        LSQQuantizer.forward = tagged
    for _ in range(args.warmup):
        runner.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with tprofile(activities=activities) as prof:
        for _ in range(args.steps):
            with record_function("qat_step"):
                runner.step()
    events = prof.key_averages()
    total_us = sum(e.cpu_time_total for e in events if e.key == "qat_step")
    self_total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    table = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "self_pct": 100 * e.self_cpu_time_total / self_total,
              "calls": e.count} for e in rows]
    fwd = sum(e.cpu_time_total for e in events if e.key == lsq_tag)
    bwd = sum(e.cpu_time_total for e in events if e.key.endswith("LSQFakeQuantBackward") and e.key.startswith("autograd::engine"))
    if bwd == 0:
        bwd = sum(e.cpu_time_total for e in events if e.key in ("_LSQFakeQuantBackward", "_FusedLSQFakeQuantBackward"))
    return {"contender": name, "steps": args.steps, "step_ms": total_us / 1e3 / args.steps, "top": table,
            "lsq_forward_ms_per_step": fwd / 1e3 / args.steps, "lsq_backward_ms_per_step": bwd / 1e3 / args.steps,
            "lsq_share_pct": 100 * (fwd + bwd) / total_us if total_us else None}


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--model-args", type=json.loads, default={},
                   help='JSON kwargs for timm.create_model, e.g. \'{"patch_size": 4, "num_classes": 10}\'')
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before timing")
    p.add_argument("--repeats", type=int, default=2, help="rounds; each round every contender does --steps timed steps, one at a time in turn")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared, loaded machine 2+ threads spin in OpenMP "
                        "barriers and every step gets several times slower; use 0 for torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--torchao-group", type=int, default=32, help="torchao int4 weight group size; 0 = per-channel")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile", choices=CONTENDERS, default=None, help="profile one contender instead of the race")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout, nothing else there")
    p.add_argument("--_memory-worker", dest="memory_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_config", dest="config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.config:
        for k, v in json.loads(args.config).items():
            setattr(args, k, v)
    if "fp" not in args.contenders:
        args.contenders = ["fp", *args.contenders]  # ratios need the FP baseline
    return args


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "timm", "torchao", "brevitas", "vitqtool"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def race(args: argparse.Namespace, log) -> dict:
    fp = make_fp(args)
    runners: list[Runner] = []
    skipped: dict[str, str] = {}
    for name in args.contenders:
        try:
            runners.append(build_runner(name, fp, args))
        except Skip as exc:
            skipped[name] = str(exc)
            log(f"skip {name}: {exc}")
    cuda = args.device.startswith("cuda")
    for r in runners:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        for _ in range(args.warmup):
            r.step()
        if cuda:
            torch.cuda.synchronize()
            r.peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
        log(f"warmed up {r.name}")
    for rnd in range(args.repeats):
        for i in range(args.steps):  # one step each, in turn, the order rotated every turn
            k = (rnd * args.steps + i) % len(runners)
            for r in runners[k:] + runners[:k]:
                r.timed_step()
        log(f"round {rnd + 1}/{args.repeats}: " + ", ".join(f"{r.name} {1e3 * statistics.median(r.times):.0f} ms" for r in runners))
    memory: dict[str, dict] = {}
    if not cuda and not args.no_memory:
        for r in runners:
            memory[r.name] = measure_memory_subprocess(r.name, args)
            log(f"memory {r.name}: {memory[r.name]}")
    fp_ms = statistics.median(runners[0].times) * 1e3
    fp_cpu = statistics.median(runners[0].cpu) * 1e3
    results = []
    for r in runners:
        ms = statistics.median(r.times) * 1e3
        cpu = statistics.median(r.cpu) * 1e3
        mem = memory.get(r.name, {})
        results.append({
            "contender": r.name, "label": LABELS[r.name], "median_step_ms": ms,
            "min_step_ms": min(r.times) * 1e3, "max_step_ms": max(r.times) * 1e3, "n_steps": len(r.times),
            "img_per_s": args.batch / (ms / 1e3), "ratio_vs_fp": ms / fp_ms,
            "median_cpu_ms": cpu, "cpu_ratio_vs_fp": cpu / fp_cpu,
            "peak_step_mb": r.peak_mb if cuda else mem.get("step_mb"), "peak_rss_mb": mem.get("rss_mb"),
            "memory_error": mem.get("error"), "quantizes": r.what,
        })
    by = {r["contender"]: r for r in results}
    goals = {}
    for variant in ("vitqtool", "vitqtool-fused"):
        if variant not in by:
            continue
        v = by[variant]
        peers = [p for p in ("torchao", "brevitas") if p in by]
        goals[variant] = {}
        for key, ratio, ms in (("wall", "ratio_vs_fp", "median_step_ms"), ("cpu", "cpu_ratio_vs_fp", "median_cpu_ms")):
            faster = {p: v[ms] < by[p][ms] for p in peers}
            goals[variant][key] = {"fp_ratio": v[ratio], "fp_ratio_le_1_3": v[ratio] <= 1.3, "faster_than": faster,
                                   "faster_than_both_peers": len(peers) == 2 and all(faster.values())}
    return {"setup": {"model": args.model, "img_size": args.img_size, "model_args": args.model_args, "batch": args.batch,
                      "steps_per_round": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "device": args.device,
                      "torchao_group": args.torchao_group, "versions": versions()},
            "results": results, "skipped": skipped, "goals": goals}


def print_report(report: dict) -> None:
    s = report["setup"]
    print(f"QAT step (fwd + CE + bwd + AdamW), {s['model']} {s['img_size']}px {s['model_args'] or ''} batch {s['batch']}, "
          f"{s['device']}, {s['threads']} threads; median of {s['repeats']} round-robin rounds x {s['steps_per_round']} steps "
          f"after {s['warmup']} warm-up")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items()))
    mem_hdr = "step MB" if s["device"] == "cpu" else "peak MB"
    print(f"{'contender':36s} {'median ms':>10s} {'min-max ms':>14s} {'img/s':>8s} {'vs FP':>6s} "
          f"{'CPU ms':>8s} {'vs FP':>6s} {mem_hdr:>8s} {'RSS MB':>7s}")
    for r in report["results"]:
        peak = f"{r['peak_step_mb']:.0f}" if r["peak_step_mb"] is not None else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        print(f"{r['label']:36s} {r['median_step_ms']:10.1f} {r['min_step_ms']:6.0f}-{r['max_step_ms']:<7.0f} "
              f"{r['img_per_s']:8.1f} {r['ratio_vs_fp']:5.2f}x {r['median_cpu_ms']:8.1f} {r['cpu_ratio_vs_fp']:5.2f}x {peak:>8s} {rss:>7s}")
    for name, why in report["skipped"].items():
        print(f"{LABELS[name]:36s} skipped: {why}")
    print("(median ms / img/s / vs FP: wall clock; CPU ms: process CPU time of the same steps, less sensitive to other load)")
    print(f"({mem_hdr}: peak resident memory of two training steps above the built model, fresh process per contender;"
          f" RSS MB: absolute peak of that process)" if s["device"] == "cpu" else "(peak MB: cuda max_memory_allocated above the resident model)")
    print("what each contender quantizes:")
    for r in report["results"]:
        print(f"  {r['label']}: {r['quantizes']}")
        if r["memory_error"]:
            print(f"    memory measurement failed: {r['memory_error']}")
    for variant, g in report["goals"].items():
        w, c = g["wall"], g["cpu"]
        print(f"{LABELS[variant]}: FP ratio <= 1.3? wall: {'yes' if w['fp_ratio_le_1_3'] else 'NO'} ({w['fp_ratio']:.2f}x); "
              f"CPU time: {'yes' if c['fp_ratio_le_1_3'] else 'NO'} ({c['fp_ratio']:.2f}x)")

        def detail(x: dict) -> str:
            return ", ".join(f"{p}: {'yes' if f else 'no'}" for p, f in x["faster_than"].items()) or "no peer ran"
        print(f"  faster than torchao and brevitas? wall: {'yes' if w['faster_than_both_peers'] else 'NO'} "
              f"({detail(w)}); CPU time: {'yes' if c['faster_than_both_peers'] else 'NO'} ({detail(c)})")


def print_profile(rep: dict) -> None:
    print(f"torch.profiler, {rep['contender']}: {rep['steps']} steps, {rep['step_ms']:.1f} ms/step (profiled)")
    print(f"{'op':60s} {'self CPU ms':>12s} {'self %':>7s} {'calls':>6s}")
    for row in rep["top"]:
        print(f"{row['op'][:60]:60s} {row['self_cpu_ms']:12.1f} {row['self_pct']:6.1f}% {row['calls']:6d}")
    if rep["lsq_share_pct"] is not None and rep["contender"].startswith("vitqtool"):
        print(f"LSQ fake quant (LSQQuantizer.forward + the fake-quant backward): "
              f"{rep['lsq_forward_ms_per_step']:.1f} + {rep['lsq_backward_ms_per_step']:.1f} ms/step = "
              f"{rep['lsq_share_pct']:.1f}% of the step")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args)))
        return
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.profile:
        rep = profile(args.profile, args)
        print(json.dumps(rep, indent=2)) if args.json else print_profile(rep)
        return
    report = race(args, log)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
