"""export --format hf (ViT, DeiT, Swin, BEiT, data2vec-vision).

compressed-tensors decompresses every weight bit for bit, transformers loads the folder, round trip.
"""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import calibrate_off_init
from tests.hf_tiny import build, save
from vitqtool import core
from vitqtool.cli import main
from vitqtool.core.models import resolve_model
from vitqtool.errors import ExportFormatError
from vitqtool.export import export_hf_model, read_hf_export
from vitqtool.families import get_family
from vitqtool.quant import QConv2d, QLinear, iter_quantizers
from vitqtool.recipe import load_recipe

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

# quantizers the compressed-tensors schema has no slot for (kept in the vitqtool section): softmax output,
# GELU output (unsigned with a learned offset), the patch-embedding convolution's input
NO_CT_SLOT = ("softmax_quant", "mlp.fc2.a_quant", "patch_embed.proj.a_quant")


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _quantized(folder, recipe: str, bits: int, per_channel: bool, seed: int = 0):
    """The loaded FP model, its recipe and a calibrated quantized model with steps and offsets moved off their init."""
    loaded = resolve_model(str(folder))
    rec = load_recipe(recipe, set_fields={"quant.bits": bits, "quant.per_channel": per_channel})
    model = core.prepare(loaded.model, rec)
    calibrate_off_init(model, seed)
    return loaded, rec, model.eval()


def _dequantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """vitqtool's fake-quant weight of every quantized Linear, under the timm module name (fused qkv split in three)."""
    out = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, QLinear):
                w = mod.w_quant(mod.weight)
                if name.endswith(".qkv"):
                    for part, t in zip("qkv", w.chunk(3, 0)):
                        out[f"{name[:-4]}.{part}"] = t
                else:
                    out[name] = w
    return out


def _hf_module(timm_name: str, names, family) -> str:
    fp, index = family.stock_name(timm_name)
    return names[fp].hf[index if index is not None else 0]


@pytest.mark.parametrize("family,recipe,bits,per_channel", [
    ("vit", "vaq", 2, False),
    ("deit", "vaq", 3, False),
    ("deit_distilled", "lsq", 4, True),   # fused qkv with one step (split across query/key/value on export)
    ("swin", "vaq", 4, True),
    ("beit", "vaq", 3, False),            # q/v biases outside the projection, per-layer relative position bias
    ("data2vec_vision", "lsq", 2, True),  # fused qkv + q/v biases, shared relative position bias
])
def test_export_decompresses_bit_exact_and_loads_in_transformers(tmp_path, family, recipe, bits, per_channel):
    check_hf_export(build(family, seed=7), tmp_path, recipe, bits, per_channel,
                    packed_layers=(2 if family == "deit_distilled" else 1) + (6 * 2 if family != "swin" else 6 * 4 + 1))


def check_hf_export(hf_fp: torch.nn.Module, tmp_path, recipe: str, bits: int, per_channel: bool, packed_layers: int,
                    no_slot: tuple[str, ...] = NO_CT_SLOT, loads_packed: bool = True) -> None:
    """Export a quantized `hf_fp`, then check it with compressed-tensors and transformers (the steps below);
    `no_slot`: the quantizer names (suffixes) the compressed-tensors schema has no slot for in this family;
    `loads_packed=False` skips step 4 for a class transformers cannot load packed (docs/families.md says which)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name
    from transformers import AutoModelForImageClassification

    from vitqtool.families.hf_map import table, timm_spec

    loaded, rec, qmodel = _quantized(save(hf_fp, tmp_path / "src"), recipe, bits, per_channel)
    out = tmp_path / "export"
    summary = export_hf_model(qmodel, out, architecture=loaded.architecture, model_args=loaded.model_args,
                              data_config=loaded.data_config, recipe=rec, source="tiny", source_config=loaded.source_config,
                              verify=True)
    assert summary["verify"]["max_abs_diff"] == 0.0
    x = _x()
    with torch.no_grad():
        expected = qmodel(x)
        # 1. vitqtool rebuilds the exact model from the folder alone
        assert torch.equal(read_hf_export(out).model(x), expected)

    # 2. compressed-tensors decompresses every packed Linear to vitqtool's dequantized weight, bit for bit
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    ct = QuantizationConfig.model_validate(qc)
    tensors = load_file(str(out / "model.safetensors"))
    names = table(timm_spec({k: v for k, v in config.items() if k != "quantization_config"}))
    vitq = {_hf_module(n, names, get_family(qmodel)): w for n, w in _dequantized_weights(qmodel).items()}
    packed = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    assert packed == sorted(vitq) and len(packed) == packed_layers
    decompressed = {k: v for k, v in tensors.items() if not k.endswith((".weight_scale", ".input_scale", ".output_scale", "_packed", "_shape"))}
    for module in packed:
        groups = [g for g in ct.config_groups.values() if any(match_name(module, t) for t in g.targets)]
        assert len(groups) == 1, module
        assert groups[0].weights.num_bits == (8 if module.endswith(("classifier", "reduction")) else bits)
        local = {k.rpartition(".")[2]: tensors[k] for k in tensors if k.rpartition(".")[0] == module}
        weight = PackedQuantizationCompressor.decompress(local, groups[0])["weight"]
        assert weight.dtype == torch.float32 and torch.equal(weight, vitq[module]), module
        decompressed[f"{module}.weight"] = weight

    # 3. the decompressed state dict loads strictly into the transformers class (no missing/unexpected/mismatched key)
    plain = tmp_path / "decompressed"
    plain.mkdir()
    save_file(decompressed, str(plain / "model.safetensors"), metadata={"format": "pt"})
    (plain / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    cls = type(hf_fp)
    dense, info = cls.from_pretrained(plain, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    weights_only = copy.deepcopy(qmodel)
    for name, q in iter_quantizers(weights_only):
        q.enabled = name.endswith("w_quant")
    with torch.no_grad():
        assert (dense.eval()(pixel_values=x).logits - weights_only(x)).abs().max() <= 1e-5

    # 4. transformers + compressed-tensors load the export itself; it computes vitqtool's model minus NO_CT_SLOT
    if not loads_packed:
        return
    ct_model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(ct_model) is cls
    partial = copy.deepcopy(qmodel)
    for name, q in iter_quantizers(partial):
        q.enabled = not name.endswith(no_slot)
    with torch.no_grad():
        got = ct_model(pixel_values=x).logits
        assert (got - partial(x)).abs().max() <= 1e-5
        assert (got - expected).abs().max() > 1e-3  # the kept quantizers matter: they are not silently dropped
    rows = qc["vitqtool"]["extra_quantizers"]
    convs = {f"{n}.w_quant" for n, m in qmodel.named_modules() if isinstance(m, QConv2d)}  # stored dequantized
    assert rows and all(r["quantizer"].endswith(no_slot) or r["quantizer"] in convs for r in rows)


def test_targets_match_saved_and_in_memory_names(tmp_path):
    """Each config-group target is one Linear under its saved name and its transformers >= 5 in-memory name."""
    loaded, rec, qmodel = _quantized(save(build("vit"), tmp_path / "src"), "vaq", 4, False)
    export_hf_model(qmodel, tmp_path / "out", architecture=loaded.architecture, model_args=loaded.model_args,
                    data_config=loaded.data_config, recipe=rec, source="tiny", source_config=loaded.source_config)
    groups = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    targets = [t for g in groups.values() for t in g["targets"]]
    assert "re:^(?:vit\\.encoder\\.layer\\.0\\.attention\\.attention\\.query|vit\\.layers\\.0\\.attention\\.q_proj)$" in targets
    assert "re:^(?:classifier)$" in targets
    for name in ("vit.encoder.layer.1.output.dense", "vit.layers.1.mlp.fc2"):
        assert sum(bool(re.match(t[3:], name)) for t in targets) == 1


def test_hf_export_refuses_edits_and_timm_sources(tmp_path, capsys):
    loaded, rec, qmodel = _quantized(save(build("swin"), tmp_path / "src"), "vaq", 4, False)
    out = tmp_path / "out"
    export_hf_model(qmodel, out, architecture=loaded.architecture, model_args=loaded.model_args,
                    data_config=loaded.data_config, recipe=rec, source="tiny", source_config=loaded.source_config)
    tensors = load_file(str(out / "model.safetensors"))
    key = "swin.encoder.layers.0.blocks.0.attention.self.key.input_scale"
    save_file({**tensors, key: tensors[key] * 2}, str(out / "model.safetensors"))
    with pytest.raises(ExportFormatError, match="copies of one quantizer step differ"):
        read_hf_export(out)
    save_file({**tensors, "swin.extra": torch.zeros(1)}, str(out / "model.safetensors"))
    with pytest.raises(ExportFormatError, match=r"no place for \(swin\.extra\)"):
        read_hf_export(out)
    with pytest.raises(ExportFormatError, match="not a vitqtool transformers export"):
        export_hf_model(qmodel, tmp_path / "src", architecture=loaded.architecture, model_args=loaded.model_args,
                        data_config=loaded.data_config, recipe=rec, source="tiny", source_config=loaded.source_config)

    # a timm-sourced run has no transformers config to write back: one line, exit 1
    from tests.conftest import TINY_VIT
    from vitqtool.commands import quantize

    run = tmp_path / "run"
    quantize(TINY_VIT[0], recipe="ptq", bits=4, calib_batches=1, random_init=True, model_args=TINY_VIT[1],
             batch_size=8, limit_train=16, limit_val=16, out=run)
    capsys.readouterr()
    code = main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "source format: timm" in err[0] and "--format safetensors" in err[0]
    assert not (tmp_path / "x").exists()
