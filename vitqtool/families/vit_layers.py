"""The ViT family's quantized layers (`families/vit.py` is the plugin): timm's Attention, SigLIP's attention pool
and the parallel blocks rewritten with quantized operands, and the checks that say what each rewrite covers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant import QLinear, QuantAttention, QuantAttentionPool, Quantizer, QuantSpec, attend, make_quantizer, slice_rows, split_heads
from .base import QuantPolicy, class_name, is_identity, require, require_gelu
from .blocks import check_block_mlp, quantize_block_mlp


class ViTQuantAttention(QuantAttention):
    """QuantAttention with timm's ViT Attention call signature."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,  # type: ignore[override]
                num_queries: int | None = None) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported by the quantized ViT attention")
        return super().forward(x, num_queries=num_queries)


class ViTQuantAttentionPool(QuantAttentionPool):
    """timm's `AttentionPoolLatent` (SigLIP's MAP head): the quantized latent attention, then LayerNorm (FP) and the
    quantized MLP with a residual, then the pool over the latents, all at the block bits (method.md §3 as a block)."""

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        super().__init__(stock.latent, stock.q, stock.kv, stock.proj, stock.num_heads, stock.scale, policy.bits,
                         split=policy.split_qkv, per_channel=policy.per_channel, proj_drop=stock.proj_drop.p,
                         method=policy.method)
        self.norm, self.mlp, self.pool = stock.norm, stock.mlp, stock.pool
        quantize_block_mlp(self, policy)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if attn_mask is not None:
            raise ValueError("attention masks are not supported by the quantized attention pool")
        x = super().forward(x)
        x = x + self.mlp(self.norm(x))
        return x[:, 0] if self.pool == "token" else x.mean(1) if self.pool == "avg" else x


BLOCK = "timm.models.vision_transformer.Block"
POST_NORM_BLOCK = "timm.models.vision_transformer.ResPostBlock"  # x + norm1(attn(x)): the quantizers read the residual
PARALLEL_BLOCK = "timm.models.vision_transformer.ParallelThingsBlock"
SCALING_BLOCK = "timm.models.vision_transformer.ParallelScalingBlock"


def check_attention(attn: nn.Module, where: str) -> None:
    """The attention `ViTQuantAttention` replaces: timm Attention with a fused Linear qkv and no gate (qk-norm and
    scale-norm are FP norms that QuantAttention applies before the Q/K and `proj` input quantizers)."""
    require(class_name(attn) == "timm.layers.attention.Attention", where, f"attention type {type(attn).__name__} (only timm Attention)")
    require(getattr(attn, "gate", None) is None, where, "gated attention")
    require(type(attn.qkv) is nn.Linear and type(attn.proj) is nn.Linear, where, "non-Linear qkv/proj")


def check_attention_pool(pool: nn.Module) -> None:
    """SigLIP's MAP head as `ViTQuantAttentionPool` covers it: latent query projection, fused kv, proj and a GELU MLP."""
    require(class_name(pool) == "timm.layers.attention_pool.AttentionPoolLatent", "attn_pool",
            f"attention pooling {type(pool).__name__} (only AttentionPoolLatent, global_pool='map')")
    require(pool.pos_embed is None, "attn_pool", "a position embedding inside the attention pool")
    require(is_identity(pool.q_norm) and is_identity(pool.k_norm), "attn_pool", f"qk_norm ({type(pool.q_norm).__name__})")
    require(all(type(getattr(pool, n)) is nn.Linear for n in ("q", "kv", "proj")), "attn_pool",
            "an attention pool without its query or output projection (q_proj=False, out_features=0)")
    check_block_mlp(pool.mlp, "attn_pool")


def quantize_attention(parent: nn.Module, policy: QuantPolicy) -> None:
    """Swap `parent.attn` (a timm Attention) for a `ViTQuantAttention` sharing its weights."""
    parent.attn = ViTQuantAttention(**policy.attention_args(parent.attn))


class ViTQuantParallelScalingBlock(nn.Module):
    """timm's `ParallelScalingBlock` (ViT-22B style): one in-projection feeds the MLP and the attention in parallel.

    The in-projection `[fc1 | q | k | v]` is split into `fc1`, `q`, `k`, `v`, each with its own weight step, behind
    one signed input quantizer on the norm output (`split_qkv` off: one fused `in_proj`, one step, and one quantizer
    on the q/k/v part of its output); Q/K/V signed, softmax output unsigned; `attn @ V` signed as the input of
    `attn_out_proj`, the GELU output unsigned with a learned offset as the input of `mlp_out_proj`. `mlp_bias`
    (when the in-projection has no bias), the q/k norms (applied before the Q/K quantizers), LayerScale and the
    norm stay FP.
    """

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = stock.num_heads, stock.head_dim, stock.scale
        self.in_split = list(stock.in_split)  # [mlp hidden, dim, dim, dim]
        self.split = policy.split_qkv
        self.in_norm = stock.in_norm
        self.input_quant = make_quantizer(policy.act(), "act")
        if self.split:
            edges = torch.tensor([0, *self.in_split]).cumsum(0).tolist()
            for i, name in enumerate(SCALING_PARTS):
                setattr(self, name, QLinear.from_float(slice_rows(stock.in_proj, edges[i], edges[i + 1]), policy.weight(), None))
                if name != "fc1":
                    setattr(self, f"{name}_quant", make_quantizer(policy.act(), "act"))
        else:
            self.in_proj = QLinear.from_float(stock.in_proj, policy.weight(), None)
            self.qkv_quant = make_quantizer(policy.act(), "act")
        self.mlp_bias = stock.mlp_bias
        self.q_norm, self.k_norm = stock.q_norm, stock.k_norm  # FP per-head norms, before the Q/K quantizers
        self.softmax_quant = make_quantizer(QuantSpec(policy.bits, signed=False, method=policy.method), "act")
        self.attn_drop, self.mlp_drop, self.mlp_act = stock.attn_drop, stock.mlp_drop, stock.mlp_act
        self.attn_out_proj = QLinear.from_float(stock.attn_out_proj, policy.weight(), policy.act())
        self.mlp_out_proj = QLinear.from_float(stock.mlp_out_proj, policy.weight(), policy.gelu_out())
        self.ls, self.drop_path = stock.ls, stock.drop_path

    def _normed(self, t: Tensor, norm: nn.Module) -> Tensor:
        """`norm` over each head of a `[B, N, heads * head_dim]` projection output (timm's q/k norm; Identity: as is).

        A reshape from the tensor's own shape, not `unflatten`: torch.onnx traces `unflatten` with the trace's batch size fixed.
        """
        b, n, _ = t.shape
        return norm(t.reshape(b, n, self.num_heads, self.head_dim)).flatten(-2)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported by the quantized parallel block")
        b, n, c = x.shape
        y = self.input_quant(self.in_norm(x))
        if self.split:
            x_mlp = self.fc1(y)
            q, k = self.q_quant(self._normed(self.q(y), self.q_norm)), self.k_quant(self._normed(self.k(y), self.k_norm))
            v = self.v_quant(self.v(y))
        else:
            x_mlp, q, k, v = torch.split(self.in_proj(y), self.in_split, dim=-1)
            qkv = torch.cat([self._normed(q, self.q_norm), self._normed(k, self.k_norm), v], dim=-1)
            q, k, v = self.qkv_quant(qkv).split(c, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
        x_attn = attend(q, k, v, self.scale, self.softmax_quant, self.attn_drop)
        y = self.attn_out_proj(x_attn.transpose(1, 2).reshape(b, n, c)) + self.mlp_out_proj(self.mlp_drop(self.mlp_act(x_mlp)))
        return x + self.drop_path(self.ls(y))

    def fused_parts(self) -> tuple[tuple[str, ...], Quantizer]:
        """`fc1`, `q`, `k`, `v` are the row blocks of the stock `in_proj` (or the fused `in_proj` itself)."""
        return (SCALING_PARTS if self.split else ("in_proj",)), self.input_quant


SCALING_PARTS = ("fc1", "q", "k", "v")  # the row blocks of a ParallelScalingBlock's in_proj, in order


def check_parallel_scaling(block: nn.Module, where: str) -> None:
    """What `ViTQuantParallelScalingBlock` covers: separate output projections and a GELU-shaped activation."""
    require(block.out_proj is None, f"{where}.out_proj", "a fused output projection over [attention output, GELU output] "
            "(fuse_out_proj=True: its two input halves need different quantizers)")
    require_gelu(block.mlp_act, f"{where}.mlp_act")
    for name in ("in_proj", "attn_out_proj", "mlp_out_proj"):
        require(type(getattr(block, name)) is nn.Linear, f"{where}.{name}", f"layer type {type(getattr(block, name)).__name__}")
