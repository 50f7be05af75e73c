"""transformers classification checkpoints as timm models: what every family's config map and key map share.

A family plugin declares its transformers classes as `TransformersMap`s (the config map, `model_args`;
the key map, `key_map`), and registering the family registers them here. This module finds the map of a
`config.json`, checks the fields every transformers config shares, converts a state dict through a key
map using every tensor exactly once, and maps an image processor's config to a timm data config.

Config map (`timm_spec`): a transformers `config.json` becomes a timm architecture name plus
JSON-serialisable `timm.create_model` kwargs. Every field of the config is either mapped, checked
against what the timm model computes, or listed as irrelevant to the classifier's forward pass; any
other field is refused with a `ModelError` naming it.

Key map (`TransformersMap.key_map`): which timm module or parameter each transformers module or parameter
is. Names are those `save_pretrained` writes (and the hub holds); `runtime` names are the module names a
transformers >= 5 model has in memory (it renames on load), used only as export targets. Several
transformers tensors of one row (e.g. query, key, value) make one timm tensor, concatenated along dim 0.
"""

from __future__ import annotations

import abc
import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ModelError, WeightsError

log = logging.getLogger(__name__)

NORM_EPS_ARG = "layer_norm_eps"  # model_args field (a float) that `timm_kwargs` turns into a LayerNorm class
TRAINING_ARGS = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
_MAX_SHOWN = 5

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
_LABEL_FIELDS = {"id2label", "label2id", "num_labels", "architectures", "model_type"}


@dataclass(frozen=True)
class Names:
    """One row of the key map: a timm module/parameter and the transformers one(s) it is made of."""

    timm: str
    hf: tuple[str, ...]
    runtime: tuple[str, ...] | None = None  # transformers >= 5 in-memory module names, for Linear layers
    hf_view: tuple[int, ...] | None = None  # transformers stores the same elements in this shape (e.g. (1, 1, 1, -1))

    @property
    def runtime_names(self) -> tuple[str, ...]:
        """The in-memory names (the serialized ones where they are the same)."""
        return self.runtime or self.hf


class TransformersMap(abc.ABC):
    """One transformers classification class of a family: its config map and its key map to a timm model."""

    hf_class: ClassVar[str]                    # e.g. "ViTForImageClassification" (config.json `architectures`)
    model_type: ClassVar[str]                  # the config's `model_type`
    fields: ClassVar[frozenset[str]]           # config fields `model_args` reads or checks
    ignored: ClassVar[frozenset[str]] = frozenset()  # fields only other heads or tasks read (pooler, decoder, backbone)
    processor_types: ClassVar[frozenset[str]] = frozenset()  # image processors whose config maps to a timm data config
    timm_names: ClassVar[tuple[tuple[str, tuple[Any, ...]], ...]] = ()  # (timm name, `signature`): the closest names the model

    @abc.abstractmethod
    def model_args(self, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        """JSON-serialisable `timm.create_model` kwargs for `config` (num_classes is added by the caller).

        Raises ModelError naming the first field the timm model cannot follow.
        """

    @abc.abstractmethod
    def key_map(self, model_args: Mapping[str, Any]) -> list[Names]:
        """Every timm module/parameter of the model built from `model_args` and its transformers counterpart(s)."""

    def signature(self, model_args: Mapping[str, Any]) -> tuple[Any, ...]:
        """What `timm_names` are compared on (e.g. width, depth, heads, patch); the closest name wins."""
        return ()

    def recomputed_buffers(self, model_args: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(transformers key, timm buffer) pairs that checkpoints may store and timm recomputes: checked, not loaded."""
        return []

    def processor_config(self, data_config: Mapping[str, Any]) -> dict[str, Any] | None:
        """An image-processor config equivalent to `data_config` for an export folder, or None when there is none."""
        return None

    def unread(self, model_args: Mapping[str, Any]) -> tuple[str, ...]:
        """Key prefixes of tensors the transformers class holds but its classification forward never reads: not loaded."""
        return ()

    def export_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config.json an export writes from the source's (e.g. without the modules of `unread`, which it lacks)."""
        return config

    def generic_processor(self, pp: Mapping[str, Any], where: str) -> Mapping[str, Any]:
        """`pp` in the fields `data_config_from_preprocessor` reads; a processor with fields of its own translates them."""
        return pp

    def architecture(self, model_args: Mapping[str, Any]) -> str:
        """The timm entry point whose signature agrees most with the converted args (model_args set the rest)."""
        want = self.signature(model_args)
        scored = [(sum(a == b for a, b in zip(sig, want)), -i, name) for i, (name, sig) in enumerate(self.timm_names)]
        return max(scored)[2]


TRANSFORMERS: dict[str, TransformersMap] = {}  # transformers class name -> its map, filled by `register_transformers`
UNMAPPED: dict[str, str] = {}  # transformers class name -> why no timm model computes it, filled by `register_family`


def register_transformers(hf_map: TransformersMap) -> None:
    """Make a transformers class loadable (called when its family registers)."""
    TRANSFORMERS[hf_map.hf_class] = hf_map


@dataclass(frozen=True)
class HFSpec:
    """What a transformers config converts to: its map, the timm name and the create_model kwargs."""

    map: TransformersMap
    architecture: str    # timm name
    model_args: dict = field(default_factory=dict)  # JSON-serialisable timm kwargs (num_classes included)

    @property
    def hf_class(self) -> str:
        """The transformers class name."""
        return self.map.hf_class


# --------------------------------------------------------------------------- config map


def is_transformers_config(config: Any) -> bool:
    """True for a transformers `config.json` (it has `model_type`, and not timm's `architecture`)."""
    return isinstance(config, dict) and "model_type" in config and "architecture" not in config


def timm_spec(config: Mapping[str, Any], where: str = "config.json") -> HFSpec:
    """Map a transformers classification config to a timm architecture and model_args through its family's map.

    Raises:
        ModelError naming the first field the map does not cover (unsupported class, activation, a
        non-default value timm cannot follow, an unknown field, ...).
    """
    hf_map = _map_of(config, where)
    if config.get("model_type") != hf_map.model_type:
        raise ModelError(f"{where}: model_type {config.get('model_type')!r} does not match architectures "
                         f"[{hf_map.hf_class}] (expected {hf_map.model_type!r}); fix the config")
    _check_fields(config, hf_map.fields | hf_map.ignored | _LABEL_FIELDS, hf_map.hf_class, where)
    num_classes = len(labels_from_config(config, where))
    args = hf_map.model_args(config, where)
    args["num_classes"] = num_classes
    return HFSpec(hf_map, hf_map.architecture(args), args)


def _check_fields(config: Mapping[str, Any], known: frozenset[str] | set[str], hf_class: str, where: str) -> None:
    """Refuse a field the map does not know (besides the generic ones) and a generic feature switched on."""
    unknown = sorted(k for k in config if k not in known | _GENERIC_IGNORED | set(_GENERIC_OFF))
    if unknown:
        raise ModelError(f"{where}: field '{unknown[0]}' is not covered by vitqtool's {hf_class} map"
                         f"{' (also: ' + ', '.join(unknown[1:4]) + ')' if len(unknown) > 1 else ''}; "
                         "remove it if your transformers version ignores it")
    for name, off in _GENERIC_OFF.items():
        if name in config and config[name] not in (off, None):
            raise ModelError(f"{where}: field '{name}' = {config[name]!r} is not supported (only {off!r})")


def sub_config(config: Mapping[str, Any], name: str, model_type: str, fields: frozenset[str], hf_class: str,
               where: str) -> dict[str, Any]:
    """A nested config (a tower's `vision_config`), checked like a whole one; its own labels, if any, are not read."""
    sub = config.get(name)
    if not isinstance(sub, dict):
        raise ModelError(f"{where}: field '{name}' must be an object, found {type(sub).__name__}")
    inner = f"{where} {name}"
    if sub.get("model_type", model_type) != model_type:
        raise ModelError(f"{inner}: field 'model_type' = {sub['model_type']!r} is not supported (expected {model_type!r})")
    _check_fields(sub, fields | _LABEL_FIELDS, hf_class, inner)
    return sub


def _map_of(config: Mapping[str, Any], where: str) -> TransformersMap:
    supported = ", ".join(sorted(TRANSFORMERS))
    archs = config.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise ModelError(f"{where}: field 'architectures' must name exactly one class (found {archs!r}); supported: {supported}")
    if archs[0] in UNMAPPED:
        raise ModelError(f"{where}: {archs[0]} is not converted: {UNMAPPED[archs[0]]}")
    if archs[0] not in TRANSFORMERS:
        raise ModelError(f"{where}: field 'architectures' names {archs[0]!r}, which vitqtool does not convert; supported: {supported}")
    return TRANSFORMERS[archs[0]]


def check_field(config: Mapping[str, Any], name: str, expected: Any, where: str, why: str) -> None:
    """Refuse a field present with a value other than `expected` (the only one the timm model computes)."""
    if name in config and config[name] != expected:
        raise ModelError(f"{where}: field '{name}' = {config[name]!r} is not supported ({why}; expected {expected!r})")


def int_field(config: Mapping[str, Any], name: str, where: str, default: int | None = None) -> int:
    """A positive integer field (or its default)."""
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{where}: field '{name}' must be a positive integer, found {value!r}")
    return value


def pair_field(config: Mapping[str, Any], name: str, where: str, default: int) -> int | tuple[int, int]:
    """A size field: a positive integer, or [height, width] (an int when both are equal)."""
    value = config.get(name, default)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return value[0] if value[0] == value[1] else (int(value[0]), int(value[1]))
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ModelError(f"{where}: field '{name}' must be a positive integer or [height, width], found {value!r}")


def prob_field(config: Mapping[str, Any], name: str, where: str) -> float:
    """A probability field in [0, 1) (dropout rates; 0 by default)."""
    value = config.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ModelError(f"{where}: field '{name}' must be a probability in [0, 1), found {value!r}")
    return float(value)


def bool_field(config: Mapping[str, Any], name: str, where: str, default: bool) -> bool:
    """A true/false field (or its default)."""
    value = config.get(name, default)
    if not isinstance(value, bool):
        raise ModelError(f"{where}: field '{name}' must be true or false, found {value!r}")
    return value


def int_list_field(config: Mapping[str, Any], name: str, where: str, default: list[int]) -> list[int]:
    """A non-empty list of positive integers (per-stage depths, heads)."""
    value = config.get(name, default)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ModelError(f"{where}: field '{name}' must be a list of positive integers, found {value!r}")
    return list(value)


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
_PROCESSOR_FIELDS = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                     "do_normalize", "image_mean", "image_std", "do_convert_rgb", "image_processor_type",
                     "feature_extractor_type", "processor_class"}


def data_config_from_preprocessor(pp: Mapping[str, Any], num_channels: int, model_size: tuple[int, int],
                                  processor_types: frozenset[str], where: str = "preprocessor_config.json") -> dict[str, Any]:
    """timm data-config keys (input_size, crop_pct, crop_mode, mean, std, interpolation) of an image processor.

    `processor_types` are the processor classes the model's family maps (their configs share these fields).
    `size` {height, width} (or an int) is a resize that ignores the aspect ratio (timm crop_mode
    "squash"), `{shortest_edge}` keeps it ("center"); `crop_size` with `do_center_crop` gives
    crop_pct = crop / size. Raises ModelError naming a field with no timm equivalent.
    """
    kind = pp.get("image_processor_type") or pp.get("feature_extractor_type")
    if kind is not None and kind not in processor_types:
        field_name = "image_processor_type" if pp.get("image_processor_type") else "feature_extractor_type"
        raise ModelError(f"{where}: field '{field_name}' = {kind!r} is not mapped (supported: {', '.join(sorted(processor_types))})")
    for key in sorted(pp):
        if key not in _PROCESSOR_FIELDS:
            if key.startswith("do_") and pp[key] is not False:  # a step switched off (e.g. do_reduce_labels) is harmless
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
        return {"height": value, "width": value}  # the mapped processors read an int as a square
    if (isinstance(value, dict) and set(value) in ({"height", "width"}, {"shortest_edge"})
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values())):
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


_PIL_CODES = {name: code for code, name in _PIL_RESAMPLE.items()}


def pil_resample(interpolation: str | None, default: str = "bilinear") -> int:
    """The PIL resampling code an image processor stores for a timm interpolation name."""
    return _PIL_CODES.get(str(interpolation or default), _PIL_CODES[default])


def squash_processor_config(data_config: Mapping[str, Any], plain_type: str, crop_type: str) -> dict[str, Any] | None:
    """An image-processor config (`plain_type`, or `crop_type` when it center-crops) equivalent to a squash-mode
    data config; None for other crop modes, which these processors cannot express."""
    if str(data_config.get("crop_mode") or "center") != "squash":
        log.info("no preprocessor_config.json written: crop_mode %r has no image-processor equivalent", data_config.get("crop_mode"))
        return None
    _, h, w = (int(v) for v in data_config["input_size"])
    pct = float(data_config.get("crop_pct") or 1.0)
    size = {"height": math.floor(h / pct), "width": math.floor(w / pct)}
    crop = size != {"height": h, "width": w}
    out = {"image_processor_type": crop_type if crop else plain_type, "do_resize": True,
           "size": size, "resample": _PIL_CODES.get(str(data_config.get("interpolation") or "bilinear"), 2),
           "do_center_crop": crop, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [float(v) for v in data_config["mean"]], "image_std": [float(v) for v in data_config["std"]]}
    if crop:
        out["crop_size"] = {"height": h, "width": w}
    return out


# --------------------------------------------------------------------------- key map


def module_names(spec: HFSpec) -> list[Names]:
    """The key map of `spec`'s model (its family map's rows)."""
    return spec.map.key_map(spec.model_args)


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


def hf_view(key: str, names: Mapping[str, Names]) -> tuple[int, ...] | None:
    """The shape transformers stores timm state key `key` in, when its row says it differs (None: the same shape)."""
    row = names.get(key) or names.get(key.rpartition(".")[0])
    return None if row is None else row.hf_view


def to_timm_state(state: Mapping[str, Tensor], spec: HFSpec, model: nn.Module, where: str) -> dict[str, Tensor]:
    """Convert a transformers state dict to `model`'s timm keys, using every tensor exactly once.

    Raises:
        WeightsError naming missing transformers keys, leftover (unused) keys, shape mismatches,
        or a stored relative_position_index that differs from the one timm computes.
    """
    names = table(spec)
    unread = spec.map.unread(spec.model_args)
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
        view = hf_view(key, names)
        if view is not None and value.numel() == target.numel() and tuple(value.shape) == tuple(target.reshape(view).shape):
            value = value.reshape(target.shape)  # the timm tensor, stored in transformers' shape
        if tuple(value.shape) != tuple(target.shape):
            mismatched.append(f"{'+'.join(sources)} {tuple(value.shape)} vs timm {key} {tuple(target.shape)}")
            continue
        out[key] = value
    for hf_key, buffer in spec.map.recomputed_buffers(spec.model_args):
        if hf_key in state:
            expected = model.get_buffer(buffer)
            stored = state[hf_key]
            if stored.numel() != expected.numel() or not torch.equal(stored.reshape(-1).long(), expected.reshape(-1).long()):
                raise WeightsError(f"{where}: '{hf_key}' differs from the index timm computes for this window size; "
                                   "the checkpoint's window_size does not match its config")
            used.add(hf_key)
    dropped = sorted(k for k in set(state) - used if k.startswith(unread))
    if dropped:
        log.info("%s: not loading %d tensors %s never reads for classification (%s)", where, len(dropped), spec.hf_class,
                 ", ".join(dropped[:_MAX_SHOWN]))
    leftover = sorted(set(state) - used - set(dropped))
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
