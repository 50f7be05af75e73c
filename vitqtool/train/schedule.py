"""The training loops' optimizer (AdamW) and learning-rate schedule: linear warmup, then cosine decay to `min_lr`
(method.md §7)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def adamw(params: Iterable[Any], lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over `params` (tensors or param groups), with torch's fused kernel where the parameters' device has one.

    The fused update is one kernel per step instead of about ten ops per tensor (QAT adds a step per quantizer;
    `benchmarks/optimizer_step.py`); it rounds differently from the per-tensor loop in the last bits, and every
    run uses the same one, so resumed runs stay bitwise.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device (or dtype) without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


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
