"""Step-size initialisation (method.md §2) and switches over every quantizer of a model.

Weights: MSE fixed point from the weight itself. Activations: `2 * mean|x| / sqrt(Qp)` from
calibration batches run in FP, with `mean|x|` averaged over the batches and, under
`torch.distributed`, over every process, so all ranks start from identical steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import Quantizer
from .modules import QUANT_LAYERS


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Yield `(name, quantizer)` for every quantizer in `model`."""
    for name, mod in model.named_modules():
        if isinstance(mod, Quantizer):
            yield name, mod


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` with every quantizer as the identity (FP arithmetic); restores the previous switches."""
    quantizers = [q for _, q in iter_quantizers(model)]
    previous = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield model
    finally:
        for q, was in zip(quantizers, previous):
            q.enabled = was


def set_quantizers_enabled(model: nn.Module, enabled: bool, predicate: Callable[[str, Quantizer], bool] | None = None) -> int:
    """Switch quantizers on or off (those `predicate(name, q)` selects, default all); returns how many."""
    count = 0
    for name, q in iter_quantizers(model):
        if predicate is None or predicate(name, q):
            q.enabled = enabled
            count += 1
    return count


@torch.no_grad()
def project_quantizers_(model: nn.Module) -> None:
    """Call every quantizer's `project_` (e.g. LSQ's step floor) after an optimizer step."""
    for _, q in iter_quantizers(model):
        q.project_()


def set_quantizers_fused(model: nn.Module, fused: bool) -> int:
    """Switch every quantizer to the compiled single-kernel path (`True`) or the eager one; returns how many."""
    count = 0
    for _, q in iter_quantizers(model):
        q.fused = fused
        count += 1
    return count


@torch.no_grad()
def init_weight_steps(model: nn.Module) -> int:
    """Initialise the weight scale of every quantized Linear/Conv from its weight; returns how many."""
    count = 0
    for mod in model.modules():
        if isinstance(mod, QUANT_LAYERS):
            mod.w_quant.init_from_weight(mod.weight)
            count += 1
    return count


@torch.no_grad()
def run_fp_observed(model: nn.Module, hooks: dict[nn.Module, Callable], batches: Iterable[Tensor],
                    forward: Callable[[nn.Module, Tensor], object] | None = None) -> int:
    """FP forwards (every quantizer off, eval mode) over `batches` with a forward pre-hook on each module; returns the batch count."""
    handles = [mod.register_forward_pre_hook(hook) for mod, hook in hooks.items()]
    was_training = model.training
    model.eval()
    n = 0
    try:
        with quantizers_disabled(model):
            for batch in batches:
                (forward or (lambda m, x: m(x)))(model, batch)
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return n


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor], forward: Callable[[nn.Module, Tensor], object] | None = None) -> dict[str, float]:
    """Initialise every step: weights from the weights, activations from FP forwards over `batches`.

    Returns the statistic (LSQ: mean |x|) seen by each activation quantizer, averaged over its calls (a quantizer
    of a module that runs several times per forward, e.g. a weight-shared recursive block, sees each of them)
    and across processes. Raises ValueError when `batches` is empty.
    """
    init_weight_steps(model)
    act = {name: q for name, q in iter_quantizers(model) if q.kind == "act"}
    sums: dict[str, Tensor] = {}
    calls: dict[str, int] = {}

    def hook_for(name: str) -> Callable:
        def hook(mod: Quantizer, args: tuple) -> None:
            # float64: the sum is exact, so batch splits and processes agree
            sums[name] = sums.get(name, 0.0) + mod.activation_statistic(args[0]).double()
            calls[name] = calls.get(name, 0) + 1
        return hook

    n = run_fp_observed(model, {q: hook_for(name) for name, q in act.items()}, batches, forward)
    if n == 0:
        raise ValueError("calibration needs at least one batch")
    names = sorted(sums)
    stats = (torch.stack([torch.as_tensor(sums[k] / calls[k], dtype=torch.float64) for k in names]) if names
             else torch.zeros(0, dtype=torch.float64))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = next(model.parameters()).device
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = (stats / dist.get_world_size()).cpu()
    result = {}
    for name, value in zip(names, stats.tolist()):
        act[name].init_from_statistic(value)
        result[name] = value
    missing = [name for name in act if name not in sums]
    if missing:
        raise ValueError(f"calibration batches never reached these activation quantizers: {', '.join(missing[:5])}")
    return result
