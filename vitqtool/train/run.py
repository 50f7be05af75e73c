"""A QAT (or calibration-only) run on `accelerate`: the run folder, calibration, the loop, run.json.

`open_run` checks the output folder before anything heavy is built; `run_quantization` takes the FP
model as an nn.Module (resolved by the commands layer), prepares and calibrates it, trains it and
keeps run.json (`RunInfo`) up to date. Resolving MODEL/data specs happens in `vitqtool.commands`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.artifacts import RunInfo
from ..core.models import load_strict
from ..core.prepare import prepare
from ..core.runs import METRICS_FILE, RECIPE_FILE, RECON_FILE, is_run_dir, load_checkpoint, read_index, read_run_info, write_run_info
from ..errors import RecipeError, RunError
from ..fileio import LOCK_FILE, atomic_write, folder_lock
from ..quant import FusedMismatch, OscillationTracker, check_fused_kernels, quant_layers, set_quantizers_fused
from ..recipe import Recipe
from .loop import RunInterrupted, Trainer, TrainState, append_metrics, restore, save, train, validate
from .post_training import calibrate_model, calibration_batches, load_reconstruction, reconstruct_run
from .sampling import AugmentedDataset
from .schedule import adamw
from .softlabels import MultiCropDataset, SoftLabelStore

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


@dataclass
class RunSession:
    """An opened run folder: the accelerator, the folder, and whether a checkpoint will be resumed."""

    accelerator: Any
    out: Path
    identity: dict
    resuming: bool


@contextlib.contextmanager
def open_run(out: Path, identity: dict, *, resume: bool = False, overwrite: bool = False,
             mixed_precision: str | None = None) -> Iterator[RunSession]:
    """Start the accelerator, lock the run folder (main process) and check it; `identity` gets the process count.

    A second writer on the same folder is refused naming the holder's PID. When the block fails before
    anything but the lock was written, the folder this call created is removed again. `mixed_precision`
    None keeps what `accelerate launch --mixed_precision` (or the accelerate config) set, else "no".
    """
    from accelerate import Accelerator

    check_launch()
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
    out = Path(out)
    identity = {**identity, "processes": acc.num_processes}
    created = not out.exists()
    with folder_lock(out) if acc.is_main_process else contextlib.nullcontext():
        try:
            resuming = _prepare_run_dir(out, identity, resume, overwrite, acc.is_main_process)
            acc.wait_for_everyone()
            yield RunSession(acc, out, identity, resuming)
        except BaseException:
            if acc.is_main_process and created and _contents(out) == []:
                shutil.rmtree(out, ignore_errors=True)
            raise


def check_launch() -> None:
    """Refuse launches that would silently run something else than asked (RunError naming the setting)."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and not torch.cuda.is_available():
        raise RunError("FSDP shards over CUDA devices and has no CPU path here; on CPU launch data parallel instead: "
                       "accelerate launch --multi_gpu --num_processes N -m vitqtool quantize ... (no GPU: N CPU processes)")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") and not torch.cuda.is_available():
        raise RunError("DeepSpeed needs GPUs; on CPU launch without --use_deepspeed")
    # accelerate's simple launcher (no --multi_gpu) starts ONE process but still sets MASTER_PORT for N > 1
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        raise RunError("accelerate launch --num_processes N without --multi_gpu starts a single process; use "
                       "--multi_gpu (without --cpu: on a machine without GPUs it starts N CPU processes)")


def _contents(folder: Path) -> list[Path]:
    """What a run folder holds besides its lock file."""
    return [p for p in folder.iterdir() if p.name != LOCK_FILE] if folder.is_dir() else []


def _prepare_run_dir(out: Path, identity: dict, resume: bool, overwrite: bool, is_main: bool) -> bool:
    """Check (and with --overwrite empty) the output folder; True when a checkpoint exists to resume from."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other; pass one")
    has_run = is_run_dir(out)
    if resume:
        if not has_run:
            raise RunError(f"nothing to resume in '{out}' (no run.json); start the run without --resume")
        recorded = read_run_info(out).identity
        now, then = _elastic_view(identity), _elastic_view(recorded)
        diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if diff == ["global_batch"] and isinstance(then["global_batch"], int):
            processes = identity.get("processes", 1)
            fix = (f"--batch-size {then['global_batch'] // processes}" if then["global_batch"] % processes == 0
                   else "a number of processes that divides it")
            plural = "es" if processes != 1 else ""
            raise RunError(f"'{out}' holds a run with a global batch of {then['global_batch']} images per optimiser step, this "
                           f"launch has {now['global_batch']} (--batch-size {now['global_batch'] // processes} x {processes} "
                           f"process{plural}); resume with {fix}")
        if diff:
            raise RunError(f"'{out}' holds a run with different settings ({', '.join(diff)}); "
                           "resume with the original flags, or use --overwrite or another --out")
        if not read_index(out) and not (out / RECON_FILE).is_file():
            raise RunError(f"nothing to resume in '{out}': the run stopped before its first checkpoint; start it again without --resume")
        return True
    contents = _contents(out)
    if contents:
        if not has_run and not (out / "checkpoints").exists():
            raise RunError(f"'{out}' exists, is not empty and is not a vitqtool run; choose another --out")
        if not overwrite and (read_index(out) or (out / RECON_FILE).is_file()):
            raise RunError(f"'{out}' already holds a run; pass --resume to continue it or --overwrite to start over")
        if not overwrite:
            log.info("'%s' holds a run that stopped before its first checkpoint; starting over", out)
        if is_main:
            for path in contents:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return False


def _elastic_view(identity: dict) -> dict:
    """What must match to resume a run: `identity` with the process count, per-process batch and gradient
    accumulation replaced by the global batch (images per optimiser step), which elastic resume keeps."""
    view = json.loads(json.dumps(identity))
    processes = view.pop("processes", 1)
    train = view.get("recipe", {}).get("train", {})
    batch = train.pop("batch_size", None)
    train.pop("grad_accum", None)
    view["global_batch"] = batch * processes if isinstance(batch, int) and isinstance(processes, int) else batch
    return view


def _keep_metrics_until(run_dir: Path, step: int) -> None:
    """Drop metrics lines written after the checkpoint we resume from (the killed run's lost steps)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the killed run's half-written last line
                break
            raise RunError(f"run folder '{run_dir}' is damaged: {METRICS_FILE} line {number} is not JSON") from None
        if not isinstance(record, dict):
            raise RunError(f"run folder '{run_dir}' is damaged: {METRICS_FILE} line {number} is not a JSON object")
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write(path, "".join(ln + "\n" for ln in kept))


def _use_fused(requested: bool | None, compile_model: bool, acc: Any) -> bool:
    """Whether to train with the fused quantizer kernels: as requested, or by default where they compute what eager does.

    The default is fused in float32 when `check_fused_kernels` passes on this device (a working compiler;
    the forward and input gradients bitwise, step gradients within 1 ulp of eager), eager otherwise (mixed
    precision, no compiler, another result) and under `--compile`, which fuses the eager quantizers itself.
    """
    if compile_model:
        if requested:
            raise RunError("--compile and --fuse-quantizers exclude each other: --compile fuses the quantizers with the "
                           "rest of the model; pass one")
        return False
    if requested is None and str(acc.mixed_precision) != "no":
        log.info("eager quantizers: the fused kernels are the default only in float32, not %s", acc.mixed_precision)
        return False
    try:
        check_fused_kernels(acc.device)
    except FusedMismatch as exc:
        if requested is None:
            log.warning("eager quantizers: %s", exc)
            return False
        log.warning("--fuse-quantizers: %s", exc)
    except Exception as exc:  # any compiler failure means "run eager"
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        if requested is None:
            log.warning("eager quantizers: torch.compile does not work on %s here (%s: %s)", acc.device, type(exc).__name__, first_line)
            return False
        raise RunError(f"--fuse-quantizers: torch.compile does not work on {acc.device} here "
                       f"({type(exc).__name__}: {first_line}); run with --eager-quantizers") from exc
    return requested is not False


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices/kernels; none on biases, norms, steps, offsets, embeddings."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    log.info("optimizer: %d tensors with weight decay %g, %d without", len(decay), weight_decay, len(no_decay))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_quantization(session: RunSession, model: nn.Module, info: RunInfo, *, recipe: Recipe, train_set: Any,
                     val_set: Any, kd_mode: str, teacher: nn.Module | None = None, soft_labels: Path | None = None,
                     save_every: int = 0, fuse_quantizers: bool | None = None, compile_model: bool = False,
                     show_progress: bool = False) -> RunInfo:
    """Prepare `model` with `recipe`, calibrate it, train it (unless the recipe is calibration only), keep run.json.

    `info` describes the run (source, architecture, data config, classes, ...); its progress fields are
    updated after each epoch and its status set to done, interrupted or failed. `fuse_quantizers` None
    chooses the fused quantizer kernels where they compute what the eager ones do (see `_use_fused`);
    `compile_model` trains a `torch.compile`d model (the quantizers then stay eager inside it).
    Returns the final RunInfo.
    """
    acc, out, rt = session.accelerator, session.out, recipe.train
    micro = rt.batch_size // rt.grad_accum
    cfg, num_classes = info.data_config, info.num_classes
    if rt.enabled and len(train_set) < micro * acc.num_processes:
        raise RunError(f"{len(train_set)} training images are fewer than one global batch "
                       f"({micro} x {acc.num_processes} processes); lower --batch-size")
    if teacher is not None:
        teacher = teacher.eval().requires_grad_(False).to(acc.device)
    trained = session.resuming and bool(read_index(out))  # a training checkpoint exists: post-training is done
    fp_reference = copy.deepcopy(model).to(acc.device) if recipe.reconstruct.blocks and not trained else None
    qmodel = prepare(model, recipe, inplace=True).to(acc.device)
    recon_start, calibration = 0, None
    if trained:
        model_sd, payload = load_checkpoint(out, "last")
        load_strict(qmodel, model_sd, f"last checkpoint of '{out}'")
    elif session.resuming:  # stopped during the block-wise reconstruction
        recon_start, calibration = load_reconstruction(out, qmodel)
        log.info("resuming the reconstruction of '%s' at segment %d", out, recon_start)
    else:
        # A calibration batch is one optimiser step's images (batch_size x processes); each process
        # calibrates on its micro-batch slices of them and quant.calibrate averages the statistics over
        # processes, so every rank gets identical steps, equal to one process with the global batch.
        calibration = calibrate_model(qmodel, recipe, calibration_batches(train_set, recipe, cfg, micro, acc,
                                                                           show_progress and acc.is_main_process))
        if acc.is_main_process:
            atomic_write(out / RECIPE_FILE, recipe.to_toml())
    fused = _use_fused(fuse_quantizers, compile_model, acc) if rt.enabled else False  # decided before any long work
    compile_model = compile_model and rt.enabled
    if session.resuming:
        info = replace(read_run_info(out), status="running", versions=info.versions, fused_quantizers=fused,
                       compiled=compile_model)
    else:
        info = replace(info, identity=session.identity, status="running", epochs_done=0, fused_quantizers=fused,
                       compiled=compile_model, epochs=rt.epochs if rt.enabled else 0, mixed_precision=str(acc.mixed_precision),
                       calibration=calibration)

    def record(state: TrainState, status: str = "running") -> None:
        nonlocal info
        info = replace(info, status=status, epochs_done=state.epoch, step=state.step, best_top1=state.best_top1,
                       last_top1=state.last_top1)
        if acc.is_main_process:
            write_run_info(out, info)

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_run_info(out, info)
    if fp_reference is not None:
        try:
            calibration = reconstruct_run(out, qmodel, fp_reference, recipe, train_set, cfg, calibration or {},
                                          is_main=acc.is_main_process, show_progress=show_progress, start=recon_start)
        except BaseException as exc:  # the reconstruction file keeps the finished blocks for --resume
            if acc.is_main_process:
                with contextlib.suppress(OSError):
                    write_run_info(out, replace(info, status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"))
            raise
        del fp_reference
        info = replace(info, calibration=calibration)
        if acc.is_main_process:
            write_run_info(out, info)
    set_quantizers_fused(qmodel, fused)  # after the reconstruction, which runs the eager quantizers

    train_items: MultiCropDataset | AugmentedDataset
    if kd_mode == "stored":
        assert soft_labels is not None, "resolve_kd_mode gives 'stored' only with soft_labels"
        store = SoftLabelStore.open(soft_labels)
        store.check(train_set, num_classes)
        train_items = MultiCropDataset(train_set, store, cfg, crops_per_image=recipe.kd.crops_per_image, seed=rt.seed)
    else:
        a = recipe.augment
        train_items = AugmentedDataset(train_set, cfg, a.scale, a.ratio, a.hflip, rt.seed)
    steps_per_epoch = len(train_set) // (micro * acc.num_processes) // rt.grad_accum
    if rt.enabled and steps_per_epoch == 0:
        raise RunError(f"{len(train_set)} training images are fewer than one optimiser step "
                       f"({rt.batch_size} x {acc.num_processes} processes); lower --batch-size or --grad-accum")
    obr_layers = quant_layers(qmodel, recipe.obr.modules) if recipe.obr.enabled and rt.enabled else []
    tracker = None
    if recipe.oscillation.track and rt.enabled:
        o = recipe.oscillation
        tracker = OscillationTracker(qmodel, momentum=o.momentum, threshold=o.threshold, freeze=o.freeze, fused=fused)
    optimizer = adamw(_param_groups(qmodel, rt.weight_decay), lr=rt.lr)
    prepared_model, optimizer = acc.prepare(qmodel, optimizer)
    if compile_model:  # compiles on the first step; Trainer.raw (evaluation, checkpoints) stays the plain module
        prepared_model = torch.compile(prepared_model)
    tr = Trainer(acc, prepared_model, optimizer, recipe, out, train_items, val_set, cfg, num_classes, micro, steps_per_epoch,
                 kd_mode, teacher, tracker, obr_layers, save_every, show_progress, on_epoch=record)
    state = TrainState()
    if trained:
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
            status = "interrupted" if isinstance(exc, (RunInterrupted, KeyboardInterrupt)) else "failed"
            with contextlib.suppress(OSError):  # e.g. the disk that failed the checkpoint is still full
                write_run_info(out, replace(info, status=status))
        raise
    record(state, "done")
    if acc.is_main_process:
        (out / RECON_FILE).unlink(missing_ok=True)  # the checkpoints hold the reconstructed model now
    acc.wait_for_everyone()
    return info
