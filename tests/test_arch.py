"""Adapters: FP equivalence with stock timm models, the method.md §3 layout, unsupported models."""

import copy

import pytest
import timm
import torch

from tests.conftest import TINY_DEIT, TINY_SWIN, TINY_VIT, spread_model
from vitqtool import core
from vitqtool.errors import ModelError, RecipeError
from vitqtool.quant import LSQQuantizer, QLinear, QuantAttention, iter_quantizers, quantizers_disabled

MODELS = [
    TINY_VIT,
    TINY_DEIT,
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 4, "num_classes": 10}),
    TINY_SWIN,
]


@pytest.mark.parametrize("name,args", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_fp_equivalence_with_stock_timm(name, args, recipe):
    stock = timm.create_model(name, pretrained=False, **args).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = stock(x)
        q = core.prepare(stock, recipe, bits=2).eval()
        with quantizers_disabled(q):
            out = q(x)
    assert (out - ref).abs().max().item() <= 1e-5
    # prepare works on a copy: the stock model is untouched
    assert not any(isinstance(m, QLinear) for m in stock.modules())


def test_vit_layout_matches_method():
    name, args = TINY_DEIT
    q = core.prepare(timm.create_model(name, pretrained=False, **args), "vaq", bits=3)
    attn = q.blocks[0].attn
    assert isinstance(attn, QuantAttention) and attn.split
    for part in ("q", "k", "v"):
        lin = getattr(attn, part)
        assert isinstance(lin, QLinear) and lin.a_quant is None and lin.w_quant.spec.bits == 3
        assert getattr(attn, f"{part}_quant").spec.signed
    assert attn.input_quant.spec.bits == 3 and attn.input_quant.spec.signed
    assert not attn.softmax_quant.spec.signed
    assert attn.proj.a_quant.spec.bits == 3  # attn @ V quantized before proj
    fc2 = q.blocks[0].mlp.fc2
    assert not fc2.a_quant.spec.signed and fc2.a_quant.offset is not None  # GELU output: unsigned + offset
    assert q.patch_embed.proj.w_quant.spec.bits == 8 and q.patch_embed.proj.a_quant.spec.bits == 8
    assert q.head.w_quant.spec.bits == 8 and q.head.a_quant.spec.bits == 8


def test_split_qkv_slices_the_fused_weight_exactly():
    name, args = TINY_DEIT
    stock = timm.create_model(name, pretrained=False, **args)
    q = core.prepare(stock, "vaq", bits=4)
    fused = stock.blocks[1].attn.qkv.weight
    d = fused.shape[0] // 3
    for i, part in enumerate("qkv"):
        assert torch.equal(getattr(q.blocks[1].attn, part).weight, fused[i * d:(i + 1) * d])


def test_swin_layout_quantizes_patch_merging_weights_at_8_bits():
    name, args = TINY_SWIN
    q = core.prepare(timm.create_model(name, pretrained=False, **args), "vaq", bits=2)
    red = q.layers[1].downsample.reduction
    assert isinstance(red, QLinear) and red.w_quant.spec.bits == 8 and red.a_quant is None
    assert q.head.fc.w_quant.spec.bits == 8
    assert q.layers[0].blocks[0].mlp.fc1.w_quant.spec.bits == 2


def test_quant_summary_lists_every_layer_with_bits():
    name, args = TINY_VIT
    q = core.prepare(timm.create_model(name, pretrained=False, **args), "vaq", bits=4)
    rows = {r["name"]: r for r in core.quant_summary(q)}
    assert rows["blocks.0.attn.v"]["weight_bits"] == 4
    assert rows["head"]["weight_bits"] == 8
    assert rows["blocks.1.attn.softmax_quant"]["act_bits"] == 4
    n_quantizers = sum(1 for _ in iter_quantizers(q))
    assert sum((r["weight_bits"] is not None) + (r["act_bits"] is not None) for r in rows.values()) == n_quantizers


def test_bit_overrides_by_glob():
    name, args = TINY_VIT
    q = core.prepare(timm.create_model(name, pretrained=False, **args), "vaq", bits=2,
                    overrides={"blocks.*.attn.v": {"weight_bits": 8}, "blocks.0.attn.softmax_quant": {"act_bits": 6}})
    assert q.blocks[0].attn.v.w_quant.spec.bits == 8 and q.blocks[1].attn.v.w_quant.spec.bits == 8
    assert q.blocks[0].attn.k.w_quant.spec.bits == 2
    assert q.blocks[0].attn.softmax_quant.spec.bits == 6 and not q.blocks[0].attn.softmax_quant.spec.signed
    with pytest.raises(RecipeError, match="matches no quantized module"):
        core.prepare(timm.create_model(name, pretrained=False, **args), "vaq", overrides={"nothing.*": {"weight_bits": 4}})


def test_unsupported_family_and_block_named():
    with pytest.raises(ModelError, match="not a supported family"):
        core.prepare(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10), "vaq")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2,
                          num_heads=2, num_classes=10, attn_layer="diff")
    with pytest.raises(ModelError, match=r"blocks\.0\.attn: attention type DiffAttention"):
        core.prepare(m, "vaq")


VIT_SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}


@pytest.mark.parametrize("name,extra,where,feature", [
    ("vit_tiny_patch16_224", {"act_layer": "silu"}, r"blocks\.0\.mlp\.act", "activation SiLU"),
    ("vit_tiny_patch16_224", {"attn_layer": "diff"}, r"blocks\.0\.attn", "attention type DiffAttention"),
    ("vit_tiny_patch16_224", {"global_pool": "prr"}, "attn_pool", "attention pooling AttentionPoolPrr"),
    ("swin_tiny_patch4_window7_224", {}, r"layers\.1\.blocks\.0\.mlp\.act", "SiLU"),
], ids=["silu", "diff_attention", "prr_pool", "swin_silu"])
def test_allow_list_refuses_features_the_rewrite_does_not_implement(name, extra, where, feature):
    if name.startswith("vit"):
        model = timm.create_model(name, pretrained=False, **VIT_SMALL, **extra)
    else:  # timm's Swin has no act_layer argument: swap one block's activation
        model = timm.create_model(name, pretrained=False, **{**TINY_SWIN[1], "embed_dim": 32, "depths": (1, 1), "num_heads": (2, 2)})
        model.layers[1].blocks[0].mlp.act = torch.nn.SiLU()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match=f"{where}: .*{feature}.*not supported") as err:
        core.prepare(model, "vaq", inplace=True)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, QLinear) for m in model.modules())  # refused before anything was rewritten
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("extra", [{"act_layer": "gelu_tanh"}, {"reg_tokens": 2}, {"qk_norm": True, "scale_mlp_norm": True}],
                         ids=["gelu_tanh", "reg_tokens", "qk_norm_mlp_norm"])
def test_vit_variants_the_rewrite_covers_are_fp_equivalent(extra):
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, **extra, **VIT_SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        q = core.prepare(stock, "vaq", bits=2).eval()
        with quantizers_disabled(q):
            assert (q(x) - stock(x)).abs().max().item() <= 1e-5


def test_calibrated_model_quantizes_every_quantizer_and_gets_gradients():
    # TINY_SWIN's four stages (shifted, unshifted and clamped windows, patch merging) at a third of its width, two blocks each
    name, args = TINY_SWIN[0], {**TINY_SWIN[1], "embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}
    q = core.prepare(timm.create_model(name, pretrained=False, **args), "vaq", bits=4)
    x = torch.randn(4, 3, 32, 32)
    core.calibrate(q, [x])
    assert all(bool(qz.initialized) for _, qz in iter_quantizers(q))
    q.train()
    q(x).logsumexp(-1).sum().backward()
    missing = [n for n, p in q.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    # the GELU offsets only get gradient from clipped values; everything else must have one
    assert [n for n in missing if not n.endswith("offset")] == []
    assert isinstance(q.layers[0].blocks[0].mlp.fc2.a_quant, LSQQuantizer)


@pytest.mark.parametrize("name,args", [TINY_DEIT, TINY_SWIN], ids=["deit", "swin"])
def test_fused_quantizers_match_eager_on_a_whole_model(name, args):
    from vitqtool.quant import set_quantizers_fused
    from vitqtool.quant.lsq import ulps_apart

    torch.manual_seed(0)
    eager = core.prepare(timm.create_model(name, pretrained=False, **args), "vaq", bits=3)
    x = torch.randn(4, 3, 32, 32)
    core.calibrate(eager, [x])
    fused = copy.deepcopy(eager)
    assert set_quantizers_fused(fused, True) == sum(1 for _ in iter_quantizers(eager))
    grads = []
    for model in (eager, fused):
        model.train()
        torch.manual_seed(1)  # same stochastic-depth draws
        out = model(x)
        out.logsumexp(-1).sum().backward()
        grads.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_e, g_e), (out_f, g_f) = grads
    assert torch.equal(out_e, out_f)  # the forward is the same arithmetic, element by element
    assert g_e.keys() == g_f.keys()
    steps = {f"{m}.{p}" for m, q in iter_quantizers(eager) for p, _ in q.named_parameters()}
    for n in g_e:  # input gradients are elementwise (bitwise); step/offset sums are float64 in both paths (1 ulp)
        assert ulps_apart(g_e[n], g_f[n]) <= (1 if n in steps else 0), n


EVA02_QK_NORM = ("eva02_tiny_patch14_224", {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3,
                                              "num_classes": 10, "ref_feat_shape": (8, 8), "qk_norm": True})


@pytest.mark.parametrize("spec", [TINY_DEIT, EVA02_QK_NORM], ids=["deit", "eva02_bias_norm_rope"])
def test_training_runs_the_split_projections_as_one_matmul_with_the_same_values(spec):
    """In training the q/k/v projections are one matmul over the stacked fake-quantized weights (each its own step),
    heads first; eval runs the three layers. Outputs and every gradient agree up to float summation order, also with
    the outside q/v biases, per-head norms and rotary embedding of EVA-02."""
    torch.manual_seed(0)
    q = core.prepare(spread_model(*spec), "vaq", bits=4)
    x = torch.randn(4, 3, 32, 32)
    core.calibrate(q, [x])
    calls = []
    handle = q.blocks[0].attn.k.register_forward_hook(lambda *a: calls.append(1))
    results = []
    for train in (False, True):
        q.train(train)
        q.zero_grad()
        out = q(x)
        out.logsumexp(-1).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in q.named_parameters() if p.grad is not None}))
    handle.remove()
    assert calls == [1]  # the k layer ran as a module in eval only
    (out_eval, g_eval), (out_train, g_train) = results
    torch.testing.assert_close(out_train, out_eval, rtol=1e-5, atol=1e-5)
    assert g_eval.keys() == g_train.keys() and "blocks.0.attn.k.w_quant.step" in g_eval
    for n in g_eval:
        torch.testing.assert_close(g_train[n], g_eval[n], rtol=1e-3, atol=1e-5, msg=n)
