"""Run folders of `quantize`: run.json, atomic checkpoints, RNG capture, and rebuilding the trained model.

Layout of a run folder::

    run.json               identity (model, data, recipe, seed, versions) + progress (epochs, top-1)
    recipe.resolved.toml   the recipe after override files and flags
    metrics.jsonl          one JSON object per logged step / finished epoch
    checkpoints/index.json {"last": "<dir>", "best": "<dir>"}, replaced atomically
    checkpoints/<dir>/     model.safetensors (every parameter and quantizer buffer) +
                           state.pt (optimizer, loop position, RNG of every process, oscillation state;
                           plain tensors/containers only, read with torch.load(weights_only=True))

A checkpoint directory is written under a temporary name and renamed into place; only then does
index.json move to it, and only after that is the previous directory deleted. A crash or a full disk
at any moment leaves index.json pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import RunError
from ..recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

RUN_FORMAT = "vitqtool-run"
RUN_VERSION = 1
CKPT_DIR = "checkpoints"
INDEX = "index.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


@dataclass
class RunModel:
    """A trained (or calibrated) quantized model rebuilt from a run folder."""

    model: nn.Module
    data_config: dict
    recipe: Recipe
    meta: dict


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run_json(run_dir: Path, meta: dict) -> None:
    """Write run.json atomically."""
    atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=2, default=str) + "\n")


def read_run_json(run_dir: Path) -> dict:
    """run.json of a vitqtool run folder; RunError if the folder is not one."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise RunError(f"'{run_dir}' is not a vitqtool run folder (no run.json); pass the --out folder of a `quantize` run")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"'{path}' is unreadable ({exc}); the run folder is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
        raise RunError(f"'{path}' was not written by vitqtool quantize (format is {meta.get('format') if isinstance(meta, dict) else None!r})")
    if int(meta.get("format_version", 0)) > RUN_VERSION:
        raise RunError(f"'{run_dir}' has run format version {meta['format_version']}, newer than this vitqtool ({RUN_VERSION}); upgrade vitqtool")
    return meta


def read_index(run_dir: Path) -> dict[str, str]:
    """The checkpoint index ({"last": dir, "best": dir}); empty when no checkpoint was written yet."""
    path = Path(run_dir) / CKPT_DIR / INDEX
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's torch/CUDA/numpy/python RNG states as tensors and plain values (weights_only-safe)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what `capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# ----------------------------------------------------------------------------------------- checkpoints


def _save_model_file(state: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})


def _save_state_file(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer as independent contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: Path, name: str, model_sd: dict[str, Tensor], state: dict[str, Any], best: bool) -> str:
    """Write checkpoint `name` atomically, point index.json's "last" (and "best") at it, delete unreferenced ones.

    Raises RunError (previous checkpoint intact) when writing fails, e.g. on a full disk.
    """
    ckpt_root = Path(run_dir) / CKPT_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    index = read_index(run_dir)
    target = ckpt_root / name
    suffix = 1
    while target.exists():
        target = ckpt_root / f"{name}.{suffix}"
        suffix += 1
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    try:
        _save_model_file(model_sd, tmp / MODEL_FILE)
        _save_state_file(state, tmp / STATE_FILE)
        os.rename(tmp, target)
        new_index = {"last": target.name, "best": target.name if best or "best" not in index else index["best"]}
        atomic_write_text(ckpt_root / INDEX, json.dumps(new_index) + "\n")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.exists() and read_index(run_dir).get("last") != target.name:
            shutil.rmtree(target, ignore_errors=True)
        kept = f"the previous checkpoint '{index['last']}' is kept" if index.get("last") else "no earlier checkpoint exists"
        raise RunError(f"could not write checkpoint {name} in '{ckpt_root}' ({exc.strerror or exc}); {kept}; free disk space and --resume") from None
    for entry in ckpt_root.iterdir():
        if entry.is_dir() and entry.name not in new_index.values():
            shutil.rmtree(entry, ignore_errors=True)
    return target.name


def load_checkpoint(run_dir: Path, which: str = "last") -> tuple[dict[str, Tensor], dict[str, Any]]:
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
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing file, corrupt zip/safetensors header
        raise RunError(f"checkpoint '{folder}' is unreadable ({exc}); the run folder is damaged") from None
    return model_sd, state


def load_run_model(run_dir: Path, which: str = "best") -> RunModel:
    """Rebuild the quantized model of a run (timm architecture + recipe layout) and load checkpoint `which` strictly.

    Args:
        run_dir: the --out folder of `quantize`.
        which: "best" (highest validation top-1) or "last".
    Returns:
        RunModel with the model in eval mode, its data config, resolved recipe and run.json metadata.
    Raises:
        RunError when the folder is not a vitqtool run or has no checkpoint; WeightsError if the
        checkpoint does not match the rebuilt model.
    """
    from ..api import prepare
    from ..models import load_strict, resolve_model

    run_dir = Path(run_dir)
    meta = read_run_json(run_dir)
    recipe = load_recipe(run_dir / "recipe.resolved.toml")
    model_sd, _ = load_checkpoint(run_dir, which)
    loaded = resolve_model(meta["architecture"], random_init=True, model_args=meta.get("model_args") or None)
    model = prepare(loaded.model, recipe, inplace=True)
    load_strict(model, model_sd, f"checkpoint '{which}' of run '{run_dir}'")
    model.eval()
    return RunModel(model=model, data_config=dict(meta["data_config"]), recipe=recipe, meta=meta)
