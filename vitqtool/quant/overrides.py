"""Per-module bit widths by glob pattern over module names (recipe `[quant.overrides]`)."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from .base import Quantizer
from .modules import QUANT_LAYERS


def _replace_bits(parent: nn.Module, attr: str, bits: int) -> None:
    old: Quantizer = getattr(parent, attr)
    if old.spec.bits != bits:
        setattr(parent, attr, old.with_bits(bits))


def apply_bit_overrides(model: nn.Module, overrides: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """Set bits of the modules whose names match each pattern; returns pattern -> matched names.

    `overrides` maps a glob over module names to `{"weight_bits": b, "act_bits": b}` (either key).
    A quantized Linear/Conv takes both (`act_bits` for its input quantizer); a standalone activation
    quantizer (Q/K/V, softmax) takes `act_bits`. Raises ValueError for a pattern that matches nothing.
    """
    matched: dict[str, list[str]] = {}
    named = dict(model.named_modules())
    for pattern, bits in overrides.items():
        hits = []
        for name, mod in named.items():
            if not fnmatchcase(name, pattern):
                continue
            if isinstance(mod, QUANT_LAYERS):
                if "weight_bits" in bits:
                    _replace_bits(mod, "w_quant", bits["weight_bits"])
                if "act_bits" in bits and mod.a_quant is not None:
                    _replace_bits(mod, "a_quant", bits["act_bits"])
                hits.append(name)
            elif isinstance(mod, Quantizer) and mod.kind == "act" and "act_bits" in bits:
                parent_name, _, attr = name.rpartition(".")
                _replace_bits(named[parent_name] if parent_name else model, attr, bits["act_bits"])
                hits.append(name)
        if not hits:
            raise ValueError(f"override pattern {pattern!r} matches no quantized module")
        matched[pattern] = hits
    return matched
