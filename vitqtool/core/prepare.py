"""What every verb does to a module: prepare (quantized layout), calibrate, summarise and evaluate it."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import quant
from ..errors import DataError, RecipeError
from ..families import QuantPolicy, quantize_model_
from ..progress import track
from ..recipe import Recipe, load_recipe

log = logging.getLogger(__name__)


def prepare(model: nn.Module, recipe: str | Path | Recipe = "vaq", bits: int | None = None,
            overrides: dict[str, dict[str, int]] | None = None, inplace: bool = False) -> nn.Module:
    """Rewrite an FP timm model into its quantized layout with quantizers attached (not yet calibrated).

    Args:
        model: a timm model of a supported family (`vitqtool.families`).
        recipe: recipe name, TOML path or Recipe; its `[quant]` section decides the layout.
        bits: overrides `quant.bits` (weights and activations inside blocks).
        overrides: extra `{module glob: {"weight_bits": b, "act_bits": b}}` on top of the recipe's.
        inplace: rewrite `model` itself instead of a deep copy.
    Returns:
        The quantized model; with `quantizers_disabled(model)` its logits equal the FP model's.
    Raises:
        ModelError for an unsupported family or block; RecipeError for a bad recipe or override.
    """
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, set_fields={"quant.bits": bits})
    if bits is not None and rec.quant.bits != bits:
        rec = load_recipe(rec, set_fields={"quant.bits": bits})
    q = rec.quant
    target = model if inplace else copy.deepcopy(model)
    if q.quantizer not in quant.QUANTIZERS:
        raise RecipeError(f"quant.quantizer {q.quantizer!r} is not a known quantizer ({', '.join(sorted(quant.QUANTIZERS))})")
    quantize_model_(target, QuantPolicy(q.bits, q.split_qkv, q.per_channel, q.edge_bits, q.quantizer))
    try:
        quant.apply_bit_overrides(target, {**q.overrides, **(overrides or {})})
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    log.info("quantized %d layers", sum(1 for m in target.modules() if isinstance(m, quant.QUANT_LAYERS)))
    return target


def calibrate(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, Any]]) -> dict[str, float]:
    """Initialise every step size (method.md §2) from FP forwards over `batches` (images or (images, labels))."""
    images = (b[0] if isinstance(b, (tuple, list)) else b for b in batches)
    device = next(model.parameters()).device
    return quant.calibrate(model, (x.to(device) for x in images))


def quant_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized layer or standalone activation quantizer: name, type, weight/act bits."""
    rows = []
    inside_layers = set()
    for name, mod in model.named_modules():
        if isinstance(mod, quant.QUANT_LAYERS):
            rows.append({"name": name, "type": type(mod).__name__, "weight_bits": mod.w_quant.spec.bits,
                         "act_bits": mod.a_quant.spec.bits if mod.a_quant is not None else None,
                         "per_channel": mod.w_quant.spec.per_channel})
            inside_layers.update({f"{name}.w_quant", f"{name}.a_quant"})
    for name, q in quant.iter_quantizers(model):
        if name not in inside_layers:
            rows.append({"name": name, "type": "activation", "weight_bits": None, "act_bits": q.spec.bits,
                         "per_channel": False})
    return rows


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], num_classes: int,
                   show_progress: bool = False, total: int | None = None, per_class: bool = False) -> dict[str, Any]:
    """Top-1, top-5 (percent), mean cross-entropy loss and sample count of `model` over `loader`.

    `per_class` adds `per_class`: per class index, its images (`n`), correct top-1 (`correct`) and
    how often it was the top-1 prediction (`predicted`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n, loss_sum, c1, c5 = 0, 0.0, 0, 0
    counts = torch.zeros(3, num_classes, dtype=torch.long)  # images, correct top-1, predicted top-1
    k = min(5, num_classes)
    try:
        for images, labels in track(loader, "evaluate", total=total, enabled=show_progress):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            if logits.shape[-1] != num_classes:
                raise DataError(f"model predicts {logits.shape[-1]} classes but the dataset has {num_classes}")
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            top = logits.topk(k, dim=-1).indices
            hit = top == labels[:, None]
            c1 += int(hit[:, 0].sum())
            c5 += int(hit.any(dim=1).sum())
            n += labels.numel()
            if per_class:
                counts[0] += torch.bincount(labels.cpu(), minlength=num_classes)
                counts[1] += torch.bincount(labels[hit[:, 0]].cpu(), minlength=num_classes)
                counts[2] += torch.bincount(top[:, 0].cpu(), minlength=num_classes)
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError("the evaluation split is empty")
    result: dict[str, Any] = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "n": n}
    if per_class:
        result["per_class"] = [{"n": int(a), "correct": int(b), "predicted": int(c)} for a, b, c in counts.T.tolist()]
    return result
