"""`analyze`: variation statistics, sensitivity, oscillation and a bit-allocation suggestion for one model."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, ModelError, RecipeError
from ..progress import track
from ..quant import quantizers_disabled
from .allocation import allocate
from .sensitivity import METHODS, WHAT, SensitivityProbe, build_units, group_units, rank_rows
from .variation import ActivationRecorder, weight_rows

log = logging.getLogger(__name__)

SCHEMA = "vitqtool.analysis/1"


def analyze(model: str, *, data: str = "builtin:mnist5k", split: str = "validation", bits: int = 2, what: str = "both",
            out: Path | str | None = None, weights: str | Path | None = None, random_init: bool = False,
            model_args: dict | None = None, recipe: str | Path = "vaq", batches: int = 4, batch_size: int = 32,
            run: Path | str | None = None, budget_bits: float | None = None, keep: int | None = None,
            plots: bool = True, method: str = "fast", show_progress: bool = False) -> dict[str, Any]:
    """Variation, sensitivity (and oscillation) report of an FP model quantized with `recipe` at `bits`.

    Args:
        model: MODEL spec (timm name, hf-hub:..., local folder) of the FP model.
        data, split: analysis data; step sizes are calibrated on the dataset's "train" split first.
        bits: weight/activation bits inside blocks (edge layers keep the recipe's edge bits).
        what: sensitivity of "weights", "acts" or "both" of each module.
        out: report folder (analysis.json, CSVs, PNGs, index.html, overrides.toml); None writes nothing.
        batches, batch_size: analysis images = batches x batch_size.
        run: a `quantize` run folder, for the oscillation section.
        budget_bits, keep: bit-allocation suggestion (average weight bits, or N most sensitive at 8 bits).
        plots: render PNGs (needs matplotlib, the `vitqtool[plots]` extra).
        method: "fast" (cached block inputs) or "naive" (full forward per module); same numbers.
    Returns:
        The report dict (schema in the README; `report["summary"]` is what `--json` prints).
    Raises:
        ModelError, DataError, RecipeError, RunError on bad input.

    Example:
        >>> report = analyze("deit_tiny_patch16_224", random_init=True, batches=1, batch_size=8, out="report")
    """
    from .. import api
    from ..arch import get_adapter
    from ..data import load_dataset, make_eval_loader
    from ..recipe import load_recipe

    if what not in WHAT:
        raise ModelError(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    if method not in METHODS:
        raise ModelError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if budget_bits is not None and keep is not None:
        raise RecipeError("pass only one of --budget-bits and --keep")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = api.resolve_any(str(model), weights=weights, random_init=random_init, model_args=model_args)
    if loaded.kind != "fp":
        raise ModelError(f"analyze takes an FP model, '{model}' is already quantized; pass the FP model and the run folder as --run")
    rec = load_recipe(recipe, set_fields={"quant.bits": bits})
    qmodel = api.prepare(loaded.model, rec, inplace=True).eval()
    adapter = get_adapter(qmodel)
    blocks = adapter.block_names(qmodel)
    cfg = loaded.data_config
    calib_set = load_dataset(data, "train")
    api.calibrate(qmodel, itertools.islice(make_eval_loader(calib_set, cfg, batch_size), rec.calibration.batches))
    dataset = load_dataset(data, split)
    batch_list = list(itertools.islice(make_eval_loader(dataset, cfg, batch_size), batches))
    if not batch_list:
        raise DataError(f"split '{split}' of '{data}' is empty")
    model_classes = int(cfg.get("num_classes") or getattr(qmodel, "num_classes", 0))
    labels_valid = model_classes == dataset.num_classes
    if not labels_valid:
        log.warning("model has %d classes, dataset %d: reporting KL and top-1 agreement only (no loss/top-1)", model_classes, dataset.num_classes)
    seconds["load_calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    wrows = weight_rows(qmodel, blocks)
    recorder = ActivationRecorder(qmodel)
    with recorder.first_pass():
        probe = SensitivityProbe(qmodel, adapter, batch_list, method=method, labels_valid=labels_valid)
    with recorder.second_pass(), quantizers_disabled(qmodel), torch.no_grad():
        for images, _ in batch_list:
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

    osc = None
    if run is not None:
        from .oscillation import oscillation_rows
        osc = oscillation_rows(run)

    allocation = None
    if budget_bits is not None or keep is not None:
        # block layers below the edge bits (Swin patch merging is a segment but stays at edge bits)
        layers = [r for r in sens["modules"] if r["block"] is not None and r["weight_bits"] is not None and r["weight_bits"] < rec.quant.edge_bits]
        allocation = allocate(layers, budget_bits=budget_bits, keep=keep)

    report = {
        "schema": SCHEMA, "model": loaded.source, "architecture": type(loaded.model).__name__, "data": data,
        "split": split, "calibration_split": "train", "recipe": rec.name, "bits": rec.quant.bits,
        "edge_bits": rec.quant.edge_bits, "images": sum(b[0].shape[0] for b in batch_list),
        "labels_valid": labels_valid, "blocks": blocks, "weights": wrows, "activations": arows,
        "sensitivity": sens, "oscillation": osc, "allocation": allocation, "seconds": seconds,
    }
    from .report import summarize, write_report

    report["summary"] = summarize(report)
    if out is not None:
        report["files"] = write_report(report, Path(out), plots=plots)
        report["summary"]["files"] = report["files"]
    return report
