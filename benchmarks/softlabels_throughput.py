"""Soft-label generation throughput (crops/s) and store size on the built-in data; not a test.

    python benchmarks/softlabels_throughput.py [--images 200] [--crops 32] [--threads 1] [--workers 0 2]

Random-init tiny teachers (no download); the numbers measure the pipeline (crop replay + teacher
forward + top-k + shard writing), not label quality.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from vitqtool.data import load_dataset  # noqa: E402
from vitqtool.core.models import resolve_model  # noqa: E402
from vitqtool.train.softlabels import bytes_per_crop, generate_soft_labels  # noqa: E402

TEACHERS = {
    "vit_tiny (64-d, depth 2, 32px)": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}),
    "deit_tiny (32px, patch 4)": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "num_classes": 10}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--crops", type=int, default=32)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
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
                                           topk=args.topk, batch_size=args.batch_size, num_workers=workers)
                seconds = time.perf_counter() - start
                size = sum(f.stat().st_size for f in out.iterdir())
            print(f"{label:34s} workers={workers}: {n_crops / seconds:8.0f} crops/s  ({seconds:.2f} s, "
                  f"{size / n_crops:.1f} bytes/crop on disk incl. headers)")


if __name__ == "__main__":
    main()
