"""Weights files and strict loading: read .safetensors / .pth / .bin safely, load every key or name the ones that differ.

`torch.load` always runs with `weights_only=True` (no pickled code), and loading is always strict: a
missing, unexpected or mis-shaped tensor is a `WeightsError` that names the keys.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import WeightsError

logger = logging.getLogger(__name__)

SAFETENSORS_EXTS = (".safetensors",)
TORCH_EXTS = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("model", "state_dict")
_MAX_KEYS_SHOWN = 5


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a .safetensors / .pth / .pt / .bin file into a flat {name: tensor} dict (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist; pass the path of a .safetensors or .pth file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTS:
        obj = _read_safetensors(path)
    elif suffix in TORCH_EXTS:
        obj = _read_torch(path)
    else:
        raise WeightsError(
            f"weights file '{path}' has an unsupported extension '{suffix or '(none)'}'; "
            "use a .safetensors, .pth, .pt or .bin file"
        )
    return _as_state_dict(obj, path)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ValueError depending on the damage
        raise WeightsError(
            f"weights file '{path}' is not a readable safetensors file ({first_line(exc)}); "
            "re-download or re-export it"
        ) from exc


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"weights file '{path}' holds Python objects other than tensors and was refused "
            "(loaded with weights_only=True); re-save it as a plain state_dict or convert it to .safetensors"
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise WeightsError(
            f"weights file '{path}' is not a readable PyTorch checkpoint ({first_line(exc)}); "
            "re-download it or convert it to .safetensors"
        ) from exc


def _as_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """Unwrap {"model": sd} / {"state_dict": sd} and a uniform DDP "module." prefix; check values are tensors."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                logger.info("using the '%s' entry of checkpoint %s", key, path)
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"weights file '{path}' does not contain a state_dict (a mapping of names to tensors); "
            "save model.state_dict() instead"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(
            f"weights file '{path}' has non-tensor entries ({key_list(bad)}); "
            "save model.state_dict() (or a {'model': state_dict} wrapper) instead"
        )
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        logger.info("stripping the 'module.' prefix (DistributedDataParallel) from %s", path)
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_strict(model: nn.Module, state_dict: Mapping[str, Tensor], what: str) -> None:
    """Load `state_dict` into `model` strictly; any missing/unexpected key or shape mismatch is a WeightsError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems: list[str] = []
    if missing:
        problems.append(f"missing keys {key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {key_list(unexpected)}")
    if mismatched:
        shown = ", ".join(
            f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in mismatched[:_MAX_KEYS_SHOWN]
        )
        more = f" (+{len(mismatched) - _MAX_KEYS_SHOWN} more)" if len(mismatched) > _MAX_KEYS_SHOWN else ""
        problems.append(f"shape mismatch {shown}{more}")
    nonfinite = [k for k, v in state_dict.items() if k in expected and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        problems.append(f"non-finite values (NaN or Inf) in {key_list(nonfinite)}")
    if problems:
        if nonfinite and not (missing or unexpected or mismatched):
            raise WeightsError(f"{what} is damaged: " + "; ".join(problems))
        hint = _mismatch_hint(model, state_dict, mismatched)
        raise WeightsError(f"{what} does not match the model: " + "; ".join(problems) + f"; {hint}")
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise WeightsError(f"{what} could not be loaded into the model ({first_line(exc)})") from exc


def _mismatch_hint(model: nn.Module, state_dict: Mapping[str, Tensor], mismatched: list[str]) -> str:
    num_classes = getattr(model, "num_classes", None)
    expected = model.state_dict()
    for key in mismatched:
        file_shape, model_shape = tuple(state_dict[key].shape), tuple(expected[key].shape)
        if (
            num_classes is not None
            and len(file_shape) == len(model_shape)
            and model_shape[0] == num_classes
            and file_shape[0] != num_classes
            and file_shape[1:] == model_shape[1:]
        ):
            return f"the file has {file_shape[0]} classes and the model {num_classes}: pass --num-classes {file_shape[0]}"
    return "check that the weights belong to this architecture and its --model-args (img_size, patch_size, ...)"


def key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more, {len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return f"[{shown}]{more}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
