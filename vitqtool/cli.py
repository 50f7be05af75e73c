"""The `vitqtool` command line: a thin Typer layer over the library functions.

Each command parses its flags, calls one library function and renders the result (a rich table, or
one JSON document on stdout with `--json`). Input errors (`VitqError`) print one line on stderr and
exit 1; bad flags exit 2. Set VITQ_DEBUG=1 for tracebacks. torch and timm are imported inside the
commands so that `vitqtool --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import Terminated, VitqError
from .progress import held_lines

app = typer.Typer(
    name="vitqtool",
    help="Variation-aware 2/3/4/8-bit quantization of Vision Transformers (timm / Hugging Face checkpoints).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
recipes_app = typer.Typer(help="List and show the built-in recipes.", no_args_is_help=True)


def _version(value: bool) -> None:
    """`--version`: print the version and exit."""
    if value:
        from . import __version__

        sys.stdout.write(f"vitqtool {__version__}\n")
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or lines; only errors on stderr.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Log steps to stderr (-v: info, -vv: debug).")] = 0,
) -> None:
    """Variation-aware 2/3/4/8-bit quantization of Vision Transformers (timm / Hugging Face checkpoints)."""
    ctx.obj = {"quiet": quiet}
    _configure_logging(verbose)


def _configure_logging(verbose: int) -> None:
    """Send vitqtool's log records to stderr at INFO (-v) or DEBUG (-vv); only warnings otherwise."""
    import logging

    logger = logging.getLogger("vitqtool")
    logger.setLevel(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG)
    handler = next((h for h in logger.handlers
                    if isinstance(h, logging.StreamHandler) and getattr(h, "_vitqtool", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._vitqtool = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    handler.stream = sys.stderr  # this invocation's stderr (in-process callers may have replaced it)


def _show_progress(ctx: typer.Context, as_json: bool) -> bool:
    """Progress on stderr unless --json or --quiet."""
    return not as_json and not (ctx.obj or {}).get("quiet", False)
app.add_typer(recipes_app, name="recipes")

# Options shared by several commands (defined once).
DataOpt = Annotated[str, typer.Option(
    "--data", help="Dataset: builtin:mnist5k, a Hugging Face datasets name or path, or an image folder (class per subfolder).")]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", help="Local weights file (.safetensors, or .pth/.bin loaded with weights_only) for a timm MODEL name.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Build the model with random weights (smoke tests; no download).")]
ModelArgsOpt = Annotated[str | None, typer.Option(
    "--model-args", help='Extra timm.create_model arguments as JSON, e.g. \'{"img_size": 32, "patch_size": 4, '
                         '"num_classes": 10}\'.')]
NumClassesOpt = Annotated[int | None, typer.Option(
    "--num-classes", min=1, help="Classifier classes of the model (when a weights file or dataset differs from the "
                                 "architecture's default).")]
RecipeOpt = Annotated[str | None, typer.Option("--recipe", help="Recipe: vaq, lsq, ptq, or a .toml path (see `vitqtool recipes list`).")]
BitsOpt = Annotated[int | None, typer.Option(
    "--bits", min=2, max=8, help="Weight and activation bits inside transformer blocks (2..8); overrides the recipe.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
ImageColumnOpt = Annotated[str | None, typer.Option(
    "--image-column", help="Image column of a datasets dataset (default: 'image'/'img', or its one Image column).")]
LabelColumnOpt = Annotated[str | None, typer.Option(
    "--label-column", help="Label column (default: 'label'/'labels', or its one ClassLabel column); int or string labels.")]


def _stderr_console():
    """Console on stderr that never reads markup in what it prints (paths, keys and messages come from data)."""
    from .progress import console

    return console(stderr=True)


def _stdout_console():
    """Console on stdout that never reads markup (table titles and cells come from data)."""
    from .progress import console

    return console()


def _error_line(label: str, message: str) -> Any:
    """`label` in bold red, then `message` as plain text."""
    from rich.text import Text

    return Text.assemble((label, "bold red"), " ", message)


def parse_model_args(text: str | None) -> dict[str, Any] | None:
    """Parse `--model-args` JSON into a dict (BadParameter on anything else)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--model-args") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--model-args")
    return value


def emit_json(document: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def render_table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Render rows of dicts as a rich table on stdout."""
    from rich.table import Table

    columns = columns or (list(rows[0]) if rows else [])
    table = Table(title=title, min_width=len(title))  # as wide as its title: a title is never wrapped mid-number
    for c in columns:
        table.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left",
                         overflow="fold")  # a narrow terminal folds a long path or number, never cuts it to "…"
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    _stdout_console().print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if 0 < abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


@app.command()
def evaluate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(
        help="MODEL spec (timm name, hf-hub:..., model folder), a quantize run folder, or an exported .safetensors.")],
    data: DataOpt = "builtin:mnist5k",
    split: Annotated[str, typer.Option("--split", help="Dataset split to evaluate.")] = "validation",
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    model_args: ModelArgsOpt = None,
    num_classes: NumClassesOpt = None,
    bits: BitsOpt = None,
    recipe: RecipeOpt = None,
    batch_size: BatchOpt = 64,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Evaluate a class-stratified sample of N images (fixed seed: the same images in every command).")] = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-1/top-5 accuracy and loss of an FP, quantized (--bits: post-training) or exported model."""
    from .commands import evaluate as run_evaluate

    result = run_evaluate(model, data, split, weights=weights, random_init=random_init, model_args=parse_model_args(model_args),
                          num_classes=num_classes, bits=bits, recipe=recipe, batch_size=batch_size, limit=limit, image_column=image_column,
                          label_column=label_column, show_progress=_show_progress(ctx, as_json))
    if as_json:
        emit_json(result)
        return
    q = result["quantized"]
    render_table(f"evaluate {result['model']} on {result['data']} [{result['split']}]", [{
        "model": result["kind"] + (f" W{q['bits']}A{q['bits']} ({q['recipe']})" if q else ""),
        "top-1 %": result["top1"], "top-5 %": result["top5"], "loss": result["loss"], "images": result["n"]}])


@recipes_app.command("list")
def recipes_list(as_json: JsonOpt = False) -> None:
    """List the built-in recipes."""
    from .recipe import builtin_recipes, load_recipe

    rows = [{"name": n, "description": load_recipe(n).description} for n in builtin_recipes()]
    if as_json:
        emit_json(rows)
    else:
        render_table("built-in recipes", rows)


@recipes_app.command("show")
def recipes_show(
    recipe: Annotated[str, typer.Argument(help="Recipe name or .toml path.")],
    bits: BitsOpt = None,
    overrides: Annotated[list[Path] | None, typer.Option("--overrides", help="Override TOML files merged on top, in order.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a recipe fully resolved (defaults, override files and flags applied) as TOML or JSON."""
    from .recipe import load_recipe

    resolved = load_recipe(recipe, override_files=overrides, set_fields={"quant.bits": bits})
    if as_json:
        emit_json(resolved.to_dict())
    else:
        sys.stdout.write(resolved.to_toml())


@app.command("softlabels")
def softlabels_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="MODEL the labels are for; also the teacher unless --teacher is given.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to create for the soft-label store.")],
    teacher: Annotated[str | None, typer.Option("--teacher", help="Teacher MODEL spec (default: MODEL itself).")] = None,
    data: DataOpt = "builtin:mnist5k",
    split: Annotated[str, typer.Option("--split", help="Dataset split to label (the training split).")] = "train",
    weights: WeightsOpt = None,
    teacher_weights: Annotated[Path | None, typer.Option("--teacher-weights", help="Local weights file for a --teacher timm name.")] = None,
    random_init: RandomInitOpt = False,
    model_args: ModelArgsOpt = None,
    teacher_model_args: Annotated[str | None, typer.Option(
        "--teacher-model-args", help="timm.create_model arguments of --teacher as JSON (default: --model-args).")] = None,
    crops: Annotated[int, typer.Option("--crops", min=1, help="Random-resized crops labelled per image.")] = 500,
    topk: Annotated[int, typer.Option("--topk", min=1, help="Teacher classes stored per crop.")] = 5,
    scale: Annotated[tuple[float, float], typer.Option("--scale", help="Crop area range, fractions of the image.")] = (0.08, 1.0),
    ratio: Annotated[tuple[float, float], typer.Option("--ratio", help="Crop aspect-ratio range.")] = (3 / 4, 4 / 3),
    hflip: Annotated[bool, typer.Option("--hflip/--no-hflip", help="Flip each crop horizontally with probability 0.5.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the crop draws.")] = 0,
    batch_size: BatchOpt = 64,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Label a class-stratified sample of N images (fixed seed: the same images in every command); "
                               "quantize --limit-train N trains on them.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Worker processes that crop images while the teacher runs.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing (or unfinished) store at --out.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Finish the store of a killed run with the same flags (its finished shards are kept).")] = False,
    images_per_shard: Annotated[int | None, typer.Option(
        "--images-per-shard", min=1, help="Images per shard file: the unit processes split and a killed run redoes (default: "
                                          "~64 MiB shards).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a teacher over K random-resized crops per training image and store its top-k soft labels (multi-crop KD).

    Under `accelerate launch --multi_gpu --num_processes N -m vitqtool softlabels ...` the N processes split the shards.
    """
    from .commands import end_processes
    from .commands import softlabels as run_softlabels

    result = run_softlabels(model, out, data, split, teacher=teacher, weights=weights, teacher_weights=teacher_weights,
                            random_init=random_init, model_args=parse_model_args(model_args),
                            teacher_model_args=parse_model_args(teacher_model_args), crops=crops, topk=topk, scale=scale,
                            ratio=ratio, hflip=hflip, seed=seed, batch_size=batch_size, limit=limit, overwrite=overwrite,
                            resume=resume, num_workers=workers, images_per_shard=images_per_shard,
                            show_progress=_show_progress(ctx, as_json))
    end_processes()  # under accelerate launch: leave the process group before exiting
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun only the main process reports
        return
    if as_json:
        emit_json(result)
        return
    render_table(f"soft labels -> {result['out']}", [{
        "teacher": result["teacher"], "data": f"{result['data']} [{result['split']}]", "images": result["images"],
        "crops/image": result["crops"], "top-k": result["topk"], "bytes/crop": result["bytes_per_crop"],
        "MB": round(result["total_bytes"] / 1e6, 3), "crops/s": result["crops_per_second"]}])


def _export_dtype(value: str) -> str:
    """Validate `--dtype` against the export's FP storage dtypes."""
    from .export.layout import FP_DTYPES

    if value not in FP_DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(FP_DTYPES)}, got {value!r}", param_hint="--dtype")
    return value


def _export_format(value: str) -> str:
    """Validate `--format` against the registered export formats."""
    from .export.formats import FORMATS

    if value not in FORMATS:
        raise typer.BadParameter(f"must be one of {', '.join(FORMATS)}, got {value!r}", param_hint="--format")
    return value


def _formats_help() -> str:
    """`--format` help: every registered format and its one-line summary (the registry imports no torch)."""
    from .export.formats import FORMATS

    return "; ".join(f"{entry.name}: {entry.summary}" for entry in FORMATS.values()) + "."


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    run_or_checkpoint: Annotated[Path, typer.Argument(help="The --out folder of a `quantize` run (or a vitqtool export to re-write).")],
    out: Annotated[Path, typer.Option("--out", help="The file (or, for folder formats, the folder) to write.")],
    dtype: Annotated[str, typer.Option(
        "--dtype", callback=_export_dtype, help="Storage dtype of the FP tensors: float32, float16 or bfloat16 (steps stay "
                                                "float32); formats that store float32 only refuse the others.")] = "float32",
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check what was written against the run's model before keeping it (logits, or top-1 agreement for "
                         "onnx); exit 1 and write nothing otherwise.")] = False,
    which: Annotated[str, typer.Option("--which", help="Checkpoint of the run: best or last.")] = "best",
    fmt: Annotated[str, typer.Option("--format", callback=_export_format, help=_formats_help())] = "safetensors",
    as_json: JsonOpt = False,
) -> None:
    """Write a quantized run as a packed low-bit safetensors file that `vitqtool.load` rebuilds, or in another export format."""
    from .commands import export as run_export
    from .progress import phase, progress_bar

    # one phase: reading the run, writing and (with --verify) reloading and checking show at least a heartbeat line
    with progress_bar(_show_progress(ctx, as_json)) as bar, phase(bar, f"export ({fmt})" + (" --verify" if verify else "")):
        result = run_export(run_or_checkpoint, out, dtype=dtype, verify=verify, which=which, format=fmt)
    if as_json:
        emit_json(result.to_dict())
        return
    checked = result.verify or {}
    render_table(f"export ({fmt}) -> {result.path}", [{
        "model": result.architecture, "bits": result.bits, "layers": result.quantized_layers,
        "MB": round(result.file_bytes / 1e6, 3), "fp32 MB": round(result.fp32_bytes / 1e6, 3),
        "ratio": result.compression_ratio, "verify max|diff|": checked.get("max_abs_diff"),
        **({"top-1 agree %": checked["top1_agreement"]} if "top1_agreement" in checked else {})}])


@app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="A file or folder written by `vitqtool export` (any format).")],
    no_digest_check: Annotated[bool, typer.Option(
        "--no-digest-check", help="Describe the export without checking its content digest (forensic use: "
                                  "a file changed after export).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Per-module bits and sizes, compression ratio vs float32, digest and metadata of an export (checked as `load` checks it)."""
    from .commands import inspect as run_inspect

    result = run_inspect(file, check_digest=not no_digest_check)
    if as_json:
        emit_json(result.to_dict())
        return
    if result.layers:
        render_table(f"{result.path}: quantized layers", result.layers,
                     ["name", "type", "weight_bits", "act_bits", "granularity", "params", "bytes", "ratio"])
    details = result.details
    metrics = details.get("metrics") or {}
    summary = {"format": result.format, "format version": result.format_version, "model": result.architecture,
               "model args": json.dumps(details["model_args"]) if "model_args" in details else None, "source": result.source,
               "recipe": result.recipe, "bits": result.bits, "quantized layers": result.quantized_layers,
               "activation quantizers": details.get("activation_quantizers"), "fp dtype": details.get("fp_dtype"),
               "file MB": round(result.file_bytes / 1e6, 3), "fp32 MB": round(result.fp32_bytes / 1e6, 3),
               "ratio vs fp32": result.compression_ratio, "top-1 %": metrics.get("top1"),
               "digest": result.digest or "none (written before digests)"}
    render_table("summary", [{"field": k, "value": _fmt(v)} for k, v in summary.items() if v is not None])


@app.command("quantize")
def quantize_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="FP MODEL spec to quantize (timm name, hf-hub:..., model folder).")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Run folder (run.json, recipe, metrics.jsonl, checkpoints); default runs/<model>-w<bits>a<bits>-<recipe>. "
                      "A folder holding a run is refused unless --resume or --overwrite.")] = None,
    bits: BitsOpt = None,
    recipe: Annotated[str, typer.Option(
        "--recipe", help="vaq (QAT, the paper), lsq (baseline), ptq (calibration only), ptq-recon (PTQ with reparameterization "
                         "and block reconstruction), or a .toml path.")] = "vaq",
    data: DataOpt = "builtin:mnist5k",
    teacher: Annotated[str | None, typer.Option("--teacher", help="Teacher MODEL spec for online KD (default: the FP MODEL itself).")] = None,
    soft_labels: Annotated[Path | None, typer.Option("--soft-labels", help="Soft-label store from `vitqtool softlabels` (multi-crop KD).")] = None,
    weights: WeightsOpt = None,
    teacher_weights: Annotated[Path | None, typer.Option("--teacher-weights", help="Local weights file for a --teacher timm name.")] = None,
    random_init: RandomInitOpt = False,
    model_args: ModelArgsOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=0, help="Training epochs (recipe: train.epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, help="Images per optimiser step and process (recipe: train.batch_size).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Peak learning rate (recipe: train.lr).")] = None,
    warmup_epochs: Annotated[float | None, typer.Option("--warmup-epochs", min=0.0, help="Linear warmup before the cosine decay.")] = None,
    grad_clip: Annotated[float | None, typer.Option("--grad-clip", min=0.0, help="Max gradient norm (0 = off).")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, help="Micro-batches per optimiser step.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of data order, crops and random init.")] = None,
    calib_batches: Annotated[int | None, typer.Option("--calib-batches", min=1, help="Calibration batches of training images.")] = None,
    recon_images: Annotated[int | None, typer.Option(
        "--recon-images", min=1, help="Calibration images of the block-wise reconstruction (recipe: reconstruct.images).")] = None,
    recon_iters: Annotated[int | None, typer.Option(
        "--recon-iters", min=1, help="Reconstruction steps per block (recipe: reconstruct.iters).")] = None,
    overrides: Annotated[list[Path] | None, typer.Option("--overrides", help="Override TOML files merged on top of the recipe, in order.")] = None,
    save_every: Annotated[int | None, typer.Option(
        "--save-every", min=0, help="Also checkpoint every N optimiser steps (0: epoch ends only).")] = None,
    limit_train: Annotated[int | None, typer.Option(
        "--limit-train", min=1, help="Train on a class-stratified sample of N images (fixed seed: "
                                     "the same images in every command).")] = None,
    limit_val: Annotated[int | None, typer.Option(
        "--limit-val", min=1, help="Validate on a class-stratified sample of N images (fixed seed: "
                                   "the same images in every command).")] = None,
    teacher_model_args: Annotated[str | None, typer.Option(
        "--teacher-model-args", help="timm.create_model arguments of --teacher as JSON (the teacher never "
                                     "takes --model-args or --random-init).")] = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    mixed_precision: Annotated[str | None, typer.Option(
        "--mixed-precision", help="no, fp16 or bf16 (passed to accelerate); default: the launcher's setting (accelerate launch "
                                  "--mixed_precision), else no.")] = None,
    fuse_quantizers: Annotated[bool | None, typer.Option(
        "--fuse-quantizers/--eager-quantizers", help="Fake quantizers as one torch.compile'd kernel each (faster, less memory) "
                                                     "or eager. Default: fused in float32 where they compute what eager does, "
                                                     "else eager.")] = None,
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the QAT model: faster steps after a first step that compiles (about a minute of CPU for "
                          "a tiny model).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the run in --out and start over.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize MODEL: calibrate step sizes, then QAT with KD + OBR (vaq) on accelerate; checkpoints and exact --resume."""
    from .commands import end_processes
    from .commands import quantize as run_quantize

    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise typer.BadParameter(f"must be no, fp16 or bf16, got {mixed_precision!r}", param_hint="--mixed-precision")
    default_out = out is None
    if out is None:
        from .commands import default_run_folder

        out = default_run_folder(model, bits=bits, recipe=recipe, overrides=overrides)
    info = run_quantize(model, bits=bits, recipe=recipe, data=data, out=out, teacher=teacher, soft_labels=soft_labels,
                           weights=weights, random_init=random_init, model_args=parse_model_args(model_args),
                           teacher_weights=teacher_weights, epochs=epochs, batch_size=batch_size, lr=lr,
                           warmup_epochs=warmup_epochs, grad_clip=grad_clip, grad_accum=grad_accum, seed=seed,
                           calib_batches=calib_batches, recon_images=recon_images, recon_iters=recon_iters,
                           overrides=overrides, resume=resume, overwrite=overwrite,
                           mixed_precision=mixed_precision, fuse_quantizers=fuse_quantizers, compile_model=compile_model,
                           limit_train=limit_train, limit_val=limit_val, save_every=save_every,
                           teacher_model_args=parse_model_args(teacher_model_args), image_column=image_column, label_column=label_column,
                           show_progress=_show_progress(ctx, as_json))
    end_processes()  # under accelerate launch: leave the process group before exiting, or gloo's threads abort the exit
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun only the main process reports
        return
    summary = {"run": str(out), "model": info.source_model, "recipe": info.recipe, "bits": info.bits,
               "kd": info.kd_mode, "epochs": info.epochs_done, "steps": info.step,
               "best_top1": info.best_top1, "last_top1": info.last_top1, "status": info.status}
    if as_json:
        emit_json(summary)
    else:
        render_table(f"quantize {summary['model']} -> {out}", [summary], ["recipe", "bits", "kd", "epochs", "steps", "best_top1", "last_top1"])
    if default_out and not (ctx.obj or {}).get("quiet", False):
        _stderr_console().print(f"run folder: {out} (no --out given)")


@app.command("analyze")
def analyze_cmd(
    ctx: typer.Context,
    models: Annotated[list[str], typer.Argument(
        metavar="MODEL", help="MODEL spec of the FP model (timm name, hf-hub:..., model folder); several with --compare.")],
    compare: Annotated[bool, typer.Option(
        "--compare", help="Analyze every MODEL on the same images and bits and compare their variation side by side (table, "
                          "comparison.json/.csv, overlaid plots, index.html).")] = False,
    data: DataOpt = "builtin:mnist5k",
    split: Annotated[str, typer.Option("--split", help="Analysis split (step sizes are calibrated on 'train' first).")] = "validation",
    bits: Annotated[int, typer.Option("--bits", min=2, max=8, help="Weight and activation bits inside blocks (2..8).")] = 2,
    what: Annotated[str, typer.Option("--what", help="Sensitivity of each module's weights, acts or both.")] = "both",
    out: Annotated[Path | None, typer.Option("--out", help="Report folder: analysis.json, CSVs, PNGs, index.html, overrides.toml.")] = Path("report"),
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    model_args: Annotated[list[str] | None, typer.Option(
        "--model-args", help='Extra timm.create_model arguments as JSON; with --compare once for every MODEL or once per MODEL, '
                             'in order.')] = None,
    recipe: RecipeOpt = None,
    batches: Annotated[int, typer.Option("--batches", min=1, help="Analysis batches.")] = 4,
    batch_size: BatchOpt = 32,
    run: Annotated[list[str] | None, typer.Option(
        "--run", help="A `quantize` run folder: report weight oscillation from its checkpoint; with --compare MODEL=RUN_FOLDER, "
                      "once per model.")] = None,
    budget_bits: Annotated[float | None, typer.Option(
        "--budget-bits", min=2.0, max=8.0, help="Suggest bits: average weight bits over block layers (writes overrides.toml).")] = None,
    keep: Annotated[int | None, typer.Option(
        "--keep", min=0, help="Suggest bits: the N most sensitive block layers at 8 bits (writes overrides.toml).")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    method: Annotated[str, typer.Option(
        "--method", help="Sensitivity method: fast (exact KL, cached block inputs), naive (exact KL, full forward per module), "
                         "taylor (one-pass second-order estimate), auto (fast unless predicted to take over 2 minutes, else "
                         "taylor).")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Variation statistics, per-module quantization sensitivity, oscillation and a bit-allocation suggestion.

    With --compare, several models side by side.
    """
    # OpenMP threads that wait by spinning make every small op 5-13x slower when other processes share the cores
    # (measured on a loaded 2-core machine, docs/analyze.md); read when torch loads, so only before its first import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if what not in ("weights", "acts", "both"):
        raise typer.BadParameter("must be weights, acts or both", param_hint="--what")
    if method not in ("auto", "fast", "naive", "taylor"):
        raise typer.BadParameter("must be auto, fast, naive or taylor", param_hint="--method")
    if budget_bits is not None and keep is not None:
        raise typer.BadParameter("pass only one of --budget-bits and --keep", param_hint="--keep")
    source = ctx.get_parameter_source("data")  # typer's own (vendored) click: compare the enum by name
    note = source is not None and source.name == "DEFAULT" and not (ctx.obj or {}).get("quiet", False)
    if compare:
        _compare(models, data=data, split=split, bits=bits, what=what, out=out, weights=weights, random_init=random_init,
                 model_args=model_args or [], recipe=recipe or "vaq", batches=batches, batch_size=batch_size, run=run or [],
                 allocation=budget_bits is not None or keep is not None, plots=not no_plots, method=method, as_json=as_json,
                 show_progress=_show_progress(ctx, as_json))
        _digits_note(note, data)
        return
    from .commands import analyze

    if len(models) > 1:
        raise typer.BadParameter(f"{len(models)} models given; pass --compare to compare them side by side", param_hint="MODEL")
    if len(model_args or []) > 1 or len(run or []) > 1:
        raise typer.BadParameter("pass it once (several only with --compare)", param_hint="--model-args/--run")
    report = analyze(models[0], data=data, split=split, bits=bits, what=what, out=out, weights=weights, random_init=random_init,
                     model_args=parse_model_args(model_args[0] if model_args else None), recipe=recipe or "vaq", batches=batches,
                     batch_size=batch_size, run=Path(run[0]) if run else None, budget_bits=budget_bits, keep=keep, plots=not no_plots,
                     method=method, show_progress=_show_progress(ctx, as_json))
    summary = report["summary"]
    _digits_note(note, data)
    if as_json:
        emit_json(summary)
        return
    render_table(f"most sensitive modules ({summary['what']} at W{summary['bits']}A{summary['bits']} alone; "
                 f"{summary['method']}: {summary['method_description']})", [
        {"#": m["rank"], "module": m["name"], "KL": m["kl"], "Δloss": m["delta_loss"], "Δtop-1": m["delta_top1"],
         "agree %": m["top1_agreement"]} for m in summary["top_sensitive"]])
    render_table("variation by module type (means over blocks)", [
        {"type": t["type"], "n": t["modules"], "KL": t["kl"], "W SQNR dB": t["weight_sqnr_db"], "A SQNR dB": t["act_sqnr_db"],
         "A kurt": t["act_kurtosis"], "A outl": t["act_outlier_ratio"], "head ratio": t["head_range_ratio"]} for t in summary["by_type"]])
    render_table("variation by block", [
        {"block": b["block"], "KL": b["kl"], "W SQNR dB": b["weight_sqnr_db"], "A SQNR dB": b["act_sqnr_db"],
         "head CV": b["head_range_cv"], "chan ratio": b["channel_range_ratio"]} for b in summary["by_block"]])
    if summary["allocation"]:
        alloc = summary["allocation"]
        render_table(f"bit allocation: average weight bits {alloc['base_average_bits']:.3f} -> {alloc['average_bits']:.3f}",
                     [{"module": k, **v} for k, v in alloc["overrides"].items()])
    if summary["oscillation"]:
        render_table("oscillation", [summary["oscillation"]])
    if summary.get("files"):
        _stderr_console().print(f"report written to {out} ({len(summary['files'])} files; open {out}/index.html)", highlight=False)


def _digits_note(show: bool, data: str) -> None:
    """After an analysis on the default data: say it ran on the built-in digits, not on the model's own images."""
    if show:
        _stderr_console().print(f"note: no --data given, so the report is on {data} (the built-in digits); pass --data "
                                "with the model's own images for a representative report")


def _compare(models: list[str], *, model_args: list[str], run: list[str], weights: Path | None, allocation: bool,
             as_json: bool, show_progress: bool, out: Path | None, **kwargs: Any) -> None:
    """`analyze --compare`: pair --model-args and --run with the models, compare, render the one table."""
    from .analysis import table_rows
    from .commands import compare

    if weights is not None or allocation:
        raise typer.BadParameter("--weights, --budget-bits and --keep are per model; compare model folders "
                                 "(config.json + weights) and allocate bits with analyze on one model", param_hint="--compare")
    if len(model_args) not in (0, 1, len(models)):
        raise typer.BadParameter(f"pass it once for every model or once per model ({len(models)}), got {len(model_args)}",
                                 param_hint="--model-args")
    parsed = [parse_model_args(text) for text in model_args]
    runs = {}
    for value in run:
        spec = next((m for m in models if value.startswith(m + "=")), None)
        if spec is None:
            raise typer.BadParameter(f"{value!r}: with --compare pass MODEL=RUN_FOLDER, MODEL one of the compared models",
                                     param_hint="--run")
        runs[spec] = Path(value[len(spec) + 1:])
    comparison = compare(models, model_args=parsed * len(models) if len(parsed) == 1 else parsed or None, runs=runs, out=out,
                         show_progress=show_progress, **kwargs)
    if as_json:
        emit_json(comparison)
        return
    labels = [m["label"] for m in comparison["models"]]
    render_table(f"variation compared at W{comparison['bits']}A{comparison['bits']} on {comparison['images']} images "
                 f"of {comparison['data']} [{comparison['split']}]; sensitivity {comparison['method']}", table_rows(comparison),
                 ["measure", *labels])
    if comparison.get("files"):
        _stderr_console().print(f"comparison written to {out} (open {out}/index.html; each model's report in its subfolder)")


@app.command("demo")
def demo_cmd(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(
        "--out", help="Working folder: fp/ (cached FP model), report/, labels/, w4/, w2/ and the exports.")] = Path("vitqtool-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A much shorter schedule (smoke tests; lower accuracy).")] = False,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the FP model again even when --out holds one with the same settings.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole pipeline offline on builtin:mnist5k.

    Train a small vision transformer, analyze, soft labels, quantize W4A4/W2A2, evaluate, export.
    """
    from .demo import demo

    result = demo(out, quick=quick, retrain=retrain, show_progress=_show_progress(ctx, as_json))
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    def size(n: int) -> str:
        return f"{n / 1e6:.3f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"

    table = Table(title=f"vitqtool demo: {result['config']['architecture']} on {result['config']['data']} [validation]")
    for c in ("model", "top-1 %", "top-5 %", "file", "size", "vs FP", "verify max|diff|"):
        table.add_column(c, justify="left" if c in ("model", "file") else "right", overflow="fold")
    for m in result["models"]:
        table.add_row(m["model"], f"{m['top1']:.2f}", f"{m['top5']:.2f}", m["file"], size(m["bytes"]),
                      f"{m['size_ratio_vs_fp']:.1f}x", _fmt(m["verify_max_abs_diff"]))
    console = _stdout_console()
    console.print(table)
    times = Table(title=f"wall time: {result['total_seconds']:.1f} s")
    times.add_column("step")
    times.add_column("seconds", justify="right")
    for s in result["steps"]:
        times.add_row(s["step"] + (" (cached)" if s["cached"] else ""), f"{s['seconds']:.1f}")
    console.print(times)
    _stderr_console().print(f"report: {result['report']}  exports: {', '.join(m['file'] for m in result['models'][1:])}", highlight=False)


@contextlib.contextmanager
def _termination_raises() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise `Terminated` (like Ctrl-C) instead of killing the process."""
    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning VitqError into one stderr line and exit code 1.

    Exit codes: 0 success, 1 bad input (VitqError) or an OS error, 2 bad flags (usage), 3 internal error,
    130 interrupted (SIGINT), 143 / 129 stopped by SIGTERM / SIGHUP (quantize checkpoints first).
    """
    debug = os.environ.get("VITQ_DEBUG") == "1"
    try:
        with _termination_raises(), held_lines():
            app(args=argv, standalone_mode=True)  # usage errors print themselves and raise SystemExit(2)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except VitqError as exc:
        if debug:
            raise
        _stderr_console().print(_error_line("error:", str(exc)), soft_wrap=True)
        return exc.exit_code
    except Terminated as exc:
        _stderr_console().print(f"stopped by {signal.Signals(exc.signum).name}")
        return 128 + exc.signum
    except KeyboardInterrupt:
        _stderr_console().print("interrupted")
        return 130
    except OSError as exc:  # an OS error no layer expected (e.g. a file vanished mid-run): still one line, exit 1
        if debug:
            raise
        where = f" '{exc.filename}'" if exc.filename else ""
        _stderr_console().print(_error_line("error:", f"{exc.strerror or exc}{where}"), soft_wrap=True)
        return 1
    except Exception as exc:
        if debug:
            raise
        _stderr_console().print(_error_line("internal error:", f"{type(exc).__name__}: {exc} (set VITQ_DEBUG=1 for the traceback)"),
                                soft_wrap=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
