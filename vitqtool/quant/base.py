"""The quantizer interface: what calibration, overrides, OBR, oscillation, export and analysis may use.

A quantizer maps a tensor to `codes * scale (+ offset)`. Callers never read an implementation's
parameters: they ask for the scale broadcast against a tensor, the integer codes, the offset, and
for initialisation from a weight or from activation statistics. `state_roles` tells the export which
state entries are scales, offsets or flags. LSQ (`lsq.LSQQuantizer`) is one implementation.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MIN_STEP = 1e-4  # method.md §2: steps are clamped to >= 1e-4
GRANULARITIES = ("tensor", "channel")  # "group" would slot in here, with a group size


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, sign, granularity (one scale, or one per output channel), offset."""

    bits: int
    signed: bool = True
    granularity: str = "tensor"
    learned_offset: bool = False
    method: str = "lsq"          # which registered Quantizer implements it (`make_quantizer`)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")

    @property
    def per_channel(self) -> bool:
        """One scale per output channel (dimension 0 of a weight)."""
        return self.granularity == "channel"

    @property
    def qn(self) -> int:
        """Lowest integer level."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qp(self) -> int:
        """Highest integer level."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


class Quantizer(nn.Module, abc.ABC):
    """A fake quantizer of weights (`kind="weight"`) or activations (`kind="act"`).

    `enabled=False` makes it the identity (FP arithmetic in the same module tree); `fused` selects a
    compiled kernel where the implementation has one.
    """

    spec: QuantSpec
    kind: str
    enabled: bool
    fused: bool

    @property
    @abc.abstractmethod
    def is_initialized(self) -> bool:
        """Whether the scale was set from data (calibration, a weight, or a loaded state)."""

    @abc.abstractmethod
    def mark_initialized(self) -> None:
        """Record that the scale holds a real value (e.g. after loading it from a file)."""

    @abc.abstractmethod
    def scale_for(self, x: Tensor) -> Tensor:
        """The effective scale, shaped to broadcast against `x` (`[C, 1, ...]` per channel, `[1]` per tensor)."""

    @abc.abstractmethod
    def offset_for(self, x: Tensor) -> Tensor | None:
        """The additive offset in `x`'s dtype (broadcastable against it), or None when there is none."""

    @abc.abstractmethod
    def codes(self, x: Tensor) -> Tensor:
        """The integer codes of `x` as int32, whatever `enabled` says."""

    @abc.abstractmethod
    def init_from_weight(self, weight: Tensor) -> None:
        """Set the scale from the weight it quantizes."""

    @abc.abstractmethod
    def activation_statistic(self, x: Tensor) -> Tensor:
        """The per-batch statistic activation init averages over calibration batches (and processes)."""

    @abc.abstractmethod
    def init_from_statistic(self, value: float | Tensor) -> None:
        """Set the scale from the averaged `activation_statistic`."""

    def project_(self) -> None:
        """Bring learned parameters back into their valid range; called after calibration and each optimizer step."""

    @abc.abstractmethod
    def with_bits(self, bits: int) -> Quantizer:
        """A new, uninitialised quantizer of the same type and shape at `bits` (same switches)."""

    @abc.abstractmethod
    def state_roles(self) -> dict[str, str]:
        """This quantizer's state_dict keys (relative) mapped to "scale", "offset" or "flag"."""

    def scale_values(self) -> Tensor:
        """The effective scale(s), detached and flat: `[1]` per tensor, `[channels]` per channel (what files store)."""
        return self.scale_for(self.offset_probe()).detach().reshape(-1)

    def offset_value(self) -> float | None:
        """The offset as a number, or None when there is none."""
        offset = self.offset_for(self.offset_probe())
        return None if offset is None else float(offset.detach().reshape(-1)[0])

    def offset_probe(self) -> Tensor:
        """A one-element float32 tensor on the quantizer's device, to ask `scale_for`/`offset_for` without data."""
        param = next(self.parameters(), None)
        return torch.zeros(1, device=param.device if param is not None else None)

    def dequantize(self, codes: Tensor, like: Tensor) -> Tensor:
        """`codes * scale (+ offset)` in `like`'s dtype and shape: exactly what the forward outputs."""
        out = codes.to(like.dtype) * self.scale_for(like).to(like.dtype)
        offset = self.offset_for(like)
        return out if offset is None else out + offset


QUANTIZERS: dict[str, type[Quantizer]] = {}  # method name -> implementation, filled by @register_quantizer


def register_quantizer(method: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: make a Quantizer implementation available as `QuantSpec(method=...)`."""
    def add(cls: type[Quantizer]) -> type[Quantizer]:
        QUANTIZERS[method] = cls
        return cls
    return add


def make_quantizer(spec: QuantSpec, kind: str, channels: int = 1) -> Quantizer:
    """A new quantizer of `spec.method` for a tensor of `kind` ("weight" with `channels` outputs, or "act")."""
    cls = QUANTIZERS.get(spec.method)
    if cls is None:
        raise ValueError(f"unknown quantizer method {spec.method!r}; known: {', '.join(sorted(QUANTIZERS))}")
    return cls(spec, kind, channels)
