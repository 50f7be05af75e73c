"""Tiny random transformers checkpoints saved with save_pretrained, for the transformers tests.

ViT / DeiT / Swin / Swin V2 / ConvNeXt V2 / BEiT / data2vec-vision / SigLIP.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

LABELS = [f"digit_{i}" for i in range(10)]
VIT_KW = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)
SWIN_KW = dict(image_size=32, patch_size=2, window_size=4, depths=[2, 2], num_heads=[3, 6], embed_dim=24)
CONVNEXTV2_KW = dict(image_size=32, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1])
# BEiT with per-layer relative position bias, an absolute position embedding and mean pooling; data2vec-vision with
# the shared relative position bias and class-token pooling
BEIT_KW = dict(VIT_KW, use_relative_position_bias=True, use_absolute_position_embeddings=True, layer_scale_init_value=0.1)
DATA2VEC_KW = dict(VIT_KW, use_shared_relative_position_bias=True, use_mean_pooling=False, layer_scale_init_value=0.1)
FAMILIES = ("vit", "deit", "deit_distilled", "swin", "swinv2", "convnextv2", "beit", "data2vec_vision", "siglip")


def _siglip_config(id2label: dict, label2id: dict, **vision):
    """A SiglipConfig whose vision tower is `vision` (the classification model builds no text tower)."""
    import transformers as tf

    return tf.SiglipConfig(vision_config=vision, id2label=id2label, label2id=label2id)


def build(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A transformers classification model with 10 named labels and weights far from init (logits of order 1)."""
    import transformers as tf

    cls, config_cls, kw = {
        "vit": (tf.ViTForImageClassification, tf.ViTConfig, VIT_KW),
        "deit": (tf.DeiTForImageClassification, tf.DeiTConfig, VIT_KW),
        "deit_distilled": (tf.DeiTForImageClassificationWithTeacher, tf.DeiTConfig, VIT_KW),
        "swin": (tf.SwinForImageClassification, tf.SwinConfig, SWIN_KW),
        "swinv2": (tf.Swinv2ForImageClassification, tf.Swinv2Config, SWIN_KW),
        "convnextv2": (tf.ConvNextV2ForImageClassification, tf.ConvNextV2Config, CONVNEXTV2_KW),
        "beit": (tf.BeitForImageClassification, tf.BeitConfig, BEIT_KW),
        "data2vec_vision": (tf.Data2VecVisionForImageClassification, tf.Data2VecVisionConfig, DATA2VEC_KW),
        "siglip": (tf.SiglipForImageClassification, _siglip_config, VIT_KW),  # VIT_KW and overrides: the vision tower
    }[family]
    config = config_cls(**{**kw, **overrides}, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(seed)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random init is ~0.02 wide: spread every tensor so that a wrong mapping shows in the logits
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def save(model: torch.nn.Module, folder: Path, weights: str = "safetensors", preprocessor: dict | None = None) -> Path:
    """save_pretrained, optionally as pytorch_model.bin, optionally with an image processor.

    transformers 5 always writes safetensors (safe_serialization is gone), so the .bin variant is the same
    state dict written with torch.save, which is what `save_pretrained(safe_serialization=False)` wrote before.
    """
    from safetensors.torch import load_file

    model.save_pretrained(folder)
    if weights == "bin":
        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if preprocessor is not None:
        import transformers as tf

        kind = preprocessor.pop("type")
        getattr(tf, kind)(**preprocessor).save_pretrained(folder)
    return folder


def hub_cache(root: Path, repo: str, folder: Path, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay `folder`'s files out as the Hugging Face cache holds `repo` (snapshots/<rev> + refs/main); returns the cache root."""
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    snap = base / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snap / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    return root


def edit_config(folder: Path, **changes) -> None:
    """Change fields of a saved config.json (None deletes a field)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    path.write_text(json.dumps(config))
