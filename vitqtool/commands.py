"""Every verb as a Python function: evaluate, quantize, softlabels, train_fp, export, inspect, analyze.

This is the one place where MODEL specs, run folders, export files and dataset specs are resolved
to modules and datasets; the layers below (`train`, `export`, `analysis`) take nn.Modules, recipes
and typed metadata. `cli.py` parses flags, calls these and renders what they return.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .analysis import analyze_model, compare_reports, oscillation_rows, slug, write_comparison
from .core.artifacts import RunInfo
from .core.models import resolve_model
from .core.prepare import evaluate_model, prepare
from .core.ptq import reconstruct
from .core.runs import is_run_dir, load_checkpoint, load_run_model
from .data import check_num_classes, holdout_split, load_dataset, make_eval_loader, stratified_sample
from .data.sampling import HOLDOUT_FRACTION, HOLDOUT_SEED, Sample
from .data.sources import ImageDataset
from .errors import DataError, ExportFormatError, ModelError, RecipeError, RunError
from .export import FORMATS, ExportFormat, ExportSource, ExportSummary, find_format, get_format
from .fileio import check_file_target, check_folder_target, library_versions
from .progress import phase, progress_bar, track
from .recipe import Recipe, load_recipe
from .train import FPResult, check_launch, generate_soft_labels, open_run, resolve_kd_mode, run_quantization, seed_everything
from .train import train_fp as train_fp_module
from .train.post_training import calibrate_model
from .train.softlabels import bytes_per_crop, check_store_out

log = logging.getLogger(__name__)

__all__ = ["ResolvedModel", "analyze", "compare", "default_run_folder", "end_processes", "evaluate", "export", "inspect", "load",
           "quantize", "resolve_any", "softlabels", "train_fp"]
RUNS_FOLDER = Path("runs")  # where `quantize` puts a run when no `out` is given


@dataclass
class ResolvedModel:
    """Any runnable model spec: FP model, quantized run or export.

    `kind`: "fp", "quantized", "onnx" (run by onnxruntime) or "weight-quantized" (the stock model with a weight view).
    """

    model: nn.Module
    data_config: dict[str, Any]
    source: str
    kind: str
    recipe: Recipe | None = None


def resolve_any(spec: str, weights: str | Path | None = None, random_init: bool = False,
                model_args: dict | None = None, num_classes: int | None = None) -> ResolvedModel:
    """Resolve a MODEL spec, a `quantize` run folder or an export (any registered format) to a runnable model."""
    path = Path(spec)
    if path.is_dir() and is_run_dir(path):
        run = load_run_model(path)
        return ResolvedModel(run.model, run.data_config, str(path), "quantized", run.recipe)
    fmt = find_format(path)
    if fmt is not None:
        exported = fmt.load(path)
        return ResolvedModel(exported.model, exported.data_config, str(path), exported.kind, exported.recipe)
    loaded = resolve_model(spec, weights=weights, random_init=random_init, model_args=model_args, num_classes=num_classes)
    return ResolvedModel(loaded.model, loaded.data_config, loaded.source, "fp")


def load(path: str | Path) -> nn.Module:
    """The runnable model (eval mode) of a vitqtool export in any format: a .safetensors file, a `--format hf`
    folder, a `--format onnx` graph (run by onnxruntime behind the nn.Module call), a compressed-tensors view."""
    return _export_format_of(path).load(Path(path)).model


def _export_format_of(path: str | Path) -> ExportFormat:
    """The registered format of an existing export; ExportFormatError naming the path otherwise."""
    fmt = find_format(path)
    if fmt is None:
        if not Path(path).exists():
            raise ExportFormatError(f"export '{path}' does not exist")
        raise ExportFormatError(f"'{path}' is not a vitqtool export (in any of the formats {', '.join(FORMATS)}); "
                                "pass a file or folder written by `vitqtool export`")
    return fmt


def evaluate(model: str | nn.Module, data: str = "builtin:mnist5k", split: str = "validation", *,
             weights: str | Path | None = None, random_init: bool = False, model_args: dict | None = None,
             num_classes: int | None = None, bits: int | None = None, recipe: str | Path | None = None, batch_size: int = 64,
             calib_batches: int | None = None, limit: int | None = None, data_config: dict | None = None,
             image_column: str | None = None, label_column: str | None = None,
             show_progress: bool = False) -> dict[str, Any]:
    """Top-1/top-5/loss of a model on a dataset split (`limit`: a seeded class-stratified sample of N images).

    `model` is a MODEL spec, an export (`.safetensors` written by `export`), a run folder of
    `quantize`, or an nn.Module (then `data_config` is required). With `bits` or `recipe`, an FP
    model is quantized and calibrated on training images first (post-training quantization).

    Returns a dict with top1, top5 (percent), loss, n, plus model/data/split/bits descriptions.
    """
    if isinstance(model, nn.Module) and data_config is None:
        raise ValueError("evaluate(nn.Module) needs data_config")
    with progress_bar(show_progress and not isinstance(model, nn.Module)) as bar, phase(bar, "load model and data"):
        if isinstance(model, nn.Module):
            assert data_config is not None  # checked above
            net, cfg, source, kind = model, data_config, type(model).__name__, "module"
        else:
            loaded = resolve_any(str(model), weights=weights, random_init=random_init, model_args=model_args, num_classes=num_classes)
            net, cfg, source, kind = loaded.model, loaded.data_config, loaded.source, loaded.kind
        if (bits is not None or recipe is not None) and kind != "fp":
            raise RecipeError("--bits/--recipe quantize an FP model; this model is already quantized")
        dataset = load_dataset(data, split, image_column, label_column)
        check_num_classes(dataset, cfg.get("num_classes", dataset.num_classes))
    dataset_classes, used_split = dataset.num_classes, dataset.split
    dataset = stratified_sample(dataset, limit)
    quantized_with = None
    if bits is not None or recipe is not None:
        rec = load_recipe(recipe or "ptq", set_fields={"quant.bits": bits})
        fp_net, net = net, prepare(net, rec)
        train_set = load_dataset(data, "train", image_column, label_column)
        n_calib = (calib_batches or rec.calibration.batches) * batch_size  # a class-stratified sample, as every --limit
        calib = [images for images, _ in track(make_eval_loader(stratified_sample(train_set, n_calib), cfg, batch_size), "calibration data",
                                                 total=math.ceil(n_calib / batch_size), enabled=show_progress)]
        done = calibrate_model(net, rec, calib)
        if rec.reconstruct.blocks:
            recon_set = stratified_sample(train_set, rec.reconstruct.images)
            blocks = reconstruct(net, fp_net, (b[0] for b in make_eval_loader(recon_set, cfg, batch_size)), len(recon_set),
                                 rec.reconstruct, seed=rec.train.seed, show_progress=show_progress)
            done["reconstruct"] = {"images": len(recon_set), "iters": rec.reconstruct.iters, "blocks": blocks}
        quantized_with = {"recipe": rec.name, "bits": rec.quant.bits, "calibration": done}
    loader = make_eval_loader(dataset, cfg, batch_size)
    labels = cfg.get("labels")  # class names of a transformers checkpoint (id2label)
    result = evaluate_model(net, loader, dataset_classes, show_progress=show_progress, total=math.ceil(len(dataset) / batch_size),
                            per_class=labels is not None)
    if labels is not None:
        result["per_class"] = [{"class": i, "label": labels[i] if i < len(labels) else None, **row}
                               for i, row in enumerate(result["per_class"]) if row["n"] or row["predicted"]]
    return {**result, "labels": labels, "model": source, "kind": kind, "data": data, "split": used_split, "quantized": quantized_with}


def default_run_folder(model: str, *, bits: int | None = None, recipe: str | Path = "vaq",
                       overrides: list[Path] | None = None) -> Path:
    """Where `quantize` writes when no `out` is given: `runs/<model>-w<b>a<b>-<recipe>`.

    `<model>` is the last part of the MODEL spec (a timm name, a folder's name, an hf-hub repo's name) and `<b>`
    the bits the recipe resolves to with `bits` and `overrides`; an existing run there is refused as for any `out`.
    """
    rec = load_recipe(recipe, override_files=overrides, set_fields={"quant.bits": bits})
    spec = str(model).removeprefix("hf-hub:").partition("@")[0].rstrip("/\\")
    name = Path(spec).name or Path(spec).resolve().name
    part = lambda text: re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"  # noqa: E731
    return RUNS_FOLDER / f"{part(name)}-w{rec.quant.bits}a{rec.quant.bits}-{part(rec.name)}"


def quantize(model: str, *, bits: int | None = None, recipe: str | Path = "vaq", data: str = "builtin:mnist5k",
             out: Path | None = None,
             teacher: str | None = None, soft_labels: Path | None = None, weights: str | Path | None = None,
             random_init: bool = False, model_args: dict | None = None, teacher_weights: str | Path | None = None,
             epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
             warmup_epochs: float | None = None, grad_clip: float | None = None, grad_accum: int | None = None,
             seed: int | None = None, calib_batches: int | None = None, recon_images: int | None = None,
             recon_iters: int | None = None, overrides: list[Path] | None = None, resume: bool = False,
             overwrite: bool = False, mixed_precision: str | None = None, limit_train: int | None = None,
             save_every: int | None = None, limit_val: int | None = None, fuse_quantizers: bool | None = None,
             compile_model: bool = False,
             teacher_model_args: dict | None = None, image_column: str | None = None, label_column: str | None = None,
             show_progress: bool = False) -> RunInfo:
    """Quantize MODEL with a recipe (vaq QAT, lsq, or ptq calibration only) and write a run folder.

    Flags override recipe fields (`recon_images`/`recon_iters`: the block-wise reconstruction's calibration
    images and steps per block); `limit_train`/`limit_val` take a seeded class-stratified sample of N
    training/validation images (the same images in every command); a dataset without a validation split
    gets a seeded, class-stratified 10% of its training split held out (recorded in run.json);
    `mixed_precision` None keeps the launcher's setting (`accelerate launch --mixed_precision`);
    `teacher` is resolved on its own (its folder config, or `teacher_model_args`); `fuse_quantizers` True trains
    with the `torch.compile`d single-kernel fake quantizers, False with the eager ones, None (default) with the
    fused ones where they compute what eager does (float32 and a working compiler); `compile_model` trains a
    `torch.compile`d QAT model (a long first step, then faster steps). Training runs
    on `accelerate` (launch with `accelerate launch -m vitqtool quantize ...` for several processes);
    every process calibrates on the same training images. Checkpoints every `save_every` steps and
    each epoch; `resume=True` continues exactly, also on another number of processes when the global
    batch (`batch_size` x processes) is kept (docs/scaling.md).

    `out` None writes to `default_run_folder(model, ...)` (`runs/<model>-w<b>a<b>-<recipe>`).

    Returns:
        The run's RunInfo (what run.json holds); the run folder `out` is loadable with `evaluate` and `export`.
    Raises:
        RecipeError, ModelError, DataError for bad input; RunError for a run folder that holds
        another run, a non-finite loss, or a failed checkpoint write; RunInterrupted (exit 130) on SIGINT.
    """
    if out is None:
        out = default_run_folder(model, bits=bits, recipe=recipe, overrides=overrides)
        log.info("no out given: writing the run to %s", out)
    rec = load_recipe(recipe, override_files=overrides, set_fields={
        "quant.bits": bits, "train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr,
        "train.warmup_epochs": warmup_epochs, "train.grad_clip": grad_clip, "train.grad_accum": grad_accum,
        "train.seed": seed, "calibration.batches": calib_batches, "reconstruct.images": recon_images,
        "reconstruct.iters": recon_iters})
    soft_labels = Path(soft_labels) if soft_labels is not None else None
    kd_mode = resolve_kd_mode(rec, soft_labels) if rec.train.enabled else "none"
    rt = rec.train
    if rt.batch_size % rt.grad_accum:
        raise RecipeError(f"train.batch_size ({rt.batch_size}) must be a multiple of train.grad_accum ({rt.grad_accum})")
    if save_every is not None and save_every < 0:
        raise RunError("--save-every must be >= 0 (0 = only at epoch ends)")
    identity = {"model": model, "weights": str(weights) if weights else None, "random_init": random_init,
                "model_args": model_args or {}, "data": data, "limit_train": limit_train, "limit_val": limit_val, "teacher": teacher,
                "teacher_weights": str(teacher_weights) if teacher_weights else None,
                "soft_labels": str(soft_labels) if soft_labels else None, "recipe": rec.to_dict(),
                "teacher_model_args": teacher_model_args or {}}
    with open_run(Path(out), identity, resume=resume, overwrite=overwrite, mixed_precision=mixed_precision) as session:
        seed_everything(rt.seed)
        show = show_progress and session.accelerator.is_main_process
        with progress_bar(show) as bar, phase(bar, "load model and data"):
            loaded = resolve_model(model, weights=weights, random_init=random_init, model_args=model_args)
            train_ds, val_ds, validation = _train_and_validation(data, limit_train, limit_val, image_column, label_column)
            num_classes = int(loaded.data_config.get("num_classes") or train_ds.num_classes)
            check_num_classes(train_ds, num_classes)
            teacher_model = None
            if kd_mode == "online":
                teacher_model = _resolve_teacher(teacher, teacher_weights, teacher_model_args, loaded, num_classes)
        info = RunInfo(identity=session.identity, source_model=loaded.source, architecture=loaded.architecture,
                       model_args=loaded.model_args, data_config=loaded.data_config, data=data, num_classes=num_classes,
                       seed=rt.seed, recipe=rec.name, bits=rec.quant.bits, kd_mode=kd_mode,
                       versions=library_versions("accelerate"), source_format=loaded.source_format,
                       source_config=loaded.source_config, preprocessor_config=loaded.preprocessor_config,
                       validation=validation)
        return run_quantization(session, loaded.model, info, recipe=rec, train_set=train_ds, val_set=val_ds, kd_mode=kd_mode,
                                teacher=teacher_model, soft_labels=soft_labels, save_every=save_every or 0,
                                fuse_quantizers=fuse_quantizers, compile_model=compile_model, show_progress=show_progress)


def end_processes() -> None:
    """Leave the torch.distributed process group, if one is open (after the last collective of a launched run).

    A process that exits with the group still open can abort in gloo's thread teardown (SIGABRT,
    "terminate called without an active exception"), which turns a finished run into a failed launch.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _train_and_validation(data: str, limit_train: int | None, limit_val: int | None, image_column: str | None,
                          label_column: str | None) -> tuple[Any, Any, str]:
    """(training images, validation images, how validation was chosen) of `data`, limits applied.

    Both carry `num_classes` (subsets get their split's).

    A dataset with no validation split (only `train`) gets a seeded, class-stratified slice of its
    training split held out, so the best checkpoint is never picked on training images.
    """
    train_all = load_dataset(data, "train", image_column, label_column)
    val_all = load_dataset(data, "validation", image_column, label_column)
    train_ds: ImageDataset | Sample = train_all
    val_ds: ImageDataset | Sample = val_all
    validation = f"split '{val_all.split}'"
    if val_all.split == train_all.split:
        train_ds, val_ds = holdout_split(train_all)
        validation = (f"{len(val_ds)} images held out of split '{train_all.split}' "
                      f"({HOLDOUT_FRACTION:.0%}, class-stratified, seed {HOLDOUT_SEED})")
        log.warning("dataset '%s' has no validation split: validating on %s", data, validation)
    return stratified_sample(train_ds, limit_train), stratified_sample(val_ds, limit_val), validation


def _resolve_teacher(teacher: str | None, teacher_weights: str | Path | None, teacher_model_args: dict | None,
                     student: Any, num_classes: int) -> nn.Module:
    """The online-KD teacher: a copy of the FP student, or the `teacher` spec resolved on its own (its folder
    config, its timm defaults, or `teacher_model_args`; never the student's --model-args or --random-init)."""
    if teacher is None:
        return copy.deepcopy(student.model)
    t = resolve_model(teacher, weights=teacher_weights, model_args=teacher_model_args)
    if tuple(t.data_config["input_size"]) != tuple(student.data_config["input_size"]) or t.data_config.get("num_classes", num_classes) != num_classes:
        raise RecipeError(f"teacher {teacher!r} takes {t.data_config['input_size']} with {t.data_config.get('num_classes')} classes, "
                          f"the student {student.data_config['input_size']} with {num_classes}; use stored soft labels (`vitqtool softlabels`)")
    return t.model


def softlabels(model: str, out: str | Path, data: str = "builtin:mnist5k", split: str = "train", *,
               teacher: str | None = None, weights: str | Path | None = None, teacher_weights: str | Path | None = None,
               random_init: bool = False, model_args: dict | None = None, teacher_model_args: dict | None = None,
               crops: int = 500, topk: int = 5, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, seed: int = 0, batch_size: int = 64,
               limit: int | None = None, overwrite: bool = False, resume: bool = False, device: str | None = None,
               num_workers: int = 0, images_per_shard: int | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Generate a multi-crop soft-label store for training MODEL (teacher: `teacher`, default MODEL itself).

    Under `accelerate launch` with N processes (one or several machines) each process labels every N-th
    shard on its own device and the store comes out bitwise the same as one process writes. `resume`
    finishes the store of a killed run (its finished shards are kept).
    Example:
        softlabels("student_model", "labels/", teacher="teacher_model", crops=500)
    Returns:
        A summary dict: out, teacher, data, split, fingerprint, images, crops, topk, bytes_per_crop,
        total_bytes (stored tensor bytes), processes, shards, shards_resumed (kept from a killed run),
        seconds, crops_per_second (crops labelled by this call / seconds).
    Raises:
        ModelError/WeightsError for the models, DataError for the data, RunError when `out` is taken (or
        holds an unfinished store and neither `resume` nor `overwrite` is given), BusyError for a second writer.
    """
    from accelerate import PartialState

    out = Path(out)
    check_store_out(out, overwrite, resume)
    check_launch()
    state = PartialState(cpu=not torch.cuda.is_available())  # joins the process group under accelerate launch
    seed_everything(seed)  # a --random-init teacher is then the same on every process
    with progress_bar(show_progress and state.is_main_process) as bar, phase(bar, "load model and data"):
        dataset = load_dataset(data, split)
        if teacher is None:
            loaded = resolve_model(model, weights=weights, random_init=random_init, model_args=model_args)
        else:
            loaded = resolve_model(teacher, weights=teacher_weights, random_init=random_init,
                                   model_args=teacher_model_args if teacher_model_args is not None else model_args)
    check_num_classes(dataset, int(getattr(loaded.model, "num_classes", dataset.num_classes)))
    net = loaded.model.to(torch.device(device) if device else state.device)
    used: Any = stratified_sample(dataset, limit)
    done = generate_soft_labels(net, used, loaded.data_config, out, crops, topk=topk, scale=scale, ratio=ratio, hflip=hflip,
                                seed=seed, batch_size=batch_size, teacher_id=loaded.source or (teacher or model),
                                dataset_id=f"{dataset.spec}[{dataset.split}]", show_progress=show_progress,
                                overwrite=overwrite, resume=resume, num_workers=num_workers, images_per_shard=images_per_shard,
                                process_index=state.process_index, num_processes=state.num_processes)
    n = len(used)
    return {
        "out": str(out), "teacher": loaded.source or (teacher or model), "student": model, "data": dataset.spec,
        "split": dataset.split, "fingerprint": dataset.fingerprint, "images": n, "crops": crops, "topk": topk,
        "bytes_per_crop": bytes_per_crop(topk), "total_bytes": n * crops * bytes_per_crop(topk),
        "processes": state.num_processes, "shards": done.shards, "shards_resumed": done.shards_done,
        "seconds": round(done.seconds, 3), "crops_per_second": round(done.images_labelled * crops / max(done.seconds, 1e-9), 1),
    }


def train_fp(model: str, out: Path, *, data: str = "builtin:mnist5k", model_args: dict | None = None,
             weights: str | Path | None = None, random_init: bool = True, epochs: int = 3, batch_size: int = 64,
             lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: float = 0.5,
             scale: tuple[float, float] = (0.6, 1.0), ratio: tuple[float, float] = (0.75, 4 / 3), hflip: bool = False,
             seed: int = 0, limit_train: int | None = None, show_progress: bool = False) -> FPResult:
    """Train MODEL in FP on `data` (hard labels) and save it as a model folder `out` (a MODEL spec for `quantize`)."""
    torch.manual_seed(seed)
    loaded = resolve_model(model, weights=weights, random_init=random_init and weights is None, model_args=model_args)
    train_ds, val_ds, _ = _train_and_validation(data, limit_train, None, None, None)
    check_num_classes(train_ds, loaded.data_config.get("num_classes", train_ds.num_classes))
    return train_fp_module(loaded, train_ds, val_ds, out, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, warmup_epochs=warmup_epochs, scale=scale, ratio=ratio, hflip=hflip,
                           seed=seed, show_progress=show_progress)


def export(run_or_checkpoint: str | Path, out: str | Path, dtype: str = "float32", verify: bool = False,
           which: str = "best", format: str = "safetensors") -> ExportSummary:
    """Export a `quantize` run folder (checkpoint `which`: best or last), or re-export an export, to `out`.

    `format` names a registered export format (`export.FORMATS`: safetensors, hf, compressed-tensors,
    onnx, ...). `verify` checks what was written against the model before it is kept (each format says
    how: logits, or top-1 agreement in onnxruntime), on validation images of the run's data (the
    built-in digits when it is not available).
    Returns the typed summary of what was written, with the `verify` results.
    Raises RunError / ExportFormatError naming the problem when the input is neither a run nor an export,
    the format does not take `dtype`, or verification fails (then nothing is written).
    Example:
        >>> export("runs/w2", "model_w2.safetensors", dtype="float16", verify=True)
    """
    fmt = get_format(format)
    if dtype not in fmt.dtypes:
        raise ExportFormatError(f"--dtype {dtype} is not available for --format {format} (it stores {', '.join(fmt.dtypes)})")
    check_folder_target(out) if fmt.writes_folder else check_file_target(out)
    source = _export_source(Path(run_or_checkpoint), which)
    source.validation = lambda images, batch_size: _validation_batches(source.data, source.data_config, images, batch_size)
    return fmt.write(source, Path(out), dtype=dtype, verify=verify)


def _export_source(path: Path, which: str) -> ExportSource:
    """What an export needs of a run folder (its `which` checkpoint) or of an earlier export in any format."""
    if path.is_dir() and is_run_dir(path):
        run = load_run_model(path, which)
        info = run.info
        top1 = info.best_top1 if which == "best" else info.last_top1
        metrics = {"top1": top1, "data": info.data, "split": "validation", "checkpoint": which} if top1 is not None else None
        if info.calibration:  # what post-training did (reparameterization, reconstruction per block) travels with the file
            metrics = {**(metrics or {}), "calibration": info.calibration}
        return ExportSource(run.model, run.data_config, run.recipe, info.architecture, info.model_args or {},
                            info.source_model or str(path), metrics, info.source_info(), info.data)
    fmt = find_format(path)
    if fmt is None:
        raise ExportFormatError(f"'{path}' is neither a `vitqtool quantize` run folder nor a vitqtool export; "
                                "pass the --out folder of a quantize run")
    loaded = fmt.load(path)
    if loaded.source is None:
        raise ExportFormatError(f"'{path}' is a {fmt.name} export, which cannot be written in another format; "
                                "export the run folder it came from")
    return loaded.source


def _validation_batches(data: str | None, data_config: dict, images: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """`images` evenly spaced validation images (and labels) of `data`, else of builtin:mnist5k; [] when none load.

    Evenly spaced: an image folder (and builtin:mnist5k) is sorted by class.
    """
    for spec in dict.fromkeys(s for s in (data, "builtin:mnist5k") if s):
        try:
            dataset = load_dataset(spec, "validation")
        except DataError as exc:
            log.warning("verify: dataset %s is not available (%s)", spec, exc)
            continue
        n = min(images, len(dataset))
        subset = torch.utils.data.Subset(dataset, [i * len(dataset) // n for i in range(n)])
        return list(itertools.islice(make_eval_loader(subset, data_config, batch_size), math.ceil(n / batch_size)))
    return []


def inspect(path: str | Path, check_digest: bool = True) -> ExportSummary:
    """Per-module bits and sizes, compression ratio vs float32, digest and metadata of an export in any format.

    The export is checked as `load` checks it (the model is rebuilt, its state loaded and its content digest
    compared), so `inspect` never describes a file that does not load; `check_digest=False` skips the digest
    (forensic use: look at a file that was changed after export).
    Example:
        >>> summary = inspect("model_w2.safetensors"); summary.compression_ratio
    """
    return _export_format_of(path).inspect(Path(path), check_digest=check_digest)


def analyze(model: str, *, data: str = "builtin:mnist5k", split: str = "validation", bits: int = 2, what: str = "both",
            out: Path | str | None = None, weights: str | Path | None = None, random_init: bool = False,
            model_args: dict | None = None, recipe: str | Path = "vaq", batches: int = 4, batch_size: int = 32,
            run: Path | str | None = None, budget_bits: float | None = None, keep: int | None = None,
            plots: bool = True, method: str = "auto", show_progress: bool = False) -> dict[str, Any]:
    """Variation, sensitivity (and oscillation) report of an FP model quantized with `recipe` at `bits`.

    Args:
        model: MODEL spec (timm name, hf-hub:..., local folder) of the FP model.
        data: dataset spec; step sizes are calibrated first on as many evenly spaced "train" images as the recipe's
            calibration batches hold.
        split: the analysed split (`batches x batch_size` evenly spaced images of it).
        bits: weight/activation bits inside blocks (edge layers keep the recipe's edge bits).
        what: sensitivity of "weights", "acts" or "both" of each module.
        out: report folder (analysis.json, CSVs, PNGs, index.html, overrides.toml); None writes nothing.
        weights: local weights file for a timm MODEL name.
        random_init: build the model with random weights.
        model_args: extra `timm.create_model` arguments.
        recipe: the recipe whose layout is analysed.
        batches: analysis batches.
        batch_size: images per batch.
        run: a `quantize` run folder, for the oscillation section.
        budget_bits: suggest bits: the average weight bits of the block layers (writes overrides.toml).
        keep: suggest bits: the N most sensitive block layers at 8 bits (writes overrides.toml).
        plots: render PNGs (needs matplotlib, the `vitqtool[plots]` extra).
        method: "fast" (cached block inputs) or "naive" (full forward per module); same numbers.
        show_progress: progress on stderr.
    Returns:
        The report dict (schema `vitqtool.analysis/1`; `report["summary"]` is what `--json` prints).
    Raises:
        ModelError, DataError, RecipeError, RunError on bad input.

    Example:
        >>> report = analyze("model_name", random_init=True, batches=1, batch_size=8, out="report")
    """
    if out is not None:
        check_folder_target(out)
    t0 = time.perf_counter()
    with progress_bar(show_progress) as bar:
        with phase(bar, "load model") as advance:
            loaded = resolve_any(str(model), weights=weights, random_init=random_init, model_args=model_args)
            advance()
        if loaded.kind != "fp":
            raise ModelError(f"analyze takes an FP model, '{model}' is already quantized; pass the FP model and the run folder as --run")
        rec = load_recipe(recipe, set_fields={"quant.bits": bits})
        cfg = loaded.data_config
        with phase(bar, "load data", batches) as advance:
            calibration = make_eval_loader(stratified_sample(load_dataset(data, "train"), rec.calibration.batches * batch_size), cfg, batch_size)
            dataset = load_dataset(data, split)
            batch_list = []
            for batch in make_eval_loader(stratified_sample(dataset, batches * batch_size), cfg, batch_size):
                batch_list.append(batch)
                advance()
        model_classes = int(cfg.get("num_classes") or getattr(loaded.model, "num_classes", 0) or 0)
        labels_valid = model_classes == dataset.num_classes
        if not labels_valid:
            log.warning("model has %d classes, dataset %d: reporting KL and top-1 agreement only (no loss/top-1)", model_classes, dataset.num_classes)
        oscillation = None
        if run is not None:
            if not is_run_dir(run):
                raise RunError(f"--run '{run}' is not a vitqtool run folder (no run.json); pass the --out folder of `quantize`")
            with phase(bar, "load run") as advance:
                _, state = load_checkpoint(run, "last")
                oscillation = oscillation_rows(load_run_model(run, "last"), state, str(run))
                advance()
    load_seconds = time.perf_counter() - t0
    report = analyze_model(loaded.model, recipe=rec, calibration_batches=calibration, batches=batch_list,
                           labels_valid=labels_valid, source=loaded.source, data=data, split=split, what=what,
                           method=method, oscillation=oscillation, budget_bits=budget_bits, keep=keep, out=out,
                           plots=plots, show_progress=show_progress)
    report["seconds"]["load_calibrate"] += load_seconds
    return report


def compare(models: list[str], *, labels: list[str] | None = None, data: str = "builtin:mnist5k", split: str = "validation",
            bits: int = 2, what: str = "both", out: Path | str | None = None, random_init: bool = False,
            model_args: list[dict | None] | None = None, recipe: str | Path = "vaq", batches: int = 4, batch_size: int = 32,
            runs: Mapping[str, Path | str] | None = None, plots: bool = True, method: str = "auto",
            show_progress: bool = False) -> dict[str, Any]:
    """`analyze` several FP models on the same images and bits and put the paper's variation measures side by side.

    Args:
        models: MODEL specs (any supported family: transformers and CNNs; at least two).
        labels: names in the table and plots (default: the specs as given; must be distinct).
        model_args: `timm.create_model` arguments per model (same order as `models`).
        runs: label -> `quantize` run folder of that model, for its oscillating-weight share.
        out: comparison folder (comparison.json/.csv, PNGs, index.html) with each model's own report in a subfolder.
        data: dataset spec, as `analyze`.
        split: the analysed split, as `analyze`.
        bits: weight/activation bits inside blocks, for every model.
        what: sensitivity of "weights", "acts" or "both", as `analyze`.
        random_init: build every model with random weights.
        recipe: the recipe whose layout is analysed, for every model.
        batches: analysis batches, as `analyze`.
        batch_size: images per batch, as `analyze`.
        plots: render the overlaid PNGs and each model's own.
        method: sensitivity method, as `analyze`.
        show_progress: progress on stderr.
    Returns:
        The comparison (schema `vitqtool.compare/1`: settings, `measures`, one row per model in `models`).
    Raises:
        ModelError for fewer than two models, repeated labels, or a run or model_args that fits no model; as `analyze`.

    Example:
        >>> compare(["runs/transformer_fp", "runs/cnn_fp"], labels=["transformer", "CNN"], bits=4, out="compare")
    """
    labels = list(labels or models)
    per_model_args = list(model_args or [None] * len(models))
    runs = dict(runs or {})
    if len(models) < 2:
        raise ModelError(f"comparing needs at least two models, got {len(models)}")
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise ModelError(f"compared models need one distinct name each, got {labels}")
    if len(per_model_args) != len(models):
        raise ModelError(f"got {len(per_model_args)} model-args for {len(models)} models; pass one, or one per model in order")
    stray = sorted(set(runs) - set(labels))
    if stray:
        raise RunError(f"--run for {', '.join(stray)}, which is not a compared model ({', '.join(labels)})")
    folders = [slug(i, label) if out is not None else None for i, label in enumerate(labels, 1)]
    reports = [analyze(spec, data=data, split=split, bits=bits, what=what,
                       out=Path(out, folder) if out is not None and folder else None,
                       random_init=random_init, model_args=args, recipe=recipe, batches=batches, batch_size=batch_size,
                       run=runs.get(label), plots=plots, method=method, show_progress=show_progress)
               for spec, label, args, folder in zip(models, labels, per_model_args, folders)]
    comparison = compare_reports(labels, reports, folders)
    if out is not None:
        write_comparison(comparison, reports, Path(out), plots=plots)
    return comparison
