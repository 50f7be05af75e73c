"""Datasets (built-in MNIST subset, Hugging Face datasets, image folders) and timm-consistent transforms."""

from vitqtool.data.sampling import holdout_split, stratified_sample
from vitqtool.data.sources import (
    ArrayImageDataset,
    HFImageDataset,
    ImageDataset,
    check_num_classes,
    list_splits,
    load_dataset,
)
from vitqtool.data.transforms import (
    EvalTransform,
    TrainTransform,
    TransformedDataset,
    apply_crop,
    eval_transform,
    make_eval_loader,
    sample_crop_box,
    train_transform,
)

__all__ = [
    "ArrayImageDataset",
    "EvalTransform",
    "HFImageDataset",
    "ImageDataset",
    "TrainTransform",
    "TransformedDataset",
    "apply_crop",
    "check_num_classes",
    "eval_transform",
    "holdout_split",
    "list_splits",
    "load_dataset",
    "make_eval_loader",
    "sample_crop_box",
    "stratified_sample",
    "train_transform",
]
