"""Library verbs that sit between models/arch/quant and the commands: prepare, calibrate, evaluate."""

from __future__ import annotations

import copy
import itertools
import logging
import math
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant
from .arch import QuantPolicy, quantize_model_
from .errors import DataError, RecipeError
from .progress import track
from .recipe import Recipe, load_recipe

log = logging.getLogger(__name__)


@dataclass
class ResolvedModel:
    """Any runnable model spec: FP model, quantized run or export; `kind` is "fp", "quantized" or "onnx" (onnxruntime)."""

    model: nn.Module
    data_config: dict[str, Any]
    source: str
    kind: str
    recipe: Recipe | None = None


def resolve_any(spec: str, weights: str | Path | None = None, random_init: bool = False,
                model_args: dict | None = None, num_classes: int | None = None) -> ResolvedModel:
    """Resolve a MODEL spec, a `quantize` run folder or an `export` file to a runnable model."""
    from .models import resolve_model

    path = Path(spec)
    if path.is_dir() and (path / "run.json").is_file():
        from .train.checkpoint import load_run_model

        run = load_run_model(path)
        return ResolvedModel(run.model, run.data_config, str(path), "quantized", run.recipe)
    if path.is_file() and path.suffix == ".onnx":  # an `export --format onnx` graph, run by onnxruntime
        from .export.onnx_export import load_onnx

        onnx_model, onnx_config = load_onnx(path)
        return ResolvedModel(onnx_model, onnx_config, str(path), "onnx")
    if path.is_file() and path.suffix == ".safetensors":
        from .export import is_vitq_export, read_export

        if is_vitq_export(path):
            exported = read_export(path)
            return ResolvedModel(exported.model, exported.data_config, str(path), "quantized", exported.recipe)
    loaded = resolve_model(spec, weights=weights, random_init=random_init, model_args=model_args, num_classes=num_classes)
    return ResolvedModel(loaded.model, loaded.data_config, loaded.source, "fp")


def prepare(model: nn.Module, recipe: str | Path | Recipe = "vaq", bits: int | None = None,
            overrides: dict[str, dict[str, int]] | None = None, inplace: bool = False) -> nn.Module:
    """Rewrite an FP timm model into its quantized layout with quantizers attached (not yet calibrated).

    Args:
        model: a supported timm model (ViT/DeiT/Swin).
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
    quantize_model_(target, QuantPolicy(q.bits, q.split_qkv, q.per_channel, q.edge_bits))
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
                   show_progress: bool = False, total: int | None = None) -> dict[str, float]:
    """Top-1, top-5 (percent), mean cross-entropy loss and sample count of `model` over `loader`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n, loss_sum, c1, c5 = 0, 0.0, 0, 0
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
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError("the evaluation split is empty")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "n": n}


def evaluate(model: str | nn.Module, data: str = "builtin:mnist5k", split: str = "validation", *,
             weights: str | Path | None = None, random_init: bool = False, model_args: dict | None = None,
             num_classes: int | None = None, bits: int | None = None, recipe: str | Path | None = None, batch_size: int = 64,
             calib_batches: int | None = None, limit: int | None = None, data_config: dict | None = None,
             show_progress: bool = False) -> dict[str, Any]:
    """Top-1/top-5/loss of a model on a dataset split.

    `model` is a MODEL spec, an export (`.safetensors` written by `export`), a run folder of
    `quantize`, or an nn.Module (then `data_config` is required). With `bits` or `recipe`, an FP
    model is quantized and calibrated on training images first (post-training quantization).

    Returns a dict with top1, top5 (percent), loss, n, plus model/data/split/bits descriptions.
    """
    from .data import check_num_classes, load_dataset, make_eval_loader
    if isinstance(model, nn.Module):
        if data_config is None:
            raise ValueError("evaluate(nn.Module) needs data_config")
        net, cfg, source, kind = model, data_config, type(model).__name__, "module"
    else:
        loaded = resolve_any(str(model), weights=weights, random_init=random_init, model_args=model_args, num_classes=num_classes)
        net, cfg, source, kind = loaded.model, loaded.data_config, loaded.source, loaded.kind
    dataset = load_dataset(data, split)
    check_num_classes(dataset, cfg.get("num_classes", dataset.num_classes))
    dataset_classes = dataset.num_classes
    if limit is not None and limit < len(dataset):  # a fixed random sample, not the first (often one-class) images
        dataset = torch.utils.data.Subset(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit].tolist())
    quantized_with = None
    if bits is not None or recipe is not None:
        if kind != "fp":
            raise RecipeError("--bits/--recipe quantize an FP model; this model is already quantized")
        rec = load_recipe(recipe or "ptq", set_fields={"quant.bits": bits})
        net = prepare(net, rec)
        train_set = load_dataset(data, "train")
        n_calib = calib_batches or rec.calibration.batches
        calibrate(net, itertools.islice(make_eval_loader(train_set, cfg, batch_size), n_calib))
        quantized_with = {"recipe": rec.name, "bits": rec.quant.bits}
    loader = make_eval_loader(dataset, cfg, batch_size)
    result = evaluate_model(net, loader, dataset_classes, show_progress=show_progress, total=math.ceil(len(dataset) / batch_size))
    return {**result, "model": source, "kind": kind, "data": data, "split": split, "quantized": quantized_with}
