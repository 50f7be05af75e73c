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


def _floored(step: Tensor, dtype: torch.dtype) -> Tensor:
    """The step the arithmetic uses: floored at MIN_STEP (method.md §2) in its own dtype, then cast to the data's."""
    return step.detach().clamp(min=MIN_STEP).to(dtype)


def _weight_grad_scale(l1: Tensor, qp: int) -> Tensor:
    """LSQ's weight step gradient scale `1 / sqrt(Qp * ||W||_1)` from the float64 L1 norm(s) `l1` (float64)."""
    return (qp * l1).clamp(min=1e-12).rsqrt()


@torch.no_grad()
def _weight_scale_of(weight: Tensor, steps: int, qp: int) -> Tensor:
    """`_weight_grad_scale` of `weight` with `steps` steps (1 per tensor, one per output channel), shaped `[steps]`."""
    return _weight_grad_scale(weight.detach().reshape(steps, -1).abs().sum(1, dtype=torch.float64), qp)


def _finish_grads(step_sum: Tensor, offset_sum: Tensor | None, grad_scale: Tensor | float, step: Tensor,
                  offset: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Step and offset gradients from their float64 sums: scaled by LSQ's `grad_scale`, in the parameters' dtypes.

    Both paths sum in float64 (exact float32 products, float64 accumulation), the weights' L1 norms in the
    gradient scale too: whatever order a sum takes, the float32 result is within 1 ulp of the correctly rounded
    value, so eager and fused agree to 1 ulp.
    """
    if isinstance(grad_scale, Tensor):
        grad_scale = grad_scale.reshape(step.shape)
    grad_step = (step_sum.reshape(step.shape) * grad_scale).to(step.dtype)
    grad_offset = None
    if offset is not None:
        if offset_sum is None:
            raise ValueError("an offset needs its gradient sum")
        grad_offset = (offset_sum * grad_scale).reshape(1).to(offset.dtype)
    return grad_step, grad_offset


class _LSQFakeQuant(torch.autograd.Function):
    """Fake quantization with LSQ/LSQ+ gradients (the eager reference); `step` and `offset` broadcast against `x`.

    `step` is the raw parameter (view): the MIN_STEP floor is applied inside and the step's gradient is
    LSQ's even at the floor. The forward keeps only what the backward needs, computed in place: a bool
    mask of the values inside the clamp range and the step slope `d x_hat / d s` (`round(v) - v` inside,
    the clamp level outside). The backward is then one masked copy and float64 reductions.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: Tensor | float):
        s = _floored(step, x.dtype)
        scaled = (x - offset if offset is not None else x) / s
        codes = scaled.clamp(qn, qp)
        inside = codes == scaled
        codes.round_()
        out = codes * s
        if offset is not None:
            out += offset
        slope = codes.sub_(scaled.mul_(inside))  # codes - v inside, codes (the clamp level) outside
        ctx.save_for_backward(slope, inside, step, offset)
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        slope, inside, step, offset = ctx.saved_tensors
        grad_x = torch.where(inside, grad_out, 0.0)
        product = grad_out * slope
        if step.numel() == 1:
            step_sum = product.sum(dtype=torch.float64)
        else:  # per channel: channel dim 0
            step_sum = product.reshape(step.numel(), -1).sum(1, dtype=torch.float64)
        offset_sum = (grad_out - grad_x).sum(dtype=torch.float64) if offset is not None else None
        grad_step, grad_offset = _finish_grads(step_sum, offset_sum, ctx.grad_scale, step, offset)
        return grad_x, grad_step, grad_offset, None, None, None


def _fake_quant(x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int) -> Tensor:
    """`round(clamp((x - beta) / s, qn, qp)) * s + beta`, written as one expression for the compiler."""
    shifted = x - offset if offset is not None else x
    out = (shifted / step).clamp(qn, qp).round() * step
    return out + offset if offset is not None else out


def _fake_quant_grads(grad_out: Tensor, x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, weight: bool):
    """What `_LSQFakeQuant.backward` computes, recomputed from `x`: (grad_x, float64 step sum(s), float64 offset sum,
    and for a `weight` its float64 L1 norm(s), which the step's gradient scale needs, in the same pass).

    `x` is `[numel]` with `step` `[1]`, or `[channels, rest]` with `step` `[channels, 1]`; the same
    elementwise arithmetic as the eager path, so grad_x and every summed product are bitwise equal to it.
    """
    scaled = (x - offset if offset is not None else x) / step
    codes = scaled.clamp(qn, qp)
    inside = codes == scaled
    grad_x = torch.where(inside, grad_out, 0.0)
    slope = codes.round() - scaled * inside
    step_sum = (grad_out * slope).to(torch.float64).sum(-1)
    offset_sum = (grad_out - grad_x).to(torch.float64).sum() if offset is not None else None
    l1 = x.abs().to(torch.float64).sum(-1) if weight else None
    return grad_x, step_sum, offset_sum, l1


def _codes(x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int) -> Tensor:
    """`round(clamp((x - beta) / s, qn, qp))` as int32: the integer codes of `_fake_quant`."""
    shifted = x - offset if offset is not None else x
    return (shifted / step).clamp(qn, qp).round().to(torch.int32)


@functools.cache
def _compiled_kernels():
    """`_fake_quant`, `_fake_quant_grads` and `_codes` compiled once per process (shapes dynamic: one kernel per layout)."""
    return (torch.compile(_fake_quant, dynamic=True), torch.compile(_fake_quant_grads, dynamic=True),
            torch.compile(_codes, dynamic=True))


class _FusedLSQFakeQuant(torch.autograd.Function):
    """`_LSQFakeQuant` with each direction one compiled kernel; saves only `x` (recomputes the rest).

    The kernels see `x` as a plain `[numel]` (per-tensor) or `[channels, rest]` (per-channel) tensor,
    so every layer shares one of two compiled layouts instead of one per rank and tensor type. `grad_scale`
    None means a weight's `_weight_grad_scale`, whose L1 norm the backward kernel sums while it reads `x`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: float | None):
        flat_x, flat_step = _flatten(x, _floored(step, x.dtype))
        ctx.save_for_backward(flat_x, flat_step, step, offset)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        return _compiled_kernels()[0](flat_x, flat_step, offset, qn, qp).view_as(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        flat_x, flat_step, step, offset = ctx.saved_tensors
        flat_grad = grad_out.reshape(flat_x.shape).detach()
        weight = ctx.grad_scale is None
        grad_x, step_sum, offset_sum, l1 = _compiled_kernels()[1](flat_grad, flat_x, flat_step, offset, ctx.qn, ctx.qp, weight)
        grad_scale = _weight_grad_scale(l1, ctx.qp) if weight else ctx.grad_scale
        grad_step, grad_offset = _finish_grads(step_sum, offset_sum, grad_scale, step, offset)
        return grad_x.view(grad_out.shape), grad_step, grad_offset, None, None, None


def _flatten(x: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """`x` and `step` as `[numel]`, `[1]` (one step) or `[channels, rest]`, `[channels, 1]` (per channel).

    Detached aliases, not views: the compiler guards on a view's base, which would recompile per rank.
    """
    if step.numel() == 1:
        return x.reshape(-1).detach(), step.reshape(1).detach()
    return x.reshape(step.numel(), -1).detach(), step.reshape(-1, 1).detach()


def ulps_apart(a: Tensor, b: Tensor) -> int:
    """The largest distance in units in the last place between same-shape float32 tensors (0: bitwise equal)."""
    def ordered(t: Tensor) -> Tensor:
        bits = t.detach().float().contiguous().view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # monotonic in the float value; +0 and -0 meet

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def check_fused_kernels(device: torch.device | str) -> None:
    """Compile the fused kernels and run them against the eager reference on probe tensors of every layout.

    Raises whatever the compiler raises when it does not work here, and FusedMismatch when a fused result
    is not what eager computes: the forward, the input gradient and the integer codes bitwise, step and
    offset gradients within 1 ulp.
    """
    gen = torch.Generator().manual_seed(0)
    # (shape, step shape, offset, weight): activations with and without an offset, per-tensor and per-channel weights
    probes = [((4099,), (1,), True, False), ((4099,), (1,), False, False), ((37, 8), (1,), False, True),
              ((8, 37), (8, 1), False, True)]
    for shape, step_shape, with_offset, weight in probes:
        x = (torch.randn(shape, generator=gen) * 3).to(device)
        grad = torch.randn(shape, generator=gen).to(device)
        step = torch.rand(step_shape, generator=gen).add(0.2).to(device)
        offset = torch.full((1,), -0.3, device=device) if with_offset else None
        results = []
        for function in (_LSQFakeQuant, _FusedLSQFakeQuant):
            xs, ss = x.clone().requires_grad_(True), step.clone().requires_grad_(True)
            os_ = offset.clone().requires_grad_(True) if offset is not None else None
            scale = (_weight_scale_of(x, step.numel(), 3) if function is _LSQFakeQuant else None) if weight else 0.5
            out = function.apply(xs, ss, os_, -4, 3, scale)
            out.backward(grad)
            assert xs.grad is not None and ss.grad is not None  # backward sets the grads of leaves that require them
            results.append((out.detach(), xs.grad, ss.grad, os_.grad if os_ is not None else None))
        (out_e, gx_e, gs_e, go_e), (out_f, gx_f, gs_f, go_f) = results
        flat_x, flat_step = _flatten(x, step)
        same_codes = torch.equal(_codes(flat_x, flat_step, offset, -4, 3), _compiled_kernels()[2](flat_x, flat_step, offset, -4, 3))
        where = (f"{'weight' if weight else 'activation'} {'per-channel' if len(step_shape) > 1 else 'per-tensor'}"
                 f"{' with offset' if with_offset else ''} on {device}")
        if not (torch.equal(out_e, out_f) and torch.equal(gx_e, gx_f) and same_codes):
            raise FusedMismatch(f"fused fake quantization ({where}) is not bitwise equal to the eager reference")
        if ulps_apart(gs_e, gs_f) > 1 or (go_e is not None and go_f is not None and ulps_apart(go_e, go_f) > 1):
            raise FusedMismatch(f"fused step/offset gradients ({where}) are more than 1 ulp from the eager reference")


class FusedMismatch(RuntimeError):
    """The compiled quantizer kernels compute something else than the eager reference on this device."""


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

    def with_bits(self, bits: int) -> LSQQuantizer:
        new = LSQQuantizer(dataclasses.replace(self.spec, bits=bits), self.kind, channels=self.step.numel())
        new.to(self.step.device)
        new.enabled, new.fused = self.enabled, self.fused
        return new

    def grad_scale(self, x: Tensor) -> Tensor | float:
        """The step's gradient scale: `1/sqrt(Qp*||W||_1)` for weights (float64, one per step), `1/(Qp*sqrt(N_x))`
        for activations."""
        if self.kind == "act":
            return 1.0 / (self.spec.qp * math.sqrt(x.numel()))
        return _weight_scale_of(x, self.step.numel(), self.spec.qp)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        step = self.step.view(-1, *([1] * (x.dim() - 1))) if self.spec.per_channel else self.step  # floored inside
        if self.fused:  # a weight's gradient scale comes from the backward kernel, which reads the weight anyway
            scale = self.grad_scale(x) if self.kind == "act" else None
            return _FusedLSQFakeQuant.apply(x, step, self.offset_for(x), self.spec.qn, self.spec.qp, scale)
        return _LSQFakeQuant.apply(x, step, self.offset_for(x), self.spec.qn, self.spec.qp, self.grad_scale(x))

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """The integer codes `round(clamp((x - beta) / s))` as int32, whatever `enabled` says (one kernel when fused)."""
        flat_x, flat_step = _flatten(x, _floored(self.step, x.dtype))
        offset = self.offset_for(x)
        offset = offset.detach() if offset is not None else None
        codes = _compiled_kernels()[2] if self.fused else _codes
        return codes(flat_x, flat_step, offset, self.spec.qn, self.spec.qp).view(x.shape)

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
