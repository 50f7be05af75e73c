"""Distillation losses (method.md §5): soft cross-entropy against stored soft labels, and online KD."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """`-sum_c p_c * log_softmax(z)_c`, averaged over rows (targets are not differentiated)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(target_probs.detach().to(log_probs.dtype) * log_probs).sum(-1).mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Online KD: soft cross-entropy of `student/T` against `softmax(teacher/T)`, times `T^2`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return soft_cross_entropy(student_logits.float() / temperature, target) * temperature**2
