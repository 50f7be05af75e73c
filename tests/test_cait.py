"""CaiT: FP equivalence with the stock timm model, the talking-heads and class-attention layout, PTQ, export, stock view."""

import pytest
import timm
import torch

from tests.family_checks import assert_fast_sensitivity_equals_naive, assert_fp_exact_after_prepare, assert_quantize_and_export, images, spread_
from vitqtool import core
from vitqtool.errors import ModelError
from vitqtool.families import get_family
from vitqtool.quant import QLinear, QuantAttention

NAME = "cait_xxs24_224"
ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "depth_token_only": 2,
        "init_values": 0.5, "num_classes": 10}


def _model(**extra) -> torch.nn.Module:
    return spread_(timm.create_model(NAME, pretrained=False, **{**ARGS, **extra}))


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_fp_exact_after_prepare_and_quantizers_are_real(pool, recipe):
    assert_fp_exact_after_prepare(_model(global_pool=pool), recipe, images())


def test_layout_of_talking_heads_and_class_attention():
    stock = _model()
    q = core.prepare(stock, "vaq", bits=3)
    talk = q.blocks[0].attn
    assert isinstance(talk, QuantAttention) and talk.split
    for part in "qkv":
        assert getattr(talk, part).w_quant.spec.bits == 3 and getattr(talk, f"{part}_quant").spec.signed
    for mix in (talk.proj_l, talk.proj_w):  # heads x heads mixing: 8-bit weights, the input quantized before (or FP logits)
        assert isinstance(mix, QLinear) and mix.w_quant.spec.bits == 8 and mix.a_quant is None
    assert not talk.softmax_quant.spec.signed and talk.mixed_quant.spec.signed and talk.mixed_quant.spec.bits == 3
    assert talk.proj.a_quant.spec.bits == 3
    cls = q.blocks_token_only[1].attn
    assert isinstance(cls, QuantAttention) and cls.split
    assert get_family(q).stock_name("blocks_token_only.1.attn.k") == ("blocks_token_only.1.attn.k", None)  # not a qkv third
    for part in "qkv":  # the stock model's own q, k, v Linears, each with its own step
        assert torch.equal(getattr(cls, part).weight, getattr(stock.blocks_token_only[1].attn, part).weight)
    assert cls.input_quant.spec.signed and not cls.softmax_quant.spec.signed
    block = q.blocks_token_only[0]
    assert isinstance(block.gamma_1, torch.nn.Parameter) and block.mlp.fc2.a_quant.spec.learned_offset  # LayerScale FP
    assert q.patch_embed.proj.w_quant.spec.bits == 8 and q.head.w_quant.spec.bits == 8


def test_fast_sensitivity_equals_naive():
    assert get_family(_model()).block_names(_model()) == ["blocks.0", "blocks.1", "blocks_token_only.0", "blocks_token_only.1"]
    assert_fast_sensitivity_equals_naive(core.prepare(_model(), "vaq", bits=2))


def test_quantize_export_reload_and_stock_view(tmp_path):
    model, state = assert_quantize_and_export(NAME, ARGS, tmp_path)
    talk, cls = model.blocks[0].attn, model.blocks_token_only[0].attn
    with torch.no_grad():  # talking-heads q/k/v are the stock qkv again; class attention keeps its q, k, v
        assert torch.equal(state["blocks.0.attn.qkv.weight"], torch.cat([p.w_quant(p.weight) for p in (talk.q, talk.k, talk.v)]))
        assert torch.equal(state["blocks_token_only.0.attn.k.weight"], cls.k.w_quant(cls.k.weight))
        assert torch.equal(state["blocks.0.attn.proj_w.weight"], talk.proj_w.w_quant(talk.proj_w.weight))


def test_unsupported_layers_are_refused_by_name():
    model = _model()
    model.blocks[1].mlp.act = torch.nn.SiLU()
    with pytest.raises(ModelError, match=r"^blocks\.1\.mlp\.act: activation SiLU") as err:
        core.prepare(model, "vaq")
    assert "\n" not in str(err.value)
