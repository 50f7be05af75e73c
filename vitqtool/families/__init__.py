"""Model families, one plugin module each: all knowledge of a family's layout, transformers classes and stock names.

Importing this package registers every family (`base.register_family`); shared code asks `get_family(model)`
or `hf_map.timm_spec(config)` and names no family. A new family is one module here plus its import below.
"""

from __future__ import annotations

from . import (  # noqa: F401  (registration)
    beit,
    cait,
    convnext,
    eva,
    resnet,
    sret,  # noqa: F401  (registration; sret_model registers SReT with timm)
    swin,
    swinv2,
    vit,
    vit_relpos,
)
from .base import FAMILIES, Family, NormPair, QuantPolicy, get_family, quantize_model_, register_family

__all__ = ["FAMILIES", "Family", "NormPair", "QuantPolicy", "get_family", "quantize_model_", "register_family"]
