"""Variation statistics of weights and activations (method.md §1: variation across modules, heads, channels).

Every statistic is computed in float64 and streamed over batches so that activations never need to
be held in memory: moments are accumulated about a shift (the first batch's mean) for stability,
group statistics (per channel, per token, per head) keep per-group min/max/sum/sum of squares, and a
second pass counts outliers against the final mean/std and fills a fixed-range histogram.

Definitions (also the `analysis.json` schema's):
- `kurtosis`: excess kurtosis `m4 / m2^2 - 3` with population moments (0 for a Gaussian).
- `outlier_ratio`: share of values with `|x - mean| > 3 * std` (population std; 0.27% for a Gaussian).
- range spread over groups: `range_ratio = max(range_g) / min(range_g)` and
  `range_cv = std(range_g) / mean(range_g)` (population std) of the per-group ranges `max - min`.
- `mse = mean((x - Q(x))^2)`, `sqnr_db = 10 log10(sum x^2 / sum (x - Q(x))^2)` with the quantizer's
  initialised step (null when the error is exactly zero).
- `boundary_share`: share of weights with `|frac(clamp(W / s)) - 0.5| < 0.05` (about to flip codes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..quant import Quantizer

OUTLIER_K = 3.0
HIST_BINS = 64
BOUNDARY_BAND = 0.05

Grouper = Callable[[Tensor], Tensor]  # x -> [groups, members]


def kurtosis(x: Tensor) -> float:
    """Excess kurtosis `m4 / m2^2 - 3` of all values of `x` (population moments)."""
    v = x.detach().double().flatten()
    d = v - v.mean()
    m2 = float((d * d).mean())
    return float((d**4).mean()) / (m2 * m2) - 3.0 if m2 > 0 else 0.0


def outlier_ratio(x: Tensor, k: float = OUTLIER_K) -> float:
    """Share of values of `x` farther than `k` population standard deviations from the mean."""
    v = x.detach().double().flatten()
    return float(((v - v.mean()).abs() > k * v.std(correction=0)).double().mean())


def range_spread(ranges: Tensor) -> dict[str, float | int | None]:
    """Spread of per-group ranges: count, min, max, max/min ratio (null if min is 0) and coefficient of variation."""
    r = ranges.detach().double().flatten()
    lo, hi, mean = float(r.min()), float(r.max()), float(r.mean())
    return {"n": r.numel(), "min_range": lo, "max_range": hi, "range_ratio": hi / lo if lo > 0 else None,
            "range_cv": float(r.std(correction=0)) / mean if mean > 0 else 0.0}


def sqnr_db(x: Tensor, x_hat: Tensor) -> float | None:
    """Signal-to-quantization-noise ratio `10 log10(sum x^2 / sum (x - x_hat)^2)` in dB (None when exact)."""
    signal = float(x.detach().double().pow(2).sum())
    noise = float((x.detach().double() - x_hat.detach().double()).pow(2).sum())
    return _db(signal, noise)


def _db(signal: float, noise: float) -> float | None:
    if noise <= 0:
        return None
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


@torch.no_grad()
def fake_quant(quantizer: Quantizer, x: Tensor) -> Tensor:
    """What `quantizer` outputs for `x` when enabled (its current step and offset), whatever its switch says."""
    was = quantizer.enabled
    quantizer.enabled = True
    try:
        return quantizer.forward(x)  # not __call__: no hooks (the analysis hooks live on quantizers)
    finally:
        quantizer.enabled = was


@torch.no_grad()
def boundary_share(quantizer: Quantizer, weight: Tensor, band: float = BOUNDARY_BAND) -> float:
    """Share of weights whose clamped `W / s` lies within `band` of a rounding boundary (x.5)."""
    step = quantizer.scale_for(weight).detach().to(weight.dtype)
    scaled = (weight.detach() / step).clamp(quantizer.spec.qn, quantizer.spec.qp)
    frac = scaled - scaled.floor()
    return float(((frac - 0.5).abs() < band).double().mean())


def channel_groups(dim: int) -> Grouper:
    """Groups along dimension `dim` (e.g. -1: channels of [B, N, C]; 0: output channels of a weight)."""
    return lambda x: x.movedim(dim, 0).reshape(x.shape[dim], -1)


def head_groups(head_dim: int) -> Grouper:
    """Heads of a channels-last tensor whose last dimension is `heads * head_dim`."""
    return lambda x: x.reshape(-1, x.shape[-1] // head_dim, head_dim).transpose(0, 1).reshape(x.shape[-1] // head_dim, -1)


def token_groups() -> Grouper:
    """Token positions of a channels-last tensor: [B, N, C] or [B, H, W, C] (every dim between batch and channels)."""
    return lambda x: x.flatten(1, -2).transpose(0, 1).reshape(x[0, ..., 0].numel(), -1)


def spatial_groups() -> Grouper:
    """Spatial positions of a [B, C, H, W] tensor (the tokens of a patch-embedding input)."""
    return lambda x: x.flatten(2).movedim(2, 0).reshape(x.shape[2] * x.shape[3], -1)


class RunningStats:
    """Streaming per-tensor and per-group statistics of one tensor stream (weights: one update).

    `update(x, x_hat)` is the first pass (moments, extremes, group stats, quantization error);
    `update_tails(x)` the optional second pass (outliers beyond 3 std, histogram over [min, max]).
    """

    def __init__(self, groups: dict[str, Grouper] | None = None) -> None:
        self.groups = groups or {}
        self.shift: float | None = None
        self.count = 0
        self.sums = [0.0, 0.0, 0.0, 0.0]  # sums of (x - shift)^p, p = 1..4
        self.lo, self.hi = math.inf, -math.inf
        self.signal = self.noise = 0.0
        self.group_acc: dict[str, dict[str, Tensor]] = {}
        self.outliers = 0
        self.tail_count = 0
        self.hist: Tensor | None = None

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor | None = None) -> None:
        """Add a batch of values (and, when given, their quantized version)."""
        v = x.detach().double()
        if self.shift is None:
            self.shift = float(v.mean())
        d = v.flatten() - self.shift
        d2 = d * d
        for p, term in enumerate((d, d2, d2 * d, d2 * d2)):
            self.sums[p] += float(term.sum())
        self.count += d.numel()
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        if x_hat is not None:
            self.signal += float(v.pow(2).sum())
            self.noise += float((v - x_hat.detach().double()).pow(2).sum())
        for name, fn in self.groups.items():
            g = fn(v)
            new = {"min": g.amin(1), "max": g.amax(1), "sum": g.sum(1), "sumsq": g.pow(2).sum(1), "n": torch.full((g.shape[0],), float(g.shape[1]), dtype=torch.float64)}
            acc = self.group_acc.get(name)
            if acc is None:
                self.group_acc[name] = new
            else:
                acc["min"] = torch.minimum(acc["min"], new["min"])
                acc["max"] = torch.maximum(acc["max"], new["max"])
                for key in ("sum", "sumsq", "n"):
                    acc[key] = acc[key] + new[key]

    def mean_std(self) -> tuple[float, float]:
        """Mean and population standard deviation of everything seen by `update`."""
        m1 = self.sums[0] / self.count
        var = max(self.sums[1] / self.count - m1 * m1, 0.0)
        return self.shift + m1, math.sqrt(var)

    @torch.no_grad()
    def update_tails(self, x: Tensor) -> None:
        """Second pass: count values beyond 3 std of the first pass's mean and histogram them over [min, max]."""
        v = x.detach().double().flatten()
        mean, std = self.mean_std()
        self.outliers += int(((v - mean).abs() > OUTLIER_K * std).sum())
        self.tail_count += v.numel()
        hist = torch.histc(v.float(), bins=HIST_BINS, min=self.lo, max=self.hi if self.hi > self.lo else self.lo + 1.0)
        self.hist = hist if self.hist is None else self.hist + hist

    def result(self) -> dict[str, Any]:
        """Per-tensor statistics plus one entry per group kind (ranges/std per group and their spread)."""
        mean, std = self.mean_std()
        n = self.count
        m1 = self.sums[0] / n
        e2, e3, e4 = (s / n for s in self.sums[1:])
        m2 = e2 - m1 * m1
        m4 = e4 - 4 * m1 * e3 + 6 * m1 * m1 * e2 - 3 * m1**4
        out: dict[str, Any] = {
            "count": n, "mean": mean, "std": std, "min": self.lo, "max": self.hi, "range": self.hi - self.lo,
            "kurtosis": m4 / (m2 * m2) - 3.0 if m2 > 0 else 0.0,
        }
        if self.signal or self.noise:
            out["mse"] = self.noise / n
            out["sqnr_db"] = _db(self.signal, self.noise)
        if self.tail_count:
            out["outlier_ratio"] = self.outliers / self.tail_count
            out["histogram"] = {"min": self.lo, "max": self.hi, "counts": [int(c) for c in self.hist.tolist()]}
        for name, acc in self.group_acc.items():
            ranges = acc["max"] - acc["min"]
            gmean = acc["sum"] / acc["n"]
            gstd = (acc["sumsq"] / acc["n"] - gmean * gmean).clamp(min=0).sqrt()
            entry = range_spread(ranges)
            if ranges.numel() <= 64:  # heads and small group counts: keep the per-group values
                entry["ranges"] = ranges.tolist()
                entry["stds"] = gstd.tolist()
            else:
                entry["std_cv"] = float(gstd.std(correction=0) / gstd.mean()) if float(gstd.mean()) > 0 else 0.0
            out[name] = entry
        return out
