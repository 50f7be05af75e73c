"""Model-family adapters: all knowledge of where a family keeps its blocks, qkv, heads and embeddings."""

from __future__ import annotations

from types import ModuleType

from torch import nn

from ..errors import ModelError
from . import swin, vit
from .base import QuantPolicy

ADAPTERS: dict[str, ModuleType] = {"vit": vit, "swin": swin}


def get_adapter(model: nn.Module) -> ModuleType:
    """The adapter module for `model`; ModelError listing the supported families otherwise."""
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    supported = ", ".join(p for a in ADAPTERS.values() for p in a.PATTERNS)
    raise ModelError(f"model class {type(model).__name__} is not a supported family (supported timm architectures: {supported})")


def quantize_model_(model: nn.Module, policy: QuantPolicy) -> nn.Module:
    """Rewrite `model` in place into its family's quantized layout."""
    return get_adapter(model).quantize_(model, policy)


__all__ = ["ADAPTERS", "QuantPolicy", "get_adapter", "quantize_model_"]
