"""The post-training part of a `quantize` run: calibration images, reparameterization, step init, reconstruction.

Runs before any training (a `ptq` recipe stops after it; a QAT recipe starts from it). Calibration
takes `calibration.batches` batches of the calibration image order, each process its slices; a set
smaller than one batch is used whole (no training happens here, so no global-batch rule applies).
Reconstruction uses the first `reconstruct.images` images of the same order on every process (every
process computes the same result) and, after each block, writes `reconstruct.safetensors` into the
run folder (the model so far and the progress), so `--resume` continues with the next block; the file
is removed when the run ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.models import load_strict
from ..core.prepare import calibrate
from ..core.ptq import reconstruct, reparameterize
from ..core.runs import RECON_FILE
from ..data import TransformedDataset, eval_transform
from ..errors import RunError
from ..fileio import atomic_write, save_safetensors, state_dict_for_safetensors
from ..progress import track
from ..recipe import Recipe
from .sampling import CALIBRATION, ShardedBatchSampler, epoch_permutation

log = logging.getLogger(__name__)

RECON_META = "vitqtool-reconstruct"  # safetensors metadata key of the progress document


def calibration_batches(train_set: Any, recipe: Recipe, data_config: dict, micro: int, acc: Any,
                        show_progress: bool = False) -> list[Tensor]:
    """This process's calibration images: `calibration.batches` micro-batches per process (fewer if the set is small)."""
    procs = acc.num_processes
    size = min(micro, len(train_set) // procs)
    if size == 0:
        raise RunError(f"{len(train_set)} calibration images are fewer than the {procs} processes; give more images")
    n = min(recipe.calibration.batches * recipe.train.grad_accum, len(train_set) // (size * procs))
    sampler = ShardedBatchSampler(len(train_set), size, procs, acc.process_index, recipe.train.seed, 0, n, stream=CALIBRATION)
    loader = torch.utils.data.DataLoader(TransformedDataset(train_set, eval_transform(data_config)), batch_sampler=sampler)
    return [images for images, _ in track(loader, "calibration data", total=n, enabled=show_progress)]


def calibrate_model(model: nn.Module, recipe: Recipe, batches: list[Tensor]) -> dict[str, Any]:
    """Reparameterize (when the recipe asks) and initialise every step on `batches`; returns what was done."""
    summary: dict[str, Any] = {"images": sum(b.shape[0] for b in batches)}
    if recipe.calibration.reparam == "ln-channel":
        summary["reparam"] = reparameterize(model, batches)
        log.info("ln-channel reparameterization: %d norm pairs", summary["reparam"]["pairs"])
    calibrate(model, batches)
    return summary


def _recon_images(train_set: Any, recipe: Recipe, data_config: dict) -> tuple[Iterator[Tensor], int]:
    """The first `reconstruct.images` images of the calibration order (the same on every process), and how many."""
    n = min(recipe.reconstruct.images, len(train_set))
    order = epoch_permutation(len(train_set), recipe.train.seed, 0, CALIBRATION)[:n].tolist()
    subset = torch.utils.data.Subset(TransformedDataset(train_set, eval_transform(data_config)), order)
    return (images for images, _ in torch.utils.data.DataLoader(subset, batch_size=64)), n


def reconstruct_run(out: Path, model: nn.Module, fp_model: nn.Module, recipe: Recipe, train_set: Any, data_config: dict,
                    summary: dict[str, Any], *, is_main: bool, show_progress: bool, start: int = 0) -> dict[str, Any]:
    """Block-wise reconstruction of a run's calibrated model, checkpointed after every block; returns the summary with it."""
    batches, n = _recon_images(train_set, recipe, data_config)
    r = recipe.reconstruct
    done = list(summary.get("reconstruct", {}).get("blocks", [])) if start else []

    def settings() -> dict[str, Any]:
        return {"images": n, "iters": r.iters, "batch_size": r.batch_size, "drop": r.drop, "blocks": done}

    def checkpoint(index: int, record: dict) -> None:
        done.append(record)
        if is_main:
            save_reconstruction(out, model, {**summary, "reconstruct": settings()}, index + 1)

    reconstruct(model, fp_model, batches, n, r, seed=recipe.train.seed, start=start, on_block=checkpoint,
                show_progress=show_progress)
    return {**summary, "reconstruct": settings()}


def save_reconstruction(out: Path, model: nn.Module, summary: dict[str, Any], next_block: int) -> None:
    """Write the model and the progress (`next_block`, the summary so far) to the run's reconstruction file."""
    meta = {"format": "pt", RECON_META: json.dumps({"next_block": next_block, "summary": summary})}
    atomic_write(Path(out) / RECON_FILE, lambda tmp: save_safetensors(tmp, state_dict_for_safetensors(model), metadata=meta))


def load_reconstruction(out: Path, model: nn.Module) -> tuple[int, dict[str, Any]]:
    """Load the reconstruction file into `model` (strictly); returns (next block to reconstruct, summary so far)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(out) / RECON_FILE
    try:
        with safe_open(str(path), "pt") as fh:
            progress = json.loads((fh.metadata() or {})[RECON_META])
        state = load_file(str(path), device="cpu")
        next_block, summary = int(progress["next_block"]), dict(progress["summary"])
    except Exception as exc:  # missing key, bad JSON, damaged file
        raise RunError(f"'{path}' is unreadable ({exc}); the run folder is damaged: start over with --overwrite") from None
    load_strict(model, state, f"reconstruction progress '{path}'")
    return next_block, summary
