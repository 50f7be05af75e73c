"""LSQ fake quantizers (Esser et al., ICLR 2020) with the changes of method.md §2.

`x_hat = round(clamp((x - beta) / s, Qn, Qp)) * s + beta`, with LSQ's gradient for the step `s`,
straight-through for `x` inside the range and zero outside, and LSQ+'s gradient for the optional
offset `beta`. One autograd Function does the forward and the backward in a few passes so that fake
quantization stays cheap next to the matmuls it feeds; with `fused=True` each direction is a single
`torch.compile`d kernel instead (one read of the input, no intermediate tensors).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor, nn

from .base import MIN_STEP, Quantizer, QuantSpec, register_quantizer

class _LSQFakeQuant(torch.autograd.Function):
    """Fake quantization with LSQ/LSQ+ gradients; `step` and `offset` broadcast against `x`.

    The forward keeps only what the backward needs, computed in place: a bool mask of the values
    inside the clamp range and the step slope `d x_hat / d s` (`round(v) - v` inside, the clamp level
    outside). The backward is then one masked multiply and one reduction per tensor.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: Tensor | float):
        scaled = (x - offset if offset is not None else x) / step
        codes = scaled.clamp(qn, qp)
        inside = codes == scaled
        codes.round_()
        out = codes * step
        if offset is not None:
            out += offset
        slope = codes.sub_(scaled.mul_(inside))  # codes - v inside, codes (the clamp level) outside
        ctx.save_for_backward(slope, inside)
        ctx.step_shape = step.shape
        ctx.has_offset = offset is not None
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        slope, inside = ctx.saved_tensors
        grad_x = grad_out * inside.to(grad_out.dtype)
        if len(ctx.step_shape) == 0 or ctx.step_shape.numel() == 1:
            grad_step = torch.dot(grad_out.reshape(-1), slope.reshape(-1)).reshape(ctx.step_shape)
        else:
            grad_step = (grad_out * slope).sum_to_size(ctx.step_shape)
        grad_step = grad_step * ctx.grad_scale
        grad_offset = None
        if ctx.has_offset:
            grad_offset = (grad_out.sum() - grad_x.sum()).reshape(1) * ctx.grad_scale
        return grad_x, grad_step, grad_offset, None, None, None


def _fake_quant(x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int) -> Tensor:
    """`round(clamp((x - beta) / s, qn, qp)) * s + beta`, written as one expression for the compiler."""
    shifted = x - offset if offset is not None else x
    out = (shifted / step).clamp(qn, qp).round() * step
    return out + offset if offset is not None else out


def _fake_quant_grads(grad_out: Tensor, x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int):
    """LSQ/LSQ+ gradients of `_fake_quant` recomputed from `x`: (grad_x, grad_step unscaled, grad_offset)."""
    scaled = (x - offset if offset is not None else x) / step
    clamped = scaled.clamp(qn, qp)
    inside = clamped == scaled
    grad_x = torch.where(inside, grad_out, 0.0)
    slope = torch.where(inside, clamped.round() - scaled, clamped)
    grad_step = (grad_out * slope).sum_to_size(step.shape)
    grad_offset = (grad_out - grad_x).sum().reshape(1) if offset is not None else None
    return grad_x, grad_step, grad_offset


@functools.cache
def _compiled_kernels():
    """`_fake_quant` and `_fake_quant_grads` compiled once per process (shapes dynamic: one kernel per layout)."""
    return torch.compile(_fake_quant, dynamic=True), torch.compile(_fake_quant_grads, dynamic=True)


class _FusedLSQFakeQuant(torch.autograd.Function):
    """`_LSQFakeQuant` with each direction one compiled kernel; saves only `x` (recomputes the rest).

    The kernels see `x` as a plain `[numel]` (per-tensor) or `[channels, rest]` (per-channel) tensor,
    so every layer shares one of two compiled layouts instead of one per rank and tensor type.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: Tensor | float):
        flat_x, flat_step = _flatten(x, step)
        ctx.save_for_backward(flat_x, flat_step, offset)
        ctx.qn, ctx.qp, ctx.grad_scale, ctx.step_shape = qn, qp, grad_scale, step.shape
        return _compiled_kernels()[0](flat_x, flat_step, offset, qn, qp).view_as(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        flat_x, flat_step, offset = ctx.saved_tensors
        flat_grad = grad_out.reshape(flat_x.shape).detach()
        grad_x, grad_step, grad_offset = _compiled_kernels()[1](flat_grad, flat_x, flat_step, offset, ctx.qn, ctx.qp)
        if grad_offset is not None:
            grad_offset = grad_offset * ctx.grad_scale
        grad_step = grad_step.view(ctx.step_shape) * ctx.grad_scale
        return grad_x.view(grad_out.shape), grad_step, grad_offset, None, None, None


def _flatten(x: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """`x` and `step` as `[numel]`, `[1]` (one step) or `[channels, rest]`, `[channels, 1]` (per channel).

    Detached aliases, not views: the compiler guards on a view's base, which would recompile per rank.
    """
    if step.numel() == 1:
        return x.reshape(-1).detach(), step.reshape(1).detach()
    return x.reshape(step.numel(), -1).detach(), step.reshape(-1, 1).detach()


def check_fused_kernels(device: torch.device | str) -> None:
    """Compile and run the fused kernels once on a tiny tensor, so a missing compiler fails before training."""
    x = torch.linspace(-2, 2, 16, device=device, requires_grad=True)
    step = torch.full((1,), 0.5, device=device, requires_grad=True)
    _FusedLSQFakeQuant.apply(x, step, None, -2, 1, 1.0).sum().backward()


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    """A learned-step (LSQ) fake quantizer for weights (`kind="weight"`) or activations (`kind="act"`).

    The step is a Parameter from construction (shape `[channels]` when per-channel, else `[1]`), so
    optimizers and checkpoints never depend on a first forward pass; `initialized` records
    calibration; `fused=True` runs the compiled single-kernel path (same values and gradients up to
    float summation order).
    """

    def __init__(self, spec: QuantSpec, kind: str, channels: int = 1) -> None:
        super().__init__()
        if kind not in ("weight", "act"):
            raise ValueError(f"kind must be 'weight' or 'act', got {kind!r}")
        if spec.per_channel and kind != "weight":
            raise ValueError("per-channel steps are for weights only")
        self.spec = spec
        self.kind = kind
        self.step = nn.Parameter(torch.ones(channels if spec.per_channel else 1))
        self.offset = nn.Parameter(torch.zeros(1)) if spec.learned_offset else None
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.enabled = True
        self.fused = False

    def extra_repr(self) -> str:
        sign = "signed" if self.spec.signed else "unsigned"
        extra = ", offset" if self.spec.learned_offset else ""
        return (f"{self.kind}, {self.spec.bits}-bit {sign}, per-{self.spec.granularity}{extra}, enabled={self.enabled}"
                + (", fused" if self.fused else ""))

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized)

    def mark_initialized(self) -> None:
        self.initialized.fill_(True)

    def scale_for(self, x: Tensor) -> Tensor:
        # The value is floored at MIN_STEP (`project_` keeps the stored step there after each update, and this
        # guards loops that do not call it) while the gradient is LSQ's even at the floor: a clamp's zero
        # gradient below it would freeze a step that calibration put there.
        step = self.step + (self.step.clamp(min=MIN_STEP) - self.step).detach()
        if self.spec.per_channel:  # channel dim 0 (out_features / out_channels)
            step = step.view(-1, *([1] * (x.dim() - 1)))
        return step

    def offset_for(self, x: Tensor) -> Tensor | None:
        return self.offset.to(x.dtype) if self.offset is not None else None

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the stored step to >= MIN_STEP (method.md §2), as the reference code does after each update."""
        self.step.clamp_(min=MIN_STEP)

    def state_roles(self) -> dict[str, str]:
        roles = {"step": "scale", "initialized": "flag"}
        if self.offset is not None:
            roles["offset"] = "offset"
        return roles

    def with_bits(self, bits: int) -> "LSQQuantizer":
        new = LSQQuantizer(dataclasses.replace(self.spec, bits=bits), self.kind, channels=self.step.numel())
        new.to(self.step.device)
        new.enabled, new.fused = self.enabled, self.fused
        return new

    def grad_scale(self, x: Tensor) -> Tensor | float:
        """The step's gradient scale: `1/sqrt(Qp*||W||_1)` for weights, `1/(Qp*sqrt(N_x))` for activations."""
        qp = self.spec.qp
        if self.kind == "act":
            return 1.0 / (qp * math.sqrt(x.numel()))
        with torch.no_grad():
            if self.spec.per_channel:
                l1 = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), ord=1, dim=1)
            else:
                l1 = torch.linalg.vector_norm(x, ord=1).reshape(1)
            return (qp * l1).clamp(min=1e-12).rsqrt().to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        step = self.scale_for(x)
        scale = self.grad_scale(x)
        if isinstance(scale, Tensor):
            scale = scale.view_as(step)
        fake_quant = _FusedLSQFakeQuant if self.fused else _LSQFakeQuant
        return fake_quant.apply(x, step.to(x.dtype), self.offset_for(x), self.spec.qn, self.spec.qp, scale)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """The integer codes `round(clamp((x - beta) / s))` as int32, whatever `enabled` says."""
        shifted = x - self.offset if self.offset is not None else x
        return (shifted / self.scale_for(x)).clamp(self.spec.qn, self.spec.qp).round().to(torch.int32)

    @torch.no_grad()
    def init_from_weight(self, weight: Tensor, tol: float = 1e-5, max_iter: int = 100) -> None:
        """MSE fixed point (method.md §2): from `max|W|/Qp`, iterate `s <- <W,q>/<q,q>` until converged."""
        w = weight.detach().float().reshape(weight.shape[0], -1) if self.spec.per_channel else weight.detach().float().reshape(1, -1)
        s = (w.abs().amax(1) / self.spec.qp).clamp(min=MIN_STEP)
        for _ in range(max_iter):
            q = (w / s[:, None]).clamp(self.spec.qn, self.spec.qp).round()
            qq = (q * q).sum(1)
            new_s = torch.where(qq > 0, (w * q).sum(1) / qq.clamp(min=1e-12), s).clamp(min=MIN_STEP)
            converged = bool(((new_s - s).abs() <= tol * s).all())
            s = new_s
            if converged:
                break
        self.step.copy_(s.to(self.step.dtype))
        self.project_()
        self.mark_initialized()

    @torch.no_grad()
    def activation_statistic(self, x: Tensor) -> Tensor:
        """`mean|x - beta|`, the statistic activation init needs (averaged over calibration batches)."""
        shifted = x.detach().float() - (self.offset.detach().float() if self.offset is not None else 0.0)
        return shifted.abs().mean()

    @torch.no_grad()
    def init_from_statistic(self, value: float | Tensor) -> None:
        """Activation init (method.md §2): `s = 2 * mean|x| / sqrt(Qp)`."""
        s = 2 * float(value) / math.sqrt(self.spec.qp)
        self.step.fill_(s)
        self.project_()
        self.mark_initialized()
