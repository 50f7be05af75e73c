"""Adapter for timm `SwinTransformer` (V1): method.md §3 layout inside each window.

Window attention becomes a `QuantAttention` whose logits get the relative-position bias and the
shift mask (both FP); MLPs as in ViT; patch embedding, classifier head and patch-merging
reduction weights are 8-bit (patch merging's input stays FP, as in the reference).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..quant import QuantAttention
from .base import QuantPolicy, SegmentedAdapter, check_mlp, class_name, is_identity, quantize_conv, quantize_linear, register_adapter, require


class SwinQuantWindowAttention(nn.Module):
    """Window attention: relative-position bias + shift mask added to the quantized attention's logits."""

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        super().__init__()
        self.window_area = stock.window_area
        self.num_heads = stock.num_heads
        self.relative_position_bias_table = stock.relative_position_bias_table
        self.register_buffer("relative_position_index", stock.relative_position_index.clone(), persistent=False)
        self.core = QuantAttention(
            stock.qkv.in_features, stock.num_heads, stock.qkv, stock.proj, stock.scale, policy.bits,
            split=policy.split_qkv, per_channel=policy.per_channel,
            attn_drop=stock.attn_drop.p, proj_drop=stock.proj_drop.p, method=policy.method,
        )

    def _rel_pos_bias(self) -> Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # 1, heads, N, N

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        bias = self._rel_pos_bias()
        if mask is not None:  # mask: windows, N, N (0 / -100), windows vary fastest along the batch
            num_win, n = mask.shape[0], x.shape[1]
            bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(x.shape[0] // num_win, -1, -1, -1, -1)
            bias = bias.reshape(-1, self.num_heads, n, n)
        return self.core(x, attn_bias=bias)


@register_adapter("timm.models.swin_transformer.SwinTransformer")
class SwinAdapter(SegmentedAdapter):
    """timm SwinTransformer V1: window attention with relative-position bias, GELU MLPs, patch merging."""

    family = "swin"
    patterns = ("swin_*",)
    stem_attr, stages_attr, pre_head_attr = "patch_embed", "layers", "norm"  # segments: patch merging, then blocks, per stage

    def check(self, model: nn.Module) -> None:
        require(type(model.patch_embed.proj) is nn.Conv2d, "patch_embed.proj", f"patch embedding {type(model.patch_embed.proj).__name__}")
        for si, stage in enumerate(model.layers):
            require(is_identity(stage.downsample) or class_name(stage.downsample) == "timm.models.swin_transformer.PatchMerging",
                    f"layers.{si}.downsample", f"downsampling {type(stage.downsample).__name__}")
            for bi, block in enumerate(stage.blocks):
                where = f"layers.{si}.blocks.{bi}"
                require(class_name(block) == "timm.models.swin_transformer.SwinTransformerBlock", where,
                        f"block type {type(block).__name__} (only timm SwinTransformerBlock)")
                require(class_name(block.attn) == "timm.models.swin_transformer.WindowAttention", f"{where}.attn",
                        f"attention type {type(block.attn).__name__} (only timm WindowAttention)")
                check_mlp(block.mlp, where)

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        quantize_conv(model.patch_embed, "proj", policy.weight(edge=True), policy.act(edge=True))
        for stage in model.layers:
            if not is_identity(stage.downsample):
                quantize_linear(stage.downsample, "reduction", policy.weight(edge=True), None)
            for block in stage.blocks:
                block.attn = SwinQuantWindowAttention(block.attn, policy)
                quantize_linear(block.mlp, "fc1", policy.weight(), policy.act())
                quantize_linear(block.mlp, "fc2", policy.weight(), policy.gelu_out())
        if isinstance(model.head.fc, nn.Linear):
            quantize_linear(model.head, "fc", policy.weight(edge=True), policy.act(edge=True))
        return model
