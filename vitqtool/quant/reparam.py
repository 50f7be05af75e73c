"""Scale reparameterization of a norm's output (after RepQ-ViT, Li et al., ICCV 2023), pure torch.

Post-LayerNorm activations vary strongly across channels, which a per-tensor activation step cannot
follow. Measuring each channel's range on calibration data and writing the norm output as
`y' = (y - t) / r` (per channel `c`: shift `t_c`, scale `r_c > 0`) gives every channel the same range,
while the next Linear layers absorb the change exactly: `W y + b = (W diag(r)) y' + (W t + b)`. So
the norm's affine becomes `gamma / r`, `(beta - t) / r`, every following Linear's weight `W diag(r)`
and bias `b + W t`: the FP function is unchanged, the activation quantizer stays per-tensor, and the
weights stay ordinary weights for any weight quantizer and export format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .calibrate import run_fp_observed

MIN_RELATIVE_RANGE = 1e-3  # a channel's scale is at least this share of the mean (dead channels: no huge weight columns)


@torch.no_grad()
def channel_ranges(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[Tensor],
                   forward: Callable[[nn.Module, Tensor], object] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel (last dimension) minimum and maximum of each module's input over FP forwards of `batches`.

    Under `torch.distributed` the ranges are reduced over every process, so all ranks fold the same factors.
    Raises ValueError when a module never ran.
    """
    low: dict[str, Tensor] = {}
    high: dict[str, Tensor] = {}

    def hook_for(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            lo, hi = x.amin(0), x.amax(0)
            low[name] = torch.minimum(low[name], lo) if name in low else lo
            high[name] = torch.maximum(high[name], hi) if name in high else hi
        return hook

    run_fp_observed(model, {mod: hook_for(name) for name, mod in modules.items()}, batches, forward)
    missing = [name for name in modules if name not in high]
    if missing:
        raise ValueError(f"calibration batches never reached: {', '.join(missing[:5])}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for name in modules:
            both = torch.cat([high[name], -low[name]]).to(next(model.parameters()).device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            high[name], low[name] = both[: high[name].numel()].cpu(), -both[high[name].numel():].cpu()
    return {name: (low[name], high[name]) for name in modules}


def channel_factors(low: Tensor, high: Tensor, shift: bool, strength: float = 1.0) -> tuple[Tensor, Tensor]:
    """(scale r, shift t) per channel that map every channel's range `[low, high]` onto one common range.

    With `shift`, each channel is centred (`t = (low + high) / 2`) and scaled by its half-width; without
    it (`t = 0`) by its largest magnitude. `r` is normalised to mean 1 over channels (the per-tensor range
    stays the mean channel's) and floored at MIN_RELATIVE_RANGE; `strength` in [0, 1] takes `r ** strength`
    (1: equal ranges, 0: no scaling).
    """
    low, high = low.double(), high.double()
    if shift:
        centre, half = (high + low) / 2, (high - low) / 2
    else:
        centre, half = torch.zeros_like(low), torch.maximum(high.abs(), low.abs())
    mean = half.mean()
    if not bool(mean > 0):
        return torch.ones_like(half), centre
    scale = (half / mean).clamp(min=MIN_RELATIVE_RANGE) ** strength
    return scale, centre


@torch.no_grad()
def fold_norm_scale_(norm_weight: Tensor, norm_bias: Tensor | None, linears: Iterable[tuple[Tensor, Tensor | None]],
                     scale: Tensor, shift: Tensor) -> None:
    """Fold `y' = (y - shift) / scale` into a norm's affine and `y = scale * y' + shift` into the Linears it feeds.

    In place: `gamma /= r`, `beta = (beta - t) / r`, for each (weight, bias): `bias += W t`, then `W *= r`
    (columns). A nonzero shift needs a norm bias and a bias on every Linear (ValueError otherwise).
    Computed in float64 and stored in each tensor's own dtype.
    """
    has_shift = bool((shift != 0).any())
    linears = list(linears)
    if has_shift and (norm_bias is None or any(b is None for _, b in linears)):
        raise ValueError("a shift needs a norm bias and a bias on every following Linear")
    r, t = scale.double(), shift.double()
    for weight, bias in linears:
        w = weight.double()
        if has_shift and bias is not None:  # (a None bias with a shift was refused above)
            bias.copy_((bias.double() + w @ t).to(bias.dtype))
        weight.copy_((w * r).to(weight.dtype))
    if norm_bias is not None:
        norm_bias.copy_(((norm_bias.double() - t) / r).to(norm_bias.dtype))
    norm_weight.copy_((norm_weight.double() / r).to(norm_weight.dtype))
