"""The relative-position ViT family: timm `VisionTransformerRelPos` (`vit_relpos_*`, `vit_srelpos_*`), method.md §3 layout.

Blocks are ViT blocks (pre-norm `RelPosBlock`, or post-norm `ResPostRelPosBlock`, whose attention and fc1 read
the residual stream: their signed input quantizers sit there) whose attention adds a relative-position bias
to the logits. The fused `qkv` is split into `q`, `k`, `v` with their own steps, Q/K/V quantized signed, the
softmax output unsigned and `attn @ V` signed, as in ViT; the bias is added to `Q K^T * scale` in FP (method.md
§3 item 4, like Swin's table). It comes from a table (`RelPosBias`) or from a small MLP over the constant log-spaced
relative coordinates (`RelPosMlp`, per block or shared by all blocks): that MLP reads no activation, so at
inference its output is a constant `[heads, N, N]` table, and its two Linear layers stay FP (`fp_layers`),
the same rule as Swin V2's continuous position bias. MLPs as in ViT, patch embedding and head 8-bit; LayerNorms,
LayerScale and the class token FP. No transformers class: there is none for this model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant import QuantAttention
from .base import Family, QuantPolicy, check_mlp, class_name, is_identity, register_family, require
from .blocks import quantize_blocks_

RELPOS = "timm.models.vision_transformer_relpos"
BLOCKS = (f"{RELPOS}.RelPosBlock", f"{RELPOS}.ResPostRelPosBlock")
REL_POS = ("timm.layers.pos_embed_rel.RelPosMlp", "timm.layers.pos_embed_rel.RelPosBias")


class RelPosQuantAttention(QuantAttention):
    """timm's `RelPosAttention`: QuantAttention with the block's (or the model's shared) relative-position bias on its logits."""

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        super().__init__(**policy.attention_args(stock))
        self.rel_pos = stock.rel_pos  # FP: its table, or its MLP over constant coordinates

    def forward(self, x: Tensor, shared_rel_pos: Tensor | None = None) -> Tensor:  # type: ignore[override]
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        return super().forward(x, attn_bias=bias)


def _rel_pos_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every relative-position bias generator: the shared one and each block's."""
    found = [("shared_rel_pos", model.shared_rel_pos)] if model.shared_rel_pos is not None else []
    return found + [(f"blocks.{i}.attn.rel_pos", b.attn.rel_pos) for i, b in enumerate(model.blocks) if b.attn.rel_pos is not None]


@register_family(f"{RELPOS}.VisionTransformerRelPos")
class RelPosViTFamily(Family):
    """timm VisionTransformerRelPos: ViT blocks (pre- or post-norm) whose attention logits get a relative-position bias."""

    name = "vit_relpos"
    patterns = ("vit_relpos_*", "vit_srelpos_*")

    def check(self, model: nn.Module) -> None:
        require(type(model.patch_embed.proj) is nn.Conv2d, "patch_embed.proj", f"patch embedding {type(model.patch_embed.proj).__name__}")
        for name, rel_pos in _rel_pos_modules(model):
            require(class_name(rel_pos) in REL_POS, name, f"relative position {type(rel_pos).__name__} (only RelPosMlp, RelPosBias)")
        for i, block in enumerate(model.blocks):
            where = f"blocks.{i}"
            require(class_name(block) in BLOCKS, where, f"block type {type(block).__name__} (only RelPosBlock, ResPostRelPosBlock)")
            attn = block.attn
            require(class_name(attn) == f"{RELPOS}.RelPosAttention", f"{where}.attn", f"attention type {type(attn).__name__}")
            require(is_identity(attn.q_norm) and is_identity(attn.k_norm), f"{where}.attn", f"qk_norm ({type(attn.q_norm).__name__})")
            require(type(attn.qkv) is nn.Linear and type(attn.proj) is nn.Linear, f"{where}.attn", "non-Linear qkv/proj")
            check_mlp(block.mlp, where)

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        return quantize_blocks_(model, policy, RelPosQuantAttention)

    def fp_layers(self, model: nn.Module) -> frozenset[str]:
        """The relative-position MLPs' Linear layers (a constant table at inference; see the module doc)."""
        return frozenset(f"{name}.{sub}" for name, rel_pos in _rel_pos_modules(model)
                         for sub, layer in rel_pos.named_modules() if type(layer) is nn.Linear)

    def block_names(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def _shared_bias(self, model: nn.Module) -> Tensor | None:
        return model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None

    def block_inputs(self, model: nn.Module, images: Tensor) -> list[Tensor]:
        x = model.patch_embed(images)
        if model.cls_token is not None:
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        bias = self._shared_bias(model)
        hidden = []
        for block in model.blocks:
            hidden.append(x)
            x = block(x, shared_rel_pos=bias)
        return [*hidden, x]

    def run_from(self, model: nn.Module, index: int, hidden: Tensor) -> Tensor:
        bias = self._shared_bias(model)
        for block in model.blocks[index:]:
            hidden = block(hidden, shared_rel_pos=bias)
        return model.forward_head(model.norm(hidden))
