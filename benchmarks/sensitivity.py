"""Sensitivity: the one-pass estimate (`taylor`) against the exact methods (`fast`, `naive`): ranking, cost, allocation.

    python benchmarks/sensitivity.py                                    # demo ViT (trained), swin_tiny, deit_small
    python benchmarks/sensitivity.py --models demo --repeats 3          # the demo ViT only, 3 interleaved rounds
    python benchmarks/sensitivity.py --naive-sample 24 --md benchmarks/results/sensitivity.md

Per model: the `vaq` layout at W2A2 (edge layers at 8 bits), step sizes calibrated as `analyze` calibrates them (one
batch of 32 evenly spaced training digits of builtin:mnist5k), 128 evenly spaced validation digits in 4 batches of 32
at the model's input size (`analyze`'s defaults). Units: the weights and input of every quantized layer and every
standalone activation quantizer, plus the per-block and per-type groups: everything `analyze` measures.
- Timings: each method's sensitivity pass with its own FP pass (`fast`: with the block-input cache), all methods in
  one process, in rounds (taylor, fast, naive, taylor, ...), medians over `--repeats` rounds. `naive` costs one full
  forward per unit and batch; with `--naive-sample N` it measures N evenly spaced units and its time is scaled to all
  units (its FP pass counted once), marked "scaled" in the table.
- Ranking: Spearman correlation and top-10 overlap of the estimated module KLs against the exact ones.
- Allocation: the `--budget-bits 2.5` overrides each ranking gives (layers raised, and how many the two share); on
  the demo ViT also the top-1 on the 1,000 validation digits that each allocation reaches with PTQ (`ptq` recipe,
  calibration only) and with QAT (`vaq`, the demo's W2A2 schedule on stored soft labels), and without allocation.
The demo ViT is trained once into WORK/demo-fp with the demo's FP schedule (`vitqtool.demo.DEMO`) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report_md import publish  # noqa: E402

MODELS = {  # name -> (MODEL spec or "demo", timm model args)
    "demo": ("demo", None),
    "swin_tiny": ("swin_tiny_patch4_window7_224", None),
    "deit_small": ("deit_small_patch16_224", None),
}
DATA = "builtin:mnist5k"
BUDGET = 2.5


def demo_model(work: Path) -> Path:
    """The demo's FP ViT, trained with DEMO's FP schedule into WORK/demo-fp (reused when its settings match)."""
    from vitqtool import commands
    from vitqtool.demo import DEMO
    from vitqtool.fileio import write_json

    folder, stamp = work / "demo-fp", work / "demo-fp" / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == DEMO.fp_settings():
        return folder
    commands.train_fp(DEMO.architecture, folder, data=DEMO.data, model_args=dict(DEMO.model_args), epochs=DEMO.fp_epochs,
                      batch_size=DEMO.fp_batch_size, lr=DEMO.fp_lr, weight_decay=DEMO.fp_weight_decay,
                      warmup_epochs=DEMO.fp_warmup_epochs, scale=DEMO.scale, ratio=DEMO.ratio, hflip=DEMO.hflip, seed=DEMO.seed)
    write_json(stamp, DEMO.fp_settings())
    return folder


def timed(method: str, model: Any, adapter: Any, units: list, batches: list, sample: int | None) -> tuple[float, list[float], bool]:
    """(seconds, KL per measured unit, scaled) of one method's sensitivity pass over `units` (a sample for naive)."""
    from vitqtool.analysis.estimate import taylor_sensitivity
    from vitqtool.analysis.sensitivity import SensitivityProbe

    t0 = time.perf_counter()
    if method == "taylor":
        kl, _ = taylor_sensitivity(model, units, batches)
        return time.perf_counter() - t0, kl, False
    probe = SensitivityProbe(model, adapter, batches, method)
    t1 = time.perf_counter()
    picked = units if method != "naive" or not sample or sample >= len(units) else sample_units(units, sample)
    kl = [probe.measure(u)["kl"] for u in picked]
    t2 = time.perf_counter()
    scaled = len(picked) < len(units)
    return (t1 - t0) + (t2 - t1) * len(units) / len(picked), kl, scaled


def sample_units(units: list, n: int) -> list:
    """`n` evenly spaced units."""
    return [units[i * len(units) // n] for i in range(n)]


def allocation(units: list, kl: list[float], edge_bits: int) -> dict[str, Any]:
    """The `--budget-bits 2.5` allocation `analyze` would suggest from these module KLs."""
    from vitqtool.analysis.allocation import allocate
    from vitqtool.analysis.sensitivity import rank_rows

    rows = rank_rows(units, [{"kl": k, "top1_agreement": None, "loss": None, "top1": None} for k in kl], {})
    layers = [r for r in rows if r["block"] is not None and r["weight_bits"] is not None and r["weight_bits"] < edge_bits]
    return allocate(layers, budget_bits=BUDGET)


def measure_model(name: str, work: Path, methods: list[str], repeats: int, naive_sample: int | None) -> dict[str, Any]:
    """Prepare one model, time every method in rounds, compare rankings and allocations."""
    import torch

    from vitqtool import commands, core
    from vitqtool.analysis.sensitivity import build_units, group_units, spearman, top_overlap
    from vitqtool.data import load_dataset, make_eval_loader, stratified_sample
    from vitqtool.families import get_family
    from vitqtool.recipe import load_recipe

    spec, args = MODELS[name]
    torch.manual_seed(0)
    source = str(demo_model(work)) if spec == "demo" else spec
    loaded = commands.resolve_any(source, random_init=spec != "demo", model_args=args)
    recipe = load_recipe("vaq", set_fields={"quant.bits": 2})
    cfg = loaded.data_config
    calibration = list(make_eval_loader(stratified_sample(load_dataset(DATA, "train"), 32), cfg, 32))
    batches = list(make_eval_loader(stratified_sample(load_dataset(DATA, "validation"), 128), cfg, 32))
    model = core.prepare(loaded.model, recipe, inplace=True).eval()
    core.calibrate(model, calibration)
    adapter = get_family(model)
    blocks = adapter.block_names(model)
    units = build_units(model, "both", blocks)
    everything = units + group_units(units, "block") + group_units(units, "type")
    times: dict[str, list[float]] = {m: [] for m in methods}
    kls: dict[str, list[float]] = {}
    scaled = False
    for r in range(repeats):
        for m in methods:
            seconds, kl, was_scaled = timed(m, model, adapter, everything, batches, naive_sample)
            times[m].append(seconds)
            kls.setdefault(m, kl)
            scaled |= was_scaled
            print(f"[sensitivity] {name} round {r + 1}: {m} {seconds:.1f} s", flush=True)
    exact_method = "fast" if "fast" in kls else "naive"
    exact, estimate = kls[exact_method], kls["taylor"]
    n = len(units)
    out: dict[str, Any] = {
        "model": name, "spec": source, "input": "x".join(str(s) for s in cfg["input_size"][1:]), "images": 128,
        "units": n, "measured": len(everything), "seconds": {m: statistics.median(t) for m, t in times.items()},
        "all_seconds": times, "naive_scaled": scaled,
        "spearman_modules": spearman(exact[:n], estimate[:n]), "spearman_all": spearman(exact, estimate),
        "top10_overlap": top_overlap(exact[:n], estimate[:n], 10),
    }
    if "fast" in kls and "naive" in kls:  # the exact methods agree (naive's measured units)
        picked = sample_units(everything, len(kls["naive"])) if scaled else everything
        fast_by_name = dict(zip((u.name for u in everything), kls["fast"]))
        out["fast_naive_max_rel_diff"] = max(abs(fast_by_name[u.name] - k) / max(abs(k), 1e-12) for u, k in zip(picked, kls["naive"]))
    alloc = {m: allocation(units, kl[:n], recipe.quant.edge_bits) for m, kl in (("exact", exact), ("taylor", estimate))}
    out["allocation"] = {m: sorted(a["overrides"]) for m, a in alloc.items()}
    out["allocation_shared"] = len(set(out["allocation"]["exact"]) & set(out["allocation"]["taylor"]))
    out["allocation_average_bits"] = {m: a["average_bits"] for m, a in alloc.items()}
    if spec == "demo":
        out["accuracy"] = demo_accuracy(work, Path(source), alloc)
    return out


def demo_accuracy(work: Path, fp: Path, alloc: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation top-1 of the demo ViT at W2A2 with each allocation (and none): PTQ and QAT (the demo's W2A2 schedule)."""
    from vitqtool import commands
    from vitqtool.analysis.allocation import overrides_toml
    from vitqtool.demo import DEMO
    from vitqtool.fileio import atomic_write

    mnist = work / "mnist-overrides.toml"
    atomic_write(mnist, DEMO.overrides_toml())
    labels = work / "labels"
    if not (labels / "manifest.json").is_file():
        commands.softlabels(str(fp), labels, DEMO.data, "train", crops=DEMO.label_crops, topk=DEMO.label_topk, scale=DEMO.scale,
                            ratio=DEMO.ratio, hflip=DEMO.hflip, seed=DEMO.seed, batch_size=DEMO.label_batch_size, overwrite=True)
    rows = []
    variants = [("none", None), *alloc.items()]
    for label, a in variants:
        same = next((r for r in rows if a is not None and r["layers"] == sorted(a["overrides"])), None)
        if same is not None:  # an identical allocation trains identically: not run twice
            rows.append({**same, "allocation": label, "same_as": same["allocation"]})
            continue
        files = []
        if a is not None:
            path = work / f"alloc-{label}.toml"
            atomic_write(path, overrides_toml(a, f"benchmarks/sensitivity.py: --budget-bits {BUDGET} from the {label} ranking"))
            files.append(path)
        row: dict[str, Any] = {"allocation": label, "layers": sorted(a["overrides"]) if a else [],
                               "average_bits": a["average_bits"] if a else 2.0}
        for recipe, extra in (("ptq", {}), ("vaq", {"soft_labels": labels, "epochs": DEMO.qat_epochs[DEMO.qat_bits.index(2)],
                                                    "batch_size": DEMO.qat_batch_size, "lr": DEMO.qat_lr})):
            run = work / f"{recipe}-{label}"
            commands.quantize(str(fp), bits=2, recipe=recipe, data=DEMO.data, out=run, seed=DEMO.seed,
                              calib_batches=DEMO.calib_batches, overrides=[mnist, *files], overwrite=True, **extra)
            row[recipe] = commands.evaluate(str(run), DEMO.data, "validation", batch_size=DEMO.eval_batch_size)["top1"]
            print(f"[sensitivity] demo {recipe} allocation {label}: top-1 {row[recipe]:.2f}", flush=True)
        rows.append(row)
    return rows


def markdown(results: list[dict[str, Any]], threads: int, repeats: int, cmd: str, wall: float | None) -> list[str]:
    """The tables of the README / docs."""
    lines = ["| model | input | units (measured) | naive s | fast s | taylor s | taylor / fast | Spearman modules | Spearman all "
             "| top-10 overlap | 2.5-bit allocation shared |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["seconds"]
        naive = f"{s['naive']:.1f}" + (" (scaled)" if r["naive_scaled"] else "") if "naive" in s else "-"
        fast = f"{s['fast']:.1f}" if "fast" in s else "-"
        ratio = f"{s['taylor'] / s['fast']:.3f}" if "fast" in s else "-"
        lines.append(f"| {r['model']} | {r['input']} | {r['units']} ({r['measured']}) | {naive} | {fast} | {s['taylor']:.1f} | {ratio} "
                     f"| {r['spearman_modules']:.3f} | {r['spearman_all']:.3f} | {r['top10_overlap']}/10 "
                     f"| {r['allocation_shared']}/{len(r['allocation']['exact'])} |")
    demo = next((r for r in results if "accuracy" in r), None)
    if demo:
        lines += ["", f"Demo ViT at W2A2, `--budget-bits {BUDGET}` from each ranking: top-1 (%) on the 1,000 validation digits.", "",
                  "| allocation | layers at 4 bits | average bits | PTQ top-1 | QAT top-1 |", "|---|---|---|---|---|"]
        for row in demo["accuracy"]:
            label = row["allocation"] + (f" (same layers as {row['same_as']})" if row.get("same_as") else "")
            lines.append(f"| {label} | {len(row['layers'])} | {row['average_bits']:.3f} | {row['ptq']:.2f} | {row['vaq']:.2f} |")
    machine = f"{os.cpu_count()} CPU cores ({platform.machine()}, Python {platform.python_version()}), shared with other jobs"
    if wall is not None:
        lines += ["", (f"Command: `{cmd}`, {threads} torch thread(s), {repeats} round(s) (median), 128 images; wall time "
                       f"{wall / 60:.1f} min on {machine} (load average at the end: {os.getloadavg()[0]:.1f}).")]
    else:
        lines += ["", f"Combined by `{cmd}` from separate runs on {machine}:"]
        lines += [f"- {r['model']}: `{r.get('command', '(command not recorded)')}`"
                  + (f", {r['wall_s'] / 60:.1f} min, load average at the end {r['load_end']:.1f}" if "wall_s" in r else "")
                  for r in results]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,swin_tiny,deit_small", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--methods", default="taylor,fast,naive", help="comma list of taylor, fast, naive (taylor needs fast or naive)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all methods (median time)")
    p.add_argument("--naive-sample", type=int, default=None, help="measure this many evenly spaced units with naive and scale its time")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared machine)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vitqtool-sensitivity")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown tables (and a .json record) to this file")
    p.add_argument("--report-only", action="store_true", help="measure nothing: tables from WORK/result-MODEL.json of earlier runs")
    a = p.parse_args(argv)
    cmd = "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:]))
    if a.report_only:
        results = [json.loads((a.work / f"result-{m}.json").read_text()) for m in a.models.split(",") if m]
        publish(markdown(results, a.threads, a.repeats, cmd, None), a.md, {"results": results})
        return 0
    import torch

    torch.set_num_threads(a.threads)
    methods = [m for m in a.methods.split(",") if m]
    if "taylor" not in methods or not {"fast", "naive"} & set(methods):
        p.error("--methods needs taylor and at least one exact method (fast or naive)")
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for name in [m for m in a.models.split(",") if m]:
        t1 = time.perf_counter()
        results.append(measure_model(name, a.work, methods, a.repeats, a.naive_sample))
        results[-1].update(command=cmd, wall_s=time.perf_counter() - t1, load_end=os.getloadavg()[0])
        (a.work / f"result-{name}.json").write_text(json.dumps(results[-1], indent=1))  # kept if a later model fails
    publish(markdown(results, a.threads, a.repeats, cmd, time.perf_counter() - t0), a.md, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
