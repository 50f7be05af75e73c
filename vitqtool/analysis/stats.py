"""Variation statistics of weights and activations (method.md §1: variation across modules, heads, channels).

Every statistic is computed in float64 and streamed over batches (in cache-sized chunks of rows) so that
activations never need to be held in memory: moments are accumulated about a shift (the first chunk's
mean) for stability; per position of a sample (x[0]'s shape) the sums, sums of squares, minima and maxima
over the batch dimension are kept, and the groups (per channel, per token, per head) are formed from
these at the end; a second pass counts outliers against the final mean/std and fills a fixed-range
histogram.

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

import contextlib
import math
from collections.abc import Callable, Iterator
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


CPU_CHUNK = 1 << 18  # values per chunk on CPU: one chunk's temporaries stay in cache (whole activations: 3-6x slower)
DEVICE_CHUNK = 1 << 24  # on an accelerator only the number of kernel launches matters


def row_chunks(x: Tensor) -> tuple[Tensor, ...]:
    """`x` split along dim 0 into pieces of about `CPU_CHUNK` (CPU) or `DEVICE_CHUNK` values, at least one row each."""
    if x.dim() == 0:
        return (x.reshape(1),)
    chunk = CPU_CHUNK if x.device.type == "cpu" else DEVICE_CHUNK
    return x.split(max(1, chunk // max(x[0].numel(), 1)))


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run chunked statistics on one intra-op CPU thread, then restore the thread count.

    Waking OpenMP threads for pieces of ~1 MB costs more than the work when the cores are shared: measured
    8-10x slower with 2 threads than with 1 on a loaded 2-core machine. GPU work is unaffected.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RunningStats:
    """Streaming per-tensor and per-group statistics of one tensor stream (weights: one update).

    `update(x, x_hat)` is the first pass (moments, extremes, group stats, quantization error);
    `update_tails(x)` the optional second pass (outliers beyond 3 std, histogram over [min, max]).
    Dim 0 is the stream's batch dimension: per-position sums (about the shift), sums of squares, minima and
    maxima are accumulated over it, and the groups (never along dim 0) are formed from these in `result()`.
    A weight is passed with a leading dimension of 1 (`w[None]`, groups along dim 1).
    """

    def __init__(self, groups: dict[str, Grouper] | None = None) -> None:
        self.groups = groups or {}
        self.shift: float | None = None
        self.rows = 0
        self.higher: Tensor | float = 0.0  # sums of (x - shift)^3 and (x - shift)^4 (a tensor after the first update)
        self.noise: Tensor | float = 0.0
        self.quantized = False
        self.pos: dict[str, Tensor] = {}  # per position (x[0]'s shape): sum, sumsq (about shift), min, max
        self.outliers: Tensor | int = 0
        self.tail_count = 0
        self.hist: Tensor | None = None

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor | None = None) -> None:
        """Add a batch of values (and, when given, their quantized version)."""
        x = x.detach()
        parts = zip(row_chunks(x), row_chunks(x_hat.detach())) if x_hat is not None else ((c, None) for c in row_chunks(x))
        with one_cpu_thread():
            for part, part_hat in parts:
                v = part.double()
                if self.shift is None:
                    self.shift = float(v.mean())
                d = v - self.shift
                d2 = d * d
                self.higher = self.higher + torch.stack(((d2 * d).sum(), (d2 * d2).sum()))
                new = {"sum": d.sum(0), "sumsq": d2.sum(0), "min": v.amin(0), "max": v.amax(0)}
                if not self.pos:
                    self.pos = new
                else:
                    for key in ("sum", "sumsq"):
                        self.pos[key] += new[key]
                    torch.minimum(self.pos["min"], new["min"], out=self.pos["min"])
                    torch.maximum(self.pos["max"], new["max"], out=self.pos["max"])
                self.rows += v.shape[0]
                if part_hat is not None:
                    self.quantized = True
                    self.noise = self.noise + (v - part_hat.double()).pow(2).sum()

    @property
    def count(self) -> int:
        """Values seen by `update`."""
        return self.rows * (self.pos["sum"].numel() if self.pos else 0)

    def extremes(self) -> tuple[float, float]:
        """Minimum and maximum of everything seen by `update`."""
        return float(self.pos["min"].min()), float(self.pos["max"].max())

    def mean_std(self) -> tuple[float, float]:
        """Mean and population standard deviation of everything seen by `update`."""
        if self.shift is None:
            raise ValueError("no values seen: call update first")
        m1 = float(self.pos["sum"].sum()) / self.count
        var = max(float(self.pos["sumsq"].sum()) / self.count - m1 * m1, 0.0)
        return self.shift + m1, math.sqrt(var)

    @torch.no_grad()
    def update_tails(self, x: Tensor) -> None:
        """Second pass: count values beyond 3 std of the first pass's mean and histogram them over [min, max]."""
        mean, std = self.mean_std()
        lo, hi = self.extremes()
        below, above = mean - OUTLIER_K * std, mean + OUTLIER_K * std
        with one_cpu_thread():
            for part in row_chunks(x.detach()):
                v = part.double()
                self.outliers = self.outliers + (v < below).sum() + (v > above).sum()
                self.tail_count += v.numel()
                hist = torch.histc(part.float(), bins=HIST_BINS, min=lo, max=hi if hi > lo else lo + 1.0)
                self.hist = hist if self.hist is None else self.hist + hist

    def result(self) -> dict[str, Any]:
        """Per-tensor statistics plus one entry per group kind (ranges/std per group and their spread)."""
        mean, std = self.mean_std()
        lo, hi = self.extremes()
        shift, higher = self.shift, self.higher
        if shift is None or not isinstance(higher, Tensor):  # both set by the first update (mean_std checked it)
            raise ValueError("no values seen: call update first")
        n = self.count
        m1 = float(self.pos["sum"].sum()) / n
        e3, e4 = (float(h) / n for h in higher)
        e2 = float(self.pos["sumsq"].sum()) / n
        m2 = e2 - m1 * m1
        m4 = e4 - 4 * m1 * e3 + 6 * m1 * m1 * e2 - 3 * m1**4
        out: dict[str, Any] = {
            "count": n, "mean": mean, "std": std, "min": lo, "max": hi, "range": hi - lo,
            "kurtosis": m4 / (m2 * m2) - 3.0 if m2 > 0 else 0.0,
        }
        if self.quantized:
            signal = (e2 + 2 * shift * m1 + shift**2) * n  # sum of x^2 = sum of (d + shift)^2
            out["mse"] = float(self.noise) / n
            out["sqnr_db"] = _db(signal, float(self.noise))
        if self.tail_count and self.hist is not None:  # update_tails sets both
            out["outlier_ratio"] = int(self.outliers) / self.tail_count
            out["histogram"] = {"min": lo, "max": hi, "counts": [int(c) for c in self.hist.tolist()]}
        for name, fn in self.groups.items():
            pos = {key: fn(value.unsqueeze(0)) for key, value in self.pos.items()}  # [groups, positions]
            ranges = pos["max"].amax(1) - pos["min"].amin(1)
            members = pos["sum"].shape[1] * self.rows
            gmean = pos["sum"].sum(1) / members
            gstd = (pos["sumsq"].sum(1) / members - gmean * gmean).clamp(min=0).sqrt()
            entry: dict[str, Any] = range_spread(ranges)
            if ranges.numel() <= 64:  # heads and small group counts: keep the per-group values
                entry["ranges"] = ranges.tolist()
                entry["stds"] = gstd.tolist()
            else:
                entry["std_cv"] = float(gstd.std(correction=0) / gstd.mean()) if float(gstd.mean()) > 0 else 0.0
            out[name] = entry
        return out
