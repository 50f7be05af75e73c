"""Learning-rate schedule of the QAT loop: linear warmup, then cosine decay to `min_lr` (method.md §7)."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate for optimiser step `step` (0-based) of `total_steps`.

    Warmup: `base * (step + 1) / warmup_steps` for the first `warmup_steps` steps. Then
    `min + (base - min) * (1 + cos(pi * t)) / 2` with `t = (step - warmup) / (total - warmup)`.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
