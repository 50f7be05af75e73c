"""Deterministic, resumable training data: per-(seed, epoch) permutations sharded over processes.

Every random choice is a pure function of (seed, epoch, index), never of a global RNG or of the
number of DataLoader workers, so a run resumed mid-epoch sees exactly the batches it would have
seen, and N processes with B images each see the same global batches as 1 process with N*B.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ..data import ImageDataset, train_transform


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


CALIBRATION = 0xCA1  # stream tag of the calibration image order (epochs use tag 0)


def epoch_permutation(n: int, seed: int, epoch: int, stream: int = 0) -> Tensor:
    """The global image order of one epoch (or, with `stream=CALIBRATION`, of the calibration images)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, stream, epoch)))


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This process's micro-batches of one epoch, starting after `start` already-consumed micro-batches.

    Global micro-batch j is `perm[j*G:(j+1)*G]` with `G = batch_size * world_size`; process r takes the
    r-th slice of size `batch_size`. The incomplete tail of the epoch is dropped. `stream` selects an
    independent order (CALIBRATION for the calibration batches).
    """

    def __init__(self, n: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
                 num_batches: int, start: int = 0, stream: int = 0) -> None:
        self.n, self.batch_size, self.world_size, self.rank = n, batch_size, world_size, rank
        self.seed, self.epoch, self.num_batches, self.start, self.stream = seed, epoch, num_batches, start, stream

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.stream)
        g = self.batch_size * self.world_size
        for j in range(self.start, self.num_batches):
            lo = j * g + self.rank * self.batch_size
            yield perm[lo:lo + self.batch_size].tolist()


class AugmentedDataset(torch.utils.data.Dataset):
    """(uint8 image, label) -> (random-resized crop + flip, label), the crop drawn from (seed, epoch, index)."""

    def __init__(self, dataset: ImageDataset | torch.utils.data.Subset, data_config: dict, scale: tuple[float, float],
                 ratio: tuple[float, float], hflip: bool, seed: int) -> None:
        self.dataset = dataset
        self.transform = train_transform(data_config, scale, ratio, hflip)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops __getitem__ draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img, label = self.dataset[index]
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index))
        return self.transform(img, generator), label
