"""Relative-position ViTs: FP equivalence with the stock timm model, the layout (FP bias MLP), PTQ, export, stock view."""

import pytest
import timm
import torch
from torch import nn

from tests.family_checks import assert_fast_sensitivity_equals_naive, assert_fp_exact_after_prepare, assert_quantize_and_export, images, spread_
from vitqtool import core
from vitqtool.errors import ModelError
from vitqtool.families import get_family
from vitqtool.quant import QLinear, QuantAttention

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
VARIANTS = {
    "mlp": ("vit_relpos_small_patch16_224", {}),                       # per-block RelPosMlp, avg pool
    "shared_mlp": ("vit_srelpos_small_patch16_224", {}),                # one RelPosMlp shared by every block
    "res_post": ("vit_relpos_small_patch16_rpn_224", {}),               # post-norm blocks
    "table_cls": ("vit_relpos_base_patch16_cls_224", {"rel_pos_type": "bias", "init_values": 0.5}),  # RelPosBias, class token
}


def _model(variant: str) -> nn.Module:
    name, extra = VARIANTS[variant]
    return spread_(timm.create_model(name, pretrained=False, **{**SMALL, **extra}))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_fp_exact_after_prepare_and_quantizers_are_real(variant, recipe):
    assert_fp_exact_after_prepare(_model(variant), recipe, images())


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
    assert_fast_sensitivity_equals_naive(core.prepare(_model(variant), "vaq", bits=2))


def test_quantize_export_reload_and_stock_view(tmp_path):
    name, extra = VARIANTS["res_post"]
    model, state = assert_quantize_and_export(name, {**SMALL, **extra}, tmp_path)
    rel = model.blocks[0].attn.rel_pos.mlp.fc1
    assert torch.equal(state["blocks.0.attn.rel_pos.mlp.fc1.weight"], rel.weight)  # stored FP, as it is


def test_qk_norm_is_refused_in_one_line():
    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, qk_norm=True, **SMALL)
    with pytest.raises(ModelError, match=r"^blocks\.0\.attn: qk_norm") as err:
        core.prepare(model, "vaq")
    assert "\n" not in str(err.value)
