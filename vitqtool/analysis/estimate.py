"""One-pass sensitivity estimate (`--method taylor`): each unit's KL(FP || Q) to second order, from gradients.

Quantizing unit u alone perturbs the tensors at its points p (the output of a quantized layer: its output
with the unit's weight/input quantizers on minus the FP output; a standalone activation quantizer:
Q(x) - x) by delta_{n,p} for image n. Linearising the model from each point to the logits, the logits move
by dz_n = sum_p J_{n,p} delta_{n,p}, and to second order

    KL(p_n || softmax(z_n + dz_n)) ~= 1/2 dz_n^T F_n dz_n,    F_n = diag(p_n) - p_n p_n^T = A_n A_n^T,
    A_n = diag(sqrt(p_n)) - p_n sqrt(p_n)^T,

with p_n the FP model's softmax (F_n is the Fisher information of the logits). With probe vectors r_m,
E[r r^T] = I, the vectors v_{n,m} = A_n r_m are backpropagated once each (one backward pass per probe for
all units); g_{n,p,m} = J_{n,p}^T v_{n,m} is the gradient at point p, and

    KL_u ~= 1/N sum_n 1/2 w sum_m (sum_{p in u} <g_{n,p,m}, delta_{n,p}>)^2,

exact in expectation. The probes are the C basis vectors e_c (w = 1, F exactly, no sampling noise) when
the model has at most `probes` classes, else `probes` Rademacher vectors (w = 1/probes). Cost: one FP
forward with gradients, `probes` backward passes and one evaluation of every quantized layer, whatever the
number of units. Assumptions (docs/analyze.md): the second-order expansion of the KL and a linear model
between a point and the logits (both exact as the perturbation goes to 0; at 2 bits the estimate ranks
units, its values are not the exact KL); each point's tensor is batch-major (image n owns a contiguous
block of rows, as in every supported family, Swin's windows included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant import QUANT_LAYERS, Quantizer, quantizers_disabled
from .sensitivity import Unit
from .stats import fake_quant

PROBES = 2  # backward passes per micro-batch (basis vectors instead when the model has at most this many classes)
MICRO_BATCH = 4  # images per forward-with-gradients: Swin-T at 224 px needs ~0.4 GB per image (graph, inputs, perturbations)


@dataclass
class Point:
    """Where a unit perturbs the model: a quantized layer's output or a standalone activation quantizer's output."""

    name: str
    module: nn.Module
    quantizers: frozenset[str]  # the layer's quantizers the units switch on (full names); the quantizer itself otherwise


def unit_points(model: nn.Module, units: list[Unit]) -> tuple[dict[str, Point], list[list[str]]]:
    """The points every unit perturbs, and each unit's point names.

    Raises ValueError when two units switch on different quantizers of one layer (the estimate evaluates
    every layer once, with one set of quantizers on).
    """
    named = dict(model.named_modules())
    owner: dict[str, str] = {}
    for name, mod in named.items():
        if isinstance(mod, QUANT_LAYERS):
            owner[f"{name}.w_quant"] = owner[f"{name}.a_quant"] = name
    points: dict[str, Point] = {}
    per_unit = []
    for unit in units:
        mine: dict[str, set[str]] = {}
        for q in unit.quantizers:
            mine.setdefault(owner.get(q, q), set()).add(q)
        for name, qs in mine.items():
            point = points.setdefault(name, Point(name, named[name], frozenset(qs)))
            if point.quantizers != qs:
                raise ValueError(f"units switch on different quantizers of {name}: {sorted(point.quantizers)} and {sorted(qs)}")
        per_unit.append(list(mine))
    return points, per_unit


def probe_vectors(probs: Tensor, probes: int, generator: torch.Generator) -> tuple[list[Tensor], float]:
    """Vectors v_m = A r_m to backpropagate from the logits (rows of `probs` are p_n) and the weight w of their squares."""
    classes = probs.shape[-1]
    root = probs.sqrt()
    if classes <= probes:
        rs = [torch.zeros_like(probs).index_fill_(-1, torch.tensor([c]), 1.0) for c in range(classes)]
        weight = 1.0
    else:
        rs = [torch.randint(0, 2, probs.shape, generator=generator, dtype=probs.dtype) * 2 - 1 for _ in range(probes)]
        weight = 1.0 / probes
    return [root * r - probs * (root * r).sum(-1, keepdim=True) for r in rs], weight


@contextlib.contextmanager
def _captured(points: dict[str, Point]) -> Iterator[dict[str, list[tuple[Tensor, Tensor, tuple[int, int]]]]]:
    """Forward hooks keeping (input, output, their versions) of every point; a quantizer's output becomes its own node."""
    calls: dict[str, list[tuple[Tensor, Tensor, tuple[int, int]]]] = {name: [] for name in points}
    handles = []
    for name, point in points.items():
        def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> Tensor:
            if isinstance(mod, Quantizer):
                out = out.view_as(out)  # a disabled quantizer returns its input; the gradient at its output is wanted
            calls[name].append((args[0], out, (args[0]._version, out._version)))
            return out
        handles.append(point.module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _delta(point: Point, x: Tensor, y: Tensor, versions: tuple[int, int]) -> Tensor:
    """The point's perturbation: its output with the unit's quantizers on minus the FP output `y`.

    Raises ValueError when the model changed the point's input or output in place after the point ran.
    """
    if (x._version, y._version) != versions:
        raise ValueError(f"{point.name}: its input or output was modified in place after it ran; the estimate cannot use it")
    x = x.detach()
    if isinstance(point.module, Quantizer):
        return fake_quant(point.module, x) - x
    quantizers = dict(point.module.named_modules(prefix=point.name))
    with quantizers_disabled(point.module):
        for q in point.quantizers:
            quantizers[q].enabled = True
        return point.module.forward(x) - y.detach()


def taylor_sensitivity(model: nn.Module, units: list[Unit], batches: list[tuple[Tensor, Tensor]], *,
                       probes: int = PROBES, micro_batch: int = MICRO_BATCH, seed: int = 0,
                       forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                       advance: Callable[..., None] | None = None) -> tuple[list[float], list[Tensor]]:
    """Second-order estimate of KL(FP || Q) for every unit from one FP forward and `probes` backward passes.

    Args:
        model: the quantized model (its quantizers are switched off for the FP pass, restored after).
        units: what to estimate (`build_units`/`group_units`).
        batches: (images, labels) analysis batches; processed `micro_batch` images at a time.
        probes: Rademacher probe vectors per image (the basis vectors when the model has at most this many classes).
        seed: seed of the probe vectors (the estimate is deterministic).
        forward_context: entered around every forward (the analysis' statistics hooks ride on it).
        advance: called after each micro-batch (progress).
    Returns:
        The estimated KL of each unit (in `units` order) and the FP logits of each batch.
    Raises:
        ValueError when a point's tensor has no whole number of rows per image.
    """
    points, per_unit = unit_points(model, units)
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, list[Tensor]] = {name: [] for name in points}  # per point: [images, probes] of <g, delta>
    fp_logits, weight = [], 1.0
    was_training = model.training
    model.eval()
    try:
        for images, _ in batches:
            batch_logits = []
            for chunk in images.split(micro_batch):
                logits, chunk_scores, weight = _micro_batch(model, points, chunk, probes, generator, forward_context)
                batch_logits.append(logits)
                for name, s in chunk_scores.items():
                    scores[name].append(s)
                if advance is not None:
                    advance()
            fp_logits.append(torch.cat(batch_logits))
    finally:
        model.train(was_training)
    per_point = {name: torch.cat(s) for name, s in scores.items()}
    kl = []
    for names in per_unit:
        total = sum((per_point[n] for n in names), torch.zeros_like(next(iter(per_point.values()))))
        kl.append(float(0.5 * weight * total.pow(2).sum(1).mean()))
    return kl, fp_logits


def _micro_batch(model: nn.Module, points: dict[str, Point], images: Tensor, probes: int, generator: torch.Generator,
                 forward_context: Callable[[], contextlib.AbstractContextManager] | None
                 ) -> tuple[Tensor, dict[str, Tensor], float]:
    """FP forward with gradients over `images`, the perturbations, then one backward pass per probe vector."""
    n = images.shape[0]
    with (quantizers_disabled(model), torch.enable_grad(), _captured(points) as calls,
          forward_context() if forward_context is not None else contextlib.nullcontext()):
        logits = model(images.detach().requires_grad_())
    flat = [(name, x, y, versions) for name, cs in calls.items() for x, y, versions in cs]
    for name, _, y, _ in flat:
        if y.shape[0] % n:
            raise ValueError(f"{name}: output rows {y.shape[0]} are not a multiple of the {n} images (not batch-major)")
    deltas = [_delta(points[name], x, y, versions) for name, x, y, versions in flat]
    vectors, weight = probe_vectors(torch.softmax(logits.detach().double(), -1), probes, generator)
    outputs = [y for _, _, y, _ in flat]
    scores = {name: torch.zeros(n, len(vectors), dtype=torch.float64) for name in points}
    for m, v in enumerate(vectors):
        grads = torch.autograd.grad(logits, outputs, grad_outputs=v.to(logits.dtype), retain_graph=m < len(vectors) - 1,
                                    allow_unused=True)
        with torch.no_grad():
            for (name, *_), g, d in zip(flat, grads, deltas):
                if g is not None:  # per image <g, delta>: a batched dot product (float32, BLAS)
                    scores[name][:, m] += (g.reshape(n, 1, -1) @ d.reshape(n, -1, 1)).flatten().double()
    return logits.detach(), scores, weight
