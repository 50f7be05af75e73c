"""The BEiT family (timm `Beit`, BEiT v2; transformers BEiT / data2vec-vision): FP equivalence, layout, refusals, PTQ,
exports and the fast sensitivity path on tiny random models. Logits against transformers, stored relative position
indices and `export --format hf` are in test_hf.py / test_hf_export.py (parametrized over the transformers families)."""

import copy
import json
import shutil

import pytest
import timm
import torch
from torch import nn

from tests.conftest import (
    assert_exports_round_trip,
    assert_fast_sensitivity_equals_naive,
    assert_prepare_is_fp_exact,
    ptq_run_and_export,
    quantized_random,
    spread_model,
)
from tests.hf_tiny import build, save
from vitqtool import core
from vitqtool.core.models import resolve_model
from vitqtool.errors import ModelError
from vitqtool.quant import QLinear, QuantAttention, QuantGLU, quantizers_disabled

SMALL = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10}
BEIT = ("beit_base_patch16_224", SMALL)  # per-layer relative position bias, LayerScale 0.1, mean pooling + fc_norm
BEITV2_SHARED = ("beitv2_base_patch16_224", {**SMALL, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True})
MODELS = [
    BEIT, BEITV2_SHARED,
    ("beit_base_patch16_224", {**SMALL, "use_abs_pos_emb": True, "init_values": None, "global_pool": "token"}),
    ("beit_base_patch16_224", {**SMALL, "swiglu_mlp": True, "scale_mlp": True}),  # SwiGLU with its inner norm
    ("beit_base_patch16_224", {**SMALL, "scale_mlp": True}),                      # GELU Mlp with an inner norm
    ("beit_base_patch16_224", {**SMALL, "qkv_bias": False}),
]
IDS = ["relpos", "shared_relpos", "abs_pos_no_layerscale_token", "swiglu_norm", "mlp_norm", "no_qkv_bias"]


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,args", MODELS, ids=IDS)
@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_fp_equivalence_with_stock_timm(name, args, recipe):
    assert_prepare_is_fp_exact(spread_model(name, args), recipe, _x())


def test_layout_shares_biases_and_keeps_the_bias_tables_fp():
    stock = spread_model(*BEIT)
    q = core.prepare(stock, "vaq", bits=3).eval()
    attn, sattn = q.blocks[0].attn, stock.blocks[0].attn
    assert isinstance(attn, QuantAttention) and attn.split
    assert attn.q.bias is None and attn.k.bias is None and attn.v.bias is None  # BEiT's biases live outside the projection
    assert torch.equal(attn.q_bias, sattn.q_bias) and torch.equal(attn.v_bias, sattn.v_bias)
    assert attn.proj.a_quant.spec.bits == 3 and not attn.softmax_quant.spec.signed
    assert q.patch_embed.proj.w_quant.spec.bits == 8 and q.head.w_quant.spec.bits == 8
    fc2 = q.blocks[0].mlp.fc2
    assert not fc2.a_quant.spec.signed and fc2.a_quant.offset is not None  # GELU output: unsigned + offset
    # the relative position bias reaches the logits: a changed table changes the output, in FP
    x = _x()
    with torch.no_grad(), quantizers_disabled(q):
        before = q(x)
        table = attn.relative_position_bias_table  # (a constant shift would cancel in the softmax)
        table.add_(torch.randn(table.shape, generator=torch.Generator().manual_seed(5)))
        assert (q(x) - before).abs().max() > 1e-3
    swiglu = core.prepare(spread_model(*MODELS[3]), "vaq", bits=3)
    assert isinstance(swiglu.blocks[0].mlp, QuantGLU) and isinstance(swiglu.blocks[0].mlp.norm, nn.LayerNorm)


def test_plain_mlp_without_gelu_is_refused_in_one_line():
    model = timm.create_model(*BEIT[:1], pretrained=False, **BEIT[1])
    model.blocks[1].mlp.act = nn.SiLU()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match=r"^blocks\.1\.mlp\.act: activation SiLU .*not supported") as err:
        core.prepare(model, "vaq", inplace=True)
    assert "\n" not in str(err.value) and not any(isinstance(m, QLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec,recipe,bits,per_channel", [(BEIT, "vaq", 2, False), (BEITV2_SHARED, "lsq", 4, True)],
                         ids=["relpos-w2", "shared-fused-w4-channel"])
def test_export_reloads_bit_exact_and_the_source_view_loads_into_stock_timm(tmp_path, spec, recipe, bits, per_channel):
    loaded, rec, model = quantized_random(spec, recipe, bits, per_channel)
    state = assert_exports_round_trip(tmp_path, loaded, rec, model, _x())
    attn = model.blocks[0].attn  # the view: fused qkv without a bias, plus q_bias/v_bias and the bias tables
    parts = [attn.q, attn.k, attn.v] if attn.split else [attn.qkv]
    with torch.no_grad():
        assert torch.equal(state["blocks.0.attn.qkv.weight"], torch.cat([p.w_quant(p.weight) for p in parts]))
    assert torch.equal(state["blocks.0.attn.q_bias"], attn.q_bias) and "blocks.0.attn.qkv.bias" not in state


def test_ptq_run_and_export(tmp_path):
    # patch embedding, per block q/k/v/proj + fc1/fc2, head
    assert ptq_run_and_export(tmp_path, BEITV2_SHARED).quantized_layers == 1 + 2 * 6 + 1


@pytest.mark.parametrize("spec", [BEIT, BEITV2_SHARED], ids=["relpos", "shared_relpos"])
def test_fast_sensitivity_equals_naive(spec):
    assert_fast_sensitivity_equals_naive(core.prepare(spread_model(*spec), "vaq", bits=2), _x(4))


def test_beit_image_processor_maps_to_the_eval_transform(tmp_path):
    """BeitImageProcessor's config (do_reduce_labels: false, bicubic) maps; a switched-on step it cannot follow is refused."""
    from transformers import AutoImageProcessor

    from vitqtool.data import eval_transform

    folder = save(build("beit"), tmp_path / "beit", preprocessor={
        "type": "BeitImageProcessor", "size": {"height": 36, "width": 36}, "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True, "image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    assert json.loads((folder / "preprocessor_config.json").read_text())["do_reduce_labels"] is False
    cfg = resolve_model(str(folder)).data_config
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bicubic" and int(32 / cfg["crop_pct"]) == 36
    img = torch.randint(0, 256, (3, 36, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    theirs = AutoImageProcessor.from_pretrained(folder)(images=img.permute(1, 2, 0).numpy(), return_tensors="pt")["pixel_values"][0]
    assert (eval_transform(cfg)(img) - theirs).abs().max() <= 1e-5
    broken = shutil.copytree(folder, tmp_path / "reduce")
    pp = json.loads((broken / "preprocessor_config.json").read_text())
    (broken / "preprocessor_config.json").write_text(json.dumps({**pp, "do_reduce_labels": True}))
    with pytest.raises(ModelError, match="'do_reduce_labels' switches on a processing step"):
        resolve_model(str(broken))
