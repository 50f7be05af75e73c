"""The core layer: load a model, prepare and calibrate it, evaluate a module, typed artifacts, run folders."""

from .artifacts import CheckpointState, ExportHeader, RunInfo, SoftLabelManifest
from .models import LoadedModel, load_model, load_strict, resolve_model
from .prepare import calibrate, evaluate_model, prepare, quant_summary
from .runs import RunModel, load_checkpoint, load_run_model, read_run_info

__all__ = ["CheckpointState", "ExportHeader", "LoadedModel", "RunInfo", "RunModel", "SoftLabelManifest", "calibrate",
           "evaluate_model", "load_checkpoint", "load_model", "load_run_model", "load_strict", "prepare", "quant_summary",
           "read_run_info", "resolve_model"]
