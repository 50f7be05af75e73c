"""The EVA family: timm `Eva` (EVA, EVA-02, timm's rope ViTs), method.md §3 layout with rotary Q/K and SwiGLU.

Per block, the attention (`EvaAttention`, or `AttentionRope` of the rope ViTs) becomes `EvaQuantAttention`:
- Q and K are quantized after the per-head qk-norm (when present) and the rotary position embedding, so the
  integer matmul `Q K^T` sees the rotated values; prefix tokens (class, registers) are not rotated, as in
  timm. V is quantized as in ViT. The rotation itself runs in FP on the projection outputs.
- a fused `qkv` is split into q, k, v (method.md §4); EVA's outside biases (`q_bias`, `v_bias`; the k
  projection has none) are added before the Q and V quantizers; separate `q_proj`/`k_proj`/`v_proj` are
  used as they are (their stock names come back through `stock_name`). Separate projections have no fused
  layout: the fused-qkv baseline (`split_qkv = false`) is refused for them.
- the attention's inner norm (`scale_attn_inner`, EVA-CLIP's sub-LN) runs in FP before proj, whose input
  quantizer sees its output.
The MLP is `families.blocks`'s: a GELU Mlp (with or without an inner norm) or SwiGLU (packed `GluMlp` or split
`SwiGLU`): gate unsigned with a learned offset, fc2's input signed. FP: LayerScale (`gamma_1`, `gamma_2`),
norms, position embeddings, rotary tables, class and register tokens, pooling. 8-bit: patch embedding and head.

Refused, naming module and feature: attention pooling (`global_pool='map'`), gated attention, grouped-query
attention (`num_kv_heads`), attention masks at run time. No transformers class is mapped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import apply_rot_embed_cat
from torch import Tensor, nn

from ..errors import ModelError
from ..quant import QuantAttention
from .base import Family, QuantPolicy, class_name, register_family, require
from .blocks import check_block_mlp, quantize_blocks_

BLOCKS = ("timm.models.eva.EvaBlock", "timm.models.eva.EvaBlockPostNorm")
ATTENTIONS = ("timm.models.eva.EvaAttention", "timm.layers.attention.AttentionRope")


def _rotation(rope: Tensor, prefix: int, half: bool) -> Callable[[Tensor], Tensor]:
    """timm's rotary embedding of per-head Q or K (`[B, heads, N, head_dim]`), leaving the `prefix` tokens as they are."""
    def rotate(t: Tensor) -> Tensor:
        return torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)], dim=2).type_as(t)
    return rotate


class EvaQuantAttention(QuantAttention):
    """QuantAttention built from an Eva/rope attention, with its call signature (the block passes the rotary table)."""

    projection_outputs = ("v",)  # Q and K are quantized after the rotation (and qk-norm), not as projected

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        separate = stock.qkv is None
        qkv: Any = (stock.q_proj, stock.k_proj, stock.v_proj) if separate else stock.qkv
        super().__init__(**policy.attention_args(stock, qkv=qkv, q_bias=getattr(stock, "q_bias", None),
                                                 v_bias=getattr(stock, "v_bias", None)))
        self.num_prefix_tokens = stock.num_prefix_tokens
        self.rotate_half = bool(getattr(stock, "rotate_half", False))
        self.separate_projections = separate  # the stock model names them q_proj, k_proj, v_proj

    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,  # type: ignore[override]
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported by the quantized EVA attention")
        rotate = None if rope is None else _rotation(rope, self.num_prefix_tokens, self.rotate_half)
        return super().forward(x, rotate=rotate)


def _rope(model: nn.Module) -> Tensor | None:
    """The rotary table `Eva._pos_embed` gives the blocks at the model's input size (None without rotary embedding)."""
    rope = model.rope
    if rope is None:
        return None
    if getattr(rope, "feat_shape", None) is not None:
        return rope.get_embed()
    return rope.get_embed(shape=model.patch_embed.grid_size)


def _block_rope(model: nn.Module, rope: Tensor | None, index: int) -> Tensor | None:
    """Block `index`'s rotary table: mixed-mode rope has one per block."""
    return rope[index] if rope is not None and getattr(model, "rope_mixed", False) else rope


@register_family("timm.models.eva.Eva")
class EvaFamily(Family):
    """timm Eva: pre- or post-norm blocks, rotary attention (fused or separate q/k/v), GELU Mlp or SwiGLU MLPs."""

    name = "eva"
    patterns = ("eva_*", "eva02_*", "vit_*_rope_*", "vit_*_dinov3*")

    def __init__(self, separate_projections: bool = False) -> None:
        self.separate_projections = separate_projections

    def onnx_refusal_for(self, model: nn.Module) -> str | None:
        if getattr(model, "rope_mixed", False):
            return ("timm's mixed-mode rotary embedding (rope_mixed): torch.onnx traces its class-token expand to a wrong "
                    "shape, which onnxruntime rejects (invalid expand shape) at every batch size")
        return self.onnx_refusal

    @classmethod
    def for_model(cls, model: nn.Module) -> EvaFamily:
        """Separate q/k/v projections (EVA-02 base and larger) keep their stock names `q_proj`, `k_proj`, `v_proj`."""
        attns = [block.attn for block in getattr(model, "blocks", [])]
        return cls(any(getattr(a, "q_proj", None) is not None or getattr(a, "separate_projections", False) for a in attns))

    def check(self, model: nn.Module) -> None:
        require(getattr(model, "attn_pool", None) is None, "attn_pool", "attention pooling (global_pool='map')")
        require(type(model.patch_embed.proj) is nn.Conv2d, "patch_embed.proj", f"patch embedding {type(model.patch_embed.proj).__name__}")
        for i, block in enumerate(model.blocks):
            where = f"blocks.{i}"
            require(class_name(block) in BLOCKS, where, f"block type {type(block).__name__} (only timm EvaBlock, EvaBlockPostNorm)")
            attn = block.attn
            require(class_name(attn) in ATTENTIONS, f"{where}.attn",
                    f"attention type {type(attn).__name__} (only timm EvaAttention, AttentionRope)")
            require(getattr(attn, "gate", None) is None, f"{where}.attn", "gated attention")
            require(getattr(attn, "num_kv_groups", 1) == 1, f"{where}.attn", "grouped-query attention (num_kv_heads)")
            projections = ("qkv",) if attn.qkv is not None else ("q_proj", "k_proj", "v_proj")
            require(all(type(getattr(attn, p)) is nn.Linear for p in (*projections, "proj")), f"{where}.attn", "non-Linear projections")
            check_block_mlp(block.mlp, where)

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        if self.separate_projections and not policy.split_qkv:
            raise ModelError("blocks.0.attn: the fused-qkv layout (recipe split_qkv = false) is not supported for separate "
                             "q_proj/k_proj/v_proj projections; use a recipe with split_qkv = true (vaq, ptq)")
        return quantize_blocks_(model, policy, EvaQuantAttention)

    def stock_name(self, path: str) -> tuple[str, int | None]:
        """`attn.q` -> `attn.q_proj` when the stock model has separate projections; else the default (thirds of `qkv`)."""
        if self.separate_projections:
            return re.sub(r"(^|\.)attn\.([qkv])(?=\.|$)", r"\1attn.\2_proj", path), None
        return super().stock_name(path)

    def block_names(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def block_inputs(self, model: nn.Module, images: Tensor) -> list[Tensor]:
        x, rope = model._pos_embed(model.patch_embed(images))
        x = model.norm_pre(x)
        hidden = []
        for i, block in enumerate(model.blocks):
            hidden.append(x)
            x = block(x, rope=_block_rope(model, rope, i))
        return [*hidden, x]

    def run_from(self, model: nn.Module, index: int, hidden: Tensor) -> Tensor:
        """Blocks `index..` (images at the model's input size, whose rotary table `_rope` rebuilds), then norm and head."""
        rope = _rope(model)
        for i in range(index, len(model.blocks)):
            hidden = model.blocks[i](hidden, rope=_block_rope(model, rope, i))
        return model.forward_head(model.norm(hidden))
