"""Bit-allocation suggestion from sensitivity: which block layers deserve more than `--bits` weight bits.

`--budget-bits B`: the parameter-weighted average weight bits over the quantized layers inside blocks
may reach B; greedily, in order of sensitivity (KL, highest first), layers are raised to 4 bits while
the average stays within B, then (same order) to 8 bits. `--keep N`: the N most sensitive block layers
get 8 bits. The result is a recipe override table (`[quant.overrides]`, weight_bits and act_bits).
"""

from __future__ import annotations

from typing import Any

from ..errors import RecipeError
from ..recipe import dump_toml

STEPS = (4, 8)


def allocate(layers: list[dict[str, Any]], budget_bits: float | None = None, keep: int | None = None) -> dict[str, Any]:
    """Suggest per-layer bits for `layers` (rows with name, params, weight_bits, kl).

    Returns {"mode", "budget_bits"/"keep", "base_average_bits", "average_bits", "overrides"}.
    Raises RecipeError when both or neither of `budget_bits`/`keep` are given or the value is impossible.
    """
    if (budget_bits is None) == (keep is None):
        raise RecipeError("pass exactly one of --budget-bits and --keep")
    if not layers:
        raise RecipeError("no quantized block layers to allocate bits to (sensitivity found no weight units; use --what weights or both)")
    order = sorted(layers, key=lambda r: -r["kl"])
    bits = {r["name"]: r["weight_bits"] for r in order}
    total_params = sum(r["params"] for r in order)
    base = sum(r["params"] * r["weight_bits"] for r in order) / total_params
    if keep is not None:
        if keep < 0:
            raise RecipeError(f"--keep must be >= 0, got {keep}")
        for r in order[:keep]:
            bits[r["name"]] = 8
        info: dict[str, Any] = {"mode": "keep", "keep": keep}
    else:
        if budget_bits < base - 1e-9:
            raise RecipeError(f"--budget-bits {budget_bits} is below the current average of {base:.3g} weight bits; pass a larger budget")
        spent = base * total_params
        for target in STEPS:
            for r in order:
                extra = r["params"] * (target - bits[r["name"]])
                if extra > 0 and spent + extra <= budget_bits * total_params + 1e-6:
                    bits[r["name"]] = target
                    spent += extra
        info = {"mode": "budget", "budget_bits": budget_bits}
    average = sum(r["params"] * bits[r["name"]] for r in order) / total_params
    overrides = {r["name"]: {"weight_bits": bits[r["name"]], "act_bits": bits[r["name"]]}
                 for r in order if bits[r["name"]] != r["weight_bits"]}
    return {**info, "base_average_bits": base, "average_bits": average, "overrides": overrides}


def overrides_toml(allocation: dict[str, Any], comment: str) -> str:
    """The allocation as a recipe override file (`quantize --overrides FILE`, `load_recipe(override_files=...)`)."""
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + dump_toml({"quant": {"overrides": allocation["overrides"]}})
