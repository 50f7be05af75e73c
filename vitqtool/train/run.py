"""`quantize`: resolve recipe, model, data and run folder, calibrate, then train (or stop after calibration for PTQ)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RecipeError, RunError
from ..recipe import Recipe, load_recipe
from .checkpoint import (RUN_FORMAT, RUN_VERSION, atomic_write_text, load_checkpoint, read_index, read_run_json,
                         write_run_json)
from .loop import RunInterrupted, Trainer, TrainState, append_metrics, restore, save, train, validate
from .sampling import CALIBRATION, AugmentedDataset, ShardedBatchSampler

log = logging.getLogger(__name__)


def resolve_kd_mode(recipe: Recipe, soft_labels: Path | None) -> str:
    """"online", "stored" or "none" from the recipe's kd.mode and whether a label store was given."""
    mode = recipe.kd.mode
    if mode == "auto":
        mode = "stored" if soft_labels is not None else "online"
    if mode == "stored" and soft_labels is None:
        raise RecipeError("kd.mode = 'stored' needs --soft-labels DIR (make one with `vitqtool softlabels`)")
    if mode != "stored" and soft_labels is not None:
        raise RecipeError(f"--soft-labels was given but the recipe's kd.mode is {recipe.kd.mode!r}; use kd.mode = 'auto' or 'stored'")
    if mode == "stored" and recipe.kd.hard_label_weight:
        raise RecipeError("kd.hard_label_weight must be 0 with stored soft labels (the multi-crop targets carry no hard label)")
    if mode == "none" and not recipe.kd.hard_label_weight and recipe.train.enabled:
        raise RecipeError("kd.mode = 'none' trains on hard labels only; set kd.hard_label_weight > 0")
    return mode


def _versions() -> dict[str, str]:
    import accelerate
    import timm

    from .. import __version__

    return {"vitqtool": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def _prepare_run_dir(out: Path, identity: dict, resume: bool, overwrite: bool, is_main: bool) -> bool:
    """Check (and with --overwrite empty) the output folder; True when a checkpoint exists to resume from."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other; pass one")
    has_run = (out / "run.json").is_file()
    if has_run and resume:
        meta = read_run_json(out)
        diff = sorted(k for k in set(identity) | set(meta.get("identity", {})) if identity.get(k) != meta.get("identity", {}).get(k))
        if diff:
            raise RunError(f"'{out}' holds a run with different settings ({', '.join(diff)}); resume with the original flags, or use --overwrite or another --out")
        return bool(read_index(out))
    if out.exists() and any(out.iterdir()):
        if not has_run and not (out / "checkpoints").exists():
            raise RunError(f"'{out}' exists, is not empty and is not a vitqtool run; choose another --out")
        if not overwrite:
            raise RunError(f"'{out}' already holds a run; pass --resume to continue it or --overwrite to start over")
        if is_main:
            shutil.rmtree(out)
    if resume:
        log.info("nothing to resume in '%s'; starting a new run", out)
    return False


def _keep_metrics_until(run_dir: Path, step: int) -> None:
    """Drop metrics lines written after the checkpoint we resume from (the killed run's lost steps)."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices/kernels; none on biases, norms, steps, offsets, embeddings."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    log.info("optimizer: %d tensors with weight decay %g, %d without", len(decay), weight_decay, len(no_decay))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def quantize(model: str, *, bits: int | None = None, recipe: str | Path = "vaq", data: str = "builtin:mnist5k", out: Path,
             teacher: str | None = None, soft_labels: Path | None = None, weights: str | Path | None = None,
             random_init: bool = False, model_args: dict | None = None, teacher_weights: str | Path | None = None,
             epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
             warmup_epochs: float | None = None, grad_clip: float | None = None, grad_accum: int | None = None,
             seed: int | None = None, calib_batches: int | None = None, overrides: list[Path] | None = None,
             resume: bool = False, overwrite: bool = False, mixed_precision: str = "no", limit_train: int | None = None,
             save_every: int | None = None, limit_val: int | None = None, fuse_quantizers: bool = False,
             show_progress: bool = False) -> Path:
    """Quantize MODEL with a recipe (vaq QAT, lsq, or ptq calibration only) and write a run folder.

    Flags override recipe fields; `limit_train` trains on the first N training images and `limit_val`
    validates on N evenly spaced validation images (smoke tests); `fuse_quantizers` trains with the
    `torch.compile`d single-kernel fake quantizers (faster, needs a working compiler). Training runs on `accelerate` (launch with `accelerate launch -m
    vitqtool quantize ...` for several processes); every process calibrates on the same training
    images. Checkpoints every `save_every` steps and each epoch; `resume=True` continues exactly.

    Returns:
        The run folder (`out`), loadable with `load_run_model`, `evaluate` and `export`.
    Raises:
        RecipeError, ModelError, DataError for bad input; RunError for a run folder that holds
        another run, a non-finite loss, or a failed checkpoint write; RunInterrupted (exit 130) on SIGINT.
    """
    from accelerate import Accelerator

    from ..api import calibrate, prepare
    from ..data import TransformedDataset, check_num_classes, eval_transform, load_dataset
    from ..models import load_strict, resolve_model
    from ..quant import OscillationTracker, check_fused_kernels, quant_layers, set_quantizers_fused

    rec = load_recipe(recipe, override_files=overrides, set_fields={
        "quant.bits": bits, "train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr,
        "train.warmup_epochs": warmup_epochs, "train.grad_clip": grad_clip, "train.grad_accum": grad_accum,
        "train.seed": seed, "calibration.batches": calib_batches})
    soft_labels = Path(soft_labels) if soft_labels is not None else None
    kd_mode = resolve_kd_mode(rec, soft_labels) if rec.train.enabled else "none"
    rt = rec.train
    if rt.batch_size % rt.grad_accum:
        raise RecipeError(f"train.batch_size ({rt.batch_size}) must be a multiple of train.grad_accum ({rt.grad_accum})")
    micro = rt.batch_size // rt.grad_accum
    if save_every is not None and save_every < 0:
        raise RunError("--save-every must be >= 0 (0 = only at epoch ends)")
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
    out = Path(out)
    identity = {"model": model, "weights": str(weights) if weights else None, "random_init": random_init,
                "model_args": model_args or {}, "data": data, "limit_train": limit_train, "limit_val": limit_val, "teacher": teacher,
                "teacher_weights": str(teacher_weights) if teacher_weights else None,
                "soft_labels": str(soft_labels) if soft_labels else None, "recipe": rec.to_dict(),
                "processes": acc.num_processes}
    resuming = _prepare_run_dir(out, identity, resume, overwrite, acc.is_main_process)
    acc.wait_for_everyone()

    torch.manual_seed(rt.seed)
    random.seed(rt.seed)
    np.random.seed(rt.seed)
    loaded = resolve_model(model, weights=weights, random_init=random_init, model_args=model_args)
    train_ds, val_ds = load_dataset(data, "train"), load_dataset(data, "validation")
    num_classes = int(loaded.data_config.get("num_classes") or train_ds.num_classes)
    check_num_classes(train_ds, num_classes)
    if limit_train is not None:
        train_ds = torch.utils.data.Subset(train_ds, range(min(limit_train, len(train_ds))))
    if limit_val is not None:
        n_val = min(limit_val, len(val_ds))  # evenly spaced: a split may be sorted by class
        val_ds = torch.utils.data.Subset(val_ds, [i * len(val_ds) // n_val for i in range(n_val)])
    if len(train_ds) < micro * acc.num_processes:
        raise RunError(f"{len(train_ds)} training images are fewer than one global batch "
                       f"({micro} x {acc.num_processes} processes); lower --batch-size")
    teacher_model = None
    if kd_mode == "online":
        if teacher is None:
            teacher_model = copy.deepcopy(loaded.model)
        else:
            t = resolve_model(teacher, weights=teacher_weights, random_init=random_init, model_args=model_args)
            if tuple(t.data_config["input_size"]) != tuple(loaded.data_config["input_size"]) or t.data_config.get("num_classes", num_classes) != num_classes:
                raise RecipeError(f"teacher {teacher!r} takes {t.data_config['input_size']} with {t.data_config.get('num_classes')} classes, "
                                  f"the student {loaded.data_config['input_size']} with {num_classes}; use stored soft labels (`vitqtool softlabels`)")
            teacher_model = t.model
        teacher_model = teacher_model.eval().requires_grad_(False).to(acc.device)
    qmodel = prepare(loaded.model, rec, inplace=True).to(acc.device)
    cfg = loaded.data_config
    if resuming:
        model_sd, payload = load_checkpoint(out, "last")
        load_strict(qmodel, model_sd, f"last checkpoint of '{out}'")
    else:
        # A calibration batch is one optimiser step's images (batch_size x processes); each process
        # calibrates on its micro-batch slices of them and quant.calibrate averages the statistics over
        # processes, so every rank gets identical steps, equal to one process with the global batch.
        n_calib = min(rec.calibration.batches * rt.grad_accum, len(train_ds) // (micro * acc.num_processes))
        sampler = ShardedBatchSampler(len(train_ds), micro, acc.num_processes, acc.process_index, rt.seed, 0, n_calib,
                                      stream=CALIBRATION)
        calibrate(qmodel, torch.utils.data.DataLoader(TransformedDataset(train_ds, eval_transform(cfg)), batch_sampler=sampler))
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "recipe.resolved.toml", rec.to_toml())
    if fuse_quantizers and rt.enabled:
        try:
            check_fused_kernels(acc.device)
        except Exception as exc:  # any compiler failure means "run without the flag"
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            raise RunError(f"--fuse-quantizers: torch.compile does not work on {acc.device} here "
                           f"({type(exc).__name__}: {first_line}); run without --fuse-quantizers") from exc
        set_quantizers_fused(qmodel, True)
    meta = {"format": RUN_FORMAT, "format_version": RUN_VERSION, "identity": identity, "source_model": loaded.source,
            "architecture": loaded.architecture, "model_args": loaded.model_args, "data_config": cfg, "data": data,
            "num_classes": num_classes, "seed": rt.seed, "recipe": rec.name, "bits": rec.quant.bits, "kd_mode": kd_mode,
            "versions": _versions(), "status": "running", "epochs_done": 0, "epochs": rt.epochs if rt.enabled else 0,
            "best_top1": None, "last_top1": None, "fused_quantizers": fuse_quantizers,
            # where the FP model came from; a transformers source's config.json lets `export --format hf` rebuild its layout
            "source_format": loaded.source_format, "source_config": loaded.source_config,
            "preprocessor_config": loaded.preprocessor_config}
    if resuming:
        meta = {**read_run_json(out), "status": "running", "versions": meta["versions"], "fused_quantizers": fuse_quantizers}

    def record(state: TrainState, status: str = "running") -> None:
        if acc.is_main_process:
            meta.update(status=status, epochs_done=state.epoch, step=state.step, best_top1=state.best_top1, last_top1=state.last_top1)
            write_run_json(out, meta)

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_run_json(out, meta)

    if kd_mode == "stored":
        from .softlabels import MultiCropDataset, SoftLabelStore

        store = SoftLabelStore.open(soft_labels)
        store.check(train_ds, num_classes)
        train_set = MultiCropDataset(train_ds, store, cfg, crops_per_image=rec.kd.crops_per_image, seed=rt.seed)
    else:
        a = rec.augment
        train_set = AugmentedDataset(train_ds, cfg, a.scale, a.ratio, a.hflip, rt.seed)
    steps_per_epoch = len(train_ds) // (micro * acc.num_processes) // rt.grad_accum
    if rt.enabled and steps_per_epoch == 0:
        raise RunError(f"{len(train_ds)} training images are fewer than one optimiser step "
                       f"({rt.batch_size} x {acc.num_processes} processes); lower --batch-size or --grad-accum")
    obr_layers = quant_layers(qmodel, rec.obr.modules) if rec.obr.enabled and rt.enabled else []
    tracker = None
    if rec.oscillation.track and rt.enabled:
        o = rec.oscillation
        tracker = OscillationTracker(qmodel, momentum=o.momentum, threshold=o.threshold, freeze=o.freeze)
    optimizer = torch.optim.AdamW(_param_groups(qmodel, rt.weight_decay), lr=rt.lr)
    prepared_model, optimizer = acc.prepare(qmodel, optimizer)
    tr = Trainer(acc, prepared_model, optimizer, rec, out, train_set, val_ds, cfg, num_classes, micro, steps_per_epoch,
                 kd_mode, teacher_model, tracker, obr_layers, save_every or 0, show_progress, on_epoch=record)
    state = TrainState()
    if resuming:
        state = restore(tr, payload)
        if acc.is_main_process:
            _keep_metrics_until(out, state.step)
        log.info("resuming '%s' at step %d (epoch %d, micro-batch %d)", out, state.step, state.epoch, state.batch)
    try:
        if not rt.enabled:  # PTQ: calibration only, then evaluate and save
            state.last_top1 = state.best_top1 = validate(tr)
            if acc.is_main_process:
                append_metrics(out, {"step": 0, "epoch": 0, "val_top1": state.last_top1, "best_top1": state.best_top1})
            save(tr, state, best=True)
        else:
            state = train(tr, state)
    except BaseException as exc:  # say in run.json why the run stopped; the last checkpoint stays resumable
        if acc.is_main_process:
            meta["status"] = "interrupted" if isinstance(exc, (RunInterrupted, KeyboardInterrupt)) else "failed"
            with contextlib.suppress(OSError):  # e.g. the disk that failed the checkpoint is still full
                write_run_json(out, meta)
        raise
    record(state, "done")
    acc.wait_for_everyone()
    return out
