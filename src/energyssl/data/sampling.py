"""Datasets wrapped for training: a transform applied to another dataset, augmentation seeded by
(seed, epoch, image) and the sampler that feeds it, so that a resumed run sees the same crops."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class TransformedDataset(Dataset):
    """Applies a transform to the images of another dataset, keeping labels (``joint``: to the
    (image, target) pairs)."""

    def __init__(self, dataset: Dataset, transform, joint: bool = False) -> None:
        self.dataset, self.transform, self.joint = dataset, transform, joint

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.dataset[index]
        return self.transform(image, label) if self.joint else (self.transform(image), label)


class SeededAugmentation(Dataset):
    """A random transform whose randomness (torch's, numpy's and Python's: timm's RandAugment draws
    from all three) is fixed by (seed, epoch, index), never drawn from the process's random
    state: a resumed run, and any number of loader workers, see the same crops as the
    uninterrupted run. Indexed by the (epoch, index) pairs of :class:`EpochSampler`. ``joint``:
    the transform takes and returns the (image, target) pair (a mask moves with its image)."""

    def __init__(self, dataset: Dataset, transform, seed: int, joint: bool = False) -> None:
        self.dataset, self.transform, self.seed, self.joint = dataset, transform, seed, joint

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.dataset[index]
        seed = hash((self.seed, epoch, index)) & (2**63 - 1)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.transform(image, label) if self.joint else (self.transform(image), label)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class EpochSampler(Sampler):
    """A DistributedSampler's order as (epoch, index) pairs, for :class:`SeededAugmentation`."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def skip_batches(loader: DataLoader, sampler: EpochSampler, skip_samples: int) -> DataLoader:
    """A loader over the same epoch order minus its first ``skip_samples`` indices: where a
    resumed run takes up its epoch."""
    indices = list(iter(sampler))[skip_samples:]
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=indices,
        num_workers=loader.num_workers,
        drop_last=True,
        pin_memory=loader.pin_memory,
        generator=loader.generator,
    )
