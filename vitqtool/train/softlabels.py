"""Multi-crop soft labels (method.md §5, FKD-style): generate once with a teacher, replay during training.

For every training image the teacher sees `crops` random-resized crops (+ optional flip), each drawn
from a generator seeded by (seed, image index). Per crop the store keeps

    box      4 x uint16  fixed point: fraction = value / 65535 (x0, y0, w, h)      8 bytes
    flip     1 x uint8                                                              1 byte
    indices  k x int16   teacher top-k classes                                     2k bytes
    probs    k x float16 teacher top-k softmax probabilities                       2k bytes

i.e. `9 + 4k` bytes per crop (29 for k = 5). The teacher runs on the crop *as stored* (the box is
rounded to fixed point before cropping), so a replay reproduces its input pixels exactly. Tensors go
to safetensors shards of contiguous images plus a `manifest.json`.

Writing scales out and resumes: the store is built in a staging folder beside `out` (`.NAME.partial`,
locked against a second writer) that holds `plan.json` (the manifest to be) and every finished shard,
each written atomically. Under N processes (`accelerate launch`) process r labels shards r, r+N, ...;
since every crop is drawn from (seed, image index) and the teacher batches never cross a shard, the
shards do not depend on which process made them, and the finished store is bitwise the one a single
process writes. A killed run leaves its finished shards; `--resume` labels the rest. When all shards
exist, the main process writes `manifest.json` and renames the folder to `out`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..core.artifacts import SoftLabelManifest
from ..data import ImageDataset, train_transform
from ..errors import DataError, RunError, VitqError
from ..fileio import LOCK_FILE, TEMP_MARK, atomic_write, check_folder_target, folder_lock, save_safetensors, write_json
from ..progress import progress_bar
from .sampling import mix_seed

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PLAN = "plan.json"  # in the staging folder: the manifest the finished store will have
BOX_SCALE = 65535  # uint16 fixed point for box fractions
SHARD_BYTES = 64 * 2**20  # target size of one shard: the unit processes split and a killed run redoes
_CROP_SALT = 0xC0FFEE  # separates the crop-drawing stream of MultiCropDataset from other uses of mix_seed


def bytes_per_crop(topk: int) -> int:
    """Stored bytes per crop: box 8 + flip 1 + top-k indices 2k + probabilities 2k."""
    return 4 * 2 + 1 + topk * 2 + topk * 2


def encode_box(box: Sequence[float]) -> Tensor:
    """Fractional (x0, y0, w, h) -> uint16 fixed point (round to nearest, clamped to [0, 65535])."""
    values = torch.tensor([round(min(max(float(v), 0.0), 1.0) * BOX_SCALE) for v in box], dtype=torch.int32)
    return values.to(torch.uint16)


def decode_box(codes: Tensor) -> Tensor:
    """uint16 fixed point -> float32 fractions (what the teacher saw and what training replays)."""
    return codes.to(torch.float32) / BOX_SCALE


def recover_label(indices: Tensor, probs: Tensor, num_classes: int) -> Tensor:
    """Full label `[..., num_classes]`: top-k probabilities in place, the remaining mass spread uniformly; sums to 1."""
    k = indices.shape[-1]
    probs = probs.to(torch.float32)
    top_mass = probs.sum(-1, keepdim=True)
    if num_classes > k:
        fill = (1 - top_mass).clamp(min=0) / (num_classes - k)
    else:
        fill = torch.zeros_like(top_mass)
    out = fill.expand(*probs.shape[:-1], num_classes).clone()
    out.scatter_(-1, indices.long(), probs)
    # float16 rounding can push the stored top-k mass past 1 (or, with k = num_classes, short of it)
    renorm = (top_mass > 1) | (num_classes <= k)
    return torch.where(renorm, out / out.sum(-1, keepdim=True), out)


def _dataset_identity(dataset: Any) -> tuple[ImageDataset, list[int]]:
    """(underlying ImageDataset, the index in it of every item of `dataset`): unwraps `Subset`s (e.g. from --limit)."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    if not isinstance(dataset, ImageDataset):
        raise DataError(f"soft labels need a vitqtool dataset (from vitqtool.data.load_dataset), got {type(dataset).__name__}")
    return dataset, indices


@torch.no_grad()
def generate_soft_labels(teacher: nn.Module, dataset: Any, data_config: dict, out: str | Path, crops: int,
                         topk: int = 5, scale: tuple[float, float] = (0.08, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, seed: int = 0,
                         batch_size: int = 64, teacher_id: str = "", dataset_id: str = "",
                         show_progress: bool = False, images_per_shard: int | None = None,
                         overwrite: bool = False, resume: bool = False, num_workers: int = 0,
                         process_index: int = 0, num_processes: int = 1) -> SoftLabelRun:
    """Run `teacher` over `crops` stored random-resized crops per image of `dataset` and write a soft-label store.

    Args:
        teacher: classifier whose logits have one entry per dataset class; run in eval mode on its device.
        dataset: an ImageDataset (or a leading `Subset` of one) yielding (uint8 [C, H, W], label).
        data_config: the teacher's timm data config (input size, mean, std).
        out: folder to create; must not exist (or be empty) unless `overwrite`.
        crops, topk: crops per image and stored classes per crop.
        scale, ratio, hflip, seed: the random-resized-crop parameters and the seed of every draw.
        batch_size: crops per teacher forward (at least; chunks of one image are not split).
        num_workers: DataLoader worker processes that draw and replay crops while the teacher runs.
        images_per_shard: images per safetensors shard (default: about SHARD_BYTES per shard).
        resume: finish the unfinished store of a killed run with the same settings (its shards are kept).
        process_index, num_processes: this process among those labelling together (torch.distributed
            initialised when more than one); every process calls this with the same arguments.
    Returns:
        A SoftLabelRun: the store's path, its shard count, the shards found finished, the images labelled now.
    Raises:
        DataError for a teacher/dataset class mismatch or bad parameters; RunError when `out` is taken, or holds an
        unfinished store that `resume` does not continue; BusyError when another writer holds the store.
    """
    out = Path(out)
    base, base_indices = _dataset_identity(dataset)
    n = len(base_indices)
    num_classes = int(base.num_classes)
    if crops < 1 or batch_size < 1:
        raise DataError(f"crops and batch size must be >= 1, got crops={crops}, batch_size={batch_size}")
    if not 1 <= topk <= num_classes:
        raise DataError(f"topk must be between 1 and the number of classes ({num_classes}), got {topk}")
    if num_classes > 32767:
        raise DataError(f"{num_classes} classes do not fit the int16 class indices of the soft-label format")
    if n == 0:
        raise DataError(f"dataset '{base.spec}' [{base.split}] is empty; nothing to label")

    transform = train_transform(data_config, scale, ratio, hflip)
    bpc = bytes_per_crop(topk)
    per_shard = images_per_shard or max(1, SHARD_BYTES // (crops * bpc))
    shards: list[dict[str, Any]] = [
        {"file": f"shard-{k:05d}.safetensors", "first": first, "count": min(per_shard, n - first)}
        for k, first in enumerate(range(0, n, per_shard))]
    manifest = SoftLabelManifest(
        teacher=teacher_id or type(teacher).__name__,
        teacher_input_size=list(transform.size),
        dataset={"id": dataset_id or f"{base.spec}[{base.split}]", "spec": base.spec, "split": base.split,
                 "fingerprint": base.fingerprint, "length": len(base), "images": n, "num_classes": num_classes},
        crops=crops, topk=topk, scale=list(transform.scale), ratio=list(transform.ratio), hflip=transform.hflip,
        seed=seed, bytes_per_crop=bpc,
        encoding={"boxes": "uint16 [N, K, 4] x0,y0,w,h as value/65535", "flips": "uint8 [N, K]",
                  "indices": "int16 [N, K, k]", "probs": "float16 [N, K, k]"},
        shards=shards, indices=None if base_indices == list(range(n)) else base_indices)
    plan = manifest.to_dict()
    staging = staging_folder(out)
    group = _Group(process_index, num_processes, next(teacher.parameters()).device)
    is_main = process_index == 0
    start = time.perf_counter()
    with contextlib.ExitStack() as held:
        locked = []

        def open_store() -> str | None:
            if not is_main:
                return None
            held.enter_context(folder_lock(staging))  # held until the store is in place: one writer per store
            locked.append(True)
            return _open_staging(out, staging, plan, overwrite, resume)

        try:
            if group.agree(open_store) == "done":
                return SoftLabelRun(out, len(shards), len(shards), 0, 0.0)
            done = {s["file"] for s in shards if (staging / s["file"]).is_file()}
            mine = [s for k, s in enumerate(shards) if k % num_processes == process_index and s["file"] not in done]
            labelled = _label_shards(teacher, dataset, base_indices, transform, mine, staging, crops, topk, batch_size,
                                     num_classes, num_workers, seed, show_progress and is_main)
            group.agree(lambda: _finish_store(staging, out, shards, plan) if is_main else None)
        except BaseException:
            if locked and not any(staging.glob("shard-*.safetensors")):  # nothing worth resuming
                shutil.rmtree(staging, ignore_errors=True)
            raise
    seconds = time.perf_counter() - start
    images = group.total(sum(s["count"] for s in mine))
    log.info("soft labels: %d of %d shards labelled by %d process(es) (%d images x %d crops, %d this process) in %.1fs; %s",
             len(shards) - len(done), len(shards), num_processes, images, crops, labelled, seconds, out)
    return SoftLabelRun(out, len(shards), len(done), images, seconds)


@dataclass(frozen=True)
class SoftLabelRun:
    """What one `generate_soft_labels` call did."""

    out: Path              # the finished store
    shards: int            # shards in the store
    shards_done: int       # shards a killed run had finished (kept by --resume)
    images_labelled: int   # images labelled by this call, all processes together
    seconds: float


def staging_folder(out: Path) -> Path:
    """Where the store `out` is built (and a killed build waits for `--resume`): `.NAME.partial` beside it."""
    return out.parent / f".{out.name}.partial"


class _Group:
    """The processes labelling together: rank, size, and the two collectives the store needs (no-ops alone).

    `device` is where this process's tensors for a collective live (its teacher's: NCCL reduces CUDA tensors only).
    """

    def __init__(self, index: int, size: int, device: torch.device) -> None:
        self.index, self.size, self.device = index, size, device

    def agree(self, work: Any) -> Any:
        """Wait for every process, run `work` (main process), and raise its error (or return its result) on every process."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()
        try:
            result, error = work(), None
        except Exception as exc:
            result, error = None, exc
        if self.size == 1:
            if error is not None:
                raise error
            return result
        box = [(result, None if error is None else (type(error), str(error)))]
        dist.broadcast_object_list(box, src=0)
        if error is not None and self.index == 0:
            raise error
        result, failure = box[0]
        if failure is not None:  # the main process's one-line error, as this process's own
            raise (failure[0] if issubclass(failure[0], VitqError) else RunError)(failure[1])
        return result

    def total(self, value: int) -> int:
        """`value` summed over the processes."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())


def _open_staging(out: Path, staging: Path, plan: dict, overwrite: bool, resume: bool) -> str:
    """Check `out` and the (locked) staging folder against `plan`: "done" (nothing to do), or "go" with a plan.json in place."""
    other = staging.is_dir() and (staging / PLAN).is_file()
    if resume and not other:
        if _same_store(out, plan):
            log.info("'%s' is already a finished store with these settings; nothing to resume", out)
            shutil.rmtree(staging)  # made just now for the lock
            return "done"
        raise RunError(f"nothing to resume for '{out}' (no unfinished store in '{staging}'); run without --resume")
    if other and not (resume or overwrite):
        have = len(list(staging.glob("shard-*.safetensors")))
        raise RunError(f"'{out}' has an unfinished soft-label store ({have} of its shards in '{staging}'); pass --resume to "
                       "finish it or --overwrite to start over")
    if not resume:
        check_store_out(out, overwrite)
    if other and resume:
        recorded = json.loads((staging / PLAN).read_text())
        diff = sorted(k for k in set(plan) | set(recorded) if plan.get(k) != recorded.get(k))
        if diff:
            raise RunError(f"the unfinished store in '{staging}' was started with other settings ({', '.join(diff)}); "
                           "resume with the original flags or pass --overwrite to start over")
        return "go"
    for entry in staging.iterdir():  # a fresh start: clear an unfinished store (--overwrite), keep the lock
        if entry.name != LOCK_FILE:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    write_json(staging / PLAN, plan)
    return "go"


def _same_store(out: Path, plan: dict) -> bool:
    """Whether `out` is a finished store whose manifest is `plan`."""
    try:
        return json.loads((out / MANIFEST).read_text()) == json.loads(json.dumps(plan))
    except (OSError, ValueError):
        return False


def _finish_store(staging: Path, out: Path, shards: list[dict], plan: dict) -> None:
    """Main process, all shards written: check them, write manifest.json, rename the folder into place."""
    missing = [s["file"] for s in shards if not (staging / s["file"]).is_file()]
    if missing:
        raise RunError(f"soft-label shards {', '.join(missing[:3])} are missing in '{staging}' (with several machines, --out "
                       "must be on a filesystem they all share); rerun with --resume")
    for entry in staging.iterdir():  # temporary files of killed writers
        if TEMP_MARK in entry.name:
            entry.unlink()
    (staging / PLAN).unlink()
    write_json(staging / MANIFEST, plan)
    _move_into_place(staging, out)
    (out / LOCK_FILE).unlink(missing_ok=True)  # the lock stays held (open file) until the caller's block ends


def _label_shards(teacher: nn.Module, dataset: Any, base_indices: list[int], transform: Any, shards: list[dict],
                  folder: Path, crops: int, topk: int, batch_size: int, num_classes: int, num_workers: int, seed: int,
                  show_progress: bool) -> int:
    """Label `shards` and write each atomically into `folder` as soon as it is done; returns the images labelled."""
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    total = sum(s["count"] for s in shards)
    start, done = time.perf_counter(), 0
    try:
        with progress_bar(show_progress, "{task.fields[rate]}") as bar:
            task = bar.add_task("soft labels", total=total, rate="") if bar is not None else None

            def on_image(count: int) -> None:
                if bar is not None:
                    rate = (done + count) * crops / max(time.perf_counter() - start, 1e-9)
                    bar.update(task, completed=done + count, rate=f"{rate:.0f} crops/s")

            for shard in shards:
                first, count = shard["first"], shard["count"]
                jobs = _CropJobs(dataset, base_indices, transform, first, count, crops, batch_size, seed)
                tensors = _label_shard(teacher, jobs, first, count, topk, batch_size, num_classes, num_workers, device,
                                       on_image)
                atomic_write(folder / shard["file"], functools.partial(save_safetensors, tensors=tensors), shared=True)
                done += count
    finally:
        teacher.train(was_training)
    return done


class _CropJobs(torch.utils.data.Dataset):
    """Item j: up to `chunk` consecutive crops of one image, drawn and replayed (runs in DataLoader workers).

    The crops of an image come from one generator seeded by (seed, its index in the full split), so a
    chunk re-draws the crops before it and the result depends neither on chunking, on the number of
    workers, nor on which subset (`--limit`) of the split is labelled.
    """

    def __init__(self, dataset: Any, base_indices: list[int], transform: Any, first: int, count: int, crops: int,
                 chunk: int, seed: int) -> None:
        self.dataset, self.transform, self.crops, self.chunk, self.seed = dataset, transform, crops, chunk, seed
        self.base_indices = base_indices
        self.jobs = [(i, c0) for i in range(first, first + count) for c0 in range(0, crops, chunk)]

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j: int) -> tuple[int, int, Tensor, Tensor, Tensor]:
        index, c0 = self.jobs[j]
        img, _ = self.dataset[index]
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.base_indices[index]))
        boxes, flips, crops = [], [], []
        for c in range(min(c0 + self.chunk, self.crops)):
            box, flip = self.transform.sample(img, generator)
            if c >= c0:
                code = encode_box(box)
                boxes.append(code)
                flips.append(int(flip))
                crops.append(self.transform.replay(img, decode_box(code).tolist(), flip))
        return index, c0, torch.stack(boxes), torch.tensor(flips, dtype=torch.uint8), torch.stack(crops)


def _label_shard(teacher: nn.Module, jobs: _CropJobs, first: int, count: int, topk: int, batch_size: int,
                 num_classes: int, num_workers: int, device: torch.device, on_image: Any) -> dict[str, Tensor]:
    crops = jobs.crops
    boxes = torch.zeros(count, crops, 4, dtype=torch.uint16)
    flips = torch.zeros(count, crops, dtype=torch.uint8)
    indices = torch.zeros(count, crops, topk, dtype=torch.int16)
    probs = torch.zeros(count, crops, topk, dtype=torch.float16)
    pending: list[Tensor] = []
    where: list[tuple[int, int, int]] = []

    def flush() -> None:
        logits = teacher(torch.cat(pending).to(device))
        if logits.shape[-1] != num_classes:
            raise DataError(f"the teacher predicts {logits.shape[-1]} classes but the dataset has {num_classes}; "
                            "use a teacher with a matching classifier head")
        top = torch.softmax(logits.float(), dim=-1).topk(topk, dim=-1)
        top_i, top_p = top.indices.cpu().to(torch.int16), top.values.cpu().to(torch.float16)
        offset = 0
        for row, c0, n in where:
            indices[row, c0:c0 + n] = top_i[offset:offset + n]
            probs[row, c0:c0 + n] = top_p[offset:offset + n]
            offset += n
        pending.clear()
        where.clear()

    loader = torch.utils.data.DataLoader(jobs, batch_size=None, shuffle=False, num_workers=num_workers)
    for index, c0, chunk_boxes, chunk_flips, chunk_crops in loader:
        row, n = index - first, len(chunk_boxes)
        boxes[row, c0:c0 + n] = chunk_boxes
        flips[row, c0:c0 + n] = chunk_flips
        pending.append(chunk_crops)
        where.append((row, c0, n))
        if sum(w[2] for w in where) >= batch_size:
            flush()
        if c0 + n == crops:
            on_image(row + 1)
    if pending:
        flush()
    return {"boxes": boxes, "flips": flips, "indices": indices, "probs": probs}


def check_store_out(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse (RunError) an --out that is a file, a non-empty folder without `overwrite`, or one with an unfinished
    store (neither `resume` nor `overwrite`); cheap, for before the teacher is loaded."""
    check_folder_target(out)
    if resume or overwrite:
        return
    if out.is_dir() and any(out.iterdir()):
        raise RunError(f"'{out}' already exists and is not empty; pass another --out or --overwrite to replace it")
    if (staging_folder(out) / PLAN).is_file():
        raise RunError(f"'{out}' has an unfinished soft-label store in '{staging_folder(out)}'; pass --resume to finish it "
                       "or --overwrite to start over")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished store into place; an existing store is swapped out first and deleted after."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class SoftLabelStore:
    """Read access to a soft-label store written by `generate_soft_labels` (shards are memory-mapped lazily)."""

    def __init__(self, path: Path, manifest: SoftLabelManifest) -> None:
        self.path = path
        self.manifest = manifest
        self._shards = manifest.shards
        self._per_shard = self._shards[0]["count"]
        self._handles: dict[int, Any] = {}
        labelled = manifest.indices if manifest.indices is not None else range(len(self))
        self._rows = {int(image): row for row, image in enumerate(labelled)}  # index in the split -> store row

    def rows_for(self, dataset: Any) -> list[int]:
        """The store row of every item of `dataset` (a split or a `Subset` of it); DataError if one is not labelled."""
        _, indices = _dataset_identity(dataset)
        missing = [i for i in indices if i not in self._rows]
        if missing:
            raise DataError(f"soft-label store '{self.path}' covers {len(indices) - len(missing)} of the {len(indices)} "
                            "images in use (made with another --limit); regenerate it for these images or train on the "
                            "images it labels (the same --limit-train)")
        return [self._rows[i] for i in indices]

    @classmethod
    def open(cls, path: str | Path) -> SoftLabelStore:
        """Open a store folder; DataError if it is missing, not a store, of a newer format, or incomplete."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"'{path}' is not a soft-label store (no {MANIFEST}); create one with `vitqtool softlabels`")
        try:
            document = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"'{manifest_path}' cannot be read ({exc}); regenerate the store") from exc
        manifest = SoftLabelManifest.from_dict(document, f"soft-label store '{path}' ({MANIFEST})")
        missing = [s["file"] for s in manifest.shards if not (path / s["file"]).is_file()]
        if missing or not manifest.shards:
            raise DataError(f"soft-label store '{path}' is incomplete (missing {', '.join(missing) or 'shards'}); regenerate it")
        return cls(path, manifest)

    def __len__(self) -> int:
        return int(self.manifest.dataset["images"])

    @property
    def crops_per_image(self) -> int:
        """Stored crops per image (K)."""
        return self.manifest.crops

    @property
    def topk(self) -> int:
        """Stored classes per crop (k)."""
        return self.manifest.topk

    @property
    def num_classes(self) -> int:
        """Classes of the labelled dataset (and of the teacher)."""
        return int(self.manifest.dataset["num_classes"])

    def check(self, dataset: Any, num_classes: int) -> None:
        """Refuse (DataError) a dataset or model the store was not made for: fingerprint, image count, classes."""
        base, _ = _dataset_identity(dataset)
        info = self.manifest.dataset
        where = f"soft-label store '{self.path}'"
        if base.fingerprint != info["fingerprint"]:
            raise DataError(f"{where} was made for dataset {info['id']} (fingerprint {info['fingerprint']}), not "
                            f"'{base.spec}' [{base.split}] (fingerprint {base.fingerprint}); regenerate it for this "
                            "dataset with `vitqtool softlabels`")
        self.rows_for(dataset)
        if int(num_classes) != self.num_classes or int(base.num_classes) != self.num_classes:
            raise DataError(f"{where} holds labels over {self.num_classes} classes but the model has {num_classes} "
                            f"and the dataset {base.num_classes}; use a store made for this model's classes")

    def crops(self, row: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Store row `row` (see `rows_for`): boxes [K, 4] float32 fractions, flips [K] bool, indices [K, k] long,
        probs [K, k] float32."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside the store's {len(self)} images")
        shard_no, row = divmod(row, self._per_shard)
        handle = self._handle(shard_no)
        boxes = decode_box(handle.get_slice("boxes")[row])
        flips = handle.get_slice("flips")[row].bool()
        indices = handle.get_slice("indices")[row].long()
        probs = handle.get_slice("probs")[row].float()
        return boxes, flips, indices, probs

    def _handle(self, shard_no: int) -> Any:
        handle = self._handles.get(shard_no)
        if handle is None:
            handle = safe_open(str(self.path / self._shards[shard_no]["file"]), framework="pt", device="cpu")
            self._handles[shard_no] = handle
        return handle

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles stay in the process that opened them (DataLoader workers reopen)
        return state


class MultiCropDataset(torch.utils.data.Dataset):
    """Item i -> (crops [C, ch, H, W] normalised, targets [C, num_classes]): C of image i's K stored crops, replayed.

    The C crops are drawn without replacement by a generator seeded by (seed, epoch, i), so every epoch,
    worker count and resume position sees the same crops.
    """

    def __init__(self, dataset: Any, store: SoftLabelStore, data_config: dict, crops_per_image: int = 4,
                 seed: int = 0) -> None:
        store.check(dataset, store.num_classes)
        if not 1 <= crops_per_image <= store.crops_per_image:
            raise DataError(f"crops_per_image must be between 1 and the store's {store.crops_per_image} crops per "
                            f"image, got {crops_per_image}")
        self.dataset = dataset
        self.store = store
        self.rows = store.rows_for(dataset)
        self.transform = train_transform(data_config)
        self.crops_per_image = crops_per_image
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of `epoch` (call before each epoch, on every process)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def pick(self, index: int) -> Tensor:
        """Which stored crops item `index` uses this epoch (C distinct indices into 0..K-1)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index, _CROP_SALT))
        return torch.randperm(self.store.crops_per_image, generator=generator)[:self.crops_per_image]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        img, _ = self.dataset[index]
        boxes, flips, indices, probs = self.store.crops(self.rows[index])
        chosen = self.pick(index)
        crops = torch.stack([self.transform.replay(img, boxes[j].tolist(), bool(flips[j])) for j in chosen.tolist()])
        return crops, recover_label(indices[chosen], probs[chosen], self.store.num_classes)
