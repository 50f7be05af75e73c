"""`vitqtool demo`: the whole pipeline, offline, on builtin:mnist5k with a small ViT trained from scratch.

Steps (each with a rich progress bar on stderr):

1. train the FP model (`train_fp`) into `out/fp`; cached: a second run reuses it when its settings match,
2. `analyze` it at W2A2 (a couple of batches, fast method) into `out/report`,
3. multi-crop soft labels from the FP teacher into `out/labels` (`softlabels`),
4. `quantize --recipe vaq --soft-labels` at 4 and 2 bits into `out/w4`, `out/w2`,
5. `evaluate` FP, W4A4 and W2A2 on the validation split,
6. `export --verify` both runs to `out/w4.safetensors`, `out/w2.safetensors`.

The model and schedule are the module constant `DEMO` (one frozen dataclass); `QUICK` is a much
shorter schedule for tests. benchmarks/ladder.py imports `DEMO` so its FP model is the demo's.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.text import Text

from .commands import analyze, evaluate, export, quantize, softlabels, train_fp
from .export.formats import ExportSummary
from .fileio import atomic_write, write_json
from .progress import console

FP_STAMP = "demo.json"  # written into out/fp next to config.json: the settings the FP model was trained with


@dataclass(frozen=True)
class DemoConfig:
    """Model, data and schedule of the built-in demo (also the ladder benchmark's FP model)."""

    # model and data
    architecture: str = "vit_tiny_patch16_224"
    model_args: dict = field(default_factory=lambda: {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 3,
                                                      "num_heads": 3, "num_classes": 10})
    data: str = "builtin:mnist5k"
    seed: int = 0
    threads: int = 1  # torch intra-op threads while the demo runs: tiny models are fastest (and fair to other jobs) on one
    # augmentation of every stage (digits: mild crops, no flips; the recipes' defaults are ImageNet's)
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    hflip: bool = False
    # FP training (train_fp: AdamW, warmup + cosine, hard labels)
    fp_epochs: int = 16
    fp_lr: float = 2e-3
    fp_batch_size: int = 64
    fp_weight_decay: float = 0.05
    fp_warmup_epochs: float = 0.5
    # analyze
    analyze_bits: int = 2
    analyze_batches: int = 2
    analyze_batch_size: int = 32
    # multi-crop soft labels
    label_crops: int = 8
    label_topk: int = 5
    label_batch_size: int = 256
    # QAT (vaq recipe, stored soft labels)
    recipe: str = "vaq"
    qat_bits: tuple[int, ...] = (4, 2)
    # per entry of qat_bits; equal epochs, so W4A4 never gets less training than W2A2 (with (1, 3) W4A4 could end
    # below W2A2); chosen on seeds 0-2 by benchmarks/demo_seeds.py, results in benchmarks/results/demo_seeds.md
    qat_epochs: tuple[int, ...] = (2, 2)
    qat_lr: float = 1e-3
    qat_batch_size: int = 64
    qat_crops_per_image: int = 2  # stored crops replayed per image and step (kd.crops_per_image)
    calib_batches: int = 4
    limit_train: int | None = None  # training images used by every stage (None: all 4,000)
    qat_limit_val: int | None = None  # validation images QAT checks each epoch (None: all 1,000; the final evaluate uses all)
    eval_batch_size: int = 256

    def fp_settings(self) -> dict[str, Any]:
        """What the FP model depends on (the cache key of out/fp)."""
        keys = ("architecture", "model_args", "data", "seed", "scale", "ratio", "hflip", "fp_epochs", "fp_lr",
                "fp_batch_size", "fp_weight_decay", "fp_warmup_epochs", "limit_train")
        return json.loads(json.dumps({k: getattr(self, k) for k in keys}))

    def overrides_toml(self) -> str:
        """Recipe overrides for the digits (written to out/mnist-overrides.toml and passed to quantize)."""
        return (f"# vitqtool demo: digits need no flips and only mild crops\n[augment]\nscale = {list(self.scale)}\n"
                f"ratio = {list(self.ratio)}\nhflip = {str(self.hflip).lower()}\n\n"
                f"[kd]\ncrops_per_image = {self.qat_crops_per_image}\n")


DEMO = DemoConfig()

# A much shorter schedule for tests: same model and all 4,000 training images (every class; a `limit_train` subset
# would depend on how the data layer picks it), fewer epochs, fewer crops, QAT checks 100 validation images.
QUICK = replace(DEMO, fp_epochs=3, label_crops=2, qat_epochs=(1, 1), qat_crops_per_image=1, calib_batches=1,
                limit_train=None, qat_limit_val=100, analyze_batches=1, analyze_batch_size=16)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fp_cached(folder: Path, cfg: DemoConfig) -> float | None:
    """The stored validation top-1 of out/fp when it was trained with exactly these settings, else None."""
    stamp, config = folder / FP_STAMP, folder / "config.json"
    if not (stamp.is_file() and config.is_file() and (folder / "model.safetensors").is_file()):
        return None
    try:
        saved = json.loads(stamp.read_text())
        model_cfg = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    args = {k: v for k, v in cfg.model_args.items() if k != "num_classes"}
    if saved.get("settings") != cfg.fp_settings() or model_cfg.get("architecture") != cfg.architecture \
            or model_cfg.get("model_args") != args:
        return None
    return saved.get("top1")


def demo(out: Path = Path("vitqtool-demo"), *, quick: bool = False, config: DemoConfig | None = None,
         retrain: bool = False, show_progress: bool = False, log: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run the built-in pipeline (train FP -> analyze -> soft labels -> quantize W4/W2 -> evaluate -> export).

    Args:
        out: working folder (created); re-running reuses its FP model when the settings match.
        quick: use `QUICK` (a much shorter schedule, for tests) instead of `DEMO`.
        config: an explicit DemoConfig (overrides `quick`).
        retrain: train the FP model even when out/fp matches.
        show_progress: rich progress bars and step lines on stderr.
        log: where step lines go (default: stderr when show_progress, else nowhere).
    Returns:
        The result document: config, per-model top-1 and file sizes, per-step wall times, paths.
    """
    cfg = config or (QUICK if quick else DEMO)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if log is None:
        if show_progress:
            log = console(stderr=True).print
        else:
            log = lambda text: None  # noqa: E731
    steps: list[dict[str, Any]] = []
    total_steps = 5 + len(cfg.qat_bits)

    @contextlib.contextmanager
    def step(name: str, detail: str = "") -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {"step": name, "seconds": None, "cached": False}
        log(Text.assemble((f"[{len(steps) + 1}/{total_steps}] {name}", "bold cyan"), " ", detail))
        t0 = time.perf_counter()
        yield record
        record["seconds"] = round(time.perf_counter() - t0, 2)
        steps.append(record)
        log(f"    done in {record['seconds']:.1f} s" + (" (cached)" if record["cached"] else ""))

    t_start = time.perf_counter()
    fp_dir, labels_dir = out / "fp", out / "labels"
    overrides = out / "mnist-overrides.toml"
    atomic_write(overrides, cfg.overrides_toml())
    with _torch_threads(cfg.threads):
        # 1. FP model (cached)
        with step("train FP model", f"{cfg.architecture} {json.dumps(cfg.model_args)}, {cfg.fp_epochs} epochs") as rec:
            fp_top1 = None if retrain else _fp_cached(fp_dir, cfg)
            if fp_top1 is not None:
                rec["cached"] = True
                log(f"    reusing {fp_dir} (trained with these settings; pass --retrain to train again)")
            else:
                (fp_dir / FP_STAMP).unlink(missing_ok=True)
                fp = train_fp(cfg.architecture, fp_dir, data=cfg.data, model_args=dict(cfg.model_args), epochs=cfg.fp_epochs,
                              batch_size=cfg.fp_batch_size, lr=cfg.fp_lr, weight_decay=cfg.fp_weight_decay,
                              warmup_epochs=cfg.fp_warmup_epochs, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
                              seed=cfg.seed, limit_train=cfg.limit_train, show_progress=show_progress)
                fp_top1 = fp.top1
                write_json(fp_dir / FP_STAMP, {"settings": cfg.fp_settings(), "top1": fp_top1})
            rec["top1"] = fp_top1
        model = str(fp_dir)

        # 2. analyze at W{analyze_bits}
        with step("analyze", f"W{cfg.analyze_bits}A{cfg.analyze_bits} sensitivity and variation -> {out / 'report'}") as rec:
            report = analyze(model, data=cfg.data, bits=cfg.analyze_bits, out=out / "report", batches=cfg.analyze_batches,
                             batch_size=cfg.analyze_batch_size, method="fast", show_progress=show_progress)
            top = report["summary"].get("top_sensitive") or []
            rec["most_sensitive"] = [m["name"] for m in top[:3]]

        # 3. multi-crop soft labels from the FP teacher
        with step("soft labels", f"{cfg.label_crops} crops/image, top-{cfg.label_topk} -> {labels_dir}") as rec:
            labels = softlabels(model, labels_dir, cfg.data, "train", crops=cfg.label_crops, topk=cfg.label_topk,
                                scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, seed=cfg.seed,
                                batch_size=cfg.label_batch_size, limit=cfg.limit_train, overwrite=True,
                                show_progress=show_progress)
            rec.update(images=labels["images"], crops=labels["crops"], bytes=labels["total_bytes"])

        # 4. QAT at each bit width
        runs: dict[int, Path] = {}
        for bits, epochs in zip(cfg.qat_bits, cfg.qat_epochs):
            run_dir = out / f"w{bits}"
            with step(f"quantize W{bits}A{bits}", f"recipe {cfg.recipe}, stored soft labels, {epochs} epoch(s) -> {run_dir}") as rec:
                info = quantize(model, bits=bits, recipe=cfg.recipe, data=cfg.data, out=run_dir, soft_labels=labels_dir,
                         epochs=epochs, batch_size=cfg.qat_batch_size, lr=cfg.qat_lr, seed=cfg.seed,
                         calib_batches=cfg.calib_batches, overrides=[overrides], limit_train=cfg.limit_train,
                         limit_val=cfg.qat_limit_val, overwrite=True, show_progress=show_progress)
                rec.update(best_top1=info.best_top1, steps=info.step)
            runs[bits] = run_dir

        # 5. evaluate on the validation split
        results: dict[str, dict[str, Any]] = {}
        with step("evaluate", f"FP and {', '.join(f'W{b}A{b}' for b in runs)} on {cfg.data} [validation]"):
            for name, spec in [("FP", model), *((f"W{b}A{b}", str(d)) for b, d in runs.items())]:
                r = evaluate(spec, cfg.data, "validation", batch_size=cfg.eval_batch_size, show_progress=show_progress)
                results[name] = {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"], "n": r["n"]}

        # 6. export --verify
        exports: dict[int, ExportSummary] = {}
        with step("export --verify", ", ".join(str(out / f"w{b}.safetensors") for b in runs)):
            for bits, run_dir in runs.items():
                exports[bits] = export(run_dir, out / f"w{bits}.safetensors", verify=True)

    fp_file = fp_dir / "model.safetensors"
    models = [{"model": "FP", "bits": None, **results["FP"], "file": str(fp_file), "bytes": fp_file.stat().st_size,
               "verify_max_abs_diff": None}]
    for bits in runs:
        e = exports[bits]
        models.append({"model": f"W{bits}A{bits}", "bits": bits, **results[f"W{bits}A{bits}"], "file": e.path,
                       "bytes": e.file_bytes, "verify_max_abs_diff": (e.verify or {}).get("max_abs_diff")})
    for m in models:
        m["size_ratio_vs_fp"] = round(models[0]["bytes"] / m["bytes"], 2)
    return {
        "out": str(out), "quick": cfg is QUICK, "config": asdict(cfg), "fp_cached": steps[0]["cached"],
        "models": models, "steps": steps, "total_seconds": round(time.perf_counter() - t_start, 2),
        "report": str(out / "report" / "index.html"), "soft_labels": str(labels_dir),
        "runs": {f"W{b}A{b}": str(d) for b, d in runs.items()},
    }
