"""Export -> reload: packed codes, exact logits, evaluate equality, the run path, size, and refusals of bad files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vitqtool
from tests.conftest import calibrate_off_init
from vitqtool import commands, core
from vitqtool.cli import main
from vitqtool.commands import export, inspect
from vitqtool.core.models import resolve_model
from vitqtool.errors import ExportFormatError
from vitqtool.export import export_model, is_vitq_export, read_export
from vitqtool.quant import QUANT_LAYERS, iter_quantizers
from vitqtool.quant.packing import unpack_codes
from vitqtool.recipe import load_recipe

VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10})
DEIT = ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10})
DEIT_DISTILLED = ("deit_tiny_distilled_patch16_224",
                  {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10})
SWIN = ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 32, "depths": (1, 1),
                                         "num_heads": (1, 2), "num_classes": 10})


def _quantized(spec, bits, per_channel=False, overrides=None, seed=0):
    """A calibrated quantized model whose steps and offsets were moved off their init (non-trivial codes)."""
    name, args = spec
    loaded = resolve_model(name, random_init=True, model_args=args)
    recipe = load_recipe("vaq", set_fields={"quant.bits": bits, "quant.per_channel": per_channel})
    model = core.prepare(loaded.model, recipe, overrides=overrides)
    calibrate_off_init(model, seed)
    return loaded, recipe, model.eval()


def _export(loaded, recipe, model, path, **kw):
    return export_model(model, path, architecture=loaded.architecture, model_args=loaded.model_args,
                        data_config=loaded.data_config, recipe=recipe, source=f"{loaded.architecture} (random init)", **kw)


@pytest.mark.parametrize("spec,bits,per_channel,overrides", [
    (VIT, 2, False, None),
    (DEIT, 3, False, None),
    (DEIT_DISTILLED, 8, True, None),
    (SWIN, 4, True, None),
    (SWIN, 2, False, None),
    (VIT, 4, False, {"blocks.0.mlp.fc1": {"weight_bits": 5, "act_bits": 6}, "blocks.1.attn.softmax_quant": {"act_bits": 7}}),
], ids=["vit-w2-tensor", "deit-w3-tensor", "deit_distilled-w8-channel", "swin-w4-channel", "swin-w2-tensor", "vit-w4-mixed-5-6-7"])
def test_export_load_round_trip(tmp_path, spec, bits, per_channel, overrides):
    loaded, recipe, model = _quantized(spec, bits, per_channel, overrides)
    path = tmp_path / "model.safetensors"
    _export(loaded, recipe, model, path)
    reloaded = vitqtool.load(path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reloaded(x) - model(x)).abs().max() <= 1e-5
    # same layout (bits, granularity) module by module, including the prepare-time overrides the recipe lacks
    assert core.quant_summary(reloaded) == core.quant_summary(model)
    file = load_file(str(path))
    layers = dict(reloaded.named_modules())
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        spec_w = layer.w_quant.spec
        codes = layer.w_quant.codes(layer.weight)
        unpacked = unpack_codes(file[f"{name}.weight_packed"], spec_w.bits, codes.shape[-1])  # packed along the last dim
        assert torch.equal(unpacked, codes), name
        assert codes.unique().numel() >= min(4, 2 ** spec_w.bits), f"{name}: trivial codes"
        with torch.no_grad():
            assert torch.equal(layers[name].weight, layer.w_quant(layer.weight)), f"{name}: reloaded weight != fake-quant weight"
        assert file[f"{name}.weight_shape"].tolist() == list(layer.weight.shape)
    for name, q in iter_quantizers(model):
        rq = layers[name]
        assert torch.equal(rq.step, q.step.clamp(min=1e-4)) and bool(rq.initialized)
        if q.offset is not None:
            assert torch.equal(rq.offset, q.offset)


def test_metadata_describes_layers_like_compressed_tensors(tmp_path):
    loaded, recipe, model = _quantized(SWIN, 2, per_channel=True)
    path = tmp_path / "m.safetensors"
    _export(loaded, recipe, model, path, metrics={"top1": 12.5})
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    qc, vq = json.loads(meta["quantization_config"]), json.loads(meta["vitqtool"])
    assert qc["quant_method"] == "vitqtool" and qc["format"] == "pack-quantized" and qc["ignore"] == []
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(quantized)
    for group in qc["config_groups"].values():
        for name in group["targets"]:
            layer = quantized[name]
            assert group["weights"]["num_bits"] == layer.w_quant.spec.bits
            assert group["weights"]["strategy"] == "channel"
            # compressed-tensors has no slot for an unsigned input with a learned offset (the GELU output)
            ct_input = layer.a_quant is not None and layer.a_quant.spec.signed and not layer.a_quant.spec.learned_offset
            assert (group["input_activations"] is None) == (not ct_input)
    assert vq["format_version"] == "2.1" and vq["architecture"] == SWIN[0] and vq["metrics"] == {"top1": 12.5}
    assert vq["layers"]["layers.1.downsample.reduction"]["weight_bits"] == 8  # Swin patch merging stays 8-bit
    roles = {row["role"] for row in vq["activations"].values()}
    assert roles == {"input", "q", "k", "v", "softmax"}
    assert vq["layers"]["layers.0.blocks.0.mlp.fc2"]["act_offset"] is True  # GELU output: unsigned with offset
    assert load_recipe(recipe).to_dict() == vq["recipe"]
    assert set(vq["versions"]) >= {"vitqtool", "torch", "timm", "safetensors"}


@pytest.mark.parametrize("dtype,header_dtype", [("float16", "F16"), ("bfloat16", "BF16")])
def test_low_precision_fp_tensors_verify_against_the_rounded_model(tmp_path, dtype, header_dtype):
    loaded, recipe, model = _quantized(VIT, 2)
    path = tmp_path / "m.safetensors"
    summary = _export(loaded, recipe, model, path, dtype=dtype, verify=True)
    check = summary["verify"]
    assert check["max_abs_diff"] <= 1e-5 and check["inputs"] == 16
    if dtype == "bfloat16":  # here rounding the FP tensors flips some 2-bit activation codes and moves the
        assert check["max_abs_diff_unrounded"] > 1e-5  # logits, so matching the rounded model is a real check
    with safe_open(str(path), "pt") as fh:
        assert fh.get_slice("pos_embed").get_dtype() == header_dtype
        assert fh.get_slice("blocks.0.norm1.weight").get_dtype() == header_dtype
        assert fh.get_slice("blocks.0.attn.q.weight_scale").get_dtype() == "F32"  # steps never lose precision
        assert fh.get_slice("blocks.0.attn.q_quant.scale").get_dtype() == "F32"


def test_evaluate_on_export_equals_evaluate_on_model(tmp_path):
    loaded, recipe, model = _quantized(DEIT, 4)
    path = tmp_path / "deit.safetensors"
    _export(loaded, recipe, model, path)
    assert is_vitq_export(path) and commands.resolve_any(str(path)).kind == "quantized"
    from_file = commands.evaluate(str(path), "builtin:mnist5k", limit=48, batch_size=16)
    in_memory = commands.evaluate(model, "builtin:mnist5k", limit=48, batch_size=16, data_config=loaded.data_config)
    assert from_file["n"] == in_memory["n"] == 48
    assert from_file["top1"] == in_memory["top1"] and from_file["top5"] == in_memory["top5"]
    assert from_file["loss"] == pytest.approx(in_memory["loss"], abs=1e-6)


def test_export_from_run_folder_with_verify(tmp_path, capsys):
    from conftest import write_run_folder

    loaded, recipe, model = _quantized(VIT, 3)
    run = tmp_path / "run"
    write_run_folder(run, model, recipe, architecture=loaded.architecture, model_args=loaded.model_args,
                     data_config=loaded.data_config, source=VIT[0], best_top1=12.5, last_top1=10.0)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--out", str(out), "--verify", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verify"]["max_abs_diff"] <= 1e-5 and doc["metrics"]["top1"] == 12.5 and doc["bits"] == 3
    exported = read_export(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (exported.model(x) - model(x)).abs().max() <= 1e-5
    assert tuple(exported.data_config["input_size"]) == (3, 32, 32) and exported.recipe == recipe
    # re-export the export itself with float16 FP tensors
    summary = export(out, tmp_path / "m16.safetensors", dtype="float16", verify=True)
    assert summary.details["fp_dtype"] == "float16" and summary.file_bytes < doc["file_bytes"]


def test_inspect_sizes_and_ratio(tmp_path, capsys):
    loaded, recipe, model = _quantized(VIT, 2)
    path = tmp_path / "m.safetensors"
    _export(loaded, recipe, model, path)
    assert main(["inspect", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    fp_params = sum(t.numel() for t in resolve_model(VIT[0], random_init=True, model_args=VIT[1]).model.state_dict().values()
                    if t.is_floating_point())
    assert doc["fp32_bytes"] == 4 * fp_params
    assert doc["file_bytes"] == path.stat().st_size
    assert doc["compression_ratio"] == pytest.approx(4 * fp_params / path.stat().st_size)
    rows = {r["name"]: r for r in doc["layers"]}
    fc1 = model.get_submodule("blocks.0.mlp.fc1")
    assert rows["blocks.0.mlp.fc1"]["weight_bits"] == 2 and rows["blocks.0.mlp.fc1"]["params"] == fc1.weight.numel()
    # 2-bit codes: 16 per int32 word, plus one float32 weight step and one float32 input step
    assert rows["blocks.0.mlp.fc1"]["bytes"] == fc1.weight.numel() // 4 + 4 + 4 + 4 * fc1.weight.dim()
    assert rows["head"]["weight_bits"] == 8
    assert main(["inspect", str(path)]) == 0
    assert "ratio" in capsys.readouterr().out


def test_deit_tiny_w2_is_at_least_10x_smaller_than_fp32(tmp_path):
    loaded = resolve_model("deit_tiny_patch16_224", random_init=True)
    fp32 = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(fp32))
    recipe = load_recipe("vaq", set_fields={"quant.bits": 2})
    model = core.prepare(loaded.model, recipe, inplace=True)
    with torch.no_grad():  # sizes depend on shapes and bits only: set steps directly instead of calibrating
        for _, q in iter_quantizers(model):
            q.step.fill_(0.01)
            q.initialized.fill_(True)
    summary = _export(loaded, recipe, model, tmp_path / "w2.safetensors", dtype="float16")
    assert summary["layers"][0]["name"] == "patch_embed.proj" and summary["layers"][0]["weight_bits"] == 8
    assert fp32.stat().st_size / summary["file_bytes"] >= 10


def test_uncalibrated_or_unprepared_models_and_bad_dtype_are_refused(tmp_path):
    loaded = resolve_model(*VIT[:1], random_init=True, model_args=VIT[1])
    recipe = load_recipe("vaq")
    with pytest.raises(ExportFormatError, match="no quantized layers"):
        _export(loaded, recipe, loaded.model, tmp_path / "a.safetensors")
    with pytest.raises(ExportFormatError, match="never calibrated"):
        _export(loaded, recipe, core.prepare(loaded.model, recipe), tmp_path / "a.safetensors")
    _, recipe, model = _quantized(VIT, 2)
    with pytest.raises(ExportFormatError, match="unsupported export dtype"):
        _export(loaded, recipe, model, tmp_path / "a.safetensors", dtype="float8")
    assert not (tmp_path / "a.safetensors").exists()


# --------------------------------------------------------------------------- damaged and foreign files


@pytest.fixture(scope="module")
def good_export(tmp_path_factory):
    loaded, recipe, model = _quantized(VIT, 2)
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    _export(loaded, recipe, model, path)
    return path


def _rewrite(src: Path, dst: Path, edit_meta=None, edit_tensors=None) -> Path:
    with safe_open(str(src), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if edit_meta:
        vq = json.loads(meta["vitqtool"])
        edit_meta(vq)
        meta["vitqtool"] = json.dumps(vq)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _set(path: list, value):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return edit


def _bad_file(kind: str, good: Path, dst: Path) -> Path:
    data = good.read_bytes()
    if kind == "garbage":
        dst.write_bytes(b"\x07\x00")
    elif kind == "corrupt-header":
        dst.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\x00" * 64)
    elif kind == "truncated":
        dst.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "plain-weights":
        save_file({"w": torch.zeros(2)}, str(dst))
    elif kind == "newer-format":
        _rewrite(good, dst, _set(["format_version"], "3.0"))
    elif kind == "edited-bits":
        _rewrite(good, dst, _set(["layers", "blocks.0.mlp.fc1", "weight_bits"], 3))
    elif kind == "missing-scale":
        _rewrite(good, dst, edit_tensors=lambda t: t.pop("head.weight_scale"))
    elif kind == "edited-shape":
        _rewrite(good, dst, edit_tensors=lambda t: t.__setitem__("blocks.0.attn.v.weight_shape", torch.tensor([32, 128], dtype=torch.int32)))
    elif kind == "edited-recipe":
        _rewrite(good, dst, _set(["recipe", "quant", "split_qkv"], False))
    elif kind == "extra-tensor":
        _rewrite(good, dst, edit_tensors=lambda t: t.__setitem__("bogus", torch.zeros(3)))
    return dst


@pytest.mark.parametrize("kind,command,message", [
    ("garbage", "inspect", "not a safetensors file"),
    ("corrupt-header", "inspect", "corrupt safetensors header"),
    ("truncated", "inspect", "is truncated"),
    ("plain-weights", "inspect", "not a vitqtool export"),
    ("newer-format", "inspect", "newer than this vitqtool reads"),
    ("edited-bits", "inspect", "'blocks.0.mlp.fc1.weight_packed' is I32[256, 4] but the metadata implies I32[256, 6]"),
    ("missing-scale", "inspect", "lacks tensor 'head.weight_scale'"),
    ("edited-shape", "export", "weight_shape [32, 128] does not match"),
    ("edited-recipe", "export", "do not match the model rebuilt"),
    ("extra-tensor", "export", "bogus"),
])
def test_bad_files_give_one_line_error_and_exit_1(good_export, tmp_path, capsys, kind, command, message):
    bad = _bad_file(kind, good_export, tmp_path / f"{kind}.safetensors")
    argv = ["inspect", str(bad)] if command == "inspect" else ["export", str(bad), "--out", str(tmp_path / "o.safetensors")]
    if kind == "plain-weights":
        argv = ["inspect", str(bad)]
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert code == 1 and captured.out == ""
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], captured.err
    assert not (tmp_path / "o.safetensors").exists()
    if kind in ("edited-shape", "edited-recipe", "extra-tensor"):
        with pytest.raises(ExportFormatError):
            read_export(bad)
    assert is_vitq_export(bad) == (kind not in ("garbage", "corrupt-header", "truncated", "plain-weights"))
    if kind in ("edited-bits", "missing-scale", "newer-format"):
        with pytest.raises(ExportFormatError):
            inspect(bad)
