"""Quantization sensitivity (method.md §1): quantize ONE module, measure the damage to the model's output.

For each unit (a quantized Linear/Conv: its weight and/or input quantizer; or a standalone activation
quantizer such as Q/K/V or the softmax output) only that unit's quantizers are enabled and the model
is run on the analysis batches: KL(FP || Q) of the logits, change of the cross-entropy loss, top-1
and top-1 agreement with the FP model.

Methods (identical numbers, different cost):
- `naive`: one full forward pass per unit and batch.
- `fast`: the FP inputs of every block (segment) are cached once (arch adapter `block_inputs`); a
  unit inside block i is evaluated from block i's cached input (`run_from`), so the embedding and
  blocks 0..i-1 are never recomputed. Units outside every block run from the input of the tail when
  they execute after the last block, else the full forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..families import Family
from ..quant import QUANT_LAYERS, iter_quantizers, quantizers_disabled
from .variation import block_of, module_type

WHAT = ("weights", "acts", "both")
METHODS = ("fast", "naive")
FULL = -1  # start index meaning "full forward from the images"


@dataclass
class Unit:
    """What gets quantized alone: a layer's weight/input quantizers, or one standalone activation quantizer."""

    name: str
    type: str
    block: str | None
    quantizers: list[str]
    params: int = 0            # weight elements (0 for activation-only units)
    weight_bits: int | None = None
    act_bits: int | None = None


def build_units(model: nn.Module, what: str, blocks: list[str]) -> list[Unit]:
    """The units of `model` for `what` ("weights", "acts" or "both") in module order."""
    if what not in WHAT:
        raise ValueError(f"what must be one of {', '.join(WHAT)}, got {what!r}")
    units, inside = [], set()
    for name, mod in model.named_modules():
        if not isinstance(mod, QUANT_LAYERS):
            continue
        inside.update({f"{name}.w_quant", f"{name}.a_quant"})
        qs = [f"{name}.w_quant"] if what in ("weights", "both") else []
        if what in ("acts", "both") and mod.a_quant is not None:
            qs.append(f"{name}.a_quant")
        if qs:
            block = block_of(name, blocks)
            units.append(Unit(name, module_type(name, block), block, qs, mod.weight.numel(), mod.w_quant.spec.bits,
                              mod.a_quant.spec.bits if mod.a_quant is not None else None))
    if what in ("acts", "both"):
        for name, q in iter_quantizers(model):
            if q.kind == "act" and name not in inside:
                block = block_of(name, blocks)
                units.append(Unit(name, module_type(name, block), block, [name], act_bits=q.spec.bits))
    return units


def group_units(units: list[Unit], key: str) -> list[Unit]:
    """One unit per block (`key="block"`) or per module type inside blocks (`key="type"`), in first-seen order."""
    groups: dict[str, Unit] = {}
    for u in units:
        if u.block is None:
            continue
        label = u.block if key == "block" else u.type
        g = groups.setdefault(label, Unit(label, label if key == "type" else "block", u.block if key == "block" else None, []))
        g.quantizers += u.quantizers
        g.params += u.params
    return list(groups.values())


class SensitivityProbe:
    """FP reference (and, for `fast`, cached block inputs) over fixed batches; `measure()` one unit at a time."""

    def __init__(self, model: nn.Module, adapter: Family, batches: list[tuple[Tensor, Tensor]],
                 method: str = "fast", labels_valid: bool = True) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.model, self.adapter, self.method, self.labels_valid = model, adapter, method, labels_valid
        self.blocks: list[str] = adapter.block_names(model)
        self.quantizers = dict(iter_quantizers(model))
        self.images = [b[0] for b in batches]
        self.labels = [b[1] for b in batches]
        self.hidden: list[list[Tensor]] = []
        self.fp_logits: list[Tensor] = []
        self._order: dict[str, int] = {}
        self._cache()
        self.fp = self._metrics(self.fp_logits)

    @torch.no_grad()
    def _cache(self) -> None:
        """FP forward over every batch: logits, block inputs (fast) and the execution order of quantizers/blocks."""
        named = dict(self.model.named_modules())
        events: list[str] = []
        handles = [named[b].register_forward_pre_hook(lambda m, a, b=b: events.append(b)) for b in self.blocks]
        if self.blocks:
            handles.append(named[self.blocks[-1]].register_forward_hook(lambda m, a, o: events.append("<end>")))
        handles += [q.register_forward_pre_hook(lambda m, a, n=n: events.append(n)) for n, q in self.quantizers.items()]
        with quantizers_disabled(self.model):
            for i, images in enumerate(self.images):
                if self.method == "fast":
                    hidden = self.adapter.block_inputs(self.model, images)
                    self.hidden.append(hidden)
                    self.fp_logits.append(self.adapter.run_from(self.model, len(self.blocks), hidden[-1]))
                else:
                    self.fp_logits.append(self.model(images))
                if i == 0:
                    for h in handles:
                        h.remove()
                    self._order = self._start_indices(events)
        for h in handles:
            h.remove()

    def _start_indices(self, events: list[str]) -> dict[str, int]:
        """Segment index each quantizer can start from (by name, else by when it ran relative to the blocks)."""
        starts, seen_blocks, ended = {}, 0, False
        index = {b: i for i, b in enumerate(self.blocks)}
        for e in events:
            if e in index:
                seen_blocks += 1
            elif e == "<end>":
                ended = True
            elif e not in starts:
                block = block_of(e, self.blocks)
                if block is not None:
                    starts[e] = index[block]
                else:  # outside every block: the tail if it ran after the last block, else from the images
                    starts[e] = len(self.blocks) if ended and seen_blocks == len(self.blocks) else FULL
        return starts

    def start_of(self, unit: Unit) -> int:
        """Where `fast` starts for `unit`: the earliest start of its quantizers (FULL for `naive`)."""
        if self.method == "naive":
            return FULL
        starts = [self._order.get(q, FULL) for q in unit.quantizers]
        return FULL if FULL in starts else min(starts)

    @torch.no_grad()
    def measure(self, unit: Unit) -> dict[str, Any]:
        """Metrics with only `unit`'s quantizers enabled (every other quantizer off)."""
        start = self.start_of(unit)
        with quantizers_disabled(self.model):
            for q in unit.quantizers:
                self.quantizers[q].enabled = True
            logits = []
            for i, images in enumerate(self.images):
                logits.append(self.model(images) if start == FULL else self.adapter.run_from(self.model, start, self.hidden[i][start]))
        return self._metrics(logits)

    def _metrics(self, logits: list[Tensor]) -> dict[str, Any]:
        n = sum(x.shape[0] for x in logits)
        kl = agree = 0.0
        for q, fp in zip(logits, self.fp_logits):
            lq, lp = F.log_softmax(q.double(), -1), F.log_softmax(fp.double(), -1)
            kl += float(F.kl_div(lq, lp, log_target=True, reduction="sum"))
            agree += float((q.argmax(-1) == fp.argmax(-1)).sum())
        out: dict[str, Any] = {"kl": kl / n, "top1_agreement": 100.0 * agree / n, "loss": None, "top1": None}
        if self.labels_valid:
            out["loss"] = sum(float(F.cross_entropy(q.double(), y, reduction="sum")) for q, y in zip(logits, self.labels)) / n
            out["top1"] = 100.0 * sum(float((q.argmax(-1) == y).sum()) for q, y in zip(logits, self.labels)) / n
        return out


def rank_rows(units: list[Unit], results: list[dict[str, Any]], fp: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows sorted by KL (most sensitive first) with rank, deltas against FP and the unit's description."""
    rows = []
    for u, r in zip(units, results):
        rows.append({"name": u.name, "type": u.type, "block": u.block, "params": u.params, "weight_bits": u.weight_bits,
                     "act_bits": u.act_bits, "quantizers": u.quantizers, **r,
                     "delta_loss": r["loss"] - fp["loss"] if r["loss"] is not None else None,
                     "delta_top1": r["top1"] - fp["top1"] if r["top1"] is not None else None})
    rows.sort(key=lambda row: -row["kl"])
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows

