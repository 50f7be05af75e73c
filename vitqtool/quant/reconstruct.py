"""Block-wise reconstruction (BRECQ, Li et al., ICLR 2021) with learned rounding (AdaRound, Nagel et al., ICML 2020)
and optional activation dropping (QDrop, Wei et al., ICLR 2022); pure torch.

For one block: every quantized layer's weight is rounded by a learned variable instead of to nearest,
`codes = clamp(floor(W / s0) + h(V), Qn, Qp)` with the rectified sigmoid `h(V) in [0, 1]` (soft during
learning, pushed to 0 or 1 by a regulariser whose exponent anneals from 20 to 2), and the weight and
activation steps are learned jointly, all to match the FP block's output on calibration inputs. At the
end the rounding is made hard and written back as the weight itself (`W := codes * s`), so the
quantizer's nearest rounding returns exactly the learned codes: the model keeps plain integer codes and
steps, and every export format stays as it is. QDrop: during reconstruction each activation skips its
quantizer with probability `drop` (elementwise), and the block input mixes the quantized and FP inputs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from .base import Quantizer
from .calibrate import iter_quantizers
from .modules import QUANT_LAYERS, QConv2d, QLinear

PROGRESS_EVERY = 25  # iterations between progress reports: each reads the loss back from the device (a host sync)

ZETA, GAMMA = 1.1, -0.1        # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1
BETA_START, BETA_END = 20.0, 2.0


class ReconstructSettings(Protocol):
    """What one block's reconstruction reads (the recipe's [reconstruct] section has these fields).

    Read-only properties, so a frozen dataclass (the recipe section) satisfies it.
    """

    @property
    def iters(self) -> int: ...  # optimiser steps
    @property
    def batch_size(self) -> int: ...  # images per step
    @property
    def lr(self) -> float: ...  # Adam lr of the rounding variables
    @property
    def step_lr(self) -> float: ...  # Adam lr of steps and offsets (cosine to 0), relative: times each quantizer's step
    @property
    def round_weight(self) -> float: ...  # weight of the mean rounding regulariser against the relative output error
    @property
    def warmup(self) -> float: ...  # share of the steps without the regulariser
    @property
    def drop(self) -> float: ...  # QDrop probability


class SoftRounding(nn.Module):
    """Stands in for a weight quantizer during reconstruction: `clamp(floor(W / s0) + h(V)) * s` with `s` learned.

    `s0` is the step at the start; the integer part stays fixed while `s` (the wrapped quantizer's own
    step, so its gradient reaches it) moves. `h(V)` starts at the fractional part, so the first forward
    equals the FP weight inside the clamp range.
    """

    def __init__(self, quantizer: Quantizer, weight: Tensor) -> None:
        super().__init__()
        self.quantizer = quantizer
        with torch.no_grad():
            scaled = weight.detach() / quantizer.scale_for(weight).detach()
            base = scaled.floor()
            frac = ((scaled - base - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.register_buffer("base", base)
        self.v = nn.Parameter(torch.log(frac / (1 - frac)))
        self.hard = False

    def h(self) -> Tensor:
        """The rounding offset in [0, 1] (0 or 1 once `hard`)."""
        soft = (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        return (soft >= 0.5).to(soft.dtype) if self.hard else soft

    def codes(self) -> Tensor:
        """The (soft, or once `hard` integer-valued) codes."""
        spec = self.quantizer.spec
        return (self.base + self.h()).clamp(spec.qn, spec.qp)

    def regulariser(self, beta: float) -> Tensor:
        """AdaRound's `sum(1 - |2h - 1|^beta)`: 0 when every offset is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def forward(self, weight: Tensor) -> Tensor:
        out = self.codes() * self.quantizer.scale_for(weight)
        offset = self.quantizer.offset_for(weight)
        return out if offset is None else out + offset


def beta_at(step: int, total: int, warmup: float) -> float | None:
    """The regulariser's exponent at `step`: None during warmup, then linear from BETA_START to BETA_END."""
    start = int(warmup * total)
    if step < start:
        return None
    rel = (step - start) / max(1, total - start)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - rel)


@contextlib.contextmanager
def dropped_quantization(quantizers: list[Quantizer], p: float, generator: torch.Generator) -> Iterator[None]:
    """QDrop: each activation quantizer's output is replaced by its input elementwise with probability `p`."""
    def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        keep_fp = torch.rand(out.shape, generator=generator, device=generator.device) < p
        return torch.where(keep_fp.to(out.device), args[0], out)

    handles = [q.register_forward_hook(hook) for q in quantizers] if p > 0 else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def block_mse(block: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int) -> float:
    """Mean squared difference between `block(inputs)` and `targets`, in batches (no gradient)."""
    total, count = 0.0, 0
    device = next(block.parameters()).device
    with torch.no_grad():
        for lo in range(0, inputs.shape[0], batch_size):
            out = block(inputs[lo:lo + batch_size].to(device))
            total += float((out.float() - targets[lo:lo + batch_size].to(device).float()).pow(2).sum())
            count += out.numel()
    return total / max(1, count)


def reconstruct_block(block: nn.Module, inputs: Tensor, fp_inputs: Tensor, targets: Tensor, cfg: ReconstructSettings,
                      generator: torch.Generator, progress: Callable[[int, float], None] | None = None) -> dict:
    """Learn `block`'s weight rounding and steps so that `block(inputs)` matches `targets` (the FP block's outputs).

    `inputs` are the block's inputs in the quantized model, `fp_inputs` in the FP model (QDrop mixes them),
    `targets` the FP block's outputs; all indexed along dimension 0. Every random draw comes from
    `generator`, so a block reconstructs identically whenever it runs. Ends with hard rounding written
    into the weights. Returns iterations, seconds, the relative output error at the first and last
    step, and the share of weight codes that differ from nearest rounding at the start.
    """
    start_time = time.perf_counter()
    layers = [m for m in block.modules() if isinstance(m, QUANT_LAYERS) and m.w_quant.enabled]
    acts = [q for _, q in iter_quantizers(block) if q.kind == "act" and q.enabled]
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    originals = [layer.w_quant for layer in layers]
    nearest = [q.codes(layer.weight) for q, layer in zip(originals, layers)]
    soft = [SoftRounding(q, layer.weight) for q, layer in zip(originals, layers)]
    steps = [p for q in originals + acts for p in q.parameters()]
    for layer, s in zip(layers, soft):
        # SoftRounding stands in for the weight quantizer until _finish (or the finally below) puts it back
        layer.w_quant = s  # type: ignore[assignment]
    for p in steps:
        p.requires_grad_(True)
    was_training = block.training
    block.eval()
    n, weights = inputs.shape[0], sum(s.v.numel() for s in soft)
    power = float(targets.float().pow(2).mean()) or 1.0
    rounding = torch.optim.Adam([s.v for s in soft], lr=cfg.lr) if soft else None
    # Adam moves a parameter by about its lr per step whatever its size, and steps differ by orders of magnitude
    # (weights ~1e-2, activations ~1): each quantizer's parameters get `step_lr` times its own step as their lr
    groups = [{"params": list(q.parameters()), "lr": cfg.step_lr * float(q.scale_values().mean())} for q in originals + acts]
    stepping = torch.optim.Adam([g for g in groups if g["params"]]) if steps else None
    step_lrs = [g["lr"] for g in stepping.param_groups] if stepping is not None else []
    optimizers = [o for o in (rounding, stepping) if o is not None]
    first_rec = last_rec = torch.full((), float("nan"))
    done = False
    try:
        with dropped_quantization(acts, cfg.drop, generator):
            for step in range(cfg.iters):
                idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=generator)
                x = inputs[idx]
                if cfg.drop > 0:
                    mask = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device) < cfg.drop
                    x = torch.where(mask, fp_inputs[idx], x)
                rec = (block(x) - targets[idx]).pow(2).mean() / power
                beta = beta_at(step, cfg.iters, cfg.warmup)
                loss = rec
                if beta is not None and weights:
                    loss = rec + cfg.round_weight * sum(s.regulariser(beta) for s in soft) / weights
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                if stepping is not None:
                    for group, lr in zip(stepping.param_groups, step_lrs):
                        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / cfg.iters))
                for o in optimizers:
                    o.step()
                with torch.no_grad():
                    for q in originals + acts:
                        q.project_()
                first_rec = rec.detach() if step == 0 else first_rec
                last_rec = rec.detach()
                if progress is not None and ((step + 1) % PROGRESS_EVERY == 0 or step + 1 == cfg.iters):
                    progress(step + 1, float(last_rec))  # the loop's one wait for the device
        done = True
    finally:
        if done:
            changed = _finish(layers, soft, originals, nearest)
        else:  # failed or interrupted: the quantizers go back, the block is left as learned so far (not hard-rounded)
            for layer, q in zip(layers, originals):
                layer.w_quant = q
        for p in steps:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        block.train(was_training)
    return {"iters": cfg.iters, "seconds": round(time.perf_counter() - start_time, 2), "loss_first": float(first_rec),
            "loss_last": float(last_rec), "changed_codes": changed / max(1, weights)}


@torch.no_grad()
def _finish(layers: Sequence[QLinear | QConv2d], soft: list[SoftRounding], originals: list[Quantizer],
            nearest: list[Tensor]) -> int:
    """Make the rounding hard, write `codes * step` into each weight, put the quantizers back; codes changed vs `nearest`."""
    changed = 0
    for layer, s, q, start in zip(layers, soft, originals, nearest):
        s.hard = True
        codes = s.codes()
        layer.weight.copy_(q.dequantize(codes, layer.weight))
        layer.w_quant = q
        if not torch.equal(q.codes(layer.weight), codes.to(torch.int32)):
            raise RuntimeError("learned codes do not survive nearest rounding of the written weight")
        changed += int((start != codes.to(torch.int32)).sum())
    return changed
