"""Checks every model family's tests make: FP equivalence after prepare, fast sensitivity, transformers logits, config
refusals, PTQ -> exports -> the stock model's view."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import vitqtool
from tests.conftest import calibrate_off_init
from tests.hf_tiny import edit_config
from vitqtool import core
from vitqtool.errors import ModelError


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    """A seeded batch of 32x32 RGB inputs."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def spread_(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Move every parameter off its init (zero-initialised norms, GRN or gates would hide a wrong rewrite); eval mode.

    Where 0.2 gives logits of order 15 (SigLIP's attention pool), timm's own fused and explicit attention paths
    already differ by ~1e-5 (float summation order): such models take `scale=0.1` (logits of order 1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def assert_fp_exact_after_prepare(stock: nn.Module, recipe: str, x: torch.Tensor) -> nn.Module:
    """Prepared (2-bit) `stock` equals it within 1e-5 with quantizers off and differs once calibrated; returns it."""
    with torch.no_grad():
        ref = stock(x)
        assert ref.abs().max() > 0.5  # the blocks change the logits: a wrong rewrite cannot hide under the tolerance
        q = core.prepare(stock, recipe, bits=2).eval()
        with vitqtool.quantizers_disabled(q):
            assert (q(x) - ref).abs().max().item() <= 1e-5
        core.calibrate(q, [x])
        assert (q(x) - ref).abs().max().item() > 1e-3  # the quantizers act once enabled
    return q


def assert_fast_sensitivity_equals_naive(q: nn.Module) -> None:
    """Block-by-block (fast) sensitivity gives the naive method's KL for every unit of a prepared model."""
    from vitqtool.analysis.sensitivity import SensitivityProbe, build_units
    from vitqtool.families import get_family

    calibrate_off_init(q, 0)
    family = get_family(q)
    batches = [(images(4), torch.arange(4))]
    units = build_units(q, "both", family.block_names(q))
    fast, naive = SensitivityProbe(q, family, batches, "fast"), SensitivityProbe(q, family, batches, "naive")
    kl = [fast.measure(u)["kl"] for u in units]
    assert kl == pytest.approx([naive.measure(u)["kl"] for u in units], rel=1e-4, abs=1e-9) and max(kl) > 0


def assert_matches_transformers(hf_model: nn.Module, loaded: nn.Module, atol: float = 1e-5) -> None:
    """The converted timm model's logits equal transformers', in FP and prepared with every quantizer off."""
    x = images()
    with torch.no_grad():
        expected = hf_model(pixel_values=x).logits
        assert expected.abs().max() > 0.5
        assert (loaded(x) - expected).abs().max() <= atol
        q = vitqtool.prepare(loaded, "vaq", bits=4)
        with vitqtool.quantizers_disabled(q):
            assert (q(x) - expected).abs().max() <= atol


def assert_config_refused(folder: Path, tmp_path: Path, changes: dict, field: str) -> None:
    """A copy of transformers folder `folder` with `changes` in config.json is refused in one line naming `field`."""
    from vitqtool.core.models import resolve_model

    copy = shutil.copytree(folder, tmp_path / "edited")
    edit_config(copy, **changes)
    with pytest.raises(ModelError) as err:
        resolve_model(str(copy))
    assert f"'{field}'" in str(err.value) and "\n" not in str(err.value)


def assert_quantize_and_export(name: str, args: dict, tmp_path: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """PTQ run -> safetensors export (verify: max |diff| 0; `vitqtool.load` bit-exact) -> compressed-tensors view
    (verify) that decompresses into a state dict the stock timm model loads strictly. Returns the run's quantized
    model and that state dict."""
    import timm

    from vitqtool import commands
    from vitqtool.core.runs import load_run_model
    from vitqtool.export import source_state_dict

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
