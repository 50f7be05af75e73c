"""Oscillation tracking of integer weight codes during QAT (Nagel et al. 2022; method.md §6).

After each optimiser step the tracker recomputes every tracked weight's integer code. A code change
whose direction reverses the weight's previous change is an oscillation; each weight keeps an EMA of
its oscillations, `f <- m * osc + (1 - m) * f`, and counts as oscillating when `f > threshold`. With
`freeze=True` such weights are frozen: their integer code is recorded and `apply_freeze()` resets
the latent weight to `code * step` (current step), so the frozen code never changes again.

Construct the tracker after step-size calibration: the codes at construction are the starting point.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .modules import QConv2d, QLinear
from .obr import quant_layers

_FIELDS = ("codes", "direction", "frequency", "frozen", "frozen_codes", "flips")


def _track(codes: Tensor, last_codes: Tensor, direction: Tensor, frequency: Tensor, momentum: float) -> tuple[Tensor, Tensor, Tensor]:
    """One update of the flat state: (new direction, new EMA frequency, oscillated as 0/1) from the new and last codes.

    Branch-free float arithmetic, exact for integer codes (the compiler vectorises it; its int8 and bool ops
    ran several times slower): `change = sign(codes - last)`; an oscillation is a change against the last
    direction (`change * direction = -1`); the direction becomes `change` where the code moved; the EMA is
    `f * (1 - m) + osc * m`.
    """
    change = torch.sign(codes.to(torch.float32) - last_codes.to(torch.float32))
    last = direction.to(torch.float32)
    oscillated = (change * last).clamp(max=0).neg()
    new_direction = change + last * (1 - change.abs())
    return new_direction.to(torch.int8), frequency * (1 - momentum) + oscillated.to(frequency.dtype) * momentum, oscillated


def _track_in_place(codes: Tensor, last_codes: Tensor, direction: Tensor, frequency: Tensor, oscillated: Tensor,
                    momentum: float) -> None:
    """`_track` writing into the state (and the new codes into `last_codes`): compiled, one pass and no fresh outputs
    (fresh 5.5M-element outputs doubled its time on this CPU)."""
    new_direction, new_frequency, new_oscillated = _track(codes, last_codes, direction, frequency, momentum)
    direction.copy_(new_direction)
    frequency.copy_(new_frequency)
    oscillated.copy_(new_oscillated)
    last_codes.copy_(codes)


@functools.cache
def _compiled_track():
    """`_track_in_place` compiled once per process: one pass over the state instead of a dozen."""
    return torch.compile(_track_in_place, dynamic=True)


class OscillationTracker:
    """Per-weight oscillation counting, EMA frequency and optional freezing for a model's quantized layers.

    `names` are fnmatch globs over the quantized layers' module names (default: every QLinear/QConv2d).
    State per weight: int8 code, int8 last direction, float32 EMA, bool frozen flag, int8 frozen code.
    The state of all layers lives in one flat tensor per field; with `fused=True` an update is one compiled
    kernel over it after each layer's codes (bitwise what the eager ops compute; they took ~4% of a small
    ViT's training step).
    """

    def __init__(self, model: nn.Module, momentum: float = 1e-3, threshold: float = 0.005, freeze: bool = False,
                 names: Sequence[str] | None = None, fused: bool = False) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.momentum = momentum
        self.threshold = threshold
        self.freeze = freeze
        self.fused = fused  # the compiled update (and the weight quantizers' compiled codes, when they are fused)
        self.layers: dict[str, QLinear | QConv2d] = dict(quant_layers(model, names))
        if not self.layers:
            raise ValueError(f"no quantized layer to track{f' matches {list(names)}' if names is not None else ''}")
        self._dtypes = {name: _code_dtype(layer) for name, layer in self.layers.items()}
        code_dtype = torch.int16 if torch.int16 in self._dtypes.values() else torch.int8
        codes = self._all_codes().to(code_dtype)
        self._flat: dict[str, Tensor] = {
            "codes": codes,
            "direction": torch.zeros_like(codes, dtype=torch.int8),  # sign of the last code change (0: none yet)
            "frequency": torch.zeros(codes.shape, dtype=torch.float32, device=codes.device),
            "frozen": torch.zeros(codes.shape, dtype=torch.bool, device=codes.device),
            "frozen_codes": torch.zeros_like(codes),
        }
        self._flips = torch.zeros(len(self.layers), dtype=torch.int64, device=codes.device)  # oscillations of the last update
        self._oscillated = torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)  # the last update's, per weight
        self._new_codes = torch.empty(codes.shape, dtype=torch.int32, device=codes.device)
        self._flips_stale = False  # the last update's oscillations are summed per layer only when read
        sizes = [layer.weight.numel() for layer in self.layers.values()]
        self._spans = {name: (end - size, end) for name, size, end in zip(self.layers, sizes, itertools.accumulate(sizes), strict=True)}

    @property
    def state(self) -> dict[str, dict[str, Tensor]]:
        """Per layer and field, a view of the flat state in the weight's shape (`flips`: a 0-dim count)."""
        self._count_flips()
        out: dict[str, dict[str, Tensor]] = {}
        for i, name in enumerate(self.layers):
            out[name] = {field: self._layer_view(field, name) for field in self._flat}
            out[name]["flips"] = self._flips[i]
        return out

    def _layer_view(self, field: str, name: str) -> Tensor:
        """Layer `name`'s slice of the flat state `field`, viewed in its weight's shape."""
        start, end = self._spans[name]
        return self._flat[field][start:end].view(self.layers[name].weight.shape)

    def _all_codes(self, out: Tensor | None = None) -> Tensor:
        """Every tracked weight's integer code (int32), the layers end to end (into `out` when given)."""
        return torch.cat([layer.w_quant.codes(layer.weight.detach()).reshape(-1) for layer in self.layers.values()], out=out)

    def _count_flips(self) -> None:
        if self._flips_stale:
            sums = [self._oscillated[start:end].sum(dtype=torch.float64) for start, end in self._spans.values()]
            self._flips = torch.stack(sums).to(torch.int64)
            self._flips_stale = False

    @torch.no_grad()
    def update(self) -> None:
        """Record one optimiser step: count direction-reversing code changes, update EMAs, freeze if enabled."""
        if self.freeze:
            self.apply_freeze()
        self._to_device()
        st = self._flat
        codes = self._all_codes(out=self._new_codes)
        if self.fused:
            _compiled_track()(codes, st["codes"], st["direction"], st["frequency"], self._oscillated, self.momentum)
        else:
            st["direction"], st["frequency"], self._oscillated = _track(codes, st["codes"], st["direction"], st["frequency"],
                                                                        self.momentum)
            st["codes"] = codes.to(st["codes"].dtype, copy=True)  # `codes` is the reused buffer
        self._flips_stale = True
        if self.freeze:
            newly = (st["frequency"] > self.threshold) & ~st["frozen"]
            st["frozen"] |= newly
            st["frozen_codes"] = torch.where(newly, st["codes"], st["frozen_codes"])  # st["codes"]: the new codes now

    @torch.no_grad()
    def apply_freeze(self) -> None:
        """Reset every frozen latent weight to `frozen_code * step`; call after `optimizer.step()` (no-op without frozen weights)."""
        self._to_device()
        if not bool(self._flat["frozen"].any()):
            return
        for name, layer in self.layers.items():  # the flat state's slices (not `state`: that also sums the flips)
            frozen = self._layer_view("frozen", name)
            if not bool(frozen.any()):
                continue
            value = self._layer_view("frozen_codes", name).to(layer.weight.dtype) * layer.w_quant.scale_for(layer.weight).to(layer.weight.dtype)
            layer.weight.copy_(torch.where(frozen, value, layer.weight))

    def summary(self) -> dict[str, dict]:
        """Per layer: fraction of weights with EMA > threshold, mean EMA, oscillations in the last update, frozen fraction."""
        out = {}
        for name, st in self.state.items():
            out[name] = {
                "oscillating_fraction": float((st["frequency"] > self.threshold).float().mean()),
                "mean_frequency": float(st["frequency"].mean()),
                "flips_last_update": int(st["flips"]),
                "frozen_fraction": float(st["frozen"].float().mean()),
            }
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Flat `{"<layer>.<field>": tensor}` of plain CPU tensors, enough to continue exactly."""
        out = {}
        for name, st in self.state.items():
            for field in _FIELDS:
                value = st[field].detach().cpu().clone()
                out[f"{name}.{field}"] = value.to(self._dtypes[name]) if field in ("codes", "frozen_codes") else value
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a `state_dict()`; the keys, shapes and dtypes must match this tracker's layers exactly."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"oscillation state does not match the tracked layers: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, ref in expected.items():
            if state[key].shape != ref.shape or state[key].dtype != ref.dtype:
                raise ValueError(f"oscillation state '{key}' is {state[key].dtype}{tuple(state[key].shape)}, "
                                 f"expected {ref.dtype}{tuple(ref.shape)}")
        for field, flat in self._flat.items():
            self._flat[field] = torch.cat([state[f"{name}.{field}"].reshape(-1) for name in self.layers]).to(flat.device, flat.dtype)
        self._flips = torch.stack([state[f"{name}.flips"] for name in self.layers]).to(self._flips.device)
        self._flips_stale = False

    def _to_device(self) -> None:
        """Follow the weights (the model may have moved since construction or a load)."""
        device = next(iter(self.layers.values())).weight.device
        if self._flat["codes"].device != device:
            self._count_flips()
            self._flat = {field: flat.to(device) for field, flat in self._flat.items()}
            self._flips, self._oscillated, self._new_codes = (t.to(device) for t in (self._flips, self._oscillated, self._new_codes))


def _code_dtype(layer: QLinear | QConv2d) -> torch.dtype:
    """The smallest integer type of a layer's weight codes (int8 up to 8-bit signed codes)."""
    spec = layer.w_quant.spec
    return torch.int8 if spec.qn >= -128 and spec.qp <= 127 else torch.int16
