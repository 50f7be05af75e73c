"""Gather variation statistics from a quantized model: weights directly, activations with hooks on its quantizers.

An activation quantizer's input IS the activation that gets quantized, so hooking the quantizers is
model-agnostic. The grouping of each activation follows its role: channels last (dim -1) and tokens
(dims 1..-2) for [B, N, C] and [B, H, W, C] tensors; channels (dim 1) and spatial positions for a conv input; heads
(`QuantAttention.num_heads`) for the Q/K/V and attn@V tensors and the softmax output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..quant import QUANT_LAYERS, QConv2d, QLinear, QuantAttention, Quantizer, iter_quantizers
from .stats import (
    Grouper,
    RunningStats,
    boundary_share,
    channel_groups,
    fake_quant,
    head_groups,
    one_cpu_thread,
    row_chunks,
    spatial_groups,
    token_groups,
)

HEAD_SPLIT = ("q_quant", "k_quant", "v_quant", "qkv_quant", "proj.a_quant")  # [.., heads * head_dim] tensors


def block_of(name: str, blocks: list[str]) -> str | None:
    """The block (segment) name that contains module `name`, or None for edge modules."""
    return next((b for b in blocks if name.startswith(b + ".")), None)


def module_type(name: str, block: str | None) -> str:
    """Module type from its name: the last component inside a block (`v`, `fc2.a_quant`), the full name outside.

    A numbered component (a Sequential's index) keeps the name before it: `downsample.0`, `downsample.1.a_quant`.
    """
    if block is None:
        return name
    components = name.split(".")
    parts = components[block.count(".") + 1:]
    size = 2 if parts[-1] == "a_quant" and len(parts) > 1 else 1
    if components[-size].isdigit():
        size += 1
    return ".".join(components[-size:])


def _attention_role(name: str, named: dict[str, nn.Module]) -> tuple[QuantAttention, str] | None:
    """(enclosing QuantAttention, name relative to it) for quantizers that live inside one."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):  # "" is the root module
        parent = named.get(".".join(parts[:cut]))
        if isinstance(parent, QuantAttention):
            return parent, ".".join(parts[cut:])
    return None


def _groupers(x: Tensor, is_conv_input: bool, attention: tuple[QuantAttention, str] | None) -> dict[str, Grouper]:
    if is_conv_input and x.dim() == 4:
        return {"per_channel": channel_groups(1), "per_token": spatial_groups()}
    if attention is not None and attention[1] == "softmax_quant" and x.dim() == 4:
        return {"per_head": channel_groups(1), "per_token": channel_groups(2)}
    groups: dict[str, Grouper] = {"per_channel": channel_groups(-1)}
    if x.dim() >= 3:
        groups["per_token"] = token_groups()
    if attention is not None and attention[1] in HEAD_SPLIT and x.shape[-1] % attention[0].head_dim == 0:
        groups["per_head"] = head_groups(attention[0].head_dim)
    return groups


class ActivationRecorder:
    """Forward-pre hooks on every activation quantizer; `first_pass()` then `second_pass()` over the same data."""

    def __init__(self, model: nn.Module) -> None:
        named = dict(model.named_modules())
        self.quantizers: dict[str, Quantizer] = {n: q for n, q in iter_quantizers(model) if q.kind == "act"}
        self._conv_inputs = {f"{n}.a_quant" for n, m in named.items() if isinstance(m, QConv2d)}
        self._attention = {n: _attention_role(n, named) for n in self.quantizers}
        self.stats: dict[str, RunningStats] = {}
        self.shapes: dict[str, list[int]] = {}

    @contextlib.contextmanager
    def _hooks(self, tails: bool) -> Iterator[None]:
        handles = []
        for name, q in self.quantizers.items():
            def hook(mod: Quantizer, args: tuple, name: str = name) -> None:
                x = args[0].detach()
                if tails:
                    self.stats[name].update_tails(x)
                    return
                if name not in self.stats:
                    self.stats[name] = RunningStats(_groupers(x, name in self._conv_inputs, self._attention[name]))
                    self.shapes[name] = list(x.shape[1:])
                with one_cpu_thread():  # quantized chunk by chunk: the copies stay in cache
                    for part in row_chunks(x):
                        self.stats[name].update(part, fake_quant(mod, part))
            handles.append(q.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def first_pass(self) -> contextlib.AbstractContextManager:
        """Hooks for the first pass: moments, extremes, group stats, quantization error."""
        return self._hooks(tails=False)

    def second_pass(self) -> contextlib.AbstractContextManager:
        """Hooks for the second pass: outliers and histograms (needs the first pass's mean/std/range)."""
        return self._hooks(tails=True)

    def rows(self, blocks: list[str]) -> list[dict[str, Any]]:
        """One row per activation quantizer that saw data."""
        out = []
        for name, st in self.stats.items():
            q, block = self.quantizers[name], block_of(name, blocks)
            out.append({"name": name, "type": module_type(name, block), "block": block, "shape": self.shapes[name],
                        "bits": q.spec.bits, "signed": q.spec.signed, "step": float(q.scale_for(torch.zeros(1)).detach().flatten()[0]),
                        **st.result()})
        return out


@torch.no_grad()
def weight_rows(model: nn.Module, blocks: list[str], advance: Callable[..., None] | None = None) -> list[dict[str, Any]]:
    """Statistics of every quantized Linear/Conv weight, per tensor and per output channel, at its initialised step."""
    out = []
    with one_cpu_thread():
        for name, mod in model.named_modules():
            if isinstance(mod, QUANT_LAYERS):
                out.append(_weight_row(name, mod, blocks))
                if advance is not None:
                    advance()
    return out


def _weight_row(name: str, mod: QLinear | QConv2d, blocks: list[str]) -> dict[str, Any]:
    """One quantized layer's row of `weight_rows`."""
    w = mod.weight.detach()
    st = RunningStats({"per_channel": channel_groups(1)})  # one update of w[None]: output channels are dim 1
    st.update(w[None], fake_quant(mod.w_quant, w)[None])
    st.update_tails(w)
    block = block_of(name, blocks)
    return {"name": name, "type": module_type(name, block), "block": block, "shape": list(w.shape), "params": w.numel(),
            "bits": mod.w_quant.spec.bits, **st.result(), "boundary_share": boundary_share(mod.w_quant, w)}
