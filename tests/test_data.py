"""Dataset sources (builtin:mnist5k, image folders, saved HF datasets) and transforms (eval, crop replay)."""

from collections import Counter

import numpy as np
import pytest
import torch

from vitqtool.data import (
    apply_crop,
    check_num_classes,
    eval_transform,
    list_splits,
    load_dataset,
    make_eval_loader,
    sample_crop_box,
    train_transform,
)
from vitqtool.data.sources import mnist5k_split_indices, read_mnist5k
from vitqtool.errors import DataError

DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.9,
    "crop_mode": "center",
    "num_classes": 10,
}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache for the test folders out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def _png_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 24)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            img = Image.fromarray(arr) if i else Image.fromarray(arr[:, :, 0], mode="L")  # one grey image
            img.save(root / c / f"{i}.png")
    return root


# --------------------------------------------------------------------------- builtin:mnist5k


def test_mnist5k_sizes_and_balance():
    train = load_dataset("builtin:mnist5k", "train")
    val = load_dataset("builtin:mnist5k")  # default split: validation
    assert (len(train), len(val)) == (4000, 1000)
    assert train.split == "train" and val.split == "validation"
    assert train.num_classes == val.num_classes == 10
    assert train.class_names == [str(i) for i in range(10)]
    assert Counter(train.labels()) == {c: 400 for c in range(10)}
    assert Counter(val.labels()) == {c: 100 for c in range(10)}
    img, label = val[0]
    assert img.dtype == torch.uint8 and img.shape == (1, 28, 28)
    assert isinstance(label, int)
    assert list_splits("builtin:mnist5k") == ["train", "validation"]


def test_mnist5k_is_deterministic_and_disjoint():
    images, labels = read_mnist5k()
    assert images.shape == (5000, 28, 28) and labels.shape == (5000,)
    assert list(labels) == sorted(labels)  # the file is sorted by label
    tr1, va1 = mnist5k_split_indices(labels)
    tr2, va2 = mnist5k_split_indices(labels)
    assert np.array_equal(tr1, tr2) and np.array_equal(va1, va2)
    assert not set(tr1) & set(va1) and len(set(tr1) | set(va1)) == 5000
    a, b = load_dataset("builtin:mnist5k", "validation"), load_dataset("builtin:mnist5k", "validation")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != load_dataset("builtin:mnist5k", "train").fingerprint
    assert torch.equal(a[17][0], b[17][0])


def test_mnist5k_bad_split_and_unknown_builtin():
    with pytest.raises(DataError, match="no split 'extra'"):
        load_dataset("builtin:mnist5k", "extra")
    with pytest.raises(DataError, match="builtin:mnist5k"):
        load_dataset("builtin:cifar10")


def test_check_num_classes():
    val = load_dataset("builtin:mnist5k")
    check_num_classes(val, 10)
    with pytest.raises(DataError) as err:
        check_num_classes(val, 1000)
    assert "10 classes" in str(err.value) and "1000" in str(err.value)


# --------------------------------------------------------------------------- transforms


def test_eval_transform_shape_and_normalisation():
    t = eval_transform(DATA_CONFIG)
    grey = torch.full((1, 28, 28), 128, dtype=torch.uint8)
    out = t(grey)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    for c in range(3):
        expected = (128 / 255 - DATA_CONFIG["mean"][c]) / DATA_CONFIG["std"][c]
        assert torch.allclose(out[c], torch.full_like(out[c], expected), atol=1e-5)


def test_eval_transform_matches_timm_pil_pipeline():
    import timm.data
    from PIL import Image

    from vitqtool.data.sources import pil_to_uint8_tensor

    rng = np.random.default_rng(0)
    arr = (np.kron(rng.random((6, 8, 3)), np.ones((10, 10, 1))) * 255).astype(np.uint8)  # smooth 60x80 image
    img = Image.fromarray(arr)
    cfg = {k: v for k, v in DATA_CONFIG.items() if k != "num_classes"}
    reference = timm.data.create_transform(**cfg, is_training=False)(img)
    ours = eval_transform(DATA_CONFIG)(pil_to_uint8_tensor(img))
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() < 0.05  # PIL vs tensor resampling: within ~1 uint8 step


def test_make_eval_loader_batches():
    val = load_dataset("builtin:mnist5k")
    loader = make_eval_loader(val, DATA_CONFIG, batch_size=300)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [300, 300, 300, 100]
    x, y = batches[0]
    assert x.shape == (300, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert y.tolist() == val.labels()[:300]


def test_sample_crop_box_is_deterministic_and_in_range():
    boxes1 = [sample_crop_box(torch.Generator().manual_seed(3)) for _ in range(2)]
    assert boxes1[0] == boxes1[1]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x0, y0, w, h = sample_crop_box(g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        assert x0 >= 0 and y0 >= 0 and x0 + w <= 1 + 1e-9 and y0 + h <= 1 + 1e-9
        assert 0.08 - 1e-9 <= w * h <= 1 + 1e-9
        assert 3 / 4 - 1e-9 <= w / h <= 4 / 3 + 1e-9
    x0, y0, w, h = sample_crop_box(g, scale=(1.0, 1.0), ratio=(1.0, 1.0), image_size=(20, 40))
    assert abs(h - 1.0) < 1e-9 and abs(w - 0.5) < 1e-9  # pixel aspect 1:1 on a 20x40 image


def test_crop_replay_is_exact():
    img = load_dataset("builtin:mnist5k")[5][0]
    box = sample_crop_box(torch.Generator().manual_seed(7))
    mean, std = DATA_CONFIG["mean"], DATA_CONFIG["std"]
    a = apply_crop(img, box, True, (32, 32), mean, std)
    b = apply_crop(img.clone(), tuple(box), True, (32, 32), mean, std)
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b)
    unflipped = apply_crop(img, box, False, (32, 32), mean, std)
    assert torch.equal(unflipped.flip(-1), a)

    t = train_transform(DATA_CONFIG, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True)
    out1 = t(img, torch.Generator().manual_seed(11))
    out2 = t(img, torch.Generator().manual_seed(11))
    assert torch.equal(out1, out2)
    box2, flip2 = t.sample(img, torch.Generator().manual_seed(11))
    assert torch.equal(t.replay(img, box2, flip2), out1)


# --------------------------------------------------------------------------- image folders / HF datasets


def test_imagefolder(tmp_path):
    root = _png_folder(tmp_path / "pets")
    ds = load_dataset(str(root))  # no validation split: falls back to the folder's only split
    assert len(ds) == 6
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert sorted(ds.labels()) == [0, 0, 0, 1, 1, 1]
    shapes = {ds[i][0].shape for i in range(len(ds))}
    assert shapes == {(1, 20, 24), (3, 20, 24)}  # grey stays 1 channel, RGB 3
    assert all(ds[i][0].dtype == torch.uint8 for i in range(len(ds)))
    assert load_dataset(str(root)).fingerprint == ds.fingerprint
    out = eval_transform(DATA_CONFIG)(ds[0][0])
    assert out.shape == (3, 32, 32)
    assert list_splits(str(root)) == ["train"]


def test_imagefolder_with_split_folders(tmp_path):
    _png_folder(tmp_path / "data" / "train", per_class=2)
    _png_folder(tmp_path / "data" / "val", per_class=1)
    assert sorted(list_splits(str(tmp_path / "data"))) == ["train", "validation"]
    assert len(load_dataset(str(tmp_path / "data"), "validation")) == 2
    assert len(load_dataset(str(tmp_path / "data"), "train")) == 4
    with pytest.raises(DataError, match="available splits"):
        load_dataset(str(tmp_path / "data"), "holdout")


def test_unreadable_image_names_the_file(tmp_path):
    root = _png_folder(tmp_path / "pets", per_class=1)
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    ds = load_dataset(str(root))
    errors = []
    for i in range(len(ds)):
        try:
            ds[i]
        except DataError as exc:
            errors.append(str(exc))
    assert len(errors) == 1
    assert "broken.png" in errors[0] and "image " in errors[0] and "\n" not in errors[0]


def test_empty_folder_is_data_error(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no images"):
        load_dataset(str(tmp_path / "empty"))


def test_unknown_spec_is_one_line_data_error(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("no_such_user/no_such_dataset_xyz")
    assert "\n" not in str(err.value)
    assert "not in the local Hugging Face cache" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "missing"))


def test_saved_hf_dataset_with_string_labels(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)) for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {"img": images, "labels": ["b", "a", "b", "a"]},
        features=datasets.Features({"img": datasets.Image(), "labels": datasets.Value("string")}),
    )
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    loaded = load_dataset(str(tmp_path / "saved"), "validation")  # falls back to 'test'
    assert loaded.split == "test"
    assert loaded.class_names == ["a", "b"]
    assert loaded.labels() == [1, 0, 1, 0]
    img, label = loaded[2]
    assert img.shape == (3, 8, 8) and int(img[0, 0, 0]) == 80 and label == 1


def test_dataset_without_label_column(tmp_path):
    import datasets
    from PIL import Image

    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))]})
    ds.save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(DataError, match="no label column"):
        load_dataset(str(tmp_path / "nolabel"))
