"""Oscillation tracking of integer weight codes during QAT (Nagel et al. 2022; method.md §6).

After each optimiser step the tracker recomputes every tracked weight's integer code. A code change
whose direction reverses the weight's previous change is an oscillation; each weight keeps an EMA of
its oscillations, `f <- m * osc + (1 - m) * f`, and counts as oscillating when `f > threshold`. With
`freeze=True` such weights are frozen: their integer code is recorded and `apply_freeze()` resets
the latent weight to `code * step` (current step), so the frozen code never changes again.

Construct the tracker after step-size calibration: the codes at construction are the starting point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .modules import QConv2d, QLinear
from .obr import quant_layers

_FIELDS = ("codes", "direction", "frequency", "frozen", "frozen_codes", "flips")


class OscillationTracker:
    """Per-weight oscillation counting, EMA frequency and optional freezing for a model's quantized layers.

    `names` are fnmatch globs over the quantized layers' module names (default: every QLinear/QConv2d).
    State per weight: int8 code, int8 last direction, float32 EMA, bool frozen flag, int8 frozen code.
    """

    def __init__(self, model: nn.Module, momentum: float = 1e-3, threshold: float = 0.005, freeze: bool = False,
                 names: Sequence[str] | None = None) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.momentum = momentum
        self.threshold = threshold
        self.freeze = freeze
        self.layers: dict[str, QLinear | QConv2d] = dict(quant_layers(model, names))
        self.state: dict[str, dict[str, Tensor]] = {}
        for name, layer in self.layers.items():
            codes = self._codes(layer)
            self.state[name] = {
                "codes": codes,
                "direction": torch.zeros_like(codes, dtype=torch.int8),  # sign of the last code change (0: none yet)
                "frequency": torch.zeros(codes.shape, dtype=torch.float32, device=codes.device),
                "frozen": torch.zeros(codes.shape, dtype=torch.bool, device=codes.device),
                "frozen_codes": torch.zeros_like(codes),
                "flips": torch.zeros((), dtype=torch.int64, device=codes.device),  # oscillations counted by the last update
            }

    @staticmethod
    def _codes(layer: QLinear | QConv2d) -> Tensor:
        spec = layer.w_quant.spec
        dtype = torch.int8 if spec.qn >= -128 and spec.qp <= 127 else torch.int16
        return layer.w_quant.codes(layer.weight.detach()).to(dtype)

    @torch.no_grad()
    def update(self) -> None:
        """Record one optimiser step: count direction-reversing code changes, update EMAs, freeze if enabled."""
        if self.freeze:
            self.apply_freeze()
        m = self.momentum
        for name, layer in self.layers.items():
            st = self._on_device(name, layer.weight.device)
            codes = self._codes(layer)
            change = torch.sign(codes.to(torch.int16) - st["codes"].to(torch.int16)).to(torch.int8)
            moved = change != 0
            osc = moved & (change == -st["direction"])
            st["direction"] = torch.where(moved, change, st["direction"])
            st["codes"] = codes
            st["frequency"].mul_(1 - m).add_(osc.to(torch.float32), alpha=m)
            st["flips"] = osc.sum()  # stays on the device: read only when summarised
            if self.freeze:
                newly = (st["frequency"] > self.threshold) & ~st["frozen"]
                st["frozen"] |= newly
                st["frozen_codes"] = torch.where(newly, codes, st["frozen_codes"])

    @torch.no_grad()
    def apply_freeze(self) -> None:
        """Reset every frozen latent weight to `frozen_code * step`; call after `optimizer.step()` (no-op without frozen weights)."""
        for name, layer in self.layers.items():
            st = self._on_device(name, layer.weight.device)
            if not bool(st["frozen"].any()):
                continue
            value = st["frozen_codes"].to(layer.weight.dtype) * layer.w_quant.scale_for(layer.weight).to(layer.weight.dtype)
            layer.weight.copy_(torch.where(st["frozen"], value, layer.weight))

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
        return {f"{name}.{field}": st[field].detach().cpu().clone() for name, st in self.state.items() for field in _FIELDS}

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
        for name, layer in self.layers.items():
            device = layer.weight.device
            for field in _FIELDS:
                self.state[name][field] = state[f"{name}.{field}"].clone().to(device)

    def _on_device(self, name: str, device: torch.device) -> dict[str, Tensor]:
        st = self.state[name]
        if st["codes"].device != device:
            for field in _FIELDS:
                st[field] = st[field].to(device)
        return st
