"""Post-training quantization beyond calibration (docs/ptq.md): `ln-channel` reparameterization is exact in FP for
ViT, DeiT and Swin; block-wise reconstruction lowers every block's output error against FP and ends as plain integer
codes; runs record it, resume it exactly, export it, and a `ptq-recon` export runs in onnxruntime with integer kernels."""

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_DEIT, TINY_SWIN, TINY_VIT
from vitqtool import commands, core, quant
from vitqtool.cli import main
from vitqtool.core import ptq
from vitqtool.core.ptq import reconstruct, reparameterize
from vitqtool.core.runs import CKPT_DIR, MODEL_FILE, RECON_FILE, read_index
from vitqtool.errors import RecipeError
from vitqtool.export.reader import read_header
from vitqtool.families import get_family
from vitqtool.recipe import load_recipe

FAMILIES = {"vit": TINY_VIT, "deit": TINY_DEIT, "swin": TINY_SWIN}


def _stock(name: str, args: dict, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny timm model whose norms have uneven per-channel gains and offsets (as trained ViTs have), in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**args, **extra}).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) * 4 + 0.1)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen))
    return model


# ------------------------------------------------------------------------------------------ reparameterization


@pytest.mark.parametrize("family,recipe", [("vit", "ptq-recon"), ("deit", "ptq-recon"), ("swin", "ptq-recon"), ("deit", "lsq")],
                         ids=["vit", "deit", "swin", "deit-fused-qkv"])
def test_ln_channel_reparameterization_keeps_fp_logits_and_equalises_channel_ranges(family, recipe):
    name, args = FAMILIES[family]
    stock = _stock(name, args)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = stock(x)
    model = core.prepare(stock, recipe)
    pairs = get_family(model).norm_pairs(model)
    norms_before = {p.norm: model.get_submodule(p.norm).weight.detach().clone() for p in pairs}
    summary = reparameterize(model, [x[:4], x[4:]])
    assert summary["pairs"] == len(pairs) == 2 * sum(1 for m in model.modules() if isinstance(m, quant.QuantAttention))
    assert summary["range_spread_before"] > 1.5  # the uneven norms gave uneven channels ...
    with torch.no_grad(), quant.quantizers_disabled(model):
        logits = model(x)
    assert (logits - reference).abs().max() < 1e-5  # ... and the fold changed no logit
    assert all(not torch.allclose(model.get_submodule(n).weight, w) for n, w in norms_before.items())
    ranges = quant.channel_ranges(model, {p.quantizer: model.get_submodule(p.quantizer) for p in pairs}, [x[:4], x[4:]])
    for low, high in ranges.values():  # after: every channel spans the same centred range (up to the dead-channel floor)
        half = (high - low) / 2
        assert float(half.max() / half.min()) < 1.01
        assert float(((high + low) / 2).abs().max()) < 1e-3 * float(half.mean())


def test_swin_block_with_padded_windows_folds_scale_only_and_a_shift_there_would_break_it():
    stock = _stock(TINY_SWIN[0], TINY_SWIN[1], img_size=24, embed_dim=32, depths=(1, 1), num_heads=(1, 2))
    x = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = stock(x)
    model = core.prepare(stock, "ptq-recon")
    pairs = get_family(model).norm_pairs(model)
    assert [p.shift for p in pairs] == [True, True, False, True]  # stage 1: 6x6 tokens in 4x4 windows are padded
    broken = copy.deepcopy(model)
    assert reparameterize(model, [x])["shifted"] == 3
    with torch.no_grad(), quant.quantizers_disabled(model):
        assert (model(x) - reference).abs().max() < 1e-5
    family = get_family(broken)
    forced = [p.__class__(p.norm, p.quantizer, p.linears, True) for p in pairs]
    type(family).norm_pairs = lambda self, m: forced  # the padded block with a shift anyway
    try:
        reparameterize(broken, [x])
    finally:
        del type(family).norm_pairs
    with torch.no_grad(), quant.quantizers_disabled(broken):
        assert (broken(x) - reference).abs().max() > 1e-3


def test_reparameterization_lowers_the_quantization_error_of_uneven_channels():
    stock = _stock(*TINY_DEIT)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = stock(x)
    errors = {}
    for reparam in ("none", "ln-channel"):
        model = core.prepare(stock, load_recipe("ptq", set_fields={"quant.bits": 4, "calibration.reparam": reparam}))
        if reparam != "none":
            reparameterize(model, [x])
        core.calibrate(model, [x])
        with torch.no_grad():
            errors[reparam] = float((model(x) - reference).pow(2).mean())
    assert errors["ln-channel"] < 0.8 * errors["none"], errors  # measured: 0.073 vs 0.105


def test_models_without_norm_pairs_are_left_alone():
    from tests.test_cnn import RESNET

    model = core.prepare(timm.create_model(RESNET[0], **RESNET[1]).eval(), "ptq")
    before = copy.deepcopy(model.state_dict())
    assert reparameterize(model, [torch.randn(2, 3, 32, 32)])["pairs"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ reconstruction


def _calibrated(bits: int = 3, seed: int = 0):
    stock = _stock(*TINY_VIT, seed=seed)
    gen = torch.Generator().manual_seed(10 + seed)
    calib, held_out = torch.randn(96, 3, 32, 32, generator=gen), torch.randn(64, 3, 32, 32, generator=gen)
    model = core.prepare(stock, load_recipe("ptq-recon", set_fields={"quant.bits": bits}))
    reparameterize(model, [calib])
    core.calibrate(model, [calib])
    return stock, model, calib, held_out


def _block_errors(model, stock, images) -> list[float]:
    """Each block's output MSE against the FP block, the quantized block fed the quantized model's own inputs."""
    family = get_family(model)
    with torch.no_grad():
        xq, xf = family.block_inputs(model, images), family.block_inputs(stock, images)
        return [float((model.get_submodule(n)(xq[i]) - xf[i + 1]).pow(2).mean()) for i, n in enumerate(family.block_names(model))]


@pytest.fixture(scope="module")
def reconstructed():
    """A calibrated 3-bit ViT reconstructed for 300 steps (read only), with its block errors and nearest codes before."""
    stock, model, calib, held_out = _calibrated(bits=3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, quant.QUANT_LAYERS) and n.startswith("blocks.")}
    nearest = {n: m.w_quant.codes(m.weight) for n, m in layers.items()}
    before = _block_errors(model, stock, held_out)
    settings = load_recipe("ptq-recon", set_fields={"reconstruct.iters": 300, "reconstruct.batch_size": 16}).reconstruct
    records = reconstruct(model, stock, [calib[:48], calib[48:]], 96, settings, seed=0)
    return {"records": records, "before": before, "after": _block_errors(model, stock, held_out), "layers": layers,
            "nearest": nearest}


def test_reconstruction_lowers_every_blocks_output_error_on_held_out_images(reconstructed):
    records, before, after = reconstructed["records"], reconstructed["before"], reconstructed["after"]
    assert [r["name"] for r in records] == ["blocks.0", "blocks.1"]
    for r in records:  # on the calibration images (the run records these) ...
        assert r["mse_after"] < 0.85 * r["mse_before"], r
    for b, a in zip(before, after):  # ... and on images it never saw (measured at 400 steps: x0.69 and x0.59)
        assert a < 0.85 * b, (before, after)


def test_learned_rounding_ends_as_integer_codes_times_step_and_differs_from_nearest(reconstructed):
    changed = 0
    for n, m in reconstructed["layers"].items():
        codes = m.w_quant.codes(m.weight)
        assert torch.equal(m.w_quant.dequantize(codes, m.weight), m.weight.detach()), n  # the weight IS codes x step
        assert int(codes.min()) >= m.w_quant.spec.qn and int(codes.max()) <= m.w_quant.spec.qp
        changed += int((codes != reconstructed["nearest"][n]).sum())
    assert changed > 0
    assert all(0 < r["changed_codes"] < 0.5 for r in reconstructed["records"])


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_reconstruction_is_a_function_of_the_seed(drop):
    states = []
    for _ in range(2):
        stock, model, calib, _ = _calibrated(bits=2)
        settings = load_recipe("ptq-recon", set_fields={"reconstruct.iters": 30, "reconstruct.drop": drop}).reconstruct
        reconstruct(model, stock, [calib], 96, settings, seed=5)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_reconstruction_caches_go_to_disk_beyond_the_memory_limit(monkeypatch):
    stock, model, calib, _ = _calibrated(bits=4)
    in_memory = copy.deepcopy(model)
    settings = load_recipe("ptq-recon", set_fields={"reconstruct.iters": 10}).reconstruct
    folders = []
    original = ptq.activation_cache

    def spy(n, shape, dtype, folder, name):
        folders.append(folder)
        return original(n, shape, dtype, folder, name)

    monkeypatch.setattr(ptq, "activation_cache", spy)
    reconstruct(in_memory, stock, [calib], 96, settings, seed=0)
    assert folders and all(f is None for f in folders)
    folders.clear()
    reconstruct(model, stock, [calib], 96, settings, seed=0, memory_limit=1)
    assert folders and all(f is not None and f.name.startswith("vitq-recon-") and not f.exists() for f in folders)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), in_memory.state_dict().values()))


def test_too_few_calibration_images_for_reconstruction_is_an_error():
    stock, model, calib, _ = _calibrated(bits=4)
    with pytest.raises(ValueError, match="needs 200 calibration images, the batches gave 96"):
        reconstruct(model, stock, [calib], 200, load_recipe("ptq-recon").reconstruct)


@pytest.mark.parametrize("text,match", [
    ('[calibration]\nreparam = "rep-qvit"\n', "calibration.reparam must be one of none, ln-channel"),
    ("[reconstruct]\ndrop = 1.0\n", r"reconstruct.drop must be in \[0, 1\)"),
    ("[reconstruct]\niters = 0\n", "reconstruct.iters must be an integer >= 1"),
    ("[reconstruct]\nblock = true\n", r"unknown key\(s\) in \[reconstruct\]: block"),
])
def test_bad_ptq_recipe_fields_are_named(tmp_path, text, match):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


# ------------------------------------------------------------------------------------------ runs, resume, export

RUN = dict(random_init=True, model_args={**TINY_DEIT[1], "patch_size": 8, "depth": 2}, limit_train=48, limit_val=32, bits=4)
RECON = dict(RUN, recipe="ptq-recon", recon_iters=8, recon_images=40)


def test_ptq_calibrates_on_a_set_smaller_than_one_batch(tmp_path, capsys):
    code = main(["quantize", TINY_DEIT[0], "--random-init", "--model-args", json.dumps(RUN["model_args"]), "--recipe", "ptq",
                 "--limit-train", "20", "--limit-val", "16", "--out", str(tmp_path / "run"), "--json"])
    assert code in (0, None)
    assert json.loads(capsys.readouterr().out)["status"] == "done"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["calibration"] == {"images": 20}
    with pytest.raises(Exception, match="fewer than one global batch"):  # training still needs one
        commands.quantize(TINY_DEIT[0], recipe="lsq", out=tmp_path / "qat", **{**RUN, "limit_train": 20}, epochs=1)


def test_cli_reconstruction_flags_and_progress_per_block(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITQ_PROGRESS_SECONDS", "0")  # stderr is not a terminal here: a plain line per update
    code = main(["quantize", TINY_DEIT[0], "--random-init", "--model-args", json.dumps(RUN["model_args"]), "--recipe", "ptq-recon",
                 "--limit-train", "24", "--limit-val", "16", "--recon-images", "16", "--recon-iters", "3",
                 "--out", str(tmp_path / "run")])
    assert code in (0, None)
    err = capsys.readouterr().err
    assert "reconstruct blocks.0: 3/3" in err and "reconstruct blocks.1: 3/3" in err
    recon = json.loads((tmp_path / "run" / "run.json").read_text())["calibration"]["reconstruct"]
    assert (recon["images"], recon["iters"]) == (16, 3)


@pytest.fixture(scope="module")
def recon_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recon") / "run"
    commands.quantize(TINY_DEIT[0], out=out, **RECON)
    return out


def test_qat_starts_from_reparameterized_and_reconstructed_steps(tmp_path):
    extra = tmp_path / "init.toml"
    extra.write_text('[calibration]\nreparam = "ln-channel"\n\n[reconstruct]\nblocks = true\niters = 5\nimages = 24\n')
    info = commands.quantize(TINY_DEIT[0], out=tmp_path / "run", recipe="lsq", overrides=[extra], epochs=1, batch_size=16, **RUN)
    assert info.status == "done" and info.epochs_done == 1 and info.step == 3
    assert info.calibration["reparam"]["pairs"] == 4 and len(info.calibration["reconstruct"]["blocks"]) == 2


def test_evaluate_quantizes_with_a_reconstructing_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(load_recipe("ptq-recon", set_fields={"reconstruct.iters": 4, "reconstruct.images": 16}).to_toml())
    result = commands.evaluate(TINY_DEIT[0], random_init=True, model_args=RUN["model_args"], recipe=str(recipe), bits=3,
                               limit=16, batch_size=8)
    done = result["quantized"]["calibration"]
    assert result["quantized"]["bits"] == 3 and done["images"] == 4 * 8 and done["reparam"]["pairs"] == 4
    assert done["reconstruct"]["images"] == 16 and [b["name"] for b in done["reconstruct"]["blocks"]] == ["blocks.0", "blocks.1"]


def test_ptq_recon_run_records_what_it_did(recon_run):
    info = json.loads((recon_run / "run.json").read_text())
    cal = info["calibration"]
    assert info["status"] == "done" and info["recipe"] == "ptq-recon"
    assert cal["reparam"]["pairs"] == 4 and cal["reparam"]["method"] == "ln-channel"
    assert cal["reconstruct"]["images"] == 40 and cal["reconstruct"]["iters"] == 8
    assert [b["name"] for b in cal["reconstruct"]["blocks"]] == ["blocks.0", "blocks.1"]
    assert not (recon_run / RECON_FILE).exists()  # the progress file is gone once the run is done


def test_reconstruction_resumes_after_an_interrupted_block_exactly(recon_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = quant.reconstruct_block
    calls = [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(quant, "reconstruct_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        commands.quantize(TINY_DEIT[0], out=out, **RECON)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert (out / RECON_FILE).is_file() and not read_index(out)
    with pytest.raises(Exception, match="pass --resume"):
        commands.quantize(TINY_DEIT[0], out=out, **RECON)
    monkeypatch.setattr(quant, "reconstruct_block", original)
    info = commands.quantize(TINY_DEIT[0], out=out, resume=True, **RECON)
    assert info.status == "done" and [b["name"] for b in info.calibration["reconstruct"]["blocks"]] == ["blocks.0", "blocks.1"]
    resumed = load_file(str(out / CKPT_DIR / read_index(out)["last"] / MODEL_FILE))
    reference = load_file(str(recon_run / CKPT_DIR / read_index(recon_run)["last"] / MODEL_FILE))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)


def test_ptq_recon_export_verifies_bit_exact_and_runs_in_onnxruntime_with_integer_kernels(recon_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from tests.onnx_checks import dequantize_only_accumulators, expected_integer_kernels
    from vitqtool.export.onnx_export import integer_matmuls, optimized_op_counts, verify_onnx

    exported = commands.export(recon_run, tmp_path / "m.safetensors", verify=True)
    assert exported.verify["max_abs_diff"] == 0.0
    loaded = commands.load(tmp_path / "m.safetensors")
    header = json.loads(read_header(tmp_path / "m.safetensors")[1]["vitqtool"])
    assert header["recipe"]["reconstruct"]["blocks"] and header["recipe"]["calibration"]["reparam"] == "ln-channel"
    assert [b["name"] for b in header["metrics"]["calibration"]["reconstruct"]["blocks"]] == ["blocks.0", "blocks.1"]
    onnx_path = tmp_path / "m.onnx"
    commands.export(recon_run, onnx_path, format="onnx")
    counts = optimized_op_counts(onnx_path)
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert integer_matmuls(counts) == expected_integer_kernels(loaded, images[:2]) and dequantize_only_accumulators(onnx_path)
    checked = verify_onnx(loaded, onnx_path, [(images, torch.zeros(32, dtype=torch.long))], threads=1)
    assert checked["max_abs_diff"] < 0.05
