"""Quantization sensitivity (method.md §1): quantize ONE module, measure the damage to the model's output.

For each unit (a quantized Linear/Conv: its weight and/or input quantizer; or a standalone activation
quantizer such as Q/K/V or the softmax output) only that unit's quantizers are enabled and the model
is run on the analysis batches: KL(FP || Q) of the logits, change of the cross-entropy loss, top-1
and top-1 agreement with the FP model.

Exact methods (identical numbers, different cost):
- `naive`: one full forward pass per unit and batch.
- `fast`: the FP inputs of every block (segment) are cached once (the family plugin's `block_inputs`); a
  unit inside block i is evaluated from block i's cached input (`run_from`), so the embedding and
  blocks 0..i-1 are never recomputed. Units outside every block run from the input of the tail when
  they execute after the last block, else the full forward.
The estimate `taylor` (estimate.py) costs a handful of passes whatever the number of units; `auto`
picks it when the exact `fast` pass is predicted to take longer than `AUTO_LIMIT_SECONDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..families import Family
from ..quant import QUANT_LAYERS, iter_quantizers, quantizers_disabled
from .variation import block_of, module_type

WHAT = ("weights", "acts", "both")
EXACT = ("fast", "naive")
METHODS = ("auto", *EXACT, "taylor")
DESCRIPTIONS = {"fast": "exact KL (cached block inputs)", "naive": "exact KL (full forward per unit)",
                "taylor": "second-order estimate of the KL (one pass)"}
AUTO_LIMIT_SECONDS = 120.0  # `auto`: the exact `fast` method when predicted to take at most this long, else `taylor`
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
                 method: str = "fast", labels_valid: bool = True, advance: Callable[..., None] | None = None) -> None:
        if method not in EXACT:
            raise ValueError(f"method must be one of {', '.join(EXACT)}, got {method!r}")
        self.model, self.adapter, self.method, self.labels_valid = model, adapter, method, labels_valid
        self.blocks: list[str] = adapter.block_names(model)
        self.quantizers = dict(iter_quantizers(model))
        self.images = [b[0] for b in batches]
        self.labels = [b[1] for b in batches]
        self.hidden: list[list[Tensor]] = []
        self.fp_logits: list[Tensor] = []
        self._order: dict[str, int] = {}
        self._cache(advance)
        self.fp = logit_metrics(self.fp_logits, self.fp_logits, self.labels, labels_valid)

    @torch.no_grad()
    def _cache(self, advance: Callable[..., None] | None = None) -> None:
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
                if advance is not None:
                    advance()
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
        return logit_metrics(logits, self.fp_logits, self.labels, self.labels_valid)


def logit_metrics(logits: list[Tensor], fp_logits: list[Tensor], labels: list[Tensor], labels_valid: bool) -> dict[str, Any]:
    """KL(FP || these logits) per image, top-1 agreement with FP, and (when the labels are valid) loss and top-1."""
    n = sum(x.shape[0] for x in logits)
    kl = agree = 0.0
    for q, fp in zip(logits, fp_logits):
        lq, lp = F.log_softmax(q.double(), -1), F.log_softmax(fp.double(), -1)
        kl += float(F.kl_div(lq, lp, log_target=True, reduction="sum"))
        agree += float((q.argmax(-1) == fp.argmax(-1)).sum())
    out: dict[str, Any] = {"kl": kl / n, "top1_agreement": 100.0 * agree / n, "loss": None, "top1": None}
    if labels_valid:
        out["loss"] = sum(float(F.cross_entropy(q.double(), y, reduction="sum")) for q, y in zip(logits, labels)) / n
        out["top1"] = 100.0 * sum(float((q.argmax(-1) == y).sum()) for q, y in zip(logits, labels)) / n
    return out


def predicted_seconds(units: list[Unit], blocks: list[str], forward_seconds: float, method: str) -> float:
    """Predicted wall time of an exact method: one FP pass plus, per unit, the share of the model it reruns.

    `fast` reruns from the unit's block (block i of n: (n - i) / n of a forward; blocks of a family cost
    about the same: Swin halves the tokens and doubles the width per stage), units outside blocks and
    unit groups spanning blocks a full forward; `naive` a full forward per unit.
    """
    index = {b: i for i, b in enumerate(blocks)}
    share = 0.0
    for u in units:
        share += (len(blocks) - index[u.block]) / len(blocks) if method == "fast" and u.block in index else 1.0
    return forward_seconds * (1.0 + share)


def choose_method(requested: str, predicted_exact: float, limit: float = AUTO_LIMIT_SECONDS) -> tuple[str, str | None]:
    """The method to run and, when `auto` chose the estimate, the one-line reason to show."""
    if requested != "auto":
        return requested, None
    if predicted_exact <= limit:
        return "fast", None
    minutes = predicted_exact / 60
    return "taylor", (f"the exact sensitivity pass would take about {minutes:.0f} min here; using the one-pass "
                      f"second-order estimate (--method taylor); pass --method fast for the exact KL of every unit")


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



def ranks(values: list[float]) -> list[float]:
    """Ranks of `values` from 1 (smallest); tied values share their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long sequences (Pearson correlation of their ranks)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var > 0 else 0.0


def top_overlap(a: list[float], b: list[float], k: int = 10) -> int:
    """How many of the `k` largest entries of `a` are among the `k` largest of `b` (same positions)."""
    top = lambda v: set(sorted(range(len(v)), key=lambda i: -v[i])[:k])  # noqa: E731
    return len(top(a) & top(b))
