"""`analyze`: variation statistics, sensitivity, oscillation and a bit-allocation suggestion for one model."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.prepare import calibrate, prepare
from ..errors import DataError, ModelError, RecipeError
from ..families import Family, get_family
from ..progress import phase, progress_bar
from ..quant import QUANT_LAYERS, quantizers_disabled
from ..recipe import Recipe
from .allocation import allocate
from .estimate import MICRO_BATCH, taylor_sensitivity
from .report import summarize, write_report
from .sensitivity import (
    EXACT,
    METHODS,
    WHAT,
    SensitivityProbe,
    Unit,
    build_units,
    choose_method,
    group_units,
    logit_metrics,
    predicted_seconds,
    rank_rows,
)
from .variation import ActivationRecorder, weight_rows

log = logging.getLogger(__name__)

SCHEMA = "vitqtool.analysis/1"


def analyze_model(model: nn.Module, *, recipe: Recipe, calibration_batches: Iterable, batches: list, labels_valid: bool,
                  source: str, data: str, split: str, what: str = "both", method: str = "auto",
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
        method: "fast" (cached block inputs) or "naive" (full forward per module): the exact KL, same numbers;
            "taylor": the one-pass second-order estimate; "auto": "fast" when it is predicted to take at most
            `AUTO_LIMIT_SECONDS` (from the calibration pass's speed), else "taylor".
        oscillation: `oscillation_rows` of a run, for the oscillation section.
        budget_bits, keep: bit-allocation suggestion (average weight bits, or N most sensitive at 8 bits).
        out: report folder (analysis.json, CSVs, PNGs, index.html, overrides.toml); None writes nothing.
        plots: render PNGs (needs matplotlib, the `vitqtool[plots]` extra).
        show_progress: a progress task per phase on stderr.
    Returns:
        The report dict (schema in docs/analyze.md; `report["summary"]` is what `--json` prints).
    """
    if what not in WHAT:
        raise ModelError(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    if method not in METHODS:
        raise ModelError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if budget_bits is not None and keep is not None:
        raise RecipeError("pass only one of --budget-bits and --keep")
    if not batches:
        raise DataError(f"split '{split}' of '{data}' is empty")
    n_images = sum(b[0].shape[0] for b in batches)
    with progress_bar(show_progress) as bar:
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        architecture = type(model).__name__
        qmodel = prepare(model, recipe, inplace=True).eval()
        adapter = get_family(qmodel)
        blocks = adapter.block_names(qmodel)
        calibrated = {"images": 0, "seconds": 0.0}
        with phase(bar, "calibration", _len(calibration_batches)) as advance:
            calibrate(qmodel, _timed(calibration_batches, advance, calibrated))
        forward_seconds = calibrated["seconds"] * n_images / max(calibrated["images"], 1)  # an FP pass over the analysis images
        seconds["load_calibrate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        units = build_units(qmodel, what, blocks)
        block_units, type_units = group_units(units, "block"), group_units(units, "type")
        everything = units + block_units + type_units
        predicted = predicted_seconds(everything, blocks, forward_seconds, "fast")
        used, note = choose_method(method, predicted)
        if note:
            log.warning(note)
        with phase(bar, "weight statistics", sum(1 for _ in _quant_layers(qmodel))) as advance:
            wrows = weight_rows(qmodel, blocks, advance)
        recorder = ActivationRecorder(qmodel)
        sensitivity = _exact if used in EXACT else _estimate
        results, fp, seconds["statistics"], t0 = sensitivity(bar, qmodel, adapter, batches, recorder, used, labels_valid,
                                                             everything, t0)
        arows = recorder.rows(blocks)
        n_units, n_blocks = len(units), len(block_units)
        sens: dict[str, Any] = {"metric": "kl", "method": used, "method_requested": method, "method_note": note,
                "predicted_exact_seconds": predicted, "what": what, "fp": fp,
                "modules": rank_rows(units, results[:n_units], fp),
                "blocks": rank_rows(block_units, results[n_units:n_units + n_blocks], fp),
                "types": rank_rows(type_units, results[n_units + n_blocks:], fp)}
        seconds["sensitivity"] = time.perf_counter() - t0

        allocation = None
        if budget_bits is not None or keep is not None:
            # block layers below the edge bits (Swin patch merging is a segment but stays at edge bits)
            layers = [r for r in sens["modules"]
                      if r["block"] is not None and r["weight_bits"] is not None and r["weight_bits"] < recipe.quant.edge_bits]
            allocation = allocate(layers, budget_bits=budget_bits, keep=keep)

        report = {
            "schema": SCHEMA, "model": source, "architecture": architecture, "data": data,
            "split": split, "calibration_split": "train", "recipe": recipe.name, "bits": recipe.quant.bits,
            "edge_bits": recipe.quant.edge_bits, "images": n_images,
            "labels_valid": labels_valid, "blocks": blocks, "weights": wrows, "activations": arows,
            "sensitivity": sens, "oscillation": oscillation, "allocation": allocation, "seconds": seconds,
        }
        report["summary"] = summarize(report)
        if out is not None:
            with phase(bar, "report" + (" and plots" if plots else ""), None) as advance:
                report["files"] = write_report(report, Path(out), plots=plots, advance=advance)
            report["summary"]["files"] = report["files"]
    return report


def _exact(bar: Any, model: nn.Module, adapter: Family, batches: list, recorder: ActivationRecorder, method: str,
           labels_valid: bool, units: list[Unit], t0: float) -> tuple[list[dict[str, Any]], dict[str, Any], float, float]:
    """Statistics passes (the first on the probe's FP pass) and the exact KL of every unit.

    Returns (results per unit, FP metrics, seconds of the statistics since `t0`, start time of the sensitivity phase).
    """
    with phase(bar, "statistics + FP reference", len(batches)) as advance, recorder.first_pass():
        probe = SensitivityProbe(model, adapter, batches, method=method, labels_valid=labels_valid, advance=advance)
    with phase(bar, "statistics (tails)", len(batches)) as advance:
        _forward_all(model, batches, recorder.second_pass, advance)
    t1 = time.perf_counter()
    results = []
    with phase(bar, f"sensitivity ({method})", len(units)) as advance:
        for u in units:
            results.append(probe.measure(u))
            advance()
    return results, probe.fp, t1 - t0, t1


def _estimate(bar: Any, model: nn.Module, adapter: Family, batches: list, recorder: ActivationRecorder, method: str,
              labels_valid: bool, units: list[Unit], t0: float) -> tuple[list[dict[str, Any]], dict[str, Any], float, float]:
    """The first statistics pass, then the estimate with the second statistics pass riding on its forward (as `_exact`)."""
    with phase(bar, "statistics", len(batches)) as advance:
        _forward_all(model, batches, recorder.first_pass, advance)
    t1 = time.perf_counter()
    micro = sum(-(-b[0].shape[0] // MICRO_BATCH) for b in batches)
    with phase(bar, "sensitivity (taylor) + statistics (tails)", micro) as advance:
        kls, fp_logits = taylor_sensitivity(model, units, batches, forward_context=recorder.second_pass, advance=advance)
    fp = logit_metrics(fp_logits, fp_logits, [b[1] for b in batches], labels_valid)
    return [{"kl": kl, "top1_agreement": None, "loss": None, "top1": None} for kl in kls], fp, t1 - t0, t1


def _timed(batches: Iterable, advance: Callable[..., None], totals: dict[str, float]) -> Iterator:
    """`batches`, advancing the progress after each; adds each batch's images and the time its consumer spent on it
    (the calibration forward, not the data loading) to `totals`."""
    for batch in batches:
        start = time.perf_counter()
        yield batch
        totals["seconds"] += time.perf_counter() - start
        totals["images"] += (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0]
        advance()


@torch.no_grad()
def _forward_all(model: nn.Module, batches: list, hooks: Callable[[], contextlib.AbstractContextManager],
                 advance: Callable[..., None]) -> None:
    """One FP forward over every batch with the recorder's `hooks` on."""
    with hooks(), quantizers_disabled(model):
        for images, _ in batches:
            model(images)
            advance()


def _quant_layers(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, QUANT_LAYERS))


def _len(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
