"""Quantized Linear, Conv2d and attention building blocks made from LSQ quantizers.

`QLinear`/`QConv2d` subclass the float modules and reuse their Parameters, so a swap keeps the
state_dict keys `weight`/`bias` and adds `w_quant.*` and (optionally) `a_quant.*`. With every
quantizer disabled they compute exactly what the float module computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lsq import LSQQuantizer, QuantSpec


def _weight_quantizer(spec: QuantSpec, out_channels: int) -> LSQQuantizer:
    return LSQQuantizer(spec, "weight", channels=out_channels)


class QLinear(nn.Linear):
    """`nn.Linear` whose weight (and, unless `act_spec` is None, input) is fake-quantized."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.w_quant = _weight_quantizer(weight_spec, out_features)
        self.a_quant = LSQQuantizer(act_spec, "act") if act_spec is not None else None

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> "QLinear":
        """Wrap an existing Linear, sharing its weight and bias tensors."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias
        q.w_quant = _weight_quantizer(weight_spec, linear.out_features).to(linear.weight.device)
        q.a_quant = LSQQuantizer(act_spec, "act").to(linear.weight.device) if act_spec is not None else None
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.a_quant is not None:
            x = self.a_quant(x)
        return F.linear(x, self.w_quant(self.weight), self.bias)


class QConv2d(nn.Conv2d):
    """`nn.Conv2d` whose weight and input are fake-quantized (the patch embedding)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> "QConv2d":
        """Wrap an existing Conv2d, sharing its weight and bias tensors."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(q, name, getattr(conv, name))
        q.weight, q.bias = conv.weight, conv.bias
        q.w_quant = _weight_quantizer(weight_spec, conv.out_channels).to(conv.weight.device)
        q.a_quant = LSQQuantizer(act_spec, "act").to(conv.weight.device) if act_spec is not None else None
        return q

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

    def __init__(self, dim: int, num_heads: int, qkv: nn.Linear, proj: nn.Linear, scale: float, bits: int,
                 split: bool = True, per_channel: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if qkv.out_features % 3:
            raise ValueError(f"qkv projection has {qkv.out_features} outputs, not a multiple of 3")
        self.num_heads = num_heads
        self.head_dim = qkv.out_features // 3 // num_heads
        self.scale = scale
        self.split = split
        wspec = QuantSpec(bits, signed=True, per_channel=per_channel)
        aspec = QuantSpec(bits, signed=True)
        self.input_quant = LSQQuantizer(aspec, "act")
        if split:
            for i, name in enumerate(("q", "k", "v")):
                part = _slice_linear(qkv, i)
                setattr(self, name, QLinear.from_float(part, wspec, None))
                setattr(self, f"{name}_quant", LSQQuantizer(aspec, "act"))
        else:
            self.qkv = QLinear.from_float(qkv, wspec, None)
            self.qkv_quant = LSQQuantizer(aspec, "act")
        self.softmax_quant = LSQQuantizer(QuantSpec(bits, signed=False), "act")
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

