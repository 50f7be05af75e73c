"""Oscillation report of a `quantize` run (method.md §6): tracker state from the checkpoint, bin boundaries from the weights.

Per quantized layer: `oscillating_share` (share of weights whose oscillation EMA exceeds the recipe's
threshold), `flip_frequency` (mean EMA, oscillations per step), `flips_last_update`, and
`boundary_share` (weights within 0.05 of a rounding boundary, computed from the model alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import RunError
from ..quant import QUANT_LAYERS
from .stats import boundary_share

TRACKER_KEY = "oscillation"  # where the training loop stores OscillationTracker.state_dict() in state.pt


def oscillation_rows(run: str | Path) -> dict[str, Any]:
    """Per-module oscillation of the last checkpoint of `run`; tracker fields are null if the run did not track."""
    from ..train.checkpoint import load_checkpoint, load_run_model

    run = Path(run)
    if not (run / "run.json").is_file():
        raise RunError(f"--run '{run}' is not a vitqtool run folder (no run.json); pass the --out folder of `quantize`")
    loaded = load_run_model(run, "last")
    _, state = load_checkpoint(run, "last")
    tracker = state.get(TRACKER_KEY) if isinstance(state, dict) else None
    threshold = loaded.recipe.oscillation.threshold
    rows = []
    for name, mod in loaded.model.named_modules():
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
    return {"run": str(run), "threshold": threshold, "tracked": bool(tracker), "modules": rows}
