"""Model-family adapters: all knowledge of where a family keeps its blocks, qkv, heads and embeddings.

Importing this package registers every adapter; `get_adapter(model)` finds a model's.
"""

from __future__ import annotations

from . import cnn, swin, vit  # noqa: F401  (registration)
from .base import ADAPTERS, Adapter, QuantPolicy, get_adapter, quantize_model_, register_adapter

__all__ = ["ADAPTERS", "Adapter", "QuantPolicy", "get_adapter", "quantize_model_", "register_adapter"]
