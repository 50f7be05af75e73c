"""The Swin V2 family: timm `SwinTransformerV2`, the Swin layout (`swin.py`) with V2's cosine attention and post-norm.

What changes against Swin V1 and how it is quantized:
- Cosine attention, `softmax(normalize(Q) normalize(K)^T * exp(min(logit_scale, log 100)) + bias)`: the Q and K
  quantizers sit *after* the normalisation, so the integer matmul multiplies the unit-length rows it computes
  with (every element in [-1, 1], whatever the head). The learned logit scale stays FP and multiplies the
  matmul's output, as ViT's `1/sqrt(d)` does (method.md §3, item 4): it is one number per head, so in integer
  arithmetic it joins the output rescale (`step_q * step_k * exp(logit_scale_h)`) at no cost, while folding it
  into Q before quantizing would make one per-tensor step serve heads whose scales differ up to 100x.
  V is quantized as it leaves its projection (plus `v_bias`), softmax output unsigned, `attn @ V` signed.
- The continuous position bias MLP (`cpb_mlp`, two Linear layers) stays FP (`fp_layers`): it reads only the
  constant relative-coordinate table, so at inference its output is a constant `[heads, N, N]` table, V2's
  form of V1's relative-position-bias table, which method.md §3 keeps FP; `16 * sigmoid(.)` of it is added to
  the logits in FP with the shift mask.
- Post-norm blocks (`x + norm1(attn(x))`, `x + norm2(mlp(x))`): the attention and fc1 read the residual
  stream itself, not a LayerNorm output, so their signed input quantizers sit on the block input and on the
  residual after attention; norm1/norm2 are FP on the branch outputs. fc2 reads GELU's output (unsigned,
  learned offset). Patch merging (V2: reduction, then norm) as in V1: 8-bit reduction weights, FP input.
- q/k/v: split from the stock `qkv` (bias-free in V2); `q_bias`/`v_bias` stay FP Parameters under their stock
  names, added after the quantized projections (k has no bias, as in the stock model). With `split_qkv` off,
  one quantizer step serves normalised Q, normalised K and V.

`Swinv2ForImageClassification` (transformers 5.24, timm 1.0.31; tests check the numerics): the Swin V1 map
with V2's attention rows and `pretrained_window_sizes`. transformers adds the shift mask twice (-200 where
timm and the reference add -100); softmax makes both zero unless a head's logits span about 100.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from ..quant import QuantAttention
from .base import QuantPolicy, register_family
from .hf_map import Names
from .swin import SwinFamily, SwinMap

MAX_LOGIT_SCALE = math.log(1.0 / 0.01)  # the stock clamp of the learned logit scale


class SwinV2Map(SwinMap):
    """`Swinv2ForImageClassification`: a timm SwinTransformerV2 with average pooling."""

    hf_class, model_type, prefix = "Swinv2ForImageClassification", "swinv2", "swinv2"
    fields = SwinMap.fields | {"pretrained_window_sizes"}
    timm_names = (("swinv2_tiny_window8_256", (96, 12, 3, 4, 8)), ("swinv2_tiny_window16_256", (96, 12, 3, 4, 16)),
                  ("swinv2_small_window8_256", (96, 24, 3, 4, 8)), ("swinv2_small_window16_256", (96, 24, 3, 4, 16)),
                  ("swinv2_base_window8_256", (128, 24, 4, 4, 8)), ("swinv2_base_window16_256", (128, 24, 4, 4, 16)),
                  ("swinv2_base_window12_192", (128, 24, 4, 4, 12)), ("swinv2_large_window12_192", (192, 24, 6, 4, 12)))

    def model_args(self, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        args = super().model_args(config, where)
        stages = len(args["depths"])
        sizes = config.get("pretrained_window_sizes", [0] * stages)
        if (not isinstance(sizes, (list, tuple)) or len(sizes) < stages
                or not all(isinstance(v, int) and not isinstance(v, bool) and (v == 0 or v >= 2) for v in sizes)):
            raise ModelError(f"{where}: field 'pretrained_window_sizes' must list {stages} window sizes (0 = none, "
                             f"else >= 2), found {sizes!r}")
        return {**args, "pretrained_window_sizes": list(sizes[:stages])}

    def signature(self, model_args: Mapping[str, Any]) -> tuple[Any, ...]:
        return (*super().signature(model_args), model_args["window_size"])

    def attention_rows(self, attn: str, block: str) -> list[Names]:
        own = f"{block}.attention.self"
        return [
            Names(f"{attn}.qkv", tuple(f"{own}.{n}" for n in ("query", "key", "value"))),  # weights; the key has no bias
            Names(f"{attn}.q_bias", (f"{own}.query.bias",)),
            Names(f"{attn}.v_bias", (f"{own}.value.bias",)),
            Names(f"{attn}.logit_scale", (f"{own}.logit_scale",)),
            Names(f"{attn}.cpb_mlp.0", (f"{own}.continuous_position_bias_mlp.0",)),
            Names(f"{attn}.cpb_mlp.2", (f"{own}.continuous_position_bias_mlp.2",)),
            Names(f"{attn}.proj", (f"{block}.attention.output.dense",)),
        ]


class UnitLength(nn.Module):
    """Scale the last dimension to unit length (F.normalize): cosine attention's per-head norm of Q and K."""

    def forward(self, t: Tensor) -> Tensor:
        return F.normalize(t, dim=-1)


class SwinV2QuantWindowAttention(QuantAttention):
    """Swin V2 window attention with quantized operands: cosine attention, FP logit scale and continuous position bias."""

    projection_outputs = ("v",)  # Q and K are quantized after their normalisation

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        # cosine attention has no 1/sqrt(d) scale: the learned logit scale takes its place; Q and K are normalised per
        # head (before their quantizers) and the q/v biases (Parameters, or None without qkv_bias) added before that
        super().__init__(**policy.attention_args(stock, scale=1.0, q_bias=stock.q_bias, v_bias=stock.v_bias,
                                                 q_norm=UnitLength(), k_norm=UnitLength()))
        self.window_area = stock.window_size[0] * stock.window_size[1]
        self.logit_scale = stock.logit_scale
        self.cpb_mlp = stock.cpb_mlp
        self.register_buffer("relative_coords_table", stock.relative_coords_table.clone(), persistent=False)
        self.register_buffer("relative_position_index", stock.relative_position_index.clone(), persistent=False)

    def _position_bias(self) -> Tensor:
        """`16 * sigmoid(cpb_mlp(coords))` gathered into `[heads, N, N]`."""
        n = self.window_area
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        b, n, _ = x.shape
        q, k, v = self.project(x, n)
        attn = q @ k.transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        attn = attn + self._position_bias().unsqueeze(0)
        if mask is not None:  # mask: windows, N, N (0 / -100), windows vary fastest along the batch
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(self.softmax_quant(attn.softmax(dim=-1)))
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(out))


@register_family("timm.models.swin_transformer_v2.SwinTransformerV2")
class SwinV2Family(SwinFamily):
    """timm SwinTransformerV2: post-norm blocks, cosine window attention with continuous position bias, patch merging."""

    name = "swinv2"
    patterns = ("swinv2_tiny_*", "swinv2_small_*", "swinv2_base_*", "swinv2_large_*")  # not swinv2_cr_* (another class)
    transformers = (SwinV2Map(),)
    block_type = "timm.models.swin_transformer_v2.SwinTransformerV2Block"
    attention_type = "timm.models.swin_transformer_v2.WindowAttention"
    merging_type = "timm.models.swin_transformer_v2.PatchMerging"

    def window_attention(self, stock: nn.Module, policy: QuantPolicy) -> nn.Module:
        return SwinV2QuantWindowAttention(stock, policy)

    def fp_layers(self, model: nn.Module) -> frozenset[str]:
        """The continuous position bias MLPs (a position table computed from constant coordinates)."""
        return frozenset(f"{name}.cpb_mlp.{i}" for name, mod in model.named_modules()
                         if isinstance(mod, SwinV2QuantWindowAttention)
                         for i, layer in enumerate(mod.cpb_mlp) if isinstance(layer, nn.Linear))
