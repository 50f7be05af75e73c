"""Adapter for timm `VisionTransformer` (ViT, DeiT, DeiT distilled): method.md §3 layout.

Per block: the fused `qkv` Attention becomes a `QuantAttention` (split q/k/v with their own steps,
quantized Q/K/V, softmax output and attn@V); MLP fc1/fc2 become QLinear with fc2's input (the GELU
output) unsigned with a learned offset. Patch embedding and classifier heads are 8-bit.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ModelError
from ..quant import QuantAttention
from .base import QuantPolicy, check_fully_quantized, check_is_identity, quantize_conv, quantize_linear

PATTERNS = ("vit_*", "deit_*", "deit3_*")


class ViTQuantAttention(QuantAttention):
    """QuantAttention with timm's ViT Attention call signature."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,  # type: ignore[override]
                num_queries: int | None = None) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported by the quantized ViT attention")
        return super().forward(x, num_queries=num_queries)


def matches(model: nn.Module) -> bool:
    """True for timm VisionTransformer and its subclasses (DeiT distilled)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def quantize_(model: nn.Module, policy: QuantPolicy) -> nn.Module:
    """Rewrite a timm VisionTransformer in place into the quantized layout."""
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    # register tokens (e.g. a transformers DeiT's distillation token read by no head) are FP prefix tokens like
    # cls_token: the rewrite leaves the embedding alone and `run_from` keeps every prefix row; attention pooling is refused
    if getattr(model, "attn_pool", None) is not None:
        raise ModelError("attn_pool: this ViT variant is not supported by the quantized layout")
    quantize_conv(model.patch_embed, "proj", policy.weight(edge=True), policy.act(edge=True))
    for i, block in enumerate(model.blocks):
        where = f"blocks.{i}"
        if type(block) is not Block:
            raise ModelError(f"{where}: block type {type(block).__name__} is not supported (only timm Block)")
        attn = block.attn
        if type(attn) is not Attention:
            raise ModelError(f"{where}.attn: attention type {type(attn).__name__} is not supported (only timm Attention)")
        check_is_identity(attn.q_norm, f"{where}.attn", "qk_norm")
        check_is_identity(attn.norm, f"{where}.attn", "scale_norm")
        if getattr(attn, "gate", None) is not None:
            raise ModelError(f"{where}.attn: gated attention is not supported by the quantized layout")
        block.attn = ViTQuantAttention(
            attn.qkv.in_features, attn.num_heads, attn.qkv, attn.proj, attn.scale, policy.bits,
            split=policy.split_qkv, per_channel=policy.per_channel,
            attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
        )
        if type(block.mlp) is not Mlp:
            raise ModelError(f"{where}.mlp: MLP type {type(block.mlp).__name__} is not supported (only timm Mlp)")
        quantize_linear(block.mlp, "fc1", policy.weight(), policy.act())
        quantize_linear(block.mlp, "fc2", policy.weight(), policy.gelu_out())
    for head in ("head", "head_dist"):
        if isinstance(getattr(model, head, None), nn.Linear):
            quantize_linear(model, head, policy.weight(edge=True), policy.act(edge=True))
    check_fully_quantized(model)
    return model


def block_names(model: nn.Module) -> list[str]:
    """Names of the residual blocks in execution order (the segments `block_inputs`/`run_from` index)."""
    return [f"blocks.{i}" for i in range(len(model.blocks))]


def block_inputs(model: nn.Module, images: Tensor) -> list[Tensor]:
    """The input of every block, then the input of the tail (final norm + head), from one forward pass."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    hidden = []
    for block in model.blocks:
        hidden.append(x)
        x = block(x)
    return hidden + [x]


def run_from(model: nn.Module, index: int, hidden: Tensor) -> Tensor:
    """Logits from the input of block `index` (`len(blocks)` = the tail): blocks index.. then norm and head.

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
