"""The CaiT family: timm `Cait` (class-attention image transformers), method.md §3 layout adapted to its two block kinds.

Self-attention blocks (`blocks`, talking-heads attention): the fused `qkv` is split into `q`, `k`, `v`
with their own steps, Q/K/V quantized signed, as in ViT. Talking heads add two head-mixing Linears
(heads x heads, applied at every query-key position): `proj_l` mixes the logits before the softmax and
`proj_w` the probabilities after it. The logits stay FP (method.md §3 item 4: `Q K^T * scale` and softmax
run in FP), so `proj_l` quantizes only its weights; the softmax output is quantized unsigned as
`proj_w`'s input; `proj_w`'s output, the left operand of `attn @ V`, can be negative (mixed
probabilities) and is quantized signed (`mixed_quant`). Both mixing matrices have 8-bit weights: they
are tiny (heads^2) and every attention entry passes through them, like the edge layers.

Class-attention blocks (`blocks_token_only`): only the class token queries; its `q`, `k`, `v` are separate
Linears in the stock model (kept, each with its own step) behind one shared input quantizer on
`norm1([cls, tokens])`, then Q/K/V, softmax and `attn @ V` quantized as in self-attention.

LayerScale (`gamma_1`, `gamma_2`), LayerNorms, the class token and position embedding stay FP; MLPs as
in ViT (fc2's GELU input unsigned with a learned offset); patch embedding and head 8-bit.
No transformers class: CaiT has none.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..quant import QLinear, QuantAttention, make_quantizer
from .base import Family, QuantPolicy, check_mlp, class_name, quantize_mlp, register_family, require
from .blocks import quantize_blocks_

CAIT = "timm.models.cait"


class CaitQuantTalkingHeadAttention(QuantAttention):
    """timm's `TalkingHeadAttn`: QuantAttention whose logits and probabilities are mixed across heads (see the module doc)."""

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        super().__init__(**policy.attention_args(stock))
        self.proj_l = QLinear.from_float(stock.proj_l, policy.weight(edge=True), None)  # on the FP logits
        self.proj_w = QLinear.from_float(stock.proj_w, policy.weight(edge=True), None)  # on the quantized softmax output
        self.mixed_quant = make_quantizer(policy.act(), "act")

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        b, n, _ = x.shape
        q, k, v = self.project(x, n)
        attn = self.proj_l(((q * self.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.softmax_quant(attn.softmax(dim=-1))
        attn = self.mixed_quant(self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(out))


class CaitQuantClassAttention(QuantAttention):
    """timm's `ClassAttn`: the class token (row 0) attends over `[cls, tokens]` with the stock model's separate q, k, v."""

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        # separate q/k/v projections: split whatever the policy says (one fused step would need one fused Linear)
        super().__init__(**policy.attention_args(stock, qkv=(stock.q, stock.k, stock.v), split=True))

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, num_queries=1)


def _check_linears(module: nn.Module, names: tuple[str, ...], where: str) -> None:
    for name in names:
        require(type(getattr(module, name)) is nn.Linear, f"{where}.{name}", f"layer type {type(getattr(module, name)).__name__}")


@register_family(f"{CAIT}.Cait")
class CaitFamily(Family):
    """timm Cait: talking-heads self-attention blocks, then class-attention blocks on the class token, LayerScale."""

    name = "cait"
    patterns = ("cait_*",)

    def check(self, model: nn.Module) -> None:
        require(type(model.patch_embed.proj) is nn.Conv2d, "patch_embed.proj", f"patch embedding {type(model.patch_embed.proj).__name__}")
        kinds = (("blocks", f"{CAIT}.LayerScaleBlock", f"{CAIT}.TalkingHeadAttn", ("qkv", "proj", "proj_l", "proj_w")),
                 ("blocks_token_only", f"{CAIT}.LayerScaleBlockClassAttn", f"{CAIT}.ClassAttn", ("q", "k", "v", "proj")))
        for attr, block_cls, attn_cls, linears in kinds:
            for i, block in enumerate(getattr(model, attr)):
                where = f"{attr}.{i}"
                require(class_name(block) == block_cls, where, f"block type {type(block).__name__} (only timm {block_cls.rpartition('.')[2]})")
                require(class_name(block.attn) == attn_cls, f"{where}.attn",
                        f"attention type {type(block.attn).__name__} (only timm {attn_cls.rpartition('.')[2]})")
                _check_linears(block.attn, linears, f"{where}.attn")
                check_mlp(block.mlp, where)

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        quantize_blocks_(model, policy, CaitQuantTalkingHeadAttention)  # patch embedding, self-attention blocks, head
        for block in model.blocks_token_only:
            block.attn = CaitQuantClassAttention(block.attn, policy)
            quantize_mlp(block.mlp, policy)
        return model

    def stock_name(self, path: str) -> tuple[str, int | None]:
        """Class attention keeps the stock model's separate `q`, `k`, `v`; the talking-heads `q`, `k`, `v` are thirds of `qkv`."""
        if re.match(r"blocks_token_only\.\d+\.attn\.[qkv](?=\.|$)", path):
            return path, None
        return super().stock_name(path)

    def block_names(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))] + [f"blocks_token_only.{i}" for i in range(len(model.blocks_token_only))]

    def block_inputs(self, model: nn.Module, images: Tensor) -> list[Tensor]:
        """Self-attention blocks take the patch tokens; class-attention blocks `[cls, patch tokens]` (cls updated, tokens not)."""
        x = model.pos_drop(model.patch_embed(images) + model.pos_embed)
        hidden = []
        for block in model.blocks:
            hidden.append(x)
            x = block(x)
        u = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in model.blocks_token_only:
            hidden.append(u)
            u = torch.cat((block(u[:, 1:], u[:, :1]), u[:, 1:]), dim=1)
        return [*hidden, u]

    def run_from(self, model: nn.Module, index: int, hidden: Tensor) -> Tensor:
        depth = len(model.blocks)
        if index < depth:
            for block in model.blocks[index:]:
                hidden = block(hidden)
            hidden = torch.cat((model.cls_token.expand(hidden.shape[0], -1, -1), hidden), dim=1)
        for block in model.blocks_token_only[max(index - depth, 0):]:
            hidden = torch.cat((block(hidden[:, 1:], hidden[:, :1]), hidden[:, 1:]), dim=1)
        return model.forward_head(model.norm(hidden))
