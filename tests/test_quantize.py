"""`quantize`: schedule and sampler maths, PTQ run folder, recipe resolution, KD modes, fault handling, CLI."""

import errno
import json
import math
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import interrupt_at_step
from vitqtool import core
from vitqtool.commands import quantize
from vitqtool.core import load_run_model, runs
from vitqtool.errors import DataError, RecipeError, RunError
from vitqtool.recipe import load_recipe
from vitqtool.train import checkpoint as ckpt
from vitqtool.train import loop
from vitqtool.train.run import resolve_kd_mode
from vitqtool.train.sampling import CALIBRATION, AugmentedDataset, ShardedBatchSampler, epoch_permutation
from vitqtool.train.schedule import adamw, lr_at

MODEL = "vit_tiny_patch16_224"
ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
SMALL = dict(random_init=True, model_args=ARGS, batch_size=8, limit_train=48, limit_val=50)


def test_lr_schedule_matches_warmup_and_cosine_formula():
    base, low, total, warm = 1e-3, 1e-5, 100, 10
    assert [lr_at(s, total, base, warm, low) for s in range(3)] == pytest.approx([base * (s + 1) / warm for s in range(3)])
    for s in (10, 35, 55, 99):
        t = (s - warm) / (total - warm)
        assert lr_at(s, total, base, warm, low) == pytest.approx(low + (base - low) * (1 + math.cos(math.pi * t)) / 2)
    assert lr_at(55, total, base, warm, low) == pytest.approx((base + low) / 2)


def test_sharded_batches_partition_the_single_process_batches():
    one = list(ShardedBatchSampler(50, 8, 1, 0, seed=3, epoch=2, num_batches=6))
    r0 = list(ShardedBatchSampler(50, 4, 2, 0, seed=3, epoch=2, num_batches=6))
    r1 = list(ShardedBatchSampler(50, 4, 2, 1, seed=3, epoch=2, num_batches=6))
    assert [a + b for a, b in zip(r0, r1)] == one
    assert sorted(i for batch in one for i in batch) == sorted(epoch_permutation(50, 3, 2)[:48].tolist())
    assert list(ShardedBatchSampler(50, 8, 1, 0, seed=3, epoch=2, num_batches=6, start=4)) == one[4:]
    assert one != list(ShardedBatchSampler(50, 8, 1, 0, seed=3, epoch=3, num_batches=6))


def test_augmented_crops_depend_only_on_seed_epoch_index():
    from vitqtool.data import ArrayImageDataset

    ds = ArrayImageDataset(torch.randint(0, 255, (4, 1, 20, 20), dtype=torch.uint8), torch.arange(4), list("abcd"), "mem", "train")
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    a, b = AugmentedDataset(ds, cfg, (0.2, 1.0), (0.75, 1.33), True, 7), AugmentedDataset(ds, cfg, (0.2, 1.0), (0.75, 1.33), True, 7)
    torch.manual_seed(123)  # the global RNG must not matter
    b.set_epoch(1)
    b.set_epoch(0)
    assert torch.equal(a[2][0], b[2][0]) and a[2][1] == 2
    a.set_epoch(1)
    assert not torch.equal(a[2][0], b[2][0])


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    state = ckpt.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_kd_mode_resolution():
    vaq, lsq = load_recipe("vaq"), load_recipe("lsq")
    assert resolve_kd_mode(vaq, None) == "online"
    assert resolve_kd_mode(vaq, Path("labels")) == "stored"
    assert resolve_kd_mode(lsq, None) == "none"
    with pytest.raises(RecipeError, match="--soft-labels"):
        resolve_kd_mode(load_recipe("vaq", set_fields={"kd.mode": "stored"}), None)
    with pytest.raises(RecipeError, match="kd.mode"):
        resolve_kd_mode(lsq, Path("labels"))
    with pytest.raises(RecipeError, match="hard_label_weight"):
        resolve_kd_mode(load_recipe("lsq", set_fields={"kd.hard_label_weight": 0.0}), None)


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ptq") / "run"
    quantize(MODEL, recipe="ptq", bits=3, calib_batches=2, out=out, **SMALL)
    return out


def test_ptq_run_folder_records_recipe_and_calibrated_model(ptq_run):
    from vitqtool.core.models import resolve_model
    from vitqtool.data import load_dataset, make_eval_loader, stratified_sample

    meta = json.loads((ptq_run / "run.json").read_text())
    assert meta["architecture"] == MODEL and meta["model_args"] == ARGS and meta["seed"] == 0 and meta["status"] == "done"
    assert set(meta["versions"]) >= {"torch", "timm", "vitqtool", "accelerate"}
    assert meta["data_config"]["input_size"] == [3, 32, 32]
    expected = load_recipe("ptq", set_fields={"quant.bits": 3, "calibration.batches": 2, "train.batch_size": 8})
    assert load_recipe(ptq_run / "recipe.resolved.toml") == expected
    run = load_run_model(ptq_run)
    assert run.recipe == expected and not run.model.training
    # independent calibration: same seed -> same random init, same calibration images
    torch.manual_seed(0)
    fresh = core.prepare(resolve_model(MODEL, random_init=True, model_args=ARGS).model, expected)
    train = stratified_sample(load_dataset("builtin:mnist5k", "train"), 48)  # what --limit-train 48 takes
    idx = epoch_permutation(48, 0, 0, CALIBRATION)[:16].tolist()
    core.calibrate(fresh, make_eval_loader(torch.utils.data.Subset(train, idx), meta["data_config"], 8))
    got = run.model.state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(got[k], v), k
    val_loader = make_eval_loader(stratified_sample(load_dataset("builtin:mnist5k", "validation"), 50), meta["data_config"], 25)
    val = core.evaluate_model(run.model, val_loader, 10)
    assert val["top1"] == pytest.approx(meta["best_top1"])


def test_output_folder_guards(ptq_run, tmp_path):
    with pytest.raises(RunError, match="already holds a run.*--resume.*--overwrite"):
        quantize(MODEL, recipe="ptq", out=ptq_run, **SMALL)
    with pytest.raises(RunError, match=r"different settings \(recipe\)"):
        quantize(MODEL, recipe="ptq", bits=2, calib_batches=2, out=ptq_run, resume=True, **SMALL)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a vitqtool run"):
        quantize(MODEL, recipe="ptq", out=tmp_path / "other", overwrite=True, **SMALL)
    with pytest.raises(RunError, match="no run.json"):
        load_run_model(tmp_path / "other")


def _nan_at(monkeypatch, call: int) -> None:
    original, count = loop.task_loss, [0]

    def task_loss(tr, batch):
        count[0] += 1
        loss, kd = original(tr, batch)
        return (loss * float("nan"), kd) if count[0] == call else (loss, kd)

    monkeypatch.setattr(loop, "task_loss", task_loss)


def test_nonfinite_loss_stops_naming_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    _nan_at(monkeypatch, 5)
    with pytest.raises(RunError, match="not finite.*step 5 .*last good checkpoint"):
        quantize(MODEL, epochs=1, save_every=2, out=tmp_path / "run", **SMALL)
    assert runs.read_index(tmp_path / "run")["last"].startswith("step-00000004")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_nonfinite_loss_skipped_when_recipe_says_so(tmp_path, monkeypatch):
    _nan_at(monkeypatch, 3)
    extra = tmp_path / "skip.toml"
    extra.write_text("[train]\nskip_nonfinite = true\n[oscillation]\nlog_every = 1\n")
    out = tmp_path / "run"
    quantize(MODEL, recipe="lsq", epochs=1, overrides=[extra], out=out, **SMALL)
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert [s["step"] for s in steps] == list(range(1, 7)) and [s["skipped"] for s in steps] == [False, False, True, False, False, False]
    assert all(math.isfinite(s["loss"]) for s in steps)


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    original, count = ckpt._save_state_file, [0]

    def save_state(state, path):
        count[0] += 1
        if count[0] == 2:
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        original(state, path)

    monkeypatch.setattr(ckpt, "_save_state_file", save_state)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="No space left on device.*previous checkpoint 'step-00000002"):
        quantize(MODEL, recipe="lsq", epochs=1, save_every=2, out=out, **SMALL)
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == [runs.read_index(out)["last"]]
    model_sd, state = runs.load_checkpoint(out, "last")
    assert state.train["step"] == 2 and "head.weight" in model_sd


def test_stored_soft_labels_train_and_mismatched_store_is_refused(tmp_path):
    from vitqtool.commands import softlabels

    softlabels(MODEL, tmp_path / "labels", random_init=True, model_args=ARGS, crops=3, topk=2, limit=16)
    out = tmp_path / "run"
    quantize(MODEL, epochs=1, soft_labels=tmp_path / "labels", overrides=[_crops2(tmp_path)], out=out,
             **{**SMALL, "limit_train": 16})
    meta = json.loads((out / "run.json").read_text())
    assert meta["kd_mode"] == "stored" and meta["status"] == "done"
    with pytest.raises(DataError, match="covers 16 of the 48 images"):
        quantize(MODEL, epochs=1, soft_labels=tmp_path / "labels", out=tmp_path / "run2", **SMALL)


def _crops2(tmp_path: Path) -> Path:
    path = tmp_path / "crops.toml"
    path.write_text("[kd]\ncrops_per_image = 2\n")
    return path


def test_cli_quantize_json_and_sigint_exit_code(tmp_path, capsys, monkeypatch):
    from vitqtool.cli import main

    common = ["--random-init", "--model-args", json.dumps(ARGS), "--batch-size", "8", "--limit-train", "48", "--limit-val", "50"]
    assert main(["quantize", MODEL, "--recipe", "ptq", "--bits", "4", "--out", str(tmp_path / "ptq"), "--json", *common]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["best_top1"] == json.loads((tmp_path / "ptq" / "run.json").read_text())["best_top1"] and doc["recipe"] == "ptq"
    interrupt_at_step(monkeypatch, 2, lambda: signal.raise_signal(signal.SIGINT))
    code = main(["quantize", MODEL, "--recipe", "lsq", "--epochs", "1", "--out", str(tmp_path / "qat"), "--json", *common])
    assert code == 130
    assert "interrupted at step 2" in capsys.readouterr().err
    assert runs.read_index(tmp_path / "qat")["last"].startswith("step-00000002")


def test_default_fused_quantizers_train_bitwise_like_eager_and_a_broken_compiler(tmp_path, capsys, monkeypatch):
    """The default (fused kernels in float32) trains bit for bit like --eager-quantizers, the reference; without a
    compiler the default falls back to eager and --fuse-quantizers is one clear error."""
    from safetensors.torch import load_file

    from vitqtool.cli import main
    from vitqtool.train import run as run_module

    every_step = tmp_path / "log.toml"
    every_step.write_text("[oscillation]\nlog_every = 1\n")
    common = ["--random-init", "--model-args", json.dumps(ARGS), "--batch-size", "8", "--limit-train", "24",
              "--limit-val", "20", "--recipe", "lsq", "--epochs", "1", "--overrides", str(every_step), "--json"]
    losses, weights = {}, {}
    for name, flags in (("eager", ["--eager-quantizers"]), ("default", [])):
        assert main(["quantize", MODEL, "--out", str(tmp_path / name), *flags, *common]) == 0
        meta = json.loads((tmp_path / name / "run.json").read_text())
        assert meta["status"] == "done" and meta["fused_quantizers"] == (name == "default")
        lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [l["loss"] for l in lines if "loss" in l]
        weights[name] = load_file(str(tmp_path / name / runs.CKPT_DIR / runs.read_index(tmp_path / name)["last"] / runs.MODEL_FILE))
    capsys.readouterr()
    assert len(losses["default"]) == 3 and losses["default"] == losses["eager"]
    assert weights["default"].keys() == weights["eager"].keys()
    assert all(torch.equal(weights["default"][k], weights["eager"][k]) for k in weights["eager"])
    # --compile: the same training up to the compiler's float reordering (its first step compiles the model)
    assert main(["quantize", MODEL, "--out", str(tmp_path / "compiled"), "--compile", *common]) == 0
    meta = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert meta["compiled"] is True and meta["fused_quantizers"] is False and meta["status"] == "done"
    compiled = [json.loads(l)["loss"] for l in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert compiled == pytest.approx(losses["eager"], rel=1e-4) and compiled[0] != 0
    assert load_run_model(tmp_path / "compiled").model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)  # saved unwrapped

    def no_compiler(device):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(run_module, "check_fused_kernels", no_compiler)
    code = main(["quantize", MODEL, "--out", str(tmp_path / "broken"), "--fuse-quantizers", *common])
    err = capsys.readouterr().err
    assert code == 1 and "--fuse-quantizers" in err and "No working C++ compiler found" in err and "more detail" not in err
    assert main(["quantize", MODEL, "--out", str(tmp_path / "fallback"), *common]) == 0
    assert json.loads((tmp_path / "fallback" / "run.json").read_text())["fused_quantizers"] is False


def test_adamw_is_fused_where_torch_has_the_kernel_and_the_loop_elsewhere(monkeypatch):
    """The training loops' AdamW uses torch's fused kernel (CPU has one); a device without it gets the per-tensor loop."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    assert adamw(params, lr=1e-3).defaults["fused"]
    stock = torch.optim.AdamW

    def no_fused_kernel(params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return stock(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    fallback = adamw(params, lr=1e-3, weight_decay=0.05)
    assert not fallback.defaults["fused"] and fallback.defaults["weight_decay"] == 0.05
