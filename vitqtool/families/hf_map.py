"""Hugging Face `transformers` ViT / DeiT / Swin checkpoints as timm models: the one config map and key map.

Config map (`timm_spec`): a transformers `config.json` becomes a timm architecture name plus
JSON-serialisable `timm.create_model` kwargs. Every field of the config is either mapped, checked
against what the timm model computes, or listed as irrelevant to the classifier's forward pass; any
other field is refused with a `ModelError` naming it.

Key map (`module_names`): which timm module or parameter each transformers module or parameter is.
Names are those `save_pretrained` writes (and the hub holds); `runtime` names are the module names a
transformers >= 5 model has in memory (it renames on load), used only as export targets. Three
transformers Linears (query, key, value) make one timm `qkv` Linear, concatenated along dim 0.

Facts this map rests on (transformers 5.24, timm 1.0.31; tests check the numerics):
- ViT/DeiT LayerNorms use `layer_norm_eps` (1e-12 by default; timm's ViT default is 1e-6), so the
  eps travels as the plain field `layer_norm_eps` in model_args and `timm_kwargs` rebuilds the norm.
- `DeiTForImageClassification` runs the distillation token through the encoder but reads only the
  class token: that is a timm ViT with one register token (`reg_tokens=1`, pooled on the class token).
  `DeiTForImageClassificationWithTeacher` averages both heads: timm's `deit_*_distilled` in eval mode.
- Swin's patch-embedding and patch-merging LayerNorms always use eps 1e-5 and only the block and
  final norms use `layer_norm_eps`; timm uses one norm everywhere, so only 1e-5 is accepted. A
  transformers stage ends with its patch merging, a timm stage starts with it (stage s -> s + 1);
  both concatenate the 2x2 neighbours in the same order.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import ModelError, WeightsError

log = logging.getLogger(__name__)

NORM_EPS_ARG = "layer_norm_eps"  # model_args field (a float) that `timm_kwargs` turns into a LayerNorm class
TRAINING_ARGS = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
_MAX_SHOWN = 5

# transformers class -> (model_type, family, base-model prefix of the state dict)
CLASSES: dict[str, tuple[str, str, str]] = {
    "ViTForImageClassification": ("vit", "vit", "vit"),
    "DeiTForImageClassification": ("deit", "deit", "deit"),
    "DeiTForImageClassificationWithTeacher": ("deit", "deit_distilled", "deit"),
    "SwinForImageClassification": ("swin", "swin", "swin"),
}

# Fields of every transformers config that do not change the classifier's forward pass
# (output switches, serialisation, text-generation defaults of older configs).
_GENERIC_IGNORED = frozenset({
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "return_dict", "output_hidden_states",
    "output_attentions", "problem_type", "chunk_size_feed_forward", "torchscript", "use_bfloat16", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "tie_word_embeddings", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "tf_legacy_loss", "use_cache", "bos_token_id",
    "pad_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "initializer_range",
})
# Fields that must hold a value meaning "off" (anything else changes the model).
_GENERIC_OFF = {"is_encoder_decoder": False, "is_decoder": False, "add_cross_attention": False,
                "tie_encoder_decoder": False, "cross_attention_hidden_size": None, "pruned_heads": {}}
# Family fields read only by other heads or tasks (pooler, SimMIM decoder, backbone outputs).
_FAMILY_IGNORED = {
    "vit": {"encoder_stride", "pooler_output_size", "pooler_act"},
    "swin": {"encoder_stride", "out_features", "out_indices", "stage_names", "path_norm"},  # path_norm: stale key transformers never reads
}
_FAMILY_FIELDS = {
    "vit": {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "image_size", "patch_size",
            "num_channels", "qkv_bias", "head_dim"},
    "swin": {"image_size", "patch_size", "num_channels", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio",
             "qkv_bias", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate", "hidden_act",
             "use_absolute_embeddings", "layer_norm_eps", "num_layers", "hidden_size"},
}
_LABEL_FIELDS = {"id2label", "label2id", "num_labels", "architectures", "model_type"}

# Closest timm names (the model_args set every structural field; the name picks timm's defaults).
_TIMM_NAMES = {
    "vit": [("vit_tiny_patch16_224", 192, 12, 3, 16), ("vit_small_patch16_224", 384, 12, 6, 16),
            ("vit_small_patch32_224", 384, 12, 6, 32), ("vit_base_patch16_224", 768, 12, 12, 16),
            ("vit_base_patch32_224", 768, 12, 12, 32), ("vit_large_patch16_224", 1024, 24, 16, 16),
            ("vit_large_patch32_224", 1024, 24, 16, 32), ("vit_huge_patch14_224", 1280, 32, 16, 14)],
    "deit": [("deit_tiny_patch16_224", 192, 12, 3, 16), ("deit_small_patch16_224", 384, 12, 6, 16),
             ("deit_base_patch16_224", 768, 12, 12, 16)],
    "deit_distilled": [("deit_tiny_distilled_patch16_224", 192, 12, 3, 16),
                       ("deit_small_distilled_patch16_224", 384, 12, 6, 16),
                       ("deit_base_distilled_patch16_224", 768, 12, 12, 16)],
    "swin": [("swin_tiny_patch4_window7_224", 96, 12, 3, 4), ("swin_small_patch4_window7_224", 96, 24, 3, 4),
             ("swin_base_patch4_window7_224", 128, 24, 4, 4), ("swin_large_patch4_window7_224", 192, 24, 6, 4)],
}


@dataclass(frozen=True)
class HFSpec:
    """What a transformers config converts to: timm name + create_model kwargs, and the key-map inputs."""

    hf_class: str
    family: str          # vit, deit, deit_distilled or swin
    prefix: str          # base-model prefix of the transformers state dict: vit, deit or swin
    architecture: str    # timm name
    model_args: dict = field(default_factory=dict)  # JSON-serialisable timm kwargs (num_classes included)


@dataclass(frozen=True)
class Names:
    """One row of the key map: a timm module/parameter and the transformers one(s) it is made of."""

    timm: str
    hf: tuple[str, ...]
    runtime: tuple[str, ...] | None = None  # transformers >= 5 in-memory module names, for Linear layers

    @property
    def runtime_names(self) -> tuple[str, ...]:
        """The in-memory names (the serialized ones where they are the same)."""
        return self.runtime or self.hf


# --------------------------------------------------------------------------- config map


def is_transformers_config(config: Any) -> bool:
    """True for a transformers `config.json` (it has `model_type`, and not timm's `architecture`)."""
    return isinstance(config, dict) and "model_type" in config and "architecture" not in config


def timm_spec(config: Mapping[str, Any], where: str = "config.json") -> HFSpec:
    """Map a transformers ViT/DeiT/Swin classification config to a timm architecture and model_args.

    Raises:
        ModelError naming the first field the map does not cover (unsupported class, activation,
        absolute embeddings, a non-default eps where timm cannot follow, an unknown field, ...).
    """
    hf_class = _hf_class(config, where)
    model_type, family, prefix = CLASSES[hf_class]
    if config.get("model_type") != model_type:
        raise ModelError(f"{where}: model_type {config.get('model_type')!r} does not match architectures "
                         f"[{hf_class}] (expected {model_type!r}); fix the config")
    kind = "swin" if family == "swin" else "vit"
    known = _FAMILY_FIELDS[kind] | _FAMILY_IGNORED[kind] | _LABEL_FIELDS | _GENERIC_IGNORED | set(_GENERIC_OFF)
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ModelError(f"{where}: field '{unknown[0]}' is not covered by vitqtool's {hf_class} map"
                         f"{' (also: ' + ', '.join(unknown[1:4]) + ')' if len(unknown) > 1 else ''}; "
                         "remove it if your transformers version ignores it")
    for name, off in _GENERIC_OFF.items():
        if name in config and config[name] not in (off, None):
            raise ModelError(f"{where}: field '{name}' = {config[name]!r} is not supported (only {off!r})")
    _check(config, "hidden_act", "gelu", where, "only exact GELU (nn.GELU) is mapped to timm")
    num_classes = len(labels_from_config(config, where))
    if kind == "vit":
        args = _vit_args(config, where)
        if family == "deit":
            args["reg_tokens"] = 1  # the distillation token, read by no head
    else:
        args = _swin_args(config, where)
    args["num_classes"] = num_classes
    return HFSpec(hf_class, family, prefix, _closest_name(family, args), args)


def _hf_class(config: Mapping[str, Any], where: str) -> str:
    archs = config.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise ModelError(f"{where}: field 'architectures' must name exactly one class (found {archs!r}); "
                         f"supported: {', '.join(CLASSES)}")
    if archs[0] not in CLASSES:
        raise ModelError(f"{where}: field 'architectures' names {archs[0]!r}, which vitqtool does not convert; "
                         f"supported: {', '.join(CLASSES)}")
    return archs[0]


def _check(config: Mapping[str, Any], name: str, expected: Any, where: str, why: str) -> None:
    if name in config and config[name] != expected:
        raise ModelError(f"{where}: field '{name}' = {config[name]!r} is not supported ({why}; expected {expected!r})")


def _int(config: Mapping[str, Any], name: str, where: str, default: int | None = None) -> int:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{where}: field '{name}' must be a positive integer, found {value!r}")
    return value


def _pair(config: Mapping[str, Any], name: str, where: str, default: int) -> int | tuple[int, int]:
    value = config.get(name, default)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return value[0] if value[0] == value[1] else (int(value[0]), int(value[1]))
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ModelError(f"{where}: field '{name}' must be a positive integer or [height, width], found {value!r}")


def _prob(config: Mapping[str, Any], name: str, where: str) -> float:
    value = config.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ModelError(f"{where}: field '{name}' must be a probability in [0, 1), found {value!r}")
    return float(value)


def _vit_args(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    dim = _int(config, "hidden_size", where, 768)
    heads = _int(config, "num_attention_heads", where, 12)
    if dim % heads:
        raise ModelError(f"{where}: field 'num_attention_heads' ({heads}) does not divide hidden_size ({dim})")
    _check(config, "head_dim", dim // heads, where, "timm ViT heads are hidden_size / num_attention_heads wide")
    hidden = _int(config, "intermediate_size", where, 3072)
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:
        raise ModelError(f"{where}: field 'intermediate_size' ({hidden}) is not int(hidden_size * ratio) for any float ratio")
    eps = config.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ModelError(f"{where}: field 'layer_norm_eps' must be a small positive number, found {eps!r}")
    qkv_bias = config.get("qkv_bias", True)
    if not isinstance(qkv_bias, bool):
        raise ModelError(f"{where}: field 'qkv_bias' must be true or false, found {qkv_bias!r}")
    hidden_drop = _prob(config, "hidden_dropout_prob", where)
    return {
        "img_size": _pair(config, "image_size", where, 224), "patch_size": _pair(config, "patch_size", where, 16),
        "in_chans": _int(config, "num_channels", where, 3), "embed_dim": dim,
        "depth": _int(config, "num_hidden_layers", where, 12), "num_heads": heads, "mlp_ratio": mlp_ratio,
        "qkv_bias": qkv_bias, NORM_EPS_ARG: float(eps), "global_pool": "token", "class_token": True,
        # training only (eval is dropout-free); timm also drops after the GELU, transformers does not
        "pos_drop_rate": hidden_drop, "proj_drop_rate": hidden_drop,
        "attn_drop_rate": _prob(config, "attention_probs_dropout_prob", where),
    }


def _swin_args(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    if config.get("use_absolute_embeddings", False):
        raise ModelError(f"{where}: field 'use_absolute_embeddings' = true is not supported "
                         "(timm's SwinTransformer has no absolute position embedding)")
    _check(config, "layer_norm_eps", 1e-5, where, "transformers' Swin keeps eps 1e-5 in its embedding and "
           "patch-merging norms; timm uses one eps for every norm")
    img = _pair(config, "image_size", where, 224)
    if isinstance(img, tuple):
        raise ModelError(f"{where}: field 'image_size' = {list(img)} is not supported for Swin (square images only: "
                         "transformers and timm shrink windows differently on non-square maps)")
    depths, heads = config.get("depths", [2, 2, 6, 2]), config.get("num_heads", [3, 6, 12, 24])
    for name, value in (("depths", depths), ("num_heads", heads)):
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) and v > 0 for v in value):
            raise ModelError(f"{where}: field '{name}' must be a list of positive integers, found {value!r}")
    if len(depths) != len(heads):
        raise ModelError(f"{where}: field 'num_heads' has {len(heads)} stages, depths has {len(depths)}")
    embed = _int(config, "embed_dim", where, 96)
    for stage, h in enumerate(heads):
        if (embed << stage) % h:
            raise ModelError(f"{where}: field 'num_heads' ({h}) does not divide stage {stage}'s width ({embed << stage})")
    _check(config, "num_layers", len(depths), where, "num_layers is len(depths)")
    _check(config, "hidden_size", embed << (len(depths) - 1), where, "hidden_size is embed_dim * 2**(stages - 1)")
    window = _int(config, "window_size", where, 7)
    mlp_ratio = config.get("mlp_ratio", 4.0)
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
        raise ModelError(f"{where}: field 'mlp_ratio' must be a positive number, found {mlp_ratio!r}")
    qkv_bias = config.get("qkv_bias", True)
    if not isinstance(qkv_bias, bool):
        raise ModelError(f"{where}: field 'qkv_bias' must be true or false, found {qkv_bias!r}")
    return {
        "img_size": img, "patch_size": _int(config, "patch_size", where, 4), "in_chans": _int(config, "num_channels", where, 3),
        "embed_dim": embed, "depths": list(depths), "num_heads": list(heads), "window_size": window,
        "mlp_ratio": float(mlp_ratio), "qkv_bias": qkv_bias, "global_pool": "avg",
        # training only
        "proj_drop_rate": _prob(config, "hidden_dropout_prob", where),
        "attn_drop_rate": _prob(config, "attention_probs_dropout_prob", where),
        "drop_path_rate": _prob(config, "drop_path_rate", where),
    }


def _closest_name(family: str, args: dict[str, Any]) -> str:
    """The timm entry point whose (width, depth, heads, patch) agree most with the converted args."""
    if family == "swin":
        want = (args["embed_dim"], sum(args["depths"]), args["num_heads"][0], args["patch_size"])
    else:
        patch = args["patch_size"]
        want = (args["embed_dim"], args["depth"], args["num_heads"], patch if isinstance(patch, int) else patch[0])
    scored = [(sum(a == b for a, b in zip(row[1:], want)), -i, row[0]) for i, row in enumerate(_TIMM_NAMES[family])]
    return max(scored)[2]


def labels_from_config(config: Mapping[str, Any], where: str = "config.json") -> list[str]:
    """Class names in class-index order from `id2label` (transformers' default: 2 classes LABEL_0, LABEL_1)."""
    id2label = config.get("id2label")
    num_labels = config.get("num_labels")
    if id2label is None:
        n = 2 if num_labels is None else num_labels
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ModelError(f"{where}: field 'num_labels' must be a non-negative integer, found {n!r}")
        return [f"LABEL_{i}" for i in range(n)]
    if not isinstance(id2label, dict):
        raise ModelError(f"{where}: field 'id2label' must be an object {{\"0\": name, ...}}, found {type(id2label).__name__}")
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ModelError(f"{where}: field 'id2label' has keys that are not class indices") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ModelError(f"{where}: field 'id2label' must number the classes 0..{len(by_index) - 1} without gaps")
    if num_labels is not None and num_labels != len(by_index):
        raise ModelError(f"{where}: field 'num_labels' ({num_labels}) disagrees with id2label ({len(by_index)} classes)")
    return [by_index[i] for i in range(len(by_index))]


def timm_kwargs(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """create_model kwargs from model_args: the plain `layer_norm_eps` becomes `norm_layer=LayerNorm(eps=...)`."""
    kwargs = dict(model_args)
    eps = kwargs.pop(NORM_EPS_ARG, None)
    if eps is not None:
        if "norm_layer" in kwargs:
            raise ModelError(f"model_args give both '{NORM_EPS_ARG}' and 'norm_layer'; pass one")
        kwargs["norm_layer"] = functools.partial(nn.LayerNorm, eps=float(eps))
    for key in ("img_size", "patch_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return kwargs


# --------------------------------------------------------------------------- preprocessor map

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PROCESSOR_TYPES = {"ViTImageProcessor", "ViTImageProcessorFast", "ViTImageProcessorPil", "ViTFeatureExtractor",
                    "DeiTImageProcessor", "DeiTImageProcessorFast", "DeiTImageProcessorPil", "DeiTFeatureExtractor"}
_PROCESSOR_FIELDS = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                     "do_normalize", "image_mean", "image_std", "do_convert_rgb", "image_processor_type",
                     "feature_extractor_type", "processor_class"}


def data_config_from_preprocessor(pp: Mapping[str, Any], num_channels: int, model_size: tuple[int, int],
                                  where: str = "preprocessor_config.json") -> dict[str, Any]:
    """timm data-config keys (input_size, crop_pct, crop_mode, mean, std, interpolation) of a ViT/DeiT image processor.

    `size` {height, width} (or an int) is a resize that ignores the aspect ratio (timm crop_mode
    "squash"), `{shortest_edge}` keeps it ("center"); `crop_size` with `do_center_crop` gives
    crop_pct = crop / size. Raises ModelError naming a field with no timm equivalent.
    """
    kind = pp.get("image_processor_type") or pp.get("feature_extractor_type")
    if kind is not None and kind not in _PROCESSOR_TYPES:
        field_name = "image_processor_type" if pp.get("image_processor_type") else "feature_extractor_type"
        raise ModelError(f"{where}: field '{field_name}' = {kind!r} is not mapped (supported: ViT and DeiT image processors)")
    for key in sorted(pp):
        if key not in _PROCESSOR_FIELDS:
            if key.startswith("do_"):
                raise ModelError(f"{where}: field '{key}' switches on a processing step vitqtool does not map")
            log.info("%s: ignoring field '%s'", where, key)
    if pp.get("do_resize", True) is not True:
        raise ModelError(f"{where}: field 'do_resize' = {pp['do_resize']!r} is not supported (timm transforms always resize)")
    if pp.get("do_rescale", True):
        factor = pp.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or abs(factor - 1 / 255) > 1e-9:
            raise ModelError(f"{where}: field 'rescale_factor' = {factor!r} is not supported (only 1/255)")
    else:
        raise ModelError(f"{where}: field 'do_rescale' = false is not supported (timm transforms scale pixels by 1/255)")
    size = _size_field(pp, "size", where)
    crop = _size_field(pp, "crop_size", where) if pp.get("do_center_crop", False) else None
    if "shortest_edge" in size:
        if crop is None or "shortest_edge" in crop:
            raise ModelError(f"{where}: field 'do_center_crop' must be true with a crop_size {{height, width}} when size "
                             "is {shortest_edge}: otherwise the image size depends on the input")
        scale, mode = (size["shortest_edge"], size["shortest_edge"]), "center"
    else:
        scale, mode = (size["height"], size["width"]), "squash"
    out_hw = (crop["height"], crop["width"]) if crop is not None else scale
    if crop is not None and crop["height"] * scale[1] != crop["width"] * scale[0]:
        raise ModelError(f"{where}: field 'crop_size' {out_hw} is not one fraction of size {scale} in both dimensions")
    if tuple(out_hw) != tuple(model_size):
        raise ModelError(f"{where}: field '{'crop_size' if crop is not None else 'size'}' gives {out_hw[0]}x{out_hw[1]} "
                         f"images, the model's image_size is {model_size[0]}x{model_size[1]}")
    cfg: dict[str, Any] = {"input_size": (num_channels, *out_hw), "crop_mode": mode,
                           "crop_pct": _crop_pct(out_hw, scale, where), "interpolation": _resample(pp, where)}
    if pp.get("do_normalize", True):
        cfg["mean"], cfg["std"] = _stats(pp, "image_mean", num_channels, where), _stats(pp, "image_std", num_channels, where)
        if any(s <= 0 for s in cfg["std"]):
            raise ModelError(f"{where}: field 'image_std' must be positive")
    else:
        cfg["mean"], cfg["std"] = (0.0,) * num_channels, (1.0,) * num_channels
    return cfg


def _size_field(pp: Mapping[str, Any], name: str, where: str) -> dict[str, int]:
    value = pp.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return {"height": value, "width": value}  # ViT/DeiT processors read an int as a square
    if isinstance(value, dict):
        if set(value) == {"height", "width"} or set(value) == {"shortest_edge"}:
            if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
                return dict(value)
    raise ModelError(f"{where}: field '{name}' = {value!r} is not supported (an int, {{height, width}} or {{shortest_edge}})")


def _crop_pct(out_hw: tuple[int, int], scale: tuple[int, int], where: str) -> float:
    """The crop fraction whose floor(size / crop_pct) (vitqtool's eval transform) gives back `scale` exactly."""
    pct = out_hw[0] / scale[0]
    for _ in range(64):  # float division can land one ulp low: step down until floor() is exact
        if all(math.floor(o / pct) == s for o, s in zip(out_hw, scale)):
            return pct
        pct = math.nextafter(pct, 0.0)
    raise ModelError(f"{where}: fields 'size'/'crop_size' ({scale} -> {out_hw}) have no exact timm crop_pct")


def _resample(pp: Mapping[str, Any], where: str) -> str:
    value = pp.get("resample", 2)
    if isinstance(value, int) and value in _PIL_RESAMPLE:
        return _PIL_RESAMPLE[value]
    if isinstance(value, str) and value.lower() in _PIL_RESAMPLE.values():
        return value.lower()
    raise ModelError(f"{where}: field 'resample' = {value!r} is not a PIL resampling filter (0-5)")


def _stats(pp: Mapping[str, Any], name: str, channels: int, where: str) -> tuple[float, ...]:
    value = pp.get(name, [0.5] * channels)
    values = [value] if isinstance(value, (int, float)) else value
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ModelError(f"{where}: field '{name}' must be a number or a list of numbers, found {value!r}")
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ModelError(f"{where}: field '{name}' has {len(values)} values for a {channels}-channel model")
    return tuple(float(v) for v in values)


# --------------------------------------------------------------------------- key map


def module_names(spec: HFSpec) -> list[Names]:
    """The key map: every timm module/parameter of `spec`'s model and its transformers counterpart(s)."""
    args = spec.model_args
    if spec.family == "swin":
        return _swin_names(args)
    p = spec.prefix
    rows = [Names("cls_token", (f"{p}.embeddings.cls_token",)),
            Names("pos_embed", (f"{p}.embeddings.position_embeddings",)),
            Names("patch_embed.proj", (f"{p}.embeddings.patch_embeddings.projection",))]
    if spec.family == "deit":
        rows.append(Names("reg_token", (f"{p}.embeddings.distillation_token",)))
    elif spec.family == "deit_distilled":
        rows.append(Names("dist_token", (f"{p}.embeddings.distillation_token",)))
    for i in range(args["depth"]):
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
    if spec.family == "deit_distilled":
        rows += [Names("head", ("cls_classifier",)), Names("head_dist", ("distillation_classifier",))]
    else:
        rows.append(Names("head", ("classifier",)))
    return rows


def _swin_names(args: Mapping[str, Any]) -> list[Names]:
    rows = [Names("patch_embed.proj", ("swin.embeddings.patch_embeddings.projection",)),
            Names("patch_embed.norm", ("swin.embeddings.norm",))]
    for s, depth in enumerate(args["depths"]):
        if s > 0:  # transformers: the end of stage s - 1; timm: the start of stage s
            merge = f"swin.encoder.layers.{s - 1}.downsample"
            rows += [Names(f"layers.{s}.downsample.norm", (f"{merge}.norm",)),
                     Names(f"layers.{s}.downsample.reduction", (f"{merge}.reduction",))]
        for b in range(depth):
            hf, t = f"swin.encoder.layers.{s}.blocks.{b}", f"layers.{s}.blocks.{b}"
            rows += [
                Names(f"{t}.norm1", (f"{hf}.layernorm_before",)),
                Names(f"{t}.attn.qkv", tuple(f"{hf}.attention.self.{n}" for n in ("query", "key", "value")),
                      tuple(f"{hf}.attention.{n}_proj" for n in "qkv")),
                Names(f"{t}.attn.relative_position_bias_table", (f"{hf}.attention.self.relative_position_bias_table",)),
                Names(f"{t}.attn.proj", (f"{hf}.attention.output.dense",), (f"{hf}.attention.o_proj",)),
                Names(f"{t}.norm2", (f"{hf}.layernorm_after",)),
                Names(f"{t}.mlp.fc1", (f"{hf}.intermediate.dense",), (f"{hf}.mlp.fc1",)),
                Names(f"{t}.mlp.fc2", (f"{hf}.output.dense",), (f"{hf}.mlp.fc2",)),
            ]
    rows += [Names("norm", ("swin.layernorm",)), Names("head.fc", ("classifier",))]
    return rows


def recomputed_buffers(spec: HFSpec) -> list[tuple[str, str]]:
    """(transformers key, timm buffer) pairs that older checkpoints store and timm recomputes: checked, not loaded."""
    if spec.family != "swin":
        return []
    return [(f"swin.encoder.layers.{s}.blocks.{b}.attention.self.relative_position_index",
             f"layers.{s}.blocks.{b}.attn.relative_position_index")
            for s, depth in enumerate(spec.model_args["depths"]) for b in range(depth)]


def table(spec: HFSpec) -> dict[str, Names]:
    """The key map as {timm module/parameter name: Names}."""
    return {row.timm: row for row in module_names(spec)}


def hf_sources(key: str, names: Mapping[str, Names]) -> tuple[str, ...] | None:
    """The transformers keys a timm state key is made of (several: concatenated along dim 0); None if unmapped."""
    if key in names:
        return names[key].hf
    owner, _, leaf = key.rpartition(".")
    row = names.get(owner)
    return None if row is None else tuple(f"{h}.{leaf}" for h in row.hf)


def to_timm_state(state: Mapping[str, Tensor], spec: HFSpec, model: nn.Module, where: str) -> dict[str, Tensor]:
    """Convert a transformers state dict to `model`'s timm keys, using every tensor exactly once.

    Raises:
        WeightsError naming missing transformers keys, leftover (unused) keys, shape mismatches,
        or a stored relative_position_index that differs from the one timm computes.
    """
    names = table(spec)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for key, target in model.state_dict().items():
        sources = hf_sources(key, names)
        if sources is None:
            raise WeightsError(f"{where}: timm key '{key}' has no entry in the {spec.hf_class} key map (a vitqtool bug)")
        absent = [s for s in sources if s not in state]
        if absent:
            missing += absent
            continue
        parts = [state[s] for s in sources]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        used.update(sources)
        if tuple(value.shape) != tuple(target.shape):
            mismatched.append(f"{'+'.join(sources)} {tuple(value.shape)} vs timm {key} {tuple(target.shape)}")
            continue
        out[key] = value
    for hf_key, buffer in recomputed_buffers(spec):
        if hf_key in state:
            expected = model.get_buffer(buffer)
            stored = state[hf_key]
            if stored.numel() != expected.numel() or not torch.equal(stored.reshape(-1).long(), expected.reshape(-1).long()):
                raise WeightsError(f"{where}: '{hf_key}' differs from the index timm computes for this window size; "
                                   "the checkpoint's window_size does not match its config")
            used.add(hf_key)
    leftover = sorted(set(state) - used)
    problems = []
    if missing:
        problems.append(f"missing keys {_shown(missing)}")
    if leftover:
        problems.append(f"unexpected keys {_shown(leftover)}")
    if mismatched:
        problems.append(f"shape mismatch {_shown(mismatched)}")
    if problems:
        raise WeightsError(f"{where} does not match {spec.hf_class} as its config.json describes it: " + "; ".join(problems))
    return out


def _shown(items: list[str]) -> str:
    more = f" (+{len(items) - _MAX_SHOWN} more, {len(items)} in all)" if len(items) > _MAX_SHOWN else ""
    return "[" + ", ".join(items[:_MAX_SHOWN]) + "]" + more
