"""What every model-family adapter shares: the quantization policy and the swap helpers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelError
from ..quant import QConv2d, QLinear, QuantSpec


@dataclass(frozen=True)
class QuantPolicy:
    """Layout-level choices an adapter applies (per-module bits are recipe overrides, applied after)."""

    bits: int                  # weight and activation bits inside the transformer blocks
    split_qkv: bool = True     # module-dependent Q/K/V (method.md §4); False = one fused qkv step
    per_channel: bool = False  # per-output-channel weight steps
    edge_bits: int = 8         # patch embedding, classifier head, Swin patch merging

    def __post_init__(self) -> None:
        for name in ("bits", "edge_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise ValueError(f"{name} must be between 2 and 8, got {getattr(self, name)}")

    def weight(self, edge: bool = False) -> QuantSpec:
        """Signed weight spec for a block (or edge) layer."""
        return QuantSpec(self.edge_bits if edge else self.bits, signed=True, per_channel=self.per_channel)

    def act(self, edge: bool = False) -> QuantSpec:
        """Signed activation spec."""
        return QuantSpec(self.edge_bits if edge else self.bits, signed=True)

    def gelu_out(self) -> QuantSpec:
        """GELU output (fc2 input): unsigned with a learned offset (method.md §2)."""
        return QuantSpec(self.bits, signed=False, learned_offset=True)


def quantize_linear(parent: nn.Module, attr: str, wspec: QuantSpec, aspec: QuantSpec | None) -> None:
    """Swap `parent.attr` (an nn.Linear) for a QLinear sharing its parameters."""
    linear = getattr(parent, attr)
    if type(linear) is not nn.Linear:
        raise ModelError(f"expected nn.Linear at '{attr}', found {type(linear).__name__}")
    setattr(parent, attr, QLinear.from_float(linear, wspec, aspec))


def quantize_conv(parent: nn.Module, attr: str, wspec: QuantSpec, aspec: QuantSpec | None) -> None:
    """Swap `parent.attr` (an nn.Conv2d) for a QConv2d sharing its parameters."""
    conv = getattr(parent, attr)
    if type(conv) is not nn.Conv2d:
        raise ModelError(f"expected nn.Conv2d at '{attr}', found {type(conv).__name__}")
    setattr(parent, attr, QConv2d.from_float(conv, wspec, aspec))


def check_fully_quantized(model: nn.Module) -> None:
    """Fail loudly, naming the module, if any float Linear/Conv2d was left behind by a rewrite."""
    left = [name for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    if left:
        raise ModelError(f"these layers have no quantization rule in the adapter and would stay float: {', '.join(left[:8])}")


def check_is_identity(module: nn.Module, where: str, feature: str) -> None:
    """Refuse a model feature the quantized layout does not implement (e.g. qk_norm), naming the module."""
    if module is not None and not isinstance(module, nn.Identity):
        raise ModelError(f"{where}: {feature} ({type(module).__name__}) is not supported by the quantized layout")
