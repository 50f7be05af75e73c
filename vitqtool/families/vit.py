"""The ViT family: timm `VisionTransformer` (ViT, DeiT, CLIP, SigLIP, DINOv2) and `VisionTransformerDistilled`, method.md §3 layout.

Per block: the fused `qkv` Attention becomes a `QuantAttention` (split q/k/v with their own steps,
quantized Q/K/V, softmax output and attn@V); MLP fc1/fc2 become QLinear with fc2's input (the GELU,
GELU-tanh or QuickGELU output) unsigned with a learned offset. Patch embedding and classifier heads
are 8-bit. SigLIP's attention-pool head (`global_pool='map'`) becomes a `QuantAttentionPool` plus its
quantized MLP at the block bits (`ViTQuantAttentionPool`); `ParallelThingsBlock`s are quantized branch
by branch like plain blocks, a `ParallelScalingBlock`'s in-projection is split into fc1/q/k/v
(`ViTQuantParallelScalingBlock`). The quantized layers live in `vit_layers.py`; docs/families.md says why.

transformers classes (transformers 5.24, timm 1.0.31; tests check the numerics):
- ViT/DeiT LayerNorms use `layer_norm_eps` (1e-12 by default; timm's ViT default is 1e-6), so the
  eps travels as the plain field `layer_norm_eps` in model_args and `hf_map.timm_kwargs` rebuilds the norm.
- `DeiTForImageClassification` runs the distillation token through the encoder but reads only the
  class token: that is a timm ViT with one register token (`reg_tokens=1`, pooled on the class token).
  `DeiTForImageClassificationWithTeacher` averages both heads: timm's `deit_*_distilled` in eval mode.
- `SiglipForImageClassification` mean-pools every token of the vision tower's output (after its final
  LayerNorm) into the classifier: timm's `vit_*_siglip_gap_*` (no class token, `global_pool='avg'`,
  `fc_norm=False`). It never reads the tower's attention-pool head (`vision_model.head`): not loaded,
  and an export writes `vision_use_head: false`. Its position table is an `nn.Embedding` ([N, D]).
- `Dinov2ForImageClassification` (and its register variant) classify `[class token, mean of patch
  tokens]`: no timm pooling computes that concatenation, so they are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import ModelError
from .base import Family, NormPair, QuantPolicy, block_norm_pairs, class_name, quantize_conv, quantize_linear, register_family, require
from .blocks import check_block_mlp, quantize_block_mlp
from .hf_map import (
    NORM_EPS_ARG,
    Names,
    TransformersMap,
    bool_field,
    check_field,
    int_field,
    pair_field,
    prob_field,
    squash_processor_config,
    sub_config,
)
from .vit_layers import (
    BLOCK,
    PARALLEL_BLOCK,
    POST_NORM_BLOCK,
    SCALING_BLOCK,
    SCALING_PARTS,
    ViTQuantAttention,
    ViTQuantAttentionPool,
    ViTQuantParallelScalingBlock,
    check_attention,
    check_attention_pool,
    check_parallel_scaling,
    quantize_attention,
)

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
        args = tower_args(config, where, eps_default=1e-12)
        check_field(config, "head_dim", args["embed_dim"] // args["num_heads"], where,
                    "timm ViT heads are hidden_size / num_attention_heads wide")
        hidden_drop = prob_field(config, "hidden_dropout_prob", where)
        return {
            **args, "qkv_bias": bool_field(config, "qkv_bias", where, True), "global_pool": "token", "class_token": True,
            # training only (eval is dropout-free); timm also drops after the GELU, transformers does not
            "pos_drop_rate": hidden_drop, "proj_drop_rate": hidden_drop,
            "attn_drop_rate": prob_field(config, "attention_probs_dropout_prob", where),
        }

    def signature(self, model_args: Mapping[str, Any]) -> tuple[Any, ...]:
        return tower_signature(model_args)

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


def tower_args(config: Mapping[str, Any], where: str, eps_default: float) -> dict[str, Any]:
    """timm ViT kwargs from the fields every transformers ViT-style tower shares (width, depth, heads, MLP, norm eps, sizes)."""
    dim = int_field(config, "hidden_size", where, 768)
    heads = int_field(config, "num_attention_heads", where, 12)
    if dim % heads:
        raise ModelError(f"{where}: field 'num_attention_heads' ({heads}) does not divide hidden_size ({dim})")
    hidden = int_field(config, "intermediate_size", where, 3072)
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:
        raise ModelError(f"{where}: field 'intermediate_size' ({hidden}) is not int(hidden_size * ratio) for any float ratio")
    eps = config.get("layer_norm_eps", eps_default)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ModelError(f"{where}: field 'layer_norm_eps' must be a small positive number, found {eps!r}")
    return {"img_size": pair_field(config, "image_size", where, 224), "patch_size": pair_field(config, "patch_size", where, 16),
            "in_chans": int_field(config, "num_channels", where, 3), "embed_dim": dim,
            "depth": int_field(config, "num_hidden_layers", where, 12), "num_heads": heads, "mlp_ratio": mlp_ratio,
            NORM_EPS_ARG: float(eps)}


def tower_signature(model_args: Mapping[str, Any]) -> tuple[Any, ...]:
    """(width, depth, heads, patch): what the closest timm name is chosen on."""
    patch = model_args["patch_size"]
    return (model_args["embed_dim"], model_args["depth"], model_args["num_heads"], patch if isinstance(patch, int) else patch[0])


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


SIGLIP_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}  # transformers -> timm act_layer


class SiglipMap(TransformersMap):
    """`SiglipForImageClassification`: the SigLIP vision tower mean-pooled over all tokens after its final norm."""

    hf_class, model_type = "SiglipForImageClassification", "siglip"
    fields = frozenset({"vision_config"})
    ignored = frozenset({"text_config", "initializer_factor"})  # the classification model builds no text tower
    vision_fields = frozenset({"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                               "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
                               "vision_use_head", "model_type"})
    processor_types = PROCESSOR_TYPES | {"SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil"}
    timm_names = (("vit_base_patch16_siglip_gap_224", (768, 12, 12, 16)), ("vit_base_patch32_siglip_gap_256", (768, 12, 12, 32)),
                  ("vit_large_patch16_siglip_gap_256", (1024, 24, 16, 16)), ("vit_so400m_patch14_siglip_gap_224", (1152, 27, 16, 14)),
                  ("vit_so400m_patch16_siglip_gap_256", (1152, 27, 16, 16)))

    def model_args(self, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        vision = sub_config(config, "vision_config", "siglip_vision_model", self.vision_fields, self.hf_class, where)
        where = f"{where} vision_config"
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if act not in SIGLIP_ACTS:
            raise ModelError(f"{where}: field 'hidden_act' = {act!r} is not supported (mapped: {', '.join(SIGLIP_ACTS)})")
        bool_field(vision, "vision_use_head", where, True)  # the head is never read for classification (`unread`)
        return {**tower_args(vision, where, eps_default=1e-6), "qkv_bias": True, "class_token": False, "global_pool": "avg",
                "fc_norm": False, "act_layer": SIGLIP_ACTS[act],
                "attn_drop_rate": prob_field(vision, "attention_dropout", where)}  # training only

    def signature(self, model_args: Mapping[str, Any]) -> tuple[Any, ...]:
        return tower_signature(model_args)

    def key_map(self, model_args: Mapping[str, Any]) -> list[Names]:
        p = "vision_model"
        rows = [Names("pos_embed", (f"{p}.embeddings.position_embedding.weight",), hf_view=(-1, model_args["embed_dim"])),
                Names("patch_embed.proj", (f"{p}.embeddings.patch_embedding",))]
        for i in range(model_args["depth"]):
            hf = f"{p}.encoder.layers.{i}"
            rows += [
                Names(f"blocks.{i}.norm1", (f"{hf}.layer_norm1",)),
                Names(f"blocks.{i}.attn.qkv", tuple(f"{hf}.self_attn.{n}_proj" for n in "qkv")),
                Names(f"blocks.{i}.attn.proj", (f"{hf}.self_attn.out_proj",)),
                Names(f"blocks.{i}.norm2", (f"{hf}.layer_norm2",)),
                Names(f"blocks.{i}.mlp.fc1", (f"{hf}.mlp.fc1",)),
                Names(f"blocks.{i}.mlp.fc2", (f"{hf}.mlp.fc2",)),
            ]
        return [*rows, Names("norm", (f"{p}.post_layernorm",)), Names("head", ("classifier",))]

    def unread(self, model_args: Mapping[str, Any]) -> tuple[str, ...]:
        return ("vision_model.head.",)  # the tower's attention-pool head: SiglipForImageClassification mean-pools instead

    def export_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "vision_config": {**config["vision_config"], "vision_use_head": False}}

    def processor_config(self, data_config: Mapping[str, Any]) -> dict[str, Any] | None:
        return squash_processor_config(data_config, "SiglipImageProcessor", "DeiTImageProcessor")


DINOV2_POOLING = ("its classifier reads [class token, mean of the patch tokens] concatenated (2 x hidden_size inputs), "
                  "which no timm VisionTransformer pooling computes; timm's DINOv2 models (vit_*_dinov2) are supported")


@register_family("timm.models.vision_transformer.VisionTransformer", "timm.models.deit.VisionTransformerDistilled")
class ViTFamily(Family):
    """timm VisionTransformer with pre-norm (or parallel) blocks, fused-qkv attention, a GELU MLP, token/avg/MAP pooling."""

    name = "vit"
    patterns = ("vit_*", "deit_*", "deit3_*")
    transformers = (ViTMap(), DeiTMap(), DeiTDistilledMap(), SiglipMap())
    unmapped = (("Dinov2ForImageClassification", DINOV2_POOLING), ("Dinov2WithRegistersForImageClassification", DINOV2_POOLING))

    def check(self, model: nn.Module) -> None:
        if getattr(model, "attn_pool", None) is not None:
            check_attention_pool(model.attn_pool)
        # register tokens (e.g. a transformers DeiT's distillation token that no head reads) are FP prefix tokens like
        # cls_token: the rewrite leaves the embedding alone and `run_from` keeps every prefix row
        require(type(model.patch_embed.proj) is nn.Conv2d, "patch_embed.proj", f"patch embedding {type(model.patch_embed.proj).__name__}")
        for i, block in enumerate(model.blocks):
            where = f"blocks.{i}"
            if class_name(block) == PARALLEL_BLOCK:
                for j, (attn, ffn) in enumerate(zip(block.attns, block.ffns)):
                    check_attention(attn.attn, f"{where}.attns.{j}.attn")
                    check_block_mlp(ffn.mlp, f"{where}.ffns.{j}")
                continue
            if class_name(block) == SCALING_BLOCK:
                check_parallel_scaling(block, where)
                continue
            require(class_name(block) in (BLOCK, POST_NORM_BLOCK), where, f"block type {type(block).__name__} "
                    "(only timm Block, ResPostBlock, ParallelThingsBlock and ParallelScalingBlock)")
            check_attention(block.attn, f"{where}.attn")
            check_block_mlp(block.mlp, where)

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        quantize_conv(model.patch_embed, "proj", policy.weight(edge=True), policy.act(edge=True))
        for i, block in enumerate(model.blocks):
            if class_name(block) == SCALING_BLOCK:
                model.blocks[i] = ViTQuantParallelScalingBlock(block, policy)
                continue
            pairs = zip(block.attns, block.ffns) if class_name(block) == PARALLEL_BLOCK else [(block, block)]
            for attn_parent, mlp_parent in pairs:
                quantize_attention(attn_parent, policy)
                quantize_block_mlp(mlp_parent, policy)
        if getattr(model, "attn_pool", None) is not None:
            model.attn_pool = ViTQuantAttentionPool(model.attn_pool, policy)
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                quantize_linear(model, head, policy.weight(edge=True), policy.act(edge=True))
        return model

    def stock_name(self, path: str) -> tuple[str, int | None]:
        """The attention pool's split `k`/`v` are the halves of its stock `kv`, its `q` is the stock `q` (not a qkv
        third); a parallel-scaling block's `fc1`, `q`, `k`, `v` (its direct children) are the row blocks of `in_proj`."""
        head, _, leaf = path.rpartition(".")
        if head == "attn_pool" and leaf in ("q", "k", "v"):
            return ("attn_pool.q", None) if leaf == "q" else ("attn_pool.kv", ("k", "v").index(leaf))
        if re.fullmatch(r"blocks\.\d+", head) and leaf in SCALING_PARTS:
            return f"{head}.in_proj", SCALING_PARTS.index(leaf)
        return super().stock_name(path)

    def block_names(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def block_inputs(self, model: nn.Module, images: Tensor) -> list[Tensor]:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        hidden = []
        for block in model.blocks:
            hidden.append(x)
            x = block(x)
        return [*hidden, x]

    def run_from(self, model: nn.Module, index: int, hidden: Tensor) -> Tensor:
        """Blocks `index..`, then norm and head.

        When the head reads only the prefix tokens (cls, dist), the last block computes just those rows:
        its keys and values still come from every token, so the logits are those of the full forward.
        """
        blocks = list(model.blocks[index:])
        keep = model.num_prefix_tokens if model.global_pool == "token" else 0
        last = (blocks.pop() if blocks and keep and class_name(blocks[-1]) == BLOCK  # pre-norm: the formula below
                and isinstance(blocks[-1].attn, ViTQuantAttention) else None)
        for block in blocks:
            hidden = block(hidden)
        if last is not None:
            attn = last.attn(last.norm1(hidden), num_queries=keep)
            hidden = hidden[:, :keep] + last.drop_path1(last.ls1(attn))
            hidden = hidden + last.drop_path2(last.ls2(last.mlp(last.norm2(hidden))))
        return model.forward_head(model.norm(hidden))

    def fp_layers(self, model: nn.Module) -> frozenset[str]:
        """A hybrid ViT's CNN backbone (`patch_embed.backbone`) stays FP: the layout quantizes the transformer and the
        patch projection after the backbone; the backbone's convs (weight-standardized StdConv2d) have no rule here."""
        backbone = getattr(model.patch_embed, "backbone", None)
        if backbone is None:
            return frozenset()
        return frozenset(f"patch_embed.backbone.{name}" for name, layer in backbone.named_modules()
                         if isinstance(layer, (nn.Linear, nn.Conv2d)))

    def norm_pairs(self, model: nn.Module) -> list[NormPair]:
        """Per pre-norm block: norm1 -> attention input quantizer -> q, k, v (or the fused qkv); norm2 -> fc1's input
        quantizer -> fc1. Post-norm, parallel and split-SwiGLU blocks have no such pairs (their norms feed no lone quantizer)."""
        return [pair for i, block in enumerate(model.blocks)
                if class_name(block) == BLOCK and isinstance(block.attn, ViTQuantAttention) and hasattr(block.mlp, "fc1")
                for pair in block_norm_pairs(block, f"blocks.{i}", "attn")]
