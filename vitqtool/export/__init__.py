"""Export: packed low-bit safetensors files with quantization metadata that reload on their own.

`export` writes one file per quantized model (integer weight codes packed densely into int32 words,
steps, FP tensors and a compressed-tensors-shaped `quantization_config` plus a `vitqtool` section);
`load`/`read_export` rebuild a runnable model from the file alone; `inspect` summarises it.
"""

from .onnx_export import export_onnx, export_onnx_model, inspect_onnx, load_onnx
from .reader import ExportedModel, inspect, is_vitq_export, load, read_export
from .source_view import export_source_view, load_source_model, source_state_dict
from .writer import export, export_model

__all__ = ["ExportedModel", "export", "export_model", "inspect", "is_vitq_export", "load", "read_export",
           "export_onnx", "export_onnx_model", "inspect_onnx", "load_onnx",
           "export_source_view", "load_source_model", "source_state_dict"]
