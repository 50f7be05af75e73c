"""Export: packed low-bit safetensors files with quantization metadata that reload on their own.

`export_model` writes one file per quantized model (integer weight codes packed densely into int32 words,
steps, FP tensors and a compressed-tensors-shaped `quantization_config` plus a `vitqtool` section);
`read_export` / `read_hf_export` rebuild a runnable model from the file alone; `summarize_export` summarises it.
"""

from .hf import export_hf_model, is_hf_export, read_hf_export
from .onnx_export import export_onnx_model, inspect_onnx, load_onnx
from .reader import ExportedModel, is_vitq_export, read_export, summarize_export
from .source_view import load_source_model, source_state_dict, write_source_view
from .writer import export_model

__all__ = ["ExportedModel", "export_hf_model", "export_model", "export_onnx_model", "inspect_onnx", "is_hf_export",
           "is_vitq_export", "load_onnx", "load_source_model", "read_export", "read_hf_export", "source_state_dict",
           "summarize_export", "write_source_view"]
