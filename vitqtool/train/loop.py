"""The QAT training loop (method.md §5-§7) on `accelerate`: one loop for 1 CPU, 1 GPU and N processes.

Per optimiser step: `grad_accum` micro-batches, each `loss = L_task + lambda(t) * sum L_OBR` where
`L_task` is online KD against the teacher, soft cross-entropy against stored multi-crop labels, or
hard-label cross-entropy; gradient clipping; AdamW with a warmup + cosine learning rate; the
oscillation tracker after the step. Checkpoints every `save_every` steps, after each epoch and on
SIGINT; a non-finite loss stops the run (or skips the step when the recipe says so).

LSQ scales an activation step's gradient by `1/(Qp*sqrt(N_x))` with N_x counting the batch
(method.md §2). Each process (and each accumulated micro-batch) sees 1/(world*accum) of the batch,
so after backward the loop multiplies activation-step and offset gradients by `1/sqrt(world*accum)`:
N processes x B/N images then train like one process with B images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.artifacts import CheckpointState
from ..core.prepare import evaluate_model
from ..core.runs import read_index
from ..data import make_eval_loader
from ..errors import RunError
from ..fileio import state_dict_for_safetensors
from ..progress import progress_bar
from ..quant import iter_quantizers, obr_lambda, obr_loss
from ..recipe import Recipe
from .checkpoint import capture_rng, restore_rng, save_checkpoint, seed_everything
from .losses import kd_loss, soft_cross_entropy
from .sampling import ShardedBatchSampler, mix_seed
from .schedule import lr_at

log = logging.getLogger(__name__)


class RunInterrupted(RunError):
    """The run was stopped by a signal (SIGINT, SIGTERM, SIGHUP); a checkpoint was saved and `--resume` continues it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class TrainState:
    """Loop position and results; saved in every checkpoint."""

    epoch: int = 0                 # current epoch (epochs finished)
    batch: int = 0                 # micro-batches of `epoch` already consumed
    step: int = 0                  # optimiser steps done
    best_top1: float | None = None
    last_top1: float | None = None
    grad_accum: int = 0            # micro-batches per optimiser step when saved (0: a checkpoint from before elastic resume)


@dataclass
class Trainer:
    """Everything the loop needs, built by `run.run_quantization`."""

    accelerator: Any
    model: nn.Module               # as returned by accelerator.prepare (DDP-wrapped under N processes), maybe torch.compile'd
    optimizer: Any
    recipe: Recipe
    run_dir: Path
    train_set: Any                 # has set_epoch(); items (images, labels) or (crops, soft targets)
    val_set: Any
    data_config: dict
    num_classes: int
    micro_batch: int
    steps_per_epoch: int
    kd_mode: str                   # "online", "stored" or "none"
    teacher: nn.Module | None = None
    tracker: Any = None
    obr_layers: list = field(default_factory=list)
    save_every: int = 0
    show_progress: bool = False
    on_epoch: Callable[[TrainState], None] | None = None  # after each epoch's checkpoint (run.json update)

    @property
    def raw(self) -> nn.Module:
        """The model without the DDP and torch.compile wrappers (what is evaluated and saved)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run."""
        return self.recipe.train.epochs * self.steps_per_epoch


def task_loss(tr: Trainer, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(total task loss, the distillation part) for one micro-batch."""
    kd = tr.recipe.kd
    x, y = batch
    if tr.kd_mode == "stored":  # x: [B, C, 3, H, W] crops, y: [B, C, classes] recovered soft labels
        logits = tr.model(x.flatten(0, 1))
        part = soft_cross_entropy(logits.float(), y.flatten(0, 1).float())
        return part, part.detach()
    logits = tr.model(x)
    loss = kd.hard_label_weight * F.cross_entropy(logits.float(), y) if kd.hard_label_weight else logits.new_zeros(())
    if tr.kd_mode == "online":
        assert tr.teacher is not None, "online KD runs are built with a teacher"
        with torch.no_grad():
            teacher_logits = tr.teacher(x)
        part = kd_loss(logits.float(), teacher_logits.float(), kd.temperature)
        return loss + part, part.detach()
    return loss, loss.new_zeros(())


def _epoch_batches(tr: Trainer, epoch: int, start: int) -> Iterator:
    acc = tr.accelerator
    tr.train_set.set_epoch(epoch)
    sampler = ShardedBatchSampler(len(tr.train_set), tr.micro_batch, acc.num_processes, acc.process_index,
                                  tr.recipe.train.seed, epoch, tr.steps_per_epoch * tr.recipe.train.grad_accum, start)
    pin = acc.device.type == "cuda"  # pinned host memory: the copies below do not block the host
    loader = torch.utils.data.DataLoader(tr.train_set, batch_sampler=sampler, num_workers=tr.recipe.train.num_workers,
                                         pin_memory=pin)
    for x, y in loader:
        yield x.to(acc.device, non_blocking=pin), y.to(acc.device, non_blocking=pin)


def validate(tr: Trainer) -> float:
    """Validation top-1 (percent), each process evaluating its shard, counts summed across processes."""
    acc = tr.accelerator
    shard = torch.utils.data.Subset(tr.val_set, range(acc.process_index, len(tr.val_set), acc.num_processes))
    res = evaluate_model(tr.raw, make_eval_loader(shard, tr.data_config, tr.micro_batch), tr.num_classes)
    counts = torch.tensor([round(res["top1"] * res["n"] / 100), res["n"]], dtype=torch.float64, device=acc.device)
    counts = acc.reduce(counts, "sum") if acc.num_processes > 1 else counts
    return float(100 * counts[0] / counts[1])


def save(tr: Trainer, state: TrainState, best: bool = False) -> None:
    """Checkpoint model, optimizer, loop position, oscillation state and every process's RNG (main process writes)."""
    from accelerate.utils import broadcast_object_list, gather_object

    acc = tr.accelerator
    rng = gather_object([capture_rng()]) if acc.num_processes > 1 else [capture_rng()]
    error: list[str | None] = [None]
    if acc.is_main_process:
        payload = CheckpointState(
            train=dataclasses.asdict(state),
            optimizer=tr.optimizer.state_dict(),
            scaler=acc.scaler.state_dict() if acc.scaler is not None else {},
            rng=rng,
            oscillation=tr.tracker.state_dict() if tr.tracker is not None else {},
        )
        name = f"step-{state.step:08d}-e{state.epoch}-b{state.batch}"
        try:
            save_checkpoint(tr.run_dir, name, state_dict_for_safetensors(tr.raw), payload, best)
        except RunError as exc:
            error = [str(exc)]
    if acc.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        raise RunError(error[0])


def restore(tr: Trainer, payload: CheckpointState) -> TrainState:
    """Load optimizer, scaler, RNG and oscillation state from a checkpoint; returns the loop position.

    Elastic: a checkpoint written by another number of processes (or micro-batches per step) resumes at the
    same optimiser step; the caller has checked that the global batch is the same. The micro-batch position
    is converted, and each process's RNG is restored only when the process count is the one that saved it
    (otherwise every process seeds its RNG from the run seed, the step and its rank).
    """
    acc = tr.accelerator
    tr.optimizer.load_state_dict(payload.optimizer)
    if acc.scaler is not None and payload.scaler:
        acc.scaler.load_state_dict(payload.scaler)
    state = TrainState(**payload.train)
    accum, saved_accum = tr.recipe.train.grad_accum, state.grad_accum or tr.recipe.train.grad_accum
    saved_processes = len(payload.rng)
    if (saved_processes, saved_accum) != (acc.num_processes, accum):
        if not state.grad_accum:
            raise RunError(f"the checkpoint was written by {saved_processes} processes by a vitqtool without elastic resume; "
                           "resume it with the same number of processes and --grad-accum")
        if state.batch % saved_accum:
            raise RunError(f"the checkpoint is not at an optimiser-step boundary (micro-batch {state.batch}); it cannot be resumed "
                           "with another number of processes")
        log.warning("resuming a checkpoint of %d process(es) x %d micro-batch(es) per step on %d x %d: same global batch and "
                    "data order; random streams (dropout, stochastic depth) restart", saved_processes, saved_accum,
                    acc.num_processes, accum)
        state.batch = state.batch // saved_accum * accum
    if saved_processes == acc.num_processes:
        restore_rng(payload.rng[acc.process_index])
    else:
        seed_everything(mix_seed(tr.recipe.train.seed, state.step, acc.process_index))
    if tr.tracker is not None and payload.oscillation:
        tr.tracker.load_state_dict(payload.oscillation)
    return state


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one JSON line to metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


@contextlib.contextmanager
def _stop_flag() -> Iterator[list[int]]:
    """Turn SIGINT, SIGTERM and SIGHUP into a flag (the signal number) the loop polls between steps (main thread only)."""
    flag = [0]

    def handler(signum: int, frame: Any) -> None:
        flag[0] = signum

    previous = {}
    try:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _nonfinite_error(tr: Trainer, state: TrainState, losses: Tensor) -> RunError:
    """The one-line error for a non-finite loss in the optimiser step after `state` (built only when it happens)."""
    bad = (~torch.isfinite(losses[:, 0])).nonzero()
    where = (f"({losses[int(bad[0]), 0].item()}) at step {state.step + 1} (epoch {state.epoch + 1}, "
             f"micro-batch {state.batch + int(bad[0]) + 1})") if len(bad) else f"on another process at step {state.step + 1}"
    kept = f"the last good checkpoint is kept in '{tr.run_dir}'" if read_index(tr.run_dir) else "no checkpoint was written yet"
    return RunError(f"loss is not finite {where}; {kept}; lower --lr, set --grad-clip, or set train.skip_nonfinite = true "
                    "to skip such steps")


def train(tr: Trainer, state: TrainState) -> TrainState:
    """Run (or continue from `state`) the training loop to the recipe's last epoch; returns the final state.

    The host waits for the device once per optimiser step (finiteness of the step's losses and the stop flag,
    one small all-reduce under N processes) and once per logging interval (the loss record), never per
    micro-batch: the losses stay on the device until they are logged.
    """
    acc, rt = tr.accelerator, tr.recipe.train
    accum, total = rt.grad_accum, tr.total_steps
    state.grad_accum = accum
    warmup = round(rt.warmup_epochs * tr.steps_per_epoch)
    log_every = max(1, tr.recipe.oscillation.log_every)
    show = tr.show_progress and acc.is_main_process
    act_factor = (acc.num_processes * accum) ** -0.5
    quantizers = [q for _, q in iter_quantizers(tr.raw)]  # listed once: the step loop projects them after each update
    act_params = [p for q in quantizers if q.kind == "act" for p in q.parameters()]
    columns = ("loss {task.fields[loss]:.4f}", "lr {task.fields[lr]:.2e}", "{task.fields[ips]:.0f} img/s")
    with _stop_flag() as interrupted, progress_bar(show, *columns) as bar:
        task = bar.add_task("quantize", total=total, completed=state.step, loss=float("nan"), lr=0.0, ips=0.0) if bar else None
        tick, seen = time.perf_counter(), 0
        while state.epoch < rt.epochs:
            tr.model.train()
            batches = _epoch_batches(tr, state.epoch, state.batch)
            while state.batch < tr.steps_per_epoch * accum:
                lr = lr_at(state.step, total, rt.lr, warmup, rt.min_lr)
                lam = obr_lambda(state.step / max(1, total), tr.recipe.obr.start_fraction, tr.recipe.obr.max_lambda) if tr.obr_layers else 0.0
                for group in tr.optimizer.param_groups:
                    group["lr"] = lr
                tr.optimizer.zero_grad(set_to_none=True)
                losses = torch.zeros(accum, 3, device=acc.device)  # per micro-batch: loss, its KD part, OBR; on the device
                for micro in range(accum):
                    x, y = next(batches)
                    seen += x.shape[0] * (x.shape[1] if tr.kd_mode == "stored" else 1)
                    sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(tr.model)
                    with sync:
                        with acc.autocast():
                            loss, kd_part = task_loss(tr, (x, y))
                            obr = obr_loss(m for _, m in tr.obr_layers) if lam > 0 else loss.new_zeros(())
                            loss = loss + lam * obr
                        acc.backward(loss / accum)
                    losses[micro] = torch.stack([loss.detach().float(), kd_part.float(), obr.detach().float()])
                # the step's one wait: are the losses finite everywhere, was any process signalled?
                flags = torch.stack([(~torch.isfinite(losses)).any().float(),
                                     torch.tensor(float(interrupted[0] > 0), device=acc.device)])
                flags = acc.reduce(flags, "sum") if acc.num_processes > 1 else flags
                nonfinite, stop = (v > 0 for v in flags.tolist())
                if stop and not interrupted[0]:  # another process was signalled
                    interrupted[0] = int(signal.SIGINT)
                if nonfinite and not rt.skip_nonfinite:
                    raise _nonfinite_error(tr, state, losses)
                if nonfinite:
                    log.warning("skipping step %d: non-finite loss", state.step + 1)
                    losses.zero_()
                else:
                    if act_factor != 1:
                        for p in act_params:
                            if p.grad is not None:
                                p.grad.mul_(act_factor)
                    if rt.grad_clip > 0:
                        acc.clip_grad_norm_(tr.model.parameters(), rt.grad_clip)
                    tr.optimizer.step()
                    for q in quantizers:
                        q.project_()
                    if tr.tracker is not None:
                        tr.tracker.update()
                tr.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch += accum
                if state.step % log_every == 0 or state.step == 1:
                    sums = losses.double().div_(accum).sum(0)
                    if acc.num_processes > 1:  # the mean over processes: the loss of the global batch
                        sums = acc.reduce(sums, "mean")
                    loss_value, kd_value, obr_value = sums.tolist()
                    elapsed = max(time.perf_counter() - tick, 1e-9)
                    ips = seen * acc.num_processes / elapsed
                    tick, seen = time.perf_counter(), 0
                    if acc.is_main_process:
                        record = {"step": state.step, "epoch": state.epoch + state.batch / (tr.steps_per_epoch * accum), "loss": loss_value,
                                  "kd": kd_value, "obr": obr_value, "lambda": lam, "lr": lr, "throughput": ips, "skipped": nonfinite}
                        if tr.tracker is not None:
                            record["oscillating_fraction"] = {k: v["oscillating_fraction"] for k, v in tr.tracker.summary().items()}
                        append_metrics(tr.run_dir, record)
                    if bar:
                        bar.update(task, loss=loss_value, lr=lr, ips=ips)
                if bar:
                    bar.update(task, completed=state.step)
                end_of_epoch = state.batch >= tr.steps_per_epoch * accum
                # alone, a signal during this step stops here; with N processes only the agreed flag may (a signal
                # after this step's all-reduce is agreed on at the next step), or one process would wait forever
                if stop or (acc.num_processes == 1 and interrupted[0]):
                    save(tr, state)
                    raise RunInterrupted(interrupted[0], f"interrupted at step {state.step} ({signal.Signals(interrupted[0]).name}); "
                                         f"checkpoint saved in '{tr.run_dir}'; continue with --resume")
                if tr.save_every and state.step % tr.save_every == 0 and not end_of_epoch:
                    save(tr, state)
            state.epoch, state.batch = state.epoch + 1, 0
            state.last_top1 = validate(tr)
            best = state.best_top1 is None or state.last_top1 > state.best_top1
            if best:
                state.best_top1 = state.last_top1
            if acc.is_main_process:
                append_metrics(tr.run_dir, {"step": state.step, "epoch": state.epoch, "val_top1": state.last_top1, "best_top1": state.best_top1})
            save(tr, state, best=best)
            if tr.on_epoch is not None:
                tr.on_epoch(state)
    return state
