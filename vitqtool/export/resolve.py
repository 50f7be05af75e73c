"""The quantized model behind an `export` source (a `quantize` run folder or a vitqtool export), for the other formats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ExportFormatError
from ..recipe import Recipe


@dataclass
class QuantizedSource:
    """A calibrated quantized model and what rebuilds and feeds it (architecture, args, data config, recipe)."""

    model: nn.Module
    architecture: str
    model_args: dict
    data_config: dict
    recipe: Recipe
    source: str
    data: str | None = None  # the dataset the run trained on, when known (verification images)
    metrics: dict | None = None


def resolve_quantized(run_or_export: str | Path, which: str = "best") -> QuantizedSource:
    """Load the quantized model of a run folder (checkpoint `which`) or of a vitqtool export file.

    Raises ExportFormatError (or RunError) naming the problem when the path is neither.
    """
    from .layout import META_VITQ
    from .reader import is_vitq_export, read_export

    path = Path(run_or_export)
    if path.is_dir():
        from ..train.checkpoint import load_run_model

        run = load_run_model(path, which)
        meta = run.meta
        top1 = meta.get("best_top1" if which == "best" else "last_top1")
        metrics: dict[str, Any] | None = ({"top1": top1, "data": meta.get("data"), "split": "validation", "checkpoint": which}
                                          if top1 is not None else None)
        return QuantizedSource(run.model.cpu().eval(), meta["architecture"], meta.get("model_args") or {}, run.data_config,
                               run.recipe, meta.get("source_model", str(path)), meta.get("data"), metrics)
    if path.is_file() and is_vitq_export(path):
        exported = read_export(path)
        vq = exported.metadata[META_VITQ]
        metrics = vq.get("metrics") if isinstance(vq.get("metrics"), dict) else None
        return QuantizedSource(exported.model, vq["architecture"], vq["model_args"] or {}, exported.data_config, exported.recipe,
                               vq.get("source", ""), (metrics or {}).get("data"), metrics)
    raise ExportFormatError(f"'{path}' is neither a `vitqtool quantize` run folder nor a vitqtool export; "
                            "pass the --out folder of a quantize run or a .safetensors file written by `vitqtool export`")
