"""Coverage of timm's ViT-like and CNN families: every architecture accepted and FP-exact, or refused with its one-line reason.

    python benchmarks/families.py                        # every module below; writes results/families.{md,json}, the docs block
    python benchmarks/families.py --modules eva,beit     # some timm modules only (prints; docs and results left alone)
    python benchmarks/families.py --no-docs              # write the results, leave the docs page alone

For each architecture of `timm.list_models(module=M)`, M in MODULES plus the timm module of every class a
vitqtool family registers (so a newly merged family is covered on the next run):
1. **structure, at full size**: the model is built with timm's own arguments on the meta device (no memory,
   no weights) and `vitqtool.prepare(model, bits=4)` either accepts it or refuses it with one ModelError line;
2. **numerics, at a small size** (accepted architectures): the same entry point with SHRINK's arguments (the
   cap: 2 blocks per stage or fewer, 2 heads of the original head width, 4x4 tokens; CNNs 1 block per stage at
   32 px; 10 classes), random init, then every parameter timm initialises to a constant (zero heads, norm
   affines, layer scales, zero-init last BatchNorms) gets +-0.1 noise around its value so that no block or
   head is trivially exact; the logits of `prepare(model)` with `quantizers_disabled` are compared with the
   stock model's on 2 random images: FP-exact when the max |difference| is <= 1e-5 (logits of order 1: the
   table gives their std). Architectures that differ only in what SHRINK overrides (resolution, depth, width)
   share one numeric check (same shrunk module tree, parameter shapes and module settings).
An architecture timm cannot build on the meta device is built at the small size on the CPU for both steps.
Anything other than a ModelError from `prepare` is a vitqtool bug and is reported as "crashed".
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import platform
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.report_md import publish  # noqa: E402

# timm modules of the ViT-like and CNN families vitqtool covers or issue 20 names, in table order
MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid", "vision_transformer_relpos", "eva", "beit", "cait",
           "swin_transformer", "swin_transformer_v2", "convnext", "resnet", "sret_model")
START, END = "<!-- families:start -->", "<!-- families:end -->"
COVERAGE_PAGE = ROOT / "docs" / "reference" / "inputs.md"  # its block between START and END is this script's summary
EXACT = 1e-5
TIMEOUT_S = 120  # per architecture and step


def _vit(model: Any) -> dict[str, Any]:
    """ViT-like: 2 blocks, 2 heads of the original head width, 4x4 tokens (a hybrid backbone: 64 px)."""
    block = model.blocks[0]
    attn = getattr(block, "attn", None) or getattr(block, "attn_block", None)
    heads = getattr(attn, "num_heads", None) or 1
    head_dim = getattr(attn, "head_dim", None) or model.embed_dim // heads
    embed = model.patch_embed
    patch = embed.patch_size[0] if isinstance(getattr(embed, "patch_size", None), tuple) else getattr(embed, "patch_size", 16)
    img = 64 if hasattr(embed, "backbone") else 4 * patch
    args = {"embed_dim": 2 * head_dim, "depth": 2, "num_heads": 2, "img_size": img}
    if hasattr(model, "blocks_token_only"):
        args["depth_token_only"] = 1
    return args


def _swin(model: Any) -> dict[str, Any]:
    """Swin V1/V2: 2 blocks per stage, 1-2-4-8 heads of the original head width, 2x2 windows, 64 px at patch 4."""
    stages = len(model.layers)
    attn = model.layers[0].blocks[0].attn
    head_dim = model.embed_dim // attn.num_heads
    patch = model.patch_embed.patch_size[0]
    return {"embed_dim": head_dim, "depths": (2,) * stages, "num_heads": tuple(2**s for s in range(stages)),
            "window_size": 2, "img_size": patch * 2 ** (stages - 1) * 2}


SHRINK: dict[str, Callable[[Any], dict[str, Any]]] = {
    **dict.fromkeys(("vision_transformer", "deit", "vision_transformer_hybrid", "vision_transformer_relpos", "eva", "beit",
                     "cait"), _vit),
    "swin_transformer": _swin, "swin_transformer_v2": _swin,
    "convnext": lambda m: {"depths": (1,) * len(m.stages), "dims": tuple(16 * 2**s for s in range(len(m.stages)))},
    "resnet": lambda m: {"layers": (1,) * 4},
    "sret_model": lambda m: {"img_size": 32, "dims": (16, 32, 64), "depths": (2, 2, 2), "num_blocks": (1, 1, 1),
                             "num_heads": (1, 2, 4)},
}
CNN_SIZE = 32  # image side for models without an img_size argument


class TimedOut(Exception):
    """One step of one architecture ran past TIMEOUT_S."""


def _alarm(signum: int, frame: Any) -> None:
    raise TimedOut(f"timed out after {TIMEOUT_S} s")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def short(message: str) -> str:
    """A ModelError line without the list of supported families it ends with."""
    return re.sub(r" \(supported timm architectures: [^)]*\)", "", message)


def brief(reason: str, width: int = 140) -> str:
    """A reason for the summary table: without the common ending, cut at `width` characters, no table pipes."""
    reason = reason.removesuffix(" is not supported by the quantized layout").replace("|", "/")
    return reason if len(reason) <= width else reason[:width - 3] + "..."


def reason_key(message: str) -> str:
    """A refusal reason with module indices taken out, so reasons group across models."""
    return re.sub(r"(?<=\.)\d+(?=\.|:| |$)", "N", short(message))


def spread_constants_(model: Any, seed: int) -> None:
    """Parameters initialised to one constant value get +-0.1 normal noise around it (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 0 and bool((p == p.reshape(-1)[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))


def signature(model: Any) -> str:
    """What a numeric check depends on: module tree, parameter/buffer shapes and every module's plain settings."""
    import torch

    parts = [repr(model)]
    parts += [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
    for name, mod in model.named_modules():
        plain = {k: v for k, v in vars(mod).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, type(None)))}
        parts.append(f"{name}:{sorted(plain.items(), key=lambda kv: kv[0])!r}")
        parts += [f"{name}.{k}:{tuple(v.shape)}" for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def check_structure(name: str) -> tuple[str, str | None, Any]:
    """(status, message, full-size meta model or None) of `prepare(bits=4)` on the model built on the meta device."""
    import timm
    import torch

    import vitqtool
    from vitqtool.errors import ModelError

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except TimedOut:
        raise
    except Exception as exc:  # noqa: BLE001 - timm cannot build it on meta: the caller builds it small on the CPU
        return "no-meta", f"{type(exc).__name__}: {one_line(exc)}", None
    try:
        vitqtool.prepare(model, bits=4)
    except ModelError as exc:
        return "refused", one_line(exc), model
    except TimedOut:
        raise
    except Exception as exc:  # noqa: BLE001 - any other error is a bug, reported as such
        return "crashed", f"{type(exc).__name__}: {one_line(exc)}", model
    return "accepted", None, model


def check_numerics(name: str, module: str, full: Any, seed: int, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Build `name` small (SHRINK, read off the full-size meta model `full`; None: timm's own size) with random init,
    prepare it and compare logits with quantizers disabled; `cache` holds the results by shrunk-model signature."""
    import timm
    import torch

    import vitqtool
    from vitqtool.core.models import resolve_data_config
    from vitqtool.errors import ModelError

    shrink = SHRINK.get(module)
    args = {"num_classes": 10, **(shrink(full) if shrink is not None and full is not None else {})}
    try:
        model = timm.create_model(name, pretrained=False, **args).eval()
    except TimedOut:
        raise
    except Exception as exc:  # noqa: BLE001 - the cap does not fit this architecture: report it, do not guess
        return {"status": "not built", "message": f"small build with {args}: {type(exc).__name__}: {one_line(exc)}", "args": args}
    spread_constants_(model, seed)
    key = signature(model)
    if key in cache:
        return {**cache[key], "args": args, "shared_with": cache[key]["architecture"]}
    size = resolve_data_config(model).get("input_size", (3, CNN_SIZE, CNN_SIZE))
    if "img_size" not in args and not getattr(model, "_traits", {}).get("fixed_input_size", False):
        size = (size[0], CNN_SIZE, CNN_SIZE)
    images = torch.randn(2, *size, generator=torch.Generator().manual_seed(seed))
    out: dict[str, Any] = {"architecture": name, "args": args, "input": list(size),
                           "params": sum(p.numel() for p in model.parameters())}
    try:
        q = vitqtool.prepare(model, bits=4)
    except ModelError as exc:
        return {**out, "status": "refused", "message": f"at the small size: {one_line(exc)}"}
    except TimedOut:
        raise
    except Exception as exc:  # noqa: BLE001
        return {**out, "status": "crashed", "message": f"{type(exc).__name__}: {one_line(exc)}"}
    with torch.no_grad():
        reference = model(images)
        with vitqtool.quantizers_disabled(q):
            diff = float((q(images) - reference).abs().max())
    cache[key] = {**out, "status": "exact" if diff <= EXACT else "not exact", "max_abs_diff": diff,
                  "logit_std": float(reference.std())}
    return cache[key]


def run(modules: list[str], seed: int, limit: int | None) -> list[dict[str, Any]]:
    """One row per architecture, in module order."""
    import timm

    import vitqtool.families  # noqa: F401  (registers vitqtool's own timm models, e.g. SReT)

    rows: list[dict[str, Any]] = []
    cache: dict[str, dict[str, Any]] = {}  # numeric result by shrunk-model signature
    signal.signal(signal.SIGALRM, _alarm)
    for module in modules:
        names = timm.list_models(module=module)[:limit]
        for i, name in enumerate(names, 1):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"module": module, "architecture": name}
            signal.alarm(TIMEOUT_S)
            try:
                status, message, full = check_structure(name)
                row.update(cls=type(full).__name__ if full is not None else "")
                if status in ("refused", "crashed"):
                    row.update(status=status, message=message)
                else:
                    if status == "no-meta":
                        row["note"] = f"not buildable on the meta device ({message}); checked at the small size only"
                    signal.alarm(TIMEOUT_S)
                    row.update({k: v for k, v in check_numerics(name, module, full, seed, cache).items() if k != "architecture"})
            except TimedOut as exc:
                row.update(status="timed out", message=str(exc))
            finally:
                signal.alarm(0)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            print(f"[{module} {i}/{len(names)}] {name}: {row['status']}" + (f" ({row['message']})" if row.get("message") else "")
                  + (f" max|diff| {row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""), file=sys.stderr, flush=True)
    return rows


def summary_table(rows: list[dict[str, Any]], modules: list[str]) -> list[str]:
    """Per timm module: tried, accepted and FP-exact, accepted but not exact / other, refused with reasons (counts)."""
    lines = ["| timm module (family) | tried | accepted, FP-exact | refused | why refused (architectures) | other |",
             "|---|---|---|---|---|---|"]
    for module in modules:
        mine = [r for r in rows if r["module"] == module]
        if not mine:
            continue
        counts = collections.Counter(r["status"] for r in mine)
        reasons = collections.Counter(reason_key(r["message"]) for r in mine if r["status"] == "refused")
        why = "; ".join(f"{brief(reason)} ({n})" for reason, n in reasons.most_common()) or "-"
        other = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()) if status not in ("exact", "refused")) or "-"
        classes = ", ".join(sorted({r["cls"] for r in mine if r.get("cls")}))
        lines.append(f"| `{module}` ({classes}) | {len(mine)} | {counts['exact']} | {counts['refused']} | {why} | {other} |")
    return lines


def detail_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| architecture | class | result | max abs logit diff (logit std) | small size checked | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        diff = f"{r['max_abs_diff']:.1e} ({r['logit_std']:.2f})" if "max_abs_diff" in r else "-"
        size = ", ".join(f"{k}={v}" for k, v in r.get("args", {}).items() if k != "num_classes") or "-"
        note = short(r.get("message") or r.get("note") or "") or (f"same shrunk model as {r['shared_with']}" if r.get("shared_with") else "")
        lines.append(f"| {r['architecture']} | {r.get('cls', '')} | {r['status']} | {diff} | {size} | {note.replace('|', '/')} |")
    return lines


def replace_block(path: Path, lines: list[str]) -> None:
    """Put `lines` between the START and END markers of `path` (which must hold both, once)."""
    text = path.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{path} needs exactly one {START} ... {END} block")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    path.write_text(head + START + "\n" + "\n".join(lines) + "\n" + END + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", default=None, help="comma list of timm modules (default: MODULES + every registered family's)")
    p.add_argument("--limit", type=int, default=None, help="at most N architectures per module (a quick look)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--md", type=Path, default=None,
                   help="markdown output (default for a full run: benchmarks/results/families.md; a partial run only prints)")
    p.add_argument("--no-docs", action="store_true", help="leave the families block of docs/reference/inputs.md alone")
    a = p.parse_args(argv)

    import timm
    import torch

    import vitqtool
    from vitqtool.families import FAMILIES

    torch.set_num_threads(1)
    registered = [key.split(".")[2] for key in FAMILIES if key.startswith("timm.models.")]
    registered += [key.split(".")[-2] for key in FAMILIES if not key.startswith("timm.models.")]
    modules = a.modules.split(",") if a.modules else list(dict.fromkeys([*MODULES, *registered]))
    unknown = [m for m in modules if m not in timm.list_modules()]
    if unknown:
        raise SystemExit(f"not timm modules: {', '.join(unknown)}")
    t0 = time.perf_counter()
    rows = run(modules, a.seed, a.limit)
    seconds = round(time.perf_counter() - t0)
    counts = collections.Counter(r["status"] for r in rows)
    shared = sum(1 for r in rows if r.get("shared_with"))
    summary = summary_table(rows, modules)
    about = (f"{len(rows)} architectures of {len(modules)} timm modules, {counts['exact']} accepted and FP-exact "
             f"(max |logit diff| <= {EXACT:g} with quantizers disabled, at the small size: ViT-like 2 blocks of 2 heads "
             f"of the original head width on 4x4 tokens, Swin 2 blocks per stage, CNNs 1 block per stage at 32 px), "
             f"{counts['refused']} refused (reasons: `prepare`'s one-line ModelError, module indices as N); "
             f"{seconds} s on {platform.machine()} with 1 torch thread (shared machine), "
             f"{shared} numeric checks shared with an identical shrunk model; timm {timm.__version__}, torch "
             f"{torch.__version__}, vitqtool {vitqtool.__version__}. Generated by `python benchmarks/families.py`.")
    lines = ["# Coverage of timm architectures (`benchmarks/families.py`)", "", about, "", *summary, "",
             "## Every architecture", "", *detail_table(rows)]
    full = not a.modules and a.limit is None
    publish(lines, a.md or (ROOT / "benchmarks" / "results" / "families.md" if full else None),
            {"seconds": seconds, "modules": modules, "rows": rows})
    if full and not a.no_docs:
        replace_block(COVERAGE_PAGE, [about, "", *summary])
    return 0 if counts["crashed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
