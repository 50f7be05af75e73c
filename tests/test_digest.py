"""Every export carries a content digest: a flipped weight bit or an edited act_bits is refused on load, inspect and
evaluate (one line, exit 1), `inspect --no-digest-check` still describes the file, and files written before digests
(format 2.0, transformers-folder and view format 1.0) load with a one-line notice."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT
from safetensors import safe_open
from safetensors.torch import save_file

import vitqtool
from vitqtool import commands, core
from vitqtool.cli import main
from vitqtool.errors import ExportFormatError
from vitqtool.export import export_model, read_export
from vitqtool.export.source_view import write_source_view

HEAD = "head"  # an 8-bit edge layer: act_bits 8 -> 7 rebuilds a consistent model, so only the digest can tell


@pytest.fixture(scope="module")
def quantized():
    name, args = TINY_VIT
    loaded = core.resolve_model(name, random_init=True, model_args=args)
    recipe = vitqtool.load_recipe("vaq", set_fields={"quant.bits": 4})
    model = core.prepare(loaded.model, recipe)
    core.calibrate(model, [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))])
    return loaded, recipe, model.eval()


def _rewrite(src: Path, dst: Path, edit_meta=None, flip: str | None = None, drop_digest: bool = False) -> Path:
    """Copy a safetensors export with its metadata JSON edited, one bit of tensor `flip` flipped, or its digest dropped."""
    with safe_open(str(src), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if edit_meta is not None:
        meta["vitqtool"] = json.dumps(edit_meta(json.loads(meta["vitqtool"])))
    if flip is not None:
        flat = tensors[flip].reshape(-1).clone()
        flat[0] ^= 1 << 3
        tensors[flip] = flat.reshape(tensors[flip].shape)
    if drop_digest:
        del meta["content_digest"]
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _act_bits_7(vq: dict) -> dict:
    vq["layers"][HEAD]["act_bits"] = 7
    return vq


def _refused_everywhere(capsys, bad: Path) -> None:
    """load, inspect and evaluate each refuse `bad` in one line naming the digest; --no-digest-check inspects it."""
    capsys.readouterr()  # drop what building the export printed
    with pytest.raises(ExportFormatError, match="content digest mismatch"):
        commands.load(bad)
    for argv in (["inspect", str(bad)], ["evaluate", str(bad), "--limit", "10"]):
        assert main(argv) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "content digest mismatch" in err[0] and str(bad) in err[0], err
    assert main(["inspect", str(bad), "--no-digest-check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"].startswith("sha256:")


def test_safetensors_export_refuses_a_flipped_bit_and_an_edited_act_bits(tmp_path, capsys, quantized):
    loaded, recipe, model = quantized
    good = tmp_path / "m.safetensors"
    export_model(model, good, architecture=TINY_VIT[0], model_args=TINY_VIT[1], data_config=loaded.data_config, recipe=recipe)
    summary = commands.inspect(good)
    assert summary.format_version == "2.1" and summary.digest.startswith("sha256:") and len(summary.digest) == 71
    x = torch.randn(2, 3, 32, 32)
    def fc1_act_bits_2(vq: dict) -> dict:
        vq["layers"]["blocks.0.mlp.fc1"]["act_bits"] = 2
        return vq

    coarser = _rewrite(good, tmp_path / "act2.safetensors", edit_meta=fc1_act_bits_2)
    with torch.no_grad():  # without the digest such an edit loads as a consistent model that computes something else
        assert not torch.equal(read_export(coarser, check_digest=False).model(x), model(x))
    _refused_everywhere(capsys, coarser)
    edited = _rewrite(good, tmp_path / "act7.safetensors", edit_meta=_act_bits_7)
    _refused_everywhere(capsys, edited)
    _refused_everywhere(capsys, _rewrite(good, tmp_path / "flip.safetensors", flip="blocks.0.mlp.fc1.weight_packed"))
    unchecked = commands.inspect(edited, check_digest=False)
    assert {row["name"]: row for row in unchecked.layers}[HEAD]["act_bits"] == 7


def test_files_written_before_digests_load_with_a_notice_and_a_21_file_without_one_is_refused(tmp_path, capsys, quantized):
    loaded, recipe, model = quantized
    good = tmp_path / "m.safetensors"
    export_model(model, good, architecture=TINY_VIT[0], model_args=TINY_VIT[1], data_config=loaded.data_config, recipe=recipe)

    def as_20(vq: dict) -> dict:
        vq["format_version"] = "2.0"
        return vq

    legacy = _rewrite(good, tmp_path / "v20.safetensors", edit_meta=as_20, drop_digest=True)
    x = torch.randn(2, 3, 32, 32)
    assert main(["inspect", str(legacy), "--json"]) == 0
    captured = capsys.readouterr()
    notice = [line for line in captured.err.splitlines() if line.strip()]
    assert len(notice) == 1 and "has no content digest" in notice[0] and json.loads(captured.out)["digest"] is None
    with torch.no_grad():
        assert torch.equal(commands.load(legacy)(x), commands.load(good)(x))
    with pytest.raises(ExportFormatError, match="records a content digest and this file has none"):
        commands.load(_rewrite(good, tmp_path / "stripped.safetensors", drop_digest=True))


def test_compressed_tensors_view_refuses_a_flipped_bit(tmp_path, capsys, quantized):
    loaded, _recipe, model = quantized
    view = tmp_path / "view.safetensors"
    write_source_view(model, view, architecture=TINY_VIT[0], model_args=TINY_VIT[1], data_config=loaded.data_config)
    assert commands.inspect(view).digest.startswith("sha256:")
    assert commands.resolve_any(str(view)).kind == "weight-quantized"
    _refused_everywhere(capsys, _rewrite(view, tmp_path / "flip.safetensors", flip="blocks.0.mlp.fc1.weight_packed"))


def test_transformers_folder_refuses_a_flipped_bit_and_an_edited_act_bits(tmp_path, capsys):
    import hf_tiny

    from vitqtool.export import export_hf_model

    src = hf_tiny.save(hf_tiny.build("vit"), tmp_path / "src")
    loaded = core.resolve_model(str(src))
    recipe = vitqtool.load_recipe("vaq", set_fields={"quant.bits": 4})
    model = core.prepare(loaded.model, recipe)
    core.calibrate(model, [torch.randn(4, 3, 32, 32)])
    good = tmp_path / "good"
    export_hf_model(model.eval(), good, architecture=loaded.architecture, model_args=loaded.model_args,
                    data_config=loaded.data_config, recipe=recipe, source=str(src), source_config=loaded.source_config)
    assert commands.inspect(good).digest.startswith("sha256:")
    flipped = tmp_path / "flipped"
    shutil.copytree(good, flipped)
    weights = flipped / "model.safetensors"
    key = "vit.encoder.layer.0.intermediate.dense.weight_packed"
    with safe_open(str(weights), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] ^= 1 << 3
    save_file(tensors, str(weights), metadata=meta)
    _refused_everywhere(capsys, flipped)
    edited = tmp_path / "edited"
    shutil.copytree(good, edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"]["vitqtool"]["layers"][HEAD]["act_bits"] = 7
    (edited / "config.json").write_text(json.dumps(config))
    _refused_everywhere(capsys, edited)


def _rewrite_onnx(src: Path, dst: Path, edit_meta=None, flip: str | None = None, drop_digest: bool = False) -> Path:
    """Copy an ONNX export with its vitqtool metadata edited, one bit of initializer `flip` flipped, or its digest dropped."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    meta = json.loads(proto.metadata_props[0].value)
    if edit_meta is not None:
        meta = edit_meta(meta)
    if drop_digest:
        del meta["content_digest"]
    proto.metadata_props[0].value = json.dumps(meta)
    if flip is not None:
        init = next(i for i in proto.graph.initializer if i.name == flip)
        array = numpy_helper.to_array(init).copy()
        array.reshape(-1)[0] ^= 1 << 3
        init.CopyFrom(numpy_helper.from_array(array, flip))
    onnx.save(proto, str(dst))
    return dst


def test_onnx_export_refuses_a_flipped_bit_and_an_edited_act_bits(tmp_path, capsys, quantized):
    pytest.importorskip("onnxruntime")
    from vitqtool.export import export_onnx_model
    from vitqtool.export.onnx_export import inspect_onnx, load_onnx

    loaded, recipe, model = quantized
    good = tmp_path / "m.onnx"
    export_onnx_model(model, good, architecture=TINY_VIT[0], model_args=TINY_VIT[1], data_config=loaded.data_config, recipe=recipe)
    summary = commands.inspect(good)
    assert summary.format_version == "1.2" and summary.digest.startswith("sha256:") and len(summary.digest) == 71
    flipped = _rewrite_onnx(good, tmp_path / "flip.onnx", flip="blocks.0.mlp.fc1.weight_packed4")  # 4-bit codes, two per byte
    edited = _rewrite_onnx(good, tmp_path / "act7.onnx", edit_meta=_act_bits_7)
    for bad in (flipped, edited):
        with pytest.raises(ExportFormatError, match="content digest mismatch"):
            load_onnx(bad)
        _refused_everywhere(capsys, bad)
    assert {r["name"]: r for r in inspect_onnx(edited, check_digest=False)["layers"]}[HEAD]["act_bits"] == 7
    with pytest.raises(ExportFormatError, match="records a content digest and this file has none"):
        load_onnx(_rewrite_onnx(good, tmp_path / "stripped.onnx", drop_digest=True))

    def as_11(meta: dict) -> dict:  # written before digests: reads with a one-line notice
        return {**meta, "format_version": "1.1"}

    legacy = _rewrite_onnx(good, tmp_path / "v11.onnx", edit_meta=as_11, drop_digest=True)
    capsys.readouterr()
    assert main(["inspect", str(legacy), "--json"]) == 0
    captured = capsys.readouterr()
    notice = [line for line in captured.err.splitlines() if line.strip()]
    assert len(notice) == 1 and "has no content digest" in notice[0] and json.loads(captured.out)["digest"] is None
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_onnx(legacy)[0](x), load_onnx(good)[0](x))
