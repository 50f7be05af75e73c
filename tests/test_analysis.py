"""`analyze`: statistics against direct computations, sensitivity ranking, fast == naive, the one-pass estimate against
the exact KL (by hand and by rank), the method choice, progress in every phase, overrides round trip, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from vitqtool import core, quant
from vitqtool.analysis.allocation import allocate, overrides_toml
from vitqtool.analysis.estimate import probe_vectors, taylor_sensitivity
from vitqtool.analysis.sensitivity import (
    SensitivityProbe,
    build_units,
    choose_method,
    group_units,
    logit_metrics,
    predicted_seconds,
    spearman,
    top_overlap,
)
from vitqtool.analysis.stats import (
    RunningStats,
    boundary_share,
    channel_groups,
    head_groups,
    kurtosis,
    outlier_ratio,
    range_spread,
    sqnr_db,
)
from vitqtool.analysis.variation import ActivationRecorder, module_type
from vitqtool.errors import RecipeError
from vitqtool.families import get_family
from vitqtool.quant import LSQQuantizer, QuantAttention, QuantSpec
from vitqtool.recipe import load_recipe

VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
SWIN_ARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 32, "depths": (1, 1), "num_heads": (1, 2), "num_classes": 10}
RESNET_ARGS = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8, "num_classes": 10, "zero_init_last": False}


def _np_excess_kurtosis(x: np.ndarray) -> float:
    d = x - x.mean()
    return float((d**4).mean() / (d**2).mean() ** 2 - 3)


# ----------------------------------------------------------------------------------- statistics


def test_kurtosis_of_hand_made_tensors_and_streaming() -> None:
    # +-1 in equal numbers: m2 = 1, m4 = 1, excess kurtosis = 1 - 3 = -2
    assert kurtosis(torch.tensor([-1.0, 1.0] * 50)) == pytest.approx(-2.0)
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.Laplace(0.5, 2.0).sample((4000,)) + 0 * torch.rand(4000, generator=g)
    direct = _np_excess_kurtosis(x.double().numpy())
    assert kurtosis(x) == pytest.approx(direct, rel=1e-9)
    st = RunningStats()
    for chunk in x.split(1000):  # streamed in four batches, shifted moments
        st.update(chunk)
    assert st.result()["kurtosis"] == pytest.approx(direct, rel=1e-9)
    assert st.result()["std"] == pytest.approx(float(x.double().std(correction=0)), rel=1e-9)


def test_outlier_ratio_counts_values_beyond_three_std() -> None:
    # 98 zeros and +-100: mean 0, std = sqrt(20000 / 100) = 14.14, 3 std = 42.4 -> 2 of 100 are outliers
    x = torch.cat([torch.zeros(98), torch.tensor([100.0, -100.0])])
    assert outlier_ratio(x) == pytest.approx(0.02)
    st = RunningStats()
    for chunk in x.split(30):
        st.update(chunk)
    for chunk in x.split(30):
        st.update_tails(chunk)
    res = st.result()
    assert res["outlier_ratio"] == pytest.approx(0.02)
    assert sum(res["histogram"]["counts"]) == 100 and res["histogram"]["counts"][0] == 1


def test_per_head_spread_of_a_hand_made_activation() -> None:
    # [B, N, heads * head_dim] with head 0 in [-1, 1] and head 1 in [-4, 4]: ranges 2 and 8
    x = torch.zeros(2, 3, 8)
    x[0, 0, :4], x[1, 2, :4] = 1.0, -1.0
    x[0, 1, 4:], x[1, 0, 4:] = -4.0, 4.0
    st = RunningStats({"per_head": head_groups(4), "per_channel": channel_groups(-1)})
    st.update(x)
    heads = st.result()["per_head"]
    assert heads["ranges"] == [2.0, 8.0]
    assert heads["range_ratio"] == pytest.approx(4.0)
    assert heads["range_cv"] == pytest.approx(np.std([2.0, 8.0]) / 5.0)  # 3 / 5
    assert range_spread(torch.tensor([2.0, 8.0])) == {k: heads[k] for k in ("n", "min_range", "max_range", "range_ratio", "range_cv")}


def test_sqnr_and_mse_at_a_known_step() -> None:
    # 8-bit step 0.5: 1.0 -> 1.0, 0.3 -> 0.5; signal 1.09, noise 0.04 -> 10 log10(27.25) dB
    q = LSQQuantizer(QuantSpec(8), "act")
    q.init_from_statistic(0.5 * math.sqrt(127) / 2)
    assert float(q.step.detach()) == pytest.approx(0.5)
    x = torch.tensor([1.0, 0.3])
    x_hat = q(x)
    assert x_hat.tolist() == pytest.approx([1.0, 0.5])
    assert sqnr_db(x, x_hat) == pytest.approx(10 * math.log10(1.09 / 0.04))
    st = RunningStats()
    st.update(x, x_hat)
    assert st.result()["mse"] == pytest.approx(0.02)
    assert st.result()["sqnr_db"] == pytest.approx(10 * math.log10(1.09 / 0.04))


def test_boundary_share_counts_weights_next_to_a_rounding_boundary() -> None:
    q = LSQQuantizer(QuantSpec(4), "weight")
    q.step.data.fill_(0.1)
    # W / s: 0.52, -1.47 (within 0.05 of x.5), 1.0, 2.3, 0.44 (not): 2 of 5
    w = torch.tensor([[0.052, -0.147, 0.1, 0.23, 0.044]])
    assert boundary_share(q, w) == pytest.approx(0.4)


def test_recorder_groups_attention_tensors_by_head() -> None:
    torch.manual_seed(0)
    qkv, proj = nn.Linear(8, 24), nn.Linear(8, 8)
    attn = QuantAttention(2, qkv, proj, scale=0.5, bits=4)
    x = torch.randn(3, 5, 8)
    rec = ActivationRecorder(attn)
    with rec.first_pass(), quant.quantizers_disabled(attn), torch.no_grad():
        attn(x)
    rows = {r["name"]: r for r in rec.rows([])}
    v = qkv(x)[..., 16:].detach().reshape(-1, 2, 4)  # V = last third of the fused projection, 2 heads of 4
    expected = (v.amax(dim=(0, 2)) - v.amin(dim=(0, 2))).tolist()
    assert rows["v_quant"]["per_head"]["ranges"] == pytest.approx(expected, rel=1e-5)
    assert rows["softmax_quant"]["per_head"]["n"] == 2 and rows["softmax_quant"]["max"] <= 1.0
    assert "per_head" not in rows["input_quant"]
    assert module_type("blocks.3.mlp.fc2.a_quant", "blocks.3") == "fc2.a_quant"
    assert module_type("layers.0.blocks.1.attn.core.v", "layers.0.blocks.1") == "v"


# ----------------------------------------------------------------------------------- models


def _tiny(name: str, args: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **args).eval()
    q = core.prepare(model, "vaq", bits=2)
    core.calibrate(q, [torch.randn(8, 3, 32, 32)])
    return q


@pytest.mark.parametrize("name,args", [("vit_tiny_patch16_224", VIT_ARGS), ("swin_tiny_patch4_window7_224", SWIN_ARGS),
                                       ("deit_tiny_distilled_patch16_224", {**VIT_ARGS, "embed_dim": 48, "num_heads": 2})])
def test_fast_and_naive_sensitivity_agree(name: str, args: dict) -> None:
    model = _tiny(name, args)
    adapter = get_family(model)
    images = torch.randn(4, 3, 32, 32)
    with quant.quantizers_disabled(model), torch.no_grad():
        hidden = adapter.block_inputs(model, images)
        assert torch.allclose(adapter.run_from(model, 0, hidden[0]), model(images), atol=1e-5)
        assert torch.allclose(adapter.run_from(model, len(hidden) - 1, hidden[-1]), model(images), atol=1e-5)
    batches = [(images, torch.arange(4))]
    units = build_units(model, "both", adapter.block_names(model))
    units += group_units(units, "block")
    fast, naive = SensitivityProbe(model, adapter, batches, "fast"), SensitivityProbe(model, adapter, batches, "naive")
    starts = {fast.start_of(u) for u in units}
    assert max(starts) > 0 and min(starts) == -1  # some units start inside the model, the patch embedding from the images
    kl_fast = [fast.measure(u)["kl"] for u in units]
    kl_naive = [naive.measure(u)["kl"] for u in units]
    assert kl_fast == pytest.approx(kl_naive, rel=1e-4, abs=1e-9)
    assert max(kl_fast) > 0


PLANTED = {"vit_tiny_patch16_224": (VIT_ARGS, "blocks.0.mlp.fc1"), "swin_tiny_patch4_window7_224": (SWIN_ARGS, "layers.0.blocks.0.mlp.fc1")}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_exact_and_estimated_sensitivity_find_a_module_with_weight_outliers(name: str) -> None:
    args, planted = PLANTED[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **args).eval()
    with torch.no_grad():
        fc1 = model.get_submodule(planted).weight
        fc1.view(-1)[::97] *= 60.0  # a few huge outliers: the MSE step either clips them or crushes the rest
    q = core.prepare(model, "vaq", bits=2)
    core.calibrate(q, [torch.randn(8, 3, 32, 32)])
    adapter = get_family(q)
    units = build_units(q, "weights", adapter.block_names(q))
    batches = [(torch.randn(8, 3, 32, 32), torch.arange(8))]
    probe = SensitivityProbe(q, adapter, batches, "fast")
    exact = [probe.measure(u)["kl"] for u in units]
    estimate, _ = taylor_sensitivity(q, units, batches)
    names = [u.name for u in units]
    assert names[exact.index(max(exact))] == planted
    assert planted in [names[i] for i in sorted(range(len(units)), key=lambda i: -estimate[i])[:3]]
    assert spearman(exact, estimate) >= 0.8


@pytest.mark.parametrize("name,args,floor", [("vit_tiny_patch16_224", VIT_ARGS, 0.8), ("swin_tiny_patch4_window7_224", SWIN_ARGS, 0.8),
                                             ("resnet18", RESNET_ARGS, 0.8)])
def test_estimate_ranks_units_and_groups_like_the_exact_kl(name: str, args: dict, floor: float) -> None:
    model = _tiny(name, args)
    adapter = get_family(model)
    units = build_units(model, "both", adapter.block_names(model))
    everything = units + group_units(units, "block") + group_units(units, "type")
    batches = [(torch.randn(16, 3, 32, 32), torch.arange(16) % 10) for _ in range(2)]
    probe = SensitivityProbe(model, adapter, batches, "fast")
    exact = [probe.measure(u)["kl"] for u in everything]
    estimate, fp_logits = taylor_sensitivity(model, everything, batches)
    assert spearman(exact[:len(units)], estimate[:len(units)]) >= floor
    assert spearman(exact, estimate) >= floor
    assert top_overlap(exact, estimate, 5) >= 3
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fp_logits, probe.fp_logits))  # the estimate's pass is the FP model
    assert [q.enabled for _, q in quant.iter_quantizers(model)] == [True] * len(list(quant.iter_quantizers(model)))


class _Head(nn.Module):
    """A quantized linear classifier: its logits are linear in the weight perturbation, so the estimate has no linearisation error."""

    def __init__(self, bits: int, classes: int) -> None:
        super().__init__()
        self.fc = quant.QLinear.from_float(nn.Linear(6, classes), QuantSpec(bits), None)
        self.fc.w_quant.init_from_weight(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _fisher_kl(head: _Head, x: torch.Tensor) -> float:
    """1/N sum_n 1/2 dz^T (diag(p) - p p^T) dz with dz = x (Q(W) - W)^T, by hand."""
    with torch.no_grad():
        with quant.quantizers_disabled(head):
            p = torch.softmax(head(x).double(), -1)
        dz = (x @ (head.fc.w_quant(head.fc.weight) - head.fc.weight).T).double()
        return float(0.5 * ((dz * dz * p).sum(1) - (dz * p).sum(1) ** 2).mean())


def test_estimate_is_the_fisher_quadratic_form_and_the_kl_for_small_perturbations() -> None:
    torch.manual_seed(0)
    head = _Head(bits=2, classes=4)
    x = torch.randn(64, 6)
    units = build_units(head, "weights", [])
    # 4 classes <= 4 probes: the basis vectors give F exactly
    kl, _ = taylor_sensitivity(head, units, [(x, torch.zeros(64, dtype=torch.long))], probes=4, micro_batch=16)
    assert kl[0] == pytest.approx(_fisher_kl(head, x), rel=1e-6)
    # 3 Rademacher probes per image are unbiased: within a few percent over 4,000 images
    many = torch.randn(4000, 6)
    kl, _ = taylor_sensitivity(head, units, [(many, torch.zeros(4000, dtype=torch.long))], probes=3, micro_batch=1000)
    assert kl[0] == pytest.approx(_fisher_kl(head, many), rel=0.05)
    # at 8 bits the second-order expansion is the exact KL(FP || Q) up to a few percent
    fine = _Head(bits=8, classes=4)
    kl, fp = taylor_sensitivity(fine, units, [(x, torch.zeros(64, dtype=torch.long))], probes=4)
    with torch.no_grad():
        exact = logit_metrics([fine(x)], fp, [], False)["kl"]
    assert exact > 0 and kl[0] == pytest.approx(exact, rel=0.05)


def test_probe_vectors_factor_the_fisher_matrix() -> None:
    p = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    gen = torch.Generator().manual_seed(0)
    basis, w = probe_vectors(p, 5, gen)
    assert w == 1.0 and torch.allclose(sum(v[:, :, None] * v[:, None, :] for v in basis), fisher)
    sampled, w = probe_vectors(p, 4, gen)
    assert w == 0.25 and len(sampled) == 4 and all(torch.allclose(v.sum(-1), torch.zeros(3, dtype=torch.float64)) for v in sampled)


def test_auto_method_by_predicted_cost() -> None:
    model = _tiny("vit_tiny_patch16_224", VIT_ARGS)
    blocks = get_family(model).block_names(model)
    units = build_units(model, "both", blocks)
    # fast: one FP pass plus each block unit's share of the blocks from its own; naive: a full pass per unit
    shares = sum((len(blocks) - blocks.index(u.block)) / len(blocks) if u.block else 1.0 for u in units)
    assert predicted_seconds(units, blocks, 2.0, "fast") == pytest.approx(2.0 * (1 + shares))
    assert predicted_seconds(units, blocks, 2.0, "naive") == pytest.approx(2.0 * (1 + len(units)))
    assert choose_method("auto", 60.0) == ("fast", None)
    method, note = choose_method("auto", 1800.0)
    assert method == "taylor" and "about 30 min" in note and "--method fast" in note
    assert choose_method("naive", 1e6) == ("naive", None)
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(0.8660254, rel=1e-6)  # ties share their mean rank
    assert top_overlap([4, 3, 2, 1], [1, 3, 4, 2], 2) == 1


# ----------------------------------------------------------------------------------- allocation


def test_budget_and_keep_allocation_by_hand() -> None:
    layers = [{"name": "a", "params": 100, "weight_bits": 2, "kl": 3.0}, {"name": "b", "params": 100, "weight_bits": 2, "kl": 2.0},
              {"name": "c", "params": 200, "weight_bits": 2, "kl": 1.0}]
    # budget 2.5 x 400 params = 1000 bits, 800 spent: a -> 4 costs 200 (fits), b -> 4 would exceed, c too; no 8-bit step fits
    alloc = allocate(layers, budget_bits=2.5)
    assert alloc["overrides"] == {"a": {"weight_bits": 4, "act_bits": 4}}
    assert alloc["average_bits"] == pytest.approx(2.5)
    # budget 4: a, b -> 4 (1200), c -> 4 (1600 = 4 x 400); then no room for 8
    assert {k: v["weight_bits"] for k, v in allocate(layers, budget_bits=4.0)["overrides"].items()} == {"a": 4, "b": 4, "c": 4}
    assert set(allocate(layers, keep=2)["overrides"]) == {"a", "b"}
    with pytest.raises(RecipeError, match="below"):
        allocate(layers, budget_bits=1.5)
    with pytest.raises(RecipeError, match="exactly one"):
        allocate(layers, budget_bits=3.0, keep=1)


def test_overrides_file_round_trips_into_prepare(tmp_path) -> None:
    alloc = allocate([{"name": "blocks.1.attn.v", "params": 4096, "weight_bits": 2, "kl": 2.0},
                      {"name": "blocks.0.mlp.fc2", "params": 16384, "weight_bits": 2, "kl": 1.0}], keep=2)
    path = tmp_path / "overrides.toml"
    path.write_text(overrides_toml(alloc, "test"))
    rec = load_recipe("vaq", override_files=[path], set_fields={"quant.bits": 2})
    torch.manual_seed(0)
    model = core.prepare(timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_ARGS), rec)
    assert model.blocks[1].attn.v.w_quant.spec.bits == 8
    assert model.blocks[0].mlp.fc2.w_quant.spec.bits == 8 and model.blocks[0].mlp.fc2.a_quant.spec.bits == 8
    assert model.blocks[0].attn.v.w_quant.spec.bits == 2 and model.blocks[1].mlp.fc2.w_quant.spec.bits == 2


# ----------------------------------------------------------------------------------- CLI


def test_cli_analyze_tiny_deit_and_swin(tmp_path) -> None:
    from typer.testing import CliRunner

    from vitqtool.cli import app

    runner = CliRunner()
    deit = json.dumps({"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10})
    out = tmp_path / "deit"
    _fake_run(tmp_path / "run")
    res = runner.invoke(app, ["analyze", "deit_tiny_patch16_224", "--random-init", "--model-args", deit, "--batches", "1",
                              "--batch-size", "8", "--what", "weights", "--budget-bits", "2.5", "--out", str(out), "--json",
                              "--run", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["bits"] == 2 and summary["images"] == 8 and len(summary["top_sensitive"]) == 10
    assert summary["method"] == "fast" and summary["method_note"] is None  # auto: a tiny model's exact pass takes seconds
    report = json.loads((out / "analysis.json").read_text())
    assert report["schema"] == "vitqtool.analysis/1" and len(report["sensitivity"]["modules"]) == 2 * 6 + 2
    assert report["sensitivity"]["method_requested"] == "auto" and 0 < report["sensitivity"]["predicted_exact_seconds"] < 120
    kls = [m["kl"] for m in report["sensitivity"]["modules"]]
    assert kls == sorted(kls, reverse=True)
    assert summary["oscillation"]["tracked"] and report["oscillation"]["modules"]
    for name in ("weights.csv", "activations.csv", "sensitivity.csv", "oscillation.csv", "index.html", "sensitivity.png",
                 "head_variation.png", "histograms.png", "oscillation.png"):
        assert (out / name).is_file(), name
    rec = load_recipe("vaq", override_files=[out / "overrides.toml"], set_fields={"quant.bits": 2})
    assert rec.quant.overrides == report["allocation"]["overrides"] and rec.quant.overrides

    swin = json.dumps({**SWIN_ARGS, "depths": [1, 1], "num_heads": [1, 2]})
    res = runner.invoke(app, ["analyze", "swin_tiny_patch4_window7_224", "--random-init", "--model-args", swin, "--batches", "1",
                              "--batch-size", "4", "--what", "acts", "--no-plots", "--out", str(tmp_path / "swin")])
    assert res.exit_code == 0, res.output
    assert "most sensitive modules" in res.stdout and "variation by block" in res.stdout
    report = json.loads((tmp_path / "swin" / "analysis.json").read_text())
    assert "layers.1.downsample" in report["blocks"]
    assert not (tmp_path / "swin" / "sensitivity.png").exists()


def _fake_run(folder) -> nn.Module:
    """A run folder as `quantize` writes it (run.json, resolved recipe, checkpoint with tracker state); returns its model."""
    from conftest import write_run_folder

    from vitqtool.quant import OscillationTracker

    model = _tiny("vit_tiny_patch16_224", VIT_ARGS)
    tracker = OscillationTracker(model)
    freq = tracker.state["blocks.0.mlp.fc1"]["frequency"]
    freq.view(-1)[: freq.numel() // 2] = 0.01  # half the weights above the 0.005 threshold
    write_run_folder(folder, model, load_recipe("vaq", set_fields={"quant.bits": 2}), architecture="vit_tiny_patch16_224",
                     model_args=VIT_ARGS, data_config={"input_size": [3, 32, 32]}, oscillation=tracker.state_dict())
    return model


def test_oscillation_rows_from_a_run_checkpoint(tmp_path) -> None:
    from vitqtool.analysis.oscillation import oscillation_rows
    from vitqtool.core import load_checkpoint, load_run_model

    model = _fake_run(tmp_path)
    osc = oscillation_rows(load_run_model(tmp_path, "last"), load_checkpoint(tmp_path, "last")[1], str(tmp_path))
    rows = {r["name"]: r for r in osc["modules"]}
    assert osc["tracked"] and rows["blocks.0.mlp.fc1"]["oscillating_share"] == pytest.approx(0.5)
    assert rows["blocks.0.mlp.fc1"]["flip_frequency"] == pytest.approx(0.005)
    assert rows["blocks.1.mlp.fc1"]["oscillating_share"] == 0.0
    layer = model.blocks[1].attn.v
    v = (layer.weight / layer.w_quant.step.clamp(min=1e-4)).clamp(-2, 1).detach()
    assert rows["blocks.1.attn.v"]["boundary_share"] == pytest.approx(float(((v - v.floor() - 0.5).abs() < 0.05).double().mean()))


PHASES = {"fast": ("load model", "load data", "calibration", "weight statistics", "statistics + FP reference", "statistics (tails)",
                   "sensitivity (fast)", "report and plots"),
          "taylor": ("load model", "load data", "calibration", "weight statistics", "statistics",
                     "sensitivity (taylor) + statistics (tails)", "report and plots")}


@pytest.mark.parametrize("method", sorted(PHASES))
def test_every_phase_of_analyze_prints_a_progress_line_without_a_terminal(method, capsys, monkeypatch, tmp_path) -> None:
    from vitqtool.cli import main

    monkeypatch.setenv("VITQ_PROGRESS_SECONDS", "0.01")
    deit = json.dumps({"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10})
    code = main(["analyze", "deit_tiny_patch16_224", "--random-init", "--model-args", deit, "--batches", "2", "--batch-size", "4",
                 "--method", method, "--out", str(tmp_path / method)])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.splitlines()
    for name in PHASES[method]:
        assert any(line.startswith(f"{name}: ") and "elapsed" in line for line in lines), (name, err)
    assert "\r" not in err and "━" not in err
    report = json.loads((tmp_path / method / "analysis.json").read_text())
    assert report["sensitivity"]["method"] == method and report["summary"]["method"] == method
