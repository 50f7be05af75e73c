"""Adapter for timm `SwinTransformer` (V1): method.md §3 layout inside each window.

Window attention becomes a `QuantAttention` whose logits get the relative-position bias and the
shift mask (both FP); MLPs as in ViT; patch embedding, classifier head and patch-merging
reduction weights are 8-bit (patch merging's input stays FP, as in the reference).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ModelError
from ..quant import QuantAttention
from .base import QuantPolicy, check_fully_quantized, quantize_conv, quantize_linear

PATTERNS = ("swin_*",)


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
            attn_drop=stock.attn_drop.p, proj_drop=stock.proj_drop.p,
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


def matches(model: nn.Module) -> bool:
    """True for timm SwinTransformer (V1)."""
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def quantize_(model: nn.Module, policy: QuantPolicy) -> nn.Module:
    """Rewrite a timm SwinTransformer in place into the quantized layout."""
    from timm.layers import Mlp
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention

    quantize_conv(model.patch_embed, "proj", policy.weight(edge=True), policy.act(edge=True))
    for si, stage in enumerate(model.layers):
        if isinstance(stage.downsample, PatchMerging):
            quantize_linear(stage.downsample, "reduction", policy.weight(edge=True), None)
        elif not isinstance(stage.downsample, nn.Identity):
            raise ModelError(f"layers.{si}.downsample: {type(stage.downsample).__name__} is not supported")
        for bi, block in enumerate(stage.blocks):
            where = f"layers.{si}.blocks.{bi}"
            if type(block) is not SwinTransformerBlock:
                raise ModelError(f"{where}: block type {type(block).__name__} is not supported (only timm SwinTransformerBlock)")
            if type(block.attn) is not WindowAttention:
                raise ModelError(f"{where}.attn: {type(block.attn).__name__} is not supported (only timm WindowAttention)")
            block.attn = SwinQuantWindowAttention(block.attn, policy)
            if type(block.mlp) is not Mlp:
                raise ModelError(f"{where}.mlp: MLP type {type(block.mlp).__name__} is not supported (only timm Mlp)")
            quantize_linear(block.mlp, "fc1", policy.weight(), policy.act())
            quantize_linear(block.mlp, "fc2", policy.weight(), policy.gelu_out())
    if isinstance(model.head.fc, nn.Linear):
        quantize_linear(model.head, "fc", policy.weight(edge=True), policy.act(edge=True))
    check_fully_quantized(model)
    return model


def _segments(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Patch merging of each stage (when present) and its blocks, in execution order."""
    out: list[tuple[str, nn.Module]] = []
    for si, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, nn.Identity):
            out.append((f"layers.{si}.downsample", stage.downsample))
        out += [(f"layers.{si}.blocks.{bi}", block) for bi, block in enumerate(stage.blocks)]
    return out


def block_names(model: nn.Module) -> list[str]:
    """Names of the segments (patch merging and residual blocks) that `block_inputs`/`run_from` index."""
    return [name for name, _ in _segments(model)]


def block_inputs(model: nn.Module, images: Tensor) -> list[Tensor]:
    """The input of every segment, then the input of the tail (final norm + head), from one forward pass."""
    x = model.patch_embed(images)
    hidden = []
    for _, segment in _segments(model):
        hidden.append(x)
        x = segment(x)
    return hidden + [x]


def run_from(model: nn.Module, index: int, hidden: Tensor) -> Tensor:
    """Logits from the input of segment `index` (`len(block_names)` = the tail): segments index.., norm, head."""
    for _, segment in _segments(model)[index:]:
        hidden = segment(hidden)
    return model.forward_head(model.norm(hidden))
