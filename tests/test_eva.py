"""The EVA family (timm `Eva`: EVA-02, timm's rope ViTs): FP equivalence, rotary Q/K and SwiGLU placement, refusals,
PTQ, exports and the fast sensitivity path, on tiny random models."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from tests.conftest import (
    assert_exports_round_trip,
    assert_fast_sensitivity_equals_naive,
    assert_prepare_is_fp_exact,
    ptq_run_and_export,
    quantized_random,
    spread_model,
)
from vitqtool import commands, core
from vitqtool.errors import ModelError
from vitqtool.families import get_family
from vitqtool.quant import QLinear, QuantGLU, quantizers_disabled

SMALL = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10}
ROPE = {**SMALL, "ref_feat_shape": (8, 8)}
EVA02_TINY = ("eva02_tiny_patch14_224", ROPE)          # fused qkv + q_bias/v_bias, packed SwiGLU (GluMlp), rope
EVA02_BASE = ("eva02_base_patch14_224", ROPE)          # separate q/k/v projections, split SwiGLU with its inner norm
EVA02_CLIP = ("eva02_base_patch16_clip_224", ROPE)     # + the attention's inner norm (sub-LN), class-token pooling
MODELS = [
    EVA02_TINY, EVA02_BASE, EVA02_CLIP,
    ("eva02_base_patch14_224", {**ROPE, "qk_norm": True}),                 # per-head q/k norms before rope
    ("vit_small_patch16_rope_mixed_224", SMALL),                          # AttentionRope, fused qkv bias, per-block (mixed) rope
    ("vit_medium_patch16_rope_reg1_gap_256", SMALL),                      # register token, no class token, GELU Mlp, LayerScale
    ("vit_small_patch16_dinov3", SMALL),                                  # dynamic image size, rotate-half rope, 4 registers
    ("eva_giant_patch14_224", {**SMALL, "mlp_ratio": 2}),                 # EVA-01: no rope, absolute position embedding
    ("eva02_enormous_patch14_clip_224", {**SMALL, "mlp_ratio": 2}),       # post-norm blocks
]
IDS = ["eva02_tiny", "eva02_base", "eva02_clip", "qk_norm", "rope_mixed", "rope_reg", "dinov3", "eva_giant", "post_norm"]


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,args", MODELS, ids=IDS)
@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_fp_equivalence_with_stock_timm(name, args, recipe):
    stock = spread_model(name, args)
    if recipe == "lsq" and stock.blocks[0].attn.qkv is None:  # separate q_proj/k_proj/v_proj have no fused-qkv layout
        with pytest.raises(ModelError, match=r"fused-qkv layout .* separate q_proj/k_proj/v_proj .* split_qkv = true"):
            core.prepare(stock, recipe, bits=2)
        return
    assert_prepare_is_fp_exact(stock, recipe, _x())


def _capture(module: nn.Module, store: dict, key: str):
    return module.register_forward_pre_hook(lambda m, a: store.__setitem__(key, a[0].detach().clone()))


@pytest.mark.parametrize("spec", [EVA02_TINY, ("vit_small_patch16_dinov3", SMALL)], ids=["interleaved", "rotate_half"])
def test_q_and_k_quantizers_see_the_rotated_values(spec):
    """Rotary Q/K are quantized after rope: the Q/K quantizers' inputs are timm's rotated Q/K, not the projections."""
    stock = spread_model(*spec)
    q = core.prepare(stock, "vaq", bits=4).eval()
    seen: dict = {}
    attn = q.blocks[0].attn
    hooks = [_capture(attn.q_quant, seen, "q"), _capture(attn.k_quant, seen, "k"), _capture(attn.v_quant, seen, "v")]
    with torch.no_grad(), quantizers_disabled(q):
        q(_x())
        tokens = get_family(stock).block_inputs(stock, _x())[0]  # the input of block 0
    for h in hooks:
        h.remove()
    sa = stock.blocks[0].attn
    h = stock.blocks[0].norm1(tokens)
    b, n, c = h.shape
    bias = torch.cat((sa.q_bias, sa.k_bias, sa.v_bias)) if getattr(sa, "q_bias", None) is not None else sa.qkv.bias
    q_raw, k_raw, v_raw = F.linear(h, sa.qkv.weight, bias).chunk(3, -1)
    heads = lambda t: t.reshape(b, n, 3, c // 3).transpose(1, 2)
    rope = stock.rope.get_embed(shape=stock.patch_embed.grid_size)
    npt, half = stock.num_prefix_tokens, sa.rotate_half
    for key, raw in (("q", q_raw), ("k", k_raw)):
        t = heads(raw)
        rotated = torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2)
        got = heads(seen[key])
        torch.testing.assert_close(got, rotated, atol=1e-5, rtol=1e-5, msg=key)
        assert (got - t).abs().max() > 0.1  # the rotation is not the identity here
    torch.testing.assert_close(seen["v"], v_raw, atol=1e-5, rtol=1e-5)  # V is not rotated


def test_swiglu_layout_and_gate_placement():
    """Packed (GluMlp) and split (SwiGLU + inner norm): signed input, unsigned-with-offset gate after SiLU, signed fc2 input."""
    for spec, packed in ((EVA02_TINY, True), (EVA02_BASE, False)):
        stock = spread_model(*spec)
        q = core.prepare(stock, "vaq", bits=3).eval()
        mlp, smlp = q.blocks[1].mlp, stock.blocks[1].mlp
        assert isinstance(mlp, QuantGLU) and mlp.packed is packed
        input_q = mlp.fc1.a_quant if packed else mlp.input_quant
        assert input_q.spec.signed and not input_q.spec.learned_offset and input_q.spec.bits == 3
        if not packed:  # one input quantizer shared by the gate and value projections; the inner norm stays FP
            assert mlp.fc1_g.a_quant is None and mlp.fc1_x.a_quant is None and isinstance(mlp.norm, nn.LayerNorm)
        assert not mlp.gate_quant.spec.signed and mlp.gate_quant.spec.learned_offset  # the GELU-output rule, for SiLU
        assert mlp.fc2.a_quant.spec.signed and not mlp.fc2.a_quant.spec.learned_offset
        assert all(m.w_quant.spec.bits == 3 for m in (mlp.fc2, mlp.fc1 if packed else mlp.fc1_g))
        seen: dict = {}
        hooks = [_capture(mlp.gate_quant, seen, "gate"), _capture(mlp.fc2.a_quant, seen, "fc2_in"),
                 _capture(smlp, seen, "stock_in"), _capture(smlp.fc2, seen, "stock_fc2_in")]
        with torch.no_grad(), quantizers_disabled(q):
            q(_x())
            stock(_x())
            gate = smlp.fc1(seen["stock_in"]).chunk(2, -1)[0] if packed else smlp.fc1_g(seen["stock_in"])
        for h in hooks:
            h.remove()
        torch.testing.assert_close(seen["gate"], F.silu(gate), atol=1e-5, rtol=1e-5)  # the gate is SiLU's output
        assert seen["gate"].min() < 0  # SiLU's negative tail: why the gate gets a learned offset
        torch.testing.assert_close(seen["fc2_in"], seen["stock_fc2_in"], atol=1e-5, rtol=1e-5)


def _gate(model: nn.Module) -> None:
    """Gated attention (a block-level option `Eva` does not expose): a sigmoid gate on the attention output."""
    model.blocks[0].attn.gate = nn.Linear(48, 48)


@pytest.mark.parametrize("extra,edit,where,feature", [
    ({"global_pool": "map"}, None, "attn_pool", "attention pooling"),
    ({}, _gate, r"blocks\.0\.attn", "gated attention"),
    ({"attn_type": "rope", "qkv_fused": False, "num_kv_heads": 1}, None, r"blocks\.0\.attn", r"grouped-query attention"),
], ids=["map_pool", "gated", "gqa"])
def test_refused_features_are_named_in_one_line(extra, edit, where, feature):
    model = timm.create_model("eva02_base_patch14_224", pretrained=False, **ROPE, **extra)
    if edit is not None:
        edit(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match=rf"^{where}: {feature}.*not supported") as err:
        core.prepare(model, "vaq", inplace=True)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, QLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attention_masks_are_refused_at_run_time():
    q = core.prepare(spread_model(*EVA02_TINY), "vaq")
    with pytest.raises(ValueError, match="attention masks are not supported"):
        q(_x(), is_causal=True)


def test_plain_mlp_needs_gelu_unless_a_norm_follows_it():
    model = timm.create_model("eva_giant_patch14_224", pretrained=False, **SMALL, mlp_ratio=2)
    model.blocks[1].mlp.act = nn.SiLU()
    with pytest.raises(ModelError, match=r"^blocks\.1\.mlp\.act: activation SiLU \(the GELU-output quantizer needs GELU, GELU-tanh or QuickGELU\)"):
        core.prepare(model, "vaq")
    model.blocks[1].mlp.norm = nn.LayerNorm(96)  # with a norm before fc2, fc2's input is signed: any activation works
    q = core.prepare(model, "vaq")
    assert q.blocks[1].mlp.fc2.a_quant.spec.signed and q.blocks[0].mlp.fc2.a_quant.spec.learned_offset


@pytest.mark.parametrize("spec,recipe,bits,per_channel", [
    (EVA02_TINY, "vaq", 2, False), (EVA02_TINY, "lsq", 4, True), (EVA02_CLIP, "vaq", 3, True),
    (MODELS[4], "vaq", 4, False),
], ids=["tiny-w2", "tiny-fused-w4-channel", "clip-w3-channel", "rope_mixed-w4"])
def test_export_reloads_bit_exact_and_the_source_view_loads_into_stock_timm(tmp_path, spec, recipe, bits, per_channel):
    loaded, rec, model = quantized_random(spec, recipe, bits, per_channel)
    state = assert_exports_round_trip(tmp_path, loaded, rec, model, _x())
    attn = model.blocks[0].attn  # the view keeps the stock names: q_proj/k_proj/v_proj, or the fused qkv
    with torch.no_grad():
        if spec is EVA02_CLIP:
            for part in "qkv":
                layer = getattr(attn, part)
                assert torch.equal(state[f"blocks.0.attn.{part}_proj.weight"], layer.w_quant(layer.weight))
        else:
            parts = [attn.q, attn.k, attn.v] if attn.split else [attn.qkv]
            assert torch.equal(state["blocks.0.attn.qkv.weight"], torch.cat([p.w_quant(p.weight) for p in parts]))


def test_ptq_run_and_export(tmp_path):
    # patch embedding, per block q/k/v/proj + fc1_g/fc1_x/fc2, head
    assert ptq_run_and_export(tmp_path, EVA02_BASE).quantized_layers == 1 + 2 * (3 + 1 + 3) + 1


def test_qat_epoch_trains_every_quantizer(tmp_path):
    """One short QAT epoch (vaq) on the rope + SwiGLU model: it finishes, and every step and offset received a gradient."""
    name, args = EVA02_TINY
    info = commands.quantize(name, recipe="vaq", bits=3, epochs=1, random_init=True, model_args=args, batch_size=16,
                             limit_train=32, limit_val=16, out=tmp_path / "run")
    assert info.status == "done" and info.epochs_done == 1
    q = core.prepare(spread_model(*EVA02_TINY), "vaq", bits=3)
    core.calibrate(q, [_x(4)])
    q.train()
    q(_x(4)).logsumexp(-1).sum().backward()
    missing = [n for n, p in q.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert [n for n in missing if not n.endswith("offset")] == []


@pytest.mark.parametrize("spec", [MODELS[4], ("vit_small_patch16_dinov3", SMALL), EVA02_BASE], ids=["rope_mixed", "dinov3", "eva02_base"])
def test_fast_sensitivity_equals_naive(spec):
    assert_fast_sensitivity_equals_naive(core.prepare(spread_model(*spec), "vaq", bits=2), _x(4))
