"""Writing checkpoints of a `quantize` run atomically, and capturing/restoring every RNG (layout: `core.runs`).

A checkpoint directory is written under a temporary name and renamed into place; only then does
index.json move to it, and only after that is the previous directory deleted. A crash or a full disk
at any moment leaves index.json pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.artifacts import CheckpointState
from ..core.runs import CKPT_DIR, INDEX, MODEL_FILE, STATE_FILE, read_index
from ..errors import RunError, WriteError
from ..fileio import atomic_dir, atomic_write, save_safetensors

log = logging.getLogger(__name__)


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


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python and numpy (model init, data order, crops; fresh streams on an elastic resume)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ----------------------------------------------------------------------------------------- checkpoints


def _save_state_file(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


def save_checkpoint(run_dir: Path, name: str, model_sd: dict[str, Tensor], state: CheckpointState, best: bool) -> str:
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
    try:
        with atomic_dir(target) as tmp:
            save_safetensors(tmp / MODEL_FILE, model_sd, metadata={"format": "pt"})
            _save_state_file(state.to_dict(), tmp / STATE_FILE)
        new_index = {"last": target.name, "best": target.name if best or "best" not in index else index["best"]}
        atomic_write(ckpt_root / INDEX, json.dumps(new_index) + "\n")
    except (OSError, WriteError) as exc:
        if target.exists() and read_index(run_dir).get("last") != target.name:
            shutil.rmtree(target, ignore_errors=True)
        reason = str(exc).partition("': ")[2] if isinstance(exc, WriteError) else (exc.strerror or str(exc))
        kept = f"the previous checkpoint '{index['last']}' is kept" if index.get("last") else "no earlier checkpoint exists"
        raise RunError(f"could not write checkpoint {name} in '{ckpt_root}' ({reason}); {kept}; free disk space and --resume") from None
    for entry in ckpt_root.iterdir():
        if entry.is_dir() and entry.name not in new_index.values():
            shutil.rmtree(entry, ignore_errors=True)
    return target.name
