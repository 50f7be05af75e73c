"""Resolve a MODEL spec (timm name, alias, hf-hub id, local folder, name + weights file) to an FP model.

Loading is always strict: a missing, unexpected or mis-shaped tensor is a `WeightsError` that names
the keys. The data config is timm's, resolved against the model as built (so `img_size=32` gives
`input_size=(3, 32, 32)`), plus `num_classes`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import ModelError, WeightsError
from ..families import hf_map
from ..families.base import convert_checkpoint
from ..fileio import atomic_write, json_default, save_safetensors, state_dict_for_safetensors
from . import hf_models
from .weights import SAFETENSORS_EXTS, TORCH_EXTS, first_line, load_state_dict_file, load_strict

logger = logging.getLogger(__name__)

FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "open_clip_pytorch_model.bin")


@dataclass
class LoadedModel:
    """An FP timm model in eval mode, with everything needed to rebuild and feed it."""

    model: nn.Module
    data_config: dict
    architecture: str
    model_args: dict = field(default_factory=dict)
    source: str = ""
    source_format: str = "timm"  # "timm", or "transformers" for a converted transformers checkpoint
    source_config: dict | None = None  # transformers: the whole config.json
    preprocessor_config: dict | None = None  # transformers: preprocessor_config.json, when present


# --------------------------------------------------------------------------- spec resolution


def resolve_model(
    spec: str,
    weights: str | Path | None = None,
    random_init: bool = False,
    num_classes: int | None = None,
    model_args: dict | None = None,
) -> LoadedModel:
    """Resolve a MODEL spec (timm name/alias, hf-hub:..., local folder) to an FP model in eval mode."""
    spec = str(spec).strip()
    if not spec:
        raise ModelError("empty MODEL; pass a timm model name, hf-hub:timm/..., or a folder")
    extra = dict(model_args or {})
    if num_classes is not None:
        extra["num_classes"] = int(num_classes)
    if weights is not None and random_init:
        raise ModelError("--weights and --random-init exclude each other; pass only one")

    if spec.startswith("hf-hub:"):
        loaded = _from_hf_hub(spec, weights, random_init, extra)
    elif _looks_like_path(spec):
        path = Path(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec).expanduser()
        loaded = _from_path(path, spec, weights, random_init, extra)
    else:
        loaded = _from_timm_name(spec, weights, random_init, extra)
    loaded.model.eval()
    return loaded


def load_model(
    spec: str, weights: str | Path | None = None, random_init: bool = False, **kw: Any
) -> tuple[nn.Module, dict]:
    """Public API: resolve a MODEL spec and return (FP model in eval mode, timm data config)."""
    loaded = resolve_model(spec, weights=weights, random_init=random_init, **kw)
    return loaded.model, loaded.data_config


def _looks_like_path(spec: str) -> bool:
    """A spec is a path when it says so (separators, ~, local-dir:, a weights suffix) or exists and is no timm name."""
    if spec.startswith(("local-dir:", "~", ".")) or "/" in spec or os.sep in spec:
        return True
    if Path(spec).suffix.lower() in SAFETENSORS_EXTS + TORCH_EXTS + (".json",):
        return True
    if Path(spec).exists():
        import timm

        return not timm.is_model(spec.partition(".")[0])
    return False


def resolve_timm_name(spec: str) -> str:
    """Return the timm model name for `spec` (exact name, name.tag, or unambiguous short alias)."""
    import timm

    name, _, tag = spec.partition(".")
    if timm.is_model(name):
        return spec
    all_names = timm.list_models()
    candidates = [n for n in all_names if n.startswith(name + "_")]
    if len(candidates) == 1:
        resolved = candidates[0] + (f".{tag}" if tag else "")
        logger.info("model alias '%s' resolved to '%s'", spec, resolved)
        return resolved
    if len(candidates) > 1:
        shown = ", ".join(candidates[:10]) + (f" (+{len(candidates) - 10} more)" if len(candidates) > 10 else "")
        raise ModelError(f"model alias '{spec}' is ambiguous: it matches {shown}; pass the full timm name")
    close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    raise ModelError(f"unknown model '{spec}' (not a timm model, alias or existing path); {hint}")


def _from_timm_name(spec: str, weights: str | Path | None, random_init: bool, extra: dict) -> LoadedModel:
    import timm

    name = resolve_timm_name(spec)
    arch = name.partition(".")[0]
    if weights is not None or random_init:
        model = _create(name, pretrained=False, kwargs=extra)
        if weights is not None:
            load_weights_file(model, weights)
        return _finish(model, arch, extra, spec)

    # pretrained weights: timm drops the classifier and loads non-strictly when num_classes differs,
    # so refuse that instead of handing back a model with a random head.
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelError(
            f"timm has no pretrained weights for '{name}'; pass --weights FILE (a .safetensors/.pth file) "
            "or --random-init"
        )
    if "num_classes" in extra and cfg.num_classes and extra["num_classes"] != cfg.num_classes:
        raise ModelError(
            f"pretrained weights for '{name}' have {cfg.num_classes} classes, not --num-classes "
            f"{extra['num_classes']}; pass --weights FILE with a {extra['num_classes']}-class head "
            "(or drop --num-classes)"
        )
    if _hub_offline() and not _pretrained_cached(cfg):
        raise WeightsError(_offline_message(name))
    try:
        model = timm.create_model(name, pretrained=True, **_timm_kwargs(extra))
    except Exception as exc:
        raise _pretrained_error(name, exc) from exc
    return _finish(model, arch, extra, spec)


def _from_hf_hub(spec: str, weights: str | Path | None, random_init: bool, extra: dict) -> LoadedModel:
    import timm
    from timm.models import load_model_config_from_hf

    folder = hf_models.hub_folder(spec[len("hf-hub:"):], offline=_hub_offline())  # a transformers repo (model_type)
    if folder is not None:
        return _from_transformers_folder(folder, hf_models.read_json(folder / hf_models.CONFIG), spec, weights, random_init, extra)
    pretrained = weights is None and not random_init
    try:
        hub_cfg, _, _ = load_model_config_from_hf(spec[len("hf-hub:"):])
    except Exception as exc:
        if _is_hub_error(exc) and _hub_offline():
            raise WeightsError(
                f"model config files for '{spec}' are not in the local Hugging Face cache and the hub is offline; "
                "pass its timm architecture name with --weights FILE (a .safetensors/.pth file) instead"
            ) from exc
        raise _pretrained_error(spec, exc, what="model config files") from exc
    hub_classes = hub_cfg.get("num_classes")
    if pretrained and "num_classes" in extra and hub_classes and extra["num_classes"] != hub_classes:
        raise ModelError(
            f"pretrained weights for '{spec}' have {hub_classes} classes, not --num-classes {extra['num_classes']}; "
            f"pass --weights FILE with a {extra['num_classes']}-class head (or drop --num-classes)"
        )
    try:
        model = timm.create_model(spec, pretrained=pretrained, **_timm_kwargs(extra))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelError(f"cannot build '{spec}' with {extra}: {first_line(exc)}; fix --model-args") from exc
    except Exception as exc:
        raise _pretrained_error(spec, exc) from exc
    if weights is not None:
        load_weights_file(model, weights)
    pretrained_cfg = cast(dict, model.pretrained_cfg)  # timm sets this dict on every model it creates
    arch = pretrained_cfg.get("architecture") or type(model).__name__
    args = {k: v for k, v in (getattr(model, "_model_args", None) or {}).items() if k != "pretrained_model_args"}
    args.update(extra)
    return _finish(model, arch, args, spec)


def _from_path(path: Path, spec: str, weights: str | Path | None, random_init: bool, extra: dict) -> LoadedModel:
    if not path.exists():
        raise ModelError(f"model path '{path}' does not exist; pass a timm name or a folder with config.json")
    folder = path if path.is_dir() else path.parent
    weights_file: Path | None = None
    if path.is_file():
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"'{path}' is a weights file without a config.json next to it; pass the architecture as MODEL "
                f"and the file as weights (MODEL --weights {path})"
            )
        if path.name != "config.json":
            weights_file = path
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"model folder '{folder}' has no config.json; expected timm's hub layout "
                         "(config.json + model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"'{config_path}' is not valid JSON ({first_line(exc)}); fix or re-export it") from exc
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not arch and hf_map.is_transformers_config(config):  # a transformers save_pretrained folder
        return _from_transformers_folder(folder, config, spec, weights if weights is not None else weights_file, random_init, extra)
    if not arch:
        raise ModelError(f"'{config_path}' has no 'architecture' field (timm's hub config.json) nor 'model_type' "
                         "(a transformers config.json)")
    if not isinstance(arch, str):
        raise ModelError(f"'{config_path}': field 'architecture' must be a timm model name, got {arch!r}")
    arch = resolve_timm_name(arch)
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ModelError(f"'{config_path}': field 'model_args' must be a JSON object of timm.create_model arguments, got {model_args!r:.80}")
    args = dict(model_args)
    if config.get("num_classes") is not None:
        if isinstance(config["num_classes"], bool) or not isinstance(config["num_classes"], int) or config["num_classes"] < 1:
            raise ModelError(f"'{config_path}': field 'num_classes' must be a positive integer, got {config['num_classes']!r:.80}")
        args["num_classes"] = config["num_classes"]
    if not isinstance(config.get("pretrained_cfg") or {}, dict):
        raise ModelError(f"'{config_path}': field 'pretrained_cfg' must be a JSON object, got {config['pretrained_cfg']!r:.80}")
    args.update(extra)
    pretrained_cfg = _clean_pretrained_cfg(config.get("pretrained_cfg") or {}, arch)
    model = _create(arch, pretrained=False, kwargs=args, pretrained_cfg=pretrained_cfg)
    if weights is not None:
        weights_file = Path(weights)
    elif weights_file is None and not random_init:
        weights_file = next((folder / f for f in FOLDER_WEIGHT_FILES if (folder / f).is_file()), None)
        if weights_file is None:
            raise WeightsError(
                f"model folder '{folder}' has no weights ({' or '.join(FOLDER_WEIGHT_FILES[:2])}); "
                "add them, pass --weights FILE, or --random-init"
            )
    if weights_file is not None:
        load_weights_file(model, weights_file)
    return _finish(model, arch.partition(".")[0], args, spec)


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a weights file strictly, after its family converts another published layout it knows (e.g. its authors')."""
    load_strict(model, convert_checkpoint(model, load_state_dict_file(path)), f"weights file '{path}'")


def _timm_kwargs(model_args: dict) -> dict:
    """create_model kwargs from JSON model_args (`layer_norm_eps` -> `norm_layer`; see hf_map.timm_kwargs)."""
    return hf_map.timm_kwargs(model_args)


def _from_transformers_folder(folder: Path, config: dict[str, Any], source: str, weights: str | Path | None = None,
                random_init: bool = False, extra: dict[str, Any] | None = None) -> LoadedModel:
    """Build the timm equivalent of a transformers checkpoint folder (its family's map) and load its weights strictly.

    Args:
        folder: the folder holding config.json (and weights, preprocessor_config.json).
        config: its parsed config.json.
        source: the MODEL spec, recorded as the loaded model's source.
        weights: a transformers-layout weights file to use instead of the folder's.
        random_init: build without loading weights.
        extra: --model-args/--num-classes; only training-time knobs (dropout rates) may differ.
    Returns:
        A `LoadedModel` with `source_format="transformers"`, the whole config.json and
        preprocessor config, and `labels` (id2label) in its data config.
    Raises:
        ModelError for a config field the map does not cover; WeightsError for missing, leftover or
        mis-shaped tensors (named).
    """
    where = str(folder / hf_models.CONFIG)
    qc = config.get("quantization_config")
    if qc is not None:
        if isinstance(qc, dict) and "vitqtool" in qc:
            raise ModelError(f"'{folder}' is a quantized vitqtool export, not an FP model; evaluate it directly "
                             "(vitqtool evaluate DIR) or pass the FP checkpoint it came from")
        raise ModelError(f"{where}: field 'quantization_config' (an already quantized checkpoint) is not supported; "
                         "pass the FP checkpoint")
    spec = hf_map.timm_spec(config, where)
    args = hf_models.merge_args(spec.model_args, extra or {}, where)
    model = _create(spec.architecture, pretrained=False, kwargs=args)
    if not random_init:
        state, what = hf_models.read_weights(folder, weights)
        load_strict(model, hf_map.to_timm_state(state, spec, model, what), what)
    preprocessor = hf_models.read_json(folder / hf_models.PREPROCESSOR) if (folder / hf_models.PREPROCESSOR).is_file() else None
    data_config = resolve_data_config(model, args)
    if preprocessor is not None:
        size = data_config["input_size"][1:]
        pp_where = str(folder / hf_models.PREPROCESSOR)
        data_config.update(hf_map.data_config_from_preprocessor(
            spec.map.generic_processor(preprocessor, pp_where), int(args["in_chans"]), (int(size[0]), int(size[1])),
            spec.map.processor_types, pp_where))
    else:
        logger.info("'%s' has no %s; using timm's defaults for %s", folder, hf_models.PREPROCESSOR, spec.architecture)
    data_config["labels"] = hf_map.labels_from_config(config, where)
    model.eval()
    return LoadedModel(model=model, data_config=data_config, architecture=spec.architecture, model_args=args,
                       source=source, source_format="transformers", source_config=config,
                       preprocessor_config=preprocessor)


def _create(name: str, pretrained: bool, kwargs: dict, pretrained_cfg: dict | None = None) -> nn.Module:
    import timm

    shown = kwargs
    kwargs = _timm_kwargs(kwargs)
    try:
        if pretrained_cfg is not None:
            return timm.create_model(name, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **kwargs)
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ModelError(f"cannot build '{name}' with {shown}: {first_line(exc)}; fix --model-args") from exc
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise ModelError(f"cannot build '{name}' with {shown}: {first_line(exc)}") from exc


def _clean_pretrained_cfg(cfg: dict, arch: str) -> dict:
    """Keep only PretrainedCfg fields, drop weight sources (weights come from our folder), fix JSON lists."""
    from timm.models import PretrainedCfg

    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in known}
    for key in ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict"):
        out.pop(key, None)
    out.setdefault("architecture", arch.partition(".")[0])
    return out


def _finish(model: nn.Module, arch: str, model_args: dict, source: str) -> LoadedModel:
    model.eval()
    return LoadedModel(
        model=model,
        data_config=resolve_data_config(model, model_args),
        architecture=arch,
        model_args=dict(model_args),
        source=source,
    )


def resolve_data_config(model: nn.Module, model_args: dict | None = None) -> dict:
    """timm data config for the model as built (input_size follows img_size/in_chans), plus num_classes."""
    import timm.data

    resolver = getattr(timm.data, "resolve_input_data_config", None)
    if resolver is not None:
        cfg = dict(resolver(model))
    else:  # older timm: pretrained_cfg input_size, patched from the build args
        cfg = dict(timm.data.resolve_data_config(model=model))
        args = model_args or {}
        if args.get("img_size") is not None or args.get("in_chans") is not None:
            size = args.get("img_size") or cfg["input_size"][1:]
            size = (size, size) if isinstance(size, int) else tuple(size)
            cfg["input_size"] = (int(args.get("in_chans") or cfg["input_size"][0]), *size)
    cfg["num_classes"] = int(getattr(model, "num_classes", (model_args or {}).get("num_classes", 0)) or 0)
    return cfg


def _pretrained_error(name: str, exc: Exception, what: str = "pretrained weights") -> Exception:
    """Turn whatever timm / huggingface_hub / torch.hub raised into one actionable line."""
    text = first_line(exc)
    if isinstance(exc, RuntimeError) and "No pretrained weights exist" in text:
        return ModelError(
            f"timm has no pretrained weights for '{name}'; pass --weights FILE (a .safetensors/.pth file) "
            "or --random-init"
        )
    if isinstance(exc, RuntimeError) and "Unknown model" in text:
        return ModelError(f"unknown model '{name}'; see timm.list_models() or the hub repo's config.json")
    if _is_hub_error(exc):
        if _hub_offline():
            return WeightsError(_offline_message(name, what))
        return WeightsError(
            f"{what} for '{name}' could not be downloaded ({text}); check the network or "
            "pass --weights FILE (a .safetensors/.pth file) or --random-init"
        )
    return WeightsError(f"{what} for '{name}' could not be loaded ({text}); pass --weights FILE or --random-init")


def _offline_message(name: str, what: str = "pretrained weights") -> str:
    return (
        f"{what} for '{name}' are not in the local Hugging Face cache and the hub is offline; "
        "pass --weights FILE (a .safetensors/.pth file) or --random-init"
    )


def _pretrained_cached(cfg: Any) -> bool:
    """Whether the weights a timm PretrainedCfg points at are already on disk (checked without building the model)."""
    if cfg.file:
        return Path(cfg.file).exists()
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        names += ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        for fname in names:
            hit = try_to_load_from_cache(repo, fname, revision=revision or None)
            if isinstance(hit, str):
                return True
        return False
    if cfg.url:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        return (hub_dir / os.path.basename(cfg.url.split("?")[0])).exists()
    return False


def _is_hub_error(exc: BaseException) -> bool:
    import urllib.error

    kinds: tuple[type, ...] = (OSError, ConnectionError, urllib.error.URLError, TimeoutError)
    try:
        from huggingface_hub import errors as hf_errors

        kinds += tuple(
            getattr(hf_errors, n)
            for n in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError", "EntryNotFoundError")
            if hasattr(hf_errors, n)
        )
    except ImportError:
        pass
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hub_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy:
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:
        return False


# --------------------------------------------------------------------------- saving


def save_model_folder(
    model: nn.Module,
    folder: Path,
    architecture: str,
    model_args: dict,
    pretrained_cfg: dict | None = None,
) -> Path:
    """Write timm's hub layout (config.json + model.safetensors) atomically; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = dict(model_args)
    num_classes = args.pop("num_classes", None)
    if num_classes is None:
        num_classes = getattr(model, "num_classes", None)
    if pretrained_cfg is None:
        pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg = {k: v for k, v in pretrained_cfg.items()
           if k not in ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict") and v is not None}
    # record the input size the model was built for, so a reload resolves the same data config
    cfg["input_size"] = list(resolve_data_config(model, model_args)["input_size"])
    if num_classes is not None:
        cfg["num_classes"] = int(num_classes)
    config = {
        "architecture": architecture.partition(".")[0],
        "num_classes": int(num_classes) if num_classes is not None else None,
        "num_features": getattr(model, "num_features", None),
        "model_args": args,
        "pretrained_cfg": cfg,
    }
    try:
        config_text = json.dumps(config, indent=2, default=json_default)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model_args/pretrained_cfg are not JSON-serialisable ({first_line(exc)})") from exc

    state = state_dict_for_safetensors(model)
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise WeightsError(f"the model holds NaN or Inf in {', '.join(nonfinite[:4])}; nothing was written to '{folder}'")
    atomic_write(folder / "model.safetensors", lambda p: save_safetensors(p, state, metadata={"format": "pt"}))
    atomic_write(folder / "config.json", config_text + "\n")
    return folder
