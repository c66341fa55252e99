"""Datasets wrapped for training: a transform applied to another dataset, augmentation seeded by
(seed, epoch, image) and the sampler that feeds it, so that a resumed run sees the same crops."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class TransformedDataset(Dataset):
    """Applies a transform to the images of another dataset, keeping labels."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), label


class SeededAugmentation(Dataset):
    """A random transform whose randomness is fixed by (seed, epoch, index), never drawn from the
    process's random state: a resumed run, and any number of loader workers, see the same crops
    as the uninterrupted run. Indexed by the (epoch, index) pairs of :class:`EpochSampler`."""

    def __init__(self, dataset: Dataset, transform, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & (2**63 - 1))
            return self.transform(image), label


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
