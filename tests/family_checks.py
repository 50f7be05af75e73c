"""Checks every family's tests run on its tiny models: FP-exactness, fast sensitivity, PTQ -> exports -> stock view."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

import vitqtool
from vitqtool import commands, core
from vitqtool.analysis.sensitivity import SensitivityProbe, build_units, group_units
from vitqtool.core.runs import load_run_model
from vitqtool.export import source_state_dict
from vitqtool.families import get_family
from vitqtool.quant import quantizers_disabled


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    """`n` random 32x32 images."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def spread_(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Move every parameter off timm's init (which makes logits ~1e-2), so that a wrong layout shows in the logits.

    0.1 gives logits of order 1; much wider spreads give logits of order 15, where timm's own fused and explicit
    attention paths already differ by ~1e-5 (float summation order).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def check_fp_exact(stock: nn.Module, recipe: str) -> None:
    """Prepared with `recipe`, the model computes the stock logits (quantizers off) within 1e-5, and others once calibrated."""
    x = images()
    with torch.no_grad():
        ref = stock(x)
        assert ref.abs().max() > 0.5  # a wrong mapping cannot hide under the tolerance
        q = core.prepare(stock, recipe, bits=4).eval()
        with quantizers_disabled(q):
            assert (q(x) - ref).abs().max().item() <= 1e-5
        core.calibrate(q, [images(4, seed=2)])
        assert (q(x) - ref).abs().max().item() > 1e-3


def check_fast_sensitivity(model: nn.Module) -> None:
    """Per-unit sensitivity from the family's block-by-block execution equals the naive whole-model one."""
    q = core.prepare(model, "vaq", bits=2)
    core.calibrate(q, [images(8, seed=3)])
    family = get_family(q)
    batches = [(images(4), torch.arange(4))]
    units = build_units(q, "both", family.block_names(q))
    units += group_units(units, "block")
    fast, naive = SensitivityProbe(q, family, batches, "fast"), SensitivityProbe(q, family, batches, "naive")
    kl_fast = [fast.measure(u)["kl"] for u in units]
    kl_naive = [naive.measure(u)["kl"] for u in units]
    assert all(abs(a - b) <= 1e-4 * abs(b) + 1e-9 for a, b in zip(kl_fast, kl_naive)), (kl_fast, kl_naive)
    assert max(kl_fast) > 0


def check_quantize_and_export(name: str, args: dict, tmp_path: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """PTQ run -> safetensors export (verify: max |diff| 0; `vitqtool.load` bit-exact) -> compressed-tensors view
    (verify) that decompresses into a state dict the stock timm model loads strictly. Returns the run's quantized
    model and that state dict."""
    info = commands.quantize(name, bits=3, recipe="ptq", out=tmp_path / "run", random_init=True, model_args=args,
                             calib_batches=1, batch_size=8, limit_train=16, limit_val=16)
    assert info.status == "done"
    assert commands.export(tmp_path / "run", tmp_path / "m.safetensors", verify=True).verify["max_abs_diff"] == 0.0
    model = load_run_model(tmp_path / "run").model.eval()
    with torch.no_grad():
        assert torch.equal(vitqtool.load(tmp_path / "m.safetensors")(images()), model(images()))
    view = commands.export(tmp_path / "run", tmp_path / "view.safetensors", verify=True, format="compressed-tensors")
    assert view.verify["max_abs_diff"] <= 1e-4
    state = source_state_dict(tmp_path / "view.safetensors")  # decompressed by compressed-tensors
    timm.create_model(name, pretrained=False, **args).load_state_dict(state, strict=True)
    return model, state
