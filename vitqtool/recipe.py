"""Recipes: TOML data that says how to quantize and train (bits, overrides, KD, OBR, schedule).

A recipe is a built-in name (`vaq`, `lsq`, `ptq`, `ptq-recon`, files in `recipes/`) or a path to a TOML file.
Override files and CLI flags are merged on top, field by field; unknown keys and bad values are
errors that name the key. The resolved recipe is written next to every run and inside every export.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import RecipeError

KD_MODES = ("auto", "online", "stored", "none")
REPARAM_METHODS = ("none", "ln-channel")


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    """RecipeError naming the key, the rule and the value when `ok` is false."""
    if not ok:
        raise RecipeError(f"{key} must be {rule}, got {value!r}")


def _finite(value: Any, low: float = -math.inf) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def _pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_finite(v) for v in value)


@dataclass(frozen=True)
class QuantSection:
    """Bit widths and quantizer layout."""

    bits: int = 4                # weight = activation bits inside transformer blocks
    split_qkv: bool = True       # module-dependent Q/K/V steps (method.md §4)
    per_channel: bool = False    # per-output-channel weight steps
    edge_bits: int = 8           # patch embedding, head, Swin patch merging
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)  # module glob -> {weight_bits, act_bits}
    quantizer: str = "lsq"       # the registered quantizer implementation (vitqtool.quant.QUANTIZERS)

    def __post_init__(self) -> None:
        if not isinstance(self.quantizer, str) or not self.quantizer.isidentifier():
            raise RecipeError(f"quant.quantizer must be a quantizer name such as 'lsq', got {self.quantizer!r}")
        for name in ("bits", "edge_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise RecipeError(f"quant.{name} must be between 2 and 8, got {getattr(self, name)}")
        for pattern, bits in self.overrides.items():
            unknown = set(bits) - {"weight_bits", "act_bits"}
            if unknown or not bits:
                raise RecipeError(f"quant.overrides.{pattern!r}: keys must be weight_bits and/or act_bits, got {sorted(bits)}")
            for key, value in bits.items():
                if not isinstance(value, int) or not 2 <= value <= 8:
                    raise RecipeError(f"quant.overrides.{pattern!r}.{key} must be an integer from 2 to 8, got {value!r}")


@dataclass(frozen=True)
class CalibrationSection:
    """Step-size initialisation (method.md §2)."""

    batches: int = 1             # calibration batches of training images
    reparam: str = "none"        # "ln-channel": per-channel post-LayerNorm ranges folded into the norm and next layers

    def __post_init__(self) -> None:
        _check(self.batches >= 1, "calibration.batches", "an integer >= 1", self.batches)
        _check(self.reparam in REPARAM_METHODS, "calibration.reparam", f"one of {', '.join(REPARAM_METHODS)}", self.reparam)


@dataclass(frozen=True)
class ReconstructSection:
    """Block-wise reconstruction after calibration: learned rounding (AdaRound) and steps per block, QDrop optional."""

    blocks: bool = False         # reconstruct every block (segment) of the model against its FP output
    images: int = 1024           # calibration images (the first of the calibration order; fewer if the set is smaller)
    iters: int = 1000            # optimiser steps per block
    batch_size: int = 32         # images per step
    lr: float = 1e-3             # Adam lr of the rounding variables
    step_lr: float = 1e-3        # Adam lr of the steps and offsets (cosine to 0), relative: times each quantizer's step
    round_weight: float = 0.01   # weight of the rounding regulariser (pushes soft rounding to 0 or 1)
    warmup: float = 0.2          # share of the steps before the regulariser starts
    drop: float = 0.0            # QDrop: probability that an activation skips its quantizer during reconstruction

    def __post_init__(self) -> None:
        for key in ("images", "iters", "batch_size"):
            _check(getattr(self, key) >= 1, f"reconstruct.{key}", "an integer >= 1", getattr(self, key))
        for key in ("lr", "step_lr", "round_weight"):
            _check(_finite(getattr(self, key), 0.0), f"reconstruct.{key}", "a finite number >= 0", getattr(self, key))
        for key in ("warmup", "drop"):
            _check(_finite(getattr(self, key), 0.0) and getattr(self, key) < 1, f"reconstruct.{key}", "in [0, 1)", getattr(self, key))


@dataclass(frozen=True)
class TrainSection:
    """Optimiser, schedule and loop settings; `enabled = false` means calibration only (PTQ)."""

    enabled: bool = True         # false: calibration only (post-training quantization), no training
    epochs: int = 150            # passes over the training images, each image once per pass
    batch_size: int = 128        # images per optimiser step and process (each gives crops_per_image crops with stored KD)
    lr: float = 5e-4             # peak learning rate of AdamW (cosine decay to min_lr)
    weight_decay: float = 1e-4   # AdamW weight decay
    warmup_epochs: float = 0.0   # linear warmup before the cosine decay, in epochs
    min_lr: float = 0.0          # learning rate at the end of the cosine decay
    grad_clip: float = 0.0       # max gradient norm; 0 = off
    grad_accum: int = 1          # micro-batches per optimiser step (batch_size must be a multiple of it)
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/inf instead of stopping
    seed: int = 0                # seed of the data order, crops, calibration batches and random init
    num_workers: int = 0         # data-loading worker processes

    def __post_init__(self) -> None:
        for key, low in (("epochs", 0), ("batch_size", 1), ("grad_accum", 1), ("seed", 0), ("num_workers", 0)):
            _check(getattr(self, key) >= low, f"train.{key}", f"an integer >= {low}", getattr(self, key))
        for key in ("lr", "weight_decay", "warmup_epochs", "min_lr", "grad_clip"):
            _check(_finite(getattr(self, key), 0.0), f"train.{key}", "a finite number >= 0", getattr(self, key))


@dataclass(frozen=True)
class KDSection:
    """Knowledge distillation (method.md §5)."""

    mode: str = "auto"           # auto: stored soft labels if given, else online; online; stored; none
    temperature: float = 1.0     # softmax temperature of online KD (stored soft labels are used as stored)
    hard_label_weight: float = 0.0  # weight of the hard-label cross-entropy (online KD or none; 0 with stored labels)
    crops_per_image: int = 4     # stored crops each image contributes per epoch (stored KD)

    def __post_init__(self) -> None:
        if self.mode not in KD_MODES:
            raise RecipeError(f"kd.mode must be one of {', '.join(KD_MODES)}, got {self.mode!r}")
        _check(_finite(self.temperature) and self.temperature > 0, "kd.temperature", "a finite number > 0", self.temperature)
        _check(_finite(self.hard_label_weight, 0.0), "kd.hard_label_weight", "a finite number >= 0", self.hard_label_weight)
        _check(self.crops_per_image >= 1, "kd.crops_per_image", "an integer >= 1", self.crops_per_image)


@dataclass(frozen=True)
class AugmentSection:
    """Random-resized crop (+ flip) for training and for stored soft-label crops."""

    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range, fractions of the image
    ratio: tuple[float, float] = (0.75, 4 / 3)  # random-resized-crop aspect-ratio range
    hflip: bool = True           # flip each crop horizontally with probability 0.5

    def __post_init__(self) -> None:
        _check(_pair(self.scale) and 0 < self.scale[0] <= self.scale[1] <= 1, "augment.scale", "[low, high] with 0 < low <= high <= 1",
               list(self.scale))
        _check(_pair(self.ratio) and 0 < self.ratio[0] <= self.ratio[1], "augment.ratio", "[low, high] with 0 < low <= high", list(self.ratio))


@dataclass(frozen=True)
class OBRSection:
    """Oscillation-aware bin regularization (method.md §6)."""

    enabled: bool = True         # add lambda(t) * L_OBR to the training loss
    start_fraction: float = 0.25  # share of the steps with lambda = 0 before the cosine ramp starts
    max_lambda: float = 0.01     # lambda at the end of training
    modules: tuple[str, ...] = ("*",)  # globs over quantized Linear/Conv names

    def __post_init__(self) -> None:
        _check(_finite(self.start_fraction, 0.0) and self.start_fraction < 1, "obr.start_fraction", "in [0, 1)", self.start_fraction)
        _check(_finite(self.max_lambda, 0.0), "obr.max_lambda", "a finite number >= 0", self.max_lambda)
        _check(all(isinstance(m, str) and m for m in self.modules), "obr.modules", "a list of module-name globs (strings)", list(self.modules))


@dataclass(frozen=True)
class OscillationSection:
    """Oscillation tracking of integer weight codes (Nagel et al. 2022)."""

    track: bool = True           # count integer-code flips that reverse direction (EMA per weight)
    momentum: float = 1e-3       # EMA momentum of the flip frequency
    threshold: float = 0.005     # a weight oscillates when its flip EMA is above this
    freeze: bool = False         # freeze oscillating weights at their current code
    log_every: int = 50          # steps between oscillation records in metrics.jsonl

    def __post_init__(self) -> None:
        _check(_finite(self.momentum) and 0 < self.momentum <= 1, "oscillation.momentum", "in (0, 1]", self.momentum)
        _check(_finite(self.threshold, 0.0), "oscillation.threshold", "a finite number >= 0", self.threshold)
        _check(self.log_every >= 1, "oscillation.log_every", "an integer >= 1", self.log_every)

@dataclass(frozen=True)
class Recipe:
    """A whole recipe; every section has defaults so a recipe file states only what it changes."""

    name: str = "custom"
    description: str = ""
    quant: QuantSection = field(default_factory=QuantSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    reconstruct: ReconstructSection = field(default_factory=ReconstructSection)
    train: TrainSection = field(default_factory=TrainSection)
    kd: KDSection = field(default_factory=KDSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    obr: OBRSection = field(default_factory=OBRSection)
    oscillation: OscillationSection = field(default_factory=OscillationSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the shape of the TOML file."""
        return _plain(dataclasses.asdict(self))

    def to_toml(self) -> str:
        """The recipe as TOML text that `load_recipe` reads back to an equal Recipe."""
        return dump_toml(self.to_dict())


_SECTION_CLASSES = {
    "quant": QuantSection, "calibration": CalibrationSection, "reconstruct": ReconstructSection, "train": TrainSection, "kd": KDSection,
    "augment": AugmentSection, "obr": OBRSection, "oscillation": OscillationSection,
}


def builtin_recipes() -> list[str]:
    """Names of the recipes that ship with vitqtool."""
    return sorted(p.name.removesuffix(".toml") for p in resources.files("vitqtool").joinpath("recipes").iterdir() if p.name.endswith(".toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe '{path}' is a folder; pass a .toml file") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe '{path}' is not a text file (not UTF-8); pass a .toml file") from None
    except OSError as exc:
        raise RecipeError(f"recipe '{path}' cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None


def _recipe_source(name_or_path: str | Path) -> dict[str, Any]:
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text or Path(text).exists():
        return _read_toml(Path(text))
    builtin = resources.files("vitqtool").joinpath("recipes").joinpath(f"{text}.toml")
    if not builtin.is_file():
        raise RecipeError(f"unknown recipe {text!r}; built-in recipes: {', '.join(builtin_recipes())}, or pass a .toml path")
    return tomllib.loads(builtin.read_text())


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into a copy of `base` (tables merge, other values replace)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "overrides":
            out[key] = merge(out[key], value)
        elif key == "overrides" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """Build a Recipe, rejecting unknown sections and keys by name."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("name", "description"):
            kwargs[key] = str(value)
            continue
        cls = _SECTION_CLASSES.get(key)
        if cls is None:
            raise RecipeError(f"{where}: unknown section [{key}] (known: {', '.join(_SECTION_CLASSES)})")
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: [{key}] must be a table")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) in [{key}]: {', '.join(unknown)} (known: {', '.join(known)})")
        fields = {}
        for k, v in value.items():
            spec = known[k]
            if spec.default is not dataclasses.MISSING:
                default = spec.default
            elif spec.default_factory is not dataclasses.MISSING:
                default = spec.default_factory()
            else:  # every recipe field has a default; a new one without is a programming error
                raise TypeError(f"recipe field {key}.{k} has no default")
            fields[k] = _coerce(v, default, f"{key}.{k}", where)
        try:
            kwargs[key] = cls(**fields)
        except (TypeError, ValueError, RecipeError) as exc:
            raise RecipeError(f"{where}: {exc}") from None
    return Recipe(**kwargs)


def _coerce(value: Any, default: Any, key: str, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise RecipeError(f"{where}: {key} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: {key} must be a list, got {value!r}")
        kind = type(default[0]) if default else None
        if kind is float and not all(_finite(v) for v in value):
            raise RecipeError(f"{where}: {key} must be a list of finite numbers, got {value!r}")
        if kind is str and not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{where}: {key} must be a list of strings, got {value!r}")
        return tuple(float(v) if kind is float else v for v in value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: {key} must be a table, got {value!r}")
        return value
    return value


def load_recipe(name_or_path: str | Path | Recipe = "vaq", override_files: Sequence[str | Path] | None = None,
                set_fields: dict[str, Any] | None = None) -> Recipe:
    """Resolve a recipe: base file, then override files in order, then dotted fields (`{"quant.bits": 2}`).

    Raises RecipeError naming the file and key on any unknown key or bad value.
    """
    if isinstance(name_or_path, Recipe):
        data = name_or_path.to_dict()
    else:
        data = _recipe_source(name_or_path)
    where = str(name_or_path)
    for path in override_files or []:
        data = merge(data, _read_toml(Path(path)))
        where = f"{where} + {path}"
    for dotted, value in (set_fields or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        data = merge(data, {section: {key: value}} if key else {section: value})
    return recipe_from_dict(data, where)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def dump_toml(data: dict[str, Any]) -> str:
    """Write a nested dict of scalars, lists and tables as TOML (tables one level deep plus inline tables)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, table in data.items():
        if not isinstance(table, dict):
            continue
        lines += ["", f"[{_toml_key(section)}]"]
        subtables = {}
        for k, v in table.items():
            if isinstance(v, dict) and k == "overrides":
                subtables[k] = v
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subtables.items():
            lines += ["", f"[{_toml_key(section)}.{_toml_key(k)}]"]
            lines += [f"{_toml_key(p)} = {_toml_value(b)}" for p, b in v.items()]
    return "\n".join(lines) + "\n"
