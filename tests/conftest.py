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
