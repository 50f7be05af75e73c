"""Write a quantized model as one self-describing safetensors file (packed low-bit weights + metadata).

Weights are stored as their integer codes (`w_quant.codes(W)`, packed densely by
`quant.packing`) plus the effective step, i.e. exactly the fake-quant weight `codes * step`; the
float latent weight of QAT is not stored. Steps are always float32; the other floating tensors
(LayerNorm, biases, embeddings, position tables) are stored in the dtype the caller picks.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DataError, ExportFormatError
from ..quant import QUANT_LAYERS, MIN_STEP, LSQQuantizer
from ..recipe import Recipe
from .layout import (FORMAT_VERSION, FP_DTYPES, META_QCONFIG, META_VITQ, PACK_FORMAT, QUANT_METHOD, module_table,
                     state_map)
from .packed_layout import file_scale, pack_weight

log = logging.getLogger(__name__)

VERIFY_ATOL = 1e-5  # max |logit difference| between the reloaded file and the model it was written from
VERIFY_BATCHES = 2
VERIFY_BATCH_SIZE = 8


def export_model(model: nn.Module, out: str | Path, *, architecture: str, model_args: dict, data_config: dict,
                 recipe: Recipe, source: str = "", metrics: dict | None = None, dtype: str = "float32",
                 verify: bool = False, verify_inputs: Iterable[Tensor] | None = None) -> dict[str, Any]:
    """Write a calibrated quantized model (from `api.prepare`) to `out` as a vitqtool export.

    Args:
        model: the quantized model; every quantizer must be initialised (calibrated or trained).
        out: the .safetensors file to write (atomically: a temporary file, then os.replace).
        architecture, model_args: the timm name and `create_model` kwargs that rebuild the FP model.
        data_config: the timm data config (input size, mean/std, crop) that feeds the model.
        recipe: the resolved recipe the model was prepared with (rebuilds the quantized layout).
        source: the source model id, recorded for provenance.
        metrics: measured accuracy to record (e.g. `{"top1": 71.2, "data": ..., "split": ...}`).
        dtype: storage dtype of the FP tensors: float32, float16 or bfloat16 (steps stay float32).
        verify: reload the written file and compare logits with `model` (FP tensors rounded to
            `dtype`) on `verify_inputs`, or random inputs of the model's input size.
    Returns:
        The `inspect` summary of the written file, plus `verify` results when asked.
    Raises:
        ExportFormatError for an unknown dtype, an unprepared or uncalibrated model, or a failed verify
        (then nothing is written).
    Example:
        >>> export_model(qmodel, "m.safetensors", architecture="deit_tiny_patch16_224", model_args={},
        ...              data_config=cfg, recipe=load_recipe("vaq"), dtype="float16")
    """
    from .reader import inspect, read_export

    if dtype not in FP_DTYPES:
        raise ExportFormatError(f"unsupported export dtype {dtype!r}; use one of {', '.join(FP_DTYPES)}")
    out = Path(out)
    tensors = export_tensors(model, FP_DTYPES[dtype])
    metadata = _metadata(model, architecture=architecture, model_args=model_args, data_config=data_config,
                         recipe=recipe, source=source, metrics=metrics, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    os.close(fd)
    try:
        _save(tensors, metadata, Path(tmp))
        checked = None
        if verify:
            inputs = verify_inputs if verify_inputs is not None else random_inputs(data_config)
            checked = verify_export(model, read_export(tmp).model, inputs, dtype)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d tensors)", out, len(tensors))
    return {**inspect(out), "verify": checked}


def export_tensors(model: nn.Module, fp_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The file's tensors for a quantized model (see `layout.state_map`); refuses uncalibrated quantizers."""
    quantizers = [(name, m) for name, m in model.named_modules() if isinstance(m, LSQQuantizer)]
    if not any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
        raise ExportFormatError("the model has no quantized layers; prepare and calibrate it first (vitqtool.prepare, vitqtool.calibrate)")
    uninit = [name for name, q in quantizers if not bool(q.initialized)]
    if uninit:
        raise ExportFormatError(f"quantizers were never calibrated ({', '.join(uninit[:3])}, {len(uninit)} in all); "
                                "run vitqtool.calibrate(model, batches) before exporting")
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    with torch.no_grad():
        for entry in state_map(model):
            value = state[entry.state_key].detach().cpu()
            if entry.kind == "weight":
                layer = model.get_submodule(entry.state_key.rpartition(".")[0])
                codes = layer.w_quant.codes(layer.weight.detach()).cpu()
                tensors[entry.file_key] = pack_weight(codes, layer.w_quant.spec.bits, signed=layer.w_quant.spec.signed)
                tensors[entry.file_key.replace(".weight_packed", ".weight_shape")] = torch.tensor(list(value.shape), dtype=torch.int32)
            elif entry.kind == "step":  # the effective step: forward clamps it, consumers should not have to
                tensors[entry.file_key] = value.float().clamp(min=MIN_STEP).contiguous()
                if entry.file_key.endswith(".weight_scale"):  # [1] or compressed-tensors' [out, 1, ...]
                    weight = state[entry.state_key.rpartition(".")[0].rpartition(".")[0] + ".weight"]
                    tensors[entry.file_key] = file_scale(tensors[entry.file_key], weight.dim())
            elif entry.kind == "offset":
                tensors[entry.file_key] = value.float().contiguous()
            elif entry.kind == "fp":
                tensors[entry.file_key] = (value.to(fp_dtype) if value.is_floating_point() else value).clone().contiguous()
    return tensors


def _metadata(model: nn.Module, *, architecture: str, model_args: dict, data_config: dict, recipe: Recipe,
              source: str, metrics: dict | None, dtype: str) -> dict[str, str]:
    layers, acts = module_table(model)
    vitq = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture, "model_args": model_args, "data_config": data_config, "source": source,
        "fp_dtype": dtype, "split_qkv": recipe.quant.split_qkv, "weights": "codes * weight_scale (float latent weights not stored)",
        "layers": layers, "activations": acts, "recipe": recipe.to_dict(), "metrics": metrics, "versions": _versions(),
    }
    try:
        return {"format": "pt", META_QCONFIG: json.dumps(quantization_config(model, layers)), META_VITQ: json.dumps(vitq, default=_json_default)}
    except TypeError as exc:
        raise ExportFormatError(f"model_args/data_config/metrics must be JSON-serialisable ({exc})") from None


def quantization_config(model: nn.Module, layers: dict[str, dict]) -> dict[str, Any]:
    """compressed-tensors-shaped `quantization_config`: one config group per distinct layer scheme."""
    groups: dict[tuple, list[str]] = {}
    for name, row in layers.items():
        key = (row["weight_bits"], row["per_channel"], row["act_bits"], row["act_signed"], row["act_offset"])
        groups.setdefault(key, []).append(name)
    config_groups = {}
    for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        wbits, per_channel, abits, asigned, aoffset = key
        config_groups[f"group_{i}"] = {
            "targets": names, "format": PACK_FORMAT,
            "weights": {"num_bits": wbits, "type": "int", "symmetric": True, "strategy": "channel" if per_channel else "tensor",
                        "dynamic": False, "group_size": None},
            # only signed offset-free inputs mean in compressed-tensors what they mean here (unsigned/offset: vitqtool section)
            "input_activations": None if abits is None or not asigned or aoffset else {
                "num_bits": abits, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False},
        }
    ignore = [name for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    return {"quant_method": QUANT_METHOD, "format": PACK_FORMAT, "quantization_status": "compressed",
            "version": FORMAT_VERSION, "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None}


def _save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _versions() -> dict[str, str]:
    import safetensors
    import timm

    from .. import __version__

    return {"vitqtool": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def random_inputs(data_config: dict, batches: int = VERIFY_BATCHES, batch_size: int = VERIFY_BATCH_SIZE, seed: int = 0) -> list[Tensor]:
    """Seeded standard-normal batches of the model's input size (verification when no data is known)."""
    gen = torch.Generator().manual_seed(seed)
    size = tuple(int(s) for s in data_config["input_size"])
    return [torch.randn(batch_size, *size, generator=gen) for _ in range(batches)]


@torch.no_grad()
def verify_export(model: nn.Module, reloaded: nn.Module, inputs: Iterable[Tensor], dtype: str = "float32",
                  atol: float = VERIFY_ATOL) -> dict[str, Any]:
    """Compare the reloaded model's logits with `model`'s (FP tensors rounded to `dtype`); raise beyond `atol`.

    Returns `max_abs_diff` (vs the rounded model, the checked number), `max_abs_diff_unrounded`
    (vs `model` as it is: what `dtype` costs), the tolerance and the number of inputs.
    Raises ExportFormatError when the difference exceeds `atol` or there are no inputs.
    """
    reference = copy.deepcopy(model).cpu().eval()
    fp_dtype = FP_DTYPES[dtype]
    state = reference.state_dict()
    for entry in state_map(reference):
        t = state[entry.state_key]
        if entry.kind == "fp" and t.is_floating_point():
            t.copy_(t.to(fp_dtype).to(t.dtype))
    original = copy.deepcopy(model).cpu().eval()
    reloaded.eval()
    diff = diff_unrounded = 0.0
    n = 0
    for x in inputs:
        x = x.cpu()
        logits = reloaded(x)
        diff = max(diff, float((logits - reference(x)).abs().max()))
        diff_unrounded = max(diff_unrounded, float((logits - original(x)).abs().max()))
        n += x.shape[0]
    if n == 0:
        raise ExportFormatError("verify got no inputs")
    if not diff <= atol:
        raise ExportFormatError(f"verify failed: reloaded logits differ by {diff:.3g} (> {atol:g}) from the model's; "
                                "the file was not written (rerun with VITQ_DEBUG=1 and report it)")
    log.info("verify: max |logit diff| %.3g over %d inputs (%.3g vs the unrounded model)", diff, n, diff_unrounded)
    return {"max_abs_diff": diff, "max_abs_diff_unrounded": diff_unrounded, "atol": atol, "inputs": n, "dtype": dtype}


def export(run_or_checkpoint: str | Path, out: str | Path, dtype: str = "float32", verify: bool = False,
           which: str = "best") -> dict[str, Any]:
    """Export a `quantize` run folder (checkpoint `which`: best or last), or re-export a vitqtool export, to `out`.

    `verify` reloads the file and checks its logits against the run's model on a few batches of the
    run's validation data (random inputs of the model's input size when no data is available).
    Returns the `inspect` summary of the written file plus `verify` results.
    Raises RunError / ExportFormatError naming the problem when the input is neither.
    Example:
        >>> export("runs/deit_w2", "deit_w2.safetensors", dtype="float16", verify=True)
    """
    from .reader import is_vitq_export, read_export

    path = Path(run_or_checkpoint)
    if path.is_dir():
        from ..train.checkpoint import load_run_model

        run = load_run_model(path, which)
        meta = run.meta
        top1 = meta.get("best_top1" if which == "best" else "last_top1")
        metrics = {"top1": top1, "data": meta.get("data"), "split": "validation", "checkpoint": which} if top1 is not None else None
        inputs = _run_inputs(meta.get("data"), run.data_config) if verify else None
        return export_model(run.model, out, architecture=meta["architecture"], model_args=meta.get("model_args") or {},
                            data_config=run.data_config, recipe=run.recipe, source=meta.get("source_model", str(path)),
                            metrics=metrics, dtype=dtype, verify=verify, verify_inputs=inputs)
    if path.is_file() and is_vitq_export(path):
        exported = read_export(path)
        vq = exported.metadata[META_VITQ]
        return export_model(exported.model, out, architecture=vq["architecture"], model_args=vq["model_args"],
                            data_config=exported.data_config, recipe=exported.recipe, source=vq["source"],
                            metrics=vq["metrics"], dtype=dtype, verify=verify)
    raise ExportFormatError(f"'{path}' is neither a `vitqtool quantize` run folder nor a vitqtool export; "
                            "pass the --out folder of a quantize run")


def _run_inputs(data: str | None, data_config: dict) -> list[Tensor]:
    """A few validation batches of the run's data; random inputs when the data is unknown or unavailable."""
    if data:
        from ..data import load_dataset, make_eval_loader

        try:
            loader = make_eval_loader(load_dataset(data, "validation"), data_config, VERIFY_BATCH_SIZE)
            return [images for images, _ in itertools.islice(loader, VERIFY_BATCHES)]
        except DataError as exc:
            log.warning("verify: the run's data is not available (%s); using random inputs", exc)
    return random_inputs(data_config)
