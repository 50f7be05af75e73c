"""Trace a quantized module tree into ONNX with every enabled quantizer as a marker node (`onnx_graph` lowers them).

`torch.onnx.export(dynamo=False)` (the TorchScript exporter) records the model's own forward, so every
family that runs in torch exports the same way: no per-family graph code. While tracing, each enabled
quantizer's forward is replaced by an autograd Function whose `symbolic` writes one node of the private
`vitqtool` domain carrying the quantizer's name: `vitqtool::Act(x)` for an activation quantizer,
`vitqtool::Weight(w)` for a weight quantizer (its input is the float weight initializer, which the
lowering replaces with integer codes). The forward still returns the fake-quantized tensor, so the
trace sees vitqtool's values and shapes. `QuantTables` records each quantizer's step, offset, bits and
the weight codes, read from the module before tracing.

Why the TorchScript exporter: a Function's `symbolic` emits graph nodes directly (no onnxscript
dependency, no custom-op registry), and the graph keeps the module's structure (a Linear is a MatMul
of its input and its weight), which is what onnxruntime's QDQ fusion matches. It is deprecated in
torch but present in the pinned 2.14.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.weights import first_line
from ..errors import ExportFormatError
from ..quant import QUANT_LAYERS, Quantizer, iter_quantizers

DOMAIN = "vitqtool"
TRACE_OPSET = 20  # the TorchScript exporter's newest
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ActInfo:
    """An enabled activation quantizer: per-tensor step, optional learned offset, code range."""

    bits: int
    signed: bool
    scale: float
    offset: float | None

    @property
    def qn(self) -> int:
        """Lowest code."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qp(self) -> int:
        """Highest code."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1


@dataclass(frozen=True)
class WeightInfo:
    """An enabled weight quantizer: signed codes `[out, ...]` (int8) and one step per tensor or per output channel."""

    layer: str
    layer_type: str
    bits: int
    codes: np.ndarray
    scale: np.ndarray  # shape [1] or [out]

    @property
    def per_channel(self) -> bool:
        """One step per output channel."""
        return self.scale.size > 1


@dataclass
class QuantTables:
    """What the markers name: activation quantizers and weight quantizers by module name."""

    acts: dict[str, ActInfo] = field(default_factory=dict)
    weights: dict[str, WeightInfo] = field(default_factory=dict)


def quant_tables(model: nn.Module) -> QuantTables:
    """Steps, offsets and weight codes of every enabled quantizer of `model` (per-tensor activations only)."""
    tables = QuantTables()
    for name, mod in model.named_modules():
        if isinstance(mod, QUANT_LAYERS) and mod.w_quant.enabled:
            q = mod.w_quant
            codes = q.codes(mod.weight).cpu().numpy().astype(np.int8)
            scale = q.scale_values().float().cpu().numpy().astype(np.float32)
            tables.weights[f"{name}.w_quant"] = WeightInfo(name, type(mod).__name__, q.spec.bits, codes, scale)
    for name, q in iter_quantizers(model):
        if not q.enabled or q.kind != "act":
            continue
        scale = q.scale_values()
        if scale.numel() != 1:
            raise ExportFormatError(f"'{name}': per-channel activation steps are not supported by the ONNX export")
        tables.acts[name] = ActInfo(q.spec.bits, q.spec.signed, float(scale.reshape(-1)[0]), q.offset_value())
    return tables


class _ActMarker(torch.autograd.Function):
    """Fake quantization in the forward; `vitqtool::Act(x)` in the traced graph."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, name: str, info: ActInfo) -> Tensor:
        offset = info.offset or 0.0
        return ((x - offset) / info.scale).clamp(info.qn, info.qp).round() * info.scale + offset

    @staticmethod
    def symbolic(g: Any, x: Any, name: str, info: ActInfo) -> Any:
        out = g.op(f"{DOMAIN}::Act", x, name_s=name)
        out.setType(x.type())
        return out


class _WeightMarker(torch.autograd.Function):
    """The dequantized weight in the forward; `vitqtool::Weight(w)` in the traced graph."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, name: str, dequantized: Tensor) -> Tensor:
        return dequantized

    @staticmethod
    def symbolic(g: Any, w: Any, name: str, dequantized: Any) -> Any:
        out = g.op(f"{DOMAIN}::Weight", w, name_s=name)
        out.setType(w.type())
        return out


def _act_marker(x: Tensor, *, name: str, info: ActInfo) -> Tensor:
    """An activation quantizer's forward while tracing."""
    return _ActMarker.apply(x, name, info)


def _weight_marker(w: Tensor, *, name: str, dequantized: Tensor) -> Tensor:
    """A weight quantizer's forward while tracing."""
    return _WeightMarker.apply(w, name, dequantized.to(w.dtype))


@contextlib.contextmanager
def _markers(model: nn.Module, tables: QuantTables) -> Iterator[None]:
    """Replace the forward of every enabled quantizer by its marker Function (restored on exit)."""
    patched: list[Quantizer] = []
    try:
        for name, q in iter_quantizers(model):
            if name in tables.acts:
                q.forward = functools.partial(_act_marker, name=name, info=tables.acts[name])
            elif name in tables.weights:
                w = tables.weights[name]
                shape = (-1,) + (1,) * (w.codes.ndim - 1)
                deq = torch.from_numpy(w.codes.astype(np.float32) * w.scale.reshape(shape))
                q.forward = functools.partial(_weight_marker, name=name, dequantized=deq)
            else:
                continue
            patched.append(q)
        yield
    finally:
        for q in patched:
            del q.forward


def trace_model(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[Any, QuantTables]:
    """The marker ONNX graph of `model` (eval, CPU) for a `[batch, *input_size]` input, and its quantizer tables."""
    import onnx

    tables = quant_tables(model)
    buf = io.BytesIO()
    example = torch.zeros(2, *input_size)
    with _markers(model, tables), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=TRACE_OPSET, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              custom_opsets={DOMAIN: 1} if tables.acts or tables.weights else None, do_constant_folding=True)
        except Exception as exc:  # torch.onnx raises many types; name the first line
            raise ExportFormatError(f"torch.onnx cannot trace {type(model).__name__} ({first_line(exc)})") from None
    return onnx.load_from_string(buf.getvalue()), tables
