"""Benchmark: one AdamW step over a QAT model's parameters, torch's per-tensor loop vs foreach vs the fused kernel.

The parameters are those `quantize` optimizes for deit_tiny (32 px, patch 4) prepared with the vaq recipe: weights,
biases, norms and one learned step per quantizer, in `quantize`'s two weight-decay groups, with random gradients.
Prints the median process-CPU time of each variant, side by side in one run, and whether each ends with the loop's
parameters bitwise (the training loops use `train.schedule.adamw`: fused where the device has the kernel).

    python benchmarks/optimizer_step.py --steps 20
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    """Time the three AdamW variants on the same parameters and gradients, in turns."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import timm
    import torch

    from vitqtool import core
    from vitqtool.train.run import _param_groups

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = core.prepare(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10), "vaq", bits=4)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    variants = {"per-tensor loop": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    runs = {}
    for name, kwargs in variants.items():
        copy_ = copy.deepcopy(model)
        for mine, theirs in zip(copy_.parameters(), model.parameters(), strict=True):
            mine.grad = theirs.grad.clone()
        runs[name] = (copy_, torch.optim.AdamW(_param_groups(copy_, 0.05), lr=1e-4, **kwargs))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.steps + 3):
        for name, (_, opt) in runs.items():
            start = time.process_time()
            opt.step()
            times[name].append(time.process_time() - start)
    reference = [p.detach() for p in runs["per-tensor loop"][0].parameters()]
    print(f"AdamW step, {sum(1 for _ in model.parameters())} tensors, {torch.get_num_threads()} thread(s), "
          f"median of {args.steps} steps after 3")
    for name, (net, _) in runs.items():
        same = all(torch.equal(a, b) for a, b in zip(reference, net.parameters(), strict=True))
        print(f"{name:16} {1e3 * statistics.median(times[name][3:]):7.1f} ms   bitwise the loop: {same}")


if __name__ == "__main__":
    main()
