"""What the CNN families share: generic fake-quant of every Conv2d and Linear, norms in FP.

Every Conv2d (grouped and depthwise included) and Linear becomes a QConv2d/QLinear with the same LSQ
quantizers and calibration as the ViT layout: the stem's convolutions and the classifier are at the edge
bits (8), every other layer at `bits`, weights signed. Inputs follow what produces them: the image and
the residual stream or a norm's output are signed; a ReLU's output is unsigned; a GELU's output is
unsigned with a learned offset (method.md §2); each family says which layer reads which (`layer_inputs`).
BatchNorm, LayerNorm, layer scales, biases, pooling and residual adds stay in FP:
BatchNorm is NOT folded into the preceding convolution, so the quantized weight is the convolution's own
(as in LSQ for ResNets) and the state_dict keys stay those of the timm model. `check` refuses, naming the
module, any layer type outside the family's allow-list (so nothing is silently left in float or given a
wrong input sign). Segments for the fast sensitivity method: every residual block (and stage downsampling
layers where a family has them).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar

from torch import nn

from ..quant import QuantSpec
from .base import QuantPolicy, SegmentedFamily, class_name, quantize_conv, quantize_linear, require

COMMON_LEAVES = frozenset({
    "torch.nn.modules.conv.Conv2d", "torch.nn.modules.linear.Linear", "torch.nn.modules.linear.Identity",
    "torch.nn.modules.flatten.Flatten", "torch.nn.modules.dropout.Dropout", "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "timm.layers.drop.DropPath",
})


def input_spec(policy: QuantPolicy, kind: str, edge: bool) -> QuantSpec:
    """Input quantizer of a layer whose input is `kind`: "signed" (image, residual stream, norm), "relu" or "gelu" output."""
    if kind == "gelu":
        return policy.gelu_out()
    return dataclasses.replace(policy.act(edge), signed=kind == "signed")


class CNNFamily(SegmentedFamily):
    """A CNN family as stem -> segments (residual blocks) -> tail; subclasses give the allow-list and input kinds."""

    leaves: ClassVar[frozenset[str]]  # "module.QualName" of every leaf layer type the family may contain

    def check(self, model: nn.Module) -> None:
        for name, mod in model.named_modules():
            if next(mod.children(), None) is None:  # a leaf layer
                require(class_name(mod) in self.leaves, name,
                        f"layer type {type(mod).__name__} (no quantization rule for it in the {self.name} layout)")
        self.check_family(model)

    @abc.abstractmethod
    def check_family(self, model: nn.Module) -> None:
        """Family-specific refusals beyond the leaf allow-list."""

    @abc.abstractmethod
    def layer_inputs(self, model: nn.Module) -> dict[str, tuple[str, bool]]:
        """Every Conv2d/Linear name -> (kind of its input, whether it is an edge layer at `edge_bits`)."""

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        for name, (kind, edge) in self.layer_inputs(model).items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swap = quantize_linear if type(getattr(parent, attr)) is nn.Linear else quantize_conv
            swap(parent, attr, policy.weight(edge), input_spec(policy, kind, edge))
        return model


def layers_by_rule(model: nn.Module, rule: Callable[[str], tuple[str, bool]]) -> dict[str, tuple[str, bool]]:
    """`rule(name)` for every Conv2d/Linear of `model`, in module order; the first layer (the image's) is signed."""
    names = [name for name, mod in model.named_modules() if type(mod) in (nn.Conv2d, nn.Linear)]
    return {name: ("signed", rule(name)[1]) if i == 0 else rule(name) for i, name in enumerate(names)}
