"""Subsets of a split that mean the same everywhere: `--limit N` samples and held-out validation slices.

Every `--limit`/`--limit-train`/`--limit-val` flag takes `stratified_sample`: a class-stratified sample
drawn with a fixed seed, so every command picks the same images (a soft-label store made with
`--limit N` covers a `quantize --limit-train N` run) and a split sorted by class (builtin:mnist5k,
image folders) still gives every class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .sources import ImageDataset

SAMPLE_SEED = 0          # one seed for every --limit, so commands agree on the images
HOLDOUT_FRACTION = 0.1   # share of a train-only dataset held out for validation
HOLDOUT_SEED = 0


def _labels(dataset: Any) -> np.ndarray:
    return np.asarray(dataset.labels() if hasattr(dataset, "labels") else [int(dataset[i][1]) for i in range(len(dataset))])


def _stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """All indices, ordered so that every prefix is as class-balanced as the classes allow (seeded shuffle per class)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = []  # position-major: one of each class in turn, spread proportionally
    keys = []
    for idx in per_class:
        order.extend(idx.tolist())
        keys.extend(((np.arange(len(idx)) + 0.5) / len(idx)).tolist())
    return np.asarray(order)[np.argsort(np.asarray(keys), kind="stable")]


class Sample(torch.utils.data.Subset):
    """A Subset that keeps its split's class count (`num_classes`) and can list its labels."""

    dataset: ImageDataset | Sample  # what stratified_sample and holdout_split wrap (both have num_classes)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def labels(self) -> list[int]:
        everything = _labels(self.dataset)
        return [int(everything[i]) for i in self.indices]


def stratified_sample(dataset: Any, n: int | None, seed: int = SAMPLE_SEED) -> Any:
    """A seeded, class-stratified sample of `n` images (in dataset order); the dataset itself when `n` covers it."""
    if n is None or n >= len(dataset):
        return dataset
    chosen = np.sort(_stratified_order(_labels(dataset), seed)[:n])
    return Sample(dataset, chosen.tolist())


def holdout_split(dataset: Any, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED) -> tuple[Sample, Sample]:
    """(train, held-out validation) subsets of one split: a seeded, class-stratified `fraction` held out."""
    order = _stratified_order(_labels(dataset), seed)
    n_val = max(1, round(fraction * len(dataset)))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return Sample(dataset, train.tolist()), Sample(dataset, val.tolist())
