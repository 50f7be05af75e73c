"""Post-training quantization beyond step calibration: `ln-channel` reparameterization and block-wise reconstruction.

Both work on a prepared (quantized-layout) model and stay within its uniform quantizers, so runs,
exports and every export format are unchanged in shape. The family knowledge they need comes from the
family plugin: which norm feeds which Linears through which input quantizer (`Family.norm_pairs`), and the
model's segments in execution order (`block_names`, `block_inputs`). The math is in `quant.reparam` and
`quant.reconstruct`; this module walks the model.

Reconstruction keeps one segment's activations at a time: the quantized model's inputs of the segment,
the FP model's inputs and the FP segment's outputs (the targets), for every calibration image; above
`memory_limit` bytes they live in file-backed tensors in a temporary folder instead of memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import quant
from ..errors import ModelError
from ..families import get_family
from ..progress import progress_bar
from ..recipe import ReconstructSection

log = logging.getLogger(__name__)

MEMORY_LIMIT = 2 << 30  # bytes of cached activations kept in memory; more goes to file-backed tensors
STREAM_BATCH = 64       # images per forward when filling the caches


# ----------------------------------------------------------------------------------------- reparameterization


@torch.no_grad()
def reparameterize(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, Any]:
    """`ln-channel`: measure each norm pair's per-channel input ranges on `batches` (FP) and fold them (quant.reparam).

    Run before `calibrate` (the steps are initialised on the reparameterized model). Returns a summary:
    pairs folded, how many with a shift, and the median over pairs of the widest channel range over the
    median channel range before folding (after it, every channel has the same range).
    """
    pairs = get_family(model).norm_pairs(model)
    if not pairs:
        return {"method": "ln-channel", "pairs": 0, "shifted": 0, "range_spread_before": None}
    device = next(model.parameters()).device
    quantizers = {p.quantizer: model.get_submodule(p.quantizer) for p in pairs}
    ranges = quant.channel_ranges(model, quantizers, (x.to(device) for x in batches))
    spreads, shifted = [], 0
    for pair in pairs:
        norm = model.get_submodule(pair.norm)
        linears = [lin for lin in map(model.get_submodule, pair.linears) if isinstance(lin, nn.Linear)]
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        if (len(linears) != len(pair.linears) or not isinstance(weight, torch.Tensor) or weight.dim() != 1
                or any(lin.in_features != weight.numel() for lin in linears)):
            raise ModelError(f"{pair.norm}: no per-channel affine matching the input of {', '.join(pair.linears)}; "
                             "ln-channel reparameterization cannot fold into it")
        use_shift = pair.shift and bias is not None and all(lin.bias is not None for lin in linears)
        low, high = ranges[pair.quantizer]
        scale, shift = quant.channel_factors(low.to(weight.device), high.to(weight.device), use_shift)
        quant.fold_norm_scale_(weight, bias, [(lin.weight, lin.bias) for lin in linears], scale, shift)
        half = (high - low) if use_shift else torch.maximum(high.abs(), low.abs())
        spreads.append(float(half.max() / half.median().clamp(min=1e-12)))
        shifted += int(use_shift)
    return {"method": "ln-channel", "pairs": len(pairs), "shifted": shifted,
            "range_spread_before": round(float(np.median(spreads)), 3)}


# ----------------------------------------------------------------------------------------- reconstruction


def activation_cache(n: int, shape: tuple[int, ...], dtype: torch.dtype, folder: Path | None, name: str) -> Tensor:
    """Room for `n` activations of one shape: in memory, or a file-backed tensor under `folder` (unlinked at once:
    the mapping outlives the file's name, and its disk space is freed with the tensor)."""
    if folder is None:
        return torch.empty((n, *shape), dtype=dtype)
    path = folder / f"{name}.bin"
    data = torch.from_file(str(path), shared=True, size=n * math.prod(shape), dtype=dtype).view(n, *shape)
    path.unlink()
    return data


def cache_bytes(n: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes `n` activations of `shape` take."""
    return n * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass
class _Streams:
    """The caches of the segment being reconstructed and where new caches go."""

    folder: Path | None
    made: int = 0

    def new(self, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        self.made += 1
        return activation_cache(n, shape, dtype, self.folder, f"cache{self.made}")


@torch.no_grad()
def _map(module: nn.Module, source: Tensor, streams: _Streams, device: torch.device) -> Tensor:
    """`module` applied to every row of `source`, into a new cache (module in eval mode)."""
    out: Tensor | None = None
    for lo in range(0, source.shape[0], STREAM_BATCH):
        y = module(source[lo:lo + STREAM_BATCH].to(device)).cpu()
        if out is None:
            out = streams.new(source.shape[0], tuple(y.shape[1:]), y.dtype)
        out[lo:lo + y.shape[0]] = y
    assert out is not None
    return out


@torch.no_grad()
def _stem_outputs(model: nn.Module, fp_model: nn.Module, batches: Iterable[Tensor], n: int,
                  memory_limit: int, stack: contextlib.ExitStack) -> tuple[Tensor, Tensor, _Streams]:
    """The first segment's inputs in the quantized and in the FP model for the first `n` images of `batches`."""
    device = next(model.parameters()).device
    family = get_family(model)
    caches: list[Tensor] = []
    streams: _Streams | None = None
    filled = 0
    for images in batches:
        images = images[: n - filled].to(device)
        xq = family.block_inputs(model, images)[0].cpu()
        xf = family.block_inputs(fp_model, images)[0].cpu()
        if streams is None:
            shape = tuple(xq.shape[1:])
            on_disk = 4 * cache_bytes(n, shape, xq.dtype) > memory_limit
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitq-recon-"))) if on_disk else None
            if on_disk:
                log.info("reconstruction caches go to %s (%.1f GB per cache)", folder, cache_bytes(n, shape, xq.dtype) / 1e9)
            streams = _Streams(folder)
            caches = [streams.new(n, shape, xq.dtype), streams.new(n, shape, xf.dtype)]
        caches[0][filled:filled + xq.shape[0]] = xq
        caches[1][filled:filled + xf.shape[0]] = xf
        filled += xq.shape[0]
        if filled >= n:
            break
    if streams is None or filled < n:
        raise ValueError(f"reconstruction needs {n} calibration images, the batches gave {filled}")
    return caches[0], caches[1], streams


def _generator(seed: int, index: int) -> torch.Generator:
    """The random stream of segment `index` (a function of the seed and the index only, so a resumed run repeats it)."""
    mixed = int(np.random.SeedSequence([seed, 0x5EC0, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator().manual_seed(mixed)


def reconstruct(model: nn.Module, fp_model: nn.Module, batches: Iterable[Tensor], n_images: int, settings: ReconstructSection,
                *, seed: int = 0, start: int = 0, on_block: Callable[[int, dict], None] | None = None,
                show_progress: bool = False, memory_limit: int = MEMORY_LIMIT) -> list[dict]:
    """Reconstruct every segment of the calibrated `model` in order against `fp_model` (its FP original) on `n_images`.

    Segment `i` learns its rounding and steps (quant.reconstruct_block) on its inputs in the quantized
    model (segments before it already reconstructed) to match the FP segment's outputs on the FP inputs.
    Segments before `start` are only run (a resumed run: they were reconstructed and loaded). After each
    segment `on_block(i, record)` is called (checkpointing). Returns one record per reconstructed
    segment: name, output MSE against FP before and after (on the calibration images) and the learning's
    own figures. Raises ValueError when `batches` hold fewer than `n_images` images.
    """
    names = get_family(model).block_names(model)
    device = next(model.parameters()).device
    records = []
    was_training = (model.training, fp_model.training)
    model.eval()
    fp_model.eval()
    columns = ("loss {task.fields[loss]:.4f}",)
    try:
        with contextlib.ExitStack() as stack:
            x_q, x_fp, streams = _stem_outputs(model, fp_model, batches, n_images, memory_limit, stack)
            bar = stack.enter_context(progress_bar(show_progress, *columns))
            for index, name in enumerate(names):
                block, fp_block = model.get_submodule(name), fp_model.get_submodule(name)
                targets = _map(fp_block, x_fp, streams, device)
                if index >= start and any(isinstance(m, quant.QUANT_LAYERS) for m in block.modules()):
                    record = _reconstruct_one(name, index, block, x_q, x_fp, targets, settings, seed, bar, device)
                    records.append(record)
                    if on_block is not None:
                        on_block(index, record)
                x_q, x_fp = _map(block, x_q, streams, device), targets
    finally:
        model.train(was_training[0])
        fp_model.train(was_training[1])
    return records


def _reconstruct_one(name: str, index: int, block: nn.Module, x_q: Tensor, x_fp: Tensor, targets: Tensor,
                     cfg: ReconstructSection, seed: int, bar: Any, device: torch.device) -> dict:
    """One segment: MSE before, learning (with a progress task), MSE after."""
    power = float(targets.float().pow(2).mean()) or 1.0
    before = quant.block_mse(block, x_q, targets, STREAM_BATCH)
    task = bar.add_task(f"reconstruct {name}", total=cfg.iters, loss=float("nan")) if bar is not None else None

    def progress(step: int, loss: float) -> None:
        if bar is not None:
            bar.update(task, completed=step, loss=loss)

    with _on_device(x_q, x_fp, targets, device) as (inputs, fp_inputs, tgt):
        learned = quant.reconstruct_block(block, inputs, fp_inputs, tgt, cfg, _generator(seed, index), progress)
    after = quant.block_mse(block, x_q, targets, STREAM_BATCH)
    log.info("reconstructed %s: output MSE %.4g -> %.4g (%.1f s)", name, before, after, learned["seconds"])
    return {"name": name, "mse_before": before, "mse_after": after, "relative_mse_before": before / power,
            "relative_mse_after": after / power, **learned}


@contextlib.contextmanager
def _on_device(x_q: Tensor, x_fp: Tensor, targets: Tensor, device: torch.device) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The caches as the learning reads them: as they are on CPU, copied to an accelerator otherwise."""
    if device.type == "cpu":
        yield x_q, x_fp, targets
    else:
        yield x_q.to(device), x_fp.to(device), targets.to(device)
