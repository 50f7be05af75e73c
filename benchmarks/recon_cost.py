"""What block-wise reconstruction (`ptq-recon`) costs per block on this CPU, for the demo models and real ViT sizes.

    nice python benchmarks/recon_cost.py                 # demo ViT, demo ResNet block, DeiT-T and DeiT-S at 224 px, 1 thread
    python benchmarks/recon_cost.py --threads 2 --steps 10

For one block of each model (random weights: the cost does not depend on them), with `--threads` torch threads, in
process CPU seconds (steadier than wall time on a shared machine; with one thread they are the compute time; the
median wall time per step is in the JSON record):
- learning: `--steps` reconstruction steps of `reconstruct.batch_size` images (forward + backward through the block with
  soft rounding, both optimisers), median of `--repeats` timings -> seconds per 1,000 images passed through the block,
  and per block at the recipe's `reconstruct.iters` steps;
- caching: the block's forward over 1,000 images (done once per block for the quantized and once for the FP stream);
- the cache size of one activation stream per 1,000 images (three streams live at a time, four briefly).
Writes OUT/recon_cost.md and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

from benchmarks.report_md import publish  # noqa: E402
from vitqtool import core, quant  # noqa: E402
from vitqtool.demo import DEMO  # noqa: E402
from vitqtool.families import get_family  # noqa: E402
from vitqtool.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # label -> (timm name, args, input size)
    "demo ViT (28 px, 17 tokens x 96)": (DEMO.architecture, DEMO.model_args, 28),
    "demo ResNet-10 block (28 px)": ("resnet18", {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16,
                                                  "num_classes": 10}, 28),
    "DeiT-T (224 px, 197 tokens x 192)": ("deit_tiny_patch16_224", {}, 224),
    "DeiT-S (224 px, 197 tokens x 384)": ("deit_small_patch16_224", {}, 224),
}


def measure(name: str, args: dict, size: int, steps: int, repeats: int) -> dict:
    """Seconds per learning step and per 1,000 cached images for the first block of the model."""
    settings = load_recipe("ptq-recon").reconstruct
    model = core.prepare(timm.create_model(name, **args).eval(), load_recipe("ptq-recon", set_fields={"quant.bits": 4}))
    family = get_family(model)
    images = torch.randn(8, 3, size, size)
    core.calibrate(model, [images])
    with torch.no_grad():
        x = family.block_inputs(model, images)[0]
    block = model.get_submodule(family.block_names(model)[0])
    batch = settings.batch_size
    inputs = x[:1].expand(batch, *x.shape[1:]).contiguous() + torch.randn(batch, *x.shape[1:]) * 0.1
    with torch.no_grad():
        targets = block(inputs)
    cfg = dataclasses.replace(settings, iters=steps)
    learn, learn_wall, cache = [], [], []
    for r in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        quant.reconstruct_block(block, inputs, inputs, targets, cfg, torch.Generator().manual_seed(r))
        learn.append((time.process_time() - cpu) / steps)
        learn_wall.append((time.perf_counter() - wall) / steps)
    with torch.no_grad():
        for _ in range(repeats):
            cpu = time.process_time()
            for _ in range(2):
                block(inputs)
            cache.append((time.process_time() - cpu) / (2 * batch) * 1000)
    step = statistics.median(learn)
    return {"step_s": step, "step_wall_s": statistics.median(learn_wall), "per_1k_images_s": step / batch * 1000,
            "per_block_s": step * settings.iters, "cache_per_1k_s": statistics.median(cache),
            "stream_mb_per_1k": x[0].numel() * 4 * 1000 / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed reconstruction steps per repeat (default 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recon_cost.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    settings = load_recipe("ptq-recon").reconstruct
    rows = {label: measure(*spec, a.steps, a.repeats) for label, spec in MODELS.items()}
    lines = [f"Block-wise reconstruction cost per block, first block of each model, W4A4 layout, {a.threads} torch thread(s), "
             f"process CPU seconds, median of {a.repeats} timings of {a.steps} steps of {settings.batch_size} images; "
             "x86-64 machine with 2 cores shared with other jobs.", "",
             f"| model | CPU s per step | CPU s per 1,000 images (learning) | CPU s per block ({settings.iters} steps) | "
             "CPU s per 1,000 images (caching, per stream) | MB per 1,000 images per stream |", "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['step_s']:.3f} | {r['per_1k_images_s']:.1f} | {r['per_block_s']:.0f} | "
                     f"{r['cache_per_1k_s']:.2f} | {r['stream_mb_per_1k']:.0f} |")
    lines += ["", f"Command: `python benchmarks/recon_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    publish(lines, a.out, {"threads": a.threads, "steps": a.steps, "repeats": a.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
