"""What the token-block families EVA and BEiT share: the rewrite around their attention, and their MLPs' rules.

`quantize_blocks_` rewrites a timm model of `patch_embed`, `blocks` (each with `attn` and `mlp`) and `head`:
the patch embedding and the head at the edge bits, each block's attention by the family's own constructor,
each MLP by `quantize_block_mlp`. The MLPs beyond the plain GELU `Mlp`:
- timm `Mlp` (fc1 -> act -> [norm] -> fc2): fc1's input is signed (method.md §3). Without a norm inside the
  MLP, fc2 reads the GELU output: unsigned with a learned offset (method.md §2), so only GELU is accepted.
  With a norm inside (NormFormer's sub-LN, timm's `scale_mlp`), fc2 reads the norm's output, which is
  signed and centred: a signed quantizer, and the activation before the norm stays FP whatever it is.
- timm `GluMlp` (one packed fc1) and `SwiGLU` (fc1_g, fc1_x), optionally with the inner norm:
  `quant.QuantGLU`. The gate is the activation output (SiLU for SwiGLU): unsigned with a learned offset,
  the GELU output's rule, because SiLU's output is bounded below (-0.28) and heavy-tailed above; fc2's input
  (the product of gate and value, or the norm's output) is signed, because the value branch is signed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..quant import QuantGLU
from .base import GELU_CLASSES, QuantPolicy, class_name, is_identity, quantize_conv, quantize_linear, require, require_gelu

MLP = "timm.layers.mlp.Mlp"
GLU_MLPS = ("timm.layers.mlp.GluMlp", "timm.layers.mlp.SwiGLU")
# activations whose output is bounded below and heavy-tailed above: the unsigned-with-offset gate rule fits them
GATE_CLASSES = ("torch.nn.modules.activation.SiLU", "torch.nn.modules.activation.Sigmoid", *GELU_CLASSES)


def check_block_mlp(mlp: nn.Module, where: str) -> None:
    """Refuse an MLP the rewrite does not cover: only timm Mlp (GELU unless a norm follows it), GluMlp and SwiGLU."""
    kind = class_name(mlp)
    require(kind == MLP or kind in GLU_MLPS, f"{where}.mlp", f"MLP type {type(mlp).__name__} (only timm Mlp, GluMlp, SwiGLU)")
    linears = ("fc1_g", "fc1_x", "fc2") if hasattr(mlp, "fc1_g") else ("fc1", "fc2")
    for name in linears:
        require(type(getattr(mlp, name)) is nn.Linear, f"{where}.mlp.{name}", f"layer type {type(getattr(mlp, name)).__name__} "
                "(only nn.Linear)")
    if kind == MLP:
        if is_identity(mlp.norm):  # a norm after the activation feeds fc2 a signed input: any activation then
            require_gelu(mlp.act, f"{where}.mlp.act")
    else:
        require(class_name(mlp.act) in GATE_CLASSES, f"{where}.mlp.act",
                f"gate activation {type(mlp.act).__name__} (the gate quantizer needs SiLU, GELU or Sigmoid)")


def quantize_block_mlp(block: nn.Module, policy: QuantPolicy) -> None:
    """Rewrite `block.mlp` (after `check_block_mlp`): swap a plain Mlp's Linears, or replace a gated MLP by a QuantGLU."""
    mlp = block.mlp
    norm = None if is_identity(mlp.norm) else mlp.norm
    if class_name(mlp) == MLP:
        quantize_linear(mlp, "fc1", policy.weight(), policy.act())
        quantize_linear(mlp, "fc2", policy.weight(), policy.gelu_out() if norm is None else policy.act())
        return
    fc1 = (mlp.fc1_g, mlp.fc1_x) if hasattr(mlp, "fc1_g") else mlp.fc1
    block.mlp = QuantGLU(fc1, mlp.fc2, mlp.act, policy.weight(), policy.act(), policy.gelu_out(), norm=norm,
                         gate_last=getattr(mlp, "gate_last", False), drop=(mlp.drop1.p, mlp.drop2.p))


def quantize_blocks_(model: nn.Module, policy: QuantPolicy, attention: Callable[[nn.Module, QuantPolicy], nn.Module]) -> nn.Module:
    """Rewrite patch embedding and head (edge bits), every block's attention (`attention(stock, policy)`) and MLP."""
    quantize_conv(model.patch_embed, "proj", policy.weight(edge=True), policy.act(edge=True))
    for block in model.blocks:
        block.attn = attention(block.attn, policy)
        quantize_block_mlp(block, policy)
    if isinstance(model.head, nn.Linear):
        quantize_linear(model, "head", policy.weight(edge=True), policy.act(edge=True))
    return model
