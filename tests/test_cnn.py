"""CNNs in `analyze` (ResNet, ConvNeXt adapters), `analyze A B --compare`, and quantize/export of a ResNet."""

from __future__ import annotations

import csv
import json

import pytest
import timm
import torch
from torch import nn
from typer.testing import CliRunner

from tests.conftest import TINY_VIT, write_run_folder
from vitqtool import commands, core, quant
from vitqtool.analysis import analyze_model
from vitqtool.analysis.compare import model_measures
from vitqtool.analysis.sensitivity import SensitivityProbe, build_units, group_units
from vitqtool.cli import app, main
from vitqtool.errors import ModelError
from vitqtool.families import get_family
from vitqtool.quant import OscillationTracker
from vitqtool.recipe import load_recipe

# BasicBlock ResNet with one block per stage; zero_init_last=False so random blocks change the logits
RESNET = ("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8, "num_classes": 10,
                       "zero_init_last": False, "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}})
DEEP_RESNET = ("resnet50", {**RESNET[1], "stem_type": "deep", "avg_down": True})  # Bottleneck, 3-conv stem, AvgPool + conv shortcut
CONVNEXT = ("convnext_atto", {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "ls_init_value": 0.5, "num_classes": 10})


def _model(name: str, args: dict) -> nn.Module:
    return timm.create_model(name, pretrained=False, **args).eval()


@pytest.mark.parametrize("name,args", [RESNET, DEEP_RESNET, CONVNEXT, (CONVNEXT[0], {**CONVNEXT[1], "conv_mlp": False})])
def test_layout_is_fp_exact_and_fast_sensitivity_equals_naive(name: str, args: dict) -> None:
    model = _model(name, args)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
    q = core.prepare(model, "vaq", bits=2)
    core.calibrate(q, [torch.randn(8, 3, 32, 32)])
    with quant.quantizers_disabled(q), torch.no_grad():
        assert torch.allclose(q(images), reference, atol=1e-5)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, quant.QUANT_LAYERS)}
    assert len(layers) == sum(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    first, head = layers[next(iter(layers))], layers["fc" if "fc" in layers else "head.fc"]
    assert first.a_quant.spec.signed and first.w_quant.spec.bits == 8 and head.w_quant.spec.bits == 8
    inner = [m for n, m in layers.items() if m.w_quant.spec.bits == 2]
    if name.startswith("resnet"):  # every layer after the stem reads a ReLU output
        assert inner and not any(m.a_quant.spec.signed for m in inner) and not head.a_quant.spec.signed
    else:  # ConvNeXt: only fc2 reads GELU (unsigned + offset); conv_dw, fc1 and downsampling read signed tensors
        assert {n.rsplit(".", 1)[-1] for n, m in layers.items() if m.a_quant.spec.learned_offset} == {"fc2"}
    adapter = get_family(q)
    batches = [(images, torch.arange(4))]
    units = build_units(q, "both", adapter.block_names(q))
    units += group_units(units, "block")
    fast, naive = SensitivityProbe(q, adapter, batches, "fast"), SensitivityProbe(q, adapter, batches, "naive")
    assert {fast.start_of(u) for u in units} == {-1, *range(len(adapter.block_names(q)) + 1)}  # stem, every segment, the tail
    kl_fast = [fast.measure(u)["kl"] for u in units]
    assert kl_fast == pytest.approx([naive.measure(u)["kl"] for u in units], rel=1e-4, abs=1e-9)
    assert max(kl_fast) > 0


def test_planted_outlier_channel_ranks_its_conv_first() -> None:
    torch.manual_seed(0)
    model = _model(*RESNET)
    with torch.no_grad():  # one output channel 50x, undone by its BatchNorm: the FP model is the same function
        model.layer2[0].conv1.weight[3] *= 50.0
        model.layer2[0].bn1.running_var[3] *= 2500.0
    calibration = [(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long))]
    # at 4 bits the other layers lose little, while the per-tensor step that fits the outlier channel rounds every
    # other channel of the planted conv to zero
    report = analyze_model(model, recipe=load_recipe("vaq", set_fields={"quant.bits": 4}), calibration_batches=calibration,
                           batches=[(torch.randn(16, 3, 32, 32), torch.arange(16) % 10)], labels_valid=True, source="planted",
                           data="random", split="random", what="weights")
    ranked = report["sensitivity"]["modules"]
    assert ranked[0]["name"] == "layer2.0.conv1" and ranked[0]["kl"] > 5 * ranked[1]["kl"]
    types = {m["type"] for m in ranked}
    assert {"conv1", "conv2", "downsample.0"} <= types
    weights = {w["name"]: w for w in report["weights"]}
    assert weights["layer2.0.conv1"]["per_channel"]["range_ratio"] > 20 > weights["layer2.0.conv2"]["per_channel"]["range_ratio"]


@pytest.mark.parametrize("name,args,where,feature", [
    ("resnet18", {**RESNET[1], "act_layer": "prelu"}, "act1", "layer type PReLU"),
    ("resnet18", {**RESNET[1], "block_args": {"attn_layer": "se"}}, "layer1.0.se.gate", "layer type Sigmoid"),
    ("resnet18", {**RESNET[1], "block_args": {"attn_layer": "eca"}}, "layer1.0.se.conv", "layer type Conv1d"),
    ("convnext_atto", {**CONVNEXT[1], "act_layer": "silu"}, "stages.0.blocks.0.mlp.act", "layer type SiLU"),
])
def test_unsupported_layers_are_refused_by_name(name: str, args: dict, where: str, feature: str) -> None:
    with pytest.raises(ModelError, match=rf"^{where}: {feature}"):
        core.prepare(_model(name, args), "vaq")


def test_cli_refuses_an_unsupported_layer_in_one_line(capsys) -> None:
    code = main(["analyze", "resnet18", "--random-init", "--model-args", json.dumps({**RESNET[1], "act_layer": "prelu"}), "--no-plots"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: act1: layer type PReLU"), err


def test_measures_by_hand() -> None:
    def act(name: str, block: str | None, rng: float, kurt: float, **extra) -> dict:
        return {"name": name, "type": name.rsplit(".", 1)[-1], "block": block, "range": rng, "kurtosis": kurt,
                "outlier_ratio": 0.01, "per_channel": {"range_ratio": 2.0, "range_cv": 0.1}, **extra}

    report = {
        "model": "m", "architecture": "VisionTransformer", "blocks": ["b0", "b1"],
        "weights": [{**act("stem", None, 100.0, 9.0), "params": 1}, {**act("b0.fc1", "b0", 1.0, 1.0), "params": 10},
                    {**act("b1.fc1", "b1", 4.0, 3.0), "params": 30}],
        "activations": [act("b0.fc1.a_quant", "b0", 2.0, 0.0), act("b1.fc1.a_quant", "b1", 8.0, 4.0),
                        act("b1.attn.softmax_quant", "b1", 1.0, 50.0, per_head={"range_ratio": 9.0}),
                        act("b1.attn.v_quant", "b1", 1.0, 50.0, per_head={"range_ratio": 3.0})],
        "sensitivity": {"method": "fast", "fp": {"top1": 90.0}, "modules": [
            {"name": n, "block": b, "weight_bits": w, "kl": kl} for n, b, w, kl in
            [("b0.fc1", "b0", 2, 0.5), ("b1.fc1", "b1", 2, 0.1), ("b1.attn.softmax_quant", "b1", None, 9.0), ("stem", None, 8, 7.0)]]},
        "oscillation": {"run": "r", "tracked": True, "modules": [
            {"name": "stem", "params": 1, "oscillating_share": 1.0, "boundary_share": 1.0},
            {"name": "b0.fc1", "params": 10, "oscillating_share": 0.4, "boundary_share": 0.2},
            {"name": "b1.fc1", "params": 30, "oscillating_share": 0.0, "boundary_share": 0.2}]},
    }
    row = model_measures("vit", report)
    # block weights have ranges 1 and 4: max/min 4, CV = std 1.5 / mean 2.5; the stem (edge layer) is left out
    assert row["layers"] == 2 and row["w_range_ratio_modules"] == pytest.approx(4.0) and row["w_range_cv_modules"] == pytest.approx(0.6)
    assert row["w_kurtosis"] == pytest.approx(2.0) and row["w_kurtosis_max"] == 3.0
    # layer inputs are fc1's (2 and 8); Q/K/V and softmax operands are not; heads: v_quant only (softmax left out)
    assert row["a_range_ratio_modules"] == pytest.approx(4.0) and row["a_kurtosis_max"] == 4.0
    assert row["a_range_ratio_heads"] == pytest.approx(3.0)
    # KL over block layers only: 0.5 and 0.1 (the softmax unit and the stem are not layers inside blocks)
    assert (row["kl_min"], row["kl_max"], row["kl_median"]) == pytest.approx((0.1, 0.5, 0.3)) and row["kl_max_min"] == pytest.approx(5.0)
    # oscillation weighted by parameters over block layers: (10 x 0.4 + 30 x 0) / 40
    assert row["oscillating_share"] == pytest.approx(0.1) and row["boundary_share"] == pytest.approx(0.2)


def _run_folder(folder, name: str, args: dict, share: float) -> None:
    """A `quantize` run folder of `name` whose block layers have `share` of their weights oscillating."""
    torch.manual_seed(0)
    recipe = load_recipe("vaq", set_fields={"quant.bits": 2})
    model = core.prepare(_model(name, args), recipe)
    core.calibrate(model, [torch.randn(4, 3, 32, 32)])
    tracker = OscillationTracker(model)
    for state in tracker.state.values():
        freq = state["frequency"].view(-1)
        freq[: int(share * freq.numel())] = 0.01
    write_run_folder(folder, model, recipe, architecture=name, model_args=args, data_config={"input_size": [3, 32, 32]},
                     oscillation=tracker.state_dict())


def test_compare_cli_writes_table_json_csv_plots_and_html(tmp_path) -> None:
    vit, resnet = TINY_VIT[0], RESNET[0]
    _run_folder(tmp_path / "run_vit", vit, TINY_VIT[1], 0.5)
    _run_folder(tmp_path / "run_resnet", resnet, RESNET[1], 0.25)
    out = tmp_path / "cmp"
    argv = ["analyze", vit, resnet, "--compare", "--random-init", "--model-args", json.dumps(TINY_VIT[1]),
            "--model-args", json.dumps(RESNET[1]), "--batches", "1", "--batch-size", "8", "--what", "weights",
            "--run", f"{vit}={tmp_path / 'run_vit'}", "--run", f"{resnet}={tmp_path / 'run_resnet'}", "--out", str(out)]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert "W range max/min across modules" in res.stdout and vit in res.stdout and resnet in res.stdout
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["schema"] == "vitqtool.compare/1" and doc["bits"] == 2 and doc["images"] == 8
    rows = {m["label"]: m for m in doc["models"]}
    assert list(rows) == [vit, resnet]
    assert rows[vit]["a_range_ratio_heads"] is not None and rows[resnet]["a_range_ratio_heads"] is None
    assert rows[vit]["oscillating_share"] == pytest.approx(0.5, abs=0.01) and rows[resnet]["oscillating_share"] == pytest.approx(0.25, abs=0.01)
    with (out / "comparison.csv").open() as f:
        assert [r["label"] for r in csv.DictReader(f)] == [vit, resnet]
    plots = {"compare_sensitivity.png", "compare_ranges.png", "compare_channels.png", "compare_outliers.png", "compare_oscillation.png"}
    assert set(doc["plots"]) == plots
    for name, legends in doc["plots"].items():  # legend texts read back from each figure: every model on every axis
        assert (out / name).stat().st_size > 0
        assert legends and all(labels == [vit, resnet] for labels in legends), (name, legends)
    page = (out / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in plots) and vit in page and resnet in page
    for folder in (m["report"] for m in doc["models"]):
        assert (out / folder / "analysis.json").is_file()

    res = CliRunner().invoke(app, [*argv[:-2], "--no-plots", "--json", "--out", str(tmp_path / "cmp2")])
    assert res.exit_code == 0, res.output
    assert [m["label"] for m in json.loads(res.stdout)["models"]] == [vit, resnet]


@pytest.mark.parametrize("argv,code,message", [
    (["analyze", "resnet18", "vit_tiny_patch16_224", "--random-init"], 2, "--compare"),
    (["analyze", "resnet18", "--compare", "--random-init"], 1, "at least two models"),
    (["analyze", "resnet18", "resnet50", "--compare", "--random-init", "--run", "runs/x"], 2, "MODEL=RUN_FOLDER"),
    (["analyze", "resnet18", "resnet50", "--compare", "--random-init", "--keep", "2"], 2, "are per"),
])
def test_compare_flag_errors(capsys, argv: list[str], code: int, message: str) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_quantize_and_export_a_resnet(tmp_path) -> None:
    name, args = RESNET
    info = commands.quantize(name, bits=2, recipe="lsq", out=tmp_path / "run", random_init=True, model_args=args, epochs=1,
                             batch_size=32, limit_train=64, limit_val=32)
    assert info.status == "done" and info.epochs_done == 1
    result = commands.export(tmp_path / "run", tmp_path / "r.safetensors", verify=True)
    assert result.verify["max_abs_diff"] <= 1e-5 and result.quantized_layers == 14
    reloaded = commands.load(tmp_path / "r.safetensors")
    assert isinstance(reloaded.layer1[0].conv1, quant.QConv2d) and isinstance(reloaded.layer1[0].bn1, nn.BatchNorm2d)
