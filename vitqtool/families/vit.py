"""Adapter for timm `VisionTransformer` (ViT, DeiT) and `VisionTransformerDistilled`: method.md §3 layout.

Per block: the fused `qkv` Attention becomes a `QuantAttention` (split q/k/v with their own steps,
quantized Q/K/V, softmax output and attn@V); MLP fc1/fc2 become QLinear with fc2's input (the GELU
output) unsigned with a learned offset. Patch embedding and classifier heads are 8-bit.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..quant import QuantAttention
from .base import Adapter, QuantPolicy, check_mlp, class_name, is_identity, quantize_conv, quantize_linear, register_adapter, require


class ViTQuantAttention(QuantAttention):
    """QuantAttention with timm's ViT Attention call signature."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,  # type: ignore[override]
                num_queries: int | None = None) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported by the quantized ViT attention")
        return super().forward(x, num_queries=num_queries)


@register_adapter("timm.models.vision_transformer.VisionTransformer", "timm.models.deit.VisionTransformerDistilled")
class ViTAdapter(Adapter):
    """timm VisionTransformer with plain pre-norm blocks, fused-qkv attention and a GELU MLP."""

    family = "vit"
    patterns = ("vit_*", "deit_*", "deit3_*")

    def check(self, model: nn.Module) -> None:
        require(getattr(model, "attn_pool", None) is None, "attn_pool", "attention pooling (global_pool='map')")
        # register tokens (e.g. a transformers DeiT's distillation token that no head reads) are FP prefix tokens like
        # cls_token: the rewrite leaves the embedding alone and `run_from` keeps every prefix row
        require(type(model.patch_embed.proj) is nn.Conv2d, "patch_embed.proj", f"patch embedding {type(model.patch_embed.proj).__name__}")
        for i, block in enumerate(model.blocks):
            where = f"blocks.{i}"
            require(class_name(block) == "timm.models.vision_transformer.Block", where,
                    f"block type {type(block).__name__} (only timm Block)")
            attn = block.attn
            require(class_name(attn) == "timm.layers.attention.Attention", f"{where}.attn",
                    f"attention type {type(attn).__name__} (only timm Attention)")
            require(is_identity(attn.q_norm) and is_identity(attn.k_norm), f"{where}.attn", f"qk_norm ({type(attn.q_norm).__name__})")
            require(is_identity(attn.norm), f"{where}.attn", f"scale_norm ({type(attn.norm).__name__})")
            require(getattr(attn, "gate", None) is None, f"{where}.attn", "gated attention")
            require(type(attn.qkv) is nn.Linear and type(attn.proj) is nn.Linear, f"{where}.attn", "non-Linear qkv/proj")
            check_mlp(block.mlp, where)

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        quantize_conv(model.patch_embed, "proj", policy.weight(edge=True), policy.act(edge=True))
        for block in model.blocks:
            attn = block.attn
            block.attn = ViTQuantAttention(
                attn.qkv.in_features, attn.num_heads, attn.qkv, attn.proj, attn.scale, policy.bits,
                split=policy.split_qkv, per_channel=policy.per_channel,
                attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p, method=policy.method,
            )
            quantize_linear(block.mlp, "fc1", policy.weight(), policy.act())
            quantize_linear(block.mlp, "fc2", policy.weight(), policy.gelu_out())
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                quantize_linear(model, head, policy.weight(edge=True), policy.act(edge=True))
        return model

    def block_names(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def block_inputs(self, model: nn.Module, images: Tensor) -> list[Tensor]:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        hidden = []
        for block in model.blocks:
            hidden.append(x)
            x = block(x)
        return hidden + [x]

    def run_from(self, model: nn.Module, index: int, hidden: Tensor) -> Tensor:
        """Blocks `index..`, then norm and head.

        When the head reads only the prefix tokens (cls, dist), the last block computes just those rows:
        its keys and values still come from every token, so the logits are those of the full forward.
        """
        blocks = list(model.blocks[index:])
        keep = model.num_prefix_tokens if model.global_pool == "token" else 0
        last = blocks.pop() if blocks and keep and isinstance(blocks[-1].attn, ViTQuantAttention) else None
        for block in blocks:
            hidden = block(hidden)
        if last is not None:
            attn = last.attn(last.norm1(hidden), num_queries=keep)
            hidden = hidden[:, :keep] + last.drop_path1(last.ls1(attn))
            hidden = hidden + last.drop_path2(last.ls2(last.mlp(last.norm2(hidden))))
        return model.forward_head(model.norm(hidden))
