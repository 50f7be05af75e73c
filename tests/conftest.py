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
