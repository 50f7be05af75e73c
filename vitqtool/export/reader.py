"""Read a vitqtool export: check it against its own metadata, rebuild the quantized model, inspect it.

The reader trusts nothing: the safetensors header is parsed by hand (truncation and corruption are
one-line `ExportFormatError`s), the format version is checked, every packed tensor's length, scale
and shape is checked against the per-module table, and the rebuilt model (timm architecture +
recipe + per-module bits) must have exactly the layout the table describes before the state is
loaded strictly.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.artifacts import ExportHeader
from ..core.models import load_strict, resolve_model
from ..core.prepare import prepare
from ..errors import ExportFormatError, RecipeError, VitqError
from ..quant import apply_bit_overrides
from ..recipe import Recipe, recipe_from_dict
from .digest import DIGEST_KEY
from .digest import check_digest as digest_check
from .layout import META_QCONFIG, META_VITQ, QUANT_METHOD, module_table, state_map
from .packed_layout import format_major, packed_shape, scale_shape, unpack_weight

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DIGEST_SINCE = "2.1"  # the first format version whose files record a content digest
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class ExportedModel:
    """A model rebuilt from an export: runnable quantized module (eval mode) plus what came with it."""

    model: nn.Module
    data_config: dict
    recipe: Recipe
    metadata: dict  # {"quantization_config": {...}, "vitqtool": {...}}

    @property
    def header(self) -> ExportHeader:
        """The typed vitqtool section of the metadata."""
        return ExportHeader.from_dict(self.metadata[META_VITQ], "export metadata")


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse a safetensors header by hand: ({tensor name: {dtype, shape, data_offsets}}, __metadata__).

    Raises ExportFormatError for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportFormatError(f"export file '{path}' does not exist")
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ExportFormatError(f"'{path}' is not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ExportFormatError(f"'{path}' is not a safetensors file or is truncated (header of {n} bytes, file of {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a map of strings")
        end = 0
        for name, v in sorted(header.items(), key=lambda kv: [int(o) for o in kv[1]["data_offsets"]]):
            if not _TENSOR_NAME.fullmatch(name):
                raise ValueError(f"tensor name {name[:80]!r} is not a module path")
            begin, stop = (int(o) for o in v["data_offsets"])
            if begin != end:
                raise ValueError(f"tensor {name!r} starts at byte {begin}, not {end} (overlapping or gapped data)")
            count = 1
            for dim in v["shape"]:
                count *= int(dim)
            if stop - begin != count * _ST_BYTES.get(v["dtype"], -1):
                raise ValueError(f"tensor {name!r} has {stop - begin} bytes for dtype {v['dtype']} and shape {v['shape']}")
            end = stop
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ExportFormatError(f"'{path}' has a corrupt safetensors header ({exc}); re-export it") from None
    if 8 + n + end > size:
        raise ExportFormatError(f"'{path}' is truncated: its header promises {end} bytes of tensor data, "
                                f"the file holds {size - 8 - n}; re-export or re-download it")
    return header, metadata


def is_vitq_export(path: str | Path) -> bool:
    """True when `path` is a safetensors file with vitqtool export metadata and not a weight view (reads the header).

    A vitqtool section that is not JSON still counts, so that reading it reports the damage.
    """
    try:
        _, metadata = read_header(path)
    except ExportFormatError:
        return False
    if META_VITQ not in metadata:
        return False
    try:
        section = json.loads(metadata[META_VITQ])
    except json.JSONDecodeError:
        return True
    return not (isinstance(section, dict) and "view" in section)


def read_metadata(path: str | Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """The header tensors and the decoded metadata (`quantization_config`, `vitqtool`) of an export, checked."""
    header, raw = read_header(path)
    return header, decode_metadata(path, header, raw)


def decode_metadata(path: str | Path, header: dict[str, dict], raw: dict[str, str]) -> dict[str, Any]:
    """The decoded, checked metadata (`quantization_config`, `vitqtool`) of an export's parsed header."""
    if META_VITQ not in raw or META_QCONFIG not in raw:
        raise ExportFormatError(f"'{path}' is not a vitqtool export (no '{META_VITQ}' metadata); "
                                "evaluate plain weights with MODEL --weights FILE instead")
    try:
        vq, qc = json.loads(raw[META_VITQ]), json.loads(raw[META_QCONFIG])
    except json.JSONDecodeError as exc:
        raise ExportFormatError(f"'{path}' has corrupt vitqtool metadata ({exc}); re-export it") from None
    export_header = ExportHeader.from_dict(vq, f"'{path}': vitqtool metadata")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ExportFormatError(f"'{path}': quantization_config.quant_method is {qc.get('quant_method') if isinstance(qc, dict) else None!r}, "
                                f"not {QUANT_METHOD!r}; this reader only loads vitqtool exports")
    vq = export_header.to_dict()
    metadata = {META_QCONFIG: qc, META_VITQ: vq}
    check_header(path, header, vq)
    recorded_recipe(path, vq)
    return metadata


def check_header(path: str | Path, header: dict[str, dict], vq: dict[str, Any]) -> None:
    """Every tensor the per-module table implies exists with the right dtype and shape (packed length, scales)."""
    def expect(key: str, dtype: str, shape: list[int], what: str) -> None:
        info = header.get(key)
        if info is None:
            raise ExportFormatError(f"'{path}' lacks tensor '{key}' ({what}); the file is damaged or its metadata was edited")
        if info["dtype"] != dtype or list(info["shape"]) != shape:
            raise ExportFormatError(f"'{path}': tensor '{key}' is {info['dtype']}{list(info['shape'])} but the metadata implies "
                                    f"{dtype}{shape} ({what}); the file is damaged or its metadata was edited")

    major = format_major(vq.get("format_version", ""))
    try:
        for name, row in vq["layers"].items():
            shape = [int(d) for d in row["weight_shape"]]
            bits = int(row["weight_bits"])
            expect(f"{name}.weight_packed", "I32", packed_shape(shape, bits, major), f"{bits}-bit codes of a {shape} weight")
            expect(f"{name}.weight_scale", "F32", scale_shape(shape, bool(row["per_channel"]), major), "weight scale")
            expect(f"{name}.weight_shape", "I32", [len(shape)], "weight shape")
            if row["act_bits"] is not None:
                expect(f"{name}.input_scale", "F32", [1], "input activation scale")
                if row["act_offset"]:
                    expect(f"{name}.input_offset", "F32", [1], "input activation offset")
        for name, row in vq["activations"].items():
            expect(f"{name}.scale", "F32", [1], f"{row['role']} activation scale")
            if row["offset"]:
                expect(f"{name}.offset", "F32", [1], f"{row['role']} activation offset")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ExportFormatError(f"'{path}': malformed per-module table in the vitqtool metadata "
                                f"({type(exc).__name__}: {exc}); re-export it") from None


def recorded_recipe(path: str | Path, vq: dict[str, Any]) -> Recipe:
    """The recipe recorded in an export's metadata, validated like a recipe file."""
    try:
        return recipe_from_dict(vq["recipe"], where=f"recipe in '{path}'")
    except RecipeError as exc:
        raise ExportFormatError(f"'{path}': the recorded recipe is invalid ({exc})") from None


def read_export(path: str | Path, check_digest: bool = True) -> ExportedModel:
    """Rebuild the quantized model of an export from the file alone (no run folder, recipe file or network).

    The content digest (format 2.1 and later) is checked unless `check_digest` is False.
    Raises:
        ExportFormatError for a file that is not a (valid) vitqtool export, has a newer major format
        version, whose content digest does not match, or whose tensors contradict its metadata;
        ModelError when timm cannot build the recorded architecture.
    Example:
        >>> exported = read_export("model_w2.safetensors"); logits = exported.model(images)
    """
    from safetensors.torch import load_file

    path = Path(path)
    header, raw = read_header(path)
    metadata = decode_metadata(path, header, raw)
    vq = metadata[META_VITQ]
    recipe = recorded_recipe(path, vq)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damage our header check missed
        raise ExportFormatError(f"'{path}' could not be read as safetensors "
                                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    try:
        loaded = resolve_model(vq["architecture"], random_init=True, model_args=vq["model_args"] or None)
    except VitqError as exc:
        raise ExportFormatError(f"'{path}': the recorded model cannot be rebuilt ({exc})") from None
    if list(loaded.data_config["input_size"]) != list(vq["data_config"]["input_size"]):
        raise ExportFormatError(f"'{path}': data_config.input_size {vq['data_config']['input_size']} does not match the "
                                f"recorded model's {list(loaded.data_config['input_size'])}; the metadata was edited")
    model = prepare(loaded.model, recipe, inplace=True)
    apply_table_bits(path, model, vq)
    state = assemble_state(path, model, tensors)
    try:
        load_strict(model, state, f"export '{path}'")
    except VitqError as exc:
        raise ExportFormatError(str(exc)) from None
    # last: the structural checks above name what is wrong; the digest catches what passes them
    digest_check(path, raw.get(DIGEST_KEY), tensors, raw, vq["format_version"], DIGEST_SINCE, check=check_digest)
    model.eval()
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in vq["data_config"].items()}
    return ExportedModel(model=model, data_config=data_config, recipe=recipe, metadata=metadata)


def apply_table_bits(path: Path, model: nn.Module, vq: dict[str, Any]) -> None:
    """Set each module's bits to the table's (they can differ from the recipe's by prepare-time overrides); check the rest."""
    built_layers, built_acts = module_table(model)
    overrides: dict[str, dict[str, int]] = {}
    for name, row in vq["layers"].items():
        built = built_layers.get(name)
        if built is not None and (built["weight_bits"], built["act_bits"]) != (row["weight_bits"], row["act_bits"]):
            overrides[name] = {"weight_bits": row["weight_bits"], **({"act_bits": row["act_bits"]} if row["act_bits"] else {})}
    for name, row in vq["activations"].items():
        if name in built_acts and built_acts[name]["bits"] != row["bits"]:
            overrides[name] = {"act_bits": row["bits"]}
    try:
        apply_bit_overrides(model, overrides)
    except ValueError as exc:
        raise ExportFormatError(f"'{path}': per-module bits do not fit the rebuilt model ({exc})") from None
    built_layers, built_acts = module_table(model)
    for kind, built, recorded in (("layer", built_layers, vq["layers"]), ("activation quantizer", built_acts, vq["activations"])):
        if set(built) != set(recorded):
            odd = sorted(set(built) ^ set(recorded))
            raise ExportFormatError(f"'{path}': the metadata's {kind}s do not match the model rebuilt from its architecture and recipe "
                                    f"(differ: {', '.join(odd[:4])}); the metadata was edited or written by another vitqtool")
        for name, row in built.items():
            if row != recorded[name]:
                diff = {k: (recorded[name].get(k), v) for k, v in row.items() if recorded[name].get(k) != v}
                raise ExportFormatError(f"'{path}': {kind} '{name}' in the metadata does not match the rebuilt model "
                                        f"(file vs rebuilt: {diff}); the metadata was edited or is inconsistent")


def layer_name(entry: Any) -> str:
    """The module a state-map entry belongs to."""
    return entry.state_key.rpartition(".")[0]


def assemble_state(path: str | Path, model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's full state dict from the file's tensors: weights = unpacked codes * scale, flags set."""
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in tensors:
            raise ExportFormatError(f"'{path}' lacks tensor '{key}' that the rebuilt model needs; the file is damaged or was edited")
        used.add(key)
        return tensors[key]

    for entry in state_map(model):
        target = state[entry.state_key]
        if entry.kind == "flag":
            out[entry.state_key] = torch.ones((), dtype=torch.bool)
            continue
        if entry.kind == "weight":
            layer = model.get_submodule(entry.state_key.rpartition(".")[0])
            scale = take(entry.file_key.replace(".weight_packed", ".weight_scale"))
            if not bool((torch.isfinite(scale) & (scale > 0)).all()):
                raise ExportFormatError(f"'{path}': weight scale of '{layer_name(entry)}' is not a positive finite number; the file is damaged")
            out[entry.state_key] = _weight(path, layer, take(entry.file_key), take(entry.file_key.replace(".weight_packed", ".weight_shape")),
                                           scale, tuple(target.shape))
            continue
        value = take(entry.file_key)
        if entry.kind == "scale" and value.numel() == target.numel():  # 2.x weight scales are [out, 1, ...]
            value = value.reshape(target.shape)
        if tuple(value.shape) != tuple(target.shape):
            raise ExportFormatError(f"'{path}': tensor '{entry.file_key}' has shape {tuple(value.shape)}, the model needs {tuple(target.shape)}")
        if value.is_floating_point() != target.is_floating_point():
            raise ExportFormatError(f"'{path}': tensor '{entry.file_key}' has dtype {value.dtype}, the model needs {target.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ExportFormatError(f"'{path}': tensor '{entry.file_key}' holds NaN or Inf; the file is damaged")
        if entry.kind == "scale" and not bool((value > 0).all()):
            raise ExportFormatError(f"'{path}': scale '{entry.file_key}' is not positive ({value.min().item():g}); the file is damaged")
        out[entry.state_key] = value.to(target.dtype)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ExportFormatError(f"'{path}' holds tensors the rebuilt model has no place for ({', '.join(unexpected[:4])}); "
                                "the file was edited or written for another layout")
    return out


def _weight(path: str | Path, layer: nn.Module, packed: Tensor, shape: Tensor, scale: Tensor, expected: tuple[int, ...]) -> Tensor:
    """`codes * scale` in the layer's dtype: exactly the fake-quant weight, which the quantizer maps to itself."""
    spec = layer.w_quant.spec
    if tuple(int(d) for d in shape.tolist()) != expected:
        raise ExportFormatError(f"'{path}': weight_shape {shape.tolist()} does not match the rebuilt layer's {list(expected)}")
    try:
        codes = unpack_weight(packed, spec.bits, expected, signed=spec.signed)
    except ValueError as exc:
        raise ExportFormatError(f"'{path}': packed weight of a {spec.bits}-bit layer {list(expected)}: {exc}") from None
    dtype = layer.weight.dtype
    step = scale.to(dtype).reshape(-1, *([1] * (len(expected) - 1)))
    return codes.to(dtype) * step


def summarize_export(path: str | Path) -> dict[str, Any]:
    """Per-module bits and sizes, compression ratio vs float32 and a metadata summary (reads only the header).

    Example:
        >>> summarize_export("model_w2.safetensors")["compression_ratio"]
    """
    path = Path(path)
    header, raw = read_header(path)
    vq = decode_metadata(path, header, raw)[META_VITQ]
    rows = []
    nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    quant_keys: set[str] = set()
    for name, row in vq["layers"].items():
        keys = [k for k in header if k.startswith(name + ".") and k[len(name) + 1:] in
                ("weight_packed", "weight_scale", "weight_shape", "input_scale", "input_offset")]
        quant_keys.update(keys)
        params = 1
        for d in row["weight_shape"]:
            params *= int(d)
        stored = sum(nbytes[k] for k in keys)
        rows.append({"name": name, "type": row["type"], "weight_bits": row["weight_bits"], "act_bits": row["act_bits"],
                     "granularity": "channel" if row["per_channel"] else "tensor", "shape": row["weight_shape"],
                     "params": params, "bytes": stored, "fp32_bytes": 4 * params, "ratio": 4 * params / stored})
    act_keys = {k for k in header if k.rpartition(".")[0] in vq["activations"]}
    fp_keys = set(header) - quant_keys - act_keys
    fp_params = sum(_numel(header[k]) for k in fp_keys if header[k]["dtype"] in ("F64", "F32", "F16", "BF16"))
    file_bytes = path.stat().st_size
    fp32_bytes = 4 * (sum(r["params"] for r in rows) + fp_params)
    recipe = vq["recipe"]
    quant = recipe.get("quant", {}) if isinstance(recipe, dict) else {}
    return {
        "path": str(path), "format_version": vq["format_version"], "architecture": vq["architecture"],
        "model_args": vq["model_args"], "source": vq.get("source", ""), "recipe": recipe.get("name") if isinstance(recipe, dict) else None,
        "bits": quant.get("bits"), "split_qkv": vq.get("split_qkv"), "per_channel": quant.get("per_channel"),
        "fp_dtype": vq.get("fp_dtype"), "metrics": vq.get("metrics"), "versions": vq.get("versions"),
        "quantized_layers": len(rows), "activation_quantizers": len(vq["activations"]),
        "quantized_params": sum(r["params"] for r in rows), "fp_params": fp_params,
        "packed_bytes": sum(r["bytes"] for r in rows), "fp_bytes": sum(nbytes[k] for k in fp_keys),
        "file_bytes": file_bytes, "fp32_bytes": fp32_bytes, "compression_ratio": fp32_bytes / file_bytes,
        "digest": raw.get(DIGEST_KEY), "layers": rows,
    }


def _numel(info: dict) -> int:
    n = 1
    for d in info["shape"]:
        n *= int(d)
    return n
