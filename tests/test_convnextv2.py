"""ConvNeXt V2 (timm ConvNeXt with GRN blocks, transformers ConvNextV2ForImageClassification): FP equivalence, the GRN
layout, PTQ/QAT, exports (safetensors, compressed-tensors view, transformers folder), the image processor."""

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
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
from vitqtool.quant import QUANT_LAYERS, iter_quantizers, quantizers_disabled
from vitqtool.recipe import load_recipe

# convnextv2_atto's layout (GRN MLPs as 1x1 convs, no layer scale), shrunk; conv_mlp=False is transformers' Linear layout
CONVNEXTV2 = ("convnextv2_atto", {"dims": [8, 16, 24, 32], "depths": [1, 1, 2, 1], "num_classes": 10,
                                  "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}})
LINEAR_MLP = (CONVNEXTV2[0], {**CONVNEXTV2[1], "conv_mlp": False})


_x = images


def _stock(spec=CONVNEXTV2) -> nn.Module:
    """A tiny ConvNeXt V2 with every parameter moved off its init (GRN's gamma and beta start at 0: an identity)."""
    return spread_(timm.create_model(spec[0], pretrained=False, **spec[1]))


@pytest.mark.parametrize("spec", [CONVNEXTV2, LINEAR_MLP], ids=["conv_mlp", "linear_mlp"])
@pytest.mark.parametrize("recipe", ["vaq", "lsq"])
def test_fp_exact_after_prepare_and_fast_sensitivity_equals_naive(spec, recipe):
    assert_fast_sensitivity_equals_naive(assert_fp_exact_after_prepare(_stock(spec), recipe, _x()))


def test_fc2_quantizer_reads_the_grn_output_unsigned_with_offset():
    q = core.prepare(_stock(), "vaq", bits=3)
    mlp = q.stages[2].blocks[1].mlp
    assert type(mlp.grn).__name__ == "GlobalResponseNorm"  # FP, between the GELU and fc2's input quantizer
    spec = mlp.fc2.a_quant.spec
    assert not spec.signed and spec.learned_offset and spec.bits == 3
    assert mlp.fc1.a_quant.spec.signed and q.stages[2].blocks[1].conv_dw.a_quant.spec.signed
    assert q.stem[0].w_quant.spec.bits == 8 and q.head.fc.w_quant.spec.bits == 8
    layers = [n for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)]
    assert len(layers) == 1 + 3 + 5 * 3 + 1  # stem, 3 downsampling convs, (conv_dw, fc1, fc2) per block, head
    seen = {}
    hooks = [mlp.grn.register_forward_hook(lambda m, a, out: seen.setdefault("grn", out)),
             mlp.fc2.a_quant.register_forward_pre_hook(lambda m, a: seen.setdefault("fc2_in", a[0]))]
    with torch.no_grad(), quantizers_disabled(q):
        q(_x(2))
    for h in hooks:
        h.remove()
    assert torch.equal(seen["fc2_in"], seen["grn"]) and (seen["grn"] < 0).any()  # GRN's shift reaches below 0


def test_unsupported_features_are_refused_by_name():
    model = timm.create_model(CONVNEXTV2[0], pretrained=False, **{**CONVNEXTV2[1], "act_layer": "silu"})
    with pytest.raises(ModelError, match=r"^stages\.0\.blocks\.0\.mlp\.act: layer type SiLU") as err:
        core.prepare(model, "vaq")
    assert "\n" not in str(err.value)


def _calibrated(spec):
    recipe = load_recipe("vaq", set_fields={"quant.bits": 3, "quant.per_channel": True})
    model = core.prepare(_stock(spec), recipe)
    calibrate_off_init(model, 0)
    return recipe, model.eval()


@pytest.mark.parametrize("spec", [CONVNEXTV2, LINEAR_MLP], ids=["conv_mlp", "linear_mlp"])
def test_export_reloads_bit_exact(tmp_path, spec):
    recipe, model = _calibrated(spec)
    path = tmp_path / "m.safetensors"
    export_model(model, path, architecture=spec[0], model_args=spec[1], data_config={"input_size": (3, 32, 32)},
                 recipe=recipe, source="tiny")
    with torch.no_grad():
        assert torch.equal(vitqtool.load(path)(_x()), model(_x()))
    offsets = {n: q.offset_value() for n, q in iter_quantizers(model) if q.offset is not None}
    assert offsets and all(n.endswith("mlp.fc2.a_quant") for n in offsets)


def test_source_view_loads_into_the_stock_model(tmp_path):
    """The Linear-MLP layout (compressed-tensors unpacks conv weights row by row in Python: ~20 s for the 1x1-conv one)."""
    spec = LINEAR_MLP
    _, model = _calibrated(spec)
    view = tmp_path / "view.safetensors"
    write_source_view(model, view, architecture=spec[0], model_args=spec[1], data_config={"input_size": (3, 32, 32)})
    state = source_state_dict(view)  # decompressed by compressed-tensors
    timm.create_model(spec[0], pretrained=False, **spec[1]).load_state_dict(state, strict=True)
    fc2 = model.stages[1].blocks[0].mlp.fc2
    with torch.no_grad():
        assert torch.equal(state["stages.1.blocks.0.mlp.fc2.weight"], fc2.w_quant(fc2.weight))
        assert torch.equal(state["stages.1.blocks.0.mlp.grn.weight"], model.stages[1].blocks[0].mlp.grn.weight)
        for _, qz in iter_quantizers(model):  # the view describes the weight-quantized network
            qz.enabled = qz.kind == "weight"
        assert (load_source_model(view)(_x()) - model(_x())).abs().max() <= 1e-4


def test_quantize_qat_runs_and_exports_with_verify(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(_stock().state_dict(), str(weights))
    info = commands.quantize(CONVNEXTV2[0], bits=2, recipe="lsq", out=tmp_path / "run", weights=weights,
                             model_args=CONVNEXTV2[1], epochs=1, batch_size=16, limit_train=32, limit_val=16)
    assert info.status == "done" and info.epochs_done == 1
    result = commands.export(tmp_path / "run", tmp_path / "r.safetensors", verify=True)
    assert result.verify["max_abs_diff"] <= 1e-5 and result.quantized_layers == 20


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = build("convnextv2", seed=3)
    return model, save(model, tmp_path_factory.mktemp("convnextv2") / "st")


@pytest.mark.parametrize("eps", [None, 1e-6, 1e-8], ids=["default_1e-12", "1e-6", "1e-8"])
def test_logits_match_transformers_fp_and_prepared(tmp_path, eps):
    """transformers' head LayerNorm eps (1e-12 by default) is mapped to timm's 1e-6: the logits still agree."""
    hf_model = build("convnextv2", seed=5, **({} if eps is None else {"layer_norm_eps": eps}))
    loaded = resolve_model(str(save(hf_model, tmp_path / "m")))
    assert loaded.architecture == "convnextv2_atto" and loaded.model_args["conv_mlp"] is False
    assert loaded.data_config["input_size"] == (3, 32, 32)
    assert_matches_transformers(hf_model, loaded.model)


def test_grn_parameters_keep_the_transformers_shape_on_export(hf_folder, tmp_path):
    from vitqtool.export import export_hf_model

    loaded = resolve_model(str(hf_folder[1]))
    assert loaded.model.stages[0].blocks[0].mlp.grn.weight.shape == (32,)
    rec = load_recipe("ptq", set_fields={"quant.bits": 4})
    q = core.prepare(loaded.model, rec)
    core.calibrate(q, [_x(2)])
    export_hf_model(q.eval(), tmp_path / "out", architecture=loaded.architecture, model_args=loaded.model_args,
                    data_config=loaded.data_config, recipe=rec, source="tiny", source_config=loaded.source_config)
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    grn = tensors["convnextv2.encoder.stages.0.layers.0.grn.weight"]
    assert grn.shape == (1, 1, 1, 32) and torch.equal(grn.reshape(-1), q.stages[0].blocks[0].mlp.grn.weight)


@pytest.mark.parametrize("changes,field", [
    ({"layer_norm_eps": 1e-5}, "layer_norm_eps"),
    ({"depths": [1, 1, 2], "hidden_sizes": [8, 16, 24], "num_stages": 3}, "depths"),
    ({"num_stages": 3}, "num_stages"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"image_size": [32, 48]}, "image_size"),
])
def test_unsupported_config_fields_are_refused_by_name(hf_folder, tmp_path, changes, field):
    assert_config_refused(hf_folder[1], tmp_path, changes, field)


@pytest.mark.parametrize("processor,expected", [
    ({"type": "ConvNextImageProcessor", "size": {"shortest_edge": 32}, "crop_pct": 0.875},
     {"input_size": (3, 32, 32), "crop_mode": "center", "interpolation": "bicubic"}),
    ({"type": "ConvNextImageProcessor", "size": {"shortest_edge": 32}, "crop_pct": 1.0, "resample": 2},
     {"input_size": (3, 32, 32), "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}),
], ids=["crop_pct_0.875", "crop_pct_1"])
def test_convnext_image_processor_sets_the_eval_transform(hf_folder, tmp_path, processor, expected):
    from transformers import AutoImageProcessor

    from vitqtool.data import eval_transform

    folder = save(hf_folder[0], tmp_path / "m", preprocessor=dict(processor))
    cfg = resolve_model(str(folder)).data_config
    assert {k: cfg[k] for k in expected} == expected
    scale = int(32 / processor["crop_pct"])  # the processor resizes the shortest edge to shortest_edge / crop_pct
    assert int(32 / cfg["crop_pct"]) == scale
    # an image already at the resize size: both pipelines only crop and normalise, so they agree exactly
    img = torch.randint(0, 256, (3, scale, scale), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    theirs = AutoImageProcessor.from_pretrained(folder)(images=img.permute(1, 2, 0).numpy(), return_tensors="pt")["pixel_values"][0]
    assert (eval_transform(cfg)(img) - theirs).abs().max() <= 1e-5
    exported = get_family(resolve_model(str(folder)).model).transformers[0].processor_config(cfg)
    assert exported["size"] == {"shortest_edge": 32} and int(32 / exported["crop_pct"]) == scale


@pytest.mark.parametrize("processor,field", [
    ({"type": "ViTImageProcessor", "size": {"height": 32, "width": 32}}, "image_processor_type"),
    ({"type": "ConvNextImageProcessor", "size": {"shortest_edge": 32}, "crop_pct": 1.5}, "crop_pct"),
])
def test_unmapped_image_processors_are_refused_by_name(hf_folder, tmp_path, processor, field):
    folder = save(hf_folder[0], tmp_path / "m", preprocessor=dict(processor))
    with pytest.raises(ModelError, match=f"field '{field}'"):
        resolve_model(str(folder))


def test_hf_export_decompresses_bit_exact_and_loads_in_transformers(hf_folder, tmp_path):
    from tests.test_hf_export import check_hf_export

    # packed: (pwconv1, pwconv2) per block + classifier; the convolutions are stored dequantized. No compressed-tensors
    # slot: every conv input, the GRN output (unsigned + offset)
    check_hf_export(hf_folder[0], tmp_path, "vaq", 4, True, packed_layers=2 * 5 + 1,
                    no_slot=("mlp.fc2.a_quant", "stem.0.a_quant", "conv_dw.a_quant", "downsample.1.a_quant"))


def test_cli_pipeline_on_a_folder(hf_folder, tmp_path):
    from tests.test_hf import _pipeline

    _pipeline(str(hf_folder[1]), tmp_path, "convnextv2")
