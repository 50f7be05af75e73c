"""Export: every format a quantized model ships in, as plugins of one protocol (`formats.ExportFormat`).

`formats` holds the protocol and the registry; the formats are the packed vitqtool safetensors file
(`writer`/`reader`), the transformers folder (`hf`), the compressed-tensors view under the stock names
(`source_view`) and the ONNX QDQ graph (`onnx_export`). Names are imported lazily, so that listing the
formats (`formats.FORMATS`, for `vitqtool export --help`) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "ExportFormat": "formats", "ExportSource": "formats", "ExportSummary": "formats", "FORMATS": "formats",
    "LoadedExport": "formats", "find_format": "formats", "get_format": "formats", "register_format": "formats",
    "ExportedModel": "reader", "is_vitq_export": "reader", "read_export": "reader", "summarize_export": "reader",
    "export_model": "writer", "export_hf_model": "hf", "is_hf_export": "hf", "read_hf_export": "hf",
    "export_onnx_model": "onnx_export", "inspect_onnx": "onnx_export", "load_onnx": "onnx_export",
    "load_source_model": "source_view", "source_state_dict": "source_view", "write_source_view": "source_view",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'vitqtool.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
