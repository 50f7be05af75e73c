"""Typed file formats: run info (run.json), checkpoint state, soft-label manifest and export header.

Each is a dataclass with `to_dict`/`from_dict`, a format name and a version. `from_dict` checks the
format, refuses a newer major version in one line, and checks every field's type, so a damaged or
edited file is reported by name instead of failing later with a TypeError. The dict layouts are the
files' layouts: changing a field means a new version that still reads the old one.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from ..errors import DataError, ExportFormatError, RunError, VitqError


def _major(version: Any) -> int | None:
    text = str(version).partition(".")[0]
    return int(text) if text.isdigit() else None


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether `value` fits a simple annotation: str, int, float, bool, dict, list, Any and `X | None` unions."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    base = origin or hint
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


@dataclass
class Artifact:
    """Base of the typed formats: `FORMAT`/`VERSION` identify the file, `ERROR` is what a bad one raises."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[Any]
    ERROR: ClassVar[type[VitqError]] = VitqError
    WRITES_FORMAT: ClassVar[bool] = True  # False: the format name lives outside the dict (export header)

    def __init_subclass__(cls, format_name: str = "", version: Any = 1, error: type[VitqError] = VitqError,
                          writes_format: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.FORMAT, cls.VERSION, cls.ERROR, cls.WRITES_FORMAT = format_name, version, error, writes_format

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON document."""
        head = {"format": self.FORMAT} if self.WRITES_FORMAT else {}
        return {**head, "format_version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, document: Any, where: str) -> Any:
        """Parse and check a document read from `where` (named in every error)."""
        if not isinstance(document, dict):
            raise cls.ERROR(f"{where} is not a JSON object; the file is damaged")
        if cls.WRITES_FORMAT and document.get("format") != cls.FORMAT:
            raise cls.ERROR(f"{where} is not a {cls.FORMAT} file (format is {document.get('format')!r})")
        version = document.get("format_version", cls.VERSION if not cls.WRITES_FORMAT else None)
        major = _major(version)
        if major is None:
            raise cls.ERROR(f"{where} has an invalid format_version {version!r}; the file is damaged")
        newest = _major(cls.VERSION)
        assert newest is not None, f"{cls.__name__}.VERSION {cls.VERSION!r} is not a version"  # a class constant
        if major > newest:
            raise cls.ERROR(f"{where} has {cls.FORMAT} format version {version}, newer than this vitqtool reads "
                            f"({cls.VERSION}); upgrade vitqtool")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in document:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise cls.ERROR(f"{where} lacks the field '{f.name}'; the file is damaged")
                continue
            value = document[f.name]
            if not _type_ok(value, hints[f.name]):
                raise cls.ERROR(f"{where}: field '{f.name}' is {type(value).__name__} {value!r:.60}, "
                                f"expected {_hint_name(hints[f.name])}; the file is damaged or was edited")
            values[f.name] = value
        artifact = cls(**values)
        artifact.check(where)
        return artifact

    def check(self, where: str) -> None:
        """Checks beyond field types (ranges, nested rows); raise `ERROR` naming `where` and the field."""


_MODEL_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
_BITS = (2, 8)
_LAYER_ROW = {"type": str, "weight_shape": "shape", "weight_bits": _BITS, "per_channel": bool,
              "act_bits": (_BITS, None), "act_signed": (bool, None), "act_offset": (bool, None)}
_ACTIVATION_ROW = {"role": str, "bits": _BITS, "signed": bool, "offset": bool}


def _int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _fits(value: Any, rule: Any) -> bool:
    if isinstance(rule, tuple) and rule and rule[-1] is None:
        return value is None or _fits(value, rule[0])
    if rule == "shape":
        return isinstance(value, list) and 1 <= len(value) <= 4 and all(_int(v, 1) for v in value)
    if rule == _BITS:
        return _int(value, _BITS[0]) and value <= _BITS[1]
    return isinstance(value, rule)


def _check_row(where: str, name: str, row: Any, rules: dict[str, Any]) -> None:
    """One per-module row of the export table: a dict whose fields fit `rules` (ints in range, bools, shapes)."""
    if not isinstance(row, dict):
        raise ExportFormatError(f"{where}: {name} is not a JSON object; the metadata was edited")
    for key, rule in rules.items():
        if key not in row or not _fits(row[key], rule):
            raise ExportFormatError(f"{where}: {name}.{key} is {row.get(key)!r:.60}, which is not valid here; "
                                    "the metadata was edited")


def source_fields(artifact: Any) -> dict[str, Any]:
    """`source_format`, `source_config`, `preprocessor_config` of a RunInfo or ExportHeader, unset ones left out."""
    if artifact.source_format == "timm":
        return {}
    fields = {"source_format": artifact.source_format, "source_config": artifact.source_config,
              "preprocessor_config": artifact.preprocessor_config}
    return {k: v for k, v in fields.items() if v is not None}


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


@dataclass
class RunInfo(Artifact, format_name="vitqtool-run", version=1, error=RunError):
    """run.json of a `quantize` run folder: what was run (identity, model, data, recipe) and how far it got."""

    identity: dict
    source_model: str
    architecture: str
    model_args: dict
    data_config: dict
    data: str
    num_classes: int
    seed: int
    recipe: str
    bits: int
    kd_mode: str
    versions: dict
    status: str = "running"
    epochs_done: int = 0
    epochs: int = 0
    step: int = 0
    best_top1: float | None = None
    last_top1: float | None = None
    fused_quantizers: bool = False
    source_format: str = "timm"              # or "transformers": a converted transformers checkpoint
    source_config: dict | None = None        # transformers: the source's config.json (`export --format hf` needs it)
    preprocessor_config: dict | None = None  # transformers: its preprocessor_config.json, when present
    validation: str = ""                     # which images validated the run (a split, or a held-out slice)
    mixed_precision: str = "no"              # the precision accelerate trained in (flag, or the launcher's)
    compiled: bool = False                   # trained with `--compile` (torch.compile of the QAT model)
    calibration: dict | None = None          # what post-training did: images, reparameterization, reconstruction per block

    def source_info(self) -> dict[str, Any]:
        """The source-format fields an export records (none for a timm source)."""
        return source_fields(self)


@dataclass
class CheckpointState(Artifact, format_name="vitqtool-checkpoint", version=1, error=RunError):
    """state.pt of a checkpoint: loop position, optimizer, scaler, per-process RNG and oscillation state."""

    train: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    rng: list = field(default_factory=list)
    oscillation: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, document: Any, where: str) -> CheckpointState:
        """As `Artifact.from_dict`; checkpoints written before the format had a name are read as version 1."""
        if isinstance(document, dict) and "format" not in document:
            document = {**document, "format": cls.FORMAT, "format_version": 1}
        return super().from_dict(document, where)


@dataclass
class SoftLabelManifest(Artifact, format_name="vitqtool-softlabels", version=1, error=DataError):
    """manifest.json of a soft-label store: teacher, dataset identity, crop parameters, encoding and shards."""

    teacher: str
    teacher_input_size: list
    dataset: dict
    crops: int
    topk: int
    scale: list
    ratio: list
    hflip: bool
    seed: int
    bytes_per_crop: int
    encoding: dict
    shards: list
    indices: list | None = None  # the labelled images' indices in the split; None: its first `dataset.images`


@dataclass
class ExportHeader(Artifact, format_name="vitqtool-export", version="2.1", error=ExportFormatError, writes_format=False):
    """The `vitqtool` metadata section of an export: how to rebuild the model and its per-module table."""

    architecture: str
    model_args: dict
    data_config: dict
    recipe: dict
    layers: dict
    activations: dict
    source: str = ""
    fp_dtype: str = "float32"
    split_qkv: bool = True
    weights: str = ""
    metrics: dict | None = None
    versions: dict = field(default_factory=dict)
    source_format: str = "timm"
    source_config: dict | None = None
    preprocessor_config: dict | None = None
    format_version: str = "2.1"  # 2.x: compressed-tensors' weight layout (export/packed_layout.py); 2.1: content digest; 1.x still read

    def source_info(self) -> dict[str, Any]:
        """The source-format fields (to carry into a re-export)."""
        return source_fields(self)

    def check(self, where: str) -> None:
        """The architecture is a model name, the data config a real input, every module row well-formed."""
        bad = ExportFormatError
        if not _MODEL_NAME.fullmatch(self.architecture):
            raise bad(f"{where}: 'architecture' {self.architecture!r:.80} is not a model name; the metadata was edited")
        size = self.data_config.get("input_size")
        if not (isinstance(size, list) and len(size) == 3 and all(_int(v, 1) for v in size)):
            raise bad(f"{where}: data_config.input_size must be [channels, height, width], got {size!r:.80}")
        for name, row in self.layers.items():
            _check_row(where, f"layers.{name}", row, _LAYER_ROW)
        for name, row in self.activations.items():
            _check_row(where, f"activations.{name}", row, _ACTIVATION_ROW)

    def to_dict(self) -> dict[str, Any]:
        """The metadata document (format_version first, as files have always had it)."""
        body = dataclasses.asdict(self)
        return {"format_version": body.pop("format_version"), **body}

    @classmethod
    def from_dict(cls, document: Any, where: str) -> ExportHeader:
        """As `Artifact.from_dict`, keeping the file's own format_version."""
        header = super().from_dict(document, where)
        header.format_version = str(document.get("format_version"))
        return header
