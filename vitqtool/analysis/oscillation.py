"""Oscillation report of a `quantize` run (method.md §6): tracker state from the checkpoint, bin boundaries from the weights.

Per quantized layer: `oscillating_share` (share of weights whose oscillation EMA exceeds the recipe's
threshold), `flip_frequency` (mean EMA, oscillations per step), `flips_last_update`, and
`boundary_share` (weights within 0.05 of a rounding boundary, computed from the model alone).
"""

from __future__ import annotations

from typing import Any

from ..core.artifacts import CheckpointState
from ..core.runs import RunModel
from ..quant import QUANT_LAYERS
from .stats import boundary_share


def oscillation_rows(run: RunModel, state: CheckpointState, where: str) -> dict[str, Any]:
    """Per-module oscillation of a run's model and checkpoint state; tracker fields are null if the run did not track."""
    tracker = state.oscillation
    threshold = run.recipe.oscillation.threshold
    rows = []
    for name, mod in run.model.named_modules():
        if not isinstance(mod, QUANT_LAYERS):
            continue
        row: dict[str, Any] = {"name": name, "bits": mod.w_quant.spec.bits, "params": mod.weight.numel(),
                               "boundary_share": boundary_share(mod.w_quant, mod.weight.detach()),
                               "oscillating_share": None, "flip_frequency": None, "flips_last_update": None}
        freq = tracker.get(f"{name}.frequency") if tracker else None
        if freq is not None:
            row["oscillating_share"] = float((freq > threshold).float().mean())
            row["flip_frequency"] = float(freq.float().mean())
            flips = tracker.get(f"{name}.flips")
            row["flips_last_update"] = int(flips) if flips is not None else None
        rows.append(row)
    return {"run": where, "threshold": threshold, "tracked": bool(tracker), "modules": rows}
