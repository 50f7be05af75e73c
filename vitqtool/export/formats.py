"""`vitqtool export --format`: one entry per output format beyond the default vitqtool safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ExportFormatError

EXPORT_FORMATS = ("safetensors", "onnx", "compressed-tensors")


def export_as(fmt: str, run_or_export: str | Path, out: str | Path, *, dtype: str = "float32", verify: bool = False,
              which: str = "best") -> dict[str, Any]:
    """Export a run folder or vitqtool export in format `fmt`; the result has a one-row `summary` for the CLI table."""
    if fmt == "onnx":
        from .onnx_export import export_onnx

        if dtype != "float32":
            raise ExportFormatError("--dtype applies to safetensors exports; the ONNX graph keeps its FP tensors in float32")
        result = export_onnx(run_or_export, out, verify=verify, which=which)
        checked = result["verify"] or {}
        summary = {"model": result["architecture"], "bits": result["bits"], "layers": result["quantized_layers"],
                   "MB": round(result["file_bytes"] / 1e6, 3), "fp32 MB": round(result["fp32_bytes"] / 1e6, 3),
                   "ratio": result["compression_ratio"], "verify images": checked.get("images"),
                   "top-1 agree %": checked.get("top1_agreement"), "max|diff|": checked.get("max_abs_diff")}
    elif fmt == "compressed-tensors":
        from .source_view import export_source_view

        result = export_source_view(run_or_export, out, dtype=dtype, which=which, verify=verify)
        checked = result["verify"] or {}
        summary = {"model": result["architecture"], "layers": result["quantized_layers"], "MB": round(result["file_bytes"] / 1e6, 3),
                   "fp32 MB": round(result["fp32_bytes"] / 1e6, 3), "ratio": result["compression_ratio"],
                   "verify max|diff|": checked.get("max_abs_diff")}
    else:
        raise ExportFormatError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    return {**result, "summary": summary}
