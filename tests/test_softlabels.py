"""Multi-crop soft-label store: generation vs independent replay, label recovery, refusal of mismatches, CLI."""

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitqtool.data import ArrayImageDataset, apply_crop, sample_crop_box
from vitqtool.errors import BusyError, DataError, RunError
from vitqtool.fileio import folder_lock
from vitqtool.train.losses import kd_loss, soft_cross_entropy
from vitqtool.train.sampling import mix_seed
from vitqtool.train.softlabels import (
    MultiCropDataset,
    SoftLabelStore,
    bytes_per_crop,
    generate_soft_labels,
    recover_label,
    staging_folder,
)

CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
SCALE, RATIO = (0.2, 1.0), (0.75, 1.3333)


def _dataset(n: int = 6, seed: int = 1, classes: int = 10) -> ArrayImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 20, 28), generator=g, dtype=torch.uint8)  # non-square images
    return ArrayImageDataset(images, torch.arange(n) % classes, [str(i) for i in range(classes)], "test:random", "train")


def _teacher(classes: int = 10) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.Flatten(), nn.Linear(64, classes)).eval()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "store"
    generate_soft_labels(_teacher(), _dataset(), CFG, out, crops=6, topk=3, scale=SCALE, ratio=RATIO, seed=7,
                         batch_size=5, images_per_shard=4, teacher_id="tiny", dataset_id="random")
    return out


def test_round_trip_matches_independent_replay(store_path):
    store = SoftLabelStore.open(store_path)
    dataset, teacher = _dataset(), _teacher()
    assert len(store) == 6 and store.crops_per_image == 6 and store.topk == 3
    assert len(store.manifest.shards) == 2
    flips_seen = set()
    for i in range(len(dataset)):
        img, _ = dataset[i]
        boxes, flips, indices, probs = store.crops(i)
        assert boxes.dtype == torch.float32 and flips.dtype == torch.bool and indices.dtype == torch.long
        gen = torch.Generator().manual_seed(mix_seed(7, i))  # the documented draw: seeded by (seed, index)
        for c in range(6):
            box = sample_crop_box(gen, SCALE, RATIO, image_size=(20, 28))
            flip = bool(torch.rand(1, generator=gen).item() < 0.5)
            assert torch.allclose(boxes[c].double(), torch.tensor(box, dtype=torch.float64), atol=0.5 / 65535 + 1e-9)
            assert bool(flips[c]) == flip
            flips_seen.add(flip)
            with torch.no_grad():
                p = teacher(apply_crop(img, boxes[c].tolist(), flip, (16, 16), CFG["mean"], CFG["std"])[None]).softmax(-1)[0]
            top = p.topk(3)
            assert indices[c].tolist() == top.indices.tolist()
            torch.testing.assert_close(probs[c], top.values.half().float(), rtol=0, atol=1e-4)
    assert flips_seen == {True, False}


def test_workers_and_batching_do_not_change_the_store(store_path, tmp_path):
    other = generate_soft_labels(_teacher(), _dataset(), CFG, tmp_path / "w2", crops=6, topk=3, scale=SCALE, ratio=RATIO,
                                 seed=7, batch_size=4, num_workers=2).out
    a, b = SoftLabelStore.open(store_path), SoftLabelStore.open(other)
    for i in range(6):
        (ba, fa, ia, pa), (bb, fb, ib, pb) = a.crops(i), b.crops(i)
        assert torch.equal(ba, bb) and torch.equal(fa, fb) and torch.equal(ia, ib)
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-4)


def test_bytes_per_crop_is_what_the_shards_hold(store_path):
    assert bytes_per_crop(5) == 29 and bytes_per_crop(3) == 21
    manifest = json.loads((store_path / "manifest.json").read_text())
    assert manifest["bytes_per_crop"] == 21
    data_bytes = 0
    for shard in manifest["shards"]:
        raw = (store_path / shard["file"]).read_bytes()
        header = struct.unpack("<Q", raw[:8])[0]
        data_bytes += len(raw) - 8 - header
    assert data_bytes == 6 * 6 * 21
    assert manifest["dataset"]["fingerprint"] == _dataset().fingerprint
    assert not list(store_path.parent.glob(".store.tmp-*"))


def test_recover_label():
    indices = torch.tensor([[4, 0, 7], [1, 2, 3]])
    probs = torch.tensor([[0.5, 0.2, 0.1], [0.25, 0.25, 0.25]], dtype=torch.float16).float()
    label = recover_label(indices, probs, 10)
    torch.testing.assert_close(label.sum(-1), torch.ones(2))
    assert torch.equal(label.gather(-1, indices), probs)
    rest = [c for c in range(10) if c not in (4, 0, 7)]
    torch.testing.assert_close(label[0, rest], torch.full((7,), (1 - probs[0].sum().item()) / 7))
    full = recover_label(torch.tensor([[1, 0]]), torch.tensor([[0.6, 0.3]]), 2)  # k = C: renormalised
    torch.testing.assert_close(full, torch.tensor([[1 / 3, 2 / 3]]))


def test_check_refuses_mismatches(store_path):
    store = SoftLabelStore.open(store_path)
    store.check(_dataset(), 10)
    store.check(torch.utils.data.Subset(_dataset(), range(3)), 10)  # a leading subset is covered
    with pytest.raises(DataError, match="fingerprint .* regenerate"):
        store.check(_dataset(seed=2), 10)
    with pytest.raises(DataError, match="10 classes but the model has 100"):
        store.check(_dataset(), 100)
    # any subset of labelled images is covered (--limit samples are class-stratified, not leading images)
    assert store.rows_for(torch.utils.data.Subset(_dataset(), [2, 0])) == [2, 0]
    with pytest.raises(DataError, match="not a soft-label store"):
        SoftLabelStore.open(store_path.parent)


def test_limited_store_covers_only_its_images(tmp_path):
    seven = _dataset(7)
    out = generate_soft_labels(_teacher(), torch.utils.data.Subset(seven, range(6)), CFG, tmp_path / "s", crops=2).out
    store = SoftLabelStore.open(out)
    assert len(store) == 6 and store.manifest.dataset["length"] == 7
    store.check(torch.utils.data.Subset(seven, range(6)), 10)
    with pytest.raises(DataError, match="covers 6 of the 7 images .*--limit"):
        store.check(seven, 10)


def test_a_stratified_limit_store_serves_the_same_limit_of_training(tmp_path):
    """softlabels --limit N and quantize --limit-train N take the same class-stratified images (not the leading ones)."""
    from vitqtool.data import stratified_sample

    nine = _dataset(9, classes=3)  # labels 0,1,2,0,1,2,...
    sample = stratified_sample(nine, 4)
    assert len({nine.labels()[i] for i in sample.indices}) == 3 and list(sample.indices) != [0, 1, 2, 3]
    out = generate_soft_labels(_teacher(3), sample, CFG, tmp_path / "s", crops=2, topk=2).out
    store = SoftLabelStore.open(out)
    assert store.manifest.indices == list(sample.indices)
    items = MultiCropDataset(stratified_sample(nine, 4), store, CFG, crops_per_image=2)
    assert items.rows == list(range(4)) and len(items) == 4
    with pytest.raises(DataError, match="covers 4 of the 9 images"):
        store.check(nine, 3)


def test_multicrop_dataset_deterministic_without_replacement(store_path):
    store = SoftLabelStore.open(store_path)
    make = lambda: MultiCropDataset(_dataset(), SoftLabelStore.open(store_path), CFG, crops_per_image=4, seed=5)
    a, b = make(), make()
    crops, targets = a[2]
    assert crops.shape == (4, 3, 16, 16) and targets.shape == (4, 10)
    assert torch.equal(crops, b[2][0]) and torch.equal(targets, b[2][1])
    copied = pickle.loads(pickle.dumps(a))  # what a DataLoader worker receives
    assert torch.equal(copied[2][0], crops)

    img, _ = _dataset()[2]
    boxes, flips, indices, probs = store.crops(2)
    chosen = a.pick(2).tolist()
    assert len(set(chosen)) == 4 and all(0 <= j < 6 for j in chosen)
    for row, j in enumerate(chosen):
        assert torch.equal(crops[row], apply_crop(img, boxes[j].tolist(), bool(flips[j]), (16, 16), CFG["mean"], CFG["std"]))
        assert torch.equal(targets[row], recover_label(indices[j], probs[j], 10))
    torch.testing.assert_close(targets.sum(-1), torch.ones(4))

    picks = [[a.pick(i).tolist() for i in range(6)]]
    a.set_epoch(1)
    picks.append([a.pick(i).tolist() for i in range(6)])
    assert picks[0] != picks[1]
    every = MultiCropDataset(_dataset(), store, CFG, crops_per_image=6, seed=5)
    assert sorted(every.pick(0).tolist()) == list(range(6))
    with pytest.raises(DataError, match="between 1 and the store's 6"):
        MultiCropDataset(_dataset(), store, CFG, crops_per_image=7)


def test_failed_generation_leaves_nothing(tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(DataError, match="teacher predicts 7 classes"):
        generate_soft_labels(_teacher(7), _dataset(), CFG, out, crops=2)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "x").write_text("taken")
    with pytest.raises(RunError, match="--overwrite"):
        generate_soft_labels(_teacher(), _dataset(), CFG, out, crops=2)


def test_losses_against_independent_formulas():
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 10, requires_grad=True), torch.randn(5, 10)
    target = teacher.softmax(-1)
    torch.testing.assert_close(soft_cross_entropy(logits, target), F.cross_entropy(logits, target))
    t = 2.5
    loss = kd_loss(logits, teacher, temperature=t)
    (grad,) = torch.autograd.grad(loss, logits)
    # d/dz of T^2 * CE(z/T, softmax(t/T)) = T * (softmax(z/T) - softmax(t/T)) / batch
    torch.testing.assert_close(grad, t * ((logits / t).softmax(-1) - (teacher / t).softmax(-1)).detach() / 5)


def test_cli_softlabels_on_builtin_data(tmp_path):
    from typer.testing import CliRunner

    from vitqtool.cli import app, main

    out = tmp_path / "labels"
    args = ["softlabels", "vit_tiny_patch16_224", "--random-init", "--model-args",
            '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}',
            "--data", "builtin:mnist5k", "--crops", "4", "--limit", "6", "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["images"] == 6 and doc["crops"] == 4 and doc["bytes_per_crop"] == 29 and doc["total_bytes"] == 6 * 4 * 29
    store = SoftLabelStore.open(out)
    from vitqtool.data import load_dataset, stratified_sample

    train = load_dataset("builtin:mnist5k", "train")
    store.check(stratified_sample(train, 6), 10)  # --limit 6: the same class-stratified images everywhere
    with pytest.raises(DataError, match="covers 6 of the"):
        store.check(train, 10)
    assert main(args) == 1  # the store exists: refused with one line, no traceback


def _store_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_killed_generation_resumes_keeping_finished_shards_and_gives_the_same_store(store_path, tmp_path):
    """SIGKILL while the second of two shards is being written; --resume redoes only that shard; bitwise the same store."""
    out = tmp_path / "store"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_softlabels as t
        from vitqtool.train import softlabels
        original, calls = softlabels.save_safetensors, []
        def save(path, tensors):
            calls.append(path)
            if len(calls) == 2:  # the second shard: half a file in the temporary name, then killed
                path.write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            original(path, tensors)
        softlabels.save_safetensors = save
        softlabels.generate_soft_labels(t._teacher(), t._dataset(), t.CFG, {str(out)!r}, crops=6, topk=3, scale=t.SCALE,
                                        ratio=t.RATIO, seed=7, batch_size=5, images_per_shard=4, teacher_id="tiny",
                                        dataset_id="random")
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    staging = staging_folder(out)
    assert not out.exists() and (staging / "shard-00000.safetensors").is_file()
    assert not (staging / "shard-00001.safetensors").exists() and any(".vitq-tmp" in p.name for p in staging.iterdir())
    kept = (staging / "shard-00000.safetensors").stat().st_ino
    args = dict(crops=6, topk=3, scale=SCALE, ratio=RATIO, seed=7, batch_size=5, images_per_shard=4, teacher_id="tiny",
                dataset_id="random")
    with pytest.raises(RunError, match="unfinished soft-label store.*--resume.*--overwrite"):
        generate_soft_labels(_teacher(), _dataset(), CFG, out, **args)
    with pytest.raises(RunError, match=r"other settings \(crops\)"):
        generate_soft_labels(_teacher(), _dataset(), CFG, out, resume=True, **{**args, "crops": 5})
    run = generate_soft_labels(_teacher(), _dataset(), CFG, out, resume=True, **args)
    assert (run.shards, run.shards_done, run.images_labelled) == (2, 1, 2)
    assert (out / "shard-00000.safetensors").stat().st_ino == kept  # the finished shard was not redone
    assert not staging.exists()
    assert _store_bytes(out) == _store_bytes(store_path)  # manifest and shards, byte for byte
    again = generate_soft_labels(_teacher(), _dataset(), CFG, out, resume=True, **args)  # finished: nothing to do
    assert again.images_labelled == 0 and _store_bytes(out) == _store_bytes(store_path) and not staging.exists()


def test_a_second_writer_of_the_same_store_is_refused(tmp_path):
    out = tmp_path / "store"
    with folder_lock(staging_folder(out)):
        with pytest.raises(BusyError, match=f"PID {os.getpid()}"):
            generate_soft_labels(_teacher(), _dataset(), CFG, out, crops=2)
        assert staging_folder(out).is_dir()  # the holder's folder is left alone
    assert not out.exists()
