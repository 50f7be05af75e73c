"""Numbers mean what they say: limits are class-stratified samples, the split used is the split reported,
train-only datasets get a held-out validation slice, columns can be named, local paths win, the
launcher's precision is kept and recorded, and a --teacher is resolved on its own."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.conftest import TINY_VIT
from vitqtool import commands
from vitqtool.cli import main
from vitqtool.core.models import resolve_model, save_model_folder
from vitqtool.data import load_dataset, stratified_sample
from vitqtool.errors import DataError, RunError

NAME, ARGS = TINY_VIT
MODEL_ARGS = ["--model-args", json.dumps(ARGS)]


def test_every_limit_is_the_same_class_stratified_sample():
    train = load_dataset("builtin:mnist5k", "train")  # sorted by label: the first 1,024 images are digits 0-2
    assert set(train.labels()[:1024]) == {0, 1, 2}
    sample = stratified_sample(train, 100)
    assert Counter(train.labels()[i] for i in sample.indices) == {c: 10 for c in range(10)}
    assert stratified_sample(train, 100).indices == sample.indices  # fixed seed: every command agrees
    assert set(stratified_sample(train, 200).indices) >= set(sample.indices)  # a larger limit keeps the smaller one


def test_evaluate_limit_covers_every_class(capsys):
    code = main(["evaluate", NAME, "--random-init", *MODEL_ARGS, "--limit", "20", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["n"] == 20 and doc["split"] == "validation"


def _image_folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(root / f"class{c}" / f"{i}.png")
    return root


def test_a_train_only_dataset_reports_its_split_and_quantize_holds_out_validation(tmp_path, capsys):
    data = str(_image_folder(tmp_path / "imgs", per_class=10))  # one split: train
    args = {**ARGS, "num_classes": 2}
    code = main(["evaluate", NAME, "--random-init", "--model-args", json.dumps(args), "--data", data, "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["split"] == "train"  # was reported as "validation"
    info = commands.quantize(NAME, recipe="ptq", random_init=True, model_args=args, data=data, batch_size=4,
                             out=tmp_path / "run")
    assert "held out of split 'train'" in info.validation and info.validation.startswith("2 images")


def _saved_dataset(path: Path, columns: dict) -> str:
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


def _images(n: int) -> list:
    rng = np.random.default_rng(1)
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(n)]


def test_columns_can_be_named_and_two_label_columns_are_not_guessed(tmp_path):
    import datasets

    data = _saved_dataset(tmp_path / "fine", {"picture": _images(6), "fine_label": [0, 1, 2, 0, 1, 2], "coarse": [0, 0, 0, 1, 1, 1]})
    with pytest.raises(DataError, match="--label-column"):
        load_dataset(data, "train")
    ds = load_dataset(data, "train", image_column="picture", label_column="fine_label")
    assert ds.num_classes == 3 and ds.labels() == [0, 1, 2, 0, 1, 2]
    two = tmp_path / "two"
    features = datasets.Features({"image": datasets.Image(), "a": datasets.ClassLabel(names=["x", "y"]),
                                  "b": datasets.ClassLabel(names=["p", "q", "r"])})
    datasets.Dataset.from_dict({"image": _images(2), "a": [0, 1], "b": [2, 0]}, features=features).save_to_disk(str(two))
    with pytest.raises(DataError, match="several ClassLabel columns \\(a, b\\)"):
        load_dataset(str(two), "train")
    assert load_dataset(str(two), "train", label_column="b").num_classes == 3


def test_a_local_folder_named_like_a_builder_is_the_folder(tmp_path, monkeypatch):
    import datasets

    (tmp_path / "parquet").mkdir()
    datasets.Dataset.from_dict({"image": _images(4), "label": [0, 1, 0, 1]}).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("parquet", "train")
    assert len(ds) == 4 and ds.labels() == [0, 1, 0, 1]


def test_the_launchers_precision_is_kept_and_recorded(tmp_path):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION; without --mixed-precision it applies."""
    script = ("from vitqtool.commands import quantize\n"
              f"quantize({NAME!r}, recipe='ptq', random_init=True, model_args={ARGS!r}, batch_size=8, limit_train=16,"
              f" limit_val=16, out={str(tmp_path / 'run')!r})\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "ACCELERATE_MIXED_PRECISION": "bf16"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300, capture_output=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["mixed_precision"] == "bf16"


def test_launches_that_would_run_something_else_are_refused(monkeypatch):
    from vitqtool.train.run import check_launch

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RunError, match="starts a single process; use --multi_gpu"):
        check_launch()
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="FSDP"):
            check_launch()


def test_the_teacher_is_resolved_on_its_own(tmp_path):
    teacher = timm.create_model(NAME, pretrained=False, **ARGS).eval()
    save_model_folder(teacher, tmp_path / "teacher", NAME, ARGS)
    student = resolve_model(NAME, random_init=True, model_args=ARGS)
    built = commands._resolve_teacher(str(tmp_path / "teacher"), None, None, student, 10)
    # the folder's weights (before: rebuilt with the student's --random-init, i.e. random weights)
    assert all(torch.equal(built.state_dict()[k], v) for k, v in teacher.state_dict().items())


def test_the_ladder_reuses_soft_labels_only_with_the_same_crops(tmp_path):
    """benchmarks/ladder.py read the manifest key `crops_per_image`, which the store never wrote (it writes `crops`),
    so any store counted as matching and a changed --crops silently reused the old labels."""
    from benchmarks.ladder import labels_reusable
    from vitqtool.train import generate_soft_labels

    train = stratified_sample(load_dataset("builtin:mnist5k", "train"), 4)
    model = resolve_model(NAME, random_init=True, model_args=ARGS)
    generate_soft_labels(model.model, train, model.data_config, tmp_path / "labels", crops=2, topk=2)
    assert labels_reusable(tmp_path / "labels", 2)
    assert not labels_reusable(tmp_path / "labels", 3)
    assert not labels_reusable(tmp_path / "none", 2)
