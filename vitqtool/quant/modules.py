"""Quantized Linear, Conv2d and attention building blocks made from quantizers (`base.make_quantizer`).

`QLinear`/`QConv2d` subclass the float modules and reuse their Parameters, so a swap keeps the
state_dict keys `weight`/`bias` and adds `w_quant.*` and (optionally) `a_quant.*`. With every
quantizer disabled they compute exactly what the float module computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Quantizer, QuantSpec, make_quantizer

QKV = ("q", "k", "v")  # the parts a fused qkv Linear is split into (method.md §4)
KV = ("k", "v")        # the parts a fused kv Linear (attention pooling) is split into
_Layer = TypeVar("_Layer", "QLinear", "QConv2d")


def _attach_quantizers(layer: QLinear | QConv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None, out_channels: int,
                       device: torch.device | str | None) -> None:
    """Give `layer` its weight quantizer `w_quant` and (unless `act_spec` is None) input quantizer `a_quant`."""
    layer.w_quant = make_quantizer(weight_spec, "weight", out_channels).to(device)
    layer.a_quant = make_quantizer(act_spec, "act").to(device) if act_spec is not None else None


def _share_parameters(q: _Layer, float_layer: nn.Linear | nn.Conv2d, weight_spec: QuantSpec,
                      act_spec: QuantSpec | None) -> _Layer:
    """Give a meta-built quantized layer the float layer's weight and bias Parameters and real quantizers."""
    # torch's stubs type Linear.bias as Parameter and Conv2d.bias as Tensor | None; either is a Parameter or None here
    q.weight, q.bias = float_layer.weight, float_layer.bias  # type: ignore[assignment]
    _attach_quantizers(q, weight_spec, act_spec, float_layer.weight.shape[0], float_layer.weight.device)
    return q


class QLinear(nn.Linear):
    """`nn.Linear` whose weight (and, unless `act_spec` is None, input) is fake-quantized."""

    w_quant: Quantizer  # set by _attach_quantizers; declared so readers see the type, not nn.Module.__getattr__'s
    a_quant: Quantizer | None

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _attach_quantizers(self, weight_spec, act_spec, out_features, device)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> QLinear:
        """Wrap an existing Linear, sharing its weight and bias Parameters.

        Built on the meta device, so no throwaway weights are allocated or drawn from the global RNG.
        """
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, act_spec, device="meta")
        return _share_parameters(q, linear, weight_spec, act_spec)

    def forward(self, x: Tensor) -> Tensor:
        if self.a_quant is not None:
            x = self.a_quant(x)
        return F.linear(x, self.w_quant(self.weight), self.bias)


class QConv2d(nn.Conv2d):
    """`nn.Conv2d` whose weight and (unless `act_spec` is None) input are fake-quantized."""

    w_quant: Quantizer  # as QLinear
    a_quant: Quantizer | None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, weight_spec: QuantSpec,
                 act_spec: QuantSpec | None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **conv_args: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, device=device, dtype=dtype, **conv_args)
        _attach_quantizers(self, weight_spec, act_spec, out_channels, device)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> QConv2d:
        """Wrap an existing Conv2d, sharing its weight and bias Parameters (built on the meta device, as QLinear)."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, weight_spec, act_spec, device="meta",
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode)
        return _share_parameters(q, conv, weight_spec, act_spec)

    def forward(self, x: Tensor) -> Tensor:
        if self.a_quant is not None:
            x = self.a_quant(x)
        weight = self.w_quant(self.weight)
        if x.requires_grad and torch.is_grad_enabled() and self._is_patchify():
            return _PatchifyConv.apply(x, weight, self.bias, self.stride)
        return self._conv_forward(x, weight, self.bias)

    def _is_patchify(self) -> bool:
        """Non-overlapping patches (kernel = stride, no padding, dilation or groups): a patch embedding."""
        return (tuple(self.kernel_size) == tuple(self.stride) and self.groups == 1 and tuple(self.dilation) == (1, 1)
                and self.padding_mode == "zeros" and self.padding == (0, 0))


class _PatchifyConv(torch.autograd.Function):
    """A non-overlapping conv whose input gradient is one matmul: each output pixel reads its own patch only.

    The forward and the weight/bias gradients are the stock conv's. The input gradient (wanted when the input
    is fake-quantized with a learned step, as a patch embedding's is) is `grad_out @ W` scattered back to the
    patches. For deit_tiny's 16x16 stride-16 stem (batch 32, 224 px, one thread) mkldnn's input gradient took
    180 ms, this one a few ms; the values are the same up to float summation order.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.has_bias = stride, bias is not None
        return F.conv2d(x, weight, bias, stride)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            (kh, kw), (b, c, h, w), (out_ch, hp, wp) = ctx.stride, x.shape, grad_out.shape[1:]
            patches = grad_out.permute(0, 2, 3, 1).reshape(-1, out_ch) @ weight.reshape(out_ch, -1)
            grad_x = patches.reshape(b, hp, wp, c, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hp * kh, wp * kw)
            if (hp * kh, wp * kw) != (h, w):  # rows/columns past the last whole patch are never read
                grad_x = F.pad(grad_x, (0, w - wp * kw, 0, h - hp * kh))
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(ctx.stride), [0, 0], [1, 1],
                False, [0, 0], 1, [False, need_w, need_b and ctx.has_bias])
        return grad_x, grad_w, grad_b, None


class _HeadsFirst(torch.autograd.Function):
    """`[B, N, 3 * heads * head_dim]` (stacked q/k/v projections) -> three contiguous `[B, heads, N, head_dim]` tensors.

    One copy each way: the quantizers and attention matmuls read the parts without copying a strided operand
    each, and the backward writes the three gradients straight into the projection's layout (autograd's own
    backward of a permute and unbind would stack them first, then copy them again).
    """

    @staticmethod
    def forward(ctx, t: Tensor, heads: int) -> tuple[Tensor, ...]:
        b, n, width = t.shape
        ctx.shape = (b, n, 3, heads, width // (3 * heads))
        return tuple(t.view(ctx.shape).permute(2, 0, 3, 1, 4).contiguous().unbind(0))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # an unused part's gradient arrives as zeros (materialized)
        grad = grads[0].new_empty(ctx.shape)
        for i, part in enumerate(grads):
            grad[:, :, i].copy_(part.transpose(1, 2))
        return grad.flatten(2), None


QUANT_LAYERS = (QLinear, QConv2d)


class QuantAttention(nn.Module):
    """Multi-head self-attention with quantized operands (method.md §3-§4).

    Layout: one shared input quantizer on the normalised tokens; `q`, `k`, `v` projections each with
    their own weight step (`split=True`, module-dependent) or one fused `qkv` projection with one step
    (`split=False`, the plain LSQ baseline); quantizers on Q, K and V (one shared quantizer on the fused
    output when not split); `Q K^T * scale + bias` and softmax in FP; an unsigned quantizer on the
    softmax output; `attn @ V` quantized as the input of `proj`. `attn_bias` (relative position bias,
    window mask) is added to the logits by the caller's family adapter.

    Options some ViT variants need, all FP and all applied before the quantizer that follows them:
    - `qkv` given as three separate projections (used as they are, not copied; split layout only);
    - `q_bias` / `v_bias`: biases of the q and v projections stored outside a bias-free projection
      (the k projection has none), added to the projection output before its quantizer;
    - `q_norm` / `k_norm`: per-head norms of Q and K (over the last dimension, head_dim; the others
      come as `[B, N, heads]` or `[B, heads, N]`), and `rotate`, a function forward applies to the per-head
      Q and K (`[B, heads, N, head_dim]`, e.g. a rotary position embedding): the Q and K quantizers see
      the normalised, rotated values, so the integer matmul does too;
    - `norm`: a norm of `attn @ V` before `proj`, whose input quantizer then sees the norm's output.
    Subclasses that change what happens between the two matmuls (talking heads) reuse `project`.
    """

    # the projections whose output its Q/K/V quantizer sees unchanged (what compressed-tensors' output_activations
    # mean); a subclass that transforms an operand between projection and quantizer leaves that projection out
    # set by _attention_layers (the q/k/v or fused projections and their quantizers depend on `split`)
    input_quant: Quantizer
    softmax_quant: Quantizer
    proj: QLinear
    q: QLinear  # split layout only (else one fused `qkv`)
    k: QLinear
    v: QLinear

    projection_outputs: ClassVar[tuple[str, ...]] = ("q", "k", "v")

    def __init__(self, num_heads: int, qkv: nn.Linear | tuple[nn.Linear, nn.Linear, nn.Linear], proj: nn.Linear,
                 scale: float, bits: int, split: bool = True, per_channel: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, method: str = "lsq", *, q_bias: nn.Parameter | None = None,
                 v_bias: nn.Parameter | None = None, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        if isinstance(qkv, tuple):
            if not split:
                raise ValueError("separate q/k/v projections need the split layout (split=True)")
            if len({p.out_features for p in qkv}) != 1:
                raise ValueError(f"q/k/v projections have different widths {[p.out_features for p in qkv]}")
            width = qkv[0].out_features
        elif qkv.out_features % 3:
            raise ValueError(f"qkv projection has {qkv.out_features} outputs, not a multiple of 3")
        else:
            width = qkv.out_features // 3
        if (q_bias is not None or v_bias is not None) and (qkv[0] if isinstance(qkv, tuple) else qkv).bias is not None:
            raise ValueError("q_bias/v_bias are for a bias-free projection; this one has a bias")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.scale = scale
        self.split = split
        projections: dict[str, nn.Linear]
        if isinstance(qkv, tuple):  # split (checked above)
            projections = dict(zip(QKV, qkv))
        elif split:
            projections = dict(zip(QKV, [_slice_linear(qkv, i) for i in range(3)], strict=True))
        else:
            projections = {"qkv": qkv}
        _attention_layers(self, projections, proj, bits, per_channel, method)
        self.q_bias, self.v_bias = q_bias, v_bias
        self.q_norm, self.k_norm, self.norm = q_norm, k_norm, norm  # norm: of attn @ V, before proj's input quantizer
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def _position(self, t: Tensor, bias: Tensor | None, norm: nn.Module | None,
                  rotate: Callable[[Tensor], Tensor] | None) -> Tensor:
        """A `[B, N, heads * head_dim]` projection output with its outside bias, per-head norm and rotation applied."""
        if bias is not None:
            t = t + bias
        if rotate is None:
            if norm is None:
                return t
            b, n, _ = t.shape  # a per-head norm acts on the last dimension only: no round trip through heads first
            return norm(t.reshape(b, n, self.num_heads, self.head_dim)).reshape(t.shape)
        return self._position_heads(split_heads(t, self.num_heads), None, norm, rotate).transpose(1, 2).reshape(t.shape)

    def _position_heads(self, heads: Tensor, bias: Tensor | None, norm: nn.Module | None,
                        rotate: Callable[[Tensor], Tensor] | None) -> Tensor:
        """`_position` of a projection output already heads first, `[B, heads, N, head_dim]`."""
        if bias is not None:
            heads = heads + bias.view(self.num_heads, 1, self.head_dim)
        if norm is not None:
            heads = norm(heads)
        if rotate is not None:
            heads = rotate(heads)
        return heads

    def project(self, x: Tensor, num_queries: int, rotate: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Quantized Q (of the first `num_queries` tokens), K and V of `x`, heads first: `[batch, heads, tokens, head_dim]`."""
        b, n, _ = x.shape
        if rotate is not None and num_queries != n:
            raise ValueError("a rotated attention computes every query (num_queries is not supported with rotate)")
        x = self.input_quant(x)
        if self.split:
            stacked = self._projections_at_once(x) if num_queries == n else None
            if stacked is not None:
                q, k, v = stacked
                return (self.q_quant(self._position_heads(q, self.q_bias, self.q_norm, rotate)),
                        self.k_quant(self._position_heads(k, None, self.k_norm, rotate)),
                        self.v_quant(self._position_heads(v, self.v_bias, None, None)))
            q_out, k_out, v_out = self.q(x if num_queries == n else x[:, :num_queries]), self.k(x), self.v(x)
            q = split_heads(self.q_quant(self._position(q_out, self.q_bias, self.q_norm, rotate)), self.num_heads)
            k = split_heads(self.k_quant(self._position(k_out, None, self.k_norm, rotate)), self.num_heads)
            v = split_heads(self.v_quant(self._position(v_out, self.v_bias, None, None)), self.num_heads)
            return q, k, v
        qkv = self.qkv(x)
        if any(t is not None for t in (self.q_bias, self.v_bias, self.q_norm, self.k_norm, rotate)):
            q, k, v = qkv.chunk(3, dim=-1)
            qkv = torch.cat([self._position(q, self.q_bias, self.q_norm, rotate), self._position(k, None, self.k_norm, rotate),
                             self._position(v, self.v_bias, None, None)], dim=-1)
        q, k, v = self.qkv_quant(qkv).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return (q if num_queries == n else q[:, :, :num_queries]), k, v

    def _projections_at_once(self, x: Tensor) -> tuple[Tensor, ...] | None:
        """In training, the q, k and v projections of `x` as one matmul over their stacked fake-quantized weights (each
        keeps its own step), each heads first and contiguous (`_HeadsFirst`): the same values up to float summation
        order, one matmul instead of three, and one copy instead of one per quantizer and attention matmul.

        None in eval and export (the three layers run, so forward hooks and the traced graph see each projection)
        and for projections that are not alike (an input quantizer of their own, a bias on some only).
        """
        layers = (self.q, self.k, self.v)
        alike = all(layer.a_quant is None and (layer.bias is None) == (self.q.bias is None) for layer in layers)
        if not (alike and self.training and torch.is_grad_enabled()):
            return None
        weight = torch.cat([layer.w_quant(layer.weight) for layer in layers])
        bias = torch.cat([layer.bias for layer in layers if layer.bias is not None]) if self.q.bias is not None else None
        return _HeadsFirst.apply(F.linear(x, weight, bias), self.num_heads)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, num_queries: int | None = None,
                rotate: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Attend over all tokens of `x`; outputs only the first `num_queries` tokens when given.

        Every quantizer is elementwise, so computing a subset of the queries gives exactly those rows; with
        all of them nothing is sliced (a traced graph then holds no copy of the tokens). `rotate` (e.g. a
        rotary position embedding) is applied to the per-head Q and K before their quantizers.
        """
        b, n, _ = x.shape
        nq = n if num_queries is None else num_queries
        q, k, v = self.project(x, nq, rotate)
        bias = attn_bias[..., :nq, :] if attn_bias is not None and nq != n else attn_bias
        out = attend(q, k, v, self.scale, self.softmax_quant, self.attn_drop, bias).transpose(1, 2).reshape(b, nq, -1)
        if self.norm is not None:
            out = self.norm(out)
        return self.proj_drop(self.proj(out))

    def fused_parts(self) -> tuple[tuple[str, ...], Quantizer]:
        """The child projections that are one stock Linear's rows, in order (the stock `qkv`; the family's
        `stock_name` says when the stock model keeps them apart), and their shared input quantizer."""
        return (QKV if self.split else ("qkv",)), self.input_quant


class QuantAttentionPool(nn.Module):
    """Multi-head attention of learned latent queries over the tokens (attention pooling), quantized as `QuantAttention`.

    Layout (method.md §3 with the queries taken from a learned latent instead of the tokens): the latent (an FP
    parameter, like a class token) is the input of a b-bit `q` projection through its own signed input quantizer;
    the tokens feed the `k` and `v` projections (split from the fused `kv` Linear with their own weight steps, or
    one fused `kv` with one step when `split=False`) through one shared signed `input_quant`; Q, K and V are
    quantized signed, the softmax output unsigned, and `attn @ V` as the input of the b-bit `proj`.
    Returns `[batch, latents, dim]` after `proj` (the caller adds the MLP and the pooling over latents).
    """

    input_quant: Quantizer  # set by _attention_layers, as QuantAttention's
    softmax_quant: Quantizer
    proj: QLinear

    def __init__(self, latent: nn.Parameter, q: nn.Linear, kv: nn.Linear, proj: nn.Linear, num_heads: int, scale: float,
                 bits: int, split: bool = True, per_channel: bool = False, proj_drop: float = 0.0, method: str = "lsq") -> None:
        super().__init__()
        if kv.out_features != 2 * q.out_features:
            raise ValueError(f"kv projection has {kv.out_features} outputs, not twice the query width {q.out_features}")
        self.num_heads = num_heads
        self.head_dim = q.out_features // num_heads
        self.scale = scale
        self.split = split
        self.latent = latent
        kv_parts = {name: _slice_linear(kv, i, len(KV)) for i, name in enumerate(KV)} if split else {"kv": kv}
        wspec, aspec = _attention_layers(self, kv_parts, proj, bits, per_channel, method)
        self.q = QLinear.from_float(q, wspec, aspec)  # q.a_quant quantizes the latent
        self.q_quant = make_quantizer(aspec, "act")
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = split_heads(self.q_quant(self.q(self.latent.expand(b, -1, -1))), self.num_heads)
        x = self.input_quant(x)
        if self.split:
            k, v = (split_heads(quant(layer(x)), self.num_heads) for quant, layer in ((self.k_quant, self.k), (self.v_quant, self.v)))
        else:
            k, v = self.kv_quant(self.kv(x)).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, self.scale, self.softmax_quant).transpose(1, 2).reshape(b, q.shape[2], -1)
        return self.proj_drop(self.proj(out))

    def fused_parts(self) -> tuple[tuple[str, ...], Quantizer]:
        """The child projections that make up the stock fused `kv` Linear, in order, and their shared input quantizer."""
        return (KV if self.split else ("kv",)), self.input_quant


def _attention_layers(module: nn.Module, projections: dict[str, nn.Linear], proj: nn.Linear, bits: int, per_channel: bool,
                      method: str) -> tuple[QuantSpec, QuantSpec]:
    """Give an attention `module` its shared signed `input_quant`, the b-bit `projections` (name -> Linear, input
    quantized by `input_quant`) each with a signed output quantizer `<name>_quant`, the unsigned `softmax_quant` and
    the b-bit `proj` whose input (attn @ V) is quantized signed. Returns the (weight, activation) specs."""
    wspec = QuantSpec(bits, signed=True, granularity="channel" if per_channel else "tensor", method=method)
    aspec = QuantSpec(bits, signed=True, method=method)
    module.input_quant = make_quantizer(aspec, "act")
    for name, linear in projections.items():
        setattr(module, name, QLinear.from_float(linear, wspec, None))
        setattr(module, f"{name}_quant", make_quantizer(aspec, "act"))
    module.softmax_quant = make_quantizer(QuantSpec(bits, signed=False, method=method), "act")
    module.proj = QLinear.from_float(proj, wspec, aspec)  # proj.a_quant quantizes attn @ V
    return wspec, aspec


@runtime_checkable
class FusedProjections(Protocol):
    """A module whose child projections (split for their own weight steps) are one fused Linear in the stock model."""

    def fused_parts(self) -> tuple[tuple[str, ...], Quantizer]:
        """The child projections that are one stock Linear's rows, in order, and the quantizer of their shared input
        (the family's `stock_name` says when the stock model keeps them as separate layers instead)."""


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """`[B, N, heads * head_dim]` -> `[B, heads, N, head_dim]` (a view where `t`'s strides allow one)."""
    b, n, width = t.shape
    return t.reshape(b, n, num_heads, width // num_heads).transpose(1, 2)


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, softmax_quant: Quantizer, attn_drop: nn.Module | None = None,
           attn_bias: Tensor | None = None) -> Tensor:
    """`softmax(Q K^T * scale + bias)`, quantized unsigned, times V (heads first: `[batch, heads, tokens, head_dim]`)."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
        attn = attn + attn_bias
    attn = softmax_quant(attn.softmax(dim=-1))
    if attn_drop is not None:
        attn = attn_drop(attn)
    return attn @ v


def _slice_linear(fused: nn.Linear, index: int, parts: int = 3) -> nn.Linear:
    """The `index`-th of `parts` equal row blocks of a fused Linear (qkv, kv) as its own Linear (exact copy of the rows)."""
    out = fused.out_features // parts
    return slice_rows(fused, index * out, (index + 1) * out)


def slice_rows(fused: nn.Linear, start: int, stop: int) -> nn.Linear:
    """Output rows `start:stop` of a fused Linear (one of the projections it fuses) as their own Linear (an exact copy)."""
    part = nn.Linear(fused.in_features, stop - start, bias=fused.bias is not None, device=fused.weight.device,
                     dtype=fused.weight.dtype)
    with torch.no_grad():
        part.weight.copy_(fused.weight[start:stop])
        if fused.bias is not None:
            part.bias.copy_(fused.bias[start:stop])
    return part
