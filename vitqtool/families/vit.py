"""The ViT family: timm `VisionTransformer` (ViT, DeiT) and `VisionTransformerDistilled`, method.md §3 layout.

Per block: the fused `qkv` Attention becomes a `QuantAttention` (split q/k/v with their own steps,
quantized Q/K/V, softmax output and attn@V); MLP fc1/fc2 become QLinear with fc2's input (the GELU
output) unsigned with a learned offset. Patch embedding and classifier heads are 8-bit.

transformers classes (transformers 5.24, timm 1.0.31; tests check the numerics):
- ViT/DeiT LayerNorms use `layer_norm_eps` (1e-12 by default; timm's ViT default is 1e-6), so the
  eps travels as the plain field `layer_norm_eps` in model_args and `hf_map.timm_kwargs` rebuilds the norm.
- `DeiTForImageClassification` runs the distillation token through the encoder but reads only the
  class token: that is a timm ViT with one register token (`reg_tokens=1`, pooled on the class token).
  `DeiTForImageClassificationWithTeacher` averages both heads: timm's `deit_*_distilled` in eval mode.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from torch import Tensor, nn

from ..errors import ModelError
from ..quant import QuantAttention
from .base import Family, NormPair, QuantPolicy, block_norm_pairs, check_mlp, class_name, is_identity, quantize_conv, quantize_linear, register_family, require
from .hf_map import (NORM_EPS_ARG, Names, TransformersMap, bool_field, check_field, int_field, pair_field, prob_field,
                     squash_processor_config)

PROCESSOR_TYPES = frozenset({"ViTImageProcessor", "ViTImageProcessorFast", "ViTImageProcessorPil", "ViTFeatureExtractor",
                             "DeiTImageProcessor", "DeiTImageProcessorFast", "DeiTImageProcessorPil", "DeiTFeatureExtractor"})


class ViTMap(TransformersMap):
    """`ViTForImageClassification`: a timm ViT pooled on the class token."""

    hf_class, model_type, prefix = "ViTForImageClassification", "vit", "vit"
    fields = frozenset({"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                        "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "image_size", "patch_size",
                        "num_channels", "qkv_bias", "head_dim"})
    ignored = frozenset({"encoder_stride", "pooler_output_size", "pooler_act"})
    processor_types = PROCESSOR_TYPES
    timm_names: ClassVar[tuple[tuple[str, tuple[Any, ...]], ...]] = (
        ("vit_tiny_patch16_224", (192, 12, 3, 16)), ("vit_small_patch16_224", (384, 12, 6, 16)),
        ("vit_small_patch32_224", (384, 12, 6, 32)), ("vit_base_patch16_224", (768, 12, 12, 16)),
        ("vit_base_patch32_224", (768, 12, 12, 32)), ("vit_large_patch16_224", (1024, 24, 16, 16)),
        ("vit_large_patch32_224", (1024, 24, 16, 32)), ("vit_huge_patch14_224", (1280, 32, 16, 14)))
    distillation_token: ClassVar[str | None] = None  # timm parameter holding the transformers distillation token
    heads: ClassVar[tuple[tuple[str, str], ...]] = (("head", "classifier"),)

    def model_args(self, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        check_field(config, "hidden_act", "gelu", where, "only exact GELU (nn.GELU) is mapped to timm")
        dim = int_field(config, "hidden_size", where, 768)
        heads = int_field(config, "num_attention_heads", where, 12)
        if dim % heads:
            raise ModelError(f"{where}: field 'num_attention_heads' ({heads}) does not divide hidden_size ({dim})")
        check_field(config, "head_dim", dim // heads, where, "timm ViT heads are hidden_size / num_attention_heads wide")
        hidden = int_field(config, "intermediate_size", where, 3072)
        mlp_ratio = hidden / dim
        if int(dim * mlp_ratio) != hidden:
            raise ModelError(f"{where}: field 'intermediate_size' ({hidden}) is not int(hidden_size * ratio) for any float ratio")
        eps = config.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ModelError(f"{where}: field 'layer_norm_eps' must be a small positive number, found {eps!r}")
        hidden_drop = prob_field(config, "hidden_dropout_prob", where)
        return {
            "img_size": pair_field(config, "image_size", where, 224), "patch_size": pair_field(config, "patch_size", where, 16),
            "in_chans": int_field(config, "num_channels", where, 3), "embed_dim": dim,
            "depth": int_field(config, "num_hidden_layers", where, 12), "num_heads": heads, "mlp_ratio": mlp_ratio,
            "qkv_bias": bool_field(config, "qkv_bias", where, True), NORM_EPS_ARG: float(eps), "global_pool": "token",
            "class_token": True,
            # training only (eval is dropout-free); timm also drops after the GELU, transformers does not
            "pos_drop_rate": hidden_drop, "proj_drop_rate": hidden_drop,
            "attn_drop_rate": prob_field(config, "attention_probs_dropout_prob", where),
        }

    def signature(self, model_args: Mapping[str, Any]) -> tuple[Any, ...]:
        patch = model_args["patch_size"]
        return (model_args["embed_dim"], model_args["depth"], model_args["num_heads"], patch if isinstance(patch, int) else patch[0])

    def key_map(self, model_args: Mapping[str, Any]) -> list[Names]:
        p = self.prefix
        rows = [Names("cls_token", (f"{p}.embeddings.cls_token",)),
                Names("pos_embed", (f"{p}.embeddings.position_embeddings",)),
                Names("patch_embed.proj", (f"{p}.embeddings.patch_embeddings.projection",))]
        if self.distillation_token:
            rows.append(Names(self.distillation_token, (f"{p}.embeddings.distillation_token",)))
        for i in range(model_args["depth"]):
            hf, rt = f"{p}.encoder.layer.{i}", f"{p}.layers.{i}"
            rows += [
                Names(f"blocks.{i}.norm1", (f"{hf}.layernorm_before",)),
                Names(f"blocks.{i}.attn.qkv", tuple(f"{hf}.attention.attention.{n}" for n in ("query", "key", "value")),
                      tuple(f"{rt}.attention.{n}_proj" for n in "qkv")),
                Names(f"blocks.{i}.attn.proj", (f"{hf}.attention.output.dense",), (f"{rt}.attention.o_proj",)),
                Names(f"blocks.{i}.norm2", (f"{hf}.layernorm_after",)),
                Names(f"blocks.{i}.mlp.fc1", (f"{hf}.intermediate.dense",), (f"{rt}.mlp.fc1",)),
                Names(f"blocks.{i}.mlp.fc2", (f"{hf}.output.dense",), (f"{rt}.mlp.fc2",)),
            ]
        rows.append(Names("norm", (f"{p}.layernorm",)))
        return rows + [Names(timm, (hf,)) for timm, hf in self.heads]

    def processor_config(self, data_config: Mapping[str, Any]) -> dict[str, Any] | None:
        return squash_processor_config(data_config, "ViTImageProcessor", "DeiTImageProcessor")


class DeiTMap(ViTMap):
    """`DeiTForImageClassification`: the distillation token runs through the encoder, no head reads it (a register token)."""

    hf_class, model_type, prefix = "DeiTForImageClassification", "deit", "deit"
    timm_names = (("deit_tiny_patch16_224", (192, 12, 3, 16)), ("deit_small_patch16_224", (384, 12, 6, 16)),
                  ("deit_base_patch16_224", (768, 12, 12, 16)))
    distillation_token = "reg_token"

    def model_args(self, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {**super().model_args(config, where), "reg_tokens": 1}


class DeiTDistilledMap(ViTMap):
    """`DeiTForImageClassificationWithTeacher`: class and distillation heads averaged (timm's distilled DeiT in eval)."""

    hf_class, model_type, prefix = "DeiTForImageClassificationWithTeacher", "deit", "deit"
    timm_names = (("deit_tiny_distilled_patch16_224", (192, 12, 3, 16)), ("deit_small_distilled_patch16_224", (384, 12, 6, 16)),
                  ("deit_base_distilled_patch16_224", (768, 12, 12, 16)))
    distillation_token = "dist_token"
    heads = (("head", "cls_classifier"), ("head_dist", "distillation_classifier"))


class ViTQuantAttention(QuantAttention):
    """QuantAttention with timm's ViT Attention call signature."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,  # type: ignore[override]
                num_queries: int | None = None) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported by the quantized ViT attention")
        return super().forward(x, num_queries=num_queries)


@register_family("timm.models.vision_transformer.VisionTransformer", "timm.models.deit.VisionTransformerDistilled")
class ViTFamily(Family):
    """timm VisionTransformer with plain pre-norm blocks, fused-qkv attention and a GELU MLP."""

    name = "vit"
    patterns = ("vit_*", "deit_*", "deit3_*")
    transformers = (ViTMap(), DeiTMap(), DeiTDistilledMap())

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

    def norm_pairs(self, model: nn.Module) -> list[NormPair]:
        """Per block: norm1 -> attention input quantizer -> q, k, v (or the fused qkv); norm2 -> fc1's input quantizer -> fc1."""
        return [pair for i, block in enumerate(model.blocks) for pair in block_norm_pairs(block, f"blocks.{i}", "attn")]
