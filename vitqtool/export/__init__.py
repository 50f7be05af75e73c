"""Export: packed low-bit safetensors files with quantization metadata that reload on their own.

`export_model` writes one file per quantized model (integer weight codes packed densely into int32 words,
steps, FP tensors and a compressed-tensors-shaped `quantization_config` plus a `vitqtool` section);
`read_export` / `read_hf_export` rebuild a runnable model from the file alone; `summarize_export` summarises it.
"""

from .hf import export_hf_model, is_hf_export, read_hf_export
from .reader import ExportedModel, is_vitq_export, read_export, summarize_export
from .writer import export_model

__all__ = ["ExportedModel", "export_hf_model", "export_model", "is_hf_export",
           "is_vitq_export", "read_export", "read_hf_export", "summarize_export"]
