"""CaiT: FP equivalence with the stock timm model, the talking-heads and class-attention layout, PTQ, export, stock view."""

import pytest
import timm
import torch

import vitqtool
from vitqtool import commands, core
from vitqtool.analysis.sensitivity import SensitivityProbe, build_units, group_units
from vitqtool.core.runs import load_run_model
from vitqtool.errors import ModelError
from vitqtool.export import source_state_dict
from vitqtool.families import get_family
from vitqtool.quant import QLinear, QuantAttention, quantizers_disabled

NAME = "cait_xxs24_224"
ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "depth_token_only": 2,
        "init_values": 0.5, "num_classes": 10}


def _x(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _model(**extra) -> torch.nn.Module:
    """A tiny CaiT with every parameter moved off timm's init, so that a wrong layout shows in the logits."""
    model = timm.create_model(NAME, pretrained=False, **{**ARGS, **extra}).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_fp_exact_after_prepare_and_quantizers_are_real(pool, recipe):
    stock = _model(global_pool=pool)
    x = _x()
    with torch.no_grad():
        ref = stock(x)
        assert ref.abs().max() > 0.5
        q = core.prepare(stock, recipe, bits=4).eval()
        with quantizers_disabled(q):
            assert (q(x) - ref).abs().max().item() <= 1e-5
        core.calibrate(q, [_x(4, seed=2)])
        assert (q(x) - ref).abs().max().item() > 1e-3


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
    assert isinstance(cls, QuantAttention) and cls.split and cls.fused_parts()[0] == ()
    for part in "qkv":  # the stock model's own q, k, v Linears, each with its own step
        assert torch.equal(getattr(cls, part).weight, getattr(stock.blocks_token_only[1].attn, part).weight)
    assert cls.input_quant.spec.signed and not cls.softmax_quant.spec.signed
    block = q.blocks_token_only[0]
    assert isinstance(block.gamma_1, torch.nn.Parameter) and block.mlp.fc2.a_quant.spec.learned_offset  # LayerScale FP
    assert q.patch_embed.proj.w_quant.spec.bits == 8 and q.head.w_quant.spec.bits == 8


def test_fast_sensitivity_equals_naive():
    q = core.prepare(_model(), "vaq", bits=2)
    core.calibrate(q, [_x(8, seed=3)])
    family = get_family(q)
    assert family.block_names(q) == ["blocks.0", "blocks.1", "blocks_token_only.0", "blocks_token_only.1"]
    batches = [(_x(4), torch.arange(4))]
    units = build_units(q, "both", family.block_names(q))
    units += group_units(units, "block")
    fast, naive = SensitivityProbe(q, family, batches, "fast"), SensitivityProbe(q, family, batches, "naive")
    kl_fast = [fast.measure(u)["kl"] for u in units]
    assert kl_fast == pytest.approx([naive.measure(u)["kl"] for u in units], rel=1e-4, abs=1e-9)
    assert max(kl_fast) > 0


def test_quantize_export_reload_and_stock_view(tmp_path):
    info = commands.quantize(NAME, bits=3, recipe="ptq", out=tmp_path / "run", random_init=True, model_args=ARGS,
                             calib_batches=1, batch_size=8, limit_train=16, limit_val=16)
    assert info.status == "done"
    assert commands.export(tmp_path / "run", tmp_path / "m.safetensors", verify=True).verify["max_abs_diff"] == 0.0
    model = load_run_model(tmp_path / "run").model.eval()
    with torch.no_grad():
        assert torch.equal(vitqtool.load(tmp_path / "m.safetensors")(_x()), model(_x()))
    view = commands.export(tmp_path / "run", tmp_path / "view.safetensors", verify=True, format="compressed-tensors")
    assert view.verify["max_abs_diff"] <= 1e-4
    state = source_state_dict(tmp_path / "view.safetensors")
    timm.create_model(NAME, pretrained=False, **ARGS).load_state_dict(state, strict=True)
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
