"""The ConvNeXt family: timm `ConvNeXt` V1 (depthwise conv, LayerNorm, GELU MLP as Linear or 1x1 conv, layer scale in FP).

Input quantizers: the stem conv reads the image, conv_dw the residual stream, fc1, downsampling and head a
norm's output (all signed); fc2 reads GELU's output (unsigned with a learned offset, method.md §2). Stem and
classifier are edge layers (8-bit); segments are the blocks and each stage's downsampling layer.
"""

from __future__ import annotations

from torch import nn

from .base import GELU_CLASSES, check_mlp, class_name, is_identity, register_family, require
from .cnn import COMMON_LEAVES, CNNFamily, layers_by_rule


@register_family("timm.models.convnext.ConvNeXt")
class ConvNeXtFamily(CNNFamily):
    """timm ConvNeXt (V1: depthwise conv, LayerNorm, GELU MLP as Linear or 1x1 conv, layer scale in FP)."""

    name = "convnext"
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
        return layers_by_rule(model, lambda n: ("gelu" if n.endswith("mlp.fc2") else "signed", n.startswith("stem.") or n == "head.fc"))
