"""Export: packed low-bit safetensors files with quantization metadata that reload on their own.

`export_model` writes one file per quantized model (integer weight codes packed densely into int32 words,
steps, FP tensors and a compressed-tensors-shaped `quantization_config` plus a `vitqtool` section);
`read_export` / `read_hf_export` rebuild a runnable model from the file alone; `inspect` summarises it.
"""

from .hf import export_hf_model, is_hf_export, read_hf_export
from .reader import ExportedModel, inspect, is_vitq_export, read_export
from .writer import export_model

__all__ = ["ExportedModel", "export_hf_model", "export_model", "inspect", "is_hf_export",
           "is_vitq_export", "read_export", "read_hf_export"]
