"""Quantized Linear, Conv2d and attention building blocks made from quantizers (`base.make_quantizer`).

`QLinear`/`QConv2d` subclass the float modules and reuse their Parameters, so a swap keeps the
state_dict keys `weight`/`bias` and adds `w_quant.*` and (optionally) `a_quant.*`. With every
quantizer disabled they compute exactly what the float module computes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import QuantSpec, make_quantizer


def _attach_quantizers(layer: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec | None, out_channels: int,
                       device: torch.device | str | None) -> None:
    """Give `layer` its weight quantizer `w_quant` and (unless `act_spec` is None) input quantizer `a_quant`."""
    layer.w_quant = make_quantizer(weight_spec, "weight", out_channels).to(device)
    layer.a_quant = make_quantizer(act_spec, "act").to(device) if act_spec is not None else None


def _share_parameters(q: nn.Module, float_layer: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> nn.Module:
    """Give a meta-built quantized layer the float layer's weight and bias Parameters and real quantizers."""
    q.weight, q.bias = float_layer.weight, float_layer.bias
    _attach_quantizers(q, weight_spec, act_spec, float_layer.weight.shape[0], float_layer.weight.device)
    return q


class QLinear(nn.Linear):
    """`nn.Linear` whose weight (and, unless `act_spec` is None, input) is fake-quantized."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _attach_quantizers(self, weight_spec, act_spec, out_features, device)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> "QLinear":
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

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, weight_spec: QuantSpec,
                 act_spec: QuantSpec | None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **conv_args: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, device=device, dtype=dtype, **conv_args)
        _attach_quantizers(self, weight_spec, act_spec, out_channels, device)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> "QConv2d":
        """Wrap an existing Conv2d, sharing its weight and bias Parameters (built on the meta device, as QLinear)."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, weight_spec, act_spec, device="meta",
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode)
        return _share_parameters(q, conv, weight_spec, act_spec)

    def forward(self, x: Tensor) -> Tensor:
        if self.a_quant is not None:
            x = self.a_quant(x)
        return self._conv_forward(x, self.w_quant(self.weight), self.bias)


QUANT_LAYERS = (QLinear, QConv2d)


class QuantAttention(nn.Module):
    """Multi-head self-attention with quantized operands (method.md §3-§4).

    Layout: one shared input quantizer on the normalised tokens; `q`, `k`, `v` projections each with
    their own weight step (`split=True`, module-dependent) or one fused `qkv` projection with one step
    (`split=False`, the plain LSQ baseline); quantizers on Q, K and V (one shared quantizer on the fused
    output when not split); `Q K^T * scale + bias` and softmax in FP; an unsigned quantizer on the
    softmax output; `attn @ V` quantized as the input of `proj`. `attn_bias` (relative position bias,
    window mask) is added to the logits by the caller's family adapter.
    """

    # the projections whose output its Q/K/V quantizer sees unchanged (what compressed-tensors' output_activations
    # mean); a subclass that transforms an operand between projection and quantizer leaves that projection out
    projection_outputs: ClassVar[tuple[str, ...]] = ("q", "k", "v")

    def __init__(self, dim: int, num_heads: int, qkv: nn.Linear, proj: nn.Linear, scale: float, bits: int,
                 split: bool = True, per_channel: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 method: str = "lsq") -> None:
        super().__init__()
        if qkv.out_features % 3:
            raise ValueError(f"qkv projection has {qkv.out_features} outputs, not a multiple of 3")
        self.num_heads = num_heads
        self.head_dim = qkv.out_features // 3 // num_heads
        self.scale = scale
        self.split = split
        wspec = QuantSpec(bits, signed=True, granularity="channel" if per_channel else "tensor", method=method)
        aspec = QuantSpec(bits, signed=True, method=method)
        self.input_quant = make_quantizer(aspec, "act")
        if split:
            for i, name in enumerate(("q", "k", "v")):
                part = _slice_linear(qkv, i)
                setattr(self, name, QLinear.from_float(part, wspec, None))
                setattr(self, f"{name}_quant", make_quantizer(aspec, "act"))
        else:
            self.qkv = QLinear.from_float(qkv, wspec, None)
            self.qkv_quant = make_quantizer(aspec, "act")
        self.softmax_quant = make_quantizer(QuantSpec(bits, signed=False, method=method), "act")
        self.proj = QLinear.from_float(proj, wspec, aspec)  # proj.a_quant quantizes attn @ V
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, num_queries: int | None = None) -> Tensor:
        """Attend over all tokens of `x`; outputs only the first `num_queries` tokens when given.

        Every quantizer is elementwise, so computing a subset of the queries gives exactly those rows.
        """
        b, n, _ = x.shape
        nq = n if num_queries is None else num_queries
        x = self.input_quant(x)
        if self.split:
            q = self._heads(self.q_quant(self.q(x[:, :nq])))
            k = self._heads(self.k_quant(self.k(x)))
            v = self._heads(self.v_quant(self.v(x)))
        else:
            qkv = self.qkv_quant(self.qkv(x)).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q = q[:, :, :nq]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_bias is not None:
            attn = attn + attn_bias[..., :nq, :]
        attn = self.softmax_quant(attn.softmax(dim=-1))
        attn = self.attn_drop(attn)
        out = (attn @ v).transpose(1, 2).reshape(b, nq, -1)
        return self.proj_drop(self.proj(out))


def _slice_linear(fused: nn.Linear, index: int) -> nn.Linear:
    """The `index`-th third of a fused qkv Linear as its own Linear (exact copy of the rows)."""
    out = fused.out_features // 3
    part = nn.Linear(fused.in_features, out, bias=fused.bias is not None, device=fused.weight.device, dtype=fused.weight.dtype)
    with torch.no_grad():
        part.weight.copy_(fused.weight[index * out:(index + 1) * out])
        if fused.bias is not None:
            part.bias.copy_(fused.bias[index * out:(index + 1) * out])
    return part

