"""Relative-position ViTs: FP equivalence with the stock timm model, the layout (FP bias MLP), PTQ, export, stock view."""

import pytest
import timm
import torch
from torch import nn

import vitqtool
from vitqtool import commands, core
from vitqtool.analysis.sensitivity import SensitivityProbe, build_units, group_units
from vitqtool.core.runs import load_run_model
from vitqtool.errors import ModelError
from vitqtool.export import source_state_dict
from vitqtool.families import get_family
from vitqtool.quant import QLinear, QuantAttention, quantizers_disabled

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
VARIANTS = {
    "mlp": ("vit_relpos_small_patch16_224", {}),                       # per-block RelPosMlp, avg pool
    "shared_mlp": ("vit_srelpos_small_patch16_224", {}),                # one RelPosMlp shared by every block
    "res_post": ("vit_relpos_small_patch16_rpn_224", {}),               # post-norm blocks
    "table_cls": ("vit_relpos_base_patch16_cls_224", {"rel_pos_type": "bias", "init_values": 0.5}),  # RelPosBias, class token
}


def _x(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _model(variant: str) -> nn.Module:
    """A tiny model with every parameter moved off timm's init, so that a wrong layout shows in the logits."""
    name, extra = VARIANTS[variant]
    model = timm.create_model(name, pretrained=False, **{**SMALL, **extra}).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_fp_exact_after_prepare_and_quantizers_are_real(variant, recipe):
    stock = _model(variant)
    x = _x()
    with torch.no_grad():
        ref = stock(x)
        assert ref.abs().max() > 0.5
        q = core.prepare(stock, recipe, bits=4).eval()
        with quantizers_disabled(q):
            assert (q(x) - ref).abs().max().item() <= 1e-5
        core.calibrate(q, [_x(4, seed=2)])
        assert (q(x) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", ["mlp", "shared_mlp"])
def test_layout_keeps_the_bias_mlp_fp_and_quantizes_the_attention(variant):
    stock = _model(variant)
    q = core.prepare(stock, "vaq", bits=3)
    attn = q.blocks[1].attn
    assert isinstance(attn, QuantAttention) and attn.split and not attn.softmax_quant.spec.signed
    mlp_owner = "shared_rel_pos" if variant == "shared_mlp" else "blocks.1.attn.rel_pos"
    fp = {n for n, m in q.named_modules() if type(m) is nn.Linear}
    assert fp == get_family(q).fp_layers(q) and f"{mlp_owner}.mlp.fc1" in fp  # only the bias MLPs stay FP
    assert not any(isinstance(m, QLinear) for m in q.get_submodule(mlp_owner).modules())
    assert q.blocks[0].mlp.fc2.a_quant.spec.learned_offset and q.head.w_quant.spec.bits == 8


@pytest.mark.parametrize("variant", ["shared_mlp", "table_cls"])
def test_fast_sensitivity_equals_naive(variant):
    q = core.prepare(_model(variant), "vaq", bits=2)
    core.calibrate(q, [_x(8, seed=3)])
    family = get_family(q)
    batches = [(_x(4), torch.arange(4))]
    units = build_units(q, "both", family.block_names(q))
    units += group_units(units, "block")
    fast, naive = SensitivityProbe(q, family, batches, "fast"), SensitivityProbe(q, family, batches, "naive")
    kl_fast = [fast.measure(u)["kl"] for u in units]
    assert kl_fast == pytest.approx([naive.measure(u)["kl"] for u in units], rel=1e-4, abs=1e-9)
    assert max(kl_fast) > 0


def test_quantize_export_reload_and_stock_view(tmp_path):
    name, extra = VARIANTS["res_post"]
    args = {**SMALL, **extra}
    info = commands.quantize(name, bits=3, recipe="ptq", out=tmp_path / "run", random_init=True, model_args=args,
                             calib_batches=1, batch_size=8, limit_train=16, limit_val=16)
    assert info.status == "done"
    assert commands.export(tmp_path / "run", tmp_path / "m.safetensors", verify=True).verify["max_abs_diff"] == 0.0
    model = load_run_model(tmp_path / "run").model.eval()
    with torch.no_grad():
        assert torch.equal(vitqtool.load(tmp_path / "m.safetensors")(_x()), model(_x()))
    view = commands.export(tmp_path / "run", tmp_path / "view.safetensors", verify=True, format="compressed-tensors")
    assert view.verify["max_abs_diff"] <= 1e-4
    state = source_state_dict(tmp_path / "view.safetensors")
    timm.create_model(name, pretrained=False, **args).load_state_dict(state, strict=True)
    rel = model.blocks[0].attn.rel_pos.mlp.fc1
    assert torch.equal(state["blocks.0.attn.rel_pos.mlp.fc1.weight"], rel.weight)  # stored FP, as it is


def test_qk_norm_is_refused_in_one_line():
    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, qk_norm=True, **SMALL)
    with pytest.raises(ModelError, match=r"^blocks\.0\.attn: qk_norm") as err:
        core.prepare(model, "vaq")
    assert "\n" not in str(err.value)
