"""transformers ViT / DeiT / Swin / BEiT / data2vec-vision checkpoints in.

Logits equal transformers', strict key map, config refusals, data config, CLI.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import vitqtool
from tests.hf_tiny import FAMILIES, LABELS, build, edit_config, hub_cache, save
from vitqtool.cli import app, main
from vitqtool.core.models import resolve_model
from vitqtool.errors import ModelError, WeightsError

pytest.importorskip("transformers")
runner = CliRunner()
ATOL = 1e-4


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (transformers model, folder with model.safetensors, folder with pytorch_model.bin)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, family in enumerate(FAMILIES):
        model = build(family, seed=i)
        out[family] = (model, save(model, root / f"{family}_st"), save(model, root / f"{family}_bin", weights="bin"))
    return out


@pytest.mark.parametrize("family,arch", [("vit", "vit_tiny_patch16_224"), ("deit", "deit_tiny_patch16_224"),
                                         ("deit_distilled", "deit_tiny_distilled_patch16_224"),
                                         ("swin", "swin_tiny_patch4_window7_224"), ("beit", "beit_base_patch16_224"),
                                         ("data2vec_vision", "beit_base_patch16_224")])
def test_logits_match_transformers_fp_and_prepared(tiny, family, arch):
    hf_model, st_folder, bin_folder = tiny[family]
    x = _x()
    with torch.no_grad():
        expected = hf_model(pixel_values=x).logits
    assert expected.abs().max() > 0.5  # weights far from init: a wrong map cannot hide under the tolerance
    for folder in (st_folder, bin_folder):
        loaded = resolve_model(str(folder))
        assert loaded.architecture == arch and loaded.source_format == "transformers"
        assert loaded.source_config == json.loads((folder / "config.json").read_text())
        with torch.no_grad():
            got = loaded.model(x)
            assert (got - expected).abs().max() <= ATOL
            q = vitqtool.prepare(loaded.model, "vaq", bits=4)
            with vitqtool.quantizers_disabled(q):
                assert (q(x) - expected).abs().max() <= ATOL
            assert (q(x) - expected).abs().max() > ATOL  # the quantizers are real once enabled (uncalibrated steps)
        assert loaded.data_config["labels"] == LABELS and loaded.data_config["num_classes"] == 10


def test_model_args_are_json_and_rebuild_the_same_model(tiny):
    """run.json and exports rebuild the model from (architecture, model_args): the eps travels as a plain float."""
    loaded = resolve_model(str(tiny["vit"][1]))
    args = json.loads(json.dumps(loaded.model_args))
    assert args["layer_norm_eps"] == 1e-12
    rebuilt = resolve_model(loaded.architecture, random_init=True, model_args=args).model
    eps = {type(m).__name__: m.eps for m in rebuilt.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps and set(eps.values()) == {1e-12}
    rebuilt.load_state_dict(loaded.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(_x()), loaded.model(_x()))
    deit = resolve_model(str(tiny["deit"][1]))
    assert deit.model_args["reg_tokens"] == 1 and deit.model.reg_token.shape == (1, 1, 48)


def test_strict_key_map_names_leftover_and_missing_tensors(tiny, tmp_path):
    folder = shutil.copytree(tiny["vit"][1], tmp_path / "vit")
    state = load_file(str(folder / "model.safetensors"))
    extra = {**state, "vit.pooler.dense.weight": torch.zeros(48, 48)}
    save_file(extra, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"unexpected keys \[vit\.pooler\.dense\.weight\]"):
        resolve_model(str(folder))
    del state["vit.encoder.layer.1.attention.attention.key.bias"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys \[vit\.encoder\.layer\.1\.attention\.attention\.key\.bias\]"):
        resolve_model(str(folder))


def test_sharded_checkpoint_loads_and_its_index_is_checked(tiny, tmp_path):
    folder = shutil.copytree(tiny["vit"][1], tmp_path / "vit")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with torch.no_grad():
        assert (resolve_model(str(folder)).model(_x()) - tiny["vit"][0](pixel_values=_x()).logits).abs().max() <= ATOL
    index["weight_map"][keys[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="does not hold what"):
        resolve_model(str(folder))


# family -> (the timm buffer that holds the index, the keys older transformers checkpoints stored it under)
STORED_INDEX = {
    "swin": ("layers.0.blocks.0.attn.relative_position_index",
             [f"swin.encoder.layers.{s}.blocks.{b}.attention.self.relative_position_index" for s in range(2) for b in range(2)]),
    "beit": ("blocks.0.attn.relative_position_index",
             [f"beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_index" for i in range(2)]),
    "data2vec_vision": ("rel_pos_bias.relative_position_index",
                        ["data2vec_vision.encoder.relative_position_bias.relative_position_index"]),
}


@pytest.mark.parametrize("family", list(STORED_INDEX))
def test_stored_relative_position_index_is_checked(tiny, tmp_path, family):
    """Older transformers saved relative_position_index: it must equal what timm computes, then it is dropped."""
    folder = shutil.copytree(tiny[family][1], tmp_path / family)
    ref = resolve_model(str(folder))
    state = load_file(str(folder / "model.safetensors"))
    buffer, keys = STORED_INDEX[family]
    index = ref.model.get_buffer(buffer)
    save_file({**state, **{k: index.clone() for k in keys}}, str(folder / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(resolve_model(str(folder)).model(_x()), ref.model(_x()))
    save_file({**state, **{k: index.flip(0).contiguous() for k in keys}}, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="relative_position_index' differs"):
        resolve_model(str(folder))


@pytest.mark.parametrize("family,changes,field", [
    ("vit", {"hidden_act": "gelu_new"}, "hidden_act"),
    ("vit", {"architectures": ["ViTForMaskedImageModeling"]}, "architectures"),
    ("vit", {"foo_bar": 3}, "foo_bar"),
    ("vit", {"num_attention_heads": 5}, "num_attention_heads"),
    ("vit", {"id2label": {"0": "a", "2": "b"}, "label2id": None}, "id2label"),
    ("swin", {"use_absolute_embeddings": True}, "use_absolute_embeddings"),
    ("swin", {"layer_norm_eps": 1e-6}, "layer_norm_eps"),
    ("swin", {"image_size": [32, 48]}, "image_size"),
    ("beit", {"use_mask_token": True}, "use_mask_token"),
    ("beit", {"image_size": [32, 48]}, "image_size"),
    ("data2vec_vision", {"hidden_act": "gelu_new"}, "hidden_act"),
])
def test_unsupported_config_fields_are_refused_by_name(tiny, tmp_path, family, changes, field):
    folder = shutil.copytree(tiny[family][1], tmp_path / family)
    edit_config(folder, **changes)
    with pytest.raises(ModelError) as err:
        resolve_model(str(folder))
    assert f"'{field}'" in str(err.value) and "\n" not in str(err.value)


def test_cli_unsupported_config_is_one_line_exit_1(tiny, tmp_path, capsys):
    folder = shutil.copytree(tiny["swin"][1], tmp_path / "swin")
    edit_config(folder, use_absolute_embeddings=True)
    code = main(["evaluate", str(folder), "--limit", "4"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert code == 1 and captured.out == ""
    assert len(lines) == 1 and lines[0].startswith("error:") and "'use_absolute_embeddings'" in lines[0]
    assert "Traceback" not in captured.err


def test_model_args_may_not_change_the_architecture(tiny):
    with pytest.raises(ModelError, match="cannot change 'embed_dim'"):
        resolve_model(str(tiny["vit"][1]), model_args={"embed_dim": 64})
    loaded = resolve_model(str(tiny["vit"][1]), num_classes=10, model_args={"drop_path_rate": 0.1})
    assert loaded.model_args["drop_path_rate"] == 0.1


@pytest.mark.parametrize("processor,expected", [
    ({"type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]},
     {"input_size": (3, 32, 32), "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear",
      "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}),
    ({"type": "DeiTImageProcessor", "size": {"height": 36, "width": 36}, "crop_size": {"height": 32, "width": 32},
      "do_center_crop": True, "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.25] * 3},
     {"input_size": (3, 32, 32), "crop_mode": "squash", "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.25,) * 3}),
])
def test_preprocessor_config_sets_the_eval_transform(tiny, tmp_path, processor, expected):
    from transformers import AutoImageProcessor

    from vitqtool.data import eval_transform

    folder = save(tiny["vit"][0], tmp_path / "vit", preprocessor=dict(processor))
    cfg = resolve_model(str(folder)).data_config
    assert {k: cfg[k] for k in expected} == expected
    scale = processor["size"]["height"]
    assert int(32 / cfg["crop_pct"]) == scale  # vitqtool resizes to floor(32 / crop_pct): exactly the processor's size
    # an image already at the processor's resize size: both pipelines only crop and normalise, so they agree exactly
    img = torch.randint(0, 256, (3, scale, scale), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    theirs = AutoImageProcessor.from_pretrained(folder)(images=img.permute(1, 2, 0).numpy(), return_tensors="pt")["pixel_values"][0]
    assert (eval_transform(cfg)(img) - theirs).abs().max() <= 1e-5


def test_preprocessor_fields_without_timm_equivalent_are_refused(tiny, tmp_path):
    folder = save(tiny["vit"][0], tmp_path / "vit", preprocessor={"type": "ViTImageProcessor", "size": {"height": 40, "width": 40}})
    with pytest.raises(ModelError, match="field 'size' gives 40x40 images, the model's image_size is 32x32"):
        resolve_model(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_rescale": False}))
    with pytest.raises(ModelError, match="'do_rescale'"):
        resolve_model(str(folder))


def _pipeline(spec: str, tmp_path, family: str) -> None:
    """evaluate, analyze, softlabels, quantize (ptq), export --format hf and evaluate of the export, through the CLI."""
    res = runner.invoke(app, ["evaluate", spec, "--limit", "16", "--batch-size", "16", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["n"] == 16 and doc["labels"] == LABELS and doc["kind"] == "fp"
    rows = doc["per_class"]
    assert sum(r["n"] for r in rows) == 16 == sum(r["predicted"] for r in rows)
    assert all(r["label"] == LABELS[r["class"]] for r in rows)
    assert sum(r["correct"] for r in rows) == round(doc["top1"] * 16 / 100)

    res = runner.invoke(app, ["analyze", spec, "--batches", "1", "--batch-size", "4", "--bits", "4", "--what", "weights",
                              "--no-plots", "--out", str(tmp_path / "report"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["top_sensitive"]

    res = runner.invoke(app, ["softlabels", spec, "--crops", "2", "--limit", "4", "--out", str(tmp_path / "labels"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == 4

    run = tmp_path / "run"
    res = runner.invoke(app, ["quantize", spec, "--recipe", "ptq", "--bits", "4", "--calib-batches", "1", "--batch-size", "8",
                              "--limit-train", "16", "--limit-val", "16", "--out", str(run), "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads((run / "run.json").read_text())
    assert meta["source_format"] == "transformers" and meta["source_config"]["model_type"] == family.partition("_")[0]
    assert meta["data_config"]["labels"] == LABELS

    out = tmp_path / "export"
    res = runner.invoke(app, ["export", str(run), "--format", "hf", "--out", str(out), "--verify", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["format"] == "hf" and summary["verify"]["max_abs_diff"] <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(LABELS)}
    vq = config["quantization_config"]["vitqtool"]
    assert vq["source_format"] == "transformers" and vq["data_config"]["labels"] == LABELS

    res = runner.invoke(app, ["evaluate", str(out), "--limit", "16", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kind"] == "quantized"
    res = runner.invoke(app, ["inspect", str(out), "--json"])  # the folder is checked as `load` checks it
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["format"] == "hf"

    # the default single-file export keeps the source config, so it can be re-exported in the transformers layout
    single = tmp_path / "model.safetensors"
    res = runner.invoke(app, ["export", str(run), "--out", str(single), "--json"])
    assert res.exit_code == 0, res.output
    from vitqtool.export.reader import read_metadata

    vq_single = read_metadata(single)[1]["vitqtool"]
    assert vq_single["source_format"] == "transformers" and vq_single["data_config"]["labels"] == LABELS
    assert vq_single["source_config"] == meta["source_config"]
    res = runner.invoke(app, ["export", str(single), "--format", "hf", "--out", str(tmp_path / "again"), "--verify", "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    res = runner.invoke(app, ["evaluate", str(run), "--limit", "16", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["labels"] == LABELS


def test_cli_pipeline_on_a_folder(tiny, tmp_path):
    _pipeline(str(tiny["swin"][2]), tmp_path, "swin")  # the pytorch_model.bin folder


def test_cli_pipeline_on_a_beit_folder(tiny, tmp_path):
    _pipeline(str(tiny["beit"][1]), tmp_path, "beit")


def test_cli_pipeline_on_a_cached_hub_id(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = hub_cache(tmp_path / "hub", "tiny-org/tiny-deit", tiny["deit"][1])
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    loaded = resolve_model("hf-hub:tiny-org/tiny-deit")
    assert loaded.source == "hf-hub:tiny-org/tiny-deit" and loaded.architecture == "deit_tiny_patch16_224"
    with torch.no_grad():
        assert (loaded.model(_x()) - tiny["deit"][0](pixel_values=_x()).logits).abs().max() <= ATOL
    _pipeline("hf-hub:tiny-org/tiny-deit", tmp_path, "deit")


def test_loading_and_exporting_need_neither_transformers_nor_compressed_tensors(tiny, tmp_path):
    """A transformers folder loads, quantizes and exports --format hf with both libraries made unimportable."""
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["transformers"] = None  # any import of it raises ImportError
sys.modules["compressed_tensors"] = None
import torch
from vitqtool import commands, core
from vitqtool.export import export_hf_model, read_hf_export
from vitqtool.core.models import resolve_model
from vitqtool.recipe import load_recipe
loaded = resolve_model({str(tiny['swin'][2])!r})
rec = load_recipe("ptq", set_fields={{"quant.bits": 4}})
q = core.prepare(loaded.model, rec)
core.calibrate(q, [torch.randn(2, 3, 32, 32)])
export_hf_model(q.eval(), {str(tmp_path / 'out')!r}, architecture=loaded.architecture, model_args=loaded.model_args,
                data_config=loaded.data_config, recipe=rec, source="tiny", source_config=loaded.source_config)
x = torch.randn(2, 3, 32, 32)
assert torch.equal(read_hf_export({str(tmp_path / 'out')!r}).model(x), q(x))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
