"""timm-consistent transforms on uint8 image tensors, plus exactly replayable random-resized crops.

Eval: resize the shorter side to floor(size / crop_pct), center crop, /255, normalise, grey -> model channels.
Train: a RandomResizedCrop box drawn as *fractions* of the image (so it can be stored and replayed on the
same image at any resolution), an optional horizontal flip, resize, normalise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision.transforms import InterpolationMode

from vitqtool.data.sources import ImageDataset

CropBox = tuple[float, float, float, float]

_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
    "nearest-exact": InterpolationMode.NEAREST_EXACT,
    "lanczos": InterpolationMode.BICUBIC,  # not available for tensors; bicubic is the closest
    "hamming": InterpolationMode.BILINEAR,
    "box": InterpolationMode.BILINEAR,
    "random": InterpolationMode.BILINEAR,
}


def _interpolation(name: Any) -> InterpolationMode:
    if isinstance(name, InterpolationMode):
        return name
    return _INTERPOLATIONS.get(str(name or "bilinear").lower(), InterpolationMode.BILINEAR)


def _antialias(mode: InterpolationMode) -> bool:
    return mode in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)


def normalize_uint8(img: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [C, H, W] -> float [len(mean), H, W]: match channels (grey -> RGB, RGB -> grey, drop alpha), /255, normalise."""
    channels = len(mean)
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.shape[0] == 4 and channels != 4:
        img = img[:3]
    if img.shape[0] != channels:
        if img.shape[0] == 1:
            img = img.expand(channels, -1, -1)
        elif channels == 1:
            img = F.rgb_to_grayscale(img)
        else:
            raise ValueError(f"cannot map a {img.shape[0]}-channel image to {channels} channels")
    out = img.to(torch.float32).div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return out.sub_(m).div_(s)


class EvalTransform:
    """timm's eval transform (transforms_imagenet_eval) for uint8 tensors; picklable for DataLoader workers."""

    def __init__(self, data_config: dict) -> None:
        channels, height, width = (int(v) for v in data_config["input_size"])
        self.size = (height, width)
        self.crop_pct = float(data_config.get("crop_pct") or 1.0)
        self.crop_mode = str(data_config.get("crop_mode") or "center")
        self.interpolation = _interpolation(data_config.get("interpolation"))
        self.mean = tuple(float(v) for v in data_config["mean"])
        self.std = tuple(float(v) for v in data_config["std"])
        if len(self.mean) == 1 and channels != 1:  # a single grey mean/std for a multi-channel model
            self.mean, self.std = self.mean * channels, self.std * channels
        self.scale_size = tuple(math.floor(v / self.crop_pct) for v in self.size)

    def __call__(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        sh, sw = self.scale_size
        if self.crop_mode == "squash":
            img = self._resize(img, [sh, sw])
        elif self.crop_mode == "border":
            ratio = max(h / sh, w / sw)  # longest side fits, the rest is padded by center_crop
            img = self._resize(img, [max(1, round(h / ratio)), max(1, round(w / ratio))])
        elif sh == sw:
            if min(h, w) != sh:
                img = self._resize(img, [sh])  # shorter side, like torchvision Resize(int)
        else:
            ratio = min(h / sh, w / sw)  # timm ResizeKeepRatio: one side matches, the other is larger
            img = self._resize(img, [max(1, round(h / ratio)), max(1, round(w / ratio))])
        img = F.center_crop(img, list(self.size))
        return normalize_uint8(img, self.mean, self.std)

    def _resize(self, img: Tensor, size: list[int]) -> Tensor:
        return F.resize(img, size, interpolation=self.interpolation, antialias=_antialias(self.interpolation))


def eval_transform(data_config: dict) -> EvalTransform:
    """timm eval transform: shorter side to floor(size/crop_pct), center crop, /255, normalise, grey -> 3ch."""
    return EvalTransform(data_config)


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64).item())


def sample_crop_box(
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    image_size: tuple[int, int] | None = None,
) -> CropBox:
    """Draw a RandomResizedCrop box (torchvision's algorithm) as fractions (x0, y0, w, h) of the image.

    Without `image_size` the image is taken as square (aspect ratios are in fractional units);
    with it, aspect ratios are in pixels, as torchvision does, and the box is still returned in fractions.
    """
    height, width = (float(image_size[0]), float(image_size[1])) if image_size else (1.0, 1.0)
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        w = math.sqrt(target_area * aspect)
        h = math.sqrt(target_area / aspect)
        if 0 < w <= width and 0 < h <= height:
            y0 = _uniform(generator, 0.0, height - h)
            x0 = _uniform(generator, 0.0, width - w)
            return (x0 / width, y0 / height, w / width, h / height)
    # fallback: central crop clamped to the ratio range (torchvision)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, width / min(ratio)
    elif in_ratio > max(ratio):
        h, w = height, height * max(ratio)
    else:
        w, h = width, height
    return ((width - w) / 2 / width, (height - h) / 2 / height, w / width, h / height)


def crop_box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Fractional (x0, y0, w, h) -> integer (top, left, h, w) by rounding, clamped inside the image."""
    x0, y0, bw, bh = (float(v) for v in box)
    pw = min(width, max(1, round(bw * width)))
    ph = min(height, max(1, round(bh * height)))
    left = min(max(0, round(x0 * width)), width - pw)
    top = min(max(0, round(y0 * height)), height - ph)
    return top, left, ph, pw


def apply_crop(
    img: Tensor,
    box: Sequence[float],
    flip: bool,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """Replay a stored crop: crop the fractional box, resize (bilinear, antialias), optional hflip, normalise."""
    top, left, ph, pw = crop_box_pixels(box, int(img.shape[-2]), int(img.shape[-1]))
    out = F.crop(img, top, left, ph, pw)
    out = F.resize(out, [int(size[0]), int(size[1])], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if flip:
        out = F.horizontal_flip(out)
    return normalize_uint8(out, mean, std)


class TrainTransform:
    """Random-resized crop + optional flip on uint8 tensors, driven by an explicit torch.Generator."""

    def __init__(self, data_config: dict, scale: tuple[float, float], ratio: tuple[float, float], hflip: bool) -> None:
        _, height, width = (int(v) for v in data_config["input_size"])
        self.size = (height, width)
        self.mean = tuple(float(v) for v in data_config["mean"])
        self.std = tuple(float(v) for v in data_config["std"])
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = bool(hflip)

    def sample(self, img: Tensor, generator: torch.Generator | None) -> tuple[CropBox, bool]:
        """Draw the (box, flip) that __call__ would apply, so it can be stored and replayed."""
        box = sample_crop_box(generator, self.scale, self.ratio, image_size=(int(img.shape[-2]), int(img.shape[-1])))
        flip = self.hflip and bool(torch.rand(1, generator=generator).item() < 0.5)
        return box, flip

    def replay(self, img: Tensor, box: Sequence[float], flip: bool) -> Tensor:
        """Apply a stored (box, flip)."""
        return apply_crop(img, box, flip, self.size, self.mean, self.std)

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        box, flip = self.sample(img, generator)
        return self.replay(img, box, flip)


def train_transform(
    data_config: dict,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> TrainTransform:
    """Random-resized crop + flip built from sample_crop_box/apply_crop; call as t(img, generator)."""
    return TrainTransform(data_config, scale, ratio, hflip)


class TransformedDataset(torch.utils.data.Dataset):
    """(uint8 image, label) -> (transform(image), label)."""

    def __init__(self, dataset: ImageDataset | torch.utils.data.Subset, transform: Any) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img, label = self.dataset[index]
        return self.transform(img), label


def make_eval_loader(
    dataset: ImageDataset | torch.utils.data.Subset, data_config: dict, batch_size: int, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """In-order loader of (float images [B, C, H, W], int64 labels [B]) with timm's eval transform."""
    return torch.utils.data.DataLoader(
        TransformedDataset(dataset, eval_transform(data_config)),
        batch_size=int(batch_size),
        shuffle=False,
        num_workers=int(num_workers),
        drop_last=False,
        persistent_workers=False,
    )
