"""Adapters for timm CNNs (`ResNet`, `ConvNeXt`): generic fake-quant of every Conv2d and Linear, norms in FP.

Every Conv2d (grouped and depthwise included) and Linear becomes a QConv2d/QLinear with the same LSQ
quantizers and calibration as the ViT layout: the stem's convolutions and the classifier are at the edge
bits (8), every other layer at `bits`, weights signed. Inputs follow what produces them: the image and
the residual stream or a norm's output are signed; a ReLU's output (every ResNet layer input after the
first conv) is unsigned; a GELU's output (ConvNeXt fc2) is unsigned with a learned offset (method.md §2).
BatchNorm, LayerNorm, ConvNeXt's layer scale (`gamma`), biases, pooling and residual adds stay in FP:
BatchNorm is NOT folded into the preceding convolution, so the quantized weight is the convolution's own
(as in LSQ for ResNets) and the state_dict keys stay those of the timm model. `check` refuses, naming the
module, any layer type outside the family's allow-list (so nothing is silently left in float or given a
wrong input sign). Segments for the fast sensitivity method: every residual block (and ConvNeXt's
stage downsampling layers).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar

from torch import Tensor, nn

from ..quant import QuantSpec
from .base import GELU_CLASSES, QuantPolicy, SegmentedAdapter, check_mlp, class_name, is_identity, quantize_conv, quantize_linear, register_adapter, require

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


class CNNAdapter(SegmentedAdapter):
    """A CNN family as stem -> segments (residual blocks) -> tail; subclasses give the allow-list and input kinds."""

    leaves: ClassVar[frozenset[str]]  # "module.QualName" of every leaf layer type the family may contain

    def check(self, model: nn.Module) -> None:
        for name, mod in model.named_modules():
            if next(mod.children(), None) is None:  # a leaf layer
                require(class_name(mod) in self.leaves, name,
                        f"layer type {type(mod).__name__} (no quantization rule for it in the {self.family} layout)")
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


def _layers(model: nn.Module, rule: Callable[[str], tuple[str, bool]]) -> dict[str, tuple[str, bool]]:
    """`rule(name)` for every Conv2d/Linear of `model`, in module order; the first layer (the image's) is signed."""
    names = [name for name, mod in model.named_modules() if type(mod) in (nn.Conv2d, nn.Linear)]
    return {name: ("signed", rule(name)[1]) if i == 0 else rule(name) for i, name in enumerate(names)}


@register_adapter("timm.models.resnet.ResNet")
class ResNetAdapter(CNNAdapter):
    """timm ResNet (BasicBlock/Bottleneck, plain or deep stem, avg-pool downsampling): ReLU everywhere, BatchNorm in FP."""

    family = "resnet"
    patterns = ("resnet*", "resnext*", "wide_resnet*")
    leaves = COMMON_LEAVES | {
        "torch.nn.modules.batchnorm.BatchNorm2d", "torch.nn.modules.activation.ReLU", "torch.nn.modules.pooling.MaxPool2d",
        "torch.nn.modules.pooling.AvgPool2d",
    }

    def check_family(self, model: nn.Module) -> None:
        for name, block in self.segments(model):
            require(class_name(block) in ("timm.models.resnet.BasicBlock", "timm.models.resnet.Bottleneck"), name,
                    f"block type {type(block).__name__} (only timm BasicBlock/Bottleneck)")

    def layer_inputs(self, model: nn.Module) -> dict[str, tuple[str, bool]]:
        # after the first conv every layer input is a ReLU output (or an average of ReLU outputs); stem convs and fc are edge
        return _layers(model, lambda n: ("relu", n == "fc" or n.split(".")[0] == "conv1"))

    def segments(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"layer{s}.{i}", block) for s in range(1, 5) for i, block in enumerate(getattr(model, f"layer{s}"))]

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.maxpool(model.act1(model.bn1(model.conv1(images))))

    def tail(self, model: nn.Module, hidden: Tensor) -> Tensor:
        return model.forward_head(hidden)


@register_adapter("timm.models.convnext.ConvNeXt")
class ConvNeXtAdapter(CNNAdapter):
    """timm ConvNeXt (V1: depthwise conv, LayerNorm, GELU MLP as Linear or 1x1 conv, layer scale in FP)."""

    family = "convnext"
    patterns = ("convnext_*",)
    leaves = COMMON_LEAVES | {"timm.layers.norm.LayerNorm", "timm.layers.norm.LayerNorm2d", "timm.layers.activations.GELU",
                              "torch.nn.modules.activation.GELU"}

    def check_family(self, model: nn.Module) -> None:
        require(not any(class_name(m) in GELU_CLASSES for m in model.stem.modules()), "stem",
                "an activation inside the stem (stem_type='overlap_act')")
        require(is_identity(getattr(model.head, "pre_logits", None)), "head.pre_logits", "a hidden head layer (head_hidden_size)")
        for name, block in self.segments(model):
            if name.endswith(".downsample"):
                continue
            require(class_name(block) == "timm.models.convnext.ConvNeXtBlock", name,
                    f"block type {type(block).__name__} (only timm ConvNeXtBlock)")
            check_mlp(block.mlp, name)
            require(is_identity(block.shortcut), f"{name}.shortcut", f"a projection shortcut ({type(block.shortcut).__name__})")

    def layer_inputs(self, model: nn.Module) -> dict[str, tuple[str, bool]]:
        # stem conv: the image; conv_dw: the residual stream; fc1, downsampling and head: a norm's output; fc2: GELU's
        return _layers(model, lambda n: ("gelu" if n.endswith("mlp.fc2") else "signed", n.startswith("stem.") or n == "head.fc"))
