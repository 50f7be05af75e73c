"""The weights of a quantized model under the *source* model's names, as a compressed-tensors checkpoint.

A vitqtool export names its tensors after the rewritten model (`blocks.0.attn.q`, `...q_quant.scale`),
which a weight-only consumer cannot load into the stock timm model. This view writes one safetensors
file that compressed-tensors decompresses (`PackedQuantizationCompressor`) into a state dict that
`timm.create_model(architecture, **model_args)` loads strictly:

- every quantized Linear/Conv keeps compressed-tensors' `pack-quantized` tensors (format 2.x layout,
  `packed_layout.py`), renamed to its stock module;
- split q/k/v projections become the stock fused `qkv`: codes stacked row-wise, packed at the widest of
  the three bit widths (a narrower code is exact there too), a per-output-channel scale `[3*dim, 1]`
  that repeats each of the q, k and v steps (exact: the decompressed rows are the q, k, v weights);
  where the stock model has separate q, k, v projections (`Family.stock_name` of `q` is a whole layer),
  each keeps its own layer and the attention's shared input quantizer is the input scale of each;
- signed, offset-free Linear inputs become compressed-tensors' static `input_scale` (the shared
  attention-input quantizer is `qkv.input_scale`); activation quantizers without a compressed-tensors
  slot (Q, K, V outputs, softmax, the GELU output with its learned offset) are listed, with their
  steps and offsets, in the `vitqtool` metadata section;
- everything else (norms, biases, embeddings, position tables) is stored under its stock name.

The weights are the fake-quant weights exactly; what this view cannot carry is the activation
quantization, so the stock model computes the weight-quantized, activation-FP network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from ..core.models import load_strict, resolve_model
from ..errors import ExportFormatError
from ..families import get_family
from ..fileio import atomic_write, save_safetensors
from ..quant import QUANT_LAYERS, FusedProjections, Quantizer, iter_quantizers
from .digest import DIGEST_KEY, content_digest
from .digest import check_digest as digest_check
from .formats import ExportFormat, ExportSource, ExportSummary, LoadedExport
from .layout import FP_DTYPES, PACK_FORMAT, iter_standalone_quantizers, state_map
from .packed_layout import file_scale, pack_weight
from .reader import read_header
from .writer import VERIFY_BATCH_SIZE, VERIFY_BATCHES, export_tensors, random_inputs

VIEW_KIND = "source-names"
VIEW_VERSION = "1.1"  # 1.1: content digest
DIGEST_SINCE = "1.1"
CT_PARAMS = ("weight_packed", "weight_scale", "weight_shape", "input_scale")


def _step(q: Quantizer) -> Tensor:
    """The effective float32 scale of a quantizer, detached on the CPU."""
    return q.scale_values().float().cpu()


def _ct_input(q: Quantizer | None) -> TypeGuard[Quantizer]:
    """Whether an input quantizer means in compressed-tensors what it means here (signed, no offset, enabled)."""
    return q is not None and q.enabled and q.spec.signed and not q.spec.learned_offset


def source_view_tensors(model: nn.Module, architecture: str, model_args: dict,
                        fp_dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, compressed-tensors `quantization_config`, activation table) of the source-name view of `model`.

    Raises ExportFormatError when the stock model's state dict and the view do not match key for key.
    """
    file = export_tensors(model, fp_dtype)  # vitqtool names, 2.x layout; refuses uncalibrated models
    stock_state = resolve_model(architecture, random_init=True, model_args=model_args or None).model.state_dict()
    family = get_family(model)

    def rename(name: str) -> str:
        return family.stock_name(name)[0]

    fused = {n: m for n, m in model.named_modules() if isinstance(m, FusedProjections)}
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}  # stock layer -> scheme row
    done: set[str] = set()  # rewritten-model layers already written

    def put_layer(stock: str, codes: Tensor, bits: int, steps: Tensor, bias: Tensor | None, in_q: Quantizer | None,
                  per_channel: bool) -> None:
        tensors[f"{stock}.weight_packed"] = pack_weight(codes, bits)
        tensors[f"{stock}.weight_scale"] = file_scale(steps, codes.dim())
        tensors[f"{stock}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int32)
        if bias is not None:
            tensors[f"{stock}.bias"] = bias.detach().cpu().to(fp_dtype).contiguous()
        if _ct_input(in_q):
            tensors[f"{stock}.input_scale"] = _step(in_q).reshape(1)
        layers[stock] = {"bits": bits, "per_channel": per_channel, "act_bits": in_q.spec.bits if _ct_input(in_q) else None}

    with torch.no_grad():
        for name, mod in fused.items():
            part_names, in_quant = mod.fused_parts()
            parts = [mod.get_submodule(p) for p in part_names]
            if len(parts) > 1 and family.stock_name(f"{name}.{part_names[0]}")[1] is None:
                # the stock model keeps these projections apart (e.g. separate q, k, v): each is written as its own
                # layer, with the shared input quantizer as its input scale
                for part, layer in zip(part_names, parts):
                    put_layer(rename(f"{name}.{part}"), layer.w_quant.codes(layer.weight).cpu(), layer.w_quant.spec.bits,
                              _step(layer.w_quant), layer.bias, in_quant, layer.w_quant.spec.per_channel)
                    done.add(f"{name}.{part}")
                continue
            codes = torch.cat([p.w_quant.codes(p.weight).cpu() for p in parts])
            bits = max(p.w_quant.spec.bits for p in parts)
            if len(parts) == 1 and not parts[0].w_quant.spec.per_channel:
                steps, per_channel = _step(parts[0].w_quant).reshape(1), False
            else:  # one step per output row: each part's step repeated over its rows
                steps, per_channel = torch.cat([_step(p.w_quant).expand(p.out_features) for p in parts]), True
            biases = [p.bias for p in parts]
            bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
            if bias is None and any(b is not None for b in biases):
                raise ExportFormatError(f"'{name}': {', '.join(part_names)} disagree on having a bias; they cannot be fused")
            put_layer(rename(f"{name}.{part_names[0]}"), codes, bits, steps, bias, in_quant, per_channel)
            done.update(f"{name}.{p}" for p in part_names)
        for name, layer in model.named_modules():
            if isinstance(layer, QUANT_LAYERS) and name not in done:
                codes = layer.w_quant.codes(layer.weight).cpu()
                put_layer(rename(name), codes, layer.w_quant.spec.bits, _step(layer.w_quant), layer.bias, layer.a_quant,
                          layer.w_quant.spec.per_channel)
        layer_names = {n for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
        for entry in state_map(model):  # biases of quantized layers were written with their layer
            if entry.kind == "fp" and entry.state_key.rpartition(".")[0] not in layer_names:
                tensors[rename(entry.state_key)] = file[entry.file_key]
    _check_keys(tensors, layers, stock_state)
    return tensors, _quantization_config(layers, stock_state, model), _activation_table(model, fused)


def _check_keys(tensors: dict[str, Tensor], layers: dict[str, dict], stock_state: dict[str, Tensor]) -> None:
    """The decompressed view must hold exactly the stock state dict's keys and shapes."""
    decompressed = {k: tuple(v.shape) for k, v in tensors.items() if k.rpartition(".")[2] not in CT_PARAMS}
    for layer in layers:
        decompressed[f"{layer}.weight"] = tuple(int(d) for d in tensors[f"{layer}.weight_shape"].tolist())
    missing = sorted(set(stock_state) - set(decompressed))
    extra = sorted(set(decompressed) - set(stock_state))
    wrong = sorted(k for k in set(stock_state) & set(decompressed) if tuple(stock_state[k].shape) != decompressed[k])
    if missing or extra or wrong:
        raise ExportFormatError(f"the source-name view does not match the stock model (missing {missing[:4]}, "
                                f"unexpected {extra[:4]}, wrong shape {wrong[:4]}); this model layout is not supported by the view")


def _quantization_config(layers: dict[str, dict], stock_state: dict[str, Tensor], model: nn.Module) -> dict[str, Any]:
    """compressed-tensors `QuantizationConfig` (quant_method compressed-tensors, pack-quantized) for the stock names."""
    groups: dict[tuple, list[str]] = {}
    for name, row in layers.items():
        groups.setdefault((row["bits"], row["per_channel"], row["act_bits"]), []).append(name)
    config_groups = {}
    for i, ((bits, per_channel, act_bits), names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        config_groups[f"group_{i}"] = {
            "targets": sorted(names), "format": PACK_FORMAT,
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel" if per_channel else "tensor",
                        "dynamic": False, "group_size": None},
            "input_activations": None if act_bits is None else {
                "num_bits": act_bits, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False},
        }
    return {"quant_method": "compressed-tensors", "format": PACK_FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None}


def _activation_table(model: nn.Module, fused: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Activation quantizers compressed-tensors has no slot for, by rewritten-model name, with their step and offset."""
    shared_inputs = {id(m.fused_parts()[1]) for m in fused.values()}  # written as the projections' input_scale
    table: dict[str, dict[str, Any]] = {}

    def row(q: Quantizer, role: str) -> dict[str, Any]:
        return {"role": role, "bits": q.spec.bits, "signed": q.spec.signed, "enabled": q.enabled,
                "scale": float(_step(q)), "offset": q.offset_value()}

    for name, q in iter_standalone_quantizers(model):
        if id(q) not in shared_inputs:
            table[name] = row(q, name.rpartition(".")[2].removesuffix("_quant"))
    for name, layer in model.named_modules():
        if isinstance(layer, QUANT_LAYERS) and layer.a_quant is not None and not _ct_input(layer.a_quant):
            table[f"{name}.a_quant"] = row(layer.a_quant, "input")
    return table


def write_source_view(model: nn.Module, out: str | Path, *, architecture: str, model_args: dict, data_config: dict,
                      source: str = "", dtype: str = "float32", verify_inputs: list[Tensor] | None = None) -> dict[str, Any]:
    """Write the source-name compressed-tensors view of a calibrated quantized model to `out` (atomically).

    With `verify_inputs`, the written view is loaded into the stock model and checked against `model` first
    (`verify_source_view`); nothing is written when that fails.
    Returns a summary: path, architecture, quantized layers, file bytes, the float32 size of the stock model,
    the digest and the verify results.
    """
    if dtype not in FP_DTYPES:
        raise ExportFormatError(f"unsupported export dtype {dtype!r}; use one of {', '.join(FP_DTYPES)}")
    tensors, qconfig, acts = source_view_tensors(model, architecture, model_args, FP_DTYPES[dtype])
    meta = {"view": VIEW_KIND, "format_version": VIEW_VERSION, "architecture": architecture, "model_args": model_args,
            "data_config": data_config, "source": source, "fp_dtype": dtype, "activations": acts,
            "weights": "codes * weight_scale; activation quantization is not part of this view"}
    try:
        metadata = {"format": "pt", "quantization_config": json.dumps(qconfig), "vitqtool": json.dumps(meta, default=list)}
    except TypeError as exc:
        raise ExportFormatError(f"model_args/data_config must be JSON-serialisable ({exc})") from None
    metadata[DIGEST_KEY] = content_digest(tensors, metadata)
    checked = None

    def write(tmp: Path) -> None:
        nonlocal checked
        save_safetensors(tmp, tensors, metadata)
        if verify_inputs is not None:
            checked = verify_source_view(model, tmp, verify_inputs)

    out = Path(out)
    atomic_write(out, write)
    return {**view_summary(out), "verify": checked}


def view_summary(path: str | Path) -> dict[str, Any]:
    """Path, architecture, quantized layers, file bytes, float32 size of the stock model and digest of a view."""
    from safetensors import safe_open

    qconfig, meta = read_view_metadata(path)
    header, raw = read_header(path)
    with safe_open(str(path), "pt") as fh:
        n_params = sum(math.prod(fh.get_tensor(k).tolist()) for k in header if k.endswith(".weight_shape"))
    fp_params = sum(math.prod(info["shape"]) for k, info in header.items()
                    if k.rpartition(".")[2] not in CT_PARAMS and info["dtype"] in ("F64", "F32", "F16", "BF16"))
    file_bytes = Path(path).stat().st_size
    return {"path": str(path), "format": "compressed-tensors", "format_version": str(meta.get("format_version", "")),
            "architecture": meta["architecture"], "source": meta.get("source", ""),
            "quantized_layers": len(qconfig_targets(qconfig)), "file_bytes": file_bytes, "fp32_bytes": 4 * (n_params + fp_params),
            "compression_ratio": 4 * (n_params + fp_params) / file_bytes, "digest": raw.get(DIGEST_KEY)}


def qconfig_targets(qconfig: dict[str, Any]) -> list[str]:
    """Every target module named by a `quantization_config`'s config groups."""
    return [t for group in qconfig["config_groups"].values() for t in group["targets"]]


def read_view_metadata(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`quantization_config`, `vitqtool` section) of a source-name view; ExportFormatError for other files."""
    _, raw = read_header(path)
    try:
        qc, meta = json.loads(raw["quantization_config"]), json.loads(raw["vitqtool"])
    except (KeyError, json.JSONDecodeError):
        raise ExportFormatError(f"'{path}' is not a vitqtool source-name view (no quantization_config/vitqtool metadata)") from None
    if not isinstance(meta, dict) or meta.get("view") != VIEW_KIND:
        raise ExportFormatError(f"'{path}' is not a source-name view (write one with `vitqtool export RUN --format compressed-tensors`)")
    return qc, meta


def source_state_dict(path: str | Path, check_digest: bool = True) -> dict[str, Tensor]:
    """Decompress a source-name view with compressed-tensors into the state dict the stock timm model loads strictly.

    Raises ExportFormatError when compressed-tensors is not installed, the file is not such a view, or its content
    digest does not match (unless `check_digest` is False).
    """
    from safetensors.torch import load_file

    try:
        from compressed_tensors.compressors import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        raise ExportFormatError("reading a compressed-tensors view needs the compressed-tensors package: "
                                "pip install compressed-tensors") from None
    qc, meta = read_view_metadata(path)
    config = QuantizationConfig.model_validate(qc)
    tensors = load_file(str(path), device="cpu")
    raw = read_header(path)[1]
    digest_check(path, raw.get(DIGEST_KEY), tensors, raw, str(meta.get("format_version", "")), DIGEST_SINCE, check=check_digest)
    state: dict[str, Tensor] = {}
    for scheme in config.config_groups.values():
        for target in scheme.targets:
            params = {p: tensors.pop(f"{target}.{p}") for p in PackedQuantizationCompressor.compression_param_names(scheme)}
            tensors.pop(f"{target}.input_scale", None)
            state[f"{target}.weight"] = PackedQuantizationCompressor.decompress(params, scheme)["weight"]
    state.update({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return state


def load_source_model(path: str | Path, check_digest: bool = True) -> nn.Module:
    """The stock timm model (eval mode) with a source-name view's weights, decompressed and loaded strictly."""
    _, meta = read_view_metadata(path)
    model = resolve_model(meta["architecture"], random_init=True, model_args=meta["model_args"] or None).model
    load_strict(model, source_state_dict(path, check_digest), f"source-name view '{path}'")
    return model.eval()


@torch.no_grad()
def verify_source_view(model: nn.Module, path: str | Path, inputs: list[Tensor], atol: float = 1e-4) -> dict[str, Any]:
    """Load the view into the stock model (compressed-tensors + strict load) and compare its logits with `model`'s
    with the activation quantizers off (the network the view describes); ExportFormatError beyond `atol`."""
    stock = load_source_model(path)
    acts = [q for _, q in iter_quantizers(model) if q.kind == "act" and q.enabled]
    diff, n = 0.0, 0
    try:
        for q in acts:
            q.enabled = False
        model.eval()
        for x in inputs:
            diff = max(diff, float((stock(x) - model(x)).abs().max()))
            n += x.shape[0]
    finally:
        for q in acts:
            q.enabled = True
    if not diff <= atol:
        raise ExportFormatError(f"verify failed: the stock model with the view's weights differs by {diff:.3g} (> {atol:g}) "
                                "from the weight-quantized model")
    return {"max_abs_diff": diff, "atol": atol, "inputs": n}


class CompressedTensorsFormat(ExportFormat):
    """The weights under the stock timm names, packed as compressed-tensors stores them (a weight-only view)."""

    name = "compressed-tensors"
    dtypes = tuple(FP_DTYPES)

    def write(self, source: ExportSource, out: Path, *, dtype: str = "float32", verify: bool = False) -> ExportSummary:
        inputs = None
        if verify:
            inputs = source.verify_images(VERIFY_BATCHES * VERIFY_BATCH_SIZE, VERIFY_BATCH_SIZE) or random_inputs(source.data_config)
        written = write_source_view(source.model, out, architecture=source.architecture, model_args=source.model_args,
                                    data_config=source.data_config, source=source.source, dtype=dtype, verify_inputs=inputs)
        return ExportSummary.from_dict(written, self.name)

    def recognise(self, path: Path) -> bool:
        try:
            read_view_metadata(path)
        except ExportFormatError:
            return False
        return True

    def load(self, path: Path) -> LoadedExport:
        _, meta = read_view_metadata(path)
        data_config = {k: tuple(v) if isinstance(v, list) and k != "labels" else v for k, v in meta["data_config"].items()}
        return LoadedExport(load_source_model(path), data_config, "weight-quantized")

    def inspect(self, path: Path, check_digest: bool = True) -> ExportSummary:
        source_state_dict(path, check_digest)
        return ExportSummary.from_dict(view_summary(path), self.name)
