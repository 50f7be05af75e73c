"""Files of a transformers `save_pretrained` folder or cached `hf-hub:ORG/NAME` repo: config, weights, arguments.

Needs neither transformers nor network. `models.resolve_model` builds the timm equivalent from what
this module reads: config.json through `families.hf_map.timm_spec`, the weights (model.safetensors,
pytorch_model.bin or their sharded index) through `hf_map.to_timm_state` and strict loading,
preprocessor_config.json through `hf_map.data_config_from_preprocessor`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import ModelError, WeightsError
from ..families.hf_map import TRAINING_ARGS, is_transformers_config
from .weights import load_state_dict_file

log = logging.getLogger(__name__)

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; ModelError naming the file otherwise."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"'{path}' is not valid JSON ({str(exc).splitlines()[0][:200]}); fix or re-download it") from None
    if not isinstance(value, dict):
        raise ModelError(f"'{path}' must hold a JSON object")
    return value


def merge_args(converted: dict[str, Any], extra: dict[str, Any], where: str) -> dict[str, Any]:
    """The converted model_args plus user overrides, which may only change training-time knobs."""
    args = dict(converted)
    for key, value in extra.items():
        if key in TRAINING_ARGS:
            args[key] = value
        elif _same(converted.get(key, _MISSING), value):
            continue
        else:
            raise ModelError(f"--model-args/--num-classes cannot change '{key}' of a transformers checkpoint "
                             f"({where} gives {converted.get(key, '(unset)')!r}); only {', '.join(TRAINING_ARGS)} may be set")
    return args


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    """Equal model args, a tuple and a list with the same items counting as equal (JSON round trips)."""
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


def read_weights(folder: Path, weights: str | Path | None = None) -> tuple[dict[str, Tensor], str]:
    """The transformers state dict of a folder (or an explicit file) and a description for errors."""
    if weights is not None:
        return load_state_dict_file(weights), f"weights file '{weights}'"
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                return _read_sharded(path), f"sharded weights '{path}'"
            return load_state_dict_file(path), f"weights file '{path}'"
    raise WeightsError(f"model folder '{folder}' has no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                       "add them, pass --weights FILE, or --random-init")


def _read_sharded(index_path: Path) -> dict[str, Tensor]:
    """Merge the shards an `*.index.json` weight_map names; each key must be in the shard it names."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"'{index_path}' has no weight_map; re-download the checkpoint")
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = load_state_dict_file(index_path.parent / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(part) != listed:
            odd = sorted(set(part) ^ listed)
            raise WeightsError(f"shard '{shard}' does not hold what '{index_path.name}' lists (differ: {', '.join(odd[:5])})")
        state.update(part)
    return state


def hub_folder(repo_spec: str, offline: bool) -> Path | None:
    """The local snapshot folder of `ORG/NAME[@revision]` when its config.json is a transformers config, else None.

    Offline, only the local Hugging Face cache is read; online, missing files are downloaded.
    None means "not a transformers repo (or not reachable)": the caller falls back to timm's hub path.
    """
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = repo_spec.partition("@")
    rev = revision or None
    cached = try_to_load_from_cache(repo, CONFIG, revision=rev)
    if isinstance(cached, str):
        config_path = Path(cached)
    elif offline:
        return None
    else:
        try:
            config_path = Path(hf_hub_download(repo, CONFIG, revision=rev))
        except Exception as exc:  # not found / no network: timm's path reports it
            log.info("no %s for %s (%s)", CONFIG, repo_spec, exc)
            return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    if not is_transformers_config(config):
        return None
    folder = config_path.parent
    if not offline:
        _download_rest(repo, rev, folder)
    return folder


def _download_rest(repo: str, revision: str | None, folder: Path) -> None:
    """Fetch the preprocessor config and the first weights layout the repo has (shards included)."""
    from huggingface_hub import hf_hub_download

    for name in (PREPROCESSOR, *WEIGHT_FILES):
        if (folder / name).is_file():
            if name != PREPROCESSOR:
                break
            continue
        try:
            path = Path(hf_hub_download(repo, name, revision=revision))
        except Exception:  # absent in this repo: try the next layout
            continue
        if name.endswith(".index.json"):
            for shard in sorted(set((read_json(path).get("weight_map") or {}).values())):
                hf_hub_download(repo, shard, revision=revision)
        if name != PREPROCESSOR:
            break
