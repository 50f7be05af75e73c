"""Shared test set-up: offline hub and datasets, a fixed seed, tiny model configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread is faster than several and keeps parallel jobs from oversubscribing the cores.
torch.set_num_threads(1)

TINY_DEIT = ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "num_classes": 10})
TINY_SWIN = ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "window_size": 4, "num_classes": 10})
TINY_VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10})


def interrupt_at_step(monkeypatch, call: int, action) -> None:
    """Make AdamW's `call`-th step (1-based) run `action` first (a signal, a kill), through `monkeypatch`."""
    original, count = torch.optim.AdamW.step, [0]

    def step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == call:
            action()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


def write_run_folder(folder, model, recipe, *, architecture, model_args, data_config, source="", best_top1=None,
                     last_top1=None, oscillation=None):
    """A run folder as `quantize` writes it (run.json, resolved recipe, one checkpoint) for `model`."""
    from vitqtool.core.artifacts import CheckpointState, RunInfo
    from vitqtool.core.runs import RECIPE_FILE, write_run_info
    from vitqtool.fileio import atomic_write, state_dict_for_safetensors
    from vitqtool.train.checkpoint import save_checkpoint

    info = RunInfo(identity={}, source_model=source, architecture=architecture, model_args=model_args,
                   data_config=data_config, data="builtin:mnist5k", num_classes=10, seed=0, recipe=recipe.name,
                   bits=recipe.quant.bits, kd_mode="none", versions={}, status="done", best_top1=best_top1,
                   last_top1=last_top1)
    write_run_info(folder, info)
    atomic_write(folder / RECIPE_FILE, recipe.to_toml())
    save_checkpoint(folder, "step_1", state_dict_for_safetensors(model), CheckpointState(oscillation=oscillation or {}), best=True)


def calibrate_off_init(model, seed: int) -> None:
    """Calibrate `model` on a random batch, then move every step (x0.7..1.3) and offset (-0.05) off its init."""
    from vitqtool import core
    from vitqtool.quant import iter_quantizers

    gen = torch.Generator().manual_seed(seed)
    core.calibrate(model, [torch.randn(4, 3, 32, 32, generator=gen)])
    with torch.no_grad():
        for _, q in iter_quantizers(model):
            q.step.mul_(torch.empty_like(q.step).uniform_(0.7, 1.3, generator=gen))
            if q.offset is not None:
                q.offset.fill_(-0.05)


def spread_model(name: str, args: dict, seed: int = 0, spread: float = 0.2):
    """A stock timm model (eval mode) with every parameter moved off its init by N(0, spread^2).

    Zero biases and bias tables or a LayerScale of 1e-5 would let a wrong rewrite or key map pass unnoticed.
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **args).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * spread)
    return model


def assert_prepare_is_fp_exact(stock, recipe: str, x) -> None:
    """`prepare` at 2 bits: logits within 1e-5 of the stock model's with the quantizers disabled, clearly off with them
    on (they really are in the forward), and the stock model untouched (prepare rewrites a copy)."""
    from vitqtool import core
    from vitqtool.quant import QLinear, quantizers_disabled

    with torch.no_grad():
        ref = stock(x)
        q = core.prepare(stock, recipe, bits=2).eval()
        with quantizers_disabled(q):
            assert (q(x) - ref).abs().max().item() <= 1e-5
        assert (q(x) - ref).abs().max().item() > 1e-3
    assert ref.abs().max() > 0.3  # logits of order 1: a wrong rewrite cannot hide under the tolerance
    assert not any(isinstance(m, QLinear) for m in stock.modules())


def assert_fast_sensitivity_equals_naive(q, images) -> None:
    """Calibrate `q`, then the fast (block by block) and the naive sensitivity method agree on every unit."""
    import pytest

    from vitqtool import core
    from vitqtool.analysis.sensitivity import SensitivityProbe, build_units
    from vitqtool.families import get_family

    core.calibrate(q, [images])
    family = get_family(q)
    batches = [(images, torch.arange(images.shape[0]))]
    units = build_units(q, "both", family.block_names(q))
    fast, naive = SensitivityProbe(q, family, batches, "fast"), SensitivityProbe(q, family, batches, "naive")
    kl_fast = [fast.measure(u)["kl"] for u in units]
    assert kl_fast == pytest.approx([naive.measure(u)["kl"] for u in units], rel=1e-4, abs=1e-9)
    assert max(kl_fast) > 0


def quantized_random(spec, recipe: str, bits: int, per_channel: bool):
    """(loaded FP model, recipe, calibrated quantized model in eval mode) of a random-init timm model, weights spread."""
    from vitqtool import core
    from vitqtool.core.models import resolve_model
    from vitqtool.recipe import load_recipe

    name, args = spec
    loaded = resolve_model(name, random_init=True, model_args=args)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    rec = load_recipe(recipe, set_fields={"quant.bits": bits, "quant.per_channel": per_channel})
    model = core.prepare(loaded.model, rec)
    calibrate_off_init(model, 0)
    return loaded, rec, model.eval()


def assert_exports_round_trip(tmp_path, loaded, recipe, model, x) -> dict:
    """The safetensors export reloads bit-exact; the compressed-tensors view loads strictly into the stock timm model,
    which then computes the weight-quantized network. Returns the view's decompressed state dict."""
    import vitqtool
    from vitqtool import core
    from vitqtool.core.models import resolve_model
    from vitqtool.export import export_model, load_source_model, source_state_dict
    from vitqtool.export.source_view import write_source_view
    from vitqtool.quant import iter_quantizers

    path = tmp_path / "m.safetensors"
    summary = export_model(model, path, architecture=loaded.architecture, model_args=loaded.model_args,
                           data_config=loaded.data_config, recipe=recipe, verify=True, verify_inputs=[x[:2]])
    assert summary["verify"]["max_abs_diff"] == 0.0
    reloaded = vitqtool.load(path)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert core.quant_summary(reloaded) == core.quant_summary(model)
    view = tmp_path / "view.safetensors"
    write_source_view(model, view, architecture=loaded.architecture, model_args=loaded.model_args,
                      data_config=loaded.data_config, verify_inputs=[x[:2]])
    state = source_state_dict(view)
    resolve_model(loaded.architecture, random_init=True, model_args=loaded.model_args).model.load_state_dict(state, strict=True)
    acts = [q for _, q in iter_quantizers(model) if q.kind == "act"]
    try:
        for q in acts:
            q.enabled = False
        with torch.no_grad():
            assert (load_source_model(view)(x) - model(x)).abs().max() <= 1e-4
    finally:
        for q in acts:
            q.enabled = True
    return state


def ptq_run_and_export(tmp_path, spec):
    """A 4-bit PTQ run of a random-init timm model on 16 builtin:mnist5k images, exported with verify; the ExportSummary."""
    from vitqtool import commands

    name, args = spec
    info = commands.quantize(name, recipe="ptq", bits=4, calib_batches=1, random_init=True, model_args=args, batch_size=8,
                             limit_train=16, limit_val=16, out=tmp_path / "run")
    assert info.status == "done" and info.last_top1 is not None
    result = commands.export(tmp_path / "run", tmp_path / "m.safetensors", verify=True)
    assert result.verify["max_abs_diff"] <= 1e-5
    return result
