"""The Swin family: timm `SwinTransformer` (V1), method.md §3 layout inside each window.

Window attention becomes a `QuantAttention` (the `core` of `SwinQuantWindowAttention`) whose logits get
the relative-position bias and the shift mask (both FP); MLPs as in ViT; patch embedding, classifier
head and patch-merging reduction weights are 8-bit (patch merging's input stays FP, as in the reference).

`SwinForImageClassification` (transformers 5.24, timm 1.0.31; tests check the numerics): its
patch-embedding and patch-merging LayerNorms always use eps 1e-5 and only the block and final norms use
`layer_norm_eps`; timm uses one norm everywhere, so only 1e-5 is accepted. A transformers stage ends
with its patch merging, a timm stage starts with it (stage s -> s + 1); both concatenate the 2x2
neighbours in the same order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import ModelError
from ..quant import QuantAttention
from .base import (
    NormPair,
    QuantPolicy,
    SegmentedFamily,
    block_norm_pairs,
    check_mlp,
    class_name,
    is_identity,
    quantize_conv,
    quantize_linear,
    quantize_mlp,
    register_family,
    require,
)
from .hf_map import Names, TransformersMap, bool_field, check_field, int_field, int_list_field, pair_field, prob_field, squash_processor_config
from .vit import PROCESSOR_TYPES


class SwinMap(TransformersMap):
    """`SwinForImageClassification`: a timm SwinTransformer V1 with average pooling."""

    hf_class, model_type, prefix = "SwinForImageClassification", "swin", "swin"
    fields = frozenset({"image_size", "patch_size", "num_channels", "embed_dim", "depths", "num_heads", "window_size",
                        "mlp_ratio", "qkv_bias", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate",
                        "hidden_act", "use_absolute_embeddings", "layer_norm_eps", "num_layers", "hidden_size"})
    # path_norm: a stale key transformers never reads
    ignored = frozenset({"encoder_stride", "out_features", "out_indices", "stage_names", "path_norm"})
    processor_types = PROCESSOR_TYPES
    timm_names = (("swin_tiny_patch4_window7_224", (96, 12, 3, 4)), ("swin_small_patch4_window7_224", (96, 24, 3, 4)),
                  ("swin_base_patch4_window7_224", (128, 24, 4, 4)), ("swin_large_patch4_window7_224", (192, 24, 6, 4)))

    def model_args(self, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        check_field(config, "hidden_act", "gelu", where, "only exact GELU (nn.GELU) is mapped to timm")
        if config.get("use_absolute_embeddings", False):
            raise ModelError(f"{where}: field 'use_absolute_embeddings' = true is not supported "
                             "(timm's SwinTransformer has no absolute position embedding)")
        check_field(config, "layer_norm_eps", 1e-5, where, "transformers' Swin keeps eps 1e-5 in its embedding and "
                    "patch-merging norms; timm uses one eps for every norm")
        img = pair_field(config, "image_size", where, 224)
        if isinstance(img, tuple):
            raise ModelError(f"{where}: field 'image_size' = {list(img)} is not supported for Swin (square images only: "
                             "transformers and timm shrink windows differently on non-square maps)")
        depths = int_list_field(config, "depths", where, [2, 2, 6, 2])
        heads = int_list_field(config, "num_heads", where, [3, 6, 12, 24])
        if len(depths) != len(heads):
            raise ModelError(f"{where}: field 'num_heads' has {len(heads)} stages, depths has {len(depths)}")
        embed = int_field(config, "embed_dim", where, 96)
        for stage, h in enumerate(heads):
            if (embed << stage) % h:
                raise ModelError(f"{where}: field 'num_heads' ({h}) does not divide stage {stage}'s width ({embed << stage})")
        check_field(config, "num_layers", len(depths), where, "num_layers is len(depths)")
        check_field(config, "hidden_size", embed << (len(depths) - 1), where, "hidden_size is embed_dim * 2**(stages - 1)")
        mlp_ratio = config.get("mlp_ratio", 4.0)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ModelError(f"{where}: field 'mlp_ratio' must be a positive number, found {mlp_ratio!r}")
        return {
            "img_size": img, "patch_size": int_field(config, "patch_size", where, 4),
            "in_chans": int_field(config, "num_channels", where, 3), "embed_dim": embed, "depths": depths, "num_heads": heads,
            "window_size": int_field(config, "window_size", where, 7), "mlp_ratio": float(mlp_ratio),
            "qkv_bias": bool_field(config, "qkv_bias", where, True), "global_pool": "avg",
            # training only
            "proj_drop_rate": prob_field(config, "hidden_dropout_prob", where),
            "attn_drop_rate": prob_field(config, "attention_probs_dropout_prob", where),
            "drop_path_rate": prob_field(config, "drop_path_rate", where),
        }

    def signature(self, model_args: Mapping[str, Any]) -> tuple[Any, ...]:
        return (model_args["embed_dim"], sum(model_args["depths"]), model_args["num_heads"][0], model_args["patch_size"])

    def key_map(self, model_args: Mapping[str, Any]) -> list[Names]:
        p = self.prefix
        rows = [Names("patch_embed.proj", (f"{p}.embeddings.patch_embeddings.projection",)),
                Names("patch_embed.norm", (f"{p}.embeddings.norm",))]
        for s, depth in enumerate(model_args["depths"]):
            if s > 0:  # transformers: the end of stage s - 1; timm: the start of stage s
                merge = f"{p}.encoder.layers.{s - 1}.downsample"
                rows += [Names(f"layers.{s}.downsample.norm", (f"{merge}.norm",)),
                         Names(f"layers.{s}.downsample.reduction", (f"{merge}.reduction",))]
            for b in range(depth):
                hf, t = f"{p}.encoder.layers.{s}.blocks.{b}", f"layers.{s}.blocks.{b}"
                rows += [
                    Names(f"{t}.norm1", (f"{hf}.layernorm_before",)),
                    *self.attention_rows(f"{t}.attn", hf),
                    Names(f"{t}.norm2", (f"{hf}.layernorm_after",)),
                    Names(f"{t}.mlp.fc1", (f"{hf}.intermediate.dense",), (f"{hf}.mlp.fc1",)),
                    Names(f"{t}.mlp.fc2", (f"{hf}.output.dense",), (f"{hf}.mlp.fc2",)),
                ]
        return [*rows, Names("norm", (f"{p}.layernorm",)), Names("head.fc", ("classifier",))]

    def attention_rows(self, attn: str, block: str) -> list[Names]:
        """The rows of timm window attention `attn` (e.g. `layers.0.blocks.1.attn`) in transformers block `block`."""
        return [
            Names(f"{attn}.qkv", tuple(f"{block}.attention.self.{n}" for n in ("query", "key", "value")),
                  tuple(f"{block}.attention.{n}_proj" for n in "qkv")),
            Names(f"{attn}.relative_position_bias_table", (f"{block}.attention.self.relative_position_bias_table",)),
            Names(f"{attn}.proj", (f"{block}.attention.output.dense",), (f"{block}.attention.o_proj",)),
        ]

    def recomputed_buffers(self, model_args: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [(f"{self.prefix}.encoder.layers.{s}.blocks.{b}.attention.self.relative_position_index",
                 f"layers.{s}.blocks.{b}.attn.relative_position_index")
                for s, depth in enumerate(model_args["depths"]) for b in range(depth)]

    def processor_config(self, data_config: Mapping[str, Any]) -> dict[str, Any] | None:
        return squash_processor_config(data_config, "ViTImageProcessor", "DeiTImageProcessor")


class SwinQuantWindowAttention(nn.Module):
    """Window attention: relative-position bias + shift mask added to the quantized attention's logits."""

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        super().__init__()
        self.window_area = stock.window_area
        self.num_heads = stock.num_heads
        self.relative_position_bias_table = stock.relative_position_bias_table
        self.register_buffer("relative_position_index", stock.relative_position_index.clone(), persistent=False)
        self.core = QuantAttention(**policy.attention_args(stock))

    def _rel_pos_bias(self) -> Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # 1, heads, N, N

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        bias = self._rel_pos_bias()
        if mask is not None:  # mask: windows, N, N (0 / -100), windows vary fastest along the batch
            # the mask is repeated over the batch before the bias is added, so that no [windows, heads, N, N]
            # sum of two constants exists (an ONNX trace would store it; the sums are the same)
            bias = mask.repeat(x.shape[0] // mask.shape[0], 1, 1).unsqueeze(1) + bias
        return self.core(x, attn_bias=bias)


@register_family("timm.models.swin_transformer.SwinTransformer")
class SwinFamily(SegmentedFamily):
    """timm SwinTransformer V1: window attention with relative-position bias, GELU MLPs, patch merging."""

    name = "swin"
    patterns = ("swin_*",)
    transformers = (SwinMap(),)
    stem_attr, stages_attr, pre_head_attr = "patch_embed", "layers", "norm"  # segments: patch merging, then blocks, per stage
    # the timm classes the layout accepts ("module.QualName")
    block_type: ClassVar[str] = "timm.models.swin_transformer.SwinTransformerBlock"
    attention_type: ClassVar[str] = "timm.models.swin_transformer.WindowAttention"
    merging_type: ClassVar[str] = "timm.models.swin_transformer.PatchMerging"

    def check(self, model: nn.Module) -> None:
        require(type(model.patch_embed.proj) is nn.Conv2d, "patch_embed.proj", f"patch embedding {type(model.patch_embed.proj).__name__}")
        for si, stage in enumerate(model.layers):
            require(is_identity(stage.downsample) or class_name(stage.downsample) == self.merging_type,
                    f"layers.{si}.downsample", f"downsampling {type(stage.downsample).__name__}")
            for bi, block in enumerate(stage.blocks):
                where = f"layers.{si}.blocks.{bi}"
                require(class_name(block) == self.block_type, where,
                        f"block type {type(block).__name__} (only timm {self.block_type.rpartition('.')[2]})")
                require(class_name(block.attn) == self.attention_type, f"{where}.attn",
                        f"attention type {type(block.attn).__name__} (only timm {self.attention_type.rpartition('.')[2]})")
                check_mlp(block.mlp, where)

    def stock_name(self, path: str) -> tuple[str, int | None]:
        """`attn.core.q` -> (`attn.qkv`, 0): the window attention nests its QuantAttention as `core`."""
        return super().stock_name(re.sub(r"\.attn\.core(?=\.|$)", ".attn", path))

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        quantize_conv(model.patch_embed, "proj", policy.weight(edge=True), policy.act(edge=True))
        for stage in model.layers:
            if not is_identity(stage.downsample):
                quantize_linear(stage.downsample, "reduction", policy.weight(edge=True), None)
            for block in stage.blocks:
                block.attn = self.window_attention(block.attn, policy)
                quantize_mlp(block.mlp, policy)
        if isinstance(model.head.fc, nn.Linear):
            quantize_linear(model.head, "fc", policy.weight(edge=True), policy.act(edge=True))
        return model

    def window_attention(self, stock: nn.Module, policy: QuantPolicy) -> nn.Module:
        """The quantized replacement of one stock window-attention module."""
        return SwinQuantWindowAttention(stock, policy)

    def norm_pairs(self, model: nn.Module) -> list[NormPair]:
        """As ViT's, inside each window; a block that zero-pads its windows (resolution not a multiple of the
        window) gets a scale-only fold of norm1, since the padded zeros would not take a shift."""
        pairs = []
        for si, stage in enumerate(model.layers):
            for bi, block in enumerate(stage.blocks):
                padded = any(r % w for r, w in zip(block.input_resolution, block.window_size))
                pairs += block_norm_pairs(block, f"layers.{si}.blocks.{bi}", "attn.core", shift=not padded)
        return pairs
