"""Full-precision training of a (small) loaded model, the starting point of QAT in tests and the demo pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.models import LoadedModel, save_model_folder
from ..core.prepare import evaluate_model
from ..data import make_eval_loader
from ..progress import track
from .sampling import AugmentedDataset, ShardedBatchSampler
from .schedule import adamw, lr_at

log = logging.getLogger(__name__)


@dataclass
class FPResult:
    """Where `train_fp` saved the model and its validation top-1 (percent)."""

    folder: Path
    top1: float
    architecture: str
    model_args: dict


def train_fp(loaded: LoadedModel, train_set: Any, val_set: Any, out: Path, *, epochs: int = 3, batch_size: int = 64,
             lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: float = 0.5,
             scale: tuple[float, float] = (0.6, 1.0), ratio: tuple[float, float] = (0.75, 4 / 3), hflip: bool = False,
             seed: int = 0, show_progress: bool = False) -> FPResult:
    """Train a loaded FP model with AdamW + warmup/cosine and hard labels; save it as a model folder (config.json + safetensors).

    The folder is a MODEL spec for `quantize`/`evaluate`. Crops are drawn from (seed, epoch, index),
    so the result is reproducible on CPU (same machine, same threads).
    """
    net, cfg = loaded.model, loaded.data_config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device).train()
    augmented = AugmentedDataset(train_set, cfg, scale, ratio, hflip, seed)
    steps_per_epoch = len(train_set) // batch_size
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    optimizer = adamw(net.parameters(), lr=lr, weight_decay=weight_decay)
    step = 0
    for epoch in track(range(epochs), "train FP", enabled=show_progress):
        augmented.set_epoch(epoch)
        sampler = ShardedBatchSampler(len(train_set), batch_size, 1, 0, seed, epoch, steps_per_epoch)
        for x, y in torch.utils.data.DataLoader(augmented, batch_sampler=sampler):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup)
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        log.info("FP epoch %d: loss %.4f", epoch + 1, loss.item())
    top1 = evaluate_model(net, make_eval_loader(val_set, cfg, 256), val_set.num_classes)["top1"]
    folder = save_model_folder(net.cpu(), Path(out), loaded.architecture, loaded.model_args)
    return FPResult(folder=folder, top1=top1, architecture=loaded.architecture, model_args=loaded.model_args)
