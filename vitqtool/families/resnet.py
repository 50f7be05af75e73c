"""The ResNet family: timm `ResNet` (BasicBlock/Bottleneck), every Conv2d/Linear fake-quantized, BatchNorm in FP.

After the first convolution every layer input is a ReLU output (or an average of ReLU outputs): unsigned.
The stem convolutions and the classifier are edge layers (8-bit); segments are the residual blocks.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import class_name, register_family, require
from .cnn import COMMON_LEAVES, CNNFamily, layers_by_rule


@register_family("timm.models.resnet.ResNet")
class ResNetFamily(CNNFamily):
    """timm ResNet (BasicBlock/Bottleneck, plain or deep stem, avg-pool downsampling): ReLU everywhere, BatchNorm in FP."""

    name = "resnet"
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
        return layers_by_rule(model, lambda n: ("relu", n == "fc" or n.split(".")[0] == "conv1"))

    def segments(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"layer{s}.{i}", block) for s in range(1, 5) for i, block in enumerate(getattr(model, f"layer{s}"))]

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.maxpool(model.act1(model.bn1(model.conv1(images))))

    def tail(self, model: nn.Module, hidden: Tensor) -> Tensor:
        return model.forward_head(hidden)
