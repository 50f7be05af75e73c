"""The SReT family (`sret_model.SReT`, the paper's SReT-T): method.md §3 placement, adapted to recursion and sliced attention.

Quantized layout:
- every application of a weight-shared block runs the same quantized modules: the block's `q`/`k`/`v`/`proj`,
  fc1/fc2 weights have ONE quantizer each (one weight, one set of integer codes), and its activation
  quantizers (LayerNorm output, Q, K, V, softmax output, attn@V, fc1 input, GELU output) are shared by its
  applications too, as in the paper's reference code whose SReT-T row vitqtool reproduces: one integer
  program per shared block, whose steps calibrate on the mean statistic over all its applications;
- sliced group attention quantizes exactly as attention over one group (groups are folded into the batch;
  every quantizer is per tensor or per weight channel, so slicing and shuffling commute with quantization);
- the non-linear projection layers: fc1 input signed, fc2 input (GELU output) unsigned with a learned offset;
- at the edge bits (8): the stem's three convolutions (the image signed, ReLU outputs unsigned), each pooling
  convolution (its input is the residual stream: signed), the classifier (weights and input);
- FP: BatchNorm (not folded, as the CNN families), LayerNorm, position table, the learnable residual
  coefficients, residual adds, pooling, biases.
Segments for the fast sensitivity method: each stage's pooling, then each recursive block (all its applications
and their projection layers, so a shared quantizer is inside one segment).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..quant import QuantAttention
from .base import (
    QuantPolicy,
    SegmentedFamily,
    check_mlp,
    class_name,
    is_identity,
    quantize_conv,
    quantize_linear,
    quantize_mlp,
    register_family,
    require,
)
from .cnn import input_spec
from .sret_model import SReTBlock, SReTPooling, SReTProjection, SReTStem, convert_reference_state_dict


@register_family("vitqtool.families.sret_model.SReT")
class SReTFamily(SegmentedFamily):
    """SReT: conv stem, recursive blocks with sliced group attention and projection layers, pooling convolutions."""

    name = "sret"
    patterns = ("sret_*",)
    # the stem's convs feed quantizers; as QLinearConv their folded BatchNorm bias is rounded to the int32 grid,
    # which moved 0.5% of the first block's codes by a step and cost a trained test model 2.7 points of top-1
    # agreement (97.3%); ConvInteger with the bias in float agrees
    onnx_requantized_convs = False

    def check(self, model: nn.Module) -> None:
        require(type(model.stem) is SReTStem, "stem", f"stem type {type(model.stem).__name__}")
        for si, stage in enumerate(model.stages):
            require(is_identity(stage.downsample) or type(stage.downsample) is SReTPooling, f"stages.{si}.downsample",
                    f"downsampling {type(stage.downsample).__name__}")
            for bi, block in enumerate(stage.blocks):
                where = f"stages.{si}.blocks.{bi}"
                require(type(block) is SReTBlock, where, f"block type {type(block).__name__} (only SReTBlock)")
                attn = block.attn
                require(class_name(attn) == "timm.layers.attention.Attention", f"{where}.attn",
                        f"attention type {type(attn).__name__} (only timm Attention)")
                require(is_identity(attn.q_norm) and is_identity(attn.k_norm) and is_identity(attn.norm)
                        and getattr(attn, "gate", None) is None, f"{where}.attn", "qk_norm, scale_norm or gated attention")
                check_mlp(block.mlp, where)
                for pi, proj in enumerate(block.projs):
                    require(type(proj) is SReTProjection, f"{where}.projs.{pi}", f"projection type {type(proj).__name__}")
                    check_mlp(proj.mlp, f"{where}.projs.{pi}")

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        for i, attr in enumerate(("conv1", "conv2", "conv3")):
            quantize_conv(model.stem, attr, policy.weight(edge=True), input_spec(policy, "relu" if i else "signed", edge=True))
        for stage in model.stages:
            if not is_identity(stage.downsample):
                quantize_conv(stage.downsample, "conv", policy.weight(edge=True), policy.act(edge=True))
            for block in stage.blocks:
                block.attn = QuantAttention(**policy.attention_args(block.attn))
                for mlp in [block.mlp, *(proj.mlp for proj in block.projs)]:
                    quantize_mlp(mlp, policy)
        if isinstance(model.head, nn.Linear):
            quantize_linear(model, "head", policy.weight(edge=True), policy.act(edge=True))
        return model

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.forward_stem(images)

    def tail(self, model: nn.Module, hidden: Tensor) -> Tensor:
        return model.forward_head(hidden)

    def convert_checkpoint(self, model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint of the released SReT code (or Quantization-Variation's FP SReT) under our names."""
        return convert_reference_state_dict(state_dict, model)
