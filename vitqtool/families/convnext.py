"""The ConvNeXt family: timm `ConvNeXt`, V1 and V2 blocks (depthwise conv, LayerNorm, GELU MLP as Linear or 1x1
conv; V1 with a layer scale, V2 with GlobalResponseNorm), norms, layer scale and GRN in FP.

Input quantizers: the stem conv reads the image, conv_dw the residual stream, fc1, downsampling and head a
norm's output (all signed); fc2 reads GELU's output in V1 and GRN's in V2, both unsigned with a learned offset.
GRN (`x + gamma * x * N(x) + beta`, `N` a per-sample, per-channel ratio of global L2 norms) runs in FP
between the GELU and fc2's input quantizer, so the integer matmul sees what it multiplies. Its output is the
GELU output scaled per channel by `1 + gamma * N` and shifted by `beta`: the layer fixes no sign, the values
stay skewed like GELU's, and the lower end moves with the learned shift. An affine quantizer (unsigned levels
plus a learned offset, method.md §2's GELU rule) covers such a range with all 2^b levels where a signed one
would spend half of them on a negative tail; with gamma = beta = 0 (GRN's init) it is exactly V1's rule. The
offset starts at 0 and is learned in QAT, so a post-training calibration clips GRN outputs below 0, as it
clips GELU's. Stem and classifier are edge layers (8-bit); segments are the blocks and each stage's
downsampling layer.

`ConvNextV2ForImageClassification` (transformers 5.24, timm 1.0.31; tests check the numerics) is a timm
ConvNeXt with V2 blocks, Linear MLPs (`conv_mlp=False`: transformers' pwconv layers are Linear) and no layer
scale. transformers keeps every LayerNorm at eps 1e-6 but the pooled head's, which uses `layer_norm_eps`
(default 1e-12); timm has one eps for every norm (1e-6), so a `layer_norm_eps` below 1e-6 changes that one
norm's output by a relative (1e-6 - eps) / (2 var) of the pooled features (larger values are refused). GRN's
gamma/beta are `[C]` in timm and `[1, 1, 1, C]` in transformers (`Names.hf_view`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import ModelError
from .base import GELU_CLASSES, check_mlp, class_name, is_identity, register_family, require
from .cnn import COMMON_LEAVES, CNNFamily, layers_by_rule
from .hf_map import Names, TransformersMap, check_field, int_field, int_list_field, pil_resample, prob_field

log = logging.getLogger(__name__)

GRN_MLP = "timm.layers.mlp.GlobalResponseNormMlp"
TIMM_NORM_EPS = 1e-6  # timm ConvNeXt's LayerNorm eps (and transformers' for every norm but the head's)
WARP_FROM = 384  # ConvNextImageProcessor resizes to shortest_edge / crop_pct and crops below this size, warps from it
PROCESSOR_TYPES = frozenset({"ConvNextImageProcessor", "ConvNextImageProcessorFast", "ConvNextImageProcessorPil",
                             "ConvNextFeatureExtractor"})


class ConvNextV2Map(TransformersMap):
    """`ConvNextV2ForImageClassification`: a timm ConvNeXt with GRN MLPs as Linear layers and no layer scale."""

    hf_class, model_type = "ConvNextV2ForImageClassification", "convnextv2"
    fields = frozenset({"num_channels", "patch_size", "num_stages", "hidden_sizes", "depths", "hidden_act",
                        "layer_norm_eps", "drop_path_rate", "image_size"})
    ignored = frozenset({"out_features", "out_indices", "stage_names"})  # backbone outputs
    processor_types = PROCESSOR_TYPES
    timm_names = (("convnextv2_atto", (40, 12)), ("convnextv2_femto", (48, 12)), ("convnextv2_pico", (64, 12)),
                  ("convnextv2_nano", (80, 14)), ("convnextv2_tiny", (96, 18)), ("convnextv2_small", (96, 36)),
                  ("convnextv2_base", (128, 36)), ("convnextv2_large", (192, 36)), ("convnextv2_huge", (352, 36)))

    def model_args(self, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        check_field(config, "hidden_act", "gelu", where, "only exact GELU (nn.GELU) is mapped to timm")
        depths = int_list_field(config, "depths", where, [3, 3, 9, 3])
        dims = int_list_field(config, "hidden_sizes", where, [96, 192, 384, 768])
        if len(depths) != 4 or len(dims) != 4:
            raise ModelError(f"{where}: fields 'depths' and 'hidden_sizes' must list 4 stages (timm's ConvNeXt has four), "
                             f"found {len(depths)} and {len(dims)}")
        check_field(config, "num_stages", 4, where, "timm's ConvNeXt has four stages")
        eps = config.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= TIMM_NORM_EPS:
            raise ModelError(f"{where}: field 'layer_norm_eps' = {eps!r} is not supported (timm's ConvNeXt uses eps "
                             f"{TIMM_NORM_EPS:g} in every norm; values in (0, {TIMM_NORM_EPS:g}] are mapped)")
        size = config.get("image_size", 224)
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ModelError(f"{where}: field 'image_size' must be a positive integer, found {size!r}")
        chans = int_field(config, "num_channels", where, 3)
        return {
            "in_chans": chans, "patch_size": int_field(config, "patch_size", where, 4), "depths": depths, "dims": dims,
            "use_grn": True, "ls_init_value": None, "conv_mlp": False,
            "pretrained_cfg_overlay": {"input_size": [chans, size, size]},  # the data config's size (the model takes any)
            "drop_path_rate": prob_field(config, "drop_path_rate", where),  # training only
        }

    def signature(self, model_args: Mapping[str, Any]) -> tuple[Any, ...]:
        return (model_args["dims"][0], sum(model_args["depths"]))

    def key_map(self, model_args: Mapping[str, Any]) -> list[Names]:
        rows = [Names("stem.0", ("convnextv2.embeddings.patch_embeddings",)), Names("stem.1", ("convnextv2.embeddings.layernorm",))]
        for s, depth in enumerate(model_args["depths"]):
            hf = f"convnextv2.encoder.stages.{s}"
            if s > 0:
                rows += [Names(f"stages.{s}.downsample.{i}", (f"{hf}.downsampling_layer.{i}",)) for i in (0, 1)]
            for b in range(depth):
                t, h = f"stages.{s}.blocks.{b}", f"{hf}.layers.{b}"
                rows += [Names(f"{t}.conv_dw", (f"{h}.dwconv",)), Names(f"{t}.norm", (f"{h}.layernorm",)),
                         Names(f"{t}.mlp.fc1", (f"{h}.pwconv1",)), Names(f"{t}.mlp.grn", (f"{h}.grn",), hf_view=(1, 1, 1, -1)),
                         Names(f"{t}.mlp.fc2", (f"{h}.pwconv2",))]
        return [*rows, Names("head.norm", ("convnextv2.layernorm",)), Names("head.fc", ("classifier",))]

    def generic_processor(self, pp: Mapping[str, Any], where: str) -> Mapping[str, Any]:
        """ConvNextImageProcessor: below 384, a resize of the shortest edge to `shortest_edge / crop_pct` and a crop."""
        kind = pp.get("image_processor_type") or pp.get("feature_extractor_type")
        if kind is not None and kind not in PROCESSOR_TYPES:
            return pp  # refused, naming the type, by data_config_from_preprocessor
        size = pp.get("size", {"shortest_edge": WARP_FROM})
        edge = size.get("shortest_edge") if isinstance(size, dict) else None
        if isinstance(edge, bool) or not isinstance(edge, int) or edge <= 0:
            raise ModelError(f"{where}: field 'size' = {size!r} is not supported (ConvNextImageProcessor reads {{shortest_edge}})")
        if pp.get("do_center_crop", False):
            raise ModelError(f"{where}: field 'do_center_crop' = true is not supported (ConvNextImageProcessor crops by crop_pct)")
        out = {k: v for k, v in pp.items() if k not in ("crop_pct", "size", "crop_size", "do_center_crop")}
        if edge >= WARP_FROM:
            return {**out, "size": {"height": edge, "width": edge}}
        pct = pp.get("crop_pct", 224 / 256)
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 1:
            raise ModelError(f"{where}: field 'crop_pct' must be in (0, 1], found {pct!r}")
        return {**out, "size": {"shortest_edge": int(edge / pct)}, "do_center_crop": True,
                "crop_size": {"height": edge, "width": edge}}

    def processor_config(self, data_config: Mapping[str, Any]) -> dict[str, Any] | None:
        """A ConvNextImageProcessor config for a square center-crop data config below 384 pixels, else None."""
        _, h, w = (int(v) for v in data_config["input_size"])
        pct = float(data_config.get("crop_pct") or 1.0)
        if str(data_config.get("crop_mode") or "center") != "center" or h != w or h >= WARP_FROM:
            log.info("no preprocessor_config.json written: %s has no ConvNextImageProcessor equivalent", data_config)
            return None
        return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": h},
                "crop_pct": pct, "resample": pil_resample(data_config.get("interpolation"), "bicubic"),
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [float(v) for v in data_config["mean"]], "image_std": [float(v) for v in data_config["std"]]}


@register_family("timm.models.convnext.ConvNeXt")
class ConvNeXtFamily(CNNFamily):
    """timm ConvNeXt: V1 (layer scale) and V2 (GlobalResponseNorm) blocks, MLPs as Linear or 1x1 conv."""

    name = "convnext"
    patterns = ("convnext_*", "convnextv2_*")
    transformers = (ConvNextV2Map(),)
    leaves = COMMON_LEAVES | {"timm.layers.norm.LayerNorm", "timm.layers.norm.LayerNorm2d", "timm.layers.activations.GELU",
                              "torch.nn.modules.activation.GELU", "timm.layers.grn.GlobalResponseNorm"}

    def check_family(self, model: nn.Module) -> None:
        require(not any(class_name(m) in GELU_CLASSES for m in model.stem.modules()), "stem",
                "an activation inside the stem (stem_type='overlap_act')")
        require(is_identity(getattr(model.head, "pre_logits", None)), "head.pre_logits", "a hidden head layer (head_hidden_size)")
        for name, block in self.segments(model):
            if name.endswith(".downsample"):
                continue
            require(class_name(block) == "timm.models.convnext.ConvNeXtBlock", name,
                    f"block type {type(block).__name__} (only timm ConvNeXtBlock)")
            if class_name(block.mlp) == GRN_MLP:  # V2: fc1 -> GELU -> GRN -> fc2
                require(class_name(block.mlp.act) in GELU_CLASSES, f"{name}.mlp.act",
                        f"activation {type(block.mlp.act).__name__} (the GRN-output quantizer assumes GELU before GRN)")
            else:
                check_mlp(block.mlp, name)
            require(is_identity(block.shortcut), f"{name}.shortcut", f"a projection shortcut ({type(block.shortcut).__name__})")

    def layer_inputs(self, model: nn.Module) -> dict[str, tuple[str, bool]]:
        # stem conv: the image; conv_dw: the residual stream; fc1, downsampling and head: a norm's output;
        # fc2: GELU's (V1) or GRN's (V2) output, both unsigned with a learned offset
        return layers_by_rule(model, lambda n: ("gelu" if n.endswith("mlp.fc2") else "signed", n.startswith("stem.") or n == "head.fc"))
