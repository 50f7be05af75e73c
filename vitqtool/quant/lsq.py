"""LSQ fake quantizers (Esser et al., ICLR 2020) with the changes of method.md §2.

`x_hat = round(clamp((x - beta) / s, Qn, Qp)) * s + beta`, with LSQ's gradient for the step `s`,
straight-through for `x` inside the range and zero outside, and LSQ+'s gradient for the optional
offset `beta`. One autograd Function does the forward and the backward in a few fused passes so
that fake quantization stays cheap next to the matmuls it feeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MIN_STEP = 1e-4  # method.md §2: steps are clamped to >= 1e-4


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, sign, granularity and whether an offset is learned."""

    bits: int
    signed: bool = True
    per_channel: bool = False
    learned_offset: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")

    @property
    def qn(self) -> int:
        """Lowest integer level."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qp(self) -> int:
        """Highest integer level."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


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


class LSQQuantizer(nn.Module):
    """A learned-step fake quantizer for weights (`kind="weight"`) or activations (`kind="act"`).

    The step is a Parameter from construction (shape `[channels]` when per-channel, else `[1]`), so
    optimizers and checkpoints never depend on a first forward pass. `enabled=False` makes it the
    identity (FP arithmetic in the same module tree); `initialized` records calibration.
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

    def extra_repr(self) -> str:
        gran = "per-channel" if self.spec.per_channel else "per-tensor"
        sign = "signed" if self.spec.signed else "unsigned"
        extra = ", offset" if self.spec.learned_offset else ""
        return f"{self.kind}, {self.spec.bits}-bit {sign}, {gran}{extra}, enabled={self.enabled}"

    def _step_view(self, x: Tensor) -> Tensor:
        step = self.step.clamp(min=MIN_STEP)
        if self.spec.per_channel:  # channel dim 0 (out_features / out_channels)
            step = step.view(-1, *([1] * (x.dim() - 1)))
        return step

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
        step = self._step_view(x)
        scale = self.grad_scale(x)
        if isinstance(scale, Tensor):
            scale = scale.view_as(step)
        offset = self.offset.to(x.dtype) if self.offset is not None else None
        return _LSQFakeQuant.apply(x, step.to(x.dtype), offset, self.spec.qn, self.spec.qp, scale)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """The integer codes `round(clamp((x - beta) / s))` as int32, whatever `enabled` says."""
        shifted = x - self.offset if self.offset is not None else x
        return (shifted / self._step_view(x)).clamp(self.spec.qn, self.spec.qp).round().to(torch.int32)

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
        self.initialized.fill_(True)

    @torch.no_grad()
    def mean_abs(self, x: Tensor) -> Tensor:
        """`mean|x - beta|`, the statistic activation init needs (averaged over calibration batches)."""
        shifted = x.detach().float() - (self.offset.detach().float() if self.offset is not None else 0.0)
        return shifted.abs().mean()

    @torch.no_grad()
    def init_from_mean_abs(self, mean_abs: float | Tensor) -> None:
        """Activation init (method.md §2): `s = 2 * mean|x| / sqrt(Qp)`."""
        s = 2 * float(mean_abs) / math.sqrt(self.spec.qp)
        self.step.fill_(max(s, MIN_STEP))
        self.initialized.fill_(True)
