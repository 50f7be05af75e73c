"""Reading a `quantize` run folder: run.json, the checkpoint index, checkpoints, and the trained model.

Layout of a run folder::

    run.json               RunInfo: identity (model, data, recipe, seed, versions) + progress
    recipe.resolved.toml   the recipe after override files and flags
    metrics.jsonl          one JSON object per logged step / finished epoch
    checkpoints/index.json {"last": "<dir>", "best": "<dir>"}, replaced atomically
    checkpoints/<dir>/     model.safetensors (every parameter and quantizer buffer) +
                           state.pt (CheckpointState; plain tensors/containers, read with weights_only=True)
    reconstruct.safetensors  while a block-wise reconstruction runs: the model after the last finished
                           block + progress in its metadata (train.post_training); removed when the run ends

Writing lives in `train.checkpoint`; this module only reads, so evaluation, export and analysis can
rebuild a run's model without the training code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import RunError, VitqError
from ..fileio import write_json
from ..recipe import Recipe, load_recipe
from .artifacts import CheckpointState, RunInfo
from .models import load_strict, resolve_model
from .prepare import prepare

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.resolved.toml"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
INDEX = "index.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
RECON_FILE = "reconstruct.safetensors"


@dataclass
class RunModel:
    """A trained (or calibrated) quantized model rebuilt from a run folder."""

    model: nn.Module
    data_config: dict
    recipe: Recipe
    info: RunInfo


def is_run_dir(path: str | Path) -> bool:
    """True when `path` is a folder holding a run.json."""
    return (Path(path) / RUN_FILE).is_file()


def write_run_info(run_dir: Path, info: RunInfo) -> None:
    """Write run.json atomically."""
    write_json(Path(run_dir) / RUN_FILE, info.to_dict())


def read_run_info(run_dir: str | Path) -> RunInfo:
    """run.json of a vitqtool run folder; RunError naming the problem if the folder is not one or is damaged."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunError(f"'{run_dir}' is not a vitqtool run folder (no run.json); pass the --out folder of a `quantize` run")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"run folder '{run_dir}' is damaged: run.json is unreadable ({exc})") from None
    try:
        return RunInfo.from_dict(document, "run.json")
    except RunError as exc:
        if "newer than this vitqtool" in str(exc):
            raise RunError(f"run folder '{run_dir}': {exc}") from None
        raise RunError(f"run folder '{run_dir}' is damaged: {exc}") from None


def read_index(run_dir: str | Path) -> dict[str, str]:
    """The checkpoint index ({"last": dir, "best": dir}); empty when no checkpoint was written yet."""
    path = Path(run_dir) / CKPT_DIR / INDEX
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"run folder '{run_dir}' is damaged: {CKPT_DIR}/{INDEX} is unreadable ({exc})") from None
    if not isinstance(index, dict) or not all(isinstance(v, str) and v and "/" not in v for v in index.values()):
        raise RunError(f"run folder '{run_dir}' is damaged: {CKPT_DIR}/{INDEX} is not a checkpoint index")
    return index


def load_checkpoint(run_dir: str | Path, which: str = "last") -> tuple[dict[str, Tensor], CheckpointState]:
    """(model state dict, training state) of checkpoint `which` ("last" or "best")."""
    from safetensors.torch import load_file

    if which not in ("last", "best"):
        raise RunError(f"checkpoint must be 'last' or 'best', got {which!r}")
    index = read_index(run_dir)
    if which not in index:
        raise RunError(f"run folder '{run_dir}' has no checkpoint yet; run `vitqtool quantize` (with --resume to continue it)")
    folder = Path(run_dir) / CKPT_DIR / index[which]
    try:
        model_sd = load_file(str(folder / MODEL_FILE), device="cpu")
        payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing file, corrupt zip/safetensors header
        raise RunError(f"checkpoint '{folder}' is unreadable ({exc}); the run folder is damaged") from None
    return model_sd, CheckpointState.from_dict(payload, f"checkpoint '{folder}'")


def load_run_model(run_dir: str | Path, which: str = "best") -> RunModel:
    """Rebuild the quantized model of a run (architecture + recipe layout) and load checkpoint `which` strictly.

    Raises RunError when the folder is not a vitqtool run or has no checkpoint; WeightsError if the
    checkpoint does not match the rebuilt model.
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    model_sd, _ = load_checkpoint(run_dir, which)
    try:
        loaded = resolve_model(info.architecture, random_init=True, model_args=info.model_args or None)
    except VitqError as exc:
        raise RunError(f"run folder '{run_dir}' is damaged: its model cannot be rebuilt ({exc})") from None
    model = prepare(loaded.model, recipe, inplace=True)
    load_strict(model, model_sd, f"checkpoint '{which}' of run '{run_dir}'")
    model.eval()
    return RunModel(model=model, data_config=dict(info.data_config), recipe=recipe, info=info)
