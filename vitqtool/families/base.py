"""The plugin every model family implements, its registry, the quantization policy and swap helpers.

A family plugin holds everything vitqtool knows of one family: where the blocks, attention, MLPs, patch
embedding and heads are; which features the quantized layout covers (`check` refuses the rest, naming
the module and the feature); how to rewrite a model in place; how to run it block by block (fast
sensitivity); which stock module a quantized module came from (the weight views and the transformers
export); its transformers classes (config and key maps, `hf_map.TransformersMap`), if any. Families
register with the dotted names of the timm model classes they accept; shared code asks the registry
and names no family.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import ModelError
from ..quant import QConv2d, QLinear, QuantSpec
from .hf_map import UNMAPPED, TransformersMap, register_transformers

FAMILIES: dict[str, type[Family]] = {}  # "module.QualName" of an accepted timm model class -> family, filled by @register_family
QKV_PARTS = ("q", "k", "v")  # the projections a fused qkv Linear is split into (method.md §4)
# activations whose output the fc2-input quantizer (unsigned + learned offset) fits: GELU and its approximations, all
# bounded below by a small negative dip (GELU -0.170, QuickGELU x*sigmoid(1.702x) -0.164) and unbounded above
GELU_CLASSES = ("torch.nn.modules.activation.GELU", "timm.layers.activations.GELU", "timm.layers.activations.GELUTanh",
                "timm.layers.activations.QuickGELU")


@dataclass(frozen=True)
class QuantPolicy:
    """Layout-level choices a family applies (per-module bits are recipe overrides, applied after)."""

    bits: int                  # weight and activation bits inside the transformer blocks
    split_qkv: bool = True     # module-dependent Q/K/V (method.md §4); False = one fused qkv step
    per_channel: bool = False  # per-output-channel weight steps
    edge_bits: int = 8         # patch embedding, classifier head, Swin patch merging
    method: str = "lsq"        # registered quantizer implementation

    def __post_init__(self) -> None:
        for name in ("bits", "edge_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise ValueError(f"{name} must be between 2 and 8, got {getattr(self, name)}")

    def weight(self, edge: bool = False) -> QuantSpec:
        """Signed weight spec for a block (or edge) layer."""
        return QuantSpec(self.edge_bits if edge else self.bits, signed=True,
                         granularity="channel" if self.per_channel else "tensor", method=self.method)

    def act(self, edge: bool = False) -> QuantSpec:
        """Signed activation spec."""
        return QuantSpec(self.edge_bits if edge else self.bits, signed=True, method=self.method)

    def attention_args(self, stock: nn.Module, **overrides: Any) -> dict[str, Any]:
        """`QuantAttention`'s arguments for a timm-style attention (`qkv`, `proj`, `num_heads`, `scale`, `attn_drop`,
        `proj_drop`, and its `q_norm`, `k_norm` and `norm` where it has them switched on) under this policy;
        `overrides` replace (`qkv` as separate projections, `scale`, a norm) or add (outside biases, a norm the stock
        attention lacks) arguments."""
        qkv = overrides.pop("qkv") if "qkv" in overrides else stock.qkv
        scale = overrides.pop("scale") if "scale" in overrides else stock.scale
        norms = {name: getattr(stock, name) for name in ("q_norm", "k_norm", "norm") if not is_identity(getattr(stock, name, None))}
        return {"num_heads": stock.num_heads, "qkv": qkv, "proj": stock.proj, "scale": scale, "bits": self.bits,
                "split": self.split_qkv, "per_channel": self.per_channel, "attn_drop": stock.attn_drop.p,
                "proj_drop": stock.proj_drop.p, "method": self.method, **norms, **overrides}

    def gelu_out(self) -> QuantSpec:
        """GELU output (fc2 input): unsigned with a learned offset (method.md §2)."""
        return QuantSpec(self.bits, signed=False, learned_offset=True, method=self.method)


@dataclass(frozen=True)
class NormPair:
    """A norm whose output reaches only `linears`, through the one input quantizer `quantizer` (names in the quantized model).

    The norm's affine acts on the last dimension, which is the Linears' input dimension, and nothing between
    the norm and the quantizer mixes channels, so a per-channel scale folds exactly into the norm and the
    Linears (`quant/reparam.py`). `shift` is False where something in between (zero padding) would not
    commute with a per-channel shift, leaving a scale-only fold.
    """

    norm: str
    quantizer: str
    linears: tuple[str, ...]
    shift: bool = True


class Family(abc.ABC):
    """One model family: its allow-list, quantized rewrite, block-by-block execution and stock names."""

    name: ClassVar[str]
    patterns: ClassVar[tuple[str, ...]]  # timm model-name globs of the family, for messages
    transformers: ClassVar[tuple[TransformersMap, ...]] = ()  # its transformers classes (none: not loadable from one)
    unmapped: ClassVar[tuple[tuple[str, str], ...]] = ()  # (transformers class, why no timm model computes it): refused by name
    # ONNX export: it traces the model's own forward, so a family needs nothing for it; a family that cannot be
    # exported yet says why here, in one line (`export --format onnx` refuses it with that reason)
    onnx_refusal: ClassVar[str | None] = None
    # False: a quantized conv whose output feeds a quantizer runs as ConvInteger with its bias added in float (exact)
    # instead of QLinearConv, whose int32 bias rounding can move requantized codes of a model too sensitive for it
    onnx_requantized_convs: ClassVar[bool] = True

    @abc.abstractmethod
    def check(self, model: nn.Module) -> None:
        """Refuse (ModelError naming module and feature) anything the quantized layout does not implement."""

    @abc.abstractmethod
    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        """Rewrite `model` in place into the quantized layout (after `check`)."""

    @abc.abstractmethod
    def block_names(self, model: nn.Module) -> list[str]:
        """Names of the segments `block_inputs`/`run_from` index, in execution order."""

    @abc.abstractmethod
    def block_inputs(self, model: nn.Module, images: Tensor) -> list[Tensor]:
        """The input of every segment, then the input of the tail (norm + head), from one forward pass."""

    @abc.abstractmethod
    def run_from(self, model: nn.Module, index: int, hidden: Tensor) -> Tensor:
        """Logits from the input of segment `index` (`len(block_names)` = the tail)."""

    def convert_checkpoint(self, model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A weights file in another published layout of the family (e.g. its authors' code) under `model`'s names.

        The default, for families without one: unchanged. Loading stays strict after the conversion.
        """
        return dict(state_dict)

    @classmethod
    def for_model(cls, model: nn.Module) -> Family:
        """The family instance for `model` (stock or rewritten); a family whose stock names depend on the model's
        configuration reads it here."""
        return cls()

    def stock_name(self, path: str) -> tuple[str, int | None]:
        """The stock (FP timm) name of a quantized-layout module or state key, and which third of it (q, k, v) or None.

        The default covers rewrites that keep module paths and split a fused `qkv` Linear into `q`, `k`, `v`
        siblings; a family whose rewrite nests modules differently overrides it.
        """
        head, _, leaf = path.rpartition(".")
        if leaf in QKV_PARTS:
            return f"{head}.qkv" if head else "qkv", QKV_PARTS.index(leaf)
        return path, None

    def onnx_refusal_for(self, model: nn.Module) -> str | None:
        """Why `model` (stock or rewritten) cannot be exported to ONNX, in one line, or None; by default the family's
        `onnx_refusal`. A family that exports except in some configurations names them here."""
        return self.onnx_refusal

    def fp_layers(self, model: nn.Module) -> frozenset[str]:
        """Linear/Conv2d layers the quantized layout keeps in FP on purpose (the family's docs say why); none by default."""
        return frozenset()

    # ---- post-training quantization (core/ptq.py); family knowledge, kept apart from the layout methods above

    def norm_pairs(self, model: nn.Module) -> list[NormPair]:
        """The norm -> input quantizer -> Linear pairs of the quantized `model` that `ln-channel` reparameterizes; none by default."""
        return []


def stage_segments(model: nn.Module, attr: str) -> list[tuple[str, nn.Module]]:
    """Each stage's downsampling layer (when present) and then its blocks: `attr.i.downsample`, `attr.i.blocks.j`."""
    out: list[tuple[str, nn.Module]] = []
    for si, stage in enumerate(getattr(model, attr)):
        if not is_identity(stage.downsample):
            out.append((f"{attr}.{si}.downsample", stage.downsample))
        out += [(f"{attr}.{si}.blocks.{bi}", block) for bi, block in enumerate(stage.blocks)]
    return out


class SegmentedFamily(Family):
    """A family that runs as stem -> segments in sequence -> tail (Swin, CNNs): block-by-block execution from those three.

    By default the timm stage layout: `stem_attr` module, then each stage of `stages_attr` (its downsampling
    layer, then its blocks), then `pre_head_attr` module and `forward_head`; a family with another layout
    overrides `segments`, `stem` and `tail`.
    """

    stem_attr: ClassVar[str] = "stem"
    stages_attr: ClassVar[str] = "stages"
    pre_head_attr: ClassVar[str] = "norm_pre"

    def segments(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of every segment, in execution order."""
        return stage_segments(model, self.stages_attr)

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        """The input of the first segment."""
        return getattr(model, self.stem_attr)(images)

    def tail(self, model: nn.Module, hidden: Tensor) -> Tensor:
        """Logits from the output of the last segment."""
        return model.forward_head(getattr(model, self.pre_head_attr)(hidden))

    def block_names(self, model: nn.Module) -> list[str]:
        return [name for name, _ in self.segments(model)]

    def block_inputs(self, model: nn.Module, images: Tensor) -> list[Tensor]:
        x = self.stem(model, images)
        hidden = []
        for _, segment in self.segments(model):
            hidden.append(x)
            x = segment(x)
        return [*hidden, x]

    def run_from(self, model: nn.Module, index: int, hidden: Tensor) -> Tensor:
        for _, segment in self.segments(model)[index:]:
            hidden = segment(hidden)
        return self.tail(model, hidden)


def register_family(*model_classes: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: the family handles timm models whose class is exactly one of `model_classes` ("module.QualName").

    Its transformers classes (`Family.transformers`) become loadable at the same time.
    """
    def add(cls: type[Family]) -> type[Family]:
        for name in model_classes:
            FAMILIES[name] = cls
        for hf in cls.transformers:
            register_transformers(hf)
        UNMAPPED.update(cls.unmapped)
        return cls
    return add


def class_name(obj: object) -> str:
    """`module.QualName` of an object's class, the key families register under."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def get_family(model: nn.Module) -> Family:
    """The family registered for `model`'s class; ModelError listing the supported families otherwise."""
    family = FAMILIES.get(class_name(model))
    if family is None:
        supported = ", ".join(dict.fromkeys(p for f in FAMILIES.values() for p in f.patterns))
        raise ModelError(f"model class {type(model).__name__} is not a supported family (supported timm architectures: {supported})")
    return family.for_model(model)


def convert_checkpoint(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` under `model`'s own names when its family knows the file's layout; unchanged otherwise."""
    family = FAMILIES.get(class_name(model))
    return family().convert_checkpoint(model, state_dict) if family is not None else dict(state_dict)


def quantize_model_(model: nn.Module, policy: QuantPolicy) -> nn.Module:
    """Check `model` against its family's allow-list, then rewrite it in place into the quantized layout."""
    family = get_family(model)
    family.check(model)
    family.quantize_(model, policy)
    check_fully_quantized(model, family.fp_layers(model))
    return model


def quantize_linear(parent: nn.Module, attr: str, wspec: QuantSpec, aspec: QuantSpec | None) -> None:
    """Swap `parent.attr` (an nn.Linear) for a QLinear sharing its parameters."""
    linear = getattr(parent, attr)
    if type(linear) is not nn.Linear:
        raise ModelError(f"expected nn.Linear at '{attr}', found {type(linear).__name__}")
    setattr(parent, attr, QLinear.from_float(linear, wspec, aspec))


def quantize_conv(parent: nn.Module, attr: str, wspec: QuantSpec, aspec: QuantSpec | None) -> None:
    """Swap `parent.attr` (an nn.Conv2d) for a QConv2d sharing its parameters."""
    conv = getattr(parent, attr)
    if type(conv) is not nn.Conv2d:
        raise ModelError(f"expected nn.Conv2d at '{attr}', found {type(conv).__name__}")
    setattr(parent, attr, QConv2d.from_float(conv, wspec, aspec))


def quantize_mlp(mlp: nn.Module, policy: QuantPolicy) -> None:
    """A `check_mlp` MLP: fc1 reads a norm's output or the residual stream (signed), fc2 the GELU's (unsigned + offset)."""
    quantize_linear(mlp, "fc1", policy.weight(), policy.act())
    quantize_linear(mlp, "fc2", policy.weight(), policy.gelu_out())


def check_fully_quantized(model: nn.Module, keep: frozenset[str] = frozenset()) -> None:
    """Fail loudly, naming the module, if any float Linear/Conv2d (or subclass, e.g. timm's StdConv2d) outside `keep`
    was left behind by a rewrite."""
    left = [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, (QLinear, QConv2d)) and name not in keep]
    if left:
        raise ModelError(f"these layers have no quantization rule in the family and would stay float: {', '.join(left[:8])}")


def require(condition: bool, where: str, feature: str) -> None:
    """Refuse a model feature the quantized layout does not implement, naming the module and the feature."""
    if not condition:
        raise ModelError(f"{where}: {feature} is not supported by the quantized layout")


def require_gelu(act: nn.Module, where: str) -> None:
    """Refuse an MLP activation other than GELU and its approximations: fc2's input quantizer (unsigned + learned
    offset, method.md §2) fits their output only."""
    require(class_name(act) in GELU_CLASSES, where, f"activation {type(act).__name__} (the GELU-output quantizer needs GELU, "
            "GELU-tanh or QuickGELU)")


def is_identity(module: nn.Module | None) -> bool:
    """True for a missing module or nn.Identity (an optional feature that is switched off)."""
    return module is None or isinstance(module, nn.Identity)


def check_mlp(mlp: nn.Module, where: str) -> None:
    """The MLP the rewrite assumes: timm Mlp, Linear fc1/fc2, no inner norm, a GELU (fc2's input is unsigned + offset)."""
    require(class_name(mlp) == "timm.layers.mlp.Mlp", f"{where}.mlp", f"MLP type {type(mlp).__name__} (only timm Mlp)")
    require(is_identity(getattr(mlp, "norm", None)), f"{where}.mlp.norm", f"a norm inside the MLP ({type(mlp.norm).__name__}, scale_mlp_norm)")
    require_gelu(mlp.act, f"{where}.mlp.act")


def block_norm_pairs(block: nn.Module, where: str, attn_path: str, shift: bool = True) -> list[NormPair]:
    """The two pairs of a pre-norm block (`norm1` -> attention at `attn_path`, a QuantAttention; `norm2` -> `mlp.fc1`)."""
    qkv, _ = block.get_submodule(attn_path).fused_parts()
    return [NormPair(f"{where}.norm1", f"{where}.{attn_path}.input_quant", tuple(f"{where}.{attn_path}.{p}" for p in qkv), shift),
            NormPair(f"{where}.norm2", f"{where}.mlp.fc1.a_quant", (f"{where}.mlp.fc1",))]
