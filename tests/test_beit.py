"""The BEiT family (timm `Beit`, BEiT v2; transformers BEiT / data2vec-vision): FP equivalence, layout, refusals, PTQ,
exports and the fast sensitivity path on tiny random models. Logits against transformers and `export --format hf` are
in test_hf.py / test_hf_export.py (parametrized over every transformers family)."""

import copy
import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vitqtool
from tests.conftest import calibrate_off_init
from tests.hf_tiny import build, save
from vitqtool import commands, core
from vitqtool.analysis.sensitivity import SensitivityProbe, build_units
from vitqtool.core.models import resolve_model
from vitqtool.errors import ModelError, WeightsError
from vitqtool.export import export_model, load_source_model, source_state_dict
from vitqtool.export.source_view import write_source_view
from vitqtool.families import get_family
from vitqtool.quant import QLinear, QuantAttention, QuantGLU, iter_quantizers, quantizers_disabled
from vitqtool.recipe import load_recipe

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


def _model(name: str, args: dict, seed: int = 0) -> nn.Module:
    """A stock model with every parameter moved far from init (zero bias tables and q/v biases would hide a wrong map)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **args).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,args", MODELS, ids=IDS)
@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_fp_equivalence_with_stock_timm(name, args, recipe):
    stock = _model(name, args)
    x = _x()
    with torch.no_grad():
        ref = stock(x)
        q = core.prepare(stock, recipe, bits=2).eval()
        with quantizers_disabled(q):
            assert (q(x) - ref).abs().max().item() <= 1e-5
        assert (q(x) - ref).abs().max().item() > 1e-3
    assert ref.abs().max() > 0.3
    assert not any(isinstance(m, QLinear) for m in stock.modules())


def test_layout_shares_biases_and_keeps_the_bias_tables_fp():
    stock = _model(*BEIT)
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
    swiglu = core.prepare(_model(*MODELS[3]), "vaq", bits=3)
    assert isinstance(swiglu.blocks[0].mlp, QuantGLU) and isinstance(swiglu.blocks[0].mlp.norm, nn.LayerNorm)


def test_plain_mlp_without_gelu_is_refused_in_one_line():
    model = timm.create_model(*BEIT[:1], pretrained=False, **BEIT[1])
    model.blocks[1].mlp.act = nn.SiLU()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match=r"^blocks\.1\.mlp\.act: activation SiLU .*not supported") as err:
        core.prepare(model, "vaq", inplace=True)
    assert "\n" not in str(err.value) and not any(isinstance(m, QLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _quantized(spec, recipe: str, bits: int, per_channel: bool):
    name, args = spec
    loaded = resolve_model(name, random_init=True, model_args=args)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    rec = load_recipe(recipe, set_fields={"quant.bits": bits, "quant.per_channel": per_channel})
    model = core.prepare(loaded.model, rec)
    calibrate_off_init(model, 0)
    return loaded, rec, model.eval()


@pytest.mark.parametrize("spec,recipe,bits,per_channel", [(BEIT, "vaq", 2, False), (BEITV2_SHARED, "lsq", 4, True)],
                         ids=["relpos-w2", "shared-fused-w4-channel"])
def test_export_reloads_bit_exact_and_the_source_view_loads_into_stock_timm(tmp_path, spec, recipe, bits, per_channel):
    loaded, rec, model = _quantized(spec, recipe, bits, per_channel)
    path = tmp_path / "m.safetensors"
    summary = export_model(model, path, architecture=loaded.architecture, model_args=loaded.model_args,
                           data_config=loaded.data_config, recipe=rec, verify=True, verify_inputs=[_x(2)])
    assert summary["verify"]["max_abs_diff"] == 0.0
    reloaded = vitqtool.load(path)
    x = _x()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    view = tmp_path / "view.safetensors"
    write_source_view(model, view, architecture=loaded.architecture, model_args=loaded.model_args,
                      data_config=loaded.data_config, verify_inputs=[_x(2)])
    state = source_state_dict(view)
    stock = resolve_model(spec[0], random_init=True, model_args=spec[1]).model
    stock.load_state_dict(state, strict=True)  # qkv (no bias) + q_bias/v_bias + bias tables: the stock keys exactly
    attn = model.blocks[0].attn
    parts = [attn.q, attn.k, attn.v] if attn.split else [attn.qkv]
    with torch.no_grad():
        assert torch.equal(state["blocks.0.attn.qkv.weight"], torch.cat([p.w_quant(p.weight) for p in parts]))
        assert torch.equal(state["blocks.0.attn.q_bias"], attn.q_bias)
        for _, q in iter_quantizers(model):
            q.enabled = q.kind == "weight"
        assert (load_source_model(view)(x) - model(x)).abs().max() <= 1e-4


def test_ptq_run_and_export(tmp_path):
    name, args = BEITV2_SHARED
    run = tmp_path / "run"
    info = commands.quantize(name, recipe="ptq", bits=4, calib_batches=1, random_init=True, model_args=args, batch_size=8,
                             limit_train=16, limit_val=16, out=run)
    assert info.status == "done" and info.last_top1 is not None
    result = commands.export(run, tmp_path / "m.safetensors", verify=True)
    assert result.verify["max_abs_diff"] <= 1e-5 and result.quantized_layers == 1 + 2 * 6 + 1


@pytest.mark.parametrize("spec", [BEIT, BEITV2_SHARED], ids=["relpos", "shared_relpos"])
def test_fast_sensitivity_equals_naive(spec):
    q = core.prepare(_model(*spec), "vaq", bits=2)
    core.calibrate(q, [_x(4)])
    family = get_family(q)
    batches = [(_x(4), torch.arange(4))]
    units = build_units(q, "both", family.block_names(q))
    fast, naive = SensitivityProbe(q, family, batches, "fast"), SensitivityProbe(q, family, batches, "naive")
    kl_fast = [fast.measure(u)["kl"] for u in units]
    assert kl_fast == pytest.approx([naive.measure(u)["kl"] for u in units], rel=1e-4, abs=1e-9)
    assert max(kl_fast) > 0


@pytest.mark.parametrize("family", ["beit", "data2vec_vision"])
def test_stored_relative_position_index_is_checked(tmp_path, family):
    """Older transformers checkpoints store relative_position_index: it must equal what timm computes, then it is dropped."""
    folder = save(build(family), tmp_path / family)
    ref = resolve_model(str(folder))
    state = load_file(str(folder / "model.safetensors"))
    prefix = family
    if family == "beit":
        index = ref.model.blocks[0].attn.relative_position_index
        keys = [f"{prefix}.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_index" for i in range(2)]
    else:
        index = ref.model.rel_pos_bias.relative_position_index
        keys = [f"{prefix}.encoder.relative_position_bias.relative_position_index"]
    save_file({**state, **{k: index.clone() for k in keys}}, str(folder / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(resolve_model(str(folder)).model(_x()), ref.model(_x()))
    save_file({**state, **{k: index.flip(0).contiguous() for k in keys}}, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="relative_position_index' differs"):
        resolve_model(str(folder))


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
