"""The export format's names: which model state becomes which file tensor, and the per-module table.

Shared by the writer and the reader so both sides map a quantized model's state dict the same way:
a quantized Linear/Conv `L` stores `L.weight_packed`/`L.weight_scale`/`L.weight_shape` (+ `L.bias`,
`L.input_scale`, `L.input_offset`); a standalone activation quantizer `Q` stores `Q.scale` (+
`Q.offset`); every other state tensor is stored under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.artifacts import ExportHeader
from ..errors import ExportFormatError
from ..quant import QUANT_LAYERS, Quantizer, iter_quantizers

FORMAT_VERSION = ExportHeader.VERSION
QUANT_METHOD = "vitqtool"
PACK_FORMAT = "pack-quantized"
META_QCONFIG = "quantization_config"
META_VITQ = "vitqtool"
FP_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Entry:
    """One model state tensor and where it lives in the file; `kind`: weight, scale, offset, flag or fp."""

    state_key: str
    file_key: str
    kind: str


def state_map(model: nn.Module) -> list[Entry]:
    """Map every state_dict key of a quantized model to its file tensor (a `weight` also owns `_scale`/`_shape`)."""
    owners: dict[str, tuple[str, str]] = {}  # state key -> (file key, kind)
    layers = {name for name, mod in model.named_modules() if isinstance(mod, QUANT_LAYERS)}
    for name, q in iter_standalone_quantizers(model, layers):
        _quantizer_keys(owners, name, name, "scale", "offset", q)
    for name in layers:
        mod = model.get_submodule(name)
        owners[f"{name}.weight"] = (f"{name}.weight_packed", "weight")
        _quantizer_keys(owners, f"{name}.w_quant", name, "weight_scale", None, mod.w_quant)
        if mod.a_quant is not None:
            _quantizer_keys(owners, f"{name}.a_quant", name, "input_scale", "input_offset", mod.a_quant)
    return [Entry(key, *owners.get(key, (key, "fp"))) for key in model.state_dict()]


def _quantizer_keys(owners: dict, prefix: str, file_prefix: str, scale: str, offset: str | None, q: Quantizer) -> None:
    names = {"scale": f"{file_prefix}.{scale}", "offset": f"{file_prefix}.{offset}", "flag": ""}
    for key, role in q.state_roles().items():
        owners[f"{prefix}.{key}"] = (names[role], role)


def iter_standalone_quantizers(model: nn.Module, layers: set[str] | None = None):
    """Yield `(name, quantizer)` for activation quantizers that are not a Linear/Conv's own `w_quant`/`a_quant`."""
    if layers is None:
        layers = {name for name, mod in model.named_modules() if isinstance(mod, QUANT_LAYERS)}
    for name, mod in model.named_modules():
        if isinstance(mod, Quantizer) and name.rpartition(".")[0] not in layers:
            yield name, mod


def module_table(model: nn.Module) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per-module quantization layout: (quantized Linear/Conv layers, standalone activation quantizers)."""
    layers: dict[str, dict] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QUANT_LAYERS):
            a = mod.a_quant
            layers[name] = {
                "type": type(mod).__name__, "weight_shape": list(mod.weight.shape),
                "weight_bits": mod.w_quant.spec.bits, "per_channel": mod.w_quant.spec.per_channel,
                "act_bits": a.spec.bits if a is not None else None,
                "act_signed": a.spec.signed if a is not None else None,
                "act_offset": a.spec.learned_offset if a is not None else None,
            }
    acts = {name: {"role": name.rpartition(".")[2].removesuffix("_quant"), "bits": q.spec.bits,
                   "signed": q.spec.signed, "offset": q.spec.learned_offset}
            for name, q in iter_standalone_quantizers(model, set(layers))}
    return layers, acts


def require_calibrated(model: nn.Module, enabled_only: bool = False) -> None:
    """Refuse (ExportFormatError) a model without quantized layers or with a quantizer never calibrated.

    `enabled_only` skips disabled quantizers (the ONNX export writes those as FP).
    """
    if not any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
        raise ExportFormatError("the model has no quantized layers; prepare and calibrate it first (vitqtool.prepare, vitqtool.calibrate)")
    uninit = [name for name, q in iter_quantizers(model) if (q.enabled or not enabled_only) and not q.is_initialized]
    if uninit:
        raise ExportFormatError(f"quantizers were never calibrated ({', '.join(uninit[:3])}, {len(uninit)} in all); "
                                "run vitqtool.calibrate(model, batches) before exporting")
