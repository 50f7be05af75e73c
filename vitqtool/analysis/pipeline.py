"""`analyze`: variation statistics, sensitivity, oscillation and a bit-allocation suggestion for one model."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..families import get_family
from ..core.prepare import calibrate, prepare
from ..errors import DataError, ModelError, RecipeError
from ..progress import track
from ..quant import quantizers_disabled
from ..recipe import Recipe
from .allocation import allocate
from .sensitivity import METHODS, WHAT, SensitivityProbe, build_units, group_units, rank_rows
from .report import summarize, write_report
from .variation import ActivationRecorder, weight_rows

log = logging.getLogger(__name__)

SCHEMA = "vitqtool.analysis/1"


def analyze_model(model: nn.Module, *, recipe: Recipe, calibration_batches: Iterable, batches: list, labels_valid: bool,
                  source: str, data: str, split: str, what: str = "both", method: str = "fast",
                  oscillation: dict[str, Any] | None = None, budget_bits: float | None = None, keep: int | None = None,
                  out: Path | str | None = None, plots: bool = True, show_progress: bool = False) -> dict[str, Any]:
    """Variation, sensitivity (and oscillation) report of an FP `model` quantized with `recipe`.

    Args:
        model: the FP model (rewritten in place into the recipe's quantized layout).
        recipe: the recipe whose layout and bits are analysed.
        calibration_batches: (images, labels) batches the step sizes are calibrated on (training images).
        batches: the analysis (images, labels) batches.
        labels_valid: whether the labels index the model's classes (else only KL and agreement).
        source, data, split: what the report says it analysed.
        what: sensitivity of "weights", "acts" or "both" of each module.
        method: "fast" (cached block inputs) or "naive" (full forward per module); same numbers.
        oscillation: `oscillation_rows` of a run, for the oscillation section.
        budget_bits, keep: bit-allocation suggestion (average weight bits, or N most sensitive at 8 bits).
        out: report folder (analysis.json, CSVs, PNGs, index.html, overrides.toml); None writes nothing.
        plots: render PNGs (needs matplotlib, the `vitqtool[plots]` extra).
    Returns:
        The report dict (schema in the README; `report["summary"]` is what `--json` prints).
    """
    if what not in WHAT:
        raise ModelError(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    if method not in METHODS:
        raise ModelError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if budget_bits is not None and keep is not None:
        raise RecipeError("pass only one of --budget-bits and --keep")
    if not batches:
        raise DataError(f"split '{split}' of '{data}' is empty")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    architecture = type(model).__name__
    qmodel = prepare(model, recipe, inplace=True).eval()
    adapter = get_family(qmodel)
    blocks = adapter.block_names(qmodel)
    calibrate(qmodel, calibration_batches)
    seconds["load_calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    wrows = weight_rows(qmodel, blocks)
    recorder = ActivationRecorder(qmodel)
    with recorder.first_pass():
        probe = SensitivityProbe(qmodel, adapter, batches, method=method, labels_valid=labels_valid)
    with recorder.second_pass(), quantizers_disabled(qmodel), torch.no_grad():
        for images, _ in batches:
            qmodel(images)
    arows = recorder.rows(blocks)
    seconds["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    units = build_units(qmodel, what, blocks)
    block_units, type_units = group_units(units, "block"), group_units(units, "type")
    everything = units + block_units + type_units
    results = [probe.measure(u) for u in track(everything, f"sensitivity ({method})", total=len(everything), enabled=show_progress)]
    n_units, n_blocks = len(units), len(block_units)
    sens = {"metric": "kl", "method": method, "what": what, "fp": probe.fp,
            "modules": rank_rows(units, results[:n_units], probe.fp),
            "blocks": rank_rows(block_units, results[n_units:n_units + n_blocks], probe.fp),
            "types": rank_rows(type_units, results[n_units + n_blocks:], probe.fp)}
    seconds["sensitivity"] = time.perf_counter() - t0

    allocation = None
    if budget_bits is not None or keep is not None:
        # block layers below the edge bits (Swin patch merging is a segment but stays at edge bits)
        layers = [r for r in sens["modules"] if r["block"] is not None and r["weight_bits"] is not None and r["weight_bits"] < recipe.quant.edge_bits]
        allocation = allocate(layers, budget_bits=budget_bits, keep=keep)

    report = {
        "schema": SCHEMA, "model": source, "architecture": architecture, "data": data,
        "split": split, "calibration_split": "train", "recipe": recipe.name, "bits": recipe.quant.bits,
        "edge_bits": recipe.quant.edge_bits, "images": sum(b[0].shape[0] for b in batches),
        "labels_valid": labels_valid, "blocks": blocks, "weights": wrows, "activations": arows,
        "sensitivity": sens, "oscillation": oscillation, "allocation": allocation, "seconds": seconds,
    }
    report["summary"] = summarize(report)
    if out is not None:
        report["files"] = write_report(report, Path(out), plots=plots)
        report["summary"]["files"] = report["files"]
    return report
