"""`export --format hf`: a quantized model of a transformers checkpoint, written back in the transformers layout.

The folder holds:
- `config.json`: the source's config.json plus a compressed-tensors `quantization_config`
  (quant_method "compressed-tensors", format "pack-quantized", status "compressed"): one config group
  per distinct scheme of the Linear layers, targeting them by name (a regex matching both the
  saved name and the in-memory name of transformers >= 5). Its `vitqtool` section holds what that
  schema has no slot for (the softmax-output and GELU-output quantizers, the patch-embedding
  convolution's quantizers) plus what rebuilds vitqtool's model (architecture, recipe, per-module bits).
- `model.safetensors`: transformers names. Quantized Linear `L`: `L.weight_packed` (int32 codes packed
  along the input dim, `quant.packing`), `L.weight_scale` (`[1]`, or `[out, 1]` per channel),
  `L.weight_shape` (int32[2]), `L.input_scale` where the Linear's input is quantized symmetrically
  (signed, no offset), `L.output_scale` for query/key/value (vitqtool's Q/K/V quantizers); the
  attention's shared input quantizer becomes the input_scale of query, key and value. The patch
  embedding (a Conv2d, which compressed-tensors does not quantize) stores its fake-quant weight
  (codes * step, exact) as a float `weight`.
- `preprocessor_config.json`: the source's (or one written from the data config).

`read_hf_export` rebuilds vitqtool's quantized model from the folder alone; its logits equal the
exported model's. One plan (`plan`) maps every state tensor of the quantized timm model to its place,
so the writer and the reader cannot disagree.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.models import load_strict, resolve_model
from ..core.prepare import prepare
from ..errors import ExportFormatError, RecipeError, VitqError
from ..families import Family, get_family
from ..families.base import QKV_PARTS
from ..families.hf_map import TRAINING_ARGS, HFSpec, hf_view, module_names, table, timm_spec
from ..fileio import file_mode, json_default, library_versions, save_safetensors, staging_dir, translate_write_errors
from ..quant import QConv2d, QLinear, QuantAttention, Quantizer
from ..quant.packing import pack_codes, packed_length, unpack_codes
from ..recipe import Recipe, recipe_from_dict
from .digest import DIGEST_KEY, content_digest
from .digest import check_digest as digest_check
from .formats import ExportFormat, ExportSource, ExportSummary, LoadedExport
from .layout import META_QCONFIG, META_VITQ, module_table, require_calibrated
from .reader import ExportedModel, apply_table_bits, read_header
from .writer import VERIFY_BATCH_SIZE, VERIFY_BATCHES, random_inputs, verify_export

log = logging.getLogger(__name__)

FORMAT_VERSION = "1.1"  # 1.1: content digest
DIGEST_SINCE = "1.1"
LAYOUT = "transformers"
CT_METHOD = "compressed-tensors"
CT_FORMAT = "pack-quantized"
FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@dataclass
class Slot:
    """Where one state tensor of the quantized timm model lives in the export."""

    state_key: str
    kind: str                          # fp, weight, conv_weight, scale, offset or flag
    hf: tuple[str, ...] = ()           # file keys (weight: module names); several: `split` thirds or copies
    split: bool = False                # hf[i] holds the i-th third along dim 0 (fused qkv); else each holds all
    column: bool = False               # scale stored as [n, 1] (compressed-tensors channel scales)
    in_json: bool = False              # kept in quantization_config.vitqtool.tensors (no compressed-tensors slot)
    applies_to: str = ""               # for in_json quantizers: the transformers module and tensor it quantizes
    view: tuple[int, ...] | None = None  # fp: the shape transformers stores the tensor in (`Names.hf_view`)


@dataclass
class Scheme:
    """The compressed-tensors scheme of one transformers Linear."""

    weight_bits: int
    per_channel: bool
    input_bits: int | None = None
    output_bits: int | None = None
    modules: list[str] = field(default_factory=list)


def plan(model: nn.Module, spec: HFSpec) -> tuple[list[Slot], dict[str, Scheme]]:
    """Every state key of a prepared (quantized) timm model -> its Slot; plus the scheme of each transformers Linear."""
    names = table(spec)
    family = get_family(model)

    def hf_modules(path: str) -> tuple[tuple[str, ...], bool]:
        fp, index = family.stock_name(path)
        if fp not in names:
            raise ExportFormatError(f"module '{path}' has no transformers counterpart in the {spec.hf_class} key map")
        hf = names[fp].hf
        return ((hf[index],), False) if index is not None else (hf, len(hf) == 3)

    slots: list[Slot] = []
    schemes: dict[str, Scheme] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            mods, _ = hf_modules(name)
            for m in mods:
                schemes[m] = Scheme(mod.w_quant.spec.bits, mod.w_quant.spec.per_channel)
    for key in model.state_dict():
        owner, _, leaf = key.rpartition(".")
        mod = model.get_submodule(owner)
        if isinstance(mod, Quantizer):
            slots.append(_quantizer_slot(model, family, key, owner, leaf, mod, hf_modules, schemes, names))
        elif isinstance(mod, QLinear) and leaf == "weight":
            mods, split = hf_modules(owner)
            slots.append(Slot(key, "weight", mods, split=split))
        elif isinstance(mod, QConv2d) and leaf == "weight":
            mods, _ = hf_modules(owner)
            slots.append(Slot(key, "conv_weight", (f"{mods[0]}.weight",)))
        else:
            slots.append(_fp_slot(family, key, owner, leaf, names, hf_modules))
    return slots, schemes


def _fp_slot(family: Family, key: str, owner: str, leaf: str, names: dict, hf_modules) -> Slot:
    fp_key = family.stock_name(key)[0]  # a parameter row of the key map (e.g. a position-bias table)
    if fp_key in names:
        return Slot(key, "fp", names[fp_key].hf, view=names[fp_key].hf_view)
    mods, split = hf_modules(owner)
    return Slot(key, "fp", tuple(f"{m}.{leaf}" for m in mods), split=split, view=hf_view(fp_key, names))


def _quantizer_slot(model: nn.Module, family: Family, key: str, owner: str, leaf: str, q: Quantizer, hf_modules,
                    schemes: dict[str, Scheme], names: dict) -> Slot:
    parent, _, role = owner.rpartition(".")
    layer = model.get_submodule(parent) if parent else None
    bits = q.spec.bits
    role_of_state = q.state_roles()[leaf]  # "scale", "offset" or "flag"
    if role_of_state == "flag":
        return Slot(key, "flag")
    symmetric = q.spec.signed and not q.spec.learned_offset
    if role == "w_quant" and isinstance(layer, QLinear):
        mods, split = hf_modules(parent)
        per_channel = q.spec.per_channel
        return Slot(key, "scale", tuple(f"{m}.weight_scale" for m in mods), split=split and per_channel, column=per_channel)
    if role_of_state == "scale" and symmetric and role == "a_quant" and isinstance(layer, QLinear):
        mods, _ = hf_modules(parent)
        for m in mods:
            schemes[m].input_bits = bits
        return Slot(key, "scale", tuple(f"{m}.input_scale" for m in mods))
    attn_qkv = names.get(family.stock_name(parent)[0] + ".qkv")
    if role_of_state == "scale" and symmetric and attn_qkv is not None and _on_projection(layer, role):
        if role == "input_quant":
            mods, suffix = attn_qkv.hf, "input_scale"
        elif role == "qkv_quant":
            mods, suffix = attn_qkv.hf, "output_scale"
        else:
            mods, suffix = (attn_qkv.hf[QKV_PARTS.index(role[0])],), "output_scale"
        for m in mods:
            if suffix == "input_scale":
                schemes[m].input_bits = bits
            else:
                schemes[m].output_bits = bits
        return Slot(key, "scale", tuple(f"{m}.{suffix}" for m in mods))
    return Slot(key, role_of_state, in_json=True,
                applies_to=_applies_to(parent, role, layer, attn_qkv, hf_modules))


def _on_projection(attn: nn.Module | None, role: str) -> bool:
    """Whether attention quantizer `role` is the shared input or sees its projections' outputs unchanged (its
    compressed-tensors slots: q/k/v input_scale, output_scale); e.g. cosine attention's Q/K quantizers are not."""
    if not isinstance(attn, QuantAttention):
        return False
    outputs = set(attn.projection_outputs)
    return (role == "input_quant" or (role == "qkv_quant" and outputs == set(QKV_PARTS))
            or (role in (f"{n}_quant" for n in QKV_PARTS) and role[0] in outputs))


def _applies_to(parent: str, role: str, layer: nn.Module | None, attn_qkv: Any, hf_modules) -> str:
    """Human-readable transformers location of a quantizer kept in the vitqtool section."""
    if isinstance(layer, (QLinear, QConv2d)):
        mod = hf_modules(parent)[0][0]
        what = {"w_quant": "weight (stored dequantized)", "a_quant": "input"}.get(role, role)
        return f"{mod} {what}"
    if attn_qkv is not None:
        return f"{attn_qkv.hf[0].rpartition('.')[0]} {role.removesuffix('_quant')} output"
    return f"{parent}.{role}"


# --------------------------------------------------------------------------- write


def export_hf_model(model: nn.Module, out: str | Path, *, architecture: str, model_args: dict, data_config: dict,
                    recipe: Recipe, source: str, source_config: dict | None, preprocessor_config: dict | None = None,
                    metrics: dict | None = None, verify: bool = False,
                    verify_inputs: Iterable[Tensor] | None = None) -> dict[str, Any]:
    """Write a calibrated quantized model of a transformers checkpoint as a transformers folder `out`.

    Args:
        model: the quantized timm model (from `api.prepare`), every quantizer calibrated or trained.
        out: the folder to write (created; a previous export there is replaced, anything else refused).
        architecture, model_args, data_config, recipe, source, metrics: as for `export_model`.
        source_config: the source's whole transformers config.json (`LoadedModel.source_config`).
        preprocessor_config: the source's preprocessor_config.json, if it had one.
        verify: rebuild the model from the written folder and compare logits (max |diff| <= 1e-5).
    Returns:
        A summary: path, format, files, sizes, quantized layers, config groups, verify results.
    Raises:
        ExportFormatError for an uncalibrated model, a source config that does not describe this
        model, an existing folder that is not an export, or a failed verify (nothing is written then).
    Example:
        >>> export_hf_model(qmodel, "model-w4-hf", architecture=..., model_args=..., data_config=cfg,
        ...                 recipe=rec, source="org/checkpoint", source_config=loaded.source_config)
    """
    out = Path(out)
    spec = _spec(source_config, architecture, model_args)
    assert source_config is not None  # _spec refuses a model without one
    require_calibrated(model)
    slots, schemes = plan(model, spec)
    tensors, kept = _tensors(model, slots)
    layers, acts = module_table(model)
    vq = {"format_version": FORMAT_VERSION, "layout": LAYOUT, "architecture": architecture, "model_args": model_args,
          "data_config": data_config, "source": source, "source_format": "transformers", "fp_dtype": "float32",
          "split_qkv": recipe.quant.split_qkv, "recipe": recipe.to_dict(), "layers": layers, "activations": acts,
          "tensors": kept, "extra_quantizers": _extra_rows(model, slots), "metrics": metrics,
          "versions": library_versions("safetensors")}
    config = {k: v for k, v in copy.deepcopy(source_config).items() if k != "torch_dtype"}
    config["dtype"] = "float32"
    config = spec.map.export_config(config)
    config[META_QCONFIG] = {**compressed_tensors_config(schemes, spec), META_VITQ: vq}
    vq[DIGEST_KEY] = content_digest(tensors, _digested_metadata(config[META_QCONFIG]))
    preprocessor = preprocessor_config if preprocessor_config is not None else spec.map.processor_config(data_config)
    texts = {"config.json": _dumps(config)}
    if preprocessor is not None:
        texts["preprocessor_config.json"] = _dumps(preprocessor)
    _check_target(out)
    checked = None
    with translate_write_errors(out), staging_dir(out) as tmp:
        save_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        for name, text in texts.items():
            (tmp / name).write_text(text)
            os.chmod(tmp / name, file_mode())
        if verify:
            inputs = verify_inputs if verify_inputs is not None else random_inputs(data_config)
            checked = verify_export(model, read_hf_export(tmp).model, inputs, "float32")
        out.mkdir(exist_ok=True)
        for name in FILES:
            if (tmp / name).is_file():
                os.replace(tmp / name, out / name)
            elif (out / name).exists():
                (out / name).unlink()
    log.info("wrote %s (%d tensors, %d config groups)", out, len(tensors), len(config[META_QCONFIG]["config_groups"]))
    return {**summary(out), "verify": checked}


def _spec(source_config: dict | None, architecture: str, model_args: dict) -> HFSpec:
    """The key-map spec of the source config, checked against the model being exported."""
    if not isinstance(source_config, dict):
        raise ExportFormatError("--format hf needs the source's transformers config.json, and this model was not "
                                "loaded from a transformers checkpoint (source format: timm); use --format safetensors")
    try:
        spec = timm_spec({k: v for k, v in source_config.items() if k != META_QCONFIG}, "the recorded source config.json")
    except VitqError as exc:
        raise ExportFormatError(str(exc)) from None

    def structural(args: dict) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items() if k not in TRAINING_ARGS}

    if spec.architecture != architecture or structural(spec.model_args) != structural(model_args):
        raise ExportFormatError(f"the recorded source config.json describes {spec.architecture} {structural(spec.model_args)}, "
                                f"not the exported {architecture} {structural(model_args)}; the run or export was edited")
    return spec


def _tensors(model: nn.Module, slots: list[Slot]) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """The file's tensors and the JSON-kept values (by state key) of a quantized model."""
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    kept: dict[str, list[float]] = {}

    def put(keys: tuple[str, ...], value: Tensor, split: bool) -> None:
        parts = value.chunk(3, 0) if split else [value] * len(keys)
        for k, part in zip(keys, parts):
            tensors[k] = part.detach().cpu().contiguous().clone()

    with torch.no_grad():
        for slot in slots:
            value = state[slot.state_key].detach().cpu()
            if slot.kind == "flag":
                continue
            owner = slot.state_key.rpartition(".")[0]
            if slot.kind == "weight":
                layer = model.get_submodule(owner)
                spec = layer.w_quant.spec
                codes = layer.w_quant.codes(layer.weight.detach()).cpu()
                for m, part in zip(slot.hf, codes.chunk(3, 0) if slot.split else [codes]):
                    tensors[f"{m}.weight_packed"] = pack_codes(part, spec.bits, signed=spec.signed)
                    tensors[f"{m}.weight_shape"] = torch.tensor(list(part.shape), dtype=torch.int32)
                continue
            if slot.kind == "conv_weight":
                layer = model.get_submodule(owner)
                codes = layer.w_quant.codes(layer.weight.detach()).cpu().float()
                put(slot.hf, codes * layer.w_quant.scale_for(codes).detach().cpu().float(), False)
                continue
            if slot.kind == "scale":  # the effective scale (e.g. LSQ's clamped step)
                value = model.get_submodule(owner).scale_for(value.new_zeros(1)).detach().cpu().float().reshape(value.shape)
            if slot.in_json:
                kept[slot.state_key] = [float(v) for v in value.float().reshape(-1).tolist()]
            elif slot.kind == "scale":
                parts = value.chunk(3, 0) if slot.split else [value] * len(slot.hf)
                for k, part in zip(slot.hf, parts):
                    tensors[k] = part.reshape(-1, 1).contiguous().clone() if slot.column else part.reshape(-1).contiguous().clone()
            else:
                value = value.reshape(slot.view) if slot.view is not None else value
                put(slot.hf, value.float() if value.is_floating_point() else value, slot.split)
    return tensors, kept


def _extra_rows(model: nn.Module, slots: list[Slot]) -> list[dict[str, Any]]:
    """One row per quantizer kept in the vitqtool section: what it quantizes, bits, sign, step and offset keys."""
    rows = []
    for slot in slots:
        if slot.in_json and slot.kind == "scale":
            owner = slot.state_key.rpartition(".")[0]
            q = model.get_submodule(owner)
            rows.append({"quantizer": owner, "applies_to": slot.applies_to, "bits": q.spec.bits, "signed": q.spec.signed,
                         "per_channel": q.spec.per_channel, "step": slot.state_key,
                         "offset": next((f"{owner}.{k}" for k, r in q.state_roles().items() if r == "offset"), None)})
    return rows


def compressed_tensors_config(schemes: dict[str, Scheme], spec: HFSpec) -> dict[str, Any]:
    """compressed-tensors `quantization_config`: one config group per distinct Linear scheme, targets by name."""
    runtime = {h: r for row in module_names(spec) for h, r in zip(row.hf, row.runtime_names)}
    groups: dict[tuple, list[str]] = {}
    for module, s in schemes.items():
        groups.setdefault((s.weight_bits, s.per_channel, s.input_bits, s.output_bits), []).append(module)

    def act(bits: int | None) -> dict[str, Any] | None:
        return None if bits is None else {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "tensor",
                                          "dynamic": False, "group_size": None}

    config_groups = {}
    for i, (key, modules) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        wbits, per_channel, ibits, obits = key
        targets = []
        for m in modules:
            alts = [re.escape(m)] + ([re.escape(runtime[m])] if runtime.get(m, m) != m else [])
            targets.append(f"re:^(?:{'|'.join(alts)})$")
        config_groups[f"group_{i}"] = {
            "targets": targets, "format": CT_FORMAT,
            "weights": {"num_bits": wbits, "type": "int", "symmetric": True,
                        "strategy": "channel" if per_channel else "tensor", "dynamic": False, "group_size": None},
            "input_activations": act(ibits), "output_activations": act(obits),
        }
    return {"quant_method": CT_METHOD, "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None}


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_hf_export(out))):
        raise ExportFormatError(f"'{out}' exists and is not a vitqtool transformers export; choose another --out")


def _dumps(value: dict) -> str:
    try:
        return json.dumps(value, indent=2, default=json_default) + "\n"
    except (TypeError, ValueError) as exc:
        raise ExportFormatError(f"export metadata is not JSON-serialisable ({exc})") from None


# --------------------------------------------------------------------------- read


def is_hf_export(folder: str | Path) -> bool:
    """True for a folder whose config.json has a quantization_config with a vitqtool section."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        qc = json.loads(path.read_text()).get(META_QCONFIG)
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and isinstance(qc.get(META_VITQ), dict)


def read_config(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, its vitqtool section) of a transformers-layout export, checked."""
    folder = Path(folder)
    if not is_hf_export(folder):
        raise ExportFormatError(f"'{folder}' is not a vitqtool transformers export (no quantization_config.vitqtool "
                                "in config.json)")
    config = json.loads((folder / "config.json").read_text())
    qc = config[META_QCONFIG]
    vq = qc[META_VITQ]
    version = str(vq.get("format_version", ""))
    if not version.partition(".")[0].isdigit():
        raise ExportFormatError(f"'{folder}': no valid vitqtool format_version ({version!r}); re-export it")
    if int(version.partition(".")[0]) > int(FORMAT_VERSION.partition(".")[0]):
        raise ExportFormatError(f"'{folder}' uses transformers-export format {version}, newer than this vitqtool reads "
                                f"({FORMAT_VERSION}); upgrade vitqtool")
    if qc.get("quant_method") != CT_METHOD or qc.get("format") != CT_FORMAT:
        raise ExportFormatError(f"'{folder}': quantization_config is {qc.get('quant_method')!r}/{qc.get('format')!r}, "
                                f"not {CT_METHOD!r}/{CT_FORMAT!r}")
    missing = [k for k in ("architecture", "model_args", "data_config", "recipe", "layers", "activations", "tensors") if k not in vq]
    if missing:
        raise ExportFormatError(f"'{folder}': the vitqtool section lacks {', '.join(missing)}; re-export it")
    return config, vq


def _digested_metadata(qconfig: dict[str, Any]) -> dict[str, str]:
    """The metadata the content digest covers: the whole quantization_config but the digest, as canonical JSON."""
    section = {k: v for k, v in qconfig[META_VITQ].items() if k != DIGEST_KEY}
    return {META_QCONFIG: json.dumps({**qconfig, META_VITQ: section}, sort_keys=True, default=json_default)}


def read_hf_export(folder: str | Path, check_digest: bool = True) -> ExportedModel:
    """Rebuild vitqtool's quantized model from a transformers-layout export folder alone.

    Returns:
        `reader.ExportedModel` (model in eval mode, data config, recipe, metadata with the
        compressed-tensors config and the vitqtool section).
    Raises:
        ExportFormatError for a folder that is not such an export, a newer format, a content digest that
        does not match (unless `check_digest` is False), or tensors that contradict the config (missing,
        leftover, mis-shaped, disagreeing copies).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config, vq = read_config(folder)
    try:
        recipe = recipe_from_dict(vq["recipe"], where=f"recipe in '{folder}/config.json'")
    except RecipeError as exc:
        raise ExportFormatError(f"'{folder}': the recorded recipe is invalid ({exc})") from None
    source_config = {k: v for k, v in config.items() if k != META_QCONFIG}
    spec = _spec(source_config, vq["architecture"], vq["model_args"])
    try:
        tensors = load_file(str(folder / "model.safetensors"), device="cpu")
    except Exception as exc:  # missing file or damaged safetensors
        raise ExportFormatError(f"'{folder}/model.safetensors' could not be read "
                                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    model = prepare(resolve_model(vq["architecture"], random_init=True, model_args=vq["model_args"]).model, recipe, inplace=True)
    apply_table_bits(folder, model, vq)
    slots, _ = plan(model, spec)
    state = _assemble(folder, model, slots, tensors, vq["tensors"])
    try:
        load_strict(model, state, f"export '{folder}'")
    except VitqError as exc:
        raise ExportFormatError(str(exc)) from None
    # last: the structural checks above name what is wrong; the digest catches what passes them
    digest_check(folder, vq.get(DIGEST_KEY), tensors, _digested_metadata(config[META_QCONFIG]), str(vq["format_version"]),
                 DIGEST_SINCE, check=check_digest)
    model.eval()
    data_config = {k: tuple(v) if isinstance(v, list) and k != "labels" else v for k, v in vq["data_config"].items()}
    qc = {k: v for k, v in config[META_QCONFIG].items() if k != META_VITQ}
    return ExportedModel(model=model, data_config=data_config, recipe=recipe, metadata={META_QCONFIG: qc, META_VITQ: vq})


def _assemble(folder: Path, model: nn.Module, slots: list[Slot], tensors: dict[str, Tensor],
              kept: dict[str, list[float]]) -> dict[str, Tensor]:
    """The quantized model's state dict from the file's tensors and the JSON-kept values (the inverse of `_tensors`)."""
    state = model.state_dict()
    used: set[str] = set()
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in tensors:
            raise ExportFormatError(f"'{folder}/model.safetensors' lacks '{key}'; the export is damaged or was edited")
        used.add(key)
        return tensors[key]

    def gather(slot: Slot, reshape: Any = None) -> Tensor:
        parts = [take(k) for k in slot.hf]
        parts = [reshape(p) for p in parts] if reshape else parts
        if slot.split:
            return torch.cat(parts, 0)
        if any(not torch.equal(parts[0], p) for p in parts[1:]):
            raise ExportFormatError(f"'{folder}': copies of one quantizer step differ ({', '.join(slot.hf)}); the export was edited")
        return parts[0]

    for slot in slots:
        target = state[slot.state_key]
        if slot.kind == "flag":
            out[slot.state_key] = torch.ones((), dtype=torch.bool)
        elif slot.in_json:
            values = kept.get(slot.state_key)
            if values is None or len(values) != target.numel():
                raise ExportFormatError(f"'{folder}/config.json': vitqtool.tensors lacks '{slot.state_key}' "
                                        f"({target.numel()} values) or has the wrong count")
            out[slot.state_key] = torch.tensor(values, dtype=torch.float32).reshape(target.shape).to(target.dtype)
        elif slot.kind == "scale":
            out[slot.state_key] = gather(slot, lambda t: t.reshape(-1)).to(target.dtype).reshape(target.shape)
        elif slot.kind in ("fp", "conv_weight"):
            value = gather(slot).to(target.dtype)
            out[slot.state_key] = value.reshape(target.shape) if slot.view is not None else value
    for slot in slots:  # weights last: they need their layer's step
        if slot.kind != "weight":
            continue
        owner = slot.state_key.rpartition(".")[0]
        layer = model.get_submodule(owner)
        spec = layer.w_quant.spec
        codes = []
        for m in slot.hf:
            shape = [int(d) for d in take(f"{m}.weight_shape").tolist()]
            packed = take(f"{m}.weight_packed")
            if len(shape) != 2 or packed.dtype != torch.int32 or list(packed.shape) != [shape[0], packed_length(shape[1], spec.bits)]:
                raise ExportFormatError(f"'{folder}': '{m}.weight_packed' {packed.dtype}{list(packed.shape)} does not hold "
                                        f"{spec.bits}-bit codes of a {shape} weight")
            codes.append(unpack_codes(packed, spec.bits, shape[1], signed=spec.signed))
        step = out[f"{owner}.w_quant.step"].float()  # the file holds effective scales
        codes_t = torch.cat(codes, 0)
        if tuple(codes_t.shape) != tuple(layer.weight.shape):
            raise ExportFormatError(f"'{folder}': weight of '{owner}' is {list(codes_t.shape)}, the model needs {list(layer.weight.shape)}")
        step = step.view(-1, 1) if spec.per_channel else step
        out[slot.state_key] = (codes_t.float() * step).to(layer.weight.dtype)
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise ExportFormatError(f"'{folder}/model.safetensors' holds tensors the rebuilt model has no place for "
                                f"({', '.join(leftover[:4])}); the export was edited or written for another layout")
    return out


def summary(folder: str | Path) -> dict[str, Any]:
    """Sizes, layers and bits of a transformers-layout export (reads config.json and the safetensors header)."""
    folder = Path(folder)
    config, vq = read_config(folder)
    header, _ = read_header(folder / "model.safetensors")
    layers = vq["layers"]
    params = sum(math.prod(int(d) for d in row["weight_shape"]) for row in layers.values() if row["type"] != "QConv2d")
    fp_params = sum(math.prod(int(d) for d in info["shape"]) for k, info in header.items()
                    if info["dtype"] in ("F32", "F16", "BF16", "F64") and not k.endswith(("_scale",)))
    file_bytes = sum((folder / n).stat().st_size for n in FILES if (folder / n).is_file())
    fp32_bytes = 4 * (params + fp_params)
    quant = vq["recipe"].get("quant", {}) if isinstance(vq["recipe"], dict) else {}
    return {"path": str(folder), "format": "hf", "format_version": vq["format_version"], "architecture": vq["architecture"],
            "source": vq.get("source", ""), "source_format": vq.get("source_format"), "recipe": vq["recipe"].get("name"),
            "bits": quant.get("bits"), "fp_dtype": vq.get("fp_dtype", "float32"), "quantized_layers": len(layers),
            "config_groups": len(config[META_QCONFIG]["config_groups"]), "files": [n for n in FILES if (folder / n).is_file()],
            "file_bytes": file_bytes, "fp32_bytes": fp32_bytes, "compression_ratio": fp32_bytes / file_bytes,
            "digest": vq.get(DIGEST_KEY)}


class TransformersFolderFormat(ExportFormat):
    """The transformers layout of a model quantized from a transformers checkpoint: a folder transformers loads."""

    name = "hf"
    writes_folder = True

    def write(self, source: ExportSource, out: Path, *, dtype: str = "float32", verify: bool = False) -> ExportSummary:
        inputs = source.verify_images(VERIFY_BATCHES * VERIFY_BATCH_SIZE, VERIFY_BATCH_SIZE) if verify else []
        written = export_hf_model(source.model, out, architecture=source.architecture, model_args=source.model_args,
                                  data_config=source.data_config, recipe=source.recipe, source=source.source,
                                  source_config=source.source_info.get("source_config"),
                                  preprocessor_config=source.source_info.get("preprocessor_config"),
                                  metrics=source.metrics, verify=verify, verify_inputs=inputs or None)
        return ExportSummary.from_dict(written, self.name)

    def recognise(self, path: Path) -> bool:
        return path.is_dir() and is_hf_export(path)

    def load(self, path: Path) -> LoadedExport:
        exported = read_hf_export(path)
        vq = exported.metadata[META_VITQ]
        config = read_config(path)[0]
        preprocessor = path / "preprocessor_config.json"
        info = {"source_format": "transformers", "source_config": {k: v for k, v in config.items() if k != META_QCONFIG},
                "preprocessor_config": json.loads(preprocessor.read_text()) if preprocessor.is_file() else None}
        return LoadedExport(exported.model, exported.data_config, "quantized", exported.recipe, ExportSource(
            exported.model, exported.data_config, exported.recipe, vq["architecture"], vq["model_args"],
            vq.get("source", str(path)), vq.get("metrics"), {k: v for k, v in info.items() if v is not None},
            (vq.get("metrics") or {}).get("data")))

    def inspect(self, path: Path, check_digest: bool = True) -> ExportSummary:
        read_hf_export(path, check_digest=check_digest)
        return ExportSummary.from_dict(summary(path), self.name)
