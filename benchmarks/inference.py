"""Benchmark: inference latency, file size and peak memory of exported models on the CPU.

Contenders, per model: the FP32 ONNX baseline a user would compare against (the stock timm model
exported by `torch.onnx.export`, TorchScript exporter, opset 20, dynamic batch) and the W8A8 / W4A4 /
W2A2 QDQ ONNX graphs (`export --format onnx`) in onnxruntime, and `vitqtool.load` of the W4A4
safetensors export in torch (fake quantization in float32: its cost does not depend on the bit
width). Models are random-init timm models at 224 px (1000 classes), calibrated on 16 builtin:mnist5k
images; only speed and size are measured here (the tests measure agreement on trained models), plus
the largest logit difference of each graph against its torch model on those images as a sanity check.

Timing: for each model and thread count all contenders live in one process and take turns, one run
each (order rotated every turn), so load from other processes hits all alike; the table gives the
median. Peak memory: a fresh process per contender loads the file and runs one batch (VmHWM: peak
resident set, interpreter and imports included). Goals: quantized ONNX >= 1.5x faster than FP32
ONNX at batch 32, W2A2 ONNX file >= 8x smaller than FP32 ONNX; where the speed goal is missed (or
with --profile) the onnxruntime per-operator profile of both graphs is printed.

    python benchmarks/inference.py --threads 1 --batches 1 32 --profile --out benchmarks/results/inference.md   # ~21 min on 2 shared cores
    python benchmarks/inference.py --models resnet50 --batches 32 --threads 1 --reps 2 --bits 4
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SPEED_FLOOR = 1.5  # quantized ONNX vs the FP32 ONNX baseline at the largest batch
SPEED_GOAL = 2.5
SIZE_GOAL = 8.0


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def memory_child(kind: str, path: str, batch: int, size: int) -> None:
    """Load one contender, run one batch on one thread, print its peak resident memory (MiB) as JSON."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    if kind == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})
    else:
        import torch

        import vitqtool

        torch.set_num_threads(1)
        with torch.no_grad():
            vitqtool.load(path)(torch.from_numpy(x))
    print(json.dumps({"peak_mib": _vm_hwm_mib()}))


def peak_memory(kind: str, path: Path, batch: int, size: int) -> float | None:
    """Peak MiB of a fresh process running `kind` on `path` (None when the child fails)."""
    cmd = [sys.executable, __file__, "--memory-child", kind, str(path), str(batch), str(size)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])
    except (IndexError, ValueError, KeyError):
        print(f"memory child failed for {path}: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None


def fp32_baseline(model, path: Path, input_size) -> None:
    """The stock model as `torch.onnx.export` writes it (TorchScript exporter, opset 20, dynamic batch)."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model.eval(), (torch.zeros(1, *input_size),), str(path), dynamo=False, opset_version=20,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def build(model_name: str, bits_list: list[int], folder: Path) -> dict:
    """Random-init model, calibrated; the torch.onnx FP32 baseline, per-bit QDQ ONNX and safetensors exports; sanity logit diffs."""
    import torch

    from vitqtool import core
    from vitqtool.core.models import resolve_model
    from vitqtool.data import load_dataset, make_eval_loader
    from vitqtool.export import export_model, export_onnx_model
    from vitqtool.export.onnx_export import verify_onnx
    from vitqtool.recipe import load_recipe

    torch.manual_seed(0)
    loaded = resolve_model(model_name, random_init=True)
    cfg = loaded.data_config
    images = next(iter(make_eval_loader(load_dataset("builtin:mnist5k", "train"), cfg, 16)))[0]
    kw = dict(architecture=loaded.architecture, model_args=loaded.model_args, data_config=cfg)
    fp32_baseline(loaded.model, folder / "fp32.onnx", cfg["input_size"])
    files: dict[str, dict] = {"fp32": {"onnx": folder / "fp32.onnx",
                                       "max_abs_diff": verify_onnx(loaded.model, folder / "fp32.onnx", [images[:8]])["max_abs_diff"]}}
    for bits in bits_list:
        recipe = load_recipe("vaq", set_fields={"quant.bits": bits})
        model = core.prepare(loaded.model, recipe)
        core.calibrate(model, [images])
        st, ox = folder / f"w{bits}.safetensors", folder / f"w{bits}.onnx"
        export_model(model, st, recipe=recipe, **kw)
        summary = export_onnx_model(model, ox, recipe=recipe, **kw)
        with torch.no_grad():
            diff = verify_onnx(model, ox, [images[:8]])["max_abs_diff"]
        files[f"w{bits}"] = {"onnx": ox, "safetensors": st, "max_abs_diff": diff, "kernels": summary["kernels"]}
    return {"files": files, "input_size": cfg["input_size"]}


def race(contenders: dict, inputs: dict, threads: int, reps: dict[int, int]) -> dict[tuple[str, int], list[float]]:
    """Time every contender on every batch size: one warm-up run, then `reps` rotated turns; seconds per run."""
    import torch

    times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    torch.set_num_threads(threads)
    for batch, x in inputs.items():
        for run in contenders.values():
            run(x)
        order = list(contenders)
        for turn in range(reps[batch]):
            k = turn % len(order)
            for name in order[k:] + order[:k]:
                start = time.perf_counter()
                contenders[name](x)
                times[(name, batch)].append(time.perf_counter() - start)
    return times


def contenders_for(built: dict, threads: int, torch_bits: int) -> dict:
    """name -> callable(batch as numpy) for the ONNX sessions and the torch `vitqtool.load` model."""
    import torch

    import vitqtool
    from vitqtool.export.onnx_export import onnx_session

    runs = {}
    for name, f in built["files"].items():
        session = onnx_session(f["onnx"], threads)
        runs[f"{name} onnx"] = (lambda s: lambda x: s.run(None, {"input": x}))(session)
    if f"w{torch_bits}" in built["files"]:
        model = vitqtool.load(built["files"][f"w{torch_bits}"]["safetensors"]).eval()

        def torch_run(x, model=model):
            with torch.no_grad():
                model(torch.from_numpy(x))
        runs[f"w{torch_bits} torch"] = torch_run
    return runs


def op_profile(path: Path, x, threads: int) -> tuple[dict[str, float], float]:
    """onnxruntime per-operator-type kernel time (ms) of one profiled run after a warm-up, and their total."""
    from vitqtool.export.onnx_export import onnx_session

    session = onnx_session(path, threads, profile=True)
    session.run(None, {"input": x})
    session.run(None, {"input": x})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    agg: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= last_start:
            agg[e["args"]["op_name"]] += e["dur"] / 1e3
    return dict(agg), sum(agg.values())


def main() -> None:
    """Parse flags, build the exports, race and measure, print the tables (and write --out)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "resnet50"])
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4, 2])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--reps", type=int, default=3, help="timed runs per contender at the largest batch (10x more at batch 1)")
    p.add_argument("--torch-bits", type=int, default=4, help="bit width of the vitqtool.load (torch) contender")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--profile", action="store_true", help="print the per-operator profile of the --torch-bits graph even where the floor is met")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the exported files here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="also write the report (markdown) to this file")
    p.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        kind, path, batch, size = args.memory_child
        memory_child(kind, path, int(batch), int(size))
        return
    import numpy as np
    import onnxruntime
    import torch

    started = time.time()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    say(f"# Inference benchmark (`benchmarks/inference.py`)\n\n`python {shlex.join(['benchmarks/inference.py', *sys.argv[1:]])}`\n")
    say(f"CPU: {cpu}, {os.cpu_count()} cores, shared with other jobs while this ran (load average at start "
        f"{os.getloadavg()[0]:.1f}); onnxruntime {onnxruntime.__version__}, torch {torch.__version__}; median of {args.reps} "
        f"rotated runs at batch {max(args.batches)} ({10 * args.reps} at smaller batches), 1 warm-up each; contenders take turns, "
        "so load from other processes hits all alike, but absolute times are noisy.\n")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vitq-bench-"))
    goals = []
    for model_name in args.models:
        folder = work / model_name
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        built = build(model_name, args.bits, folder)
        size = int(built["input_size"][-1])
        rng = np.random.default_rng(0)
        inputs = {b: rng.standard_normal((b, 3, size, size), dtype=np.float32) for b in args.batches}
        reps = {b: args.reps if b == max(args.batches) else 10 * args.reps for b in args.batches}
        sizes = {name: f["onnx"].stat().st_size for name, f in built["files"].items()}
        torch_name = f"w{args.torch_bits} torch"
        torch_file = built["files"].get(f"w{args.torch_bits}", {}).get("safetensors")
        say(f"## {model_name} ({size} px, random init; exports built in {time.time() - t0:.0f} s)\n")
        say("| contender | file MB | size vs FP32 ONNX | max logit diff vs its torch model | kernels of the quantized layers |")
        say("|---|---|---|---|---|")
        for name, f in built["files"].items():
            diff = f.get("max_abs_diff")
            kernels = ", ".join(f"{k} {v}" for k, v in f.get("kernels", {}).items()) or "-"
            say(f"| {name} ONNX | {sizes[name] / 1e6:.2f} | {sizes['fp32'] / sizes[name]:.1f}x | {'-' if diff is None else f'{diff:.2g}'} | "
                f"{kernels} |")
        if torch_file:
            say(f"| {torch_name} (`vitqtool.load`, .safetensors) | {torch_file.stat().st_size / 1e6:.2f} | "
                f"{sizes['fp32'] / torch_file.stat().st_size:.1f}x | - | - |")
        if "w2" in sizes:
            goals.append((f"{model_name}: W2A2 ONNX file {sizes['fp32'] / sizes['w2']:.1f}x smaller than FP32 ONNX",
                          sizes["fp32"] / sizes["w2"] >= SIZE_GOAL, SIZE_GOAL))
        say()
        peaks: dict[tuple[str, int], float | None] = {}
        if not args.no_memory:
            for batch in args.batches:
                for name, f in built["files"].items():
                    peaks[(f"{name} onnx", batch)] = peak_memory("onnx", f["onnx"], batch, size)
                if torch_file:
                    peaks[(torch_name, batch)] = peak_memory("torch", torch_file, batch, size)
        say("| threads | batch | contender | median ms | img/s | speed-up vs FP32 ONNX | peak MiB (1 thread) |")
        say("|---|---|---|---|---|---|---|")
        missed = []
        for threads in args.threads:
            runs = contenders_for(built, threads, args.torch_bits)
            times = race(runs, inputs, threads, reps)
            for batch in args.batches:
                fp_ms = 1e3 * statistics.median(times[("fp32 onnx", batch)])
                for name in runs:
                    ms = 1e3 * statistics.median(times[(name, batch)])
                    peak = peaks.get((name, batch))
                    bold = "**" if name.endswith("onnx") and name != "fp32 onnx" and batch == max(args.batches) else ""
                    say(f"| {threads} | {batch} | {name} | {ms:.1f} | {batch / ms * 1e3:.1f} | {bold}{fp_ms / ms:.2f}x{bold} | "
                        f"{'-' if peak is None else f'{peak:.0f}'} |")
                    if batch == max(args.batches) and name.endswith("onnx") and name != "fp32 onnx":
                        ok = fp_ms / ms >= SPEED_FLOOR
                        goals.append((f"{model_name}, batch {batch}, {threads} thread(s): {name.split()[0].upper()} ONNX "
                                      f"{fp_ms / ms:.2f}x faster than FP32 ONNX (goal {SPEED_GOAL:g}x "
                                      f"{'met' if fp_ms / ms >= SPEED_GOAL else 'not met'})", ok, SPEED_FLOOR))
                        if not ok or (args.profile and threads == min(args.threads) and name.startswith(f"w{args.torch_bits} ")):
                            missed.append((threads, name))
            del runs
        say()
        for threads, name in missed:
            x = inputs[max(args.batches)]
            q_key = name.split()[0]
            prof_fp, tot_fp = op_profile(built["files"]["fp32"]["onnx"], x, threads)
            prof_q, tot_q = op_profile(built["files"][q_key]["onnx"], x, threads)
            say(f"onnxruntime per-operator kernel time, {model_name}, batch {max(args.batches)}, {threads} thread(s): "
                f"FP32 {tot_fp:.0f} ms vs {q_key.upper()} {tot_q:.0f} ms (one profiled run)\n")
            say(f"| op type | FP32 ms | FP32 % | {q_key.upper()} ms | {q_key.upper()} % |")
            say("|---|---|---|---|---|")
            for op in sorted(set(prof_fp) | set(prof_q), key=lambda o: -max(prof_fp.get(o, 0), prof_q.get(o, 0)))[:14]:
                a, b = prof_fp.get(op, 0.0), prof_q.get(op, 0.0)
                say(f"| {op} | {a:.1f} | {100 * a / tot_fp:.1f} | {b:.1f} | {100 * b / tot_q:.1f} |")
            say()
    say("## Floors\n")
    for text, ok, goal in goals:
        say(f"- {'met' if ok else 'MISSED'}: {text} (floor >= {goal:g}x)")
    say(f"\nTotal wall time {time.time() - started:.0f} s.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
