"""Export formats as plugins: one small typed protocol, one registry, no format names in the verbs or the CLI.

Each format is an `ExportFormat` subclass in its own module that implements `write` (atomically; with
`verify`, the written file is checked against the model before it is kept), `recognise` (a cheap check
of a path: suffix or header, no tensor data), `inspect` and, for formats vitqtool can run, `load`.
`commands.py` resolves `--format NAME` with `get_format` and any path with `find_format`; `cli.py` takes
its `--format` choices and help from `FORMATS`.

The registry maps a name to a one-line summary and the plugin class (or its "module:Class" path for the
built-in formats, imported on first use), so that listing the formats (`vitqtool export --help`) imports
neither torch nor a format's dependencies. A new format is one module plus one `register_format` line.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ExportFormatError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..recipe import Recipe


@dataclass
class ExportSource:
    """What any format needs of a quantized model: the module and the metadata that rebuild and describe it."""

    model: nn.Module
    data_config: dict[str, Any]
    recipe: Recipe
    architecture: str                 # timm name that rebuilds the FP model
    model_args: dict[str, Any]        # its `timm.create_model` kwargs
    source: str = ""                  # the source model id (provenance)
    metrics: dict[str, Any] | None = None  # measured accuracy, when known
    source_info: dict[str, Any] = field(default_factory=dict)  # source_format; transformers: source_config, preprocessor_config
    data: str | None = None           # the dataset it was trained or evaluated on, when known
    # --verify images: `validation(n, batch_size)` -> up to n held-out (images, labels) in batches; None: none known
    validation: Callable[[int, int], list[tuple[Tensor, Tensor]]] | None = None

    def verify_images(self, images: int, batch_size: int) -> list[Tensor]:
        """Up to `images` held-out images in batches of `batch_size`, without labels; [] when none are known."""
        return [x for x, _ in self.validation(images, batch_size)] if self.validation is not None else []


@dataclass
class LoadedExport:
    """A runnable model rebuilt from an export, and (when it can be written again in another format) its source."""

    model: nn.Module
    data_config: dict[str, Any]
    kind: str                         # "quantized", "onnx" (run by onnxruntime) or "weight-quantized" (stock model)
    recipe: Recipe | None = None
    source: ExportSource | None = None


@dataclass
class ExportSummary:
    """What `export` wrote or `inspect` read: the fields every format has, the rest of its summary in `details`."""

    path: str
    format: str
    format_version: str
    architecture: str
    file_bytes: int
    fp32_bytes: int
    quantized_layers: int
    source: str = ""
    recipe: str | None = None
    bits: int | None = None
    digest: str | None = None         # "sha256:<hex>" over tensor data and quantization metadata; None: written before 2.1
    layers: list[dict[str, Any]] = field(default_factory=list)  # per quantized layer: name, type, bits, params, bytes
    details: dict[str, Any] = field(default_factory=dict)       # format-specific fields (metrics, versions, opset, ...)
    verify: dict[str, Any] | None = None  # what `write(..., verify=True)` measured

    COMMON: ClassVar[tuple[str, ...]] = ("path", "format", "format_version", "architecture", "file_bytes", "fp32_bytes",
                                          "quantized_layers", "source", "recipe", "bits", "digest", "layers", "verify")

    @property
    def compression_ratio(self) -> float | None:
        """float32 size of the model over the size written."""
        return self.fp32_bytes / self.file_bytes if self.file_bytes else None

    @classmethod
    def from_dict(cls, summary: dict[str, Any], format_name: str) -> ExportSummary:
        """Type a format module's summary dict (the keys it shares with every format, the rest as details)."""
        common = {k: summary[k] for k in cls.COMMON if k in summary}
        common["format"], common["format_version"] = format_name, str(summary.get("format_version", ""))
        details = {k: v for k, v in summary.items() if k not in cls.COMMON and k != "compression_ratio"}
        return cls(**{**common, "details": details})

    def with_verify(self, checked: dict[str, Any] | None) -> ExportSummary:
        """This summary with the verification results of the write that produced it."""
        return replace(self, verify=checked)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document `--json` prints: the common fields, the compression ratio and the details, flat."""
        document = {k: getattr(self, k) for k in self.COMMON}
        return {**document, "compression_ratio": self.compression_ratio, **self.details}


class ExportFormat(abc.ABC):
    """One export format: how vitqtool writes it, recognises it, reads it back and describes it."""

    name: ClassVar[str]
    writes_folder: ClassVar[bool] = False                 # `out` is a folder (else a file)
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)      # storage dtypes of the FP tensors it can write

    @abc.abstractmethod
    def write(self, source: ExportSource, out: Path, *, dtype: str = "float32", verify: bool = False) -> ExportSummary:
        """Write `source` to `out` atomically; with `verify`, reload what was written and check it against
        `source.model` before keeping it (ExportFormatError and nothing written on a mismatch)."""

    @abc.abstractmethod
    def recognise(self, path: Path) -> bool:
        """Whether `path` is (or, when damaged, claims to be) this format; reads no tensor data."""

    @abc.abstractmethod
    def inspect(self, path: Path, check_digest: bool = True) -> ExportSummary:
        """Describe an export, checked as `load` checks it (`check_digest=False` skips the content digest)."""

    def load(self, path: Path) -> LoadedExport:
        """Rebuild a runnable model from the export alone."""
        raise ExportFormatError(f"'{path}' is a {self.name} export, which vitqtool can inspect but not run")


@dataclass(frozen=True)
class FormatEntry:
    """A registered format: its one-line summary and its plugin class (or "module:Class", imported on first use)."""

    name: str
    summary: str
    plugin: type[ExportFormat] | str


FORMATS: dict[str, FormatEntry] = {}  # name -> entry, in registration order (the first is the default)


def register_format(name: str, summary: str, plugin: type[ExportFormat] | str) -> None:
    """Make a format available to `export --format NAME`, `load`, `inspect` and `evaluate`."""
    FORMATS[name] = FormatEntry(name, summary, plugin)


def get_format(name: str) -> ExportFormat:
    """The plugin of format `name`; ExportFormatError listing the known formats otherwise."""
    entry = FORMATS.get(name)
    if entry is None:
        raise ExportFormatError(f"unknown export format {name!r}; use one of {', '.join(FORMATS)}")
    plugin = entry.plugin
    if isinstance(plugin, str):
        module, _, cls = plugin.partition(":")
        plugin = getattr(importlib.import_module(module), cls)
    return plugin()


def find_format(path: str | Path) -> ExportFormat | None:
    """The format that recognises `path`, or None when no format does (a MODEL spec or a run folder)."""
    path = Path(path)
    if not path.exists():
        return None
    for name in FORMATS:
        fmt = get_format(name)
        if fmt.recognise(path):
            return fmt
    return None


register_format("safetensors", "one packed vitqtool file that `vitqtool.load` rebuilds (default)",
                "vitqtool.export.writer:SafetensorsFormat")
register_format("hf", "a transformers folder with a compressed-tensors config (models of transformers checkpoints)",
                "vitqtool.export.hf:TransformersFolderFormat")
register_format("compressed-tensors", "the weights under the source timm model's names, for compressed-tensors readers",
                "vitqtool.export.source_view:CompressedTensorsFormat")
register_format("onnx", "a QDQ graph onnxruntime runs with integer matmuls (--verify compares top-1 on validation images)",
                "vitqtool.export.onnx_export:OnnxFormat")
