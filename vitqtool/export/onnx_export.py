"""`export --format onnx`: write the QDQ ONNX graph of a quantized model, verify it in onnxruntime, load, inspect.

The graph is the model's own forward traced by torch.onnx with each quantizer as a marker
(`onnx_trace`), lowered to QDQ for onnxruntime's integer kernels (`onnx_graph`); one mechanism for
every family, at the model's configured input size (batch dynamic). The file carries a `vitqtool`
metadata property (architecture, model args, data config, recipe, per-layer bits and kernels) so that
`vitqtool evaluate model.onnx` and `vitqtool inspect model.onnx` need nothing else. onnx and
onnxruntime are imported lazily (the `onnx` extra).
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ExportFormatError
from ..families import get_family
from ..fileio import atomic_write, library_versions
from ..quant import QUANT_LAYERS
from .digest import DIGEST_KEY, content_digest
from .digest import check_digest as digest_check
from .formats import ExportFormat, ExportSource, ExportSummary, LoadedExport
from .layout import require_calibrated, state_map
from .onnx_graph import OPSET, build_graph

log = logging.getLogger(__name__)

META_KEY = "vitqtool"
ONNX_FORMAT = "vitqtool-onnx-qdq"
ONNX_FORMAT_VERSION = "1.2"  # 1.1: one row per quantized layer (q, k, v apart) with its onnxruntime kernel; 1.2: content digest
DIGEST_SINCE = "1.2"  # the first format version whose files record a content digest
VERIFY_IMAGES = 256
VERIFY_BATCH_SIZE = 32
MIN_AGREEMENT = 99.0  # percent top-1 agreement with the torch model below which --verify fails
INTEGER_MATMULS = ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm",
                   "QLinearConv", "ConvInteger")
STAYS_FLOAT = ("float32 in the graph: norms, softmax, GELU, residual adds, biases and embeddings (vitqtool computes them in "
               "float); layers without an input quantizer and grouped convs with a float output multiply float values by "
               "weights dequantized once at session start (onnxruntime has no faster integer kernel for them)")


def _require_onnx() -> None:
    """One-line error when the `onnx` extra is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportFormatError("ONNX export and inference need onnx and onnxruntime: pip install 'vitqtool[onnx]'") from None


def onnx_session(path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None,
                 profile: bool = False):
    """An onnxruntime CPU session with all graph optimizations; `optimized_path` saves the optimized graph."""
    _require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    opts.enable_profiling = profile
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportFormatError(f"onnxruntime cannot load '{path}' ({str(exc).splitlines()[0][:200]})") from None


def _fp32_params(model: nn.Module) -> int:
    """Parameters of the FP model the quantized one was built from (weights, biases, norms, embeddings)."""
    state = model.state_dict()
    return sum(state[e.state_key].numel() for e in state_map(model) if e.kind in ("weight", "fp") and state[e.state_key].is_floating_point())


def export_onnx_model(model: nn.Module, out: str | Path, *, architecture: str, model_args: dict, data_config: dict,
                      recipe: Any = None, source: str = "", data: str | None = None, metrics: dict | None = None,
                      verify_batches: Iterable[tuple[Tensor, Tensor]] | None = None) -> dict[str, Any]:
    """Write `model` (a prepared, calibrated vitqtool model of any supported family; disabled quantizers are FP) as QDQ ONNX.

    The input is `[batch, *data_config["input_size"]]`: the model's configured size (also for a model built
    with a dynamic image size). With `verify_batches` ((images, labels) of validation images) the written
    file runs in onnxruntime against `model` and the export fails below `MIN_AGREEMENT` % top-1 agreement
    (then nothing is written). Returns the `inspect_onnx` summary plus `verify` results.
    Raises ExportFormatError for a family whose plugin refuses ONNX, a model torch.onnx cannot trace, or a failed verify.
    """
    _require_onnx()
    import onnx

    family = get_family(model)
    refusal = family.onnx_refusal_for(model)
    if refusal:
        raise ExportFormatError(f"the ONNX export does not support {type(model).__name__}: {refusal}")
    require_calibrated(model, enabled_only=True)
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    model.eval()
    input_size = tuple(int(s) for s in data_config["input_size"])
    quantized = any(isinstance(m, QUANT_LAYERS) and m.w_quant.enabled for m in model.modules())
    meta: dict[str, Any] = {
        "format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "architecture": architecture, "model_args": model_args,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}, "source": source,
        "data": data, "quantized": quantized, "opset": OPSET, "metrics": metrics, "fp32_params": _fp32_params(model),
        "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
        "versions": library_versions("torch", "onnx", "onnxruntime", "numpy"),
    }
    out = Path(out)
    checked = None

    def write(tmp: Path) -> None:
        nonlocal checked
        onnx.save(proto, str(tmp))
        if verify_batches is not None:
            checked = verify_onnx(model, tmp, verify_batches)
            if checked["top1_agreement"] < MIN_AGREEMENT:
                raise ExportFormatError(f"verify failed: onnxruntime agrees with the torch model on {checked['top1_agreement']:.2f}% "
                                        f"of top-1 predictions (< {MIN_AGREEMENT:g}%, max |logit diff| {checked['max_abs_diff']:.3g}); "
                                        "the file was not written")

    try:
        proto, tables = build_graph(model, input_size, family.onnx_requantized_convs)
        meta.update(layers=tables.layers, activations=tables.activations)
        try:
            meta = json.loads(json.dumps(meta))  # what a reader gets back (tuples as lists): the digest covers that
            meta[DIGEST_KEY] = content_digest(_initializers(proto), _digested_metadata(meta))
            entry = proto.metadata_props.add()
            entry.key, entry.value = META_KEY, json.dumps(meta)
        except TypeError as exc:
            raise ExportFormatError(f"model_args/data_config/metrics must be JSON-serialisable ({exc})") from None
        atomic_write(out, write)
    finally:
        model.train(was_training)
    log.info("wrote %s", out)
    return {**inspect_onnx(out), "verify": checked}


@torch.no_grad()
def verify_onnx(model: nn.Module, path: str | Path, batches: Iterable[tuple[Tensor, Tensor] | Tensor],
                threads: int | None = None) -> dict[str, Any]:
    """Run `path` in onnxruntime and `model` in torch on the same images: top-1 agreement (%), largest logit difference."""
    session = onnx_session(path, threads)
    model = model.eval()
    n = agree = hits_torch = hits_onnx = 0
    diff = 0.0
    for batch in batches:
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        ref = model(images.cpu()).float()
        got = torch.from_numpy(session.run(None, {"input": images.cpu().float().numpy()})[0])
        diff = max(diff, float((got - ref).abs().max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        if labels is not None:
            hits_torch += int((ref.argmax(1) == labels).sum())
            hits_onnx += int((got.argmax(1) == labels).sum())
        n += images.shape[0]
    if n == 0:
        raise ExportFormatError("verify got no images")
    return {"images": n, "top1_agreement": 100.0 * agree / n, "max_abs_diff": diff,
            "top1_torch": 100.0 * hits_torch / n, "top1_onnx": 100.0 * hits_onnx / n,
            "integer_kernels": integer_matmuls(optimized_op_counts(path))}


class OnnxModel(nn.Module):
    """An exported ONNX graph run by onnxruntime behind the nn.Module call interface (CPU, no gradients)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.session = onnx_session(path, threads)
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # evaluate() reads the device from a parameter

    def forward(self, images: Tensor) -> Tensor:
        """Logits of a batch of images (float, on the CPU)."""
        return torch.from_numpy(self.session.run(None, {"input": images.detach().cpu().float().numpy()})[0])


def _initializers(proto: Any) -> dict[str, Any]:
    """Every initializer of the graph (integer weight codes, scales, zero points, biases) as a numpy array, by name."""
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def _digested_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The metadata the content digest covers: the whole `vitqtool` entry (bits, act_bits, steps, ...) but the digest, as canonical JSON."""
    return {META_KEY: json.dumps({k: v for k, v in meta.items() if k != DIGEST_KEY}, sort_keys=True)}


def read_onnx_metadata(path: str | Path, check_digest: bool = True) -> dict[str, Any]:
    """The `vitqtool` metadata of an exported ONNX file, its content digest checked (format 1.2 and later) unless
    `check_digest` is False."""
    _require_onnx()
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportFormatError(f"ONNX file '{path}' does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ExportFormatError(f"'{path}' is not a readable ONNX file "
                                f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ExportFormatError(f"'{path}' is an ONNX file without vitqtool metadata; export it with `vitqtool export RUN --format onnx`")
    try:
        meta = json.loads(props[META_KEY])
    except json.JSONDecodeError as exc:
        raise ExportFormatError(f"'{path}' has corrupt vitqtool metadata ({exc}); re-export it") from None
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise ExportFormatError(f"'{path}': its vitqtool metadata is not a {ONNX_FORMAT} description; re-export it")
    if int(str(meta.get("format_version", "0")).partition(".")[0] or 0) > int(ONNX_FORMAT_VERSION.partition(".")[0]):
        raise ExportFormatError(f"'{path}' uses ONNX export format {meta.get('format_version')}, newer than this vitqtool reads; upgrade vitqtool")
    try:
        tensors = _initializers(proto)
    except Exception as exc:  # a damaged initializer: numpy_helper raises several types
        raise ExportFormatError(f"'{path}' has an unreadable initializer "
                                f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    digest_check(path, meta.get(DIGEST_KEY), tensors, _digested_metadata(meta), str(meta.get("format_version")), DIGEST_SINCE,
                 check=check_digest)
    meta["_initializer_bytes"] = {init.name: len(init.raw_data) or _field_bytes(init) for init in proto.graph.initializer}
    return meta


def _field_bytes(init: Any) -> int:
    from onnx import numpy_helper

    return int(numpy_helper.to_array(init).nbytes)


def load_onnx(path: str | Path, threads: int | None = None) -> tuple[OnnxModel, dict]:
    """(the runnable OnnxModel, its timm data config) of an exported ONNX file."""
    meta = read_onnx_metadata(path)
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}
    return OnnxModel(path, threads), data_config


def inspect_onnx(path: str | Path, check_digest: bool = True) -> dict[str, Any]:
    """Per-layer bits and bytes, size vs float32 and the metadata of an exported ONNX file (same keys as `inspect`);
    `check_digest=False` describes a file whose content digest does not match (forensic use)."""
    path = Path(path)
    meta = read_onnx_metadata(path, check_digest=check_digest)
    sizes = meta.pop("_initializer_bytes")
    rows = []
    for name, row in meta["layers"].items():
        params = math.prod(row["shape"])
        stored = sum(b for k, b in sizes.items() if k.startswith(name + ".") and k[len(name) + 1:].startswith(("weight", "bias")))
        rows.append({"name": name, "type": row["type"], "weight_bits": row["weight_bits"], "act_bits": row["act_bits"],
                     "granularity": "channel" if row.get("per_channel") else "tensor", "shape": row["shape"],
                     "params": params, "bytes": stored, "fp32_bytes": 4 * params, "ratio": 4 * params / stored if stored else None,
                     "kernel": row.get("kernel")})
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    quant = recipe.get("quant", {})
    file_bytes = path.stat().st_size
    fp32_bytes = 4 * int(meta.get("fp32_params") or 0)
    return {
        "path": str(path), "format": "onnx", "format_version": meta["format_version"], "architecture": meta["architecture"],
        "model_args": meta["model_args"], "source": meta.get("source", ""), "recipe": recipe.get("name"),
        "bits": quant.get("bits") if meta.get("quantized") else None, "split_qkv": quant.get("split_qkv"),
        "per_channel": quant.get("per_channel"), "fp_dtype": "float32", "metrics": meta.get("metrics"),
        "versions": meta.get("versions"), "quantized": meta.get("quantized"), "opset": meta.get("opset"),
        "quantized_layers": sum(1 for r in rows if r["weight_bits"]), "activation_quantizers": len(meta["activations"]),
        "file_bytes": file_bytes, "fp32_bytes": fp32_bytes, "compression_ratio": fp32_bytes / file_bytes if file_bytes else None,
        "input_size": meta["data_config"].get("input_size"), "data_config": meta["data_config"],
        "kernels": dict(collections.Counter(r["kernel"] for r in rows)),
        "stays_float": STAYS_FLOAT if meta.get("quantized") else "everything (no quantizer was enabled)",
        "digest": meta.get(DIGEST_KEY),
        "layers": rows,
    }


def optimized_op_counts(path: str | Path, threads: int = 1) -> collections.Counter:
    """Op types of the graph onnxruntime actually runs (its optimized graph, saved and re-read)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        onnx_session(path, threads, optimized_path=optimized)
        return collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


def integer_matmuls(counts: collections.Counter) -> int:
    """How many integer matmul/conv kernels an optimized graph's op counts hold."""
    return sum(counts[op] for op in INTEGER_MATMULS)


class OnnxFormat(ExportFormat):
    """The QDQ ONNX graph onnxruntime runs with integer kernels (`evaluate model.onnx` runs it through onnxruntime)."""

    name = "onnx"

    def write(self, source: ExportSource, out: Path, *, dtype: str = "float32", verify: bool = False) -> ExportSummary:
        batches = None
        if verify:
            batches = source.validation(VERIFY_IMAGES, VERIFY_BATCH_SIZE) if source.validation is not None else []
            if not batches:
                raise ExportFormatError("verify needs validation images and none are available")
        written = export_onnx_model(source.model.cpu().eval(), out, architecture=source.architecture,
                                    model_args=source.model_args, data_config=source.data_config, recipe=source.recipe,
                                    source=source.source, data=source.data, metrics=source.metrics, verify_batches=batches)
        return ExportSummary.from_dict(written, self.name)

    def recognise(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".onnx"

    def load(self, path: Path) -> LoadedExport:
        model, data_config = load_onnx(path)
        return LoadedExport(model, data_config, "onnx")

    def inspect(self, path: Path, check_digest: bool = True) -> ExportSummary:
        return ExportSummary.from_dict(inspect_onnx(path, check_digest=check_digest), self.name)
