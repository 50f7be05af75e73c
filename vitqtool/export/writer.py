"""Write a quantized model as one self-describing safetensors file (packed low-bit weights + metadata).

Weights are stored as their integer codes (`w_quant.codes(W)`, packed densely by
`quant.packing`) plus the effective step, i.e. exactly the fake-quant weight `codes * step`; the
float latent weight of QAT is not stored. Steps are always float32; the other floating tensors
(LayerNorm, biases, embeddings, position tables) are stored in the dtype the caller picks.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.artifacts import ExportHeader
from ..errors import ExportFormatError
from ..fileio import atomic_write, json_default, library_versions, save_safetensors
from ..recipe import Recipe
from .digest import DIGEST_KEY, content_digest
from .formats import ExportFormat, ExportSource, ExportSummary, LoadedExport
from .layout import FORMAT_VERSION, FP_DTYPES, META_QCONFIG, META_VITQ, PACK_FORMAT, QUANT_METHOD, module_table, require_calibrated, state_map
from .packed_layout import file_scale, pack_weight
from .reader import is_vitq_export, read_export, read_header, summarize_export

log = logging.getLogger(__name__)

VERIFY_ATOL = 1e-5  # max |logit difference| between the reloaded file and the model it was written from
VERIFY_BATCHES = 2
VERIFY_BATCH_SIZE = 8


def export_model(model: nn.Module, out: str | Path, *, architecture: str, model_args: dict, data_config: dict,
                 recipe: Recipe, source: str = "", metrics: dict | None = None, dtype: str = "float32",
                 verify: bool = False, verify_inputs: Iterable[Tensor] | None = None,
                 source_info: dict | None = None) -> dict[str, Any]:
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
        source_info: recorded as is in the metadata (`source_format`, and for transformers sources
            `source_config`/`preprocessor_config`, which `export --format hf` needs later).
    Returns:
        The `inspect` summary of the written file, plus `verify` results when asked.
    Raises:
        ExportFormatError for an unknown dtype, an unprepared or uncalibrated model, or a failed verify
        (then nothing is written).
    Example:
        >>> export_model(qmodel, "m.safetensors", architecture="model_name", model_args={},
        ...              data_config=cfg, recipe=load_recipe("vaq"), dtype="float16")
    """
    if dtype not in FP_DTYPES:
        raise ExportFormatError(f"unsupported export dtype {dtype!r}; use one of {', '.join(FP_DTYPES)}")
    out = Path(out)
    tensors = export_tensors(model, FP_DTYPES[dtype])
    metadata = _metadata(model, architecture=architecture, model_args=model_args, data_config=data_config,
                         recipe=recipe, source=source, metrics=metrics, dtype=dtype, source_info=source_info)
    metadata[DIGEST_KEY] = content_digest(tensors, metadata)
    checked: dict[str, Any] | None = None

    def write(tmp: Path) -> None:
        nonlocal checked
        save_safetensors(tmp, tensors, metadata)
        if verify:
            inputs = verify_inputs if verify_inputs is not None else random_inputs(data_config)
            checked = verify_export(model, read_export(tmp).model, inputs, dtype)

    atomic_write(out, write)
    log.info("wrote %s (%d tensors)", out, len(tensors))
    return {**summarize_export(out), "verify": checked}


def export_tensors(model: nn.Module, fp_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The file's tensors for a quantized model (see `layout.state_map`); refuses uncalibrated quantizers."""
    require_calibrated(model)
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    with torch.no_grad():
        for entry in state_map(model):
            value = state[entry.state_key].detach().cpu()
            if entry.kind == "weight":
                layer = model.get_submodule(entry.state_key.rpartition(".")[0])
                if not bool(torch.isfinite(layer.weight).all()):
                    raise ExportFormatError(f"the model holds NaN or Inf in {entry.state_key}; nothing was written")
                codes = layer.w_quant.codes(layer.weight.detach()).cpu()
                tensors[entry.file_key] = pack_weight(codes, layer.w_quant.spec.bits, signed=layer.w_quant.spec.signed)
                tensors[entry.file_key.replace(".weight_packed", ".weight_shape")] = torch.tensor(list(value.shape), dtype=torch.int32)
            elif entry.kind == "scale":  # the effective scale: consumers need not know the quantizer's rules
                quantizer = model.get_submodule(entry.state_key.rpartition(".")[0])
                scale = quantizer.scale_values().float().cpu().contiguous()
                if entry.file_key.endswith(".weight_scale"):  # [1] or compressed-tensors' [out, 1, ...]
                    scale = file_scale(scale, state[entry.state_key.rpartition(".")[0].rpartition(".")[0] + ".weight"].dim())
                tensors[entry.file_key] = scale
            elif entry.kind == "offset":
                tensors[entry.file_key] = value.float().contiguous()
            elif entry.kind == "fp":
                tensors[entry.file_key] = (value.to(fp_dtype) if value.is_floating_point() else value).clone().contiguous()
    nonfinite = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if nonfinite:
        raise ExportFormatError(f"the model holds NaN or Inf in {', '.join(nonfinite[:4])}; nothing was written")
    return tensors


def _metadata(model: nn.Module, *, architecture: str, model_args: dict, data_config: dict, recipe: Recipe,
              source: str, metrics: dict | None, dtype: str, source_info: dict | None = None) -> dict[str, str]:
    layers, acts = module_table(model)
    header = ExportHeader(
        architecture=architecture, model_args=model_args, data_config=data_config, source=source, fp_dtype=dtype,
        split_qkv=recipe.quant.split_qkv, weights="codes * weight_scale (float latent weights not stored)",
        layers=layers, activations=acts, recipe=recipe.to_dict(), metrics=metrics,
        versions=library_versions("safetensors"), **(source_info or {}))
    try:
        return {"format": "pt", META_QCONFIG: json.dumps(quantization_config(model, layers)),
                META_VITQ: json.dumps(header.to_dict(), default=json_default)}
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


class SafetensorsFormat(ExportFormat):
    """The vitqtool file: packed integer codes, steps and metadata in one safetensors file (`vitqtool.load` runs it)."""

    name = "safetensors"
    dtypes = tuple(FP_DTYPES)

    def write(self, source: ExportSource, out: Path, *, dtype: str = "float32", verify: bool = False) -> ExportSummary:
        inputs = source.verify_images(VERIFY_BATCHES * VERIFY_BATCH_SIZE, VERIFY_BATCH_SIZE) if verify else []
        summary = export_model(source.model, out, architecture=source.architecture, model_args=source.model_args,
                               data_config=source.data_config, recipe=source.recipe, source=source.source,
                               metrics=source.metrics, dtype=dtype, verify=verify, verify_inputs=inputs or None,
                               source_info=source.source_info)
        return ExportSummary.from_dict(summary, self.name)

    def recognise(self, path: Path) -> bool:
        if path.is_file() and path.suffix == ".safetensors":
            try:
                read_header(path)
            except ExportFormatError:
                return True  # a damaged .safetensors file: reading it reports the damage
        return is_vitq_export(path)

    def load(self, path: Path) -> LoadedExport:
        exported = read_export(path)
        header = exported.header
        return LoadedExport(exported.model, exported.data_config, "quantized", exported.recipe, ExportSource(
            exported.model, exported.data_config, exported.recipe, header.architecture, header.model_args, header.source,
            header.metrics, header.source_info(), (header.metrics or {}).get("data")))

    def inspect(self, path: Path, check_digest: bool = True) -> ExportSummary:
        read_export(path, check_digest=check_digest)
        return ExportSummary.from_dict(summarize_export(path), self.name)
