"""The BEiT family: timm `Beit` (BEiT, BEiT v2), method.md §3 layout with BEiT's relative position bias.

Per block, the attention becomes `BeitQuantAttention`, a QuantAttention (split q/k/v with their own steps,
quantized Q/K/V, softmax output and attn@V) whose logits get the relative position bias, the block's own
table and/or the model's shared one, in FP (like Swin's bias table, method.md §3). BEiT's outside biases
(`q_bias`, `v_bias`; the k projection has none) are added before the Q and V quantizers. The MLP is
`families.blocks`'s (GELU Mlp, with or without an inner norm, or SwiGLU). FP: LayerScale (`gamma_1`,
`gamma_2`), norms, class token, absolute position embedding, bias tables, pooling. 8-bit: patch
embedding and head.

transformers classes (transformers 5.24, timm 1.0.31; tests check the numerics):
- `BeitForImageClassification` and `Data2VecVisionForImageClassification` (data2vec-vision is BEiT's
  layout under another prefix): query/key/value (key without bias) are timm's fused `qkv` plus `q_bias`,
  `v_bias`; `lambda_1`/`lambda_2` are LayerScale; `use_mean_pooling` is timm's average pooling with
  `fc_norm` (else the class token after `norm`). Square images only: transformers resamples its position
  tables when height and width differ. The mask token (`use_mask_token`) belongs to masked image
  modeling and is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..quant import QuantAttention
from .base import Family, QuantPolicy, class_name, register_family, require
from .blocks import check_block_mlp, quantize_blocks_
from .hf_map import Names, bool_field, check_field, prob_field, squash_processor_config
from .vit import ViTMap

PROCESSOR_TYPES = frozenset({"BeitImageProcessor", "BeitImageProcessorFast", "BeitImageProcessorPil", "BeitFeatureExtractor"})
RELPOS = "attention.attention.relative_position_bias"


class BeitMap(ViTMap):
    """`BeitForImageClassification`: a timm Beit (relative position bias, LayerScale, q/v biases).

    The encoder's sizes, activation, eps and dropouts are ViT's fields (`ViTMap.model_args`); the rest is BEiT's.
    """

    hf_class, model_type, prefix = "BeitForImageClassification", "beit", "beit"
    renamed_in_memory: ClassVar[bool] = True  # transformers >= 5 renames the Linears (layers.i.attention.q_proj, ...)
    # no qkv_bias: BEiT always has query and value biases and no key bias
    fields = (ViTMap.fields - {"qkv_bias"}) | {"use_mask_token", "use_absolute_position_embeddings", "use_relative_position_bias",
                                               "use_shared_relative_position_bias", "layer_scale_init_value", "drop_path_rate",
                                               "use_mean_pooling"}
    # read only by masked image modeling, segmentation and backbone heads
    ignored = frozenset({"vocab_size", "pool_scales", "use_auxiliary_head", "auxiliary_loss_weight", "auxiliary_channels",
                         "auxiliary_num_convs", "auxiliary_concat_input", "semantic_loss_ignore_index", "out_features",
                         "out_indices", "stage_names", "add_fpn", "reshape_hidden_states"})
    processor_types = PROCESSOR_TYPES
    timm_names = (("beit_base_patch16_224", (768, 12, 12, 16)), ("beit_large_patch16_224", (1024, 24, 16, 16)))

    def model_args(self, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        check_field(config, "use_mask_token", False, where, "the mask token is for masked image modeling, not classification")
        args = super().model_args(config, where)
        if isinstance(args["img_size"], tuple):
            raise ModelError(f"{where}: field 'image_size' = {list(args['img_size'])} is not supported for BEiT (square images "
                             "only: transformers resamples its position tables when height and width differ)")
        scale = config.get("layer_scale_init_value", 0.1)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            raise ModelError(f"{where}: field 'layer_scale_init_value' must be a number >= 0, found {scale!r}")
        del args["class_token"]  # timm's Beit always has one
        return {
            **args,
            # 0.0, not None: timm drops None kwargs and the entry point's default would return
            "init_values": float(scale),
            "use_abs_pos_emb": bool_field(config, "use_absolute_position_embeddings", where, False),
            "use_rel_pos_bias": bool_field(config, "use_relative_position_bias", where, False),
            "use_shared_rel_pos_bias": bool_field(config, "use_shared_relative_position_bias", where, False),
            "global_pool": "avg" if bool_field(config, "use_mean_pooling", where, True) else "token",
            "drop_path_rate": prob_field(config, "drop_path_rate", where),  # training only
        }

    def key_map(self, model_args: Mapping[str, Any]) -> list[Names]:
        p = self.prefix
        rows = [Names("cls_token", (f"{p}.embeddings.cls_token",)),
                Names("patch_embed.proj", (f"{p}.embeddings.patch_embeddings.projection",))]
        if model_args["use_abs_pos_emb"]:
            rows.append(Names("pos_embed", (f"{p}.embeddings.position_embeddings",)))
        if model_args["use_shared_rel_pos_bias"]:
            rows.append(Names("rel_pos_bias.relative_position_bias_table", (f"{p}.encoder.relative_position_bias.relative_position_bias_table",)))
        for i in range(model_args["depth"]):
            hf, rt = f"{p}.encoder.layer.{i}", f"{p}.layers.{i}"
            runtime = functools.partial(self._runtime, rt)
            rows += [
                Names(f"blocks.{i}.norm1", (f"{hf}.layernorm_before",)),
                Names(f"blocks.{i}.attn.qkv", tuple(f"{hf}.attention.attention.{n}" for n in ("query", "key", "value")),
                      runtime(*(f"attention.{n}_proj" for n in "qkv"))),
                Names(f"blocks.{i}.attn.q_bias", (f"{hf}.attention.attention.query.bias",)),
                Names(f"blocks.{i}.attn.v_bias", (f"{hf}.attention.attention.value.bias",)),
                Names(f"blocks.{i}.attn.proj", (f"{hf}.attention.output.dense",), runtime("attention.o_proj")),
                Names(f"blocks.{i}.norm2", (f"{hf}.layernorm_after",)),
                Names(f"blocks.{i}.mlp.fc1", (f"{hf}.intermediate.dense",), runtime("mlp.fc1")),
                Names(f"blocks.{i}.mlp.fc2", (f"{hf}.output.dense",), runtime("mlp.fc2")),
            ]
            if model_args["use_rel_pos_bias"]:
                rows.append(Names(f"blocks.{i}.attn.relative_position_bias_table", (f"{hf}.{RELPOS}.relative_position_bias_table",)))
            if model_args["init_values"]:
                rows += [Names(f"blocks.{i}.gamma_1", (f"{hf}.lambda_1",)), Names(f"blocks.{i}.gamma_2", (f"{hf}.lambda_2",))]
        rows.append(Names("fc_norm", (f"{p}.pooler.layernorm",)) if model_args["global_pool"] == "avg"
                    else Names("norm", (f"{p}.layernorm",)))
        return [*rows, Names("head", ("classifier",))]

    def _runtime(self, layer: str, *names: str) -> tuple[str, ...] | None:
        """transformers >= 5 in-memory names of a layer's Linears, where they differ from the saved ones."""
        return tuple(f"{layer}.{n}" for n in names) if self.renamed_in_memory else None

    def recomputed_buffers(self, model_args: Mapping[str, Any]) -> list[tuple[str, str]]:
        p, out = self.prefix, []
        if model_args["use_shared_rel_pos_bias"]:
            out.append((f"{p}.encoder.relative_position_bias.relative_position_index", "rel_pos_bias.relative_position_index"))
        if model_args["use_rel_pos_bias"]:
            out += [(f"{p}.encoder.layer.{i}.{RELPOS}.relative_position_index", f"blocks.{i}.attn.relative_position_index")
                    for i in range(model_args["depth"])]
        return out

    def processor_config(self, data_config: Mapping[str, Any]) -> dict[str, Any] | None:
        return squash_processor_config(data_config, "BeitImageProcessor", "BeitImageProcessor")


class Data2VecVisionMap(BeitMap):
    """`Data2VecVisionForImageClassification`: BEiT's layout and config under the `data2vec_vision` prefix."""

    hf_class, model_type, prefix = "Data2VecVisionForImageClassification", "data2vec-vision", "data2vec_vision"
    renamed_in_memory = False  # its in-memory names are the saved ones


class BeitQuantAttention(QuantAttention):
    """QuantAttention with BEiT's call signature: its own relative position bias plus the model's shared one, in FP."""

    def __init__(self, stock: nn.Module, policy: QuantPolicy) -> None:
        super().__init__(**policy.attention_args(stock, q_bias=stock.q_bias, v_bias=stock.v_bias))
        self.window_size = stock.window_size
        self.relative_position_bias_table = stock.relative_position_bias_table
        if stock.relative_position_bias_table is not None:
            self.register_buffer("relative_position_index", stock.relative_position_index.clone(), persistent=False)

    def forward(self, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:  # type: ignore[override]
        bias = shared_rel_pos_bias
        if self.relative_position_bias_table is not None:
            n = self.window_size[0] * self.window_size[1] + 1
            own = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
            own = own.permute(2, 0, 1).unsqueeze(0)  # 1, heads, N, N
            bias = own if bias is None else own + bias
        return super().forward(x, attn_bias=bias)


@register_family("timm.models.beit.Beit")
class BeitFamily(Family):
    """timm Beit: pre-norm blocks with LayerScale, q/v-biased attention with relative position bias, GELU or SwiGLU MLPs."""

    name = "beit"
    patterns = ("beit_*", "beitv2_*")
    transformers = (BeitMap(), Data2VecVisionMap())

    def check(self, model: nn.Module) -> None:
        require(type(model.patch_embed.proj) is nn.Conv2d, "patch_embed.proj", f"patch embedding {type(model.patch_embed.proj).__name__}")
        for i, block in enumerate(model.blocks):
            where = f"blocks.{i}"
            require(class_name(block) == "timm.models.beit.Block", where, f"block type {type(block).__name__} (only timm BEiT Block)")
            attn = block.attn
            require(class_name(attn) == "timm.models.beit.Attention", f"{where}.attn",
                    f"attention type {type(attn).__name__} (only timm BEiT Attention)")
            require(type(attn.qkv) is nn.Linear and type(attn.proj) is nn.Linear, f"{where}.attn", "non-Linear qkv/proj")
            check_block_mlp(block.mlp, where)

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        return quantize_blocks_(model, policy, BeitQuantAttention)

    def block_names(self, model: nn.Module) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def block_inputs(self, model: nn.Module, images: Tensor) -> list[Tensor]:
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        x = model.pos_drop(x)
        shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        hidden = []
        for block in model.blocks:
            hidden.append(x)
            x = block(x, shared_rel_pos_bias=shared)
        return [*hidden, x]

    def run_from(self, model: nn.Module, index: int, hidden: Tensor) -> Tensor:
        shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        for block in model.blocks[index:]:
            hidden = block(hidden, shared_rel_pos_bias=shared)
        return model.forward_head(model.norm(hidden))
