"""Sensitivity wall time: the fast method (cached block inputs) against the naive one (full forward per module).

Usage: python benchmarks/sensitivity.py [--model deit_tiny_patch16_224] [--model-args JSON] [--images 32]
       [--bits 2] [--what both] [--threads 1]
Both methods run on the same quantized model (random init unless --weights) and the same images of the
built-in validation split; each includes its own FP reference pass (the fast one also caches the block
inputs). The script prints both wall times, their ratio, and whether the two rankings by KL(FP || Q)
are identical (and the largest relative KL difference).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from vitqtool import commands, core  # noqa: E402
from vitqtool.analysis.sensitivity import SensitivityProbe, build_units  # noqa: E402
from vitqtool.families import get_family  # noqa: E402
from vitqtool.data import load_dataset, make_eval_loader  # noqa: E402
from vitqtool.recipe import load_recipe  # noqa: E402


def run(method: str, model: torch.nn.Module, batches: list, units: list) -> tuple[float, list[float]]:
    """Wall seconds and per-unit KL of one method (reference pass included)."""
    start = time.perf_counter()
    probe = SensitivityProbe(model, get_family(model), batches, method)
    kl = [probe.measure(u)["kl"] for u in units]
    return time.perf_counter() - start, kl


def main() -> None:
    """Parse flags, prepare the model and data once, time both methods, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--model-args", default='{"img_size": 32, "patch_size": 4, "num_classes": 10}')
    parser.add_argument("--weights", default=None)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--what", default="both", choices=("weights", "acts", "both"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription on shared machines)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = commands.resolve_any(args.model, weights=args.weights, random_init=args.weights is None, model_args=json.loads(args.model_args))
    model = core.prepare(loaded.model, load_recipe("vaq", set_fields={"quant.bits": args.bits}), inplace=True).eval()
    core.calibrate(model, itertools.islice(make_eval_loader(load_dataset("builtin:mnist5k", "train"), loaded.data_config, args.batch_size), 1))
    n_batches = -(-args.images // args.batch_size)
    batches = list(itertools.islice(make_eval_loader(load_dataset("builtin:mnist5k", "validation"), loaded.data_config, args.batch_size), n_batches))
    units = build_units(model, args.what, get_family(model).block_names(model))
    t_fast, kl_fast = run("fast", model, batches, units)
    t_naive, kl_naive = run("naive", model, batches, units)
    rank = lambda kl: sorted(range(len(kl)), key=lambda i: -kl[i])  # noqa: E731
    same = rank(kl_fast) == rank(kl_naive)
    max_rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(kl_fast, kl_naive))
    size = "x".join(str(s) for s in loaded.data_config["input_size"][1:])
    result = {"model": args.model, "input": size, "images": sum(b[0].shape[0] for b in batches), "units": len(units),
              "what": args.what, "bits": args.bits, "threads": args.threads, "fast_s": round(t_fast, 2), "naive_s": round(t_naive, 2),
              "ratio": round(t_fast / t_naive, 3), "same_ranking": same, "max_rel_kl_diff": max_rel}
    print(f"{args.model} {size}, {result['images']} images, {len(units)} modules ({args.what}, W{args.bits}A{args.bits}), {args.threads} thread(s)")
    print(f"  fast  {t_fast:8.2f} s")
    print(f"  naive {t_naive:8.2f} s")
    print(f"  ratio {t_fast / t_naive:8.3f} (goal <= 0.5)   same ranking: {same}   max relative KL difference: {max_rel:.2e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
