"""Oscillation-aware bin regularization (OBR, method.md §6) and its cosine ramp schedule.

Per quantized layer, with `w_c = clamp(W / s, Qn, Qp) * s` and integer codes `q = round(clamp(W / s))`:
`L_OBR = mean((stopgrad(q * s) - w_c)^2) + sum_k Var_unbiased(w_c[q == k])`, where a level counts only
with more than one member. Membership is by integer code (vitqtool), never by float equality. With a
per-channel step each channel has its own grid, so a level is a (channel, code) pair there.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .modules import QUANT_LAYERS, QConv2d, QLinear


def quant_layers(model: nn.Module, patterns: Sequence[str] | None = None) -> list[tuple[str, QLinear | QConv2d]]:
    """`(name, layer)` for every quantized Linear/Conv2d of `model` whose name matches one of the fnmatch `patterns` (default all)."""
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, QUANT_LAYERS) and (patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns))]


def _layer_obr(layer: QLinear | QConv2d) -> Tensor:
    spec = layer.w_quant.spec
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)  # half precisions are summed in float32
    w = layer.weight.to(dtype)
    s = layer.w_quant.scale_for(layer.weight).to(dtype)
    clipped = (w / s).clamp(spec.qn, spec.qp)
    w_c = clipped * s
    codes = clipped.detach().round()
    bin_term = ((codes * s).detach() - w_c).pow(2).mean()

    levels = spec.qp - spec.qn + 1
    group = (codes - spec.qn).long()
    if spec.per_channel:  # a level is (channel, code): offset each channel's codes by its own block of ids
        group = group + torch.arange(w.shape[0], device=w.device).view(-1, *([1] * (w.dim() - 1))) * levels
    group, flat = group.reshape(-1), w_c.reshape(-1)
    n_groups = levels * (w.shape[0] if spec.per_channel else 1)
    counts = torch.bincount(group, minlength=n_groups).to(flat.dtype)
    means = torch.zeros(n_groups, dtype=flat.dtype, device=flat.device).index_add(0, group, flat) / counts.clamp(min=1)
    sq_dev = torch.zeros(n_groups, dtype=flat.dtype, device=flat.device).index_add(0, group, (flat - means[group]).pow(2))
    var_term = torch.where(counts > 1, sq_dev / (counts - 1).clamp(min=1), torch.zeros_like(sq_dev)).sum()
    return bin_term + var_term


def obr_loss(layers: Iterable[QLinear | QConv2d]) -> Tensor:
    """Sum of `L_OBR` (method.md §6) over `layers`; differentiable w.r.t. each weight and weight step (plain autograd)."""
    total: Tensor | None = None
    for layer in layers:
        term = _layer_obr(layer)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def obr_lambda(progress: float, start_fraction: float = 0.25, max_lambda: float = 0.01) -> float:
    """OBR weight at `progress = step / total` in [0, 1]: 0 before `start_fraction`, then a cosine ramp to `max_lambda`."""
    if not 0 <= start_fraction < 1:
        raise ValueError(f"start_fraction must be in [0, 1), got {start_fraction}")
    progress = min(max(float(progress), 0.0), 1.0)
    if progress < start_fraction:
        return 0.0
    return max_lambda / 2 * (1 - math.cos(math.pi * (progress - start_fraction) / (1 - start_fraction)))
