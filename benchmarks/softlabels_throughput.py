"""Soft-label generation throughput (crops/s) and store size on the built-in data; not a test.

    python benchmarks/softlabels_throughput.py [--images 200] [--crops 32] [--threads 1] [--workers 0 2]
    python benchmarks/softlabels_throughput.py --processes 1 2 --images 400 --crops 16 --repeats 3

Random-init tiny teachers (no download); the numbers measure the pipeline (crop replay + teacher
forward + top-k + shard writing), not label quality.

`--processes`: `accelerate launch --multi_gpu --num_processes N -m vitqtool softlabels` per N (one
torch thread per process), plus one process with as many threads as the largest N, in rotating turns
(`--repeats` rounds); prints the median crops/s the command reports (labelling only) and the median
wall time of the whole launch (process start-up included), and checks that every store is bitwise
the first one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from vitqtool.core.models import resolve_model  # noqa: E402
from vitqtool.data import load_dataset  # noqa: E402
from vitqtool.train.softlabels import bytes_per_crop, generate_soft_labels  # noqa: E402

TEACHERS = {
    "vit_tiny (64-d, depth 2, 32px)": ("vit_tiny_patch16_224",
                                       {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}),
    "deit_tiny (32px, patch 4)": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "num_classes": 10}),
}
LAUNCH_TEACHER = "deit_tiny (32px, patch 4)"


def in_process(args: argparse.Namespace) -> None:
    """Every teacher x worker count in this process."""
    torch.set_num_threads(args.threads)
    dataset = load_dataset("builtin:mnist5k", "train")
    subset = torch.utils.data.Subset(dataset, range(min(args.images, len(dataset))))
    n_crops = len(subset) * args.crops
    print(f"{len(subset)} images x {args.crops} crops, top-{args.topk}, batch {args.batch_size}, "
          f"torch threads {args.threads}, {bytes_per_crop(args.topk)} bytes/crop")
    for label, (name, model_args) in TEACHERS.items():
        loaded = resolve_model(name, random_init=True, model_args=model_args)
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                out = generate_soft_labels(loaded.model, subset, loaded.data_config, Path(tmp) / "labels", args.crops,
                                           topk=args.topk, batch_size=args.batch_size, num_workers=workers).out
                seconds = time.perf_counter() - start
                size = sum(f.stat().st_size for f in out.iterdir())
            print(f"{label:34s} workers={workers}: {n_crops / seconds:8.0f} crops/s  ({seconds:.2f} s, "
                  f"{size / n_crops:.1f} bytes/crop on disk incl. headers)")


def _launch(processes: int, threads: int, args: argparse.Namespace, out: Path, port: int) -> tuple[dict, float]:
    """One `vitqtool softlabels` run on `processes` processes of `threads` torch threads; (its JSON report, wall s)."""
    name, model_args = TEACHERS[LAUNCH_TEACHER]
    command = ["-m", "vitqtool", "softlabels", name, "--random-init", "--model-args", json.dumps(model_args),
               "--limit", str(args.images), "--crops", str(args.crops), "--topk", str(args.topk), "--batch-size",
               str(args.batch_size), "--images-per-shard", str(args.images_per_shard), "--out", str(out), "--json"]
    if processes > 1:
        command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout), wall


def across_processes(args: argparse.Namespace) -> None:
    """`--processes`: launches in rotating turns; median labelling crops/s and launch wall time per configuration."""
    widest = max(args.processes)
    configs = [(n, 1) for n in args.processes] + ([(1, widest)] if widest > 1 else [])
    crops_per_s: dict = {c: [] for c in configs}
    walls: dict = {c: [] for c in configs}
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for turn in range(args.repeats):
            k = turn % len(configs)
            for processes, threads in configs[k:] + configs[:k]:
                out = Path(tmp) / f"store-{processes}x{threads}-{turn}"
                report, wall = _launch(processes, threads, args, out, 29600 + turn)
                crops_per_s[(processes, threads)].append(report["crops_per_second"])
                walls[(processes, threads)].append(wall)
                store = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
                reference = reference or store
                if store != reference:
                    raise SystemExit(f"the store of {processes} process(es) x {threads} thread(s) differs from the first one")
        shards = len(reference) - 1
    print(f"{LAUNCH_TEACHER} teacher, builtin:mnist5k: {args.images} images x {args.crops} crops, top-{args.topk}, "
          f"batch {args.batch_size}, {shards} shards; median of {args.repeats} rotating rounds; every store bitwise equal")
    print(f"{'processes x threads':>20} {'crops/s (labelling)':>20} {'launch wall s':>14}")
    for processes, threads in configs:
        print(f"{f'{processes} x {threads}':>20} {statistics.median(crops_per_s[(processes, threads)]):20.0f} "
              f"{statistics.median(walls[(processes, threads)]):14.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--crops", type=int, default=32)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--processes", type=int, nargs="+", help="launch `vitqtool softlabels` on these process counts")
    parser.add_argument("--images-per-shard", type=int, default=20, help="with --processes: the unit the processes split")
    parser.add_argument("--repeats", type=int, default=3, help="with --processes: rounds of launches")
    args = parser.parse_args()
    across_processes(args) if args.processes else in_process(args)


if __name__ == "__main__":
    main()
