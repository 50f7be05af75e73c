"""The export against the real compressed-tensors library: bit-exact decompression, old files, the source-name view."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vitqtool
from tests.conftest import calibrate_off_init
from vitqtool import core
from vitqtool.cli import main
from vitqtool.commands import inspect
from vitqtool.core.models import resolve_model
from vitqtool.errors import ExportFormatError
from vitqtool.export import export_model, load_source_model, source_state_dict
from vitqtool.export.source_view import write_source_view
from vitqtool.quant import QUANT_LAYERS, QConv2d, iter_quantizers
from vitqtool.quant.packing import pack_codes
from vitqtool.recipe import load_recipe

ct_compressors = pytest.importorskip("compressed_tensors.compressors")
ct_quantization = pytest.importorskip("compressed_tensors.quantization")
Packed = ct_compressors.PackedQuantizationCompressor

# embed 64 -> square q/k/v/proj (the shape where a [out] scale broadcast silently wrong); 4x4 patches of 3 channels
VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 1, "num_heads": 2, "num_classes": 10})
SWIN = ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 32, "depths": (1, 1),
                                         "num_heads": (1, 2), "num_classes": 10})


def _quantized(spec, bits, per_channel=False, overrides=None, recipe="vaq", seed=0):
    """A calibrated model with every layer at `bits` (patch embedding and head too) and steps moved off their init."""
    name, args = spec
    loaded = resolve_model(name, random_init=True, model_args=args)
    rec = load_recipe(recipe, set_fields={"quant.bits": bits, "quant.per_channel": per_channel, "quant.edge_bits": bits})
    model = core.prepare(loaded.model, rec, overrides=overrides)
    calibrate_off_init(model, seed)
    return loaded, rec, model.eval()


def _export(loaded, recipe, model, path, **kw):
    return export_model(model, path, architecture=loaded.architecture, model_args=loaded.model_args,
                        data_config=loaded.data_config, recipe=recipe, **kw)


def _schemes(qc: dict) -> dict:
    """target -> compressed-tensors QuantizationScheme, parsed by the library from the file's quantization_config."""
    config = ct_quantization.QuantizationConfig.model_validate(qc)
    return {t: scheme for scheme in config.config_groups.values() for t in scheme.targets}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_every_weight_decompresses_bit_exact_with_compressed_tensors(tmp_path, bits, per_channel):
    loaded, recipe, model = _quantized(VIT, bits, per_channel)
    path = tmp_path / "m.safetensors"
    _export(loaded, recipe, model, path)
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        qc = json.loads(fh.metadata()["quantization_config"])
    schemes = _schemes(qc)
    kinds = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        scheme = schemes[name]
        assert scheme.weights.num_bits == bits and scheme.weights.strategy == ("channel" if per_channel else "tensor")
        params = {p: tensors[f"{name}.{p}"] for p in Packed.compression_param_names(scheme)}
        got = Packed.decompress(params, scheme)["weight"]
        with torch.no_grad():
            want = layer.w_quant(layer.weight)  # vitqtool's dequantized (fake-quant) weight
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), f"{name}: compressed-tensors decompresses a different weight"
        assert layer.w_quant.codes(layer.weight).unique().numel() >= min(4, 2 ** bits), f"{name}: trivial codes"
        kinds.add((type(layer).__name__, layer.weight.shape[0] == layer.weight.shape[-1]))
        if layer.a_quant is not None and layer.a_quant.spec.signed and not layer.a_quant.spec.learned_offset:
            assert scheme.input_activations.num_bits == layer.a_quant.spec.bits
            assert torch.equal(tensors[f"{name}.input_scale"], layer.a_quant.step.clamp(min=1e-4))
        elif layer.a_quant is not None:  # the GELU output (unsigned, learned offset) has no compressed-tensors slot
            assert scheme.input_activations is None
    assert kinds >= {("QConv2d", False), ("QLinear", True), ("QLinear", False)}  # conv, square and non-square Linear
    assert torch.allclose(vitqtool.load(path)(torch.ones(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32)), atol=1e-5, rtol=0)


def test_swin_patch_merging_and_conv_decompress_bit_exact(tmp_path):
    loaded, recipe, model = _quantized(SWIN, 3, per_channel=True)
    path = tmp_path / "swin.safetensors"
    _export(loaded, recipe, model, path)
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        schemes = _schemes(json.loads(fh.metadata()["quantization_config"]))
    for name in ("patch_embed.proj", "layers.1.downsample.reduction", "layers.0.blocks.0.attn.core.v"):
        layer = model.get_submodule(name)
        params = {p: tensors[f"{name}.{p}"] for p in Packed.compression_param_names(schemes[name])}
        with torch.no_grad():
            assert torch.equal(Packed.decompress(params, schemes[name])["weight"], layer.w_quant(layer.weight)), name


def _as_format_1(model, path_v2, path_v1):
    """Rewrite a 2.x file in the 1.x layout by hand: flattened conv codes, per-channel scales [out], version 1.0."""
    with safe_open(str(path_v2), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for name, layer in model.named_modules():
        if isinstance(layer, QUANT_LAYERS):
            codes = layer.w_quant.codes(layer.weight)
            tensors[f"{name}.weight_packed"] = pack_codes(codes.reshape(codes.shape[0], -1), layer.w_quant.spec.bits)
            tensors[f"{name}.weight_scale"] = tensors[f"{name}.weight_scale"].reshape(-1).contiguous()
    vq, qc = json.loads(meta["vitqtool"]), json.loads(meta["quantization_config"])
    vq["format_version"] = qc["version"] = "1.0"
    meta.update(vitqtool=json.dumps(vq), quantization_config=json.dumps(qc))
    del meta["content_digest"]  # 1.x files carry no digest
    save_file(tensors, str(path_v1), metadata=meta)


def test_format_1_files_still_load(tmp_path):
    loaded, recipe, model = _quantized(VIT, 4, per_channel=True)
    v2, v1 = tmp_path / "v2.safetensors", tmp_path / "v1.safetensors"
    _export(loaded, recipe, model, v2)
    _as_format_1(model, v2, v1)
    with safe_open(str(v1), "pt") as fh:  # the old layout really differs: flattened conv, [out] scale
        assert fh.get_slice("patch_embed.proj.weight_packed").get_shape() == [64, 6]  # 48 codes x 4 bits
        assert fh.get_slice("blocks.0.attn.q.weight_scale").get_shape() == [64]
    with safe_open(str(v2), "pt") as fh:
        assert fh.get_slice("patch_embed.proj.weight_packed").get_shape() == [64, 3, 4, 1]
        assert fh.get_slice("blocks.0.attn.q.weight_scale").get_shape() == [64, 1]
        assert fh.get_slice("patch_embed.proj.weight_scale").get_shape() == [64, 1, 1, 1]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vitqtool.load(v1)(x), vitqtool.load(v2)(x))
        assert (vitqtool.load(v1)(x) - model(x)).abs().max() <= 1e-5
    assert inspect(v1).format_version == "1.0" and inspect(v2).format_version == "2.1"
    # a 1.x file whose scale has the 2.x shape contradicts its version and is refused
    bad = tmp_path / "bad.safetensors"
    with safe_open(str(v1), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["blocks.0.attn.q.weight_scale"] = tensors["blocks.0.attn.q.weight_scale"].reshape(-1, 1).contiguous()
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ExportFormatError, match="weight_scale"):
        inspect(bad)


def _weight_only(model):
    """Turn the activation quantizers off (what a weight-only view describes); returns them to turn back on."""
    acts = [q for _, q in iter_quantizers(model) if q.kind == "act"]
    for q in acts:
        q.enabled = False
    return acts


@pytest.mark.parametrize("spec,bits,per_channel,recipe,overrides", [
    (VIT, 2, False, "vaq", {"blocks.*.attn.v": {"weight_bits": 4}}),
    (VIT, 3, True, "vaq", None),
    (VIT, 4, False, "lsq", None),
    (SWIN, 4, False, "vaq", None),
], ids=["vit-w2-v4-tensor", "vit-w3-channel", "vit-w4-fused-qkv", "swin-w4"])
def test_source_view_loads_strictly_into_the_stock_timm_model(tmp_path, spec, bits, per_channel, recipe, overrides):
    loaded, _rec, model = _quantized(spec, bits, per_channel, overrides, recipe=recipe)
    path = tmp_path / "view.safetensors"
    write_source_view(model, path, architecture=loaded.architecture, model_args=loaded.model_args, data_config=loaded.data_config)
    state = source_state_dict(path)  # decompressed by compressed-tensors
    stock = resolve_model(spec[0], random_init=True, model_args=spec[1]).model
    stock.load_state_dict(state, strict=True)  # the stock model's own keys and shapes, nothing more
    attn = "blocks.0.attn" if spec is VIT else "layers.0.blocks.0.attn"
    core = model.get_submodule(attn if spec is VIT else f"{attn}.core")
    parts = [core.q, core.k, core.v] if core.split else [core.qkv]
    with torch.no_grad():
        assert torch.equal(state[f"{attn}.qkv.weight"], torch.cat([p.w_quant(p.weight) for p in parts]))
    with safe_open(str(path), "pt") as fh:
        qc, vq = json.loads(fh.metadata()["quantization_config"]), json.loads(fh.metadata()["vitqtool"])
        assert torch.equal(fh.get_tensor(f"{attn}.qkv.input_scale"), core.input_quant.step.clamp(min=1e-4))
        assert f"{attn}.qkv.input_scale" in fh.keys() and "blocks.0.mlp.fc2.input_scale" not in fh.keys()
    scheme = _schemes(qc)[f"{attn}.qkv"]
    assert scheme.weights.strategy == ("tensor" if recipe == "lsq" else "channel")
    assert scheme.weights.num_bits == (4 if overrides else bits)
    fc2 = "blocks.0.mlp.fc2" if spec is VIT else "layers.0.blocks.0.mlp.fc2"
    assert vq["activations"][f"{fc2}.a_quant"]["offset"] == pytest.approx(-0.05)  # the GELU offset lives in the metadata
    # the stock model with these weights computes the weight-quantized network
    _weight_only(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (load_source_model(path)(x) - model(x)).abs().max() <= 1e-4


def test_export_cli_compressed_tensors_format_with_verify(tmp_path, capsys):
    loaded, recipe, model = _quantized(VIT, 2)
    src = tmp_path / "m.safetensors"
    _export(loaded, recipe, model, src)
    out = tmp_path / "view.safetensors"
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(out), "--verify", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verify"]["max_abs_diff"] <= 1e-4 and doc["format"] == "compressed-tensors"
    assert set(source_state_dict(out)) == set(resolve_model(VIT[0], random_init=True, model_args=VIT[1]).model.state_dict())
    assert main(["export", str(src), "--format", "tflite", "--out", str(out)]) == 2
    with pytest.raises(ExportFormatError, match="not a source-name view"):
        source_state_dict(src)


def test_conv_scales_broadcast_against_the_conv_weight(tmp_path):
    """A per-channel conv scale is [out, 1, 1, 1]; compressed-tensors' `codes * scale` then scales each output channel."""
    loaded, recipe, model = _quantized(VIT, 8, per_channel=True)
    path = tmp_path / "m.safetensors"
    _export(loaded, recipe, model, path)
    conv = model.patch_embed.proj
    assert isinstance(conv, QConv2d)
    scale = load_file(str(path))["patch_embed.proj.weight_scale"]
    assert scale.shape == (conv.out_channels, 1, 1, 1)
    assert torch.equal(scale.reshape(-1), conv.w_quant.step.clamp(min=1e-4))
