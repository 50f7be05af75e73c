"""Swin V2 (timm SwinTransformerV2, transformers Swinv2ForImageClassification): FP equivalence, the cosine-attention
layout, PTQ/QAT, exports (safetensors, compressed-tensors view, transformers folder)."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import vitqtool
from tests.conftest import calibrate_off_init
from tests.family_checks import (
    assert_config_refused,
    assert_fast_sensitivity_equals_naive,
    assert_fp_exact_after_prepare,
    assert_matches_transformers,
    images,
    spread_,
)
from tests.hf_tiny import build, save
from vitqtool import commands, core
from vitqtool.core.models import resolve_model
from vitqtool.errors import ModelError
from vitqtool.export import export_model, load_source_model, source_state_dict
from vitqtool.export.source_view import write_source_view
from vitqtool.families import get_family
from vitqtool.families.swinv2 import SwinV2QuantWindowAttention
from vitqtool.quant import QLinear, iter_quantizers, quantizers_disabled
from vitqtool.recipe import load_recipe

# two stages at 16x16 and 8x8 tokens with 4x4 windows: both have shifted blocks (the mask) and patch merging
SWINV2 = ("swinv2_tiny_window8_256", {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2),
                                      "num_heads": (2, 4), "num_classes": 10})


_x = images


def _stock(**extra) -> nn.Module:
    """The tiny Swin V2 off its init: timm zeroes V2's post-norm weights, so a fresh block adds nothing."""
    return spread_(timm.create_model(SWINV2[0], pretrained=False, **{**SWINV2[1], **extra}))


@pytest.mark.parametrize("recipe,extra", [("vaq", {}), ("lsq", {}), ("vaq", {"qkv_bias": False}),
                                          ("vaq", {"pretrained_window_sizes": (8, 6)})],
                         ids=["split", "fused", "no_qkv_bias", "pretrained_window"])
def test_fp_exact_after_prepare(recipe, extra):
    assert_fp_exact_after_prepare(_stock(**extra), recipe, _x())


def test_layout_quantizes_normalised_q_k_and_keeps_logit_scale_and_cpb_fp():
    stock = _stock()
    q = core.prepare(stock, "vaq", bits=3)
    attn = q.layers[1].blocks[1].attn
    assert isinstance(attn, SwinV2QuantWindowAttention) and attn.split
    assert attn.input_quant.spec.signed and attn.q_quant.spec.signed and attn.k_quant.spec.signed
    assert not attn.softmax_quant.spec.signed and attn.proj.a_quant.spec.bits == 3
    # the stock names of the FP parts: logit scale, q/v biases, the position-bias MLP (plain Linear layers)
    keys = set(q.state_dict())
    for name in ("logit_scale", "q_bias", "v_bias", "cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight"):
        assert f"layers.1.blocks.1.attn.{name}" in keys
    assert attn.k.bias is None and attn.q.bias is None  # the biases are added in FP after the quantized projections
    assert all(type(m) is nn.Linear for m in (attn.cpb_mlp[0], attn.cpb_mlp[2]))
    assert get_family(q).fp_layers(q) == {f"layers.{s}.blocks.{b}.attn.cpb_mlp.{i}" for s in (0, 1) for b in (0, 1) for i in (0, 2)}
    # post-norm: the attention and fc1 read the residual stream (signed), fc2 GELU's output (unsigned + offset)
    block = q.layers[0].blocks[0]
    assert block.mlp.fc1.a_quant.spec.signed and not block.mlp.fc2.a_quant.spec.signed and block.mlp.fc2.a_quant.offset is not None
    red = q.layers[1].downsample.reduction
    assert isinstance(red, QLinear) and red.w_quant.spec.bits == 8 and red.a_quant is None
    assert q.patch_embed.proj.w_quant.spec.bits == 8 and q.head.fc.w_quant.spec.bits == 8
    # Q and K quantizers see unit-length head rows (after normalisation); V does not
    seen = {}
    hooks = [getattr(attn, n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0])) for n in ("q_quant", "k_quant", "v_quant")]
    with torch.no_grad(), quantizers_disabled(q):
        q(_x(2))
    for h in hooks:
        h.remove()
    heads = {n: t.reshape(*t.shape[:-1], attn.num_heads, attn.head_dim).norm(dim=-1) for n, t in seen.items()}
    assert torch.allclose(heads["q_quant"], torch.ones(()), atol=1e-5) and torch.allclose(heads["k_quant"], torch.ones(()), atol=1e-5)
    assert not torch.allclose(heads["v_quant"], torch.ones(()), atol=1e-2)


@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_every_parameter_gets_a_gradient(recipe):
    q = core.prepare(_stock(), recipe, bits=4)
    core.calibrate(q, [_x(4)])
    q.train()
    q(_x(4)).logsumexp(-1).sum().backward()
    missing = [n for n, p in q.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert [n for n in missing if not n.endswith("offset")] == []  # GELU offsets only get gradient from clipped values
    assert q.layers[0].blocks[0].attn.logit_scale.grad.abs().sum() > 0 and q.layers[0].blocks[0].attn.cpb_mlp[0].weight.grad.abs().sum() > 0


def test_unsupported_features_are_refused_by_name():
    model = timm.create_model(SWINV2[0], pretrained=False, **{**SWINV2[1], "act_layer": "silu"})
    with pytest.raises(ModelError, match=r"^layers\.0\.blocks\.0\.mlp\.act: activation SiLU .*not supported") as err:
        core.prepare(model, "vaq")
    assert "\n" not in str(err.value)


def test_fast_sensitivity_equals_naive():
    assert_fast_sensitivity_equals_naive(core.prepare(_stock(), "vaq", bits=2))


def test_export_reloads_bit_exact_and_source_view_loads_into_the_stock_model(tmp_path):
    stock = _stock()
    recipe = load_recipe("vaq", set_fields={"quant.bits": 3, "quant.per_channel": True})
    model = core.prepare(stock, recipe)
    calibrate_off_init(model, 0)
    model.eval()
    path = tmp_path / "m.safetensors"
    export_model(model, path, architecture=SWINV2[0], model_args=SWINV2[1], data_config={"input_size": (3, 32, 32)},
                 recipe=recipe, source="tiny")
    x = _x()
    with torch.no_grad():
        assert torch.equal(vitqtool.load(path)(x), model(x))

    view = tmp_path / "view.safetensors"
    write_source_view(model, view, architecture=SWINV2[0], model_args=SWINV2[1], data_config={"input_size": (3, 32, 32)})
    state = source_state_dict(view)  # decompressed by compressed-tensors
    fresh = timm.create_model(SWINV2[0], pretrained=False, **SWINV2[1])
    fresh.load_state_dict(state, strict=True)
    attn = model.layers[0].blocks[1].attn
    with torch.no_grad():
        assert torch.equal(state["layers.0.blocks.1.attn.qkv.weight"], torch.cat([p.w_quant(p.weight) for p in (attn.q, attn.k, attn.v)]))
        assert torch.equal(state["layers.0.blocks.1.attn.q_bias"], attn.q_bias)
        for _, qz in iter_quantizers(model):  # the view describes the weight-quantized network
            qz.enabled = qz.kind == "weight"
        assert (load_source_model(view)(x) - model(x)).abs().max() <= 1e-4


def test_quantize_qat_runs_and_exports_with_verify(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(_stock().state_dict(), str(weights))
    info = commands.quantize(SWINV2[0], bits=2, recipe="lsq", out=tmp_path / "run", weights=weights, model_args=SWINV2[1],
                             epochs=1, batch_size=16, limit_train=32, limit_val=16)
    assert info.status == "done" and info.epochs_done == 1
    result = commands.export(tmp_path / "run", tmp_path / "r.safetensors", verify=True)
    assert result.verify["max_abs_diff"] <= 1e-5
    assert isinstance(commands.load(tmp_path / "r.safetensors").layers[0].blocks[0].attn, SwinV2QuantWindowAttention)


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = build("swinv2", seed=3)
    return model, save(model, tmp_path_factory.mktemp("swinv2") / "st")


@pytest.mark.parametrize("overrides", [{}, {"pretrained_window_sizes": [8, 6], "qkv_bias": False}], ids=["default", "pretrained_window"])
def test_logits_match_transformers_fp_and_prepared(tmp_path, overrides):
    hf_model = build("swinv2", seed=5, **overrides)
    loaded = resolve_model(str(save(hf_model, tmp_path / "m")))
    assert loaded.architecture == "swinv2_tiny_window8_256" and loaded.model_args["window_size"] == 4
    assert_matches_transformers(hf_model, loaded.model)


@pytest.mark.parametrize("changes,field", [
    ({"pretrained_window_sizes": [1, 0]}, "pretrained_window_sizes"),
    ({"pretrained_window_sizes": [8]}, "pretrained_window_sizes"),
    ({"layer_norm_eps": 1e-6}, "layer_norm_eps"),
    ({"use_absolute_embeddings": True}, "use_absolute_embeddings"),
    ({"hidden_act": "relu"}, "hidden_act"),
])
def test_unsupported_config_fields_are_refused_by_name(hf_folder, tmp_path, changes, field):
    assert_config_refused(hf_folder[1], tmp_path, changes, field)


@pytest.mark.parametrize("recipe,per_channel", [("vaq", True), ("lsq", False)], ids=["split", "fused"])
def test_hf_export_decompresses_bit_exact_and_loads_in_transformers(hf_folder, tmp_path, recipe, per_channel):
    from tests.test_hf_export import check_hf_export

    # compressed-tensors has no slot for the normalised Q/K (nor the fused normalised-Q/K/V) quantizers
    # 4 blocks x (q, k, v, proj, fc1, fc2) + patch merging + classifier; the position-bias MLPs stay FP
    check_hf_export(hf_folder[0], tmp_path, recipe, 4, per_channel, packed_layers=6 * 4 + 2,
                    no_slot=("softmax_quant", "mlp.fc2.a_quant", "patch_embed.proj.a_quant", "attn.q_quant", "attn.k_quant",
                             "attn.qkv_quant"))


def test_cli_pipeline_on_a_folder(hf_folder, tmp_path):
    from tests.test_hf import _pipeline

    _pipeline(str(hf_folder[1]), tmp_path, "swinv2")

