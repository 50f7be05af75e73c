"""Export size vs the FP32 safetensors of the FP model, for full-size deit_tiny and swin_tiny (random init).

Usage: python benchmarks/export_size.py [--bits 2] [--dtype float16]
Layout measured: W`bits` inside the blocks, patch embedding / head / Swin patch merging 8-bit (the
`vaq` recipe's edge_bits), FP tensors stored in `dtype`. Random weights give the same sizes as trained
ones: packed sizes depend only on shapes and bit widths.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vitqtool import core  # noqa: E402
from vitqtool.core.models import resolve_model  # noqa: E402
from vitqtool.export import export_model  # noqa: E402
from vitqtool.recipe import load_recipe  # noqa: E402

MODELS = ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224")


def measure(name: str, bits: int, dtype: str, folder: Path, model_args: dict | None = None) -> dict:
    """Export one model (random init, `model_args` for timm) and return its sizes and the ratio to the FP32 safetensors."""
    loaded = resolve_model(name, random_init=True, model_args=model_args)
    fp32 = folder / f"{name}.fp32.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(fp32))
    recipe = load_recipe("vaq", set_fields={"quant.bits": bits})
    qmodel = core.prepare(loaded.model, recipe)
    size = tuple(loaded.data_config["input_size"])
    core.calibrate(qmodel, [torch.randn(2, *size, generator=torch.Generator().manual_seed(0))])
    start = time.perf_counter()
    summary = export_model(qmodel, folder / f"{name}.w{bits}.safetensors", architecture=loaded.architecture,
                           model_args=loaded.model_args, data_config=loaded.data_config, recipe=recipe, dtype=dtype)
    seconds = time.perf_counter() - start
    fp32_bytes = fp32.stat().st_size
    return {"model": name, "bits": bits, "dtype": dtype, "fp32_file_MB": fp32_bytes / 1e6,
            "export_MB": summary["file_bytes"] / 1e6, "ratio_vs_fp32_file": fp32_bytes / summary["file_bytes"],
            "ratio_reported_by_inspect": summary["compression_ratio"], "export_s": seconds}


def main() -> None:
    """Print one line per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            r = measure(name, args.bits, args.dtype, Path(tmp))
            print(f"{r['model']:32s} W{r['bits']} fp={r['dtype']:8s} fp32 {r['fp32_file_MB']:7.2f} MB -> export "
                  f"{r['export_MB']:6.2f} MB  ratio {r['ratio_vs_fp32_file']:5.2f}x (inspect: {r['ratio_reported_by_inspect']:5.2f}x)  "
                  f"export {r['export_s']:.1f} s")


if __name__ == "__main__":
    main()
